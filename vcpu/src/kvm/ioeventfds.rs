//! ioeventfds through `KVM_IOEVENTFD`: a listener that registers every
//! ioeventfd of one address space with the VM, so a matching guest write
//! signals the eventfd in the kernel, without an exit (QEMU's
//! `kvm_mem_ioeventfd_add` and `kvm_io_ioeventfd_add`). The runtime sends
//! `eventfd_del` and `eventfd_add` as regions move, so registrations
//! follow remaps.
//!
//! With data matching, the registration has the ioeventfd's size and
//! value. Without it, KVM is asked for any write at the address
//! (`kvm-ioctls` ties the length to the datamatch), where the runtime would
//! also check the size when it has one: a guest write of another size at
//! that exact address then signals instead of reaching the device.

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::sync::Arc;
use topos_runtime::{EventNotifier, ListenerResult, MemoryListener, MemoryRegionSection};

/// Which KVM bus an address space's ioeventfds go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBus {
    /// Memory (`KVM_IOEVENTFD` on the MMIO bus).
    Mmio,
    /// Ports (`KVM_IOEVENTFD_FLAG_PIO`).
    Pio,
}

/// Mirrors one address space's ioeventfds into the VM.
pub struct IoeventfdMirror {
    vm: Arc<VmFd>,
    bus: IoBus,
}

impl std::fmt::Debug for IoeventfdMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoeventfdMirror").field("bus", &self.bus).finish_non_exhaustive()
    }
}

/// Why `KVM_IOEVENTFD` failed.
#[derive(Debug, thiserror::Error)]
#[error("KVM_IOEVENTFD {what} at {addr:#x} ({bus:?}, size {size}): {source}")]
pub struct IoeventfdError {
    what: &'static str,
    addr: u64,
    bus: IoBus,
    size: u128,
    source: kvm_ioctls::Error,
}

impl IoeventfdMirror {
    /// A mirror registering on `bus` of `vm`.
    pub fn new(vm: Arc<VmFd>, bus: IoBus) -> IoeventfdMirror {
        IoeventfdMirror { vm, bus }
    }

    fn change(
        &self,
        add: bool,
        s: &MemoryRegionSection,
        match_data: bool,
        data: u64,
        e: &EventNotifier,
    ) -> ListenerResult {
        let addr = match self.bus {
            IoBus::Mmio => IoEventAddress::Mmio(s.offset_within_address_space),
            IoBus::Pio => IoEventAddress::Pio(s.offset_within_address_space),
        };
        let vm = &self.vm;
        let r = match (match_data, s.size) {
            (true, 1) => register(vm, add, e, &addr, data as u8),
            (true, 2) => register(vm, add, e, &addr, data as u16),
            (true, 4) => register(vm, add, e, &addr, data as u32),
            (true, 8) => register(vm, add, e, &addr, data),
            _ => register(vm, add, e, &addr, NoDatamatch),
        };
        r.map_err(|source| {
            let what = if add { "add" } else { "del" };
            let err = IoeventfdError { what, addr: s.offset_within_address_space, bus: self.bus, size: s.size, source };
            Box::new(err) as Box<dyn std::error::Error + Send + Sync>
        })
    }
}

fn register<T: Into<u64>>(
    vm: &VmFd,
    add: bool,
    e: &EventNotifier,
    addr: &IoEventAddress,
    data: T,
) -> Result<(), kvm_ioctls::Error> {
    if add {
        vm.register_ioevent(e, addr, data)
    } else {
        vm.unregister_ioevent(e, addr, data)
    }
}

impl MemoryListener for IoeventfdMirror {
    fn wants_region_nop(&self) -> bool {
        false
    }

    fn eventfd_add(&self, s: &MemoryRegionSection, match_data: bool, data: u64, e: &EventNotifier) -> ListenerResult {
        self.change(true, s, match_data, data, e)
    }

    fn eventfd_del(&self, s: &MemoryRegionSection, match_data: bool, data: u64, e: &EventNotifier) -> ListenerResult {
        self.change(false, s, match_data, data, e)
    }
}
