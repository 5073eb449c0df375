//! FlatViews: the rendered, immutable form of an address space, and the
//! rendering rules that produce them (QEMU's `render_memory_region` and
//! `flatview_simplify`).

use crate::region::{MemoryRegion, RegionKind};
use crate::types::HwAddr;
use std::collections::BTreeMap;

/// One range of a FlatView: addresses `[start, start + size)` map to
/// `region` at `offset_in_region`. The region is always a terminating one
/// (RAM, I/O, ROM device or reservation), never an alias or container.
#[derive(Clone)]
pub struct FlatRange {
    pub(crate) region: MemoryRegion,
    pub(crate) offset_in_region: u64,
    pub(crate) start: u64,
    /// Inclusive end, so a range can reach 2^64 - 1.
    pub(crate) last: u64,
    pub(crate) readonly: bool,
    pub(crate) romd: bool,
    pub(crate) dirty_log_mask: u8,
}

impl FlatRange {
    /// The region that serves the range.
    pub fn region(&self) -> &MemoryRegion {
        &self.region
    }
    /// First address.
    pub fn start(&self) -> HwAddr {
        self.start
    }
    /// Size in bytes (up to 2^64).
    pub fn size(&self) -> u128 {
        self.last as u128 - self.start as u128 + 1
    }
    /// One past the last address, as `u128`.
    pub fn end(&self) -> u128 {
        self.last as u128 + 1
    }
    /// Last address (inclusive).
    pub fn last(&self) -> HwAddr {
        self.last
    }
    /// Offset within the region of the first byte.
    pub fn offset_in_region(&self) -> u64 {
        self.offset_in_region
    }
    /// Read-only, inherited along the path from the root.
    pub fn readonly(&self) -> bool {
        self.readonly
    }
    /// The region's romd flag (not inherited).
    pub fn romd(&self) -> bool {
        self.romd
    }
    /// The region's effective dirty-log mask when the view was rendered.
    pub fn dirty_log_mask(&self) -> u8 {
        self.dirty_log_mask
    }
    /// Whether `addr` falls in the range.
    #[inline]
    pub fn contains(&self, addr: HwAddr) -> bool {
        addr >= self.start && addr <= self.last
    }

    /// QEMU's `flatrange_equal` (dirty-log mask is not part of it).
    pub(crate) fn same_as(&self, o: &FlatRange) -> bool {
        self.region == o.region
            && self.start == o.start
            && self.last == o.last
            && self.offset_in_region == o.offset_in_region
            && self.romd == o.romd
            && self.readonly == o.readonly
    }
}

impl std::fmt::Debug for FlatRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{:#x},{:#x}) {} off={:#x}{}{}",
            self.start,
            self.end(),
            self.region.name(),
            self.offset_in_region,
            if self.readonly { " ro" } else { "" },
            if self.romd || !self.region.is_rom_device() { "" } else { " !romd" },
        )
    }
}

/// An immutable, sorted list of non-overlapping [`FlatRange`]s: what a guest
/// access resolves against. Published by RCU; a reader that holds one keeps it
/// and every region it references alive.
pub struct FlatView {
    pub(crate) ranges: Vec<FlatRange>,
    /// Start addresses, for the lookup (kept apart so a search touches only
    /// these).
    starts: Vec<u64>,
    /// The region that was rendered (the address space's "physical root").
    pub(crate) root: Option<MemoryRegion>,
}

impl std::fmt::Debug for FlatView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.ranges).finish()
    }
}

static LIVE_VIEWS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many FlatViews exist in the process right now (published, held by
/// readers, or waiting for their last reader). Stress tests use it to check
/// that retired views are freed.
pub fn live_views() -> usize {
    LIVE_VIEWS.load(std::sync::atomic::Ordering::Acquire)
}

impl Drop for FlatView {
    fn drop(&mut self) {
        LIVE_VIEWS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl FlatView {
    pub(crate) fn new(ranges: Vec<FlatRange>, root: Option<MemoryRegion>) -> FlatView {
        let starts = ranges.iter().map(|r| r.start).collect();
        LIVE_VIEWS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        FlatView { ranges, starts, root }
    }

    /// The empty view.
    pub(crate) fn empty() -> FlatView {
        FlatView::new(Vec::new(), None)
    }

    /// The ranges in address order.
    pub fn ranges(&self) -> &[FlatRange] {
        &self.ranges
    }

    /// The rendered root region, if any.
    pub fn root(&self) -> Option<&MemoryRegion> {
        self.root.as_ref()
    }

    /// Index of the range containing `addr`.
    #[inline]
    pub fn lookup_index(&self, addr: HwAddr) -> Option<usize> {
        let i = self.starts.partition_point(|&s| s <= addr);
        if i == 0 {
            return None;
        }
        let r = &self.ranges[i - 1];
        (addr <= r.last).then_some(i - 1)
    }

    /// The range containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: HwAddr) -> Option<&FlatRange> {
        self.lookup_index(addr).map(|i| &self.ranges[i])
    }

    /// Index of the first range that ends after `addr` (that contains it or
    /// lies above it).
    pub(crate) fn first_at_or_after(&self, addr: HwAddr) -> usize {
        let i = self.starts.partition_point(|&s| s <= addr);
        if i > 0 && self.ranges[i - 1].last >= addr {
            i - 1
        } else {
            i
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

/// Renders the tree under `root` into a FlatView (QEMU's
/// `generate_memory_topology`).
pub(crate) fn render(root: Option<&MemoryRegion>) -> FlatView {
    let mut pieces: BTreeMap<u128, Piece> = BTreeMap::new();
    if let Some(root) = root {
        render_region(&mut pieces, root, 0, (0, crate::types::SIZE_MAX), false);
    }
    // Convert and merge (`flatview_simplify`).
    let mut out: Vec<FlatRange> = Vec::with_capacity(pieces.len());
    for (start, p) in pieces {
        let (romd, own_mask) = {
            let st = p.region.0.state.lock();
            (st.romd, st.dirty_log_mask)
        };
        let mask = p.region.effective_dirty_mask(own_mask);
        let fr = FlatRange {
            offset_in_region: p.offset as u64,
            start: start as u64,
            last: (p.end - 1) as u64,
            readonly: p.readonly,
            romd,
            dirty_log_mask: mask,
            region: p.region,
        };
        if let Some(prev) = out.last_mut() {
            if prev.end() == fr.start as u128
                && prev.region == fr.region
                && prev.offset_in_region as u128 + prev.size() == fr.offset_in_region as u128
                && prev.dirty_log_mask == fr.dirty_log_mask
                && prev.romd == fr.romd
                && prev.readonly == fr.readonly
            {
                prev.last = fr.last;
                continue;
            }
        }
        out.push(fr);
    }
    FlatView::new(out, root.cloned())
}

/// `render_memory_region`: `base` may go below zero through alias offsets.
fn render_region(
    pieces: &mut BTreeMap<u128, Piece>,
    mr: &MemoryRegion,
    base: i128,
    clip: (u128, u128),
    readonly: bool,
) {
    let st = mr.0.state.lock();
    if !st.enabled {
        return;
    }
    let base = base + st.addr as i128;
    let readonly = readonly || st.readonly;
    // Intersect the region's own range with the clip; empty renders nothing.
    let own_start = base;
    let own_end = base + mr.size() as i128;
    let start = own_start.max(clip.0 as i128);
    let end = own_end.min(clip.1 as i128);
    if start >= end {
        return;
    }
    let clip = (start as u128, end as u128);

    if let RegionKind::Alias { target } = &mr.0.kind {
        let target_addr = target.0.state.lock().addr;
        let base = base - target_addr as i128 - st.alias_offset as i128;
        drop(st);
        render_region(pieces, target, base, clip, readonly);
        return;
    }

    for child in &st.subregions {
        render_region(pieces, child, base, clip, readonly);
    }
    drop(st);
    if !mr.terminates() {
        return;
    }

    // Fill the gaps of the clip that nothing rendered earlier claims.
    let mut gaps = Vec::new();
    let mut pos = clip.0;
    if let Some((_, p)) = pieces.range(..clip.0).next_back() {
        pos = pos.max(p.end);
    }
    for (&s, p) in pieces.range(clip.0..clip.1) {
        if s > pos {
            gaps.push((pos, s));
        }
        pos = pos.max(p.end);
        if pos >= clip.1 {
            break;
        }
    }
    if pos < clip.1 {
        gaps.push((pos, clip.1));
    }
    for (s, e) in gaps {
        pieces.insert(s, Piece { end: e, region: mr.clone(), offset: (s as i128 - base) as u128, readonly });
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
            let st = mr.0.state.lock();
            if !st.enabled {
                return None;
            }
            let plain = st.addr == 0 && !st.readonly;
            match &mr.0.kind {
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
