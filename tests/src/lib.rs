//! Shared helpers for topos's integration tests.

pub mod listener_replay;

pub use listener_replay::SpaceReplay;
