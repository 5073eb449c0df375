//! The range diff of one address space between two views, told to
//! listeners (QEMU's `address_space_update_topology_pass`, both passes) and
//! recorded for the broadcast.

use crate::address_space::AddressSpace;
use crate::broadcast::{RangeRecord, SpaceDiff};
use crate::coalesced::{for_coalesced, has_coalesced};
use crate::flatview::FlatView;
use crate::listener::{Listeners, MemoryRegionSection};

/// Both passes over the ranges inside `spans` (where the views may differ;
/// outside them they are identical), or over everything for `None`.
/// `region_nop` goes only to listeners that want it.
pub(crate) fn topology_passes(
    asp: &AddressSpace,
    old: &FlatView,
    new: &FlatView,
    ls: &Listeners,
    sd: &mut SpaceDiff,
    spans: Option<&[(u128, u128)]>,
) {
    let id = asp.id();
    let o = old.ranges_in(spans);
    let n = new.ranges_in(spans);
    let deleted = |i: usize, j: usize| {
        i < o.len()
            && (j == n.len() || o[i].start() < n[j].start() || (o[i].start() == n[j].start() && !o[i].same_as(n[j])))
    };
    // Delete pass.
    let (mut i, mut j) = (0, 0);
    while i < o.len() || j < n.len() {
        if deleted(i, j) {
            let fr = o[i];
            let sec = MemoryRegionSection::from_range(fr, asp);
            if has_coalesced(fr) {
                ls.each_reverse_for(id, "coalesced_mmio_del", |l| {
                    l.coalesced_mmio_del(&sec, fr.start(), fr.size() as u64)
                });
            }
            ls.each_reverse_for(id, "region_del", |l| l.region_del(&sec));
            sd.removed.push(RangeRecord::of(fr));
            i += 1;
        } else if i < o.len() && j < n.len() && o[i].same_as(n[j]) {
            i += 1;
            j += 1;
        } else {
            j += 1;
        }
    }
    // Add pass.
    let (mut i, mut j) = (0, 0);
    while i < o.len() || j < n.len() {
        if deleted(i, j) {
            i += 1;
        } else if i < o.len() && j < n.len() && o[i].same_as(n[j]) {
            let (fo, fr) = (o[i], n[j]);
            let (old_mask, new_mask) = (fo.dirty_log_mask(), fr.dirty_log_mask());
            let sec = MemoryRegionSection::from_range(fr, asp);
            ls.each_nop_for(id, |l| l.region_nop(&sec));
            if new_mask & !old_mask != 0 {
                ls.each_forward_for(id, "log_start", |l| l.log_start(&sec, old_mask, new_mask));
            }
            if old_mask & !new_mask != 0 {
                ls.each_reverse_for(id, "log_stop", |l| l.log_stop(&sec, old_mask, new_mask));
            }
            if old_mask != new_mask {
                sd.log_changed.push((RangeRecord::of(fr), old_mask));
            }
            i += 1;
            j += 1;
        } else {
            let fr = n[j];
            let sec = MemoryRegionSection::from_range(fr, asp);
            ls.each_forward_for(id, "region_add", |l| l.region_add(&sec));
            for_coalesced(fr, |s, len| {
                ls.each_forward_for(id, "coalesced_mmio_add", |l| l.coalesced_mmio_add(&sec, s, len));
            });
            sd.added.push(RangeRecord::of(fr));
            j += 1;
        }
    }
}
