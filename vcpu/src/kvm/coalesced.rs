//! Coalesced MMIO through KVM: the runtime's coalesced ranges become KVM
//! zones (`KVM_REGISTER_COALESCED_MMIO`), where guest writes do not exit
//! but are queued in a ring page the kernel shares with user space; the ring
//! is drained, in order, into the memory address space at every exit of any
//! vCPU and by the runtime's flush hook before any access to a region that
//! flushes coalesced MMIO (QEMU's `kvm_flush_coalesced_mmio_buffer`).
//!
//! The ring is one page per VM (every vCPU descriptor maps the same one);
//! [`CoalescedRing`] maps it once, through vCPU 0's descriptor, and drains
//! it under a lock, so entries are replayed once and in order whichever
//! thread drains.

use kvm_bindings::{kvm_coalesced_mmio, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use topos_runtime::{HwAddr, ListenerResult, MemoryListener, MemoryRegionSection};

/// The ring's page size (KVM's `PAGE_SIZE` on x86).
const RING_PAGE: usize = 4096;
/// Bytes before the entries: `first` and `last`.
const RING_HEADER: usize = 8;
/// Entries in the ring (`KVM_COALESCED_MMIO_MAX`).
const RING_ENTRIES: u32 = ((RING_PAGE - RING_HEADER) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;

/// KVM's coalesced-MMIO ring, mapped into this process.
#[derive(Debug)]
pub struct CoalescedRing {
    page: *mut u8,
    /// Serialises drains, so each entry is replayed once and in order.
    drain: Mutex<()>,
}

// SAFETY: the page is a shared mapping that lives until `drop`; all reads
// and writes of it go through atomics and volatile reads under `drain`.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the ring through a vCPU descriptor of the VM.
    pub fn map(vcpu: &impl AsRawFd) -> std::io::Result<CoalescedRing> {
        let offset = KVM_COALESCED_MMIO_PAGE_OFFSET as libc::off_t * RING_PAGE as libc::off_t;
        // SAFETY: a fresh shared mapping of one page of the vCPU descriptor
        // at the offset KVM documents for the ring; the result is checked.
        // The mapping keeps the file alive, so it outlives the descriptor.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RING_PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CoalescedRing { page: page.cast(), drain: Mutex::new(()) })
    }

    fn index(&self, at: usize) -> &AtomicU32 {
        // SAFETY: `first` (offset 0) and `last` (offset 4) are aligned u32s
        // in the mapped page, shared with the kernel; `AtomicU32` has their
        // layout, and this process only touches them atomically.
        unsafe { &*self.page.add(at).cast::<AtomicU32>() }
    }

    /// Whether entries wait (one load of each index).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.index(0).load(Ordering::Relaxed) == self.index(4).load(Ordering::Acquire)
    }

    /// Replays every queued write, oldest first, through `write`; returns
    /// how many.
    pub fn drain(&self, mut write: impl FnMut(HwAddr, &[u8])) -> usize {
        if self.is_empty() {
            return 0;
        }
        let _serial = self.drain.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (first, last) = (self.index(0), self.index(4));
        let mut n = 0;
        loop {
            let head = first.load(Ordering::Relaxed);
            if head == last.load(Ordering::Acquire) || head >= RING_ENTRIES {
                break;
            }
            let at = RING_HEADER + head as usize * std::mem::size_of::<kvm_coalesced_mmio>();
            // SAFETY: `head < RING_ENTRIES`, so the entry lies in the page;
            // the kernel wrote it before publishing `last` (read Acquire
            // above) and does not touch it until `first` moves past it.
            let entry = unsafe { std::ptr::read_volatile(self.page.add(at).cast::<kvm_coalesced_mmio>()) };
            let len = (entry.len as usize).min(entry.data.len());
            write(entry.phys_addr, &entry.data[..len]);
            first.store((head + 1) % RING_ENTRIES, Ordering::Release);
            n += 1;
        }
        n
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `map` with this size and is not
        // used after this.
        unsafe { libc::munmap(self.page.cast(), RING_PAGE) };
    }
}

/// Mirrors the memory address space's coalesced ranges into KVM zones.
pub struct CoalescedZones {
    vm: Arc<VmFd>,
}

impl std::fmt::Debug for CoalescedZones {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoalescedZones").finish_non_exhaustive()
    }
}

/// Why a zone could not be (un)registered.
#[derive(Debug, thiserror::Error)]
#[error("KVM_{what}_COALESCED_MMIO at {addr:#x}+{len:#x}: {source}")]
pub struct ZoneError {
    what: &'static str,
    addr: u64,
    len: u64,
    source: kvm_ioctls::Error,
}

impl CoalescedZones {
    /// Zones of `vm`.
    pub fn new(vm: Arc<VmFd>) -> CoalescedZones {
        CoalescedZones { vm }
    }

    fn change(&self, register: bool, addr: HwAddr, len: u64) -> ListenerResult {
        let Ok(size) = u32::try_from(len) else {
            // KVM zones are at most 4 GiB; larger ones stay with the runtime.
            return Ok(());
        };
        let r = if register {
            self.vm.register_coalesced_mmio(IoEventAddress::Mmio(addr), size)
        } else {
            self.vm.unregister_coalesced_mmio(IoEventAddress::Mmio(addr), size)
        };
        r.map_err(|source| {
            let what = if register { "REGISTER" } else { "UNREGISTER" };
            Box::new(ZoneError { what, addr, len, source }) as Box<dyn std::error::Error + Send + Sync>
        })
    }
}

impl MemoryListener for CoalescedZones {
    fn wants_region_nop(&self) -> bool {
        false
    }

    fn coalesced_mmio_add(&self, _section: &MemoryRegionSection, addr: HwAddr, len: u64) -> ListenerResult {
        self.change(true, addr, len)
    }

    fn coalesced_mmio_del(&self, _section: &MemoryRegionSection, addr: HwAddr, len: u64) -> ListenerResult {
        self.change(false, addr, len)
    }
}
