//! Rendering: QEMU's `render_memory_region` over the region tree, for the
//! whole address range or for the windows a commit must redo, recording
//! where each region was placed so later mutations can tell which windows
//! they damage (`damage.rs`).

use crate::flatview::{simplify, FlatRange, FlatView};
use crate::region::{MemoryRegion, RegionId, RegionKind};
use std::collections::{BTreeMap, HashMap};

/// Where a region was rendered: the base its children are placed from and
/// the part of the address space it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) base: i128,
    pub(crate) start: u128,
    pub(crate) end: u128,
}

/// Every placement recorded while rendering one view.
#[derive(Default)]
pub(crate) struct Placements {
    pub(crate) map: HashMap<RegionId, Vec<Placement>>,
    pub(crate) count: usize,
}

impl Placements {
    fn record(&mut self, id: RegionId, p: Placement) {
        let v = self.map.entry(id).or_default();
        if !v.contains(&p) {
            v.push(p);
            self.count += 1;
        }
    }
}

/// A piece under construction; ends are exclusive `u128`.
struct Piece {
    end: u128,
    region: MemoryRegion,
    offset: u128,
    readonly: bool,
}

struct Renderer<'a> {
    pieces: BTreeMap<u128, Piece>,
    /// The address windows to render: sorted, disjoint, non-empty.
    wins: &'a [(u128, u128)],
    placements: &'a mut Placements,
}

/// Renders the tree under `root` into a FlatView (QEMU's
/// `generate_memory_topology`) for commit `generation`, recording
/// placements afresh.
pub(crate) fn render(root: Option<&MemoryRegion>, placements: &mut Placements, generation: u64) -> FlatView {
    *placements = Placements::default();
    let pieces = render_windows(root, &[(0, crate::types::SIZE_MAX)], placements);
    FlatView::new(simplify(pieces), root.cloned(), generation)
}

/// Renders only the addresses in `windows` (sorted, disjoint), in one walk
/// of the tree, returning the (unmerged) pieces in address order.
pub(crate) fn render_windows(
    root: Option<&MemoryRegion>,
    windows: &[(u128, u128)],
    placements: &mut Placements,
) -> Vec<FlatRange> {
    let wins: Vec<(u128, u128)> = windows.iter().copied().filter(|w| w.0 < w.1).collect();
    let mut r = Renderer { pieces: BTreeMap::new(), wins: &wins, placements };
    if let Some(root) = root {
        r.region(root, 0, (0, crate::types::SIZE_MAX), false);
    }
    let mut out = Vec::with_capacity(r.pieces.len());
    for (start, p) in r.pieces {
        let (romd, own_mask) = {
            let st = p.region.state();
            (st.romd, st.dirty_log_mask)
        };
        let mask = p.region.effective_dirty_mask(own_mask);
        out.push(FlatRange {
            offset_in_region: p.offset as u64,
            start: start as u64,
            last: (p.end - 1) as u64,
            readonly: p.readonly,
            romd,
            dirty_log_mask: mask,
            region: p.region,
        });
    }
    out
}

impl Renderer<'_> {
    /// `render_memory_region`: `base` may go below zero through alias offsets.
    fn region(&mut self, mr: &MemoryRegion, base: i128, clip: (u128, u128), readonly: bool) {
        let st = mr.state();
        if !st.enabled {
            return;
        }
        let base = base + st.addr as i128;
        let readonly = readonly || st.readonly;
        // Intersect the region's own range with the clip; empty renders nothing.
        let start = base.max(clip.0 as i128);
        let end = (base + mr.size() as i128).min(clip.1 as i128);
        if start >= end {
            return;
        }
        let clip = (start as u128, end as u128);
        self.placements.record(mr.id(), Placement { base, start: clip.0, end: clip.1 });
        // The windows that reach into the clip (usually one or two).
        let lo = self.wins.partition_point(|w| w.1 <= clip.0);
        let hi = lo + self.wins[lo..].partition_point(|w| w.0 < clip.1);
        if lo == hi {
            return;
        }
        let wins = &self.wins[lo..hi];
        // Their hull, for a first, cheap test of each child.
        let hull = (clip.0.max(wins[0].0) as i128, clip.1.min(wins[wins.len() - 1].1) as i128);

        if let RegionKind::Alias { target } = mr.kind() {
            let target_addr = target.state().addr;
            let base = base - target_addr as i128 - st.alias_offset as i128;
            drop(st);
            self.region(target, base, clip, readonly);
            return;
        }

        for (child, g) in st.subregions.iter().zip(st.child_geo.iter()) {
            // Skip, without locking it, a child that cannot reach the window.
            if !g.live {
                continue;
            }
            let cs = base + g.start as i128;
            let ce = base + g.last as i128 + 1;
            if ce <= hull.0 || cs >= hull.1 {
                continue;
            }
            if wins.len() > 1 && !wins.iter().any(|&(ws, we)| cs < we as i128 && ce > ws as i128) {
                continue;
            }
            self.region(child, base, clip, readonly);
        }
        drop(st);
        if !mr.terminates() {
            return;
        }

        // Fill the gaps of each window that nothing rendered earlier claims.
        let mut gaps = Vec::new();
        for &(ws, we) in wins {
            let w = (clip.0.max(ws), clip.1.min(we));
            let mut pos = w.0;
            if let Some((_, p)) = self.pieces.range(..w.0).next_back() {
                pos = pos.max(p.end);
            }
            for (&s, p) in self.pieces.range(w.0..w.1) {
                if s > pos {
                    gaps.push((pos, s));
                }
                pos = pos.max(p.end);
                if pos >= w.1 {
                    break;
                }
            }
            if pos < w.1 {
                gaps.push((pos, w.1));
            }
        }
        for (s, e) in gaps {
            self.pieces.insert(s, Piece { end: e, region: mr.clone(), offset: (s as i128 - base) as u128, readonly });
        }
    }
}

/// QEMU's `memory_region_get_flatview_root`, restricted to the steps that
/// provably render the same view: an alias that shows all of its target from
/// offset 0, or a container whose only enabled child covers it from address
/// 0, is replaced by that target or child (only where neither carries an
/// address or a readonly flag that rendering would apply). `None` means the
/// empty view.
pub(crate) fn physical_root(root: &MemoryRegion) -> Option<MemoryRegion> {
    let mut mr = root.clone();
    loop {
        let next = {
            let st = mr.state();
            if !st.enabled {
                return None;
            }
            let plain = st.addr == 0 && !st.readonly;
            match mr.kind() {
                RegionKind::Container => {
                    let mut enabled = st.subregions.iter().filter(|c| c.is_enabled());
                    let first = enabled.next();
                    let more = enabled.next().is_some();
                    match (first, more) {
                        (None, _) => return None,
                        (Some(c), false) if plain && c.addr() == 0 && mr.size() >= c.size() => Some(c.clone()),
                        _ => None,
                    }
                }
                RegionKind::Alias { target }
                    if plain && st.alias_offset == 0 && mr.size() >= target.size() && target.addr() == 0 =>
                {
                    Some(target.clone())
                }
                _ => None,
            }
        };
        match next {
            Some(n) => mr = n,
            None => return Some(mr),
        }
    }
}
