//! Dirty logging (QEMU's `memory_region_get_dirty` and friends, global
//! dirty logging and `log_sync`): the API over the bitmaps of `dirty.rs`.

use crate::error::{Error, Result};
use crate::listener::MemoryRegionSection;
use crate::ram::RamBlock;
use crate::region::MemoryRegion;
use crate::topology::Topology;
use crate::transaction::Damage;
use crate::types::{DirtyClient, HwAddr};

impl MemoryRegion {
    fn dirty_range(&self, addr: HwAddr, size: u64) -> Result<&RamBlock> {
        let b = self.need_ram()?;
        if addr as u128 + size as u128 > b.len() as u128 {
            return Err(Error::OutOfRange { region: self.name().to_string(), offset: addr, size: size as u128 });
        }
        Ok(b)
    }

    /// `memory_region_get_dirty`: true if any page touched by the range is
    /// dirty for `client` (the range is widened to whole pages).
    pub fn get_dirty(&self, addr: HwAddr, size: u64, client: DirtyClient) -> Result<bool> {
        Ok(self.dirty_range(addr, size)?.dirty.get_range(addr, size, client))
    }

    /// `memory_region_set_dirty`: marks the pages of the range dirty for the
    /// clients in the region's log mask, plus MIGRATION while global dirty
    /// logging is on.
    pub fn set_dirty(&self, addr: HwAddr, size: u64) -> Result<()> {
        let b = self.dirty_range(addr, size)?;
        let mask = self.effective_dirty_mask(self.dirty_log_mask());
        b.dirty.set_range(addr, size, mask);
        Ok(())
    }

    /// Marks pages dirty for an explicit set of clients (used by the KVM
    /// dirty-log sync, which reports pages dirty for every client).
    pub fn set_dirty_for(&self, addr: HwAddr, size: u64, mask: u8) -> Result<()> {
        self.dirty_range(addr, size)?.dirty.set_range(addr, size, mask);
        Ok(())
    }

    /// `memory_region_reset_dirty`: clears the range's pages for `client`.
    pub fn reset_dirty(&self, addr: HwAddr, size: u64, client: DirtyClient) -> Result<()> {
        self.dirty_range(addr, size)?.dirty.reset_range(addr, size, client);
        Ok(())
    }

    /// `memory_region_test_and_clear_dirty`: clears the range for `client`
    /// and tells whether any of its pages was dirty, atomically per word.
    pub fn test_and_clear_dirty(&self, addr: HwAddr, size: u64, client: DirtyClient) -> Result<bool> {
        Ok(self.dirty_range(addr, size)?.dirty.test_and_clear_range(addr, size, client))
    }

    /// Harvests the range for `client` (modern QEMU's
    /// `memory_region_snapshot_and_clear_dirty`): returns the first page
    /// number and one bit per page from it, clearing what it returns.
    pub fn snapshot_and_clear_dirty(&self, addr: HwAddr, size: u64, client: DirtyClient) -> Result<(u64, Vec<u64>)> {
        Ok(self.dirty_range(addr, size)?.dirty.snapshot_and_clear(addr, size, client))
    }

    /// Bookkeeping after the runtime wrote `len` bytes at offset `off` of the
    /// region's RAM, with the dirty-log mask of the flat range written:
    /// dirty bits for the logging clients (never CODE, which has its own
    /// meaning) and the self-modifying-code watch.
    #[inline]
    pub(crate) fn note_ram_write(&self, off: u64, len: u64, mask: u8) {
        if let Some(b) = self.ram_block() {
            if mask & !DirtyClient::Code.mask() != 0 {
                b.dirty.set_range(off, len, mask & !DirtyClient::Code.mask());
            }
            if b.dirty.note_code_write(off, len) {
                self.shared().code_written();
            }
        }
    }
}

impl Topology {
    /// Whether global (migration) dirty logging is on.
    pub fn global_dirty_log(&self) -> bool {
        self.shared().global_dirty_log()
    }

    /// `memory_global_dirty_log_start`: `log_global_start` on every listener,
    /// then a commit that adds the MIGRATION bit to RAM ranges (`log_start`).
    pub fn global_dirty_log_start(&self) -> Result<()> {
        self.with_mutation(|| {
            if self.shared().set_global_dirty_log(true) {
                return Ok(());
            }
            self.record(|i| {
                i.changed(true);
                i.damage(Damage::All);
            });
            self.call_listeners(|ls| ls.each_forward("log_global_start", |l| l.log_global_start()))
        })
    }

    /// `memory_global_dirty_log_stop`: a commit that drops the MIGRATION bit
    /// (`log_stop`), then `log_global_stop` on every listener (Reverse).
    pub fn global_dirty_log_stop(&self) -> Result<()> {
        let was_on = self.with_mutation(|| {
            let was = self.shared().set_global_dirty_log(false);
            if was {
                self.record(|i| {
                    i.changed(true);
                    i.damage(Damage::All);
                });
            }
            Ok(was)
        })?;
        if was_on {
            self.with_mutation(|| {
                self.call_listeners(|ls| ls.each_reverse("log_global_stop", |l| l.log_global_stop()))
            })?;
        }
        Ok(())
    }

    fn sync_dirty(&self, only: Option<&MemoryRegion>) -> Result<()> {
        self.with_query(|| {
            let ases = self.address_spaces();
            // Listener by listener, as QEMU does.
            self.call_listeners(|ls| {
                for entry in ls.forward() {
                    for asp in ases.iter().filter(|a| entry.wants(a.id())) {
                        let view = asp.view();
                        for fr in view.iter() {
                            if fr.dirty_log_mask() != 0 && only.is_none_or(|m| m == fr.region()) {
                                let sec = MemoryRegionSection::from_range(fr, asp);
                                ls.call(entry, "log_sync", |l| l.log_sync(&sec));
                            }
                        }
                    }
                }
            })
        })?
    }

    /// `memory_region_sync_dirty_bitmap`: asks listeners (`log_sync`) to fold
    /// their dirty logs for every logging range of `mr` into its bitmaps.
    pub fn sync_dirty_bitmap(&self, mr: &MemoryRegion) -> Result<()> {
        self.sync_dirty(Some(mr))
    }

    /// `memory_global_sync_dirty_bitmap` (modern `memory_global_dirty_log_sync`):
    /// `log_sync` for every logging range of every address space.
    pub fn global_sync_dirty_bitmap(&self) -> Result<()> {
        self.sync_dirty(None)
    }
}
