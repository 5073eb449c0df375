//! The KVM backend (rust-vmm `kvm-ioctls`): memslots mirroring the
//! FlatView. vCPUs, the in-kernel irqchip, ioeventfds and coalesced MMIO
//! land here next.

pub mod memslots;

pub use memslots::{MemslotError, MemslotMirror, Slot};
