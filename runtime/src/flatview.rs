//! FlatViews: the rendered, immutable form of an address space (QEMU's
//! `FlatView`), their lookup structure, and the splice that builds a view
//! from its predecessor and re-rendered windows (`render.rs` renders).

use crate::region::MemoryRegion;
use crate::sync::Arc;
use crate::types::HwAddr;
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
    root: Option<MemoryRegion>,
    /// The generation of the commit that rendered the view.
    generation: u64,
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
pub(crate) fn simplify(ranges: Vec<FlatRange>) -> Vec<FlatRange> {
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
    fn from_chunks(chunks: Vec<Arc<Chunk>>, root: Option<MemoryRegion>, generation: u64) -> FlatView {
        let firsts: Vec<u64> = chunks.iter().map(|c| c.starts[0]).collect();
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut len = 0;
        for c in &chunks {
            offsets.push(len);
            len += c.ranges.len();
        }
        let (top, top_shift) = build_top(&firsts, chunks.last().map(|c| c.ranges[c.ranges.len() - 1].last));
        LIVE_VIEWS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        FlatView { chunks, firsts, offsets, top, top_shift, len, flat: OnceLock::new(), root, generation }
    }

    pub(crate) fn new(ranges: Vec<FlatRange>, root: Option<MemoryRegion>, generation: u64) -> FlatView {
        FlatView::from_chunks(chunkify(ranges), root, generation)
    }

    /// The empty view.
    pub(crate) fn empty() -> FlatView {
        FlatView::new(Vec::new(), None, 0)
    }

    /// The generation of the commit that rendered this view (0 for the
    /// empty view a new address space starts with). A view that later
    /// commits did not change keeps its generation; an address space's
    /// current view can therefore be older than the address space's
    /// [publication](crate::AddressSpace::generation).
    pub fn generation(&self) -> u64 {
        self.generation
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
        generation: u64,
    ) -> FlatView {
        if self.chunks.is_empty() {
            return FlatView::new(simplify(pieces), root, generation);
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
        FlatView::from_chunks(chunks, root, generation)
    }

    /// The ranges inside `windows` (sorted, disjoint), or all of them for
    /// `None`.
    pub(crate) fn ranges_in(&self, windows: Option<&[(u128, u128)]>) -> Vec<&FlatRange> {
        match windows {
            None => self.iter().collect(),
            Some(w) => {
                let mut out = Vec::new();
                for &(s, e) in w {
                    if s > u64::MAX as u128 {
                        continue;
                    }
                    out.extend(self.iter_from(s as u64).take_while(|r| (r.start as u128) < e));
                }
                out
            }
        }
    }
}
