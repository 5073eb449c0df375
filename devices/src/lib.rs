//! # topos-devices
//!
//! Device models for topos. The actor harness and the device models arrive
//! with their own issue; this crate is a workspace member so that the layout
//! is fixed from the start.
#![forbid(unsafe_code)]

pub use topos_runtime as runtime;
