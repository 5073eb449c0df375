//! FlatViews: the rendered, immutable form of an address space, and the
//! rendering rules that produce them (QEMU's `render_memory_region` and
//! `flatview_simplify`).

use crate::region::{MemoryRegion, RegionId, RegionKind};
use crate::sync::Arc;
use crate::types::HwAddr;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

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

static LIVE_VIEWS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many FlatViews exist in the process right now (published, held by
/// readers, or waiting for their last reader). Stress tests use it to check
/// that retired views are freed.
pub fn live_views() -> usize {
    LIVE_VIEWS.load(std::sync::atomic::Ordering::Acquire)
}

/// Ranges per chunk. A commit that changes a few ranges rebuilds only the
/// chunks around them; the others are shared with the previous view.
const CHUNK: usize = 32;

/// A run of consecutive ranges, shared between views.
pub(crate) struct Chunk {
    pub(crate) ranges: Vec<FlatRange>,
    starts: Vec<u64>,
}

impl Chunk {
    fn new(ranges: Vec<FlatRange>) -> Arc<Chunk> {
        let starts = ranges.iter().map(|r| r.start).collect();
        Arc::new(Chunk { ranges, starts })
    }
}

/// A position in a view: chunk and index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    pub(crate) c: usize,
    pub(crate) i: usize,
}

/// An immutable, sorted list of non-overlapping [`FlatRange`]s: what a guest
/// access resolves against. Published by RCU; a reader that holds one keeps it
/// and every region it references alive.
pub struct FlatView {
    chunks: Vec<Arc<Chunk>>,
    /// First start address of each chunk (the top level of the lookup).
    firsts: Vec<u64>,
    /// Flat index of each chunk's first range.
    offsets: Vec<usize>,
    /// Bucket index over the chunks: the address span from `firsts[0]` is
    /// cut into `top.len()` buckets of `1 << top_shift` bytes; `top[b]` is
    /// the chunk holding the bucket's first address. A lookup reads its
    /// bucket, then searches only the chunks the bucket spans.
    top: Vec<u32>,
    top_shift: u32,
    len: usize,
    flat: OnceLock<Vec<FlatRange>>,
    /// The region that was rendered (the address space's "physical root").
    pub(crate) root: Option<MemoryRegion>,
}

impl std::fmt::Debug for FlatView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Drop for FlatView {
    fn drop(&mut self) {
        LIVE_VIEWS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Splits sorted ranges into balanced chunks.
fn chunkify(ranges: Vec<FlatRange>) -> Vec<Arc<Chunk>> {
    let n = ranges.len();
    if n == 0 {
        return Vec::new();
    }
    let parts = n.div_ceil(CHUNK);
    let per = n.div_ceil(parts);
    let mut out = Vec::with_capacity(parts);
    let mut it = ranges.into_iter().peekable();
    while it.peek().is_some() {
        out.push(Chunk::new(it.by_ref().take(per).collect()));
    }
    out
}

/// How many elements of the sorted slice are ≤ `x` (a branch-free binary
/// search: the comparisons compile to conditional moves).
#[inline]
fn count_le(sorted: &[u64], x: u64) -> usize {
    let mut base = 0usize;
    let mut n = sorted.len();
    if n == 0 {
        return 0;
    }
    while n > 1 {
        let half = n / 2;
        // In bounds: base + half < base + n <= len.
        base = if sorted[base + half] <= x { base + half } else { base };
        n -= half;
    }
    base + (sorted[base] <= x) as usize
}

/// Builds the bucket index over chunk first starts (see `FlatView::top`).
fn build_top(firsts: &[u64], last: Option<u64>) -> (Vec<u32>, u32) {
    let (Some(&first), Some(last)) = (firsts.first(), last) else {
        return (vec![0], 63);
    };
    let span = (last - first) as u128 + 1;
    let buckets = (firsts.len() * 2).next_power_of_two().max(1) as u128;
    // Smallest shift with span >> shift <= buckets.
    let mut shift = 0u32;
    while shift < 64 && (span >> shift) > buckets {
        shift += 1;
    }
    let n = ((span - 1) >> shift) as usize + 1;
    let mut top = Vec::with_capacity(n);
    let mut c = 0usize;
    for b in 0..n {
        let start = first as u128 + ((b as u128) << shift);
        while c + 1 < firsts.len() && (firsts[c + 1] as u128) <= start {
            c += 1;
        }
        top.push(c as u32);
    }
    (top, shift)
}

/// `flatview_simplify`'s merge test (§2.4).
fn can_merge(a: &FlatRange, b: &FlatRange) -> bool {
    a.end() == b.start as u128
        && a.region == b.region
        && a.offset_in_region as u128 + a.size() == b.offset_in_region as u128
        && a.dirty_log_mask == b.dirty_log_mask
        && a.romd == b.romd
        && a.readonly == b.readonly
}

/// Merges adjacent mergeable ranges of a sorted list, in place.
fn simplify(ranges: Vec<FlatRange>) -> Vec<FlatRange> {
    let mut out: Vec<FlatRange> = Vec::with_capacity(ranges.len());
    for fr in ranges {
        if let Some(prev) = out.last_mut() {
            if can_merge(prev, &fr) {
                prev.last = fr.last;
                continue;
            }
        }
        out.push(fr);
    }
    out
}

/// The part `[s, e)` of a range, with its offset adjusted.
fn cut(fr: &FlatRange, s: u128, e: u128) -> FlatRange {
    let mut c = fr.clone();
    c.offset_in_region = fr.offset_in_region + (s - fr.start as u128) as u64;
    c.start = s as u64;
    c.last = (e - 1) as u64;
    c
}

impl FlatView {
    fn from_chunks(chunks: Vec<Arc<Chunk>>, root: Option<MemoryRegion>) -> FlatView {
        let firsts: Vec<u64> = chunks.iter().map(|c| c.starts[0]).collect();
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut len = 0;
        for c in &chunks {
            offsets.push(len);
            len += c.ranges.len();
        }
        let (top, top_shift) = build_top(&firsts, chunks.last().map(|c| c.ranges[c.ranges.len() - 1].last));
        LIVE_VIEWS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        FlatView { chunks, firsts, offsets, top, top_shift, len, flat: OnceLock::new(), root }
    }

    pub(crate) fn new(ranges: Vec<FlatRange>, root: Option<MemoryRegion>) -> FlatView {
        FlatView::from_chunks(chunkify(ranges), root)
    }

    /// The empty view.
    pub(crate) fn empty() -> FlatView {
        FlatView::new(Vec::new(), None)
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ranges in address order.
    pub fn iter(&self) -> impl Iterator<Item = &FlatRange> + '_ {
        self.chunks.iter().flat_map(|c| c.ranges.iter())
    }

    /// The ranges in address order, as one slice (materialised on first
    /// use; prefer [`iter`](Self::iter) on hot paths).
    pub fn ranges(&self) -> &[FlatRange] {
        self.flat.get_or_init(|| self.iter().cloned().collect())
    }

    /// The rendered root region, if any.
    pub fn root(&self) -> Option<&MemoryRegion> {
        self.root.as_ref()
    }

    /// Index of the chunk whose first start is the last one ≤ `addr`
    /// (`addr` must be ≥ the view's first start).
    #[inline]
    fn chunk_for(&self, addr: HwAddr) -> usize {
        let rel = addr - self.firsts[0];
        let b = ((rel >> self.top_shift) as usize).min(self.top.len() - 1);
        let lo = self.top[b] as usize;
        let hi = self.top.get(b + 1).map_or(self.firsts.len() - 1, |&h| h as usize);
        lo + count_le(&self.firsts[lo + 1..=hi], addr)
    }

    /// Position of the range containing `addr`.
    #[inline]
    pub(crate) fn lookup_pos(&self, addr: HwAddr) -> Option<Pos> {
        if self.firsts.first().is_none_or(|&f| addr < f) {
            return None;
        }
        let c = self.chunk_for(addr);
        let ch = &self.chunks[c];
        let i = count_le(&ch.starts, addr) - 1;
        (addr <= ch.ranges[i].last).then_some(Pos { c, i })
    }

    /// The range at a position.
    #[inline]
    pub(crate) fn get(&self, p: Pos) -> Option<&FlatRange> {
        self.chunks.get(p.c).and_then(|c| c.ranges.get(p.i))
    }

    /// The position after `p`.
    #[inline]
    pub(crate) fn next_pos(&self, p: Pos) -> Option<Pos> {
        if p.i + 1 < self.chunks[p.c].ranges.len() {
            Some(Pos { c: p.c, i: p.i + 1 })
        } else if p.c + 1 < self.chunks.len() {
            Some(Pos { c: p.c + 1, i: 0 })
        } else {
            None
        }
    }

    /// Position of the first range that contains `addr` or lies above it.
    pub(crate) fn pos_at_or_after(&self, addr: HwAddr) -> Option<Pos> {
        let c = if self.firsts.first().is_none_or(|&f| addr < f) { 0 } else { self.chunk_for(addr) + 1 };
        if c == 0 {
            return (!self.chunks.is_empty()).then_some(Pos { c: 0, i: 0 });
        }
        let ch = &self.chunks[c - 1];
        let i = ch.starts.partition_point(|&s| s <= addr);
        if ch.ranges[i - 1].last >= addr {
            Some(Pos { c: c - 1, i: i - 1 })
        } else if i < ch.ranges.len() {
            Some(Pos { c: c - 1, i })
        } else if c < self.chunks.len() {
            Some(Pos { c, i: 0 })
        } else {
            None
        }
    }

    /// The ranges that contain `addr` or lie above it, in order.
    pub(crate) fn iter_from(&self, addr: HwAddr) -> impl Iterator<Item = &FlatRange> + '_ {
        let mut p = self.pos_at_or_after(addr);
        std::iter::from_fn(move || {
            let cur = p?;
            p = self.next_pos(cur);
            self.get(cur)
        })
    }

    /// Index (in [`ranges`](Self::ranges)) of the range containing `addr`.
    #[inline]
    pub fn lookup_index(&self, addr: HwAddr) -> Option<usize> {
        self.lookup_pos(addr).map(|p| self.offsets[p.c] + p.i)
    }

    /// The range containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: HwAddr) -> Option<&FlatRange> {
        self.lookup_pos(addr).and_then(|p| self.get(p))
    }

    /// Grows each window (sorted, disjoint) until its ends fall on range
    /// boundaries of this view, and merges windows that come to touch.
    pub(crate) fn expand(&self, windows: &[(u128, u128)]) -> Vec<(u128, u128)> {
        let mut out: Vec<(u128, u128)> = Vec::new();
        for &(mut s, mut e) in windows {
            if s < crate::types::SIZE_MAX {
                if let Some(r) = self.lookup(s as u64) {
                    s = s.min(r.start as u128);
                }
            }
            if e > 0 {
                if let Some(r) = self.lookup((e - 1) as u64) {
                    e = e.max(r.end());
                }
            }
            match out.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out
    }

    /// A new view equal to this one outside `windows` (sorted, disjoint) and
    /// made of `pieces` (sorted, inside the windows) within them. Only the
    /// chunks around the windows are rebuilt; the rest are shared.
    pub(crate) fn splice(
        &self,
        windows: &[(u128, u128)],
        pieces: Vec<FlatRange>,
        root: Option<MemoryRegion>,
    ) -> FlatView {
        if self.chunks.is_empty() {
            return FlatView::new(simplify(pieces), root);
        }
        let n = self.chunks.len();
        // Chunk spans to rebuild: the chunks each window touches (or the one
        // before it), one more on each side so merges at the edges are seen.
        let chunk_of = |a: u128| -> usize {
            let a = a.min(u64::MAX as u128) as u64;
            self.firsts.partition_point(|&s| s <= a).saturating_sub(1)
        };
        /// First and last chunk of a run to rebuild, with its windows.
        type Span = (usize, usize, Vec<(u128, u128)>);
        let mut spans: Vec<Span> = Vec::new();
        for &(ws, we) in windows {
            let lo = chunk_of(ws).saturating_sub(1);
            let hi = (chunk_of(we.saturating_sub(1)) + 1).min(n - 1);
            match spans.last_mut() {
                Some(last) if last.1 + 1 >= lo => {
                    last.1 = last.1.max(hi);
                    last.2.push((ws, we));
                }
                _ => spans.push((lo, hi, vec![(ws, we)])),
            }
        }
        let mut pieces = pieces.into_iter().peekable();
        let mut chunks: Vec<Arc<Chunk>> = Vec::with_capacity(n + 2);
        let mut next = 0;
        for (lo, hi, wins) in spans {
            chunks.extend(self.chunks[next..lo].iter().cloned());
            let span_end = if hi + 1 < n { self.firsts[hi + 1] as u128 } else { u128::MAX };
            let mut merged: Vec<FlatRange> = Vec::new();
            for fr in self.chunks[lo..=hi].iter().flat_map(|c| c.ranges.iter()) {
                // Keep the parts of the old range outside every window.
                let (mut s, e) = (fr.start as u128, fr.end());
                for &(ws, we) in &wins {
                    if we <= s || ws >= e {
                        continue;
                    }
                    if ws > s {
                        merged.push(cut(fr, s, ws));
                    }
                    s = s.max(we);
                }
                if s < e {
                    merged.push(cut(fr, s, e));
                }
            }
            while let Some(p) = pieces.next_if(|p| (p.start as u128) < span_end) {
                merged.push(p);
            }
            merged.sort_by_key(|r| r.start);
            chunks.extend(chunkify(simplify(merged)));
            next = hi + 1;
        }
        chunks.extend(self.chunks[next..].iter().cloned());
        FlatView::from_chunks(chunks, root)
    }
}

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
    win: (u128, u128),
    placements: &'a mut Placements,
}

/// Renders the tree under `root` into a FlatView (QEMU's
/// `generate_memory_topology`), recording placements afresh.
pub(crate) fn render(root: Option<&MemoryRegion>, placements: &mut Placements) -> FlatView {
    *placements = Placements::default();
    let pieces = render_window(root, (0, crate::types::SIZE_MAX), placements);
    FlatView::new(simplify(pieces), root.cloned())
}

/// Renders only the addresses in `win`, returning the (unmerged) pieces.
pub(crate) fn render_window(
    root: Option<&MemoryRegion>,
    win: (u128, u128),
    placements: &mut Placements,
) -> Vec<FlatRange> {
    let mut r = Renderer { pieces: BTreeMap::new(), win, placements };
    if let Some(root) = root {
        r.region(root, 0, (0, crate::types::SIZE_MAX), false);
    }
    let mut out = Vec::with_capacity(r.pieces.len());
    for (start, p) in r.pieces {
        let (romd, own_mask) = {
            let st = p.region.0.state.lock();
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
        let st = mr.0.state.lock();
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
        let w = (clip.0.max(self.win.0), clip.1.min(self.win.1));
        if w.0 >= w.1 {
            return;
        }

        if let RegionKind::Alias { target } = &mr.0.kind {
            let target_addr = target.0.state.lock().addr;
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
            if ce <= w.0 as i128 || cs >= w.1 as i128 {
                continue;
            }
            self.region(child, base, clip, readonly);
        }
        drop(st);
        if !mr.terminates() {
            return;
        }

        // Fill the gaps of the window that nothing rendered earlier claims.
        let mut gaps = Vec::new();
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
