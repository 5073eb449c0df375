//! The one place where the vCPU layer's concurrency primitives come from.
//!
//! The control protocol (`control.rs`) and the interpreter's coalesced-MMIO
//! buffers (`interp/coalesced.rs`) import their atomics, mutexes and
//! condition variable from here; a loom build (`RUSTFLAGS="--cfg
//! topos_loom"`) swaps them for loom's, so the loom model in `loom-tests/`
//! checks the protocol itself. The mutex and condition variable are the
//! runtime's poison-ignoring ones (`topos_runtime::locks`).

#[cfg(not(topos_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(topos_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, Ordering};

pub(crate) use std::sync::Arc;
pub(crate) use topos_runtime::locks::{Condvar, Mutex};
