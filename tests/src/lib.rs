//! Shared helpers for topos's integration tests.
