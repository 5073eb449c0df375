//! Coalesced MMIO (QEMU's `memory_region_add_coalescing` and friends):
//! ranges of a region whose writes an accelerator may buffer, and the flag
//! that makes accesses to a region drain that buffer first.
//!
//! Nothing here re-renders: a coalescing change is recorded in the
//! transaction and reported to listers at commit, for every place the region
//! is mapped in the views published before that commit (QEMU reports it at
//! once against the current views; no view changes in between, so the calls
//! are the same). Ranges that a commit adds get `coalesced_mmio_add` for the
//! region's ranges from the commit's own topology passes.

use crate::address_space::AddressSpace;
use crate::error::{Error, Result};
use crate::flatview::FlatRange;
use crate::listener::{Listeners, MemoryRegionSection};
use crate::region::MemoryRegion;
use crate::sync::{AtomicBool, Mutex, Ordering};
use crate::types::HwAddr;

/// The coalescing state of one region.
pub(crate) struct RegionCoalescing {
    /// Coalesced ranges within the region: (offset, size).
    ranges: Mutex<Vec<(HwAddr, u128)>>,
    /// Flush coalesced MMIO before accesses (read lock-free on dispatch).
    flush: AtomicBool,
}

impl Default for RegionCoalescing {
    fn default() -> Self {
        RegionCoalescing { ranges: Mutex::new(Vec::new()), flush: AtomicBool::new(false) }
    }
}

impl RegionCoalescing {
    /// Whether accesses to the region must flush the coalesced buffer first.
    #[inline]
    pub(crate) fn flushes(&self) -> bool {
        self.flush.load(Ordering::Relaxed)
    }

    /// The ranges, copied.
    pub(crate) fn ranges(&self) -> Vec<(HwAddr, u128)> {
        self.ranges.lock().clone()
    }
}

/// A coalescing change recorded by a mutator, reported at commit.
pub(crate) struct CoalescedChange {
    pub(crate) region: MemoryRegion,
    pub(crate) offset: HwAddr,
    pub(crate) size: u128,
    pub(crate) add: bool,
}

impl MemoryRegion {
    /// The coalesced ranges (offset, size) of the region.
    pub fn coalesced_ranges(&self) -> Vec<(HwAddr, u128)> {
        self.coalescing().ranges()
    }

    /// Whether coalesced MMIO is flushed before accesses to the region.
    pub fn flush_coalesced(&self) -> bool {
        self.coalescing().flush.load(Ordering::Acquire)
    }

    /// `memory_region_set_coalescing`: coalesce the whole region.
    pub fn set_coalescing(&self) -> Result<()> {
        let topo = self.topology()?;
        topo.with_mutation(|| {
            self.clear_coalescing()?;
            self.add_coalescing(0, self.size())
        })
    }

    /// `memory_region_add_coalescing`: coalesce writes to a sub-range.
    /// Listeners get `coalesced_mmio_add` for each place the region is
    /// mapped, and accesses to the region flush the buffer first. Nothing is
    /// re-rendered.
    pub fn add_coalescing(&self, offset: HwAddr, size: u128) -> Result<()> {
        if (offset as u128).checked_add(size).is_none_or(|end| end > self.size()) {
            return Err(Error::OutOfRange { region: self.name().to_string(), offset, size });
        }
        self.mutate(|topo| {
            let c = self.coalescing();
            c.ranges.lock().push((offset, size));
            c.flush.store(true, Ordering::Release);
            topo.record(|i| i.coalesced.push(CoalescedChange { region: self.clone(), offset, size, add: true }));
            Ok(())
        })
    }

    /// `memory_region_clear_coalescing`: flushes the buffer, removes every
    /// coalesced range (listeners get `coalesced_mmio_del`) and stops
    /// flushing.
    pub fn clear_coalescing(&self) -> Result<()> {
        let topo = self.topology()?;
        if self.coalescing().ranges.lock().is_empty() {
            return Ok(());
        }
        topo.flush_coalesced_mmio();
        self.mutate(|topo| {
            let c = self.coalescing();
            c.flush.store(false, Ordering::Release);
            let ranges = std::mem::take(&mut *c.ranges.lock());
            topo.record(|i| {
                for (offset, size) in ranges {
                    i.coalesced.push(CoalescedChange { region: self.clone(), offset, size, add: false });
                }
            });
            Ok(())
        })
    }

    /// `memory_region_set_flush_coalesced`.
    pub fn set_flush_coalesced(&self) -> Result<()> {
        self.check_alive()?;
        self.coalescing().flush.store(true, Ordering::Release);
        Ok(())
    }

    /// `memory_region_clear_flush_coalesced`: flushes, then stops flushing
    /// unless the region itself has coalesced ranges.
    pub fn clear_flush_coalesced(&self) -> Result<()> {
        self.check_alive()?;
        self.topology()?.flush_coalesced_mmio();
        let c = self.coalescing();
        if c.ranges.lock().is_empty() {
            c.flush.store(false, Ordering::Release);
        }
        Ok(())
    }
}

/// The part of coalesced range `(off, size)` of a region that a window onto
/// it shows — region offset `offset_in_region` at address `start`, up to
/// address `end` (exclusive) — in address-space coordinates.
fn coalesced_piece(start: HwAddr, offset_in_region: u64, end: u128, off: HwAddr, size: u128) -> Option<(HwAddr, u64)> {
    let shift = start as i128 - offset_in_region as i128;
    let s = (off as i128 + shift).max(start as i128);
    let e = (off as i128 + size as i128 + shift).min(end as i128);
    (s < e).then(|| (s as u64, (e - s) as u64))
}

/// Calls `f(addr, len)` for each coalesced range of `fr`'s region, clipped
/// to what `fr` shows.
pub(crate) fn for_coalesced(fr: &FlatRange, mut f: impl FnMut(HwAddr, u64)) {
    for (off, size) in fr.region().coalescing().ranges() {
        if let Some((s, l)) = coalesced_piece(fr.start(), fr.offset_in_region(), fr.end(), off, size) {
            f(s, l);
        }
    }
}

impl MemoryRegionSection {
    /// The coalesced ranges of the section's region that the section shows,
    /// as (address, length) in the address space.
    pub fn coalesced_ranges(&self) -> Vec<(HwAddr, u64)> {
        let Some(mr) = &self.mr else { return Vec::new() };
        let (start, end) = (self.offset_within_address_space, u128::from(self.offset_within_address_space) + self.size);
        let ranges = mr.coalescing().ranges();
        ranges
            .into_iter()
            .filter_map(|(off, size)| coalesced_piece(start, self.offset_within_region, end, off, size))
            .collect()
    }
}

/// Whether `fr`'s region has coalesced ranges.
pub(crate) fn has_coalesced(fr: &FlatRange) -> bool {
    !fr.region().coalescing().ranges.lock().is_empty()
}

/// Reports recorded coalescing changes for every place their region is
/// mapped in the currently published views (`coalesced_mmio_add` Forward,
/// `coalesced_mmio_del` Reverse).
pub(crate) fn report_changes(changes: &[CoalescedChange], ases: &[AddressSpace], ls: &Listeners) {
    for ch in changes {
        for asp in ases {
            let view = asp.view();
            for fr in view.iter().filter(|fr| *fr.region() == ch.region) {
                if let Some((s, l)) = coalesced_piece(fr.start(), fr.offset_in_region(), fr.end(), ch.offset, ch.size) {
                    let sec = MemoryRegionSection::from_range(fr, asp);
                    if ch.add {
                        ls.each_forward_for(asp.id(), "coalesced_mmio_add", |x| x.coalesced_mmio_add(&sec, s, l));
                    } else {
                        ls.each_reverse_for(asp.id(), "coalesced_mmio_del", |x| x.coalesced_mmio_del(&sec, s, l));
                    }
                }
            }
        }
    }
}
