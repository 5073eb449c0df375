//! Shared helpers for topos's integration tests.

pub mod listener_replay;

pub use listener_replay::SpaceReplay;

/// `default` proptest cases, or `PROPTEST_CASES` for a longer soak.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
