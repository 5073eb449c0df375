//! # topos-vcpu
//!
//! vCPUs, boards and the `topos` command. For now it holds the default
//! board's memory map and the first part of the KVM backend (the memslot
//! mirror); vCPUs, the `pc` board, the firmware and the interpreter land
//! with their own issues.

pub mod backend;
pub mod board;
pub mod control;
pub mod error;
pub mod kvm;
pub mod machine;
pub mod stress;
mod sync;
pub mod vm;

pub use error::{Error, Result};
