//! Page translation for software TLBs: what a guest-physical page is, for an
//! interpreter that caches page → host pointer and revalidates with one
//! load.

use crate::accessor::Accessor;
use crate::dispatch::{direct_read, direct_write};
use crate::listener::MemoryRegionSection;
use crate::region::MemoryRegion;
use crate::types::{HwAddr, PAGE_SIZE};
use std::ptr::NonNull;

/// What [`Accessor::translate`] found for one page.
#[derive(Debug, Clone)]
pub struct PageTranslation {
    page: HwAddr,
    generation: u64,
    target: PageTarget,
}

impl PageTranslation {
    /// The page's first address.
    pub fn page(&self) -> HwAddr {
        self.page
    }

    /// The address-space generation the translation is valid for: cached
    /// translations stay valid while [`Accessor::is_current`] (equivalently,
    /// [`AddressSpace::generation`](crate::AddressSpace::generation) equals
    /// this).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What is there.
    pub fn target(&self) -> &PageTarget {
        &self.target
    }
}

/// The contents of one page.
#[derive(Debug, Clone)]
pub enum PageTarget {
    /// One RAM range covers the whole page: RAM, ROM, or a ROM device in
    /// romd mode. Reads may use the host pointer directly.
    Ram(RamPage),
    /// One MMIO range (I/O, a ROM device outside romd mode, a reservation)
    /// covers the whole page: accesses go through the accessor.
    Mmio(MemoryRegionSection),
    /// Several ranges (or ranges and holes) share the page: accesses go
    /// through the accessor.
    Mixed,
    /// Nothing is mapped anywhere in the page.
    Unassigned,
}

/// A page of guest RAM as a host pointer.
///
/// The pointer stays valid while this value (or a clone) lives: it keeps the
/// region's memory alive. Whether the page still *maps* there is a matter of
/// the generation ([`PageTranslation::generation`]). The memory is shared
/// with the guest and other vCPUs: access it with atomic or volatile
/// operations, never through Rust references.
#[derive(Debug, Clone)]
pub struct RamPage {
    host: NonNull<u8>,
    region: MemoryRegion,
    /// Offset of the page's first byte in the region.
    offset: u64,
    writable: bool,
    dirty_log_mask: u8,
}

// SAFETY: the pointer is into the RAM block `region` keeps alive, which is
// shared by design (see `ram.rs`); nothing here dereferences it.
unsafe impl Send for RamPage {}
// SAFETY: as for `Send`.
unsafe impl Sync for RamPage {}

impl RamPage {
    /// The host address of the page's first byte.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host.as_ptr()
    }

    /// Whether guest writes may store through the pointer (RAM that is not
    /// read-only). Writes to ROM and to ROM devices go through the accessor.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The region the page belongs to.
    pub fn region(&self) -> &MemoryRegion {
        &self.region
    }

    /// The offset of the page's first byte in the region.
    pub fn offset_in_region(&self) -> u64 {
        self.offset
    }

    /// Loads the `size`-byte (1, 2, 4 or 8) little-endian value at `offset`
    /// in the page, as every RAM path does (an aligned access is one atomic
    /// load; see `docs#guest-ram`). An access that does not fit in the page
    /// reads 0 (the caller splits page-crossing accesses).
    #[inline]
    pub fn load(&self, offset: usize, size: usize) -> u64 {
        if size > 8 || offset + size > PAGE_SIZE as usize {
            return 0;
        }
        let mut b = [0u8; 8];
        // SAFETY: the `size` bytes at `offset` lie in the page (checked just
        // above), which the region held by `self` keeps alive; guest RAM is
        // only ever accessed atomically.
        unsafe { crate::ram::load(self.host.as_ptr().add(offset), &mut b[..size]) };
        u64::from_le_bytes(b)
    }

    /// Stores the low `size` bytes (1, 2, 4 or 8) of `value` at `offset`, as
    /// every RAM path does, and does the write's bookkeeping
    /// ([`note_write`](Self::note_write)). Returns false, storing nothing,
    /// if the page is not [writable](Self::is_writable) or the access does
    /// not fit in the page.
    #[inline]
    pub fn store(&self, offset: usize, value: u64, size: usize) -> bool {
        if !self.writable || size > 8 || offset + size > PAGE_SIZE as usize {
            return false;
        }
        let b = value.to_le_bytes();
        // SAFETY: as in `load`, for writes.
        unsafe { crate::ram::store(self.host.as_ptr().add(offset), &b[..size]) };
        self.note_write(offset as u64, size as u64);
        true
    }

    /// Does the bookkeeping of a write of `len` bytes at `offset` into the
    /// page made through the host pointer: dirty bits for the logging
    /// clients, and the self-modifying-code watch (see
    /// [`CodeWatch`](crate::CodeWatch)). Cheap when nothing logs or watches
    /// (a mask test and one relaxed load).
    #[inline]
    pub fn note_write(&self, offset: u64, len: u64) {
        let off = self.offset + offset.min(PAGE_SIZE);
        let len = len.min(PAGE_SIZE - offset.min(PAGE_SIZE));
        self.region.note_ram_write(off, len, self.dirty_log_mask);
    }
}

impl Accessor {
    /// Translates the page holding `addr` in the accessor's current view
    /// (refreshing it first). See [`PageTarget`] for the cases.
    ///
    /// ```
    /// use topos_runtime::{PageTarget, Topology};
    /// # fn main() -> topos_runtime::Result<()> {
    /// let topo = Topology::new();
    /// let s = topo.standard_spaces()?;
    /// s.system.add_subregion(0, &topo.new_ram("ram", 0x10000)?)?;
    /// let mut acc = s.memory.accessor();
    /// let t = acc.translate(0x2345);
    /// assert_eq!(t.page(), 0x2000);
    /// let PageTarget::Ram(page) = t.target() else { panic!("RAM expected") };
    /// assert!(page.is_writable());
    /// // A TLB keeps `page` while the view it came from is published...
    /// assert!(acc.is_at(t.generation()));
    /// // ...and flushes when a commit publishes a new one, also once an
    /// // access through the accessor has moved it to the new view.
    /// s.system.add_subregion(0x100000, &topo.new_ram("more", 0x1000)?)?;
    /// assert!(!acc.is_at(t.generation()));
    /// acc.read_u64(0x2345, 4);
    /// assert!(acc.is_current() && !acc.is_at(t.generation()));
    /// # Ok(()) }
    /// ```
    pub fn translate(&mut self, addr: HwAddr) -> PageTranslation {
        let view = self.refresh().clone();
        let generation = self.generation();
        let page = addr & !(PAGE_SIZE - 1);
        let last = page + (PAGE_SIZE - 1);
        let target = match view.lookup(page) {
            Some(fr) if fr.last() >= last => {
                if direct_read(fr) {
                    let offset = fr.offset_in_region() + (page - fr.start());
                    let host = fr
                        .region()
                        .ram_block()
                        .filter(|b| offset + PAGE_SIZE <= b.len())
                        .and_then(|b| NonNull::new(b.host_ptr().as_ptr().wrapping_add(offset as usize)));
                    match host {
                        Some(host) => PageTarget::Ram(RamPage {
                            host,
                            region: fr.region().clone(),
                            offset,
                            writable: direct_write(fr),
                            dirty_log_mask: fr.dirty_log_mask(),
                        }),
                        // A RAM range shorter than a page at its end.
                        _ => PageTarget::Mixed,
                    }
                } else {
                    let mut section = MemoryRegionSection::from_range(fr, &self.address_space());
                    section.offset_within_region += page - fr.start();
                    section.offset_within_address_space = page;
                    section.size = PAGE_SIZE as u128;
                    PageTarget::Mmio(section)
                }
            }
            Some(_) => PageTarget::Mixed,
            None => match view.iter_from(page).next() {
                Some(next) if next.start() <= last => PageTarget::Mixed,
                _ => PageTarget::Unassigned,
            },
        };
        PageTranslation { page, generation, target }
    }
}
