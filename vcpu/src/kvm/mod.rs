//! The KVM backend (rust-vmm `kvm-ioctls`): the VM with its in-kernel
//! irqchip and PIT, memslots mirroring the FlatView, and vCPUs with their
//! kick. ioeventfds and coalesced MMIO land here next.

pub mod memslots;
pub mod vcpu;
pub mod vm;

pub use memslots::{MemslotError, MemslotMirror, Slot};
pub use vcpu::{KvmKicker, KvmVcpu};
pub use vm::KvmVm;
