//! `memory_region_find`: the lowest-addressed range of a view that overlaps
//! an address range, as a section that keeps its region alive.

use crate::address_space::AddressSpace;
use crate::listener::MemoryRegionSection;
use crate::region::MemoryRegion;
use crate::topology::Topology;
use crate::types::{HwAddr, SIZE_MAX};

impl AddressSpace {
    /// The lowest-addressed range overlapping `[addr, addr + size)`, clipped
    /// to it (`memory_region_find` on an address-space address). The query
    /// is clipped to the 64-bit space. As in QEMU (semantics.md §7), a
    /// zero-size query strictly inside a range returns that range with size
    /// 0, and at a range's first byte or in a hole returns `None`.
    pub fn find(&self, addr: HwAddr, size: u128) -> Option<MemoryRegionSection> {
        let view = self.load_view();
        let fr = view.iter_from(addr).next()?;
        let qend = (addr as u128).saturating_add(size).min(SIZE_MAX);
        if !(qend > fr.start() as u128 && (addr as u128) < fr.end()) {
            return None;
        }
        let s = (addr as u128).max(fr.start() as u128);
        let e = qend.min(fr.end());
        Some(MemoryRegionSection {
            mr: Some(fr.region().clone()),
            address_space: self.clone(),
            offset_within_region: fr.offset_in_region() + (s as u64 - fr.start()),
            size: e.saturating_sub(s),
            offset_within_address_space: s as u64,
            readonly: fr.readonly(),
        })
    }
}

impl Topology {
    /// `memory_region_find` (modern): `addr` is relative to `mr`; the lookup
    /// runs in the view of the address space whose root is `mr`'s topmost
    /// ancestor and returns the lowest-addressed range overlapping
    /// `[addr, addr + size)`, clipped to it. `None` when `mr` is in no
    /// address space, the address leaves the 64-bit space, or nothing
    /// overlaps. The section keeps its region alive.
    pub fn find(&self, mr: &MemoryRegion, addr: HwAddr, size: u128) -> Option<MemoryRegionSection> {
        let mut abs = addr as u128;
        let mut top = mr.clone();
        loop {
            abs += top.addr() as u128;
            match top.container() {
                Some(p) => top = p,
                None => break,
            }
        }
        // The root's own address is part of rendering too.
        let asp = self.address_spaces().into_iter().find(|a| a.root() == &top)?;
        asp.find(u64::try_from(abs).ok()?, size)
    }
}
