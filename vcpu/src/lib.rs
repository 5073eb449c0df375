//! # topos-vcpu
//!
//! vCPUs, boards and the `topos` command. For now it holds the default
//! board's memory map; the KVM backend, the interpreter and the firmware land
//! with their own issues.

pub mod board;
pub mod stress;
