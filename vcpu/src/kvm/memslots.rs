//! The KVM memslot mirror: a memory listener that keeps the VM's memslots
//! equal to the RAM of one address space's FlatView (QEMU's
//! `kvm_region_add`/`kvm_region_del` and `kvm_set_phys_mem`).
//!
//! What becomes a slot, section by section:
//!
//! | section | slot |
//! | --- | --- |
//! | RAM | read-write (`KVM_MEM_READONLY` if the RAM or the section is read-only: ROM) |
//! | a ROM device in romd mode | read-only: reads hit memory, writes exit to the device |
//! | a ROM device outside romd mode, I/O, a reservation | none: every access exits |
//!
//! Sections are cut to whole host pages as QEMU's `kvm_align_section` does
//! (start rounded up, end down); what is left over exits and is served by
//! the runtime. A slot's host memory is the region's, so the slot keeps the
//! region alive until it is deleted.
//!
//! The mirror is synchronous: its callbacks run inside the commit, before
//! the new view is published (see `MemoryListener`), so no vCPU can reach a
//! range through KVM before the runtime serves it, and a vCPU that exits on
//! an address whose slot is being replaced is served by the view still
//! published, which has the old mapping.
//!
//! Dirty logging: a slot carries `KVM_MEM_LOG_DIRTY_PAGES` while its region
//! has clients logging (`effective_dirty_log_mask`), and `log_sync` folds
//! `KVM_GET_DIRTY_LOG` into the region's bitmaps; where the kernel has
//! manual protection, the harvested pages are then cleared with
//! `KVM_CLEAR_DIRTY_LOG`.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvm_ioctls::{Kvm, VmFd};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use topos_runtime::{ListenerResult, MemoryListener, MemoryRegion, MemoryRegionSection};

/// The host page size the slots are aligned to.
const HOST_PAGE: u64 = 4096;

/// The ioctl kvm-ioctls does not wrap.
mod ioctl_numbers {
    #![allow(missing_docs)]
    use kvm_bindings::{kvm_clear_dirty_log, KVMIO};
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}
use ioctl_numbers::KVM_CLEAR_DIRTY_LOG;

/// Turns on manual dirty-log protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`)
/// for `vm` if the kernel has it: `KVM_GET_DIRTY_LOG` then only reports,
/// and the mirror re-protects exactly the pages it harvested with
/// `KVM_CLEAR_DIRTY_LOG` instead of KVM write-protecting the whole slot at
/// every harvest. Returns whether it is on.
pub fn enable_manual_dirty_log_protect(kvm: &Kvm, vm: &VmFd) -> bool {
    let supported = kvm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    if supported as u32 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
        return false;
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).is_ok()
}

/// Why a slot change failed (reported to the runtime as the listener's
/// failure, which detaches the mirror and stops the VM).
#[derive(Debug, thiserror::Error)]
pub enum MemslotError {
    /// KVM has no free slot left.
    #[error("all {0} KVM memslots are in use")]
    NoFreeSlot(u32),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} at {gpa:#x}+{size:#x}: {source}")]
    SetRegion {
        /// Slot number.
        slot: u32,
        /// Guest-physical start.
        gpa: u64,
        /// Size (0 for a delete).
        size: u64,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG for slot {slot}: {source}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_CLEAR_DIRTY_LOG` failed.
    #[error("KVM_CLEAR_DIRTY_LOG for slot {slot}: {source}")]
    ClearDirtyLog {
        /// Slot number.
        slot: u32,
        /// The ioctl's error.
        source: std::io::Error,
    },
    /// The runtime refused to take the dirty bits.
    #[error("dirty log of slot {slot}: {source}")]
    SetDirty {
        /// Slot number.
        slot: u32,
        /// The runtime's error.
        source: topos_runtime::Error,
    },
    /// The region has no host memory (cannot happen for RAM and ROM devices).
    #[error("region `{0}` has no host memory")]
    NoHostMemory(String),
}

/// One memslot as the mirror installed it.
#[derive(Debug, Clone)]
pub struct Slot {
    /// KVM slot number.
    pub id: u32,
    /// Guest-physical start (host-page aligned).
    pub gpa: u64,
    /// Size in bytes (a multiple of the host page).
    pub size: u64,
    /// Host address of the first byte.
    pub host: u64,
    /// `KVM_MEM_READONLY`.
    pub readonly: bool,
    /// `KVM_MEM_LOG_DIRTY_PAGES`.
    pub log_dirty: bool,
    /// The region whose memory the slot maps (kept alive by the slot).
    pub region: MemoryRegion,
    /// Offset of `gpa` within the region.
    pub offset_in_region: u64,
}

impl Slot {
    fn flags(&self) -> u32 {
        (if self.readonly { KVM_MEM_READONLY } else { 0 }) | (if self.log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }
}

#[derive(Debug)]
struct Table {
    /// By guest-physical start.
    slots: BTreeMap<u64, Slot>,
    /// Slot numbers given back, reused first.
    free: Vec<u32>,
    /// The next never-used slot number.
    next: u32,
    /// How many slots KVM offers.
    max: u32,
}

/// Mirrors one address space's RAM into a VM's memslots. Register it with
/// [`Topology::listener_register`](topos_runtime::Topology::listener_register),
/// filtered to that address space.
pub struct MemslotMirror {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
    /// Manual dirty-log protection is on: harvested pages are cleared (and
    /// re-protected) with `KVM_CLEAR_DIRTY_LOG`.
    manual_protect: bool,
}

impl std::fmt::Debug for MemslotMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemslotMirror").field("slots", &self.lock().slots.len()).finish()
    }
}

/// The part of `[gpa, gpa + size)` made of whole host pages, as (aligned
/// start, size, how far the start moved); `None` if no whole page is in it.
fn align_section(gpa: u64, size: u128) -> Option<(u64, u64, u64)> {
    let start = gpa.checked_next_multiple_of(HOST_PAGE)?;
    let end = (gpa as u128 + size) & !(HOST_PAGE as u128 - 1);
    (end > start as u128).then(|| (start, (end - start as u128) as u64, start - gpa))
}

impl MemslotMirror {
    /// A mirror for `vm`, which offers `max_slots` memslots
    /// (`Kvm::get_nr_memslots`).
    pub fn new(vm: Arc<VmFd>, max_slots: u32) -> MemslotMirror {
        let table = Mutex::new(Table { slots: BTreeMap::new(), free: Vec::new(), next: 0, max: max_slots });
        MemslotMirror { vm, table, manual_protect: false }
    }

    /// Says that `vm` has manual dirty-log protection on (see
    /// [`enable_manual_dirty_log_protect`]).
    pub fn with_manual_protect(mut self, on: bool) -> MemslotMirror {
        self.manual_protect = on;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The slots installed now, by guest-physical start.
    pub fn slots(&self) -> Vec<Slot> {
        self.lock().slots.values().cloned().collect()
    }

    fn set(&self, slot: &Slot, size: u64) -> Result<(), MemslotError> {
        let region = kvm_userspace_memory_region {
            slot: slot.id,
            flags: if size == 0 { 0 } else { slot.flags() },
            guest_phys_addr: slot.gpa,
            memory_size: size,
            userspace_addr: slot.host,
        };
        // SAFETY: `host .. host + size` lies inside the region's host memory
        // (the section is inside the region and `align_section` only shrinks
        // it), which stays mapped while the slot holds the region: the slot
        // is deleted (size 0) before the `Slot` and its region are dropped.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| MemslotError::SetRegion {
            slot: slot.id,
            gpa: slot.gpa,
            size,
            source,
        })
    }

    /// The slot `section` maps to, if any (without a slot number yet).
    fn slot_for(section: &MemoryRegionSection) -> Result<Option<Slot>, MemslotError> {
        let Some(mr) = section.mr.as_ref() else { return Ok(None) };
        let readonly = if mr.is_ram() {
            section.readonly || mr.is_rom()
        } else if mr.is_romd() {
            true
        } else {
            return Ok(None);
        };
        let Some((gpa, size, delta)) = align_section(section.offset_within_address_space, section.size) else {
            return Ok(None);
        };
        let offset_in_region = section.offset_within_region + delta;
        let base = mr.ram_ptr().map_err(|_| MemslotError::NoHostMemory(mr.name().to_string()))?;
        Ok(Some(Slot {
            id: u32::MAX,
            gpa,
            size,
            host: base as u64 + offset_in_region,
            readonly,
            log_dirty: mr.effective_dirty_log_mask() != 0,
            region: mr.clone(),
            offset_in_region,
        }))
    }

    fn add(&self, section: &MemoryRegionSection) -> Result<(), MemslotError> {
        let Some(mut slot) = Self::slot_for(section)? else { return Ok(()) };
        let mut t = self.lock();
        slot.id = match t.free.pop() {
            Some(id) => id,
            None if t.next < t.max => {
                t.next += 1;
                t.next - 1
            }
            None => return Err(MemslotError::NoFreeSlot(t.max)),
        };
        if let Err(e) = self.set(&slot, slot.size) {
            t.free.push(slot.id);
            return Err(e);
        }
        tracing::debug!(slot = slot.id, gpa = slot.gpa, size = slot.size, readonly = slot.readonly, "memslot added");
        t.slots.insert(slot.gpa, slot);
        Ok(())
    }

    /// The start of the slot `section` has if it has one: looked up by
    /// address and region, not decided again from the region's state, which
    /// may already be the new one (a romd switch is sent as a delete and an
    /// add of the same range).
    fn installed(t: &Table, section: &MemoryRegionSection) -> Option<u64> {
        let mr = section.mr.as_ref()?;
        let (gpa, _, _) = align_section(section.offset_within_address_space, section.size)?;
        t.slots.get(&gpa).is_some_and(|s| s.region.id() == mr.id()).then_some(gpa)
    }

    fn del(&self, section: &MemoryRegionSection) -> Result<(), MemslotError> {
        let mut t = self.lock();
        let Some(gpa) = Self::installed(&t, section) else { return Ok(()) };
        let Some(slot) = t.slots.remove(&gpa) else { return Ok(()) };
        // A slot that logs dirty pages hands its last ones over first, as
        // QEMU's `kvm_set_phys_mem` does before deleting.
        let synced = if slot.log_dirty { self.sync(&slot) } else { Ok(()) };
        self.set(&slot, 0)?;
        tracing::debug!(slot = slot.id, gpa = slot.gpa, "memslot deleted");
        t.free.push(slot.id);
        synced
    }

    /// Sets or clears `KVM_MEM_LOG_DIRTY_PAGES` on the slot of `section`.
    fn set_logging(&self, section: &MemoryRegionSection, on: bool) -> Result<(), MemslotError> {
        let mut t = self.lock();
        let Some(gpa) = Self::installed(&t, section) else { return Ok(()) };
        let Some(slot) = t.slots.get_mut(&gpa) else { return Ok(()) };
        if slot.log_dirty == on {
            return Ok(());
        }
        if !on {
            // Keep what was logged until now.
            let before = slot.clone();
            self.sync(&before)?;
        }
        slot.log_dirty = on;
        let slot = slot.clone();
        self.set(&slot, slot.size)
    }

    /// Folds the slot's KVM dirty log into its region's bitmaps.
    fn sync(&self, slot: &Slot) -> Result<(), MemslotError> {
        let mut bitmap = self
            .vm
            .get_dirty_log(slot.id, slot.size as usize)
            .map_err(|source| MemslotError::DirtyLog { slot: slot.id, source })?;
        if self.manual_protect && bitmap.iter().any(|&w| w != 0) {
            self.clear(slot, &mut bitmap)?;
        }
        for (w, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let page = w as u64 * 64 + bits.trailing_zeros() as u64;
                bits &= bits - 1;
                slot.region
                    .set_dirty(slot.offset_in_region + page * HOST_PAGE, HOST_PAGE)
                    .map_err(|source| MemslotError::SetDirty { slot: slot.id, source })?;
            }
        }
        Ok(())
    }

    /// Clears (and re-protects) the pages of `bitmap` in KVM's log of the
    /// slot, so the next harvest reports only pages written after this one.
    fn clear(&self, slot: &Slot, bitmap: &mut [u64]) -> Result<(), MemslotError> {
        let arg = kvm_clear_dirty_log {
            slot: slot.id,
            num_pages: (slot.size / HOST_PAGE) as u32,
            first_page: 0,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 { dirty_bitmap: bitmap.as_mut_ptr().cast() },
        };
        // SAFETY: the VM descriptor is valid; `arg` describes the whole
        // slot (first page 0, its page count) and points to a bitmap of
        // one bit per page of it (what `KVM_GET_DIRTY_LOG` returned for
        // the slot), which the kernel only reads; the result is checked.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&*self.vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(MemslotError::ClearDirtyLog { slot: slot.id, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    fn sync_section(&self, section: &MemoryRegionSection) -> Result<(), MemslotError> {
        let slot = {
            let t = self.lock();
            Self::installed(&t, section).and_then(|gpa| t.slots.get(&gpa).cloned())
        };
        match slot {
            Some(slot) if slot.log_dirty => self.sync(&slot),
            _ => Ok(()),
        }
    }
}

impl MemoryListener for MemslotMirror {
    fn wants_region_nop(&self) -> bool {
        false
    }

    fn region_add(&self, section: &MemoryRegionSection) -> ListenerResult {
        Ok(self.add(section)?)
    }

    fn region_del(&self, section: &MemoryRegionSection) -> ListenerResult {
        Ok(self.del(section)?)
    }

    fn log_start(&self, section: &MemoryRegionSection, _old: u8, _new: u8) -> ListenerResult {
        Ok(self.set_logging(section, true)?)
    }

    fn log_stop(&self, section: &MemoryRegionSection, _old: u8, new: u8) -> ListenerResult {
        Ok(self.set_logging(section, new != 0)?)
    }

    fn log_sync(&self, section: &MemoryRegionSection) -> ListenerResult {
        Ok(self.sync_section(section)?)
    }
}

#[cfg(test)]
mod tests {
    use super::align_section;

    #[test]
    fn sections_are_cut_to_whole_host_pages() {
        assert_eq!(align_section(0, 0x3000), Some((0, 0x3000, 0)));
        assert_eq!(align_section(0x800, 0x3000), Some((0x1000, 0x2000, 0x800)));
        assert_eq!(align_section(0x800, 0x1000), None);
        assert_eq!(align_section(0x1000, 0xfff), None);
        assert_eq!(align_section(u64::MAX - 0xfff, 0x1000), Some((u64::MAX - 0xfff, 0x1000, 0)));
        assert_eq!(align_section(u64::MAX - 0x7ff, 0x800), None);
        assert_eq!(align_section(0xffff_f000, 0x1000), Some((0xffff_f000, 0x1000, 0)));
    }
}
