//! # topos-vcpu
//!
//! vCPUs, boards and the `topos` command. For now it holds the default
//! board's memory map and the first part of the KVM backend (the memslot
//! mirror); vCPUs, the `pc` board, the firmware and the interpreter land
//! with their own issues.

pub mod board;
pub mod firmware;
#[cfg(target_arch = "x86_64")]
pub mod kvm;
pub mod stress;
