//! The KVM backend (rust-vmm `kvm-ioctls`): the VM with its in-kernel
//! irqchip and PIT, memslots mirroring the FlatView, and vCPUs with their
//! kick, ioeventfds registered with KVM, and coalesced MMIO through KVM's
//! ring.

pub mod coalesced;
mod entry;
pub use entry::flat_segment;
pub mod ioeventfds;
pub mod memslots;
pub mod vcpu;
pub mod vm;

pub use ioeventfds::{IoBus, IoeventfdMirror};
pub use memslots::{MemslotError, MemslotMirror, Slot};
pub use vcpu::{KvmKicker, KvmVcpu};
pub use vm::KvmVm;
