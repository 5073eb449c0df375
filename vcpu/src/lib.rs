//! # topos-vcpu
//!
//! vCPUs, boards and the `topos` command: vCPU threads behind a backend
//! trait and their control protocol, the KVM backend, QEMU's `pc` board,
//! the embedded firmware, the x86 interpreter, and the machine `topos run`
//! boots.

pub mod backend;
pub mod board;
pub mod control;
pub mod error;
pub mod firmware;
pub mod interp;
pub mod kvm;
pub mod machine;
pub mod stress;
mod sync;
pub mod vm;

pub use error::{Error, Result};
