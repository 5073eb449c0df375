//! Self-modifying code: how a vCPU that caches code decoded from a page
//! learns that the page was written — by another vCPU, by DMA, through a
//! `Mapping`, by the embedder.
//!
//! [`AddressSpace::watch_code`] sets the page's bit in its RAM block's watch
//! bitmap (beside the dirty clients' bitmaps, in `dirty.rs`); every write the
//! runtime performs clears the watch bits of the pages it touches, and a
//! write that clears one bumps the topology's
//! [code-write epoch](crate::Topology::code_write_epoch). A vCPU polls the
//! epoch (one load, e.g. once per block) and, when it moved, asks its
//! watches which pages were written. Until some page of a RAM block is
//! watched, writes to it pay one relaxed load for this. QEMU keeps this
//! state, inverted, in its CODE dirty client; topos leaves the CODE client
//! as semantics.md §6 describes it.

use crate::address_space::AddressSpace;
use crate::dispatch::direct_read;
use crate::region::MemoryRegion;
use crate::topology::Topology;
use crate::types::{HwAddr, PAGE_SIZE};

/// A watched page of guest RAM: how a vCPU that caches code decoded from a
/// page learns that the page was written — by another vCPU, by DMA, through
/// a [`Mapping`](crate::Mapping), through a [`RamPage`](crate::RamPage) —
/// made by [`AddressSpace::watch_code`].
///
/// Every write the runtime performs stops watching the pages it touches,
/// and a write that hits a watched page bumps the topology's
/// [code-write epoch](crate::Topology::code_write_epoch). A vCPU polls the
/// epoch (one load, e.g. once per block) and, when it moved, asks its
/// watches which pages were written. Until some page of a RAM block is
/// watched, writes to it pay one relaxed load for this.
#[derive(Debug, Clone)]
pub struct CodeWatch {
    region: MemoryRegion,
    /// Offset of the page in the region.
    offset: u64,
    /// The guest-physical page it was watched at.
    page: HwAddr,
}

impl CodeWatch {
    /// The guest-physical address of the page, when it was watched.
    pub fn page(&self) -> HwAddr {
        self.page
    }

    /// The region holding the page.
    pub fn region(&self) -> &MemoryRegion {
        &self.region
    }

    /// Whether the page was written since it was (re)watched.
    pub fn is_written(&self) -> bool {
        self.region.ram_block().is_some_and(|b| b.dirty.code_written(self.offset))
    }

    /// Watches the page again (after the vCPU dropped and re-decoded its
    /// code).
    pub fn rewatch(&self) {
        if let Some(b) = self.region.ram_block() {
            b.dirty.watch_code(self.offset);
        }
    }
}

impl AddressSpace {
    /// Watches the RAM page holding `addr` for writes from any path.
    /// `None` if no RAM serves reads there (MMIO, a hole).
    pub fn watch_code(&self, addr: HwAddr) -> Option<CodeWatch> {
        let view = self.load_view();
        let fr = view.lookup(addr).filter(|fr| direct_read(fr))?;
        let page = addr & !(PAGE_SIZE - 1);
        let offset = (fr.offset_in_region() + (addr - fr.start())) & !(PAGE_SIZE - 1);
        let w = CodeWatch { region: fr.region().clone(), offset, page };
        w.rewatch();
        Some(w)
    }
}

impl Topology {
    /// Counts writes that hit a watched page, anywhere in the topology. A
    /// vCPU compares it with the value it last saw to learn, with one load,
    /// whether any of its [`CodeWatch`]es may have been written.
    #[inline]
    pub fn code_write_epoch(&self) -> u64 {
        self.shared().code_write_epoch()
    }
}
