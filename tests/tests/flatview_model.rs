//! Model-based property test of flattening (semantics.md §2) and of the
//! listener diffs (§3).
//!
//! A random pool of regions (RAM, I/O, ROM devices, containers, aliases) is
//! shown by two address spaces: "memory", over a root container (or I/O
//! region) that the pool is added into, and "window", over an alias onto a
//! pool region (which exercises the "physical root" shortcut). The tree is
//! mutated by random operations (adds with priorities, deletes,
//! enable/readonly/romd toggles, moves, alias offsets), some grouped in
//! nested transactions and some deliberate misuse that must fail and change
//! nothing. After every outermost commit each published FlatView is
//! compared, address by address, with a brute-force resolver that walks the
//! region tree directly; each view must be sorted, disjoint and maximally
//! merged; recording listeners that apply `region_add`/`region_del` to their
//! own maps must reproduce the view exactly (on "memory" one that declines
//! `region_nop`, so the runtime diffs only re-rendered windows; on "window"
//! also one that wants it, so everything is diffed);
//! and generation numbers must behave. Inside a transaction nothing may be
//! published.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use topos_runtime::{
    AddressSpace, FlatView, HwAddr, ListenerResult, MemoryListener, MemoryRegion, MemoryRegionOps, MemoryRegionSection,
    OpsConfig, RegionId, Topology,
};
use topos_tests::SpaceReplay;

/// Every size, address and offset is a multiple of this, so every boundary
/// of the view is too.
const BLOCK: u64 = 0x100;
/// Size of the root, in blocks.
const ROOT_BLOCKS: u64 = 0x40;
const ROOT_SIZE: u64 = ROOT_BLOCKS * BLOCK;
/// Largest pool region, in blocks: larger than the root, so that clipping
/// at the root's end matters.
const MAX_BLOCKS: u64 = 0x50;

/// Device callbacks that do nothing: only the topology matters here.
struct NullOps;

impl MemoryRegionOps for NullOps {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        0
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {}
}

// ----- the recording listener ------------------------------------------------

/// What the listener remembers of one section: region, size, offset,
/// readonly, and for ROM devices the romd mode. Sections do not carry the
/// romd mode; the listener reads it from the region when the section is
/// added, which is after the commit's changes and before any later ones, so
/// a romd toggle that was not sent as `region_del` + `region_add` (§2.5)
/// leaves a stale entry behind.
type Entry = (RegionId, u128, u64, bool, Option<bool>);

#[derive(Default)]
struct RecState {
    /// The replayed view.
    space: SpaceReplay<Entry>,
    /// Inside `begin` .. `commit`.
    in_commit: bool,
    /// Protocol violations seen so far.
    errors: Vec<String>,
}

/// Applies `region_add`/`region_del` to its own map and records anything
/// that breaks the protocol: a delete of a range it does not hold, an add
/// overlapping a held range, a delete after an add in one commit, sections
/// out of address order, or callbacks outside `begin`/`commit`.
///
/// A "quiet" recorder declines `region_nop`, which lets the runtime diff
/// only the windows a commit re-rendered; it must replay to the same view.
/// (Only where no listener of the address space wants `region_nop`: one
/// that does makes the runtime diff everything for all of them.)
#[derive(Default)]
struct Recorder(Mutex<RecState>, bool);

impl Recorder {
    fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap().errors)
    }

    fn map(&self) -> BTreeMap<u64, Entry> {
        self.0.lock().unwrap().space.view()
    }
}

fn section_entry(s: &MemoryRegionSection) -> Option<Entry> {
    s.mr.as_ref()
        .map(|mr| (mr.id(), s.size, s.offset_within_region, s.readonly, mr.is_rom_device().then(|| mr.is_romd())))
}

impl MemoryListener for Recorder {
    fn wants_region_nop(&self) -> bool {
        !self.1
    }

    fn begin(&self) -> ListenerResult {
        let mut st = self.0.lock().unwrap();
        if st.in_commit {
            st.errors.push("begin inside begin/commit".into());
        }
        st.in_commit = true;
        st.space.begin();
        Ok(())
    }

    fn commit(&self) -> ListenerResult {
        let mut st = self.0.lock().unwrap();
        if !st.in_commit {
            st.errors.push("commit without begin".into());
        }
        st.in_commit = false;
        Ok(())
    }

    fn region_add(&self, s: &MemoryRegionSection) -> ListenerResult {
        let mut st = self.0.lock().unwrap();
        let st = &mut *st;
        let start = s.offset_within_address_space;
        let Some(e) = section_entry(s) else {
            st.errors.push(format!("region_add at {start:#x} without a region"));
            return Ok(());
        };
        if !st.in_commit {
            st.errors.push(format!("region_add at {start:#x} outside begin/commit"));
        }
        st.space.add(start, s.size, e, &mut st.errors, &format!("at {start:#x}"));
        Ok(())
    }

    fn region_del(&self, s: &MemoryRegionSection) -> ListenerResult {
        let mut st = self.0.lock().unwrap();
        let st = &mut *st;
        let start = s.offset_within_address_space;
        let Some(e) = section_entry(s) else {
            st.errors.push(format!("region_del at {start:#x} without a region"));
            return Ok(());
        };
        if !st.in_commit {
            st.errors.push(format!("region_del at {start:#x} outside begin/commit"));
        }
        // The romd mode may already be the new one: leave it out.
        let same = |held: &Entry, e: &Entry| held.0 == e.0 && held.1 == e.1 && held.2 == e.2 && held.3 == e.3;
        st.space.del(start, &e, same, &mut st.errors, &format!("at {start:#x}"));
        Ok(())
    }
}

// ----- the brute-force reference -------------------------------------------

enum NodeKind {
    /// RAM, I/O or ROM device; `romd` is `Some` for ROM devices only.
    Terminating {
        romd: Option<bool>,
    },
    Container,
    Alias {
        target: usize,
        offset: u64,
    },
}

struct Node {
    id: RegionId,
    size: u128,
    addr: u64,
    enabled: bool,
    readonly: bool,
    kind: NodeKind,
    /// In render order (§2.1), worked out by the harness.
    children: Vec<usize>,
}

/// A plain copy of the region tree, read through the public queries only.
struct Model {
    nodes: Vec<Node>,
}

/// Where one address resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hit {
    region: RegionId,
    offset: u128,
    readonly: bool,
    /// The romd flag, for ROM devices only.
    romd: Option<bool>,
}

impl Model {
    /// `all` holds every region. Children are put in render
    /// order from `placed` (priority and insertion stamp of each child),
    /// not taken from the runtime's order.
    fn snapshot(all: &[MemoryRegion], placed: &HashMap<RegionId, (i32, u64)>) -> Model {
        let index: HashMap<RegionId, usize> = all.iter().enumerate().map(|(i, r)| (r.id(), i)).collect();
        let nodes = all
            .iter()
            .map(|r| {
                let kind = if let Some(t) = r.alias_target() {
                    NodeKind::Alias { target: index[&t.id()], offset: r.alias_offset() }
                } else if r.is_container() {
                    NodeKind::Container
                } else {
                    NodeKind::Terminating { romd: r.is_rom_device().then(|| r.is_romd()) }
                };
                Node {
                    id: r.id(),
                    size: r.size(),
                    addr: r.addr(),
                    enabled: r.is_enabled(),
                    readonly: r.is_readonly(),
                    kind,
                    children: render_order(&r.subregions(), placed).iter().map(|c| index[c]).collect(),
                }
            })
            .collect();
        Model { nodes }
    }

    /// Resolves `x` in the address space whose root is `all[root]`.
    fn lookup(&self, root: usize, x: u64) -> Option<Hit> {
        self.resolve(root, 0, x as i128, false)
    }

    fn resolve(&self, i: usize, base: i128, x: i128, readonly: bool) -> Option<Hit> {
        let n = &self.nodes[i];
        if !n.enabled {
            return None;
        }
        let base = base + n.addr as i128;
        let readonly = readonly || n.readonly;
        if x < base || x >= base + n.size as i128 {
            return None;
        }
        if let NodeKind::Alias { target, offset } = n.kind {
            let tbase = base - self.nodes[target].addr as i128 - offset as i128;
            return self.resolve(target, tbase, x, readonly);
        }
        for &c in &n.children {
            if let Some(h) = self.resolve(c, base, x, readonly) {
                return Some(h);
            }
        }
        match n.kind {
            NodeKind::Terminating { romd } => Some(Hit { region: n.id, offset: (x - base) as u128, readonly, romd }),
            _ => None,
        }
    }
}

/// §2.1: priority descending, and among equal priorities the most recently
/// inserted first.
fn render_order(children: &[MemoryRegion], placed: &HashMap<RegionId, (i32, u64)>) -> Vec<RegionId> {
    let mut ids: Vec<RegionId> = children.iter().map(MemoryRegion::id).collect();
    ids.sort_by_key(|id| placed.get(id).map(|&(prio, stamp)| (std::cmp::Reverse(prio), std::cmp::Reverse(stamp))));
    ids
}

fn view_lookup(view: &FlatView, x: u64) -> Option<Hit> {
    view.lookup(x).map(|fr| Hit {
        region: fr.region().id(),
        offset: fr.offset_in_region() as u128 + (x - fr.start()) as u128,
        readonly: fr.readonly(),
        romd: fr.region().is_rom_device().then(|| fr.romd()),
    })
}

/// Everything a FlatRange carries, for comparisons.
type RangeKey = (u64, u128, RegionId, u64, bool, bool, u8);

fn view_key(view: &FlatView) -> Vec<RangeKey> {
    view.ranges()
        .iter()
        .map(|r| {
            (r.start(), r.size(), r.region().id(), r.offset_in_region(), r.readonly(), r.romd(), r.dirty_log_mask())
        })
        .collect()
}

fn describe_view(view: &FlatView) -> String {
    view.ranges().iter().map(|r| format!("\n  {r:?}")).collect()
}

// ----- generated inputs ----------------------------------------------------

#[derive(Debug, Clone)]
enum Kind {
    Ram,
    Io,
    Container,
    RomDevice,
    /// Onto an earlier pool region; the offset is reduced modulo the target.
    Alias {
        target: Index,
        offset: u16,
    },
}

/// Where to put a subregion.
#[derive(Debug, Clone)]
enum Pos {
    /// Reduced to a block-aligned address in (or just past) the container.
    Raw(u16),
    /// Lined up with a sibling that shows the same memory (the child's alias
    /// target, another alias of it, or an alias of the child), so that both
    /// map the same offsets at the same addresses: this is what makes
    /// adjacent ranges of one region mergeable (§2.4). Falls back to `Raw`
    /// when there is no such sibling.
    Lined(u16),
    /// Address 0, where a lone child can stand in for the root.
    Zero,
}

#[derive(Debug, Clone)]
enum Op {
    /// `parent` `None` is the root; `free` prefers children without a
    /// parent; `prio` `None` uses `add_subregion`.
    Add {
        parent: Option<Index>,
        child: Index,
        free: bool,
        addr: Pos,
        prio: Option<i32>,
    },
    /// Deletes a child from its actual container (or, if it has none, from
    /// the root, which fails); unless `any`, prefers a child that has one.
    DelFromParent {
        child: Index,
        any: bool,
    },
    /// Deletes from an arbitrary region (usually fails).
    Del {
        parent: Option<Index>,
        child: Index,
    },
    SetEnabled {
        region: Option<Index>,
        on: bool,
    },
    SetAddress {
        region: Index,
        addr: Pos,
    },
    /// `any` picks from every region, not just aliases (then usually fails).
    SetAliasOffset {
        region: Index,
        any: bool,
        offset: u16,
    },
    SetReadonly {
        region: Option<Index>,
        on: bool,
    },
    /// `any` picks from every region, not just ROM devices.
    SetRomd {
        region: Index,
        any: bool,
        on: bool,
    },
}

#[derive(Debug, Clone)]
enum Step {
    Op(Op),
    /// `begin`, the steps, `commit`.
    Txn(Vec<Step>),
    /// A `commit` without `begin`: must fail and change nothing.
    StrayCommit,
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::Ram),
        2 => Just(Kind::Io),
        2 => Just(Kind::Container),
        1 => Just(Kind::RomDevice),
        3 => (any::<Index>(), any::<u16>()).prop_map(|(target, offset)| Kind::Alias { target, offset }),
    ]
}

fn pos_strategy() -> impl Strategy<Value = Pos> {
    prop_oneof![
        4 => any::<u16>().prop_map(Pos::Raw),
        2 => any::<u16>().prop_map(Pos::Lined),
        1 => Just(Pos::Zero),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let region = || prop::option::weighted(0.9, any::<Index>());
    prop_oneof![
        6 => (prop::option::weighted(0.4, any::<Index>()), any::<Index>(), prop::bool::weighted(0.8), pos_strategy(),
              prop::option::of(-2i32..=2))
            .prop_map(|(parent, child, free, addr, prio)| Op::Add { parent, child, free, addr, prio }),
        2 => (any::<Index>(), prop::bool::weighted(0.1)).prop_map(|(child, any)| Op::DelFromParent { child, any }),
        1 => (prop::option::weighted(0.3, any::<Index>()), any::<Index>())
            .prop_map(|(parent, child)| Op::Del { parent, child }),
        // Rarely the root: a disabled root hides everything until re-enabled.
        2 => (prop::option::weighted(0.97, any::<Index>()), prop::bool::weighted(0.6))
            .prop_map(|(region, on)| Op::SetEnabled { region, on }),
        2 => (any::<Index>(), pos_strategy()).prop_map(|(region, addr)| Op::SetAddress { region, addr }),
        2 => (any::<Index>(), prop::bool::weighted(0.1), any::<u16>())
            .prop_map(|(region, any, offset)| Op::SetAliasOffset { region, any, offset }),
        2 => (region(), any::<bool>()).prop_map(|(region, on)| Op::SetReadonly { region, on }),
        1 => (any::<Index>(), prop::bool::weighted(0.1), any::<bool>())
            .prop_map(|(region, any, on)| Op::SetRomd { region, any, on }),
    ]
}

/// The alias that the "window" address space is rooted at.
#[derive(Debug, Clone)]
struct Window {
    /// A pool region.
    target: Index,
    /// Reduced like an alias offset.
    offset: u16,
    /// `None`: the target's size.
    blocks: Option<u64>,
}

fn window_strategy() -> impl Strategy<Value = Window> {
    (any::<Index>(), any::<u16>(), prop::option::of(1..=MAX_BLOCKS)).prop_map(|(target, offset, blocks)| Window {
        target,
        offset,
        blocks,
    })
}

/// Compares views by content.
fn same_views(a: &Views, b: &Views) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| view_key(x) == view_key(y))
}

/// A few adds into the root first, so that most steps see a populated view.
fn setup_strategy() -> impl Strategy<Value = Vec<Step>> {
    let add = (any::<Index>(), pos_strategy(), prop::option::of(-2i32..=2))
        .prop_map(|(child, addr, prio)| Step::Op(Op::Add { parent: None, child, free: true, addr, prio }));
    prop::collection::vec(add, 1..6)
}

fn steps_strategy() -> impl Strategy<Value = Vec<Step>> {
    let inner = prop::collection::vec(op_strategy().prop_map(Step::Op), 0..4).prop_map(Step::Txn);
    let txn =
        prop::collection::vec(prop_oneof![3 => op_strategy().prop_map(Step::Op), 1 => inner], 1..5).prop_map(Step::Txn);
    let step = prop_oneof![
        12 => op_strategy().prop_map(Step::Op),
        2 => txn,
        1 => Just(Step::StrayCommit),
    ];
    prop::collection::vec(step, 1..30)
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
type Attrs = (Option<RegionId>, u64, i32, bool, bool, u64, bool, Vec<RegionId>);

/// An address space under test.
struct Space {
    asp: AddressSpace,
    /// Index of its root in `Harness::all`.
    root: usize,
    /// A recorder that wants `region_nop` ("window" only, so that "memory"
    /// is diffed by re-rendered windows).
    rec: Option<Arc<Recorder>>,
    /// A recorder declining `region_nop`.
    quiet: Arc<Recorder>,
}

/// Index in `Harness::all` of the "memory" root and of the "window" alias;
/// the pool follows.
const ROOT: usize = 0;
const WINDOW: usize = 1;
const POOL: usize = 2;

struct Harness {
    topo: Topology,
    spaces: Vec<Space>,
    /// The root, the window, then the pool.
    all: Vec<MemoryRegion>,
    depth: u32,
    /// Priority and insertion stamp of every region that is a subregion.
    placed: HashMap<RegionId, (i32, u64)>,
    clock: u64,
    /// What the steps so far did, for failure messages.
    log: Vec<String>,
}

/// `raw` reduced to a block-aligned address in `[0, within + BLOCK]`.
fn place(raw: u16, within: u128) -> u64 {
    (raw as u64 % (within as u64 / BLOCK + 2)) * BLOCK
}

/// `raw` reduced to an alias offset into a target of size `within`; a
/// quarter of the values give 0, the offset at which an alias that covers
/// its target can stand in for it.
fn alias_offset(raw: u16, within: u128) -> u64 {
    if raw % 4 == 0 {
        0
    } else {
        place(raw / 4, within)
    }
}

/// All views, in address-space order.
type Views = Vec<Arc<FlatView>>;

impl Harness {
    fn new(root_io: bool, specs: &[(Kind, u64)], window: &Window) -> Harness {
        let topo = Topology::new();
        let root = if root_io {
            topo.new_io("root", NullOps, OpsConfig::default(), ROOT_SIZE as u128)
        } else {
            topo.new_container("root", ROOT_SIZE as u128)
        }
        .unwrap();
        let memory = topo.address_space_init(&root, "memory").unwrap();
        let mut pool: Vec<MemoryRegion> = Vec::new();
        for (i, (kind, blocks)) in specs.iter().enumerate() {
            let size = (blocks * BLOCK) as u128;
            let r = match kind {
                Kind::Ram => topo.new_ram(&format!("ram{i}"), size),
                Kind::Alias { .. } if pool.is_empty() => topo.new_ram(&format!("ram{i}"), size),
                Kind::Io => topo.new_io(&format!("io{i}"), NullOps, OpsConfig::default(), size),
                Kind::Container => topo.new_container(&format!("cont{i}"), size),
                Kind::RomDevice => topo.new_rom_device(&format!("romd{i}"), NullOps, OpsConfig::default(), size),
                Kind::Alias { target, offset } => {
                    let t = target.get(&pool);
                    let offset = alias_offset(*offset, t.size());
                    topo.new_alias(&format!("alias{i}->{}", t.name()), t, offset, size)
                }
            };
            pool.push(r.unwrap());
        }
        let target = window.target.get(&pool);
        let size = window.blocks.map_or(target.size(), |b| (b * BLOCK) as u128);
        let offset = alias_offset(window.offset, target.size());
        let win = topo.new_alias(&format!("window->{}", target.name()), target, offset, size).unwrap();
        let win_space = topo.address_space_init(&win, "window").unwrap();
        let mut spaces = Vec::new();
        for (asp, root) in [(memory, ROOT), (win_space, WINDOW)] {
            let rec = (root == WINDOW).then(|| Arc::new(Recorder::default()));
            if let Some(rec) = &rec {
                topo.listener_register(rec.clone(), 0, Some(&asp)).unwrap();
            }
            let quiet = Arc::new(Recorder(Mutex::default(), true));
            topo.listener_register(quiet.clone(), 1, Some(&asp)).unwrap();
            spaces.push(Space { asp, root, rec, quiet });
        }
        let mut all = vec![root, win];
        all.extend(pool);
        Harness { topo, spaces, all, depth: 0, placed: HashMap::new(), clock: 0, log: Vec::new() }
    }

    fn root(&self) -> &MemoryRegion {
        &self.all[ROOT]
    }

    /// The regions that are moved around the tree.
    fn pool(&self) -> &[MemoryRegion] {
        &self.all[POOL..]
    }

    /// The pool and the window: regions whose attributes change. (The
    /// window never gets a container: QEMU does not re-render when a
    /// parentless region, or a child of a disabled one, is moved, so an
    /// address space over it would keep a stale view on purpose.)
    fn tweakable(&self) -> &[MemoryRegion] {
        &self.all[WINDOW..]
    }

    /// A region of `from`; unless `any`, one satisfying `pred` if there is
    /// one.
    fn pick(from: &[MemoryRegion], idx: &Index, any: bool, pred: impl Fn(&MemoryRegion) -> bool) -> MemoryRegion {
        let cands: Vec<&MemoryRegion> = from.iter().filter(|r| any || pred(r)).collect();
        if cands.is_empty() {
            idx.get(from).clone()
        } else {
            (*idx.get(&cands)).clone()
        }
    }

    /// `None` is the root, otherwise a region of `from`.
    fn root_or(&self, from: &[MemoryRegion], idx: &Option<Index>) -> MemoryRegion {
        match idx {
            None => self.root().clone(),
            Some(i) => i.get(from).clone(),
        }
    }

    fn views(&self) -> Views {
        self.spaces.iter().map(|s| s.asp.view()).collect()
    }

    /// An address for `child` in `parent`.
    fn position(&self, pos: &Pos, parent: &MemoryRegion, child: &MemoryRegion) -> u64 {
        let raw = match pos {
            Pos::Raw(raw) => return place(*raw, parent.size()),
            Pos::Zero => return 0,
            Pos::Lined(raw) => *raw,
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
            place(raw, parent.size())
        } else {
            lined[raw as usize % lined.len()]
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
                    r.subregions().iter().map(MemoryRegion::id).collect(),
                )
            })
            .collect()
    }

    fn context(&self) -> String {
        let mut s = format!("\nsteps:\n  {}", self.log.join("\n  "));
        for sp in &self.spaces {
            s += &format!("\nview of {}:{}", sp.asp.name(), describe_view(&sp.asp.view()));
        }
        s
    }

    fn run(&mut self, steps: &[Step]) -> Result<(), TestCaseError> {
        self.settled(&self.views(), self.topo.generation(), None)?;
        for s in steps {
            self.step(s)?;
        }
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::Op(op) => self.op(op),
            Step::Txn(steps) => {
                let (views, generation) = (self.views(), self.topo.generation());
                self.log.push(format!("{}begin", "  ".repeat(self.depth as usize)));
                self.topo.begin().map_err(|e| TestCaseError::fail(format!("begin failed: {e}")))?;
                self.depth += 1;
                for s in steps {
                    self.step(s)?;
                }
                self.depth -= 1;
                self.log.push(format!("{}commit", "  ".repeat(self.depth as usize)));
                self.topo.commit().map_err(|e| TestCaseError::fail(format!("commit failed: {e}")))?;
                if self.depth == 0 {
                    self.settled(&views, generation, None)
                } else {
                    self.unpublished(&views, generation)
                }
            }
            Step::StrayCommit => {
                let (attrs, views, generation) = (self.attrs(), self.views(), self.topo.generation());
                self.log.push("stray commit".into());
                let r = self.topo.commit();
                ensure!(r.is_err(), "a commit without begin succeeded{}", self.context());
                self.unchanged(&attrs, &views, generation)
            }
        }
    }

    /// Inside a transaction nothing is published.
    fn unpublished(&self, views: &Views, generation: u64) -> Result<(), TestCaseError> {
        ensure!(same_views(&self.views(), views), "a view changed inside a transaction{}", self.context());
        ensure!(self.topo.generation() == generation, "the generation changed inside a transaction{}", self.context());
        self.check_listener()
    }

    /// After a failed operation: no attribute, range or generation changed.
    fn unchanged(&self, attrs: &[Attrs], views: &Views, generation: u64) -> Result<(), TestCaseError> {
        ensure!(self.attrs() == attrs, "a failed operation changed the region tree{}", self.context());
        ensure!(same_views(&self.views(), views), "a failed operation changed a view{}", self.context());
        ensure!(self.topo.generation() == generation, "a failed operation bumped the generation{}", self.context());
        self.check_listener()
    }

    fn op(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let (attrs, views, generation) = (self.attrs(), self.views(), self.topo.generation());
        let (what, result) = match op {
            Op::Add { parent, child, free, addr, prio } => {
                let p = self.root_or(self.pool(), parent);
                let c = Self::pick(self.pool(), child, !free, |r| r.container().is_none());
                let a = self.position(addr, &p, &c);
                let r = match prio {
                    None => p.add_subregion(a, &c),
                    Some(pr) => p.add_subregion_overlap(a, &c, *pr),
                };
                if r.is_ok() {
                    self.clock += 1;
                    self.placed.insert(c.id(), (prio.unwrap_or(0), self.clock));
                }
                (format!("{}.add({:#x}, {}, prio {prio:?})", p.name(), a, c.name()), r)
            }
            Op::DelFromParent { child, any } => {
                let c = Self::pick(self.pool(), child, *any, |r| r.container().is_some());
                let p = c.container().unwrap_or_else(|| self.root().clone());
                (format!("{}.del({})", p.name(), c.name()), p.del_subregion(&c))
            }
            Op::Del { parent, child } => {
                let p = self.root_or(self.pool(), parent);
                let c = child.get(self.pool()).clone();
                (format!("{}.del({})", p.name(), c.name()), p.del_subregion(&c))
            }
            Op::SetEnabled { region, on } => {
                let r = self.root_or(self.tweakable(), region);
                (format!("{}.set_enabled({on})", r.name()), r.set_enabled(*on))
            }
            Op::SetAddress { region, addr } => {
                // The root is never moved: QEMU stores a parentless region's
                // address without re-rendering, which would leave the view
                // stale on purpose.
                let r = region.get(self.pool()).clone();
                let a = match r.container() {
                    Some(p) => self.position(addr, &p, &r),
                    None => self.position(addr, self.root(), &r),
                };
                let moved = r.container().is_some() && r.addr() != a;
                let res = r.set_address(a);
                if res.is_ok() && moved {
                    // A real move re-inserts: the region becomes the newest
                    // among its equal-priority siblings.
                    self.clock += 1;
                    if let Some(p) = self.placed.get_mut(&r.id()) {
                        p.1 = self.clock;
                    }
                }
                (format!("{}.set_address({a:#x})", r.name()), res)
            }
            Op::SetAliasOffset { region, any, offset } => {
                let r = Self::pick(self.tweakable(), region, *any, MemoryRegion::is_alias);
                let within = r.alias_target().map_or(r.size(), |t| t.size());
                let o = alias_offset(*offset, within);
                (format!("{}.set_alias_offset({o:#x})", r.name()), r.set_alias_offset(o))
            }
            Op::SetReadonly { region, on } => {
                let r = self.root_or(self.tweakable(), region);
                (format!("{}.set_readonly({on})", r.name()), r.set_readonly(*on))
            }
            Op::SetRomd { region, any, on } => {
                let r = Self::pick(self.tweakable(), region, *any, MemoryRegion::is_rom_device);
                (format!("{}.rom_device_set_readable({on})", r.name()), r.rom_device_set_readable(*on))
            }
        };
        let outcome = match &result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("err: {e}"),
        };
        self.log.push(format!("{}{what} -> {outcome}", "  ".repeat(self.depth as usize)));
        match result {
            Err(_) => self.unchanged(&attrs, &views, generation),
            Ok(()) if self.depth > 0 => self.unpublished(&views, generation),
            Ok(()) => {
                let noop = self.attrs() == attrs;
                self.settled(&views, generation, Some(noop))
            }
        }
    }

    /// After an outermost commit (explicit or implicit): generations, the
    /// view against the reference, the view's shape, and the listener.
    fn settled(&self, before: &Views, gen_before: u64, noop: Option<bool>) -> Result<(), TestCaseError> {
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
        let model = Model::snapshot(&self.all, &self.placed);
        for (sp, view) in self.spaces.iter().zip(&views) {
            self.check_shape(sp, view)?;
            self.check_reference(&model, sp, view)?;
        }
        self.check_listener()?;
        for (sp, view, replayed) in self.spaces.iter().zip(&views).flat_map(|(sp, view)| {
            sp.rec.iter().chain([&sp.quiet]).map(move |rec| (sp, view, rec.map())).collect::<Vec<_>>()
        }) {
            let expected: BTreeMap<u64, Entry> = view
                .ranges()
                .iter()
                .map(|r| {
                    let romd = r.region().is_rom_device().then(|| r.romd());
                    (r.start(), (r.region().id(), r.size(), r.offset_in_region(), r.readonly(), romd))
                })
                .collect();
            ensure!(
                replayed == expected,
                "the listener's replay differs from the view of {}:\n  replayed {replayed:?}\n  expected {expected:?}{}",
                sp.asp.name(),
                self.context()
            );
        }
        Ok(())
    }

    fn check_listener(&self) -> Result<(), TestCaseError> {
        for sp in &self.spaces {
            let mut errors = sp.quiet.take_errors();
            errors.extend(sp.rec.iter().flat_map(|r| r.take_errors()));
            ensure!(errors.is_empty(), "listener errors in {}: {errors:#?}{}", sp.asp.name(), self.context());
        }
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

    /// Sorted, disjoint, maximally merged, only terminating regions, all
    /// within the root.
    fn check_shape(&self, sp: &Space, view: &FlatView) -> Result<(), TestCaseError> {
        let ranges = view.ranges();
        let limit = self.all[sp.root].size();
        for r in ranges {
            ensure!(
                !r.region().is_container() && !r.region().is_alias(),
                "range {r:?} is served by a non-terminating region{}",
                self.context()
            );
            ensure!(r.end() <= limit, "range {r:?} lies outside the root of {}{}", sp.asp.name(), self.context());
        }
        for w in ranges.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            ensure!(a.end() <= b.start() as u128, "ranges {a:?} and {b:?} are unsorted or overlap{}", self.context());
            let mergeable = a.end() == b.start() as u128
                && a.region() == b.region()
                && a.offset_in_region() as u128 + a.size() == b.offset_in_region() as u128
                && a.readonly() == b.readonly()
                && a.romd() == b.romd()
                && a.dirty_log_mask() == b.dirty_log_mask();
            ensure!(!mergeable, "ranges {a:?} and {b:?} should have been merged{}", self.context());
        }
        Ok(())
    }

    /// Every block's first and last byte up to just past the root's end,
    /// and every range's ends, resolve the same in the view and in the
    /// brute-force reference. Since every boundary is block-aligned, this
    /// covers every address.
    fn check_reference(&self, model: &Model, sp: &Space, view: &FlatView) -> Result<(), TestCaseError> {
        let blocks = self.all[sp.root].size() as u64 / BLOCK;
        let mut points: Vec<u64> = (0..=blocks + 1).flat_map(|k| [k * BLOCK, k * BLOCK + BLOCK - 1]).collect();
        points.extend(view.ranges().iter().flat_map(|r| [r.start(), r.last()]));
        points.push(u64::MAX);
        for x in points {
            let got = view_lookup(view, x);
            let want = model.lookup(sp.root, x);
            ensure!(
                got == want,
                "at {x:#x} the view of {} gives {got:?} but the reference {want:?}{}",
                sp.asp.name(),
                self.context()
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(topos_tests::proptest_cases(1000)))]

    #[test]
    fn flatview_matches_brute_force_and_listener_replay(
        root_io in prop::bool::weighted(0.2),
        specs in prop::collection::vec((kind_strategy(), 1..=MAX_BLOCKS), 6..=10),
        window in window_strategy(),
        setup in setup_strategy(),
        steps in steps_strategy(),
    ) {
        let mut h = Harness::new(root_io, &specs, &window);
        h.run(&setup)?;
        h.run(&steps)?;
    }
}
