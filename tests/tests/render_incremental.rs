//! Incremental rendering against a full render (issue 7).
//!
//! A commit re-renders only the windows that changed and splices them into
//! the previous view, which is stored in chunks of 32 ranges under a bucket
//! index. This property test builds trees with dozens to hundreds of leaves
//! (so views span several chunks), shows them through several address
//! spaces at once — one over a root of up to 2^64 bytes, roots that are
//! themselves subregions of other containers, aliases, a container whose
//! only child stands in for it (the "physical root" shortcut), address
//! spaces that share a root — and applies long random mutation sequences:
//! adds with priorities, deletes, moves of leaves, containers and roots,
//! enable/disable, readonly, alias offsets, romd, dirty logging, address
//! spaces created and destroyed, roots given a container and taken out of
//! it, some grouped in nested transactions, plus misuse that must fail and
//! change nothing.
//!
//! After every outermost commit, each address space's published view must
//! equal, range by range, a full render of the current tree by an
//! independent model: QEMU's `render_memory_region` and `flatview_simplify`
//! (semantics.md §2) over a plain copy of the tree read through the public
//! queries, with sibling order worked out by the harness. The model is
//! cross-checked at range boundaries against a brute-force per-address
//! resolver; lookups through the view's index must find the same ranges;
//! and recording listeners and a diff subscriber must each replay the diffs
//! into exactly the published view: per address space one listener that
//! declines `region_nop` (so the runtime diffs only the re-rendered
//! windows) and, on every other one, one that wants it (which makes the
//! runtime diff everything there), plus one listener for all of them.
//!
//! `PROPTEST_CASES` sets the number of cases (default 256, about 18 s in a
//! debug build); `generated_trees_are_large` checks, on a fixed sample, that
//! the generator keeps producing what this test is meant to cover.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use topos_runtime::{
    AddressSpace, DiffSubscriber, DirtyClient, FlatRange, FlatView, HwAddr, ListenerId, ListenerResult, MemoryListener,
    MemoryRegion, MemoryRegionOps, MemoryRegionSection, Observed, OpsConfig, RegionId, Topology, SIZE_MAX,
};
use topos_tests::SpaceReplay;

/// Every size, address and offset is a multiple of this.
const BLOCK: u64 = 0x100;
/// Children are placed within this many blocks of their container's start
/// (or near its end, see [`Pos::High`]).
const SPREAD: u128 = 0x2000;
/// Address spaces alive at once, at most (creation is skipped beyond).
const MAX_SPACES: usize = 10;
/// Points per view at which the model is checked against the resolver.
const SAMPLES: usize = 48;

/// Device callbacks that do nothing: only the topology matters here.
struct NullOps;

impl MemoryRegionOps for NullOps {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        0
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {}
}

fn migration_bit(mr: &MemoryRegion, global_log: bool) -> u8 {
    if global_log && (mr.is_ram() || mr.is_rom_device()) {
        DirtyClient::Migration.mask()
    } else {
        0
    }
}

// ----- recording listeners ---------------------------------------------------

/// What a listener holds for one range: region, size, offset, readonly, romd
/// mode (ROM devices only) and dirty-log mask.
type Entry = (RegionId, u128, u64, bool, Option<bool>, u8);

fn entry_of(fr: &FlatRange) -> Entry {
    let romd = fr.region().is_rom_device().then(|| fr.romd());
    (fr.region().id(), fr.size(), fr.offset_in_region(), fr.readonly(), romd, fr.dirty_log_mask())
}

/// The expected replay of a view.
fn entries(view: &FlatView) -> BTreeMap<u64, Entry> {
    view.iter().map(|fr| (fr.start(), entry_of(fr))).collect()
}

#[derive(Default)]
struct RecState {
    /// By address-space id.
    spaces: HashMap<u64, SpaceReplay<Entry>>,
    in_commit: bool,
    errors: Vec<String>,
}

/// Applies `region_add` / `region_del` / `log_start` / `log_stop` to its own
/// maps, one per address space, and records anything that breaks the
/// protocol: a delete of a range it does not hold, an add overlapping a held
/// range, a delete after an add of the same address space in one commit,
/// sections out of address order, callbacks outside `begin`/`commit`.
///
/// Sections carry neither the romd mode nor the dirty-log mask: like a KVM
/// listener, it reads them from the region when the range is added (during
/// the commit, so after every change it renders), then follows `log_start`
/// and `log_stop`.
struct Recorder {
    st: Mutex<RecState>,
    /// Wants `region_nop` (QEMU's default); without it the runtime diffs only
    /// the windows a commit re-rendered.
    nop: bool,
    /// Global dirty logging, as the harness turned it on or off.
    global_log: Arc<AtomicBool>,
}

impl Recorder {
    fn new(nop: bool, global_log: &Arc<AtomicBool>) -> Arc<Recorder> {
        Arc::new(Recorder { st: Mutex::default(), nop, global_log: global_log.clone() })
    }

    fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut self.st.lock().unwrap().errors)
    }

    fn map(&self, space: u64) -> BTreeMap<u64, Entry> {
        self.st.lock().unwrap().spaces.get(&space).map(SpaceReplay::view).unwrap_or_default()
    }

    fn forget(&self, space: u64) {
        self.st.lock().unwrap().spaces.remove(&space);
    }

    fn entry(&self, s: &MemoryRegionSection) -> Option<Entry> {
        let mr = s.mr.as_ref()?;
        let mask = mr.dirty_log_mask() | migration_bit(mr, self.global_log.load(Ordering::SeqCst));
        Some((mr.id(), s.size, s.offset_within_region, s.readonly, mr.is_rom_device().then(|| mr.is_romd()), mask))
    }

    fn set_mask(&self, s: &MemoryRegionSection, new: u8, what: &str) {
        let mut st = self.st.lock().unwrap();
        let start = s.offset_within_address_space;
        let id = s.mr.as_ref().map(MemoryRegion::id);
        let sp = st.spaces.entry(s.address_space.id()).or_default();
        match sp.get_mut(start) {
            Some(held) if Some(held.0) == id && held.1 == s.size && held.2 == s.offset_within_region => held.5 = new,
            held => {
                let msg = format!("{what} at {start:#x} of {} but the listener holds {held:?}", s.address_space.name());
                st.errors.push(msg);
            }
        }
    }
}

impl MemoryListener for Recorder {
    fn wants_region_nop(&self) -> bool {
        self.nop
    }

    fn begin(&self) -> ListenerResult {
        let mut st = self.st.lock().unwrap();
        if st.in_commit {
            st.errors.push("begin inside begin/commit".into());
        }
        st.in_commit = true;
        for sp in st.spaces.values_mut() {
            sp.begin();
        }
        Ok(())
    }

    fn commit(&self) -> ListenerResult {
        let mut st = self.st.lock().unwrap();
        if !st.in_commit {
            st.errors.push("commit without begin".into());
        }
        st.in_commit = false;
        Ok(())
    }

    fn region_add(&self, s: &MemoryRegionSection) -> ListenerResult {
        let e = self.entry(s);
        let mut st = self.st.lock().unwrap();
        let st = &mut *st;
        let start = s.offset_within_address_space;
        let name = s.address_space.name();
        let Some(e) = e else {
            st.errors.push(format!("region_add at {start:#x} of {name} without a region"));
            return Ok(());
        };
        if !st.in_commit {
            st.errors.push(format!("region_add at {start:#x} of {name} outside begin/commit"));
        }
        let sp = st.spaces.entry(s.address_space.id()).or_default();
        sp.add(start, s.size, e, &mut st.errors, &format!("at {start:#x} of {name}"));
        Ok(())
    }

    fn region_del(&self, s: &MemoryRegionSection) -> ListenerResult {
        let e = self.entry(s);
        let mut st = self.st.lock().unwrap();
        let st = &mut *st;
        let start = s.offset_within_address_space;
        let name = s.address_space.name();
        let Some(e) = e else {
            st.errors.push(format!("region_del at {start:#x} of {name} without a region"));
            return Ok(());
        };
        if !st.in_commit {
            st.errors.push(format!("region_del at {start:#x} of {name} outside begin/commit"));
        }
        // The romd mode and mask may already be the new ones: leave them out.
        let same = |held: &Entry, e: &Entry| held.0 == e.0 && held.1 == e.1 && held.2 == e.2 && held.3 == e.3;
        let sp = st.spaces.entry(s.address_space.id()).or_default();
        sp.del(start, &e, same, &mut st.errors, &format!("at {start:#x} of {name}"));
        Ok(())
    }

    fn log_start(&self, s: &MemoryRegionSection, _old: u8, new: u8) -> ListenerResult {
        self.set_mask(s, new, "log_start");
        Ok(())
    }

    fn log_stop(&self, s: &MemoryRegionSection, _old: u8, new: u8) -> ListenerResult {
        self.set_mask(s, new, "log_stop");
        Ok(())
    }
}

/// What a diff subscriber holds for one range (a `RangeRecord`): region,
/// size, offset, readonly, romd, dirty-log mask.
type DiffEntry = (RegionId, u128, u64, bool, bool, u8);

fn diff_entries(view: &FlatView) -> BTreeMap<u64, DiffEntry> {
    view.iter()
        .map(|r| {
            (r.start(), (r.region().id(), r.size(), r.offset_in_region(), r.readonly(), r.romd(), r.dirty_log_mask()))
        })
        .collect()
}

/// Replays the broadcast diffs, per address space.
struct DiffReplay {
    sub: DiffSubscriber,
    maps: HashMap<u64, BTreeMap<u64, DiffEntry>>,
}

impl DiffReplay {
    /// Applies every diff received so far; returns what went wrong.
    fn drain(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        while let Some(o) = self.sub.try_recv() {
            let d = match o {
                Observed::Diff(d) => d,
                other => {
                    errors.push(format!("the subscriber got {other:?} instead of a diff"));
                    continue;
                }
            };
            for sd in &d.spaces {
                let map = self.maps.entry(sd.address_space).or_default();
                for r in &sd.removed {
                    let e = (r.region, r.size, r.offset_in_region, r.readonly, r.romd, r.dirty_log_mask);
                    if map.get(&r.start) != Some(&e) {
                        errors.push(format!(
                            "generation {}: {} removes {r:?} but holds {:?}",
                            d.generation,
                            sd.name,
                            map.get(&r.start)
                        ));
                    }
                    map.remove(&r.start);
                }
                for r in &sd.added {
                    let e = (r.region, r.size, r.offset_in_region, r.readonly, r.romd, r.dirty_log_mask);
                    let end = r.start as u128 + r.size;
                    let overlaps = map
                        .range(..end.min(u64::MAX as u128 + 1) as u64)
                        .next_back()
                        .is_some_and(|(&s, h)| s as u128 + h.1 > r.start as u128)
                        || (end > u64::MAX as u128 && map.range(r.start..).next().is_some());
                    if overlaps {
                        errors.push(format!("generation {}: {} adds {r:?} over a held range", d.generation, sd.name));
                    }
                    map.insert(r.start, e);
                }
                for (r, old) in &sd.log_changed {
                    match map.get_mut(&r.start) {
                        Some(h) if h.0 == r.region && h.1 == r.size && h.5 == *old => h.5 = r.dirty_log_mask,
                        h => errors.push(format!(
                            "generation {}: {} changes the log mask of {r:?} from {old} but holds {h:?}",
                            d.generation, sd.name
                        )),
                    }
                }
                if sd.destroyed {
                    if !map.is_empty() {
                        errors.push(format!("{} was destroyed with ranges left: {map:?}", sd.name));
                    }
                    self.maps.remove(&sd.address_space);
                }
            }
        }
        errors
    }
}

// ----- the full render ---------------------------------------------------------

#[derive(Clone, Copy)]
enum MKind {
    /// RAM, I/O, ROM device, reservation.
    Terminating,
    Container,
    Alias {
        target: usize,
        offset: u64,
    },
}

/// A plain copy of one region.
struct MNode {
    id: RegionId,
    size: u128,
    addr: u64,
    enabled: bool,
    readonly: bool,
    /// The region's own romd flag (true for everything but a ROM device out
    /// of romd mode).
    romd: bool,
    /// Effective dirty-log mask.
    mask: u8,
    kind: MKind,
    /// In render order (§2.1), worked out by the harness.
    children: Vec<usize>,
}

/// One range of a view, with everything a FlatRange carries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    start: u128,
    end: u128,
    region: RegionId,
    offset: u128,
    readonly: bool,
    romd: bool,
    mask: u8,
}

impl Range {
    fn of(fr: &FlatRange) -> Range {
        Range {
            start: fr.start() as u128,
            end: fr.end(),
            region: fr.region().id(),
            offset: fr.offset_in_region() as u128,
            readonly: fr.readonly(),
            romd: fr.romd(),
            mask: fr.dirty_log_mask(),
        }
    }

    /// What address `x` (inside the range) resolves to.
    fn hit(&self, x: u128) -> Hit {
        Hit {
            region: self.region,
            offset: self.offset + (x - self.start),
            readonly: self.readonly,
            romd: self.romd,
            mask: self.mask,
        }
    }
}

/// Where one address resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hit {
    region: RegionId,
    offset: u128,
    readonly: bool,
    romd: bool,
    mask: u8,
}

/// The region tree, read through the public queries.
struct Model {
    nodes: Vec<MNode>,
}

impl Model {
    fn snapshot(all: &[MemoryRegion], placed: &HashMap<RegionId, (i32, u64)>, global_log: bool) -> Model {
        let index: HashMap<RegionId, usize> = all.iter().enumerate().map(|(i, r)| (r.id(), i)).collect();
        let nodes = all
            .iter()
            .map(|r| {
                let kind = if let Some(t) = r.alias_target() {
                    MKind::Alias { target: index[&t.id()], offset: r.alias_offset() }
                } else if r.is_container() {
                    MKind::Container
                } else {
                    MKind::Terminating
                };
                MNode {
                    id: r.id(),
                    size: r.size(),
                    addr: r.addr(),
                    enabled: r.is_enabled(),
                    readonly: r.is_readonly(),
                    romd: !r.is_rom_device() || r.is_romd(),
                    mask: r.dirty_log_mask() | migration_bit(r, global_log),
                    kind,
                    children: render_order(&r.subregions(), placed).iter().map(|c| index[c]).collect(),
                }
            })
            .collect();
        Model { nodes }
    }

    /// QEMU's `generate_memory_topology` for the address space rooted at
    /// `root`: render from base 0 over [0, 2^64), then merge.
    fn render(&self, root: usize) -> Vec<Range> {
        let mut view = Vec::new();
        self.render_region(&mut view, root, 0, (0, SIZE_MAX as i128), false);
        simplify(view)
    }

    /// `render_memory_region` (§2.2): `view` is sorted and disjoint; the
    /// first region to claim an address keeps it.
    fn render_region(&self, view: &mut Vec<Range>, i: usize, base: i128, clip: (i128, i128), readonly: bool) {
        let n = &self.nodes[i];
        if !n.enabled {
            return;
        }
        let base = base + n.addr as i128;
        let readonly = readonly || n.readonly;
        let clip = (clip.0.max(base), clip.1.min(base + n.size as i128));
        if clip.0 >= clip.1 {
            return;
        }
        if let MKind::Alias { target, offset } = n.kind {
            let base = base - self.nodes[target].addr as i128 - offset as i128;
            self.render_region(view, target, base, clip, readonly);
            return;
        }
        for &c in &n.children {
            self.render_region(view, c, base, clip, readonly);
        }
        if !matches!(n.kind, MKind::Terminating) {
            return;
        }
        // Fill the gaps of the clip that nothing claims yet.
        let (lo, hi) = (clip.0 as u128, clip.1 as u128);
        let piece = |s: u128, e: u128| Range {
            start: s,
            end: e,
            region: n.id,
            offset: (s as i128 - base) as u128,
            readonly,
            romd: n.romd,
            mask: n.mask,
        };
        let mut pieces = Vec::new();
        let mut pos = lo;
        let mut k = view.partition_point(|r| r.end <= lo);
        while pos < hi {
            match view.get(k) {
                Some(r) if r.start <= pos => pos = r.end,
                Some(r) if r.start < hi => {
                    pieces.push(piece(pos, r.start));
                    pos = r.end;
                }
                _ => {
                    pieces.push(piece(pos, hi));
                    pos = hi;
                }
            }
            k += 1;
        }
        if !pieces.is_empty() {
            view.extend(pieces);
            view.sort_by_key(|r| r.start);
        }
    }

    /// Brute force: what `x` resolves to, walking the tree for this one
    /// address.
    fn resolve(&self, root: usize, x: u128) -> Option<Hit> {
        self.resolve_in(root, 0, x as i128, false)
    }

    fn resolve_in(&self, i: usize, base: i128, x: i128, readonly: bool) -> Option<Hit> {
        let n = &self.nodes[i];
        if !n.enabled {
            return None;
        }
        let base = base + n.addr as i128;
        let readonly = readonly || n.readonly;
        if x < base || x >= base + n.size as i128 {
            return None;
        }
        if let MKind::Alias { target, offset } = n.kind {
            let tbase = base - self.nodes[target].addr as i128 - offset as i128;
            return self.resolve_in(target, tbase, x, readonly);
        }
        for &c in &n.children {
            if let Some(h) = self.resolve_in(c, base, x, readonly) {
                return Some(h);
            }
        }
        matches!(n.kind, MKind::Terminating).then(|| Hit {
            region: n.id,
            offset: (x - base) as u128,
            readonly,
            romd: n.romd,
            mask: n.mask,
        })
    }
}

/// `flatview_simplify` (§2.4).
fn simplify(ranges: Vec<Range>) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if let Some(p) = out.last_mut() {
            if p.end == r.start
                && p.region == r.region
                && p.offset + (p.end - p.start) == r.offset
                && (p.readonly, p.romd, p.mask) == (r.readonly, r.romd, r.mask)
            {
                p.end = r.end;
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// §2.1: priority descending, and among equal priorities the most recently
/// inserted first.
fn render_order(children: &[MemoryRegion], placed: &HashMap<RegionId, (i32, u64)>) -> Vec<RegionId> {
    let mut ids: Vec<RegionId> = children.iter().map(MemoryRegion::id).collect();
    ids.sort_by_key(|id| placed.get(id).map(|&(prio, stamp)| (std::cmp::Reverse(prio), std::cmp::Reverse(stamp))));
    ids
}

/// The range of a sorted view containing `x`.
fn range_at(view: &[Range], x: u128) -> Option<&Range> {
    let k = view.partition_point(|r| r.start <= x);
    (k > 0 && view[k - 1].end > x).then(|| &view[k - 1])
}

// ----- generated inputs --------------------------------------------------------

/// Where to put a subregion.
#[derive(Debug, Clone)]
enum Pos {
    /// Reduced to a block-aligned address near the container's start.
    Raw(u16),
    /// Lined up with a sibling that shows the same memory (the child's alias
    /// target, another alias of it, or an alias of the child), so that both
    /// map the same offsets at the same addresses and their ranges can merge
    /// (§2.4). Falls back to `Raw` without such a sibling.
    Lined(u16),
    /// Address 0, where a lone child can stand in for its container.
    Zero,
    /// Up to 16 blocks before the container's end, so that the child sticks
    /// out and is clipped (at 2^64 in the largest roots).
    High(u8),
    /// Any byte address near the container's start (unaligned ends).
    Odd(u32),
}

/// A container for an add.
#[derive(Debug, Clone)]
enum Parent {
    /// The root of "memory".
    Sys,
    /// A region made to hold children (the root, containers, wrappers).
    Holder(Index),
    /// Any region: a RAM or I/O region with children answers where they do
    /// not; an alias refuses.
    Any(Index),
}

/// A region to change: any region, or (`inner`) one that holds or shows
/// others (the root, containers, wrappers, aliases), which leaves would
/// otherwise outnumber.
#[derive(Debug, Clone)]
struct Pick {
    idx: Index,
    inner: bool,
}

fn pick_strategy() -> impl Strategy<Value = Pick> {
    (any::<Index>(), prop::bool::weighted(0.4)).prop_map(|(idx, inner)| Pick { idx, inner })
}

#[derive(Debug, Clone)]
enum Op {
    /// `free` prefers a child without a container; `prio` `None` uses
    /// `add_subregion`.
    Add {
        parent: Parent,
        child: Index,
        free: bool,
        pos: Pos,
        prio: Option<i32>,
    },
    /// Deletes a child from its container (from the root of "memory" if it
    /// has none, which fails); unless `any`, prefers one that has one.
    DelFromParent {
        child: Index,
        any: bool,
    },
    /// Deletes from an arbitrary region (usually fails).
    Del {
        parent: Parent,
        child: Index,
    },
    SetEnabled {
        region: Pick,
        on: bool,
    },
    SetAddress {
        region: Pick,
        pos: Pos,
    },
    /// Moves the root of an address space (within its container, if any).
    MoveRoot {
        space: Index,
        pos: Pos,
    },
    /// `any` picks from every region, not just aliases (then usually fails).
    SetAliasOffset {
        region: Index,
        any: bool,
        offset: u16,
    },
    SetReadonly {
        region: Pick,
        on: bool,
    },
    /// `any` picks from every region, not just ROM devices.
    SetRomd {
        region: Index,
        any: bool,
        on: bool,
    },
    SetLog {
        region: Pick,
        client: u8,
        on: bool,
    },
    GlobalLog {
        on: bool,
    },
    /// `address_space_init` over a container or alias (over any region if
    /// `any`).
    SpaceInit {
        root: Index,
        any: bool,
    },
    /// `address_space_destroy` of any address space but "memory".
    SpaceDestroy {
        space: Index,
    },
    /// Gives the root of an address space a container (preferring one that
    /// has none).
    AdoptRoot {
        parent: Parent,
        space: Index,
        pos: Pos,
        prio: Option<i32>,
    },
    /// Takes the root of an address space out of its container (preferring
    /// one that has one).
    OrphanRoot {
        space: Index,
    },
}

#[derive(Debug, Clone)]
enum Step {
    Op(Op),
    /// `begin`, the steps, `commit`.
    Txn(Vec<Step>),
}

/// Initial placement of a region: `parent` `None` leaves it without a
/// container; `off` disables it first (it is added disabled).
#[derive(Debug, Clone)]
struct Place {
    parent: Option<Index>,
    pos: Pos,
    prio: Option<i32>,
    off: bool,
}

#[derive(Debug, Clone)]
enum RootKind {
    /// A container of 2^64 bytes.
    Container,
    /// An I/O region of 2^64 bytes: it answers wherever nothing else does,
    /// so views alternate between it and the leaves.
    Io,
    /// A container of `SPREAD` blocks: children stick out of it.
    Small,
}

#[derive(Debug, Clone)]
enum LeafKind {
    Ram,
    Io,
    RomDevice,
    Rom,
    Reservation,
}

#[derive(Debug, Clone)]
struct ContainerSpec {
    /// A terminating I/O region used as a container.
    io: bool,
    blocks: u64,
    /// Among the root and the earlier containers.
    at: Place,
}

/// A leaf's size: most are whole blocks; a few are any number of bytes, so
/// that ranges of a single byte and unaligned ends occur.
#[derive(Debug, Clone)]
enum Size {
    Blocks(u64),
    Bytes(u16),
}

#[derive(Debug, Clone)]
struct LeafSpec {
    kind: LeafKind,
    size: Size,
    /// Among the root and the containers.
    at: Place,
}

#[derive(Debug, Clone)]
struct AliasSpec {
    /// Among containers, leaves and earlier aliases.
    target: Index,
    offset: u16,
    /// `None`: the target's size.
    blocks: Option<u64>,
    at: Place,
}

/// An address space made at the start (besides "memory" over the root).
#[derive(Debug, Clone)]
enum SpaceSpec {
    /// Over any region.
    Region(Index),
    /// Over a container (usually a subregion of another).
    Container(Index),
    /// Over a new container whose only child, at 0, is a new alias of all of
    /// a container or alias: both shortcuts to the "physical root" apply while
    /// that region sits at address 0 and (`blocks`, `None`: the region's
    /// size) the container is no smaller.
    Wrapper { target: Index, blocks: Option<u64> },
    /// Over a new alias onto a container or alias.
    Window { target: Index, offset: u16, blocks: Option<u64> },
    /// Over the same root as an earlier address space (a shared view).
    Same(Index),
}

#[derive(Debug, Clone)]
struct Build {
    root: RootKind,
    containers: Vec<ContainerSpec>,
    leaves: Vec<LeafSpec>,
    aliases: Vec<AliasSpec>,
    spaces: Vec<SpaceSpec>,
}

fn pos_strategy() -> impl Strategy<Value = Pos> {
    prop_oneof![
        6 => any::<u16>().prop_map(Pos::Raw),
        2 => any::<u16>().prop_map(Pos::Lined),
        1 => Just(Pos::Zero),
        1 => any::<u8>().prop_map(Pos::High),
        1 => any::<u32>().prop_map(Pos::Odd),
    ]
}

fn prio_strategy() -> impl Strategy<Value = Option<i32>> {
    prop::option::weighted(0.5, -2i32..=2)
}

fn parent_strategy() -> impl Strategy<Value = Parent> {
    prop_oneof![
        2 => Just(Parent::Sys),
        7 => any::<Index>().prop_map(Parent::Holder),
        1 => any::<Index>().prop_map(Parent::Any),
    ]
}

fn place_strategy(placed: f64) -> impl Strategy<Value = Place> {
    (prop::option::weighted(placed, any::<Index>()), pos_strategy(), prio_strategy(), prop::bool::weighted(0.05))
        .prop_map(|(parent, pos, prio, off)| Place { parent, pos, prio, off })
}

fn build_strategy() -> impl Strategy<Value = Build> {
    let root = prop_oneof![3 => Just(RootKind::Container), 1 => Just(RootKind::Io), 1 => Just(RootKind::Small)];
    let container = (prop::bool::weighted(0.2), 64..=2048u64, place_strategy(0.9))
        .prop_map(|(io, blocks, at)| ContainerSpec { io, blocks, at });
    let kind = prop_oneof![
        4 => Just(LeafKind::Ram),
        3 => Just(LeafKind::Io),
        1 => Just(LeafKind::RomDevice),
        1 => Just(LeafKind::Rom),
        1 => Just(LeafKind::Reservation),
    ];
    let size = prop_oneof![
        12 => (1..=8u64).prop_map(Size::Blocks),
        2 => (9..=64u64).prop_map(Size::Blocks),
        1 => (1..=0x300u16).prop_map(Size::Bytes),
        1 => (1..=3u16).prop_map(Size::Bytes),
    ];
    let leaf = (kind, size, place_strategy(0.95)).prop_map(|(kind, size, at)| LeafSpec { kind, size, at });
    let alias = (any::<Index>(), any::<u16>(), prop::option::of(1..=128u64), place_strategy(0.8))
        .prop_map(|(target, offset, blocks, at)| AliasSpec { target, offset, blocks, at });
    let space = prop_oneof![
        1 => any::<Index>().prop_map(SpaceSpec::Region),
        4 => any::<Index>().prop_map(SpaceSpec::Container),
        2 => (any::<Index>(), prop::option::weighted(0.3, 1..=512u64))
            .prop_map(|(target, blocks)| SpaceSpec::Wrapper { target, blocks }),
        2 => (any::<Index>(), any::<u16>(), prop::option::of(1..=256u64))
            .prop_map(|(target, offset, blocks)| SpaceSpec::Window { target, offset, blocks }),
        1 => any::<Index>().prop_map(SpaceSpec::Same),
    ];
    (
        root,
        prop::collection::vec(container, 1..=10),
        prop::collection::vec(leaf, 1..=256),
        prop::collection::vec(alias, 0..=10),
        prop::collection::vec(space, 0..=6),
    )
        .prop_map(|(root, containers, leaves, aliases, spaces)| Build {
            root,
            containers,
            leaves,
            aliases,
            spaces,
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (parent_strategy(), any::<Index>(), prop::bool::weighted(0.8), pos_strategy(), prio_strategy())
            .prop_map(|(parent, child, free, pos, prio)| Op::Add { parent, child, free, pos, prio }),
        4 => (any::<Index>(), prop::bool::weighted(0.05)).prop_map(|(child, any)| Op::DelFromParent { child, any }),
        1 => (parent_strategy(), any::<Index>()).prop_map(|(parent, child)| Op::Del { parent, child }),
        3 => (pick_strategy(), prop::bool::weighted(0.6)).prop_map(|(region, on)| Op::SetEnabled { region, on }),
        5 => (pick_strategy(), pos_strategy()).prop_map(|(region, pos)| Op::SetAddress { region, pos }),
        2 => (any::<Index>(), pos_strategy()).prop_map(|(space, pos)| Op::MoveRoot { space, pos }),
        2 => (any::<Index>(), prop::bool::weighted(0.05), any::<u16>())
            .prop_map(|(region, any, offset)| Op::SetAliasOffset { region, any, offset }),
        2 => (pick_strategy(), any::<bool>()).prop_map(|(region, on)| Op::SetReadonly { region, on }),
        1 => (any::<Index>(), prop::bool::weighted(0.05), any::<bool>())
            .prop_map(|(region, any, on)| Op::SetRomd { region, any, on }),
        1 => (pick_strategy(), 0..3u8, any::<bool>()).prop_map(|(region, client, on)| Op::SetLog { region, client, on }),
        1 => prop::bool::weighted(0.3).prop_map(|on| Op::GlobalLog { on }),
        1 => (any::<Index>(), prop::bool::weighted(0.2)).prop_map(|(root, any)| Op::SpaceInit { root, any }),
        1 => any::<Index>().prop_map(|space| Op::SpaceDestroy { space }),
        2 => (parent_strategy(), any::<Index>(), pos_strategy(), prio_strategy())
            .prop_map(|(parent, space, pos, prio)| Op::AdoptRoot { parent, space, pos, prio }),
        1 => any::<Index>().prop_map(|space| Op::OrphanRoot { space }),
    ]
}

fn steps_strategy() -> impl Strategy<Value = Vec<Step>> {
    let inner = prop::collection::vec(op_strategy().prop_map(Step::Op), 0..4).prop_map(Step::Txn);
    let txn =
        prop::collection::vec(prop_oneof![3 => op_strategy().prop_map(Step::Op), 1 => inner], 1..6).prop_map(Step::Txn);
    let step = prop_oneof![6 => op_strategy().prop_map(Step::Op), 1 => txn];
    prop::collection::vec(step, 1..120)
}

/// `raw` reduced to a block-aligned address in the first `SPREAD` blocks of
/// `within` (or just past its end).
fn place(raw: u16, within: u128) -> u64 {
    let blocks = (within / BLOCK as u128).min(SPREAD);
    ((raw as u128 % (blocks + 2)) * BLOCK as u128) as u64
}

/// 1 to 16 blocks before the end of `within`.
fn high(k: u8, within: u128) -> u64 {
    within.saturating_sub((k as u128 % 16 + 1) * BLOCK as u128) as u64
}

/// `raw` reduced to an alias offset into a target of `within` bytes; a
/// quarter of the values give 0, a sixteenth an unaligned offset.
fn alias_offset(raw: u16, within: u128) -> u64 {
    match raw % 16 {
        0..=3 => 0,
        4 => (raw as u128 % within.max(1)) as u64,
        _ => place(raw / 16, within),
    }
}

// ----- the harness -----------------------------------------------------------

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($fmt)+)));
        }
    };
}

/// Every mutable attribute of one region, as seen through the queries.
type Attrs = (Option<RegionId>, u64, i32, bool, bool, u64, bool, u8, Vec<RegionId>);

/// Each address space's view, by address-space id.
type Views = BTreeMap<u64, Arc<FlatView>>;

fn same_views(a: &Views, b: &Views) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((i, x), (j, y))| i == j && x.iter().map(Range::of).eq(y.iter().map(Range::of)))
}

/// An address space under test.
struct Space {
    asp: AddressSpace,
    /// Index of its root in `Harness::all`.
    root: usize,
    /// Its own listeners: one that declines `region_nop` and, for every
    /// other address space, one that wants it. (One listener that wants
    /// `region_nop` makes the runtime diff the whole address space for all
    /// of them, so the spaces without one are where the diffs limited to
    /// re-rendered windows are checked.)
    listeners: Vec<(&'static str, Arc<Recorder>, ListenerId)>,
    /// Destroyed by the current transaction.
    destroyed: bool,
}

/// Index in `Harness::all` of the root of "memory".
const SYS: usize = 0;

struct Harness {
    topo: Topology,
    /// Every region: the root of "memory" first.
    all: Vec<MemoryRegion>,
    /// Regions made to hold children: the root, containers, wrappers.
    holders: Vec<usize>,
    spaces: Vec<Space>,
    /// One listener (declining `region_nop`) for all address spaces.
    every: Arc<Recorder>,
    diffs: DiffReplay,
    global_log: Arc<AtomicBool>,
    /// Priority and insertion stamp of every region that is a subregion.
    placed: HashMap<RegionId, (i32, u64)>,
    clock: u64,
    depth: u32,
    named: usize,
    /// What the steps so far did, for failure messages.
    log: Vec<String>,
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

impl Harness {
    fn new(b: &Build) -> Result<Harness, TestCaseError> {
        let topo = Topology::new();
        let diffs = DiffReplay { sub: topo.subscribe().map_err(fail)?, maps: HashMap::new() };
        let global_log = Arc::new(AtomicBool::new(false));
        let sys = match b.root {
            RootKind::Container => topo.new_container("sys", SIZE_MAX),
            RootKind::Io => topo.new_io("sys", NullOps, OpsConfig::default(), SIZE_MAX),
            RootKind::Small => topo.new_container("sys", SPREAD * BLOCK as u128),
        }
        .map_err(fail)?;
        let mut h = Harness {
            every: Recorder::new(false, &global_log),
            topo,
            all: vec![sys],
            holders: vec![SYS],
            spaces: Vec::new(),
            diffs,
            global_log,
            placed: HashMap::new(),
            clock: 0,
            depth: 0,
            named: 0,
            log: Vec::new(),
        };
        let topo = h.topo.clone();
        let bytes = |blocks: u64| (blocks * BLOCK) as u128;
        let mut containers = Vec::new();
        for (i, c) in b.containers.iter().enumerate() {
            let r = if c.io {
                topo.new_io(&format!("iocont{i}"), NullOps, OpsConfig::default(), bytes(c.blocks))
            } else {
                topo.new_container(&format!("cont{i}"), bytes(c.blocks))
            };
            containers.push(h.all.len());
            h.holders.push(h.all.len());
            h.all.push(r.map_err(fail)?);
        }
        let mut leaves = Vec::new();
        for (i, l) in b.leaves.iter().enumerate() {
            let size = match l.size {
                Size::Blocks(b) => bytes(b),
                Size::Bytes(n) => n as u128,
            };
            let r = match l.kind {
                LeafKind::Ram => topo.new_ram(&format!("ram{i}"), size),
                LeafKind::Io => topo.new_io(&format!("io{i}"), NullOps, OpsConfig::default(), size),
                LeafKind::RomDevice => topo.new_rom_device(&format!("romd{i}"), NullOps, OpsConfig::default(), size),
                LeafKind::Rom => topo.new_rom(&format!("rom{i}"), size),
                LeafKind::Reservation => topo.new_reservation(&format!("resv{i}"), size),
            };
            leaves.push(h.all.len());
            h.all.push(r.map_err(fail)?);
        }
        let mut aliases = Vec::new();
        for (i, a) in b.aliases.iter().enumerate() {
            let targets: Vec<usize> = containers.iter().chain(&leaves).chain(&aliases).copied().collect();
            let t = h.all[*a.target.get(&targets)].clone();
            let size = a.blocks.map_or(t.size(), bytes);
            let offset = alias_offset(a.offset, t.size());
            let r = topo.new_alias(&format!("alias{i}->{}", t.name()), &t, offset, size).map_err(fail)?;
            aliases.push(h.all.len());
            h.all.push(r);
        }
        topo.listener_register(h.every.clone(), 2, None).map_err(fail)?;
        h.log_regions(0);
        h.space_init(SYS)?;
        // What the other address spaces show: containers and aliases.
        let shown: Vec<usize> = containers.iter().chain(&aliases).copied().collect();
        for (i, s) in b.spaces.iter().enumerate() {
            let made = h.all.len();
            let pool = &h.all[1..];
            let root = match s {
                SpaceSpec::Region(k) => k.index(pool.len()) + 1,
                SpaceSpec::Container(k) => *k.get(&containers),
                SpaceSpec::Same(k) => k.get(&h.spaces).root,
                SpaceSpec::Wrapper { target, blocks } => {
                    let t = h.all[*target.get(&shown)].clone();
                    let wrap = topo.new_container(&format!("wrap{i}"), blocks.map_or(t.size(), bytes)).map_err(fail)?;
                    let inner = topo.new_alias(&format!("wrap{i}a->{}", t.name()), &t, 0, t.size()).map_err(fail)?;
                    wrap.add_subregion(0, &inner).map_err(fail)?;
                    h.stamp(&inner, 0);
                    h.holders.push(h.all.len());
                    h.all.push(wrap);
                    h.all.push(inner);
                    h.all.len() - 2
                }
                SpaceSpec::Window { target, offset, blocks } => {
                    let t = h.all[*target.get(&shown)].clone();
                    let size = blocks.map_or(t.size(), bytes);
                    let offset = alias_offset(*offset, t.size());
                    let win = topo.new_alias(&format!("win{i}->{}", t.name()), &t, offset, size).map_err(fail)?;
                    h.all.push(win);
                    h.all.len() - 1
                }
            };
            h.log_regions(made);
            h.space_init(root)?;
        }
        // Populate everything in one transaction.
        let (views, generation) = (h.views(), h.topo.generation());
        topo.begin().map_err(fail)?;
        h.log.push("begin".into());
        let holders_of =
            |upto: usize| -> Vec<usize> { std::iter::once(SYS).chain(containers[..upto].iter().copied()).collect() };
        let mut placements: Vec<(usize, Vec<usize>, &Place)> = Vec::new();
        for (i, c) in b.containers.iter().enumerate() {
            placements.push((containers[i], holders_of(i), &c.at));
        }
        for (i, l) in b.leaves.iter().enumerate() {
            placements.push((leaves[i], holders_of(containers.len()), &l.at));
        }
        for (i, a) in b.aliases.iter().enumerate() {
            placements.push((aliases[i], holders_of(containers.len()), &a.at));
        }
        for (child, parents, at) in placements {
            let child = h.all[child].clone();
            if at.off {
                child.set_enabled(false).map_err(fail)?;
                h.log.push(format!("  {}.set_enabled(false) -> ok", child.name()));
            }
            let Some(p) = &at.parent else { continue };
            let parent = h.all[*p.get(&parents)].clone();
            let addr = h.position(&at.pos, Some(&parent), &child);
            // An alias may close a cycle: that add fails and changes nothing.
            let (what, r) = h.add(&parent, &child, addr, at.prio);
            h.log.push(format!("  {what} -> {}", r.map_or_else(|e| format!("err: {e}"), |()| "ok".into())));
        }
        topo.commit().map_err(fail)?;
        h.log.push("commit".into());
        h.settled(&views, generation, None)?;
        Ok(h)
    }

    /// Records that `child` was just added with `prio`.
    fn stamp(&mut self, child: &MemoryRegion, prio: i32) {
        self.clock += 1;
        self.placed.insert(child.id(), (prio, self.clock));
    }

    /// `parent.add_subregion(_overlap)`, logged and stamped.
    fn add(
        &mut self,
        parent: &MemoryRegion,
        child: &MemoryRegion,
        addr: u64,
        prio: Option<i32>,
    ) -> (String, topos_runtime::Result<()>) {
        let r = match prio {
            None => parent.add_subregion(addr, child),
            Some(p) => parent.add_subregion_overlap(addr, child, p),
        };
        if r.is_ok() {
            self.stamp(child, prio.unwrap_or(0));
        }
        (format!("{}.add({addr:#x}, {}, prio {prio:?})", parent.name(), child.name()), r)
    }

    fn space_init(&mut self, root: usize) -> Result<(), TestCaseError> {
        let r = self.all[root].clone();
        self.named += 1;
        let name = format!("as{}:{}", self.named, r.name());
        let asp = self.topo.address_space_init(&r, &name).map_err(fail)?;
        self.log.push(format!("address_space_init({}) -> {name}", r.name()));
        self.register(asp, root)
    }

    /// Logs the regions made from `all[from]` on: size, and alias offset.
    fn log_regions(&mut self, from: usize) {
        if from >= self.all.len() {
            return;
        }
        let list: Vec<String> = self.all[from..]
            .iter()
            .map(|r| match r.alias_target() {
                Some(_) => format!("{} {:#x}@{:#x}", r.name(), r.size(), r.alias_offset()),
                None => format!("{} {:#x}", r.name(), r.size()),
            })
            .collect();
        self.log.push(format!("regions: {}", list.join(", ")));
    }

    fn register(&mut self, asp: AddressSpace, root: usize) -> Result<(), TestCaseError> {
        let mut listeners = Vec::new();
        let kinds: &[(&str, bool)] = if self.named % 2 == 0 {
            &[("quiet listener", false), ("nop listener", true)]
        } else {
            &[("quiet listener", false)]
        };
        for (k, &(who, nop)) in kinds.iter().enumerate() {
            let rec = Recorder::new(nop, &self.global_log);
            let id = self.topo.listener_register(rec.clone(), k as i32, Some(&asp)).map_err(fail)?;
            listeners.push((who, rec, id));
        }
        self.spaces.push(Space { asp, root, listeners, destroyed: false });
        Ok(())
    }

    fn views(&self) -> Views {
        self.spaces.iter().map(|s| (s.asp.id(), s.asp.view())).collect()
    }

    /// An address for `child` in `parent` (`None`: a region without a
    /// container, in an address space of 2^64 bytes).
    fn position(&self, pos: &Pos, parent: Option<&MemoryRegion>, child: &MemoryRegion) -> u64 {
        let within = parent.map_or(SIZE_MAX, MemoryRegion::size);
        let raw = match pos {
            Pos::Raw(raw) => return place(*raw, within),
            Pos::Zero => return 0,
            Pos::High(k) => return high(*k, within),
            Pos::Odd(raw) => return (*raw as u128 % (within.min(SPREAD * BLOCK as u128) + 2 * BLOCK as u128)) as u64,
            Pos::Lined(raw) => *raw,
        };
        let Some(parent) = parent else {
            return place(raw, within);
        };
        // Addresses at which `child` would map the same offsets as a sibling.
        let target = child.alias_target();
        let lined: Vec<u64> = parent
            .subregions()
            .iter()
            .filter(|s| *s != child)
            .filter_map(|s| {
                let (addr, off) = (s.addr() as i128, s.alias_offset() as i128);
                let a = match (&target, s.alias_target()) {
                    (Some(t), _) if s == t => addr + child.alias_offset() as i128,
                    (Some(t), Some(st)) if st == *t => addr - off + child.alias_offset() as i128,
                    (_, Some(st)) if st == *child => addr - off,
                    _ => return None,
                };
                u64::try_from(a).ok()
            })
            .collect();
        if lined.is_empty() {
            place(raw, within)
        } else {
            lined[raw as usize % lined.len()]
        }
    }

    fn parent(&self, p: &Parent) -> MemoryRegion {
        match p {
            Parent::Sys => self.all[SYS].clone(),
            Parent::Holder(i) => self.all[*i.get(&self.holders)].clone(),
            Parent::Any(i) => i.get(&self.all).clone(),
        }
    }

    fn region(&self, p: &Pick) -> MemoryRegion {
        if p.inner {
            let inner: Vec<usize> = (0..self.all.len())
                .filter(|&k| {
                    self.holders.contains(&k) || self.all[k].is_alias() || self.spaces.iter().any(|s| s.root == k)
                })
                .collect();
            self.all[*p.idx.get(&inner)].clone()
        } else {
            p.idx.get(&self.all).clone()
        }
    }

    /// A region; unless `any`, one satisfying `pred` if there is one.
    fn pick(&self, idx: &Index, any: bool, pred: impl Fn(&MemoryRegion) -> bool) -> MemoryRegion {
        let cands: Vec<&MemoryRegion> = self.all.iter().filter(|r| any || pred(r)).collect();
        if cands.is_empty() {
            idx.get(&self.all).clone()
        } else {
            (*idx.get(&cands)).clone()
        }
    }

    /// An address space not being destroyed; unless `any`, one whose root
    /// satisfies `pred` if there is one.
    fn pick_space(&self, idx: &Index, pred: impl Fn(&MemoryRegion) -> bool) -> Option<&Space> {
        let live: Vec<&Space> = self.spaces.iter().filter(|s| !s.destroyed).collect();
        let cands: Vec<&Space> = live.iter().copied().filter(|s| pred(&self.all[s.root])).collect();
        match (cands.is_empty(), live.is_empty()) {
            (false, _) => Some(*idx.get(&cands)),
            (true, false) => Some(*idx.get(&live)),
            (true, true) => None,
        }
    }

    fn attrs(&self) -> Vec<Attrs> {
        self.all
            .iter()
            .map(|r| {
                (
                    r.container().map(|c| c.id()),
                    r.addr(),
                    r.priority(),
                    r.is_enabled(),
                    r.is_readonly(),
                    r.alias_offset(),
                    r.is_romd(),
                    r.dirty_log_mask(),
                    r.subregions().iter().map(MemoryRegion::id).collect(),
                )
            })
            .collect()
    }

    fn context(&self) -> String {
        format!("\nsteps:\n  {}", self.log.join("\n  "))
    }

    fn run(&mut self, steps: &[Step]) -> Result<(), TestCaseError> {
        for s in steps {
            self.step(s)?;
        }
        Ok(())
    }

    fn indent(&self) -> String {
        "  ".repeat(self.depth as usize)
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::Op(op) => self.op(op),
            Step::Txn(steps) => {
                let (views, generation) = (self.views(), self.topo.generation());
                self.log.push(format!("{}begin", self.indent()));
                self.topo.begin().map_err(|e| fail(format!("begin failed: {e}")))?;
                self.depth += 1;
                for s in steps {
                    self.step(s)?;
                }
                self.depth -= 1;
                self.log.push(format!("{}commit", self.indent()));
                self.topo.commit().map_err(|e| fail(format!("commit failed: {e}")))?;
                if self.depth == 0 {
                    self.settled(&views, generation, None)
                } else {
                    self.unpublished(&views, generation)
                }
            }
        }
    }

    /// Inside a transaction nothing is published; new address spaces stay
    /// empty until the outermost commit.
    fn unpublished(&self, views: &Views, generation: u64) -> Result<(), TestCaseError> {
        let now = self.views();
        for (id, v) in &now {
            match views.get(id) {
                Some(old) => ensure!(
                    old.iter().map(Range::of).eq(v.iter().map(Range::of)),
                    "a view changed inside a transaction{}",
                    self.context()
                ),
                None => {
                    ensure!(v.is_empty(), "a new address space was populated inside a transaction{}", self.context())
                }
            }
        }
        ensure!(self.topo.generation() == generation, "the generation changed inside a transaction{}", self.context());
        self.check_listeners()
    }

    /// After a failed operation: no attribute, range or generation changed.
    fn unchanged(&self, attrs: &[Attrs], views: &Views, generation: u64) -> Result<(), TestCaseError> {
        ensure!(self.attrs() == attrs, "a failed operation changed the region tree{}", self.context());
        ensure!(same_views(&self.views(), views), "a failed operation changed a view{}", self.context());
        ensure!(self.topo.generation() == generation, "a failed operation bumped the generation{}", self.context());
        self.check_listeners()
    }

    fn op(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let (attrs, views, generation) = (self.attrs(), self.views(), self.topo.generation());
        let global_before = self.global_log.load(Ordering::SeqCst);
        // Whether the op can be a no-op that must not commit.
        let mut attr_op = true;
        let (what, result) = match op {
            Op::Add { parent, child, free, pos, prio } => {
                let p = self.parent(parent);
                let c = self.pick(child, !free, |r| r.container().is_none());
                let a = self.position(pos, Some(&p), &c);
                self.add(&p, &c, a, *prio)
            }
            Op::DelFromParent { child, any } => {
                let c = self.pick(child, *any, |r| r.container().is_some());
                let p = c.container().unwrap_or_else(|| self.all[SYS].clone());
                (format!("{}.del({})", p.name(), c.name()), p.del_subregion(&c))
            }
            Op::Del { parent, child } => {
                let p = self.parent(parent);
                let c = child.get(&self.all).clone();
                (format!("{}.del({})", p.name(), c.name()), p.del_subregion(&c))
            }
            Op::SetEnabled { region, on } => {
                let r = self.region(region);
                (format!("{}.set_enabled({on})", r.name()), r.set_enabled(*on))
            }
            Op::SetAddress { region, pos } => {
                let r = self.region(region);
                self.set_address(&r, pos)
            }
            Op::MoveRoot { space, pos } => match self.pick_space(space, |_| true) {
                Some(s) => {
                    let r = self.all[s.root].clone();
                    self.set_address(&r, pos)
                }
                None => return Ok(()),
            },
            Op::SetAliasOffset { region, any, offset } => {
                let r = self.pick(region, *any, MemoryRegion::is_alias);
                let within = r.alias_target().map_or(r.size(), |t| t.size());
                let o = alias_offset(*offset, within);
                (format!("{}.set_alias_offset({o:#x})", r.name()), r.set_alias_offset(o))
            }
            Op::SetReadonly { region, on } => {
                let r = self.region(region);
                (format!("{}.set_readonly({on})", r.name()), r.set_readonly(*on))
            }
            Op::SetRomd { region, any, on } => {
                let r = self.pick(region, *any, MemoryRegion::is_rom_device);
                (format!("{}.rom_device_set_readable({on})", r.name()), r.rom_device_set_readable(*on))
            }
            Op::SetLog { region, client, on } => {
                let r = self.region(region);
                let c = DirtyClient::ALL[*client as usize % 3];
                (format!("{}.set_log({on}, {c:?})", r.name()), r.set_log(*on, c))
            }
            Op::GlobalLog { on } => {
                attr_op = *on == global_before;
                self.global_log.store(*on, Ordering::SeqCst);
                let r = if *on { self.topo.global_dirty_log_start() } else { self.topo.global_dirty_log_stop() };
                (format!("global_dirty_log({on})"), r)
            }
            Op::SpaceInit { root, any } => {
                if self.spaces.iter().filter(|s| !s.destroyed).count() >= MAX_SPACES {
                    return Ok(());
                }
                attr_op = false;
                let cands: Vec<usize> = (0..self.all.len())
                    .filter(|&k| *any || self.all[k].is_alias() || self.holders.contains(&k))
                    .collect();
                let k = *root.get(&cands);
                let r = self.all[k].clone();
                self.named += 1;
                let name = format!("as{}:{}", self.named, r.name());
                match self.topo.address_space_init(&r, &name) {
                    Ok(asp) => {
                        self.register(asp, k)?;
                        (format!("address_space_init({}) -> {name}", r.name()), Ok(()))
                    }
                    Err(e) => (format!("address_space_init({})", r.name()), Err(e)),
                }
            }
            Op::SpaceDestroy { space } => {
                let live: Vec<usize> = (1..self.spaces.len()).filter(|&i| !self.spaces[i].destroyed).collect();
                if live.is_empty() {
                    return Ok(());
                }
                attr_op = false;
                let i = *space.get(&live);
                let r = self.topo.address_space_destroy(&self.spaces[i].asp);
                if r.is_ok() {
                    self.spaces[i].destroyed = true;
                }
                (format!("address_space_destroy({})", self.spaces[i].asp.name()), r)
            }
            Op::AdoptRoot { parent, space, pos, prio } => {
                let Some(s) = self.pick_space(space, |r| r.container().is_none()) else { return Ok(()) };
                let r = self.all[s.root].clone();
                let p = self.parent(parent);
                let a = self.position(pos, Some(&p), &r);
                self.add(&p, &r, a, *prio)
            }
            Op::OrphanRoot { space } => {
                let Some(s) = self.pick_space(space, |r| r.container().is_some()) else { return Ok(()) };
                let r = self.all[s.root].clone();
                let p = r.container().unwrap_or_else(|| self.all[SYS].clone());
                (format!("{}.del({})", p.name(), r.name()), p.del_subregion(&r))
            }
        };
        let outcome = match &result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("err: {e}"),
        };
        self.log.push(format!("{}{what} -> {outcome}", self.indent()));
        match result {
            Err(_) => {
                if matches!(op, Op::GlobalLog { .. }) {
                    self.global_log.store(global_before, Ordering::SeqCst);
                }
                self.unchanged(&attrs, &views, generation)
            }
            Ok(()) if self.depth > 0 => self.unpublished(&views, generation),
            Ok(()) => {
                let noop = attr_op && self.attrs() == attrs;
                self.settled(&views, generation, Some(noop))
            }
        }
    }

    fn set_address(&mut self, r: &MemoryRegion, pos: &Pos) -> (String, topos_runtime::Result<()>) {
        let parent = r.container();
        let a = self.position(pos, parent.as_ref(), r);
        let moved = parent.is_some() && r.addr() != a;
        let res = r.set_address(a);
        if res.is_ok() && moved {
            // A real move re-inserts: the region becomes the newest among
            // its equal-priority siblings.
            let prio = self.placed.get(&r.id()).map_or(0, |p| p.0);
            self.stamp(r, prio);
        }
        (format!("{}.set_address({a:#x})", r.name()), res)
    }

    /// After an outermost commit (explicit or implicit): generations, every
    /// view against the full render, the listeners and the diff replay.
    fn settled(&mut self, before: &Views, gen_before: u64, noop: Option<bool>) -> Result<(), TestCaseError> {
        let views = self.views();
        let generation = self.topo.generation();
        ensure!(generation >= gen_before, "generation went back from {gen_before} to {generation}{}", self.context());
        if !same_views(&views, before) {
            ensure!(
                generation > gen_before,
                "a view changed but the generation stayed at {generation}{}",
                self.context()
            );
        }
        if noop == Some(true) {
            ensure!(generation == gen_before, "a no-op mutation bumped the generation{}", self.context());
        }
        self.check_order()?;
        let model = Model::snapshot(&self.all, &self.placed, self.global_log.load(Ordering::SeqCst));
        let mut renders: HashMap<usize, Vec<Range>> = HashMap::new();
        self.check_listeners()?;
        let diff_errors = self.diffs.drain();
        ensure!(diff_errors.is_empty(), "diff replay errors: {diff_errors:#?}{}", self.context());
        for sp in &self.spaces {
            let view = sp.asp.view();
            let id = sp.asp.id();
            let name = sp.asp.name();
            if sp.destroyed {
                ensure!(view.is_empty(), "destroyed {name} still has ranges{}", self.context());
                for (who, rec, _) in &sp.listeners {
                    let map = rec.map(id);
                    ensure!(map.is_empty(), "the {who} of destroyed {name} still holds {map:?}{}", self.context());
                }
                let map = self.every.map(id);
                ensure!(
                    map.is_empty(),
                    "the global listener still holds {map:?} of destroyed {name}{}",
                    self.context()
                );
                ensure!(
                    !self.diffs.maps.contains_key(&id),
                    "the diff replay still holds destroyed {name}{}",
                    self.context()
                );
                continue;
            }
            let want = match renders.entry(sp.root) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let want = model.render(sp.root);
                    self.check_model(&model, sp, &want)?;
                    e.insert(want)
                }
            };
            self.check_view(sp, &view, want)?;
            let expected = entries(&view);
            let own = sp.listeners.iter().map(|(who, rec, _)| (*who, rec.map(id)));
            for (who, map) in own.chain([("global listener", self.every.map(id))]) {
                ensure!(
                    map == expected,
                    "the {who}'s replay differs from the view of {name}:\n  replayed {map:?}\n  expected {expected:?}{}",
                    self.context()
                );
            }
            let replayed = self.diffs.maps.get(&id).cloned().unwrap_or_default();
            let expected = diff_entries(&view);
            ensure!(
                replayed == expected,
                "the diff replay differs from the view of {name}:\n  replayed {replayed:?}\n  expected {expected:?}{}",
                self.context()
            );
        }
        for (i, a) in self.spaces.iter().enumerate().filter(|(_, s)| !s.destroyed) {
            for b in self.spaces[i + 1..].iter().filter(|s| !s.destroyed && s.root == a.root) {
                ensure!(
                    a.asp.shares_view_with(&b.asp),
                    "{} and {} have the same root but not the same view{}",
                    a.asp.name(),
                    b.asp.name(),
                    self.context()
                );
            }
        }
        // Destroyed address spaces are gone: unregister their listeners.
        for sp in self.spaces.iter().filter(|s| s.destroyed) {
            for (_, _, id) in &sp.listeners {
                self.topo.listener_unregister(*id).map_err(fail)?;
            }
            self.every.forget(sp.asp.id());
        }
        self.spaces.retain(|s| !s.destroyed);
        self.check_listeners()
    }

    fn check_listeners(&self) -> Result<(), TestCaseError> {
        let mut errors = self.every.take_errors();
        for sp in &self.spaces {
            for (_, rec, _) in &sp.listeners {
                errors.extend(rec.take_errors());
            }
        }
        ensure!(errors.is_empty(), "listener errors: {errors:#?}{}", self.context());
        Ok(())
    }

    /// §2.1: `subregions()` lists children in render order, each with the
    /// priority it was added with.
    fn check_order(&self) -> Result<(), TestCaseError> {
        for r in &self.all {
            let subs = r.subregions();
            let got: Vec<RegionId> = subs.iter().map(MemoryRegion::id).collect();
            let want = render_order(&subs, &self.placed);
            ensure!(got == want, "{} lists its subregions as {got:?}, expected {want:?}{}", r.name(), self.context());
            for c in &subs {
                let want = self.placed.get(&c.id()).map(|p| p.0);
                ensure!(
                    Some(c.priority()) == want,
                    "{} has priority {}, expected {want:?}{}",
                    c.name(),
                    c.priority(),
                    self.context()
                );
            }
        }
        Ok(())
    }

    /// The model's full render against the brute-force resolver, at the ends
    /// of (a sample of) its ranges and of the gaps next to them.
    fn check_model(&self, model: &Model, sp: &Space, want: &[Range]) -> Result<(), TestCaseError> {
        let stride = want.len().div_ceil(SAMPLES).max(1);
        let mut points = vec![0, u64::MAX as u128];
        for r in want.iter().step_by(stride) {
            points.extend([r.start, r.end - 1, r.start.saturating_sub(1)]);
            if r.end < SIZE_MAX {
                points.push(r.end);
            }
        }
        for x in points {
            let rendered = range_at(want, x).map(|r| r.hit(x));
            let resolved = model.resolve(sp.root, x);
            ensure!(
                rendered == resolved,
                "model self-check: in {} at {x:#x} the full render gives {rendered:?}, the resolver {resolved:?}{}",
                sp.asp.name(),
                self.context()
            );
        }
        Ok(())
    }

    /// The published view against the full render, range by range, and
    /// every range's ends and every gap's ends through the view's lookup.
    fn check_view(&self, sp: &Space, view: &FlatView, want: &[Range]) -> Result<(), TestCaseError> {
        let got: Vec<Range> = view.iter().map(Range::of).collect();
        if got != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
            let show = |v: &[Range]| -> String {
                v.iter()
                    .enumerate()
                    .skip(i.saturating_sub(2))
                    .take(6)
                    .map(|(k, r)| {
                        let name = self.all.iter().find(|m| m.id() == r.region).map_or("?", |m| m.name());
                        format!(
                            "\n    #{k} [{:#x},{:#x}) {name} off={:#x}{}{} mask={}",
                            r.start,
                            r.end,
                            r.offset,
                            if r.readonly { " ro" } else { "" },
                            if r.romd { "" } else { " !romd" },
                            r.mask
                        )
                    })
                    .collect()
            };
            return Err(fail(format!(
                "the view of {} ({} ranges) differs from a full render ({} ranges) from range #{i}:\n  view:{}\n  full \
                 render:{}{}",
                sp.asp.name(),
                got.len(),
                want.len(),
                show(&got),
                show(want),
                self.context()
            )));
        }
        ensure!(view.len() == want.len(), "{} says it has {} ranges, not {}", sp.asp.name(), view.len(), want.len());
        ensure!(
            view.ranges().iter().map(Range::of).eq(got.iter().cloned()),
            "{}: ranges() differs from iter(){}",
            sp.asp.name(),
            self.context()
        );
        let none = |x: u128| -> Result<(), TestCaseError> {
            let hit = view.lookup(x as u64).map(Range::of);
            ensure!(hit.is_none(), "{}: lookup({x:#x}) finds {hit:?} in a gap{}", sp.asp.name(), self.context());
            Ok(())
        };
        let mut prev_end = 0u128;
        for (i, r) in want.iter().enumerate() {
            if prev_end < r.start {
                none(prev_end)?;
                none(r.start - 1)?;
            }
            for x in [r.start, r.end - 1] {
                let hit = view.lookup(x as u64).map(Range::of);
                ensure!(
                    hit.as_ref() == Some(r),
                    "{}: lookup({x:#x}) finds {hit:?}, not {r:?}{}",
                    sp.asp.name(),
                    self.context()
                );
                let idx = view.lookup_index(x as u64);
                ensure!(
                    idx == Some(i),
                    "{}: lookup_index({x:#x}) is {idx:?}, not {i}{}",
                    sp.asp.name(),
                    self.context()
                );
            }
            prev_end = r.end;
        }
        if prev_end < SIZE_MAX {
            none(prev_end)?;
            none(u64::MAX as u128)?;
        }
        Ok(())
    }
}

/// 256 cases (about 18 s in a debug build), or `PROPTEST_CASES`; up to 4096
/// shrinking steps (enough for a failing case to shrink to a handful of
/// regions and steps), or `PROPTEST_MAX_SHRINK_ITERS`.
fn config() -> ProptestConfig {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    ProptestConfig {
        cases: var("PROPTEST_CASES").unwrap_or(256),
        max_shrink_iters: var("PROPTEST_MAX_SHRINK_ITERS").unwrap_or(4096),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn incremental_views_match_a_full_render(build in build_strategy(), steps in steps_strategy()) {
        let mut h = Harness::new(&build)?;
        h.run(&steps)?;
    }
}

/// The generator still produces what the property test is for: views of
/// several chunks and address spaces whose root is a subregion. Checked on
/// a fixed sample of 32 initial trees (each also checked like a case).
#[test]
fn generated_trees_are_large() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
    let mut runner =
        TestRunner::new_with_rng(ProptestConfig::default(), TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let (mut chunked, mut large, mut rooted_below) = (0, 0, 0);
    for _ in 0..32 {
        let build = build_strategy().new_tree(&mut runner).unwrap().current();
        let h = Harness::new(&build).unwrap_or_else(|e| panic!("{e}"));
        let most = h.spaces.iter().map(|s| s.asp.view().len()).max().unwrap_or(0);
        chunked += (most > 64) as u32;
        large += (most > 128) as u32;
        rooted_below += h.spaces.iter().any(|s| h.all[s.root].container().is_some()) as u32;
    }
    assert!(chunked >= 12, "only {chunked} of 32 trees have a view of more than 64 ranges");
    assert!(large >= 5, "only {large} of 32 trees have a view of more than 128 ranges");
    assert!(rooted_below >= 16, "only {rooted_below} of 32 trees have an address space rooted at a subregion");
}
