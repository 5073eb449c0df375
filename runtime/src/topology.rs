//! The topology actor: owner of the region tree, serializer of transactions,
//! renderer and publisher of FlatViews, caller of listeners.
//!
//! # How the actor runs
//! The actor's state is only ever touched by the thread that holds the
//! actor's *turn*. A transaction takes the turn at its outermost `begin` and
//! gives it back after its outermost `commit` has rendered, diffed, run the
//! listeners and published; a single mutator outside a transaction takes it
//! for just that change. Other threads that want to change the topology wait
//! for the turn, so the result of concurrent transactions is always that of
//! some serial order, and each commit that changes anything gets the next
//! generation number. Running the actor's work on the calling thread (rather
//! than handing each mutation to a dedicated thread) keeps misuse errors
//! synchronous and costs no thread hop; the serialisation is the same.
//!
//! Readers never take the turn: guest accesses load the published views.

use crate::address_space::{AddressSpace, AsEventfd, AsInner, EventfdSet};
use crate::error::{Error, Result};
use crate::flatview::{physical_root, render, render_window, FlatRange, FlatView, Placements};
use crate::listener::{
    CommitDiff, DiffSubscriber, EventfdRecord, ListenerEntry, ListenerId, Listeners, MemoryListener,
    MemoryRegionSection, RangeRecord, Snapshot, SpaceDiff,
};
use crate::ops::{MemoryRegionOps, OpsConfig, RegionOps};
use crate::ram::RamBlock;
use crate::region::{check_size, MemoryRegion, RegionId, RegionKind};
use crate::sync::{
    current_thread_id, thread_local, Arc, AtomicBool, AtomicU64, Condvar, Mutex, Ordering, Rcu, ThreadId,
};
use crate::types::HwAddr;
use std::collections::HashMap;
use std::ptr::NonNull;

/// The hook that drains a coalesced-MMIO ring (installed by a backend).
pub type FlushHook = Arc<dyn Fn() + Send + Sync>;

/// State shared with regions and address spaces on the lock-free paths.
pub(crate) struct TopoShared {
    pub(crate) global_dirty: AtomicBool,
    pub(crate) flush_hook: Rcu<Option<FlushHook>>,
    pub(crate) generation: AtomicU64,
    pub(crate) diffs: tokio::sync::broadcast::Sender<Arc<CommitDiff>>,
}

#[derive(Default)]
struct TurnState {
    owner: Option<ThreadId>,
    depth: u32,
    committing: bool,
}

/// Who may touch the actor's state: one thread at a time, re-entrantly.
struct Turn {
    m: Mutex<TurnState>,
    cv: Condvar,
}

pub(crate) struct TopoState {
    pub(crate) address_spaces: Vec<AddressSpace>,
    pub(crate) listeners: Vec<ListenerEntry>,
    next_listener: u64,
    pending: bool,
    ioeventfd_pending: bool,
    /// One rendered view per physical root, with what is needed to render
    /// only what changed.
    caches: HashMap<RegionId, RenderCache>,
    /// The shared empty view (address spaces with nothing to render).
    empty: Arc<FlatView>,
}

/// The rendering state of one physical root.
struct RenderCache {
    root: MemoryRegion,
    view: Arc<FlatView>,
    placements: Placements,
    /// Placements right after the last full render (bounds their growth).
    full_count: usize,
    full: bool,
    /// Address windows to re-render at the next commit.
    windows: Vec<(u128, u128)>,
    /// Address windows whose ioeventfds changed (no re-render).
    evwindows: Vec<(u128, u128)>,
}

impl RenderCache {
    fn new(root: MemoryRegion, empty: &Arc<FlatView>) -> RenderCache {
        RenderCache {
            root,
            view: empty.clone(),
            placements: Placements::default(),
            full_count: 0,
            full: true,
            windows: Vec::new(),
            evwindows: Vec::new(),
        }
    }
}

/// Sorts windows and merges those that overlap or touch.
fn normalize(mut w: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    w.retain(|x| x.0 < x.1);
    w.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(w.len());
    for (s, e) in w {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// What the commit rendered for one physical root.
struct Rendered {
    old: Arc<FlatView>,
    new: Arc<FlatView>,
    /// Where the views may differ (range-aligned in both), or `None` when
    /// everything was re-rendered.
    spans: Option<Vec<(u128, u128)>>,
    /// Where ioeventfds may have changed without a re-render.
    evspans: Vec<(u128, u128)>,
}

pub(crate) struct TopoInner {
    pub(crate) id: u64,
    turn: Turn,
    pub(crate) state: Mutex<TopoState>,
    pub(crate) shared: Arc<TopoShared>,
}

/// A memory topology: the region tree, its address spaces and listeners
/// (QEMU's global memory state, one per machine). Cloning gives another
/// handle to the same topology.
#[derive(Clone)]
pub struct Topology(pub(crate) Arc<TopoInner>);

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology").field("generation", &self.generation()).finish()
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// The two standard address spaces of a PC-like machine
/// (QEMU's `memory_map_init`).
#[derive(Debug, Clone)]
pub struct StandardSpaces {
    /// The `system` container, 2^64 bytes.
    pub system: MemoryRegion,
    /// The `io` region, 64 KiB, reading all-ones where nothing is mapped.
    pub io: MemoryRegion,
    /// Address space "memory" over `system`.
    pub memory: AddressSpace,
    /// Address space "I/O" over `io`.
    pub io_space: AddressSpace,
}

/// Releases the turn if a transaction body unwinds.
struct TurnGuard<'a> {
    topo: &'a Topology,
    armed: bool,
}

impl Drop for TurnGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.topo.commit();
        }
    }
}

impl Topology {
    /// A new, empty topology with diff broadcasting of the default capacity
    /// (1024 commits).
    pub fn new() -> Topology {
        Self::with_diff_capacity(1024)
    }

    /// A new topology whose diff broadcast keeps up to `capacity` commits for
    /// slow subscribers.
    pub fn with_diff_capacity(capacity: usize) -> Topology {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let (tx, _) = tokio::sync::broadcast::channel(capacity.max(1));
        Topology(Arc::new(TopoInner {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            turn: Turn { m: Mutex::new(TurnState::default()), cv: Condvar::new() },
            state: Mutex::new(TopoState {
                address_spaces: Vec::new(),
                listeners: Vec::new(),
                next_listener: 1,
                pending: false,
                ioeventfd_pending: false,
                caches: HashMap::new(),
                empty: Arc::new(FlatView::empty()),
            }),
            shared: Arc::new(TopoShared {
                global_dirty: AtomicBool::new(false),
                flush_hook: Rcu::new(Arc::new(None)),
                generation: AtomicU64::new(0),
                diffs: tx,
            }),
        }))
    }

    /// Creates `system` (2^64) and `io` (64 KiB) with their address spaces
    /// "memory" and "I/O", as QEMU's `memory_map_init` does.
    pub fn standard_spaces(&self) -> Result<StandardSpaces> {
        let system = self.new_container("system", crate::types::SIZE_MAX)?;
        let io = self.new_io("io", crate::ops::UnassignedIo, OpsConfig::default(), 0x10000)?;
        let memory = self.address_space_init(&system, "memory")?;
        let io_space = self.address_space_init(&io, "I/O")?;
        Ok(StandardSpaces { system, io, memory, io_space })
    }

    // ----- region constructors ---------------------------------------------

    /// `memory_region_init`: a container of `size` bytes (up to 2^64).
    pub fn new_container(&self, name: &str, size: u128) -> Result<MemoryRegion> {
        check_size(name, size)?;
        Ok(MemoryRegion::new(self, name, size, RegionKind::Container))
    }

    /// `memory_region_init_io`: a region served by `ops`.
    pub fn new_io(&self, name: &str, ops: impl MemoryRegionOps, config: OpsConfig, size: u128) -> Result<MemoryRegion> {
        self.new_io_arc(name, Arc::new(ops), config, size)
    }

    /// Like [`new_io`](Self::new_io) with shared ops.
    pub fn new_io_arc(
        &self,
        name: &str,
        ops: Arc<dyn MemoryRegionOps>,
        config: OpsConfig,
        size: u128,
    ) -> Result<MemoryRegion> {
        check_size(name, size)?;
        config.validate()?;
        Ok(MemoryRegion::new(self, name, size, RegionKind::Io(RegionOps { ops, config })))
    }

    /// `memory_region_init_ram`: anonymous, zero-filled host memory; every
    /// page starts dirty.
    pub fn new_ram(&self, name: &str, size: u128) -> Result<MemoryRegion> {
        check_size(name, size)?;
        let block = RamBlock::new_anonymous(name, size)?;
        Ok(MemoryRegion::new(self, name, size, RegionKind::Ram(block)))
    }

    /// `memory_region_init_ram_ptr`: RAM over memory the caller owns.
    ///
    /// # Safety
    /// `ptr` must point to `size` bytes that are valid for reads and writes
    /// for as long as the region exists, that is until the last handle, alias,
    /// container and published FlatView referring to it is gone (use
    /// [`MemoryRegion::destroy`] and drop every handle, then wait for readers,
    /// before freeing). The memory is shared with the guest and with every
    /// thread that accesses it through the runtime: the caller must not hold
    /// Rust references (`&`/`&mut`) into it while the region exists.
    pub unsafe fn new_ram_from_ptr(&self, name: &str, size: u64, ptr: NonNull<u8>) -> Result<MemoryRegion> {
        // SAFETY: the caller upholds the contract above, which is the one
        // `RamBlock::new_foreign` needs.
        let block = unsafe { RamBlock::new_foreign(ptr, size) };
        Ok(MemoryRegion::new(self, name, size as u128, RegionKind::Ram(block)))
    }

    /// `memory_region_init_alias`: a window of `size` bytes onto `target`
    /// starting at `offset` in it.
    pub fn new_alias(&self, name: &str, target: &MemoryRegion, offset: HwAddr, size: u128) -> Result<MemoryRegion> {
        check_size(name, size)?;
        if target.0.topo_id != self.0.id {
            return Err(Error::ForeignObject(target.name().to_string()));
        }
        if target.is_destroyed() {
            return Err(Error::Destroyed(target.name().to_string()));
        }
        let r = MemoryRegion::new(self, name, size, RegionKind::Alias { target: target.clone() });
        r.0.state.lock().alias_offset = offset;
        Ok(r)
    }

    /// `memory_region_init_rom_device`: backing RAM served directly for reads
    /// while in romd mode (the default); writes, and reads outside romd mode,
    /// go to `ops`.
    pub fn new_rom_device(
        &self,
        name: &str,
        ops: impl MemoryRegionOps,
        config: OpsConfig,
        size: u128,
    ) -> Result<MemoryRegion> {
        self.new_rom_device_arc(name, Arc::new(ops), config, size)
    }

    /// Like [`new_rom_device`](Self::new_rom_device) with shared ops.
    pub fn new_rom_device_arc(
        &self,
        name: &str,
        ops: Arc<dyn MemoryRegionOps>,
        config: OpsConfig,
        size: u128,
    ) -> Result<MemoryRegion> {
        check_size(name, size)?;
        config.validate()?;
        let ram = RamBlock::new_anonymous(name, size)?;
        Ok(MemoryRegion::new(self, name, size, RegionKind::RomDevice { ops: RegionOps { ops, config }, ram }))
    }

    /// A ROM: RAM that is read-only from creation (modern
    /// `memory_region_init_rom`; the embedder fills it through
    /// [`MemoryRegion::ram`]).
    pub fn new_rom(&self, name: &str, size: u128) -> Result<MemoryRegion> {
        let r = self.new_ram(name, size)?;
        r.0.state.lock().readonly = true;
        Ok(r)
    }

    /// `memory_region_init_reservation`: claims space nothing in the runtime
    /// serves. Guest accesses return [`MemTxResult::ReservationAccess`](crate::MemTxResult)
    /// (read 0, writes dropped) instead of aborting.
    pub fn new_reservation(&self, name: &str, size: u128) -> Result<MemoryRegion> {
        check_size(name, size)?;
        Ok(MemoryRegion::new(self, name, size, RegionKind::Reservation))
    }

    // ----- the turn --------------------------------------------------------

    fn enter(&self, mutation: bool) -> Result<()> {
        if crate::turns::holds_device_turn() {
            return Err(Error::InsideDeviceTurn);
        }
        let me = current_thread_id();
        let mut t = self.0.turn.m.lock();
        if t.owner == Some(me) {
            if t.committing && mutation {
                return Err(Error::MutationDuringCommit);
            }
            t.depth += 1;
            return Ok(());
        }
        while t.owner.is_some() {
            t = self.0.turn.cv.wait(t);
        }
        t.owner = Some(me);
        t.depth = 1;
        drop(t);
        crate::turns::topology_turn_taken();
        Ok(())
    }

    fn leave(&self) -> Result<bool> {
        let me = current_thread_id();
        let mut t = self.0.turn.m.lock();
        if t.owner != Some(me) || t.depth == 0 {
            return Err(Error::NotInTransaction);
        }
        t.depth -= 1;
        if t.depth > 0 {
            return Ok(false);
        }
        if t.committing {
            // The outermost level of a query made from a listener callback.
            t.depth = 0;
            return Ok(false);
        }
        t.committing = true;
        Ok(true)
    }

    fn release(&self) {
        let mut t = self.0.turn.m.lock();
        t.committing = false;
        t.owner = None;
        t.depth = 0;
        drop(t);
        self.0.turn.cv.notify_all();
        crate::turns::topology_turn_released();
    }

    fn in_commit(&self) -> bool {
        let t = self.0.turn.m.lock();
        t.owner == Some(current_thread_id()) && t.committing
    }

    /// `memory_region_transaction_begin`: changes made until the matching
    /// outermost [`commit`](Self::commit) become visible together. Nests.
    /// Flushes the coalesced-MMIO ring first, as QEMU does. Blocks while
    /// another thread's transaction is open.
    pub fn begin(&self) -> Result<()> {
        if !self.in_commit() {
            self.flush_coalesced_mmio();
        }
        self.enter(true)
    }

    /// `memory_region_transaction_commit`: ends one level; the outermost
    /// level renders, diffs, runs listeners and publishes.
    pub fn commit(&self) -> Result<()> {
        if self.leave()? {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.do_commit()));
            self.release();
            if let Err(p) = r {
                std::panic::resume_unwind(p);
            }
        }
        Ok(())
    }

    /// Runs `f` inside one transaction (begin, `f`, commit), committing even
    /// if `f` panics.
    pub fn transaction<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        self.begin()?;
        let mut guard = TurnGuard { topo: self, armed: true };
        let r = f();
        guard.armed = false;
        self.commit()?;
        Ok(r)
    }

    /// One mutation: nested in the caller's transaction or its own.
    pub(crate) fn with_mutation<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.begin()?;
        let mut guard = TurnGuard { topo: self, armed: true };
        let r = f();
        guard.armed = false;
        self.commit()?;
        r
    }

    /// A consistent read of actor state (waits for other threads' open
    /// transactions; allowed from listener callbacks).
    pub(crate) fn with_query<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        self.enter(false)?;
        let mut guard = TurnGuard { topo: self, armed: true };
        let r = f();
        guard.armed = false;
        self.commit()?;
        Ok(r)
    }

    pub(crate) fn mark_pending(&self, pending: bool) {
        if pending {
            self.0.state.lock().pending = true;
        }
    }

    pub(crate) fn mark_ioeventfd_pending(&self, pending: bool) {
        if pending {
            self.0.state.lock().ioeventfd_pending = true;
        }
    }

    /// The generation of the most recent commit (0 before the first).
    pub fn generation(&self) -> u64 {
        self.0.shared.generation.load(Ordering::Acquire)
    }

    // ----- damage: what the next commit must re-render ------------------------

    /// `child` of `parent` changed at `[addr, addr + size)` of the parent:
    /// re-render that window wherever the parent is rendered.
    pub(crate) fn damage_child(&self, parent: &MemoryRegion, addr: HwAddr, size: u128) {
        let mut st = self.0.state.lock();
        for c in st.caches.values_mut() {
            if c.full {
                continue;
            }
            if let Some(ps) = c.placements.map.get(&parent.id()) {
                for p in ps {
                    let s = (p.base + addr as i128).max(p.start as i128);
                    let e = (p.base + addr as i128 + size as i128).min(p.end as i128);
                    if s < e {
                        c.windows.push((s as u128, e as u128));
                    }
                }
            }
        }
    }

    /// Something about `r` itself changed: re-render wherever it is rendered
    /// (everything, for a view rooted at it).
    pub(crate) fn damage_region(&self, r: &MemoryRegion) {
        let mut st = self.0.state.lock();
        for c in st.caches.values_mut() {
            if c.root == *r {
                c.full = true;
            }
            if c.full {
                continue;
            }
            if let Some(ps) = c.placements.map.get(&r.id()) {
                c.windows.extend(ps.iter().map(|p| (p.start, p.end)));
            }
        }
    }

    /// `r` got a new address or container. Views rendered from `r` itself
    /// place everything at its address, so they are rendered again (and a
    /// commit is due if `r` roots any view or address space).
    pub(crate) fn damage_root_placed(&self, r: &MemoryRegion) {
        let mut st = self.0.state.lock();
        let mut rooted = r.0.as_roots.load(Ordering::Acquire) > 0;
        for c in st.caches.values_mut() {
            if c.root == *r {
                c.full = true;
                rooted = true;
            }
        }
        if rooted {
            st.pending = true;
        }
    }

    /// `r` was enabled or disabled: re-render where it is, or would be,
    /// rendered (through its container or any alias of it).
    pub(crate) fn damage_enable(&self, r: &MemoryRegion) {
        let parent = r.container();
        let (addr, aliases) = (r.addr(), r.aliases());
        self.damage_region(r);
        if let Some(p) = parent {
            self.damage_child(&p, addr, r.size());
        }
        for a in aliases {
            self.damage_region(&a);
        }
    }

    /// The ioeventfds of `r` changed: recompute them where it is rendered.
    pub(crate) fn damage_eventfds(&self, r: &MemoryRegion) {
        let mut st = self.0.state.lock();
        for c in st.caches.values_mut() {
            if let Some(ps) = c.placements.map.get(&r.id()) {
                c.evwindows.extend(ps.iter().map(|p| (p.start, p.end)));
            }
        }
    }

    /// Every view must be rendered again (e.g. dirty-log masks changed).
    fn damage_all(&self) {
        let mut st = self.0.state.lock();
        for c in st.caches.values_mut() {
            c.full = true;
        }
    }

    /// Brings every needed render cache up to date and returns the result
    /// per physical root.
    fn render_caches(&self, roots: &[Option<MemoryRegion>]) -> HashMap<RegionId, Rendered> {
        let mut st = self.0.state.lock();
        let st = &mut *st;
        let mut out: HashMap<RegionId, Rendered> = HashMap::new();
        for root in roots.iter().flatten() {
            if out.contains_key(&root.id()) {
                continue;
            }
            let c = st.caches.entry(root.id()).or_insert_with(|| RenderCache::new(root.clone(), &st.empty));
            let old = c.view.clone();
            let stale = c.placements.count > 4 * c.full_count + 4096;
            let (new, spans) = if c.full || stale {
                let v = Arc::new(render(Some(root), &mut c.placements));
                c.full_count = c.placements.count;
                (v, None)
            } else if !c.windows.is_empty() {
                let windows = normalize(std::mem::take(&mut c.windows));
                let mut pieces = Vec::new();
                for &w in &windows {
                    pieces.extend(render_window(Some(root), w, &mut c.placements));
                }
                let v = Arc::new(old.splice(&windows, pieces, Some(root.clone())));
                // Grow the windows to range boundaries of both views.
                let mut sp = windows;
                loop {
                    let grown = v.expand(&old.expand(&sp));
                    if grown == sp {
                        break;
                    }
                    sp = grown;
                }
                (v, Some(sp))
            } else {
                (old.clone(), Some(Vec::new()))
            };
            let evspans = new.expand(&normalize(std::mem::take(&mut c.evwindows)));
            c.full = false;
            c.windows.clear();
            c.view = new.clone();
            out.insert(root.id(), Rendered { old, new, spans, evspans });
        }
        st.caches.retain(|id, _| out.contains_key(id));
        out
    }

    // ----- coalesced MMIO -------------------------------------------------

    /// Installs the hook that drains a backend's coalesced-MMIO ring. It is
    /// called at every transaction begin, before accesses to regions that
    /// flush coalesced MMIO, and when coalescing is cleared.
    pub fn set_coalesced_flush_hook(&self, hook: Option<FlushHook>) {
        self.0.shared.flush_hook.swap(Arc::new(hook));
    }

    /// Runs the coalesced-MMIO flush hook, if one is installed.
    pub fn flush_coalesced_mmio(&self) {
        self.0.shared.flush();
    }

    /// Sends `coalesced_mmio_add/del` for one coalesced range of `mr` in every
    /// place it is currently mapped (no re-render).
    pub(crate) fn coalesced_notify(&self, mr: &MemoryRegion, off: HwAddr, size: u128, add: bool) {
        let (ases, listeners) = {
            let st = self.0.state.lock();
            (st.address_spaces.clone(), Listeners(st.listeners.clone()))
        };
        for asp in &ases {
            let view = asp.0.view.load_full();
            for fr in view.iter().filter(|fr| fr.region == *mr) {
                if let Some((s, l)) = coalesced_piece(fr, off, size) {
                    let sec = MemoryRegionSection::from_range(fr, asp);
                    if add {
                        for l2 in listeners.forward_for(asp.0.id) {
                            l2.listener.coalesced_mmio_add(&sec, s, l);
                        }
                    } else {
                        for l2 in listeners.reverse_for(asp.0.id) {
                            l2.listener.coalesced_mmio_del(&sec, s, l);
                        }
                    }
                }
            }
        }
    }

    // ----- address spaces ----------------------------------------------------

    /// `address_space_init`: a new address space over `root`, populated at
    /// once (listeners that take every address space see its ranges added in
    /// a commit of its own).
    pub fn address_space_init(&self, root: &MemoryRegion, name: &str) -> Result<AddressSpace> {
        if root.0.topo_id != self.0.id {
            return Err(Error::ForeignObject(root.name().to_string()));
        }
        self.with_mutation(|| {
            if root.is_destroyed() {
                return Err(Error::Destroyed(root.name().to_string()));
            }
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let asp = AddressSpace(Arc::new(AsInner::new(
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                name,
                root.clone(),
                Arc::downgrade(&self.0),
                self.0.shared.clone(),
            )));
            root.0.as_roots.fetch_add(1, Ordering::AcqRel);
            let mut st = self.0.state.lock();
            st.address_spaces.push(asp.clone());
            st.pending = true;
            Ok(asp)
        })
    }

    /// `address_space_destroy`: listeners see all of its ranges (and
    /// ioeventfds) deleted, then it is unlinked. Its root may then be
    /// destroyed. Accesses through remaining handles find nothing.
    pub fn address_space_destroy(&self, asp: &AddressSpace) -> Result<()> {
        if asp.0.topo_id() != self.0.id {
            return Err(Error::ForeignObject(asp.name().to_string()));
        }
        self.with_mutation(|| {
            if asp.0.destroyed.swap(true, Ordering::AcqRel) {
                return Err(Error::AddressSpaceDestroyed(asp.name().to_string()));
            }
            self.0.state.lock().pending = true;
            Ok(())
        })
    }

    /// The live address spaces, in creation order.
    pub fn address_spaces(&self) -> Vec<AddressSpace> {
        self.0.state.lock().address_spaces.clone()
    }

    // ----- listeners ---------------------------------------------------------

    /// `memory_listener_register`: registers `listener` with `priority`
    /// (lower = earlier on add, later on delete), for one address space or,
    /// with `None`, for all. Replays the current state to it, per address
    /// space: `begin`, `log_global_start` if global logging is on, then for
    /// each range `region_add`, `coalesced_mmio_add` and `log_start`, then the
    /// ioeventfds (`eventfd_add`), then `commit`.
    pub fn listener_register(
        &self,
        listener: Arc<dyn MemoryListener>,
        priority: i32,
        filter: Option<&AddressSpace>,
    ) -> Result<ListenerId> {
        if let Some(f) = filter {
            if f.0.topo_id() != self.0.id {
                return Err(Error::ForeignObject(f.name().to_string()));
            }
        }
        self.with_mutation(|| {
            if let Some(f) = filter {
                if f.0.destroyed.load(Ordering::Acquire) {
                    return Err(Error::AddressSpaceDestroyed(f.name().to_string()));
                }
            }
            let (id, ases) = {
                let mut st = self.0.state.lock();
                let id = ListenerId(st.next_listener);
                st.next_listener += 1;
                let entry = ListenerEntry {
                    id,
                    priority,
                    filter: filter.map(|f| f.0.id),
                    wants_nop: listener.wants_region_nop(),
                    listener: listener.clone(),
                };
                let pos = st.listeners.iter().position(|l| l.priority > priority).unwrap_or(st.listeners.len());
                st.listeners.insert(pos, entry);
                (id, st.address_spaces.clone())
            };
            let global = self.0.shared.global_dirty.load(Ordering::Acquire);
            for asp in ases.iter().filter(|a| filter.is_none_or(|f| f == *a)) {
                listener.begin();
                if global {
                    listener.log_global_start();
                }
                let view = asp.0.view.load_full();
                for fr in view.iter() {
                    let sec = MemoryRegionSection::from_range(fr, asp);
                    listener.region_add(&sec);
                    for_coalesced(fr, |s, l| listener.coalesced_mmio_add(&sec, s, l));
                    if fr.dirty_log_mask != 0 {
                        listener.log_start(&sec, 0, fr.dirty_log_mask);
                    }
                }
                update_ioeventfds(asp, &view, None, None, &mut SpaceDiff::default());
                for fd in asp.0.ioeventfds.lock().iter().flat_map(|s| s.values()) {
                    listener.eventfd_add(&fd.section(asp), fd.match_data, fd.data, &fd.notifier);
                }
                listener.commit();
            }
            Ok(id)
        })
    }

    /// `memory_listener_unregister`: replays, per address space, `begin`,
    /// then for each range `log_stop` (if logging), `region_del` and
    /// `coalesced_mmio_del`, then `eventfd_del` for each ioeventfd, then
    /// `commit`; then removes the listener. Unregistering twice is a no-op.
    pub fn listener_unregister(&self, id: ListenerId) -> Result<()> {
        self.with_mutation(|| {
            let (entry, ases) = {
                let mut st = self.0.state.lock();
                let Some(pos) = st.listeners.iter().position(|l| l.id == id) else {
                    return Ok(());
                };
                (st.listeners.remove(pos), st.address_spaces.clone())
            };
            let listener = &entry.listener;
            for asp in ases.iter().filter(|a| entry.wants(a.0.id)) {
                listener.begin();
                let view = asp.0.view.load_full();
                for fr in view.iter() {
                    let sec = MemoryRegionSection::from_range(fr, asp);
                    if fr.dirty_log_mask != 0 {
                        listener.log_stop(&sec, fr.dirty_log_mask, 0);
                    }
                    listener.region_del(&sec);
                    for_coalesced(fr, |s, l| listener.coalesced_mmio_del(&sec, s, l));
                }
                for fd in asp.0.ioeventfds.lock().iter().flat_map(|s| s.values()) {
                    listener.eventfd_del(&fd.section(asp), fd.match_data, fd.data, &fd.notifier);
                }
                listener.commit();
            }
            Ok(())
        })
    }

    /// Subscribes an asynchronous observer to the diffs of every future
    /// commit (see [`DiffSubscriber`]).
    pub fn subscribe(&self) -> Result<DiffSubscriber> {
        self.with_query(|| DiffSubscriber {
            rx: self.0.shared.diffs.subscribe(),
            topo: Arc::downgrade(&self.0),
            last: self.generation(),
        })
    }

    /// Every address space with its current view, at one generation.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        // Built on demand with the turn held, so no commit is half done. (Not
        // kept per commit: the shared state that regions point to must not
        // hold the address spaces, or the topology would keep itself alive.)
        let build = || {
            let spaces = self.address_spaces().into_iter().map(|a| {
                let v = a.0.view.load_full();
                (a, v)
            });
            Arc::new(Snapshot { generation: self.generation(), spaces: spaces.collect() })
        };
        self.with_query(build).unwrap_or_else(|_| build())
    }

    // ----- dirty logging ---------------------------------------------------

    /// Whether global (migration) dirty logging is on.
    pub fn global_dirty_log(&self) -> bool {
        self.0.shared.global_dirty.load(Ordering::Acquire)
    }

    /// `memory_global_dirty_log_start`: `log_global_start` on every listener,
    /// then a commit that adds the MIGRATION bit to RAM ranges (`log_start`).
    pub fn global_dirty_log_start(&self) -> Result<()> {
        self.with_mutation(|| {
            if self.0.shared.global_dirty.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            let listeners = self.0.state.lock().listeners.clone();
            for l in &listeners {
                l.listener.log_global_start();
            }
            self.mark_pending(true);
            self.damage_all();
            Ok(())
        })
    }

    /// `memory_global_dirty_log_stop`: a commit that drops the MIGRATION bit
    /// (`log_stop`), then `log_global_stop` on every listener (Reverse).
    pub fn global_dirty_log_stop(&self) -> Result<()> {
        let was_on = self.with_mutation(|| {
            let was = self.0.shared.global_dirty.swap(false, Ordering::AcqRel);
            self.mark_pending(was);
            if was {
                self.damage_all();
            }
            Ok(was)
        })?;
        if was_on {
            self.with_mutation(|| {
                let listeners = self.0.state.lock().listeners.clone();
                for l in listeners.iter().rev() {
                    l.listener.log_global_stop();
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn sync_dirty(&self, only: Option<&MemoryRegion>) -> Result<()> {
        self.with_query(|| {
            let (ases, listeners) = {
                let st = self.0.state.lock();
                (st.address_spaces.clone(), st.listeners.clone())
            };
            for l in &listeners {
                for asp in ases.iter().filter(|a| l.wants(a.0.id)) {
                    let view = asp.0.view.load_full();
                    for fr in view.iter() {
                        if fr.dirty_log_mask != 0 && only.is_none_or(|m| *m == fr.region) {
                            l.listener.log_sync(&MemoryRegionSection::from_range(fr, asp));
                        }
                    }
                }
            }
        })
    }

    /// `memory_region_sync_dirty_bitmap`: asks listeners (`log_sync`) to fold
    /// their dirty logs for every logging range of `mr` into its bitmaps.
    pub fn sync_dirty_bitmap(&self, mr: &MemoryRegion) -> Result<()> {
        self.sync_dirty(Some(mr))
    }

    /// `memory_global_sync_dirty_bitmap` (modern `memory_global_dirty_log_sync`):
    /// `log_sync` for every logging range of every address space.
    pub fn global_sync_dirty_bitmap(&self) -> Result<()> {
        self.sync_dirty(None)
    }

    // ----- find --------------------------------------------------------------

    /// `memory_region_find` (modern): `addr` is relative to `mr`; the lookup
    /// runs in the view of the address space whose root is `mr`'s topmost
    /// ancestor and returns the lowest-addressed range overlapping
    /// `[addr, addr + size)`, clipped to it. `None` when `mr` is in no
    /// address space or nothing overlaps. The section keeps its region alive.
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

    // ----- the commit ----------------------------------------------------

    fn do_commit(&self) {
        let (topo, eventfds, ases, listeners) = {
            let mut st = self.0.state.lock();
            let t = std::mem::take(&mut st.pending);
            let e = std::mem::take(&mut st.ioeventfd_pending);
            (t, e, st.address_spaces.clone(), Listeners(st.listeners.clone()))
        };
        if !topo && !eventfds {
            return;
        }
        let generation = self.0.shared.generation.load(Ordering::Acquire) + 1;
        self.0.shared.generation.store(generation, Ordering::Release);
        let want_diff = self.0.shared.diffs.receiver_count() > 0;
        let mut diff = CommitDiff { generation, spaces: Vec::new() };

        let roots: Vec<Option<MemoryRegion>> = ases
            .iter()
            .map(|a| if a.0.destroyed.load(Ordering::Acquire) { None } else { physical_root(&a.0.root) })
            .collect();
        let rendered = self.render_caches(&roots);
        let empty = self.0.state.lock().empty.clone();
        if topo {
            for l in listeners.forward() {
                l.listener.begin();
            }
        }

        for (asp, root) in ases.iter().zip(&roots) {
            let mut sd = SpaceDiff { address_space: asp.0.id, name: asp.0.name.clone(), ..Default::default() };
            let old = asp.0.view.load_full();
            let r = root.as_ref().and_then(|r| rendered.get(&r.id()));
            let new = r.map_or_else(|| empty.clone(), |r| r.new.clone());
            // Incremental spans are valid only against the view this address
            // space had (it may have switched roots).
            let (spans, evspans) = match r {
                Some(r) if Arc::ptr_eq(&r.old, &old) => (r.spans.clone(), r.evspans.clone()),
                _ => (None, Vec::new()),
            };
            let changed = !Arc::ptr_eq(&old, &new);
            let nops = topo && listeners.nop_for(asp.0.id);
            let observed = listeners.any_for(asp.0.id) || want_diff;
            if (changed || nops) && observed {
                topology_passes(asp, &old, &new, &listeners, &mut sd, if nops { None } else { spans.as_deref() });
            }
            if changed {
                asp.0.publish(new.clone());
            }
            if observed {
                let windows = match (&spans, changed) {
                    (Some(sp), _) => Some(normalize(sp.iter().chain(evspans.iter()).copied().collect())),
                    (None, true) => None,
                    (None, false) => Some(evspans.clone()),
                };
                update_ioeventfds(asp, &new, windows.as_deref(), Some(&listeners), &mut sd);
            } else {
                *asp.0.ioeventfds.lock() = None;
            }
            if asp.0.destroyed.load(Ordering::Acquire) {
                sd.destroyed = true;
            }
            if want_diff && !sd.is_empty() {
                diff.spaces.push(sd);
            }
        }
        if topo {
            for l in listeners.forward() {
                l.listener.commit();
            }
        }

        // Unlink destroyed address spaces.
        self.0.state.lock().address_spaces.retain(|a| {
            let gone = a.0.destroyed.load(Ordering::Acquire);
            if gone {
                a.0.root.0.as_roots.fetch_sub(1, Ordering::AcqRel);
            }
            !gone
        });
        if want_diff {
            let _ = self.0.shared.diffs.send(Arc::new(diff));
        }
    }
}

impl TopoShared {
    /// Runs the flush hook, unless this thread is already inside it (the
    /// writes a flush replays may reach regions that flush, or begin
    /// transactions; QEMU guards the same re-entry with a flag).
    // loom's `thread_local!` has no `const` form.
    #[allow(clippy::missing_const_for_thread_local)]
    pub(crate) fn flush(&self) {
        thread_local! {
            static FLUSHING: std::cell::Cell<bool> = std::cell::Cell::new(false);
        }
        let hook = self.flush_hook.load();
        if let Some(h) = hook.as_ref().as_ref() {
            if FLUSHING.with(|f| f.replace(true)) {
                return;
            }
            struct Reset;
            impl Drop for Reset {
                fn drop(&mut self) {
                    FLUSHING.with(|f| f.set(false));
                }
            }
            let _reset = Reset;
            h();
        }
    }
}

/// The part of coalesced range `(off, size)` of `fr`'s region that `fr`
/// shows, in address-space coordinates.
fn coalesced_piece(fr: &FlatRange, off: HwAddr, size: u128) -> Option<(HwAddr, u64)> {
    let shift = fr.start as i128 - fr.offset_in_region as i128;
    let s = (off as i128 + shift).max(fr.start as i128);
    let e = (off as i128 + size as i128 + shift).min(fr.end() as i128);
    (s < e).then(|| (s as u64, (e - s) as u64))
}

fn for_coalesced(fr: &FlatRange, mut f: impl FnMut(HwAddr, u64)) {
    let ranges = fr.region.0.state.lock().coalesced.clone();
    for (off, size) in ranges {
        if let Some((s, l)) = coalesced_piece(fr, off, size) {
            f(s, l);
        }
    }
}

/// The ranges of `view` inside `spans` (all of them for `None`).
fn ranges_in<'a>(view: &'a FlatView, spans: Option<&[(u128, u128)]>) -> Vec<&'a FlatRange> {
    match spans {
        None => view.iter().collect(),
        Some(sp) => {
            let mut out = Vec::new();
            for &(s, e) in sp {
                if s > u64::MAX as u128 {
                    continue;
                }
                out.extend(view.iter_from(s as u64).take_while(|r| (r.start as u128) < e));
            }
            out
        }
    }
}

/// QEMU's `address_space_update_topology_pass`, both passes, over the
/// ranges inside `spans` (where the views may differ; outside them they are
/// identical), or over everything for `None`. `region_nop` goes only to
/// listeners that want it.
fn topology_passes(
    asp: &AddressSpace,
    old: &FlatView,
    new: &FlatView,
    ls: &Listeners,
    sd: &mut SpaceDiff,
    spans: Option<&[(u128, u128)]>,
) {
    let id = asp.0.id;
    let o = ranges_in(old, spans);
    let n = ranges_in(new, spans);
    let deleted = |i: usize, j: usize| {
        i < o.len() && (j == n.len() || o[i].start < n[j].start || (o[i].start == n[j].start && !o[i].same_as(n[j])))
    };
    // Delete pass.
    let (mut i, mut j) = (0, 0);
    while i < o.len() || j < n.len() {
        if deleted(i, j) {
            let fr = o[i];
            let sec = MemoryRegionSection::from_range(fr, asp);
            if !fr.region.0.state.lock().coalesced.is_empty() {
                for l in ls.reverse_for(id) {
                    l.listener.coalesced_mmio_del(&sec, fr.start, fr.size() as u64);
                }
            }
            for l in ls.reverse_for(id) {
                l.listener.region_del(&sec);
            }
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
            let sec = MemoryRegionSection::from_range(fr, asp);
            for l in ls.forward_for(id).filter(|l| l.wants_nop) {
                l.listener.region_nop(&sec);
            }
            if fr.dirty_log_mask & !fo.dirty_log_mask != 0 {
                for l in ls.forward_for(id) {
                    l.listener.log_start(&sec, fo.dirty_log_mask, fr.dirty_log_mask);
                }
            }
            if fo.dirty_log_mask & !fr.dirty_log_mask != 0 {
                for l in ls.reverse_for(id) {
                    l.listener.log_stop(&sec, fo.dirty_log_mask, fr.dirty_log_mask);
                }
            }
            if fo.dirty_log_mask != fr.dirty_log_mask {
                sd.log_changed.push((RangeRecord::of(fr), fo.dirty_log_mask));
            }
            i += 1;
            j += 1;
        } else {
            let fr = n[j];
            let sec = MemoryRegionSection::from_range(fr, asp);
            for l in ls.forward_for(id) {
                l.listener.region_add(&sec);
            }
            for_coalesced(fr, |s, len| {
                for l in ls.forward_for(id) {
                    l.listener.coalesced_mmio_add(&sec, s, len);
                }
            });
            sd.added.push(RangeRecord::of(fr));
            j += 1;
        }
    }
}

/// The ioeventfds that the ranges of `view` inside `windows` register
/// (QEMU's `address_space_update_ioeventfds`, restricted).
fn eventfds_in(view: &FlatView, windows: Option<&[(u128, u128)]>) -> EventfdSet {
    let mut set = EventfdSet::new();
    for fr in ranges_in(view, windows) {
        let fds = fr.region.0.eventfds.load();
        if fds.is_empty() {
            continue;
        }
        let shift = fr.start as i128 - fr.offset_in_region as i128;
        let (fs, fe) = (fr.start as i128, fr.end() as i128);
        for fd in fds.iter() {
            let a = fd.addr as i128 + shift;
            let e = a + fd.size as i128;
            let intersects = if fd.size == 0 { a >= fs && a < fe } else { a < fe && e > fs };
            if intersects && a >= 0 && a <= u64::MAX as i128 {
                let ev = AsEventfd {
                    addr: a as u64,
                    size: fd.size,
                    match_data: fd.match_data,
                    data: fd.data,
                    notifier: fd.notifier.clone(),
                    owner: fr.start,
                };
                set.insert(ev.key(), ev);
            }
        }
    }
    set
}

/// Recomputes an address space's ioeventfd set against `view`, inside
/// `windows` or entirely (`None`), and reports the difference
/// (`address_space_add_del_ioeventfds`: deletes Forward, adds Reverse, in
/// the set's order). Without listeners it only updates the set.
pub(crate) fn update_ioeventfds(
    asp: &AddressSpace,
    view: &FlatView,
    windows: Option<&[(u128, u128)]>,
    ls: Option<&Listeners>,
    sd: &mut SpaceDiff,
) {
    let mut guard = asp.0.ioeventfds.lock();
    let Some(set) = guard.as_mut() else {
        // Not maintained until now: build it silently.
        *guard = Some(eventfds_in(view, None));
        return;
    };
    if windows.is_some_and(|w| w.is_empty()) {
        return;
    }
    let new = eventfds_in(view, windows);
    // The old entries the recomputed ranges owned.
    let old: EventfdSet = match windows {
        None => std::mem::take(set),
        Some(w) => {
            let mut taken = EventfdSet::new();
            for &(ws, we) in w {
                let lo = (ws.min(u64::MAX as u128) as u64).saturating_sub(8);
                let keys: Vec<_> = set
                    .range((lo, 0, false, 0, 0)..)
                    .take_while(|(k, _)| (k.0 as u128) < we)
                    .filter(|(_, v)| (v.owner as u128) >= ws && (v.owner as u128) < we)
                    .map(|(k, _)| *k)
                    .collect();
                for k in keys {
                    if let Some(v) = set.remove(&k) {
                        taken.insert(k, v);
                    }
                }
            }
            taken
        }
    };
    let id = asp.0.id;
    let mut oi = old.iter().peekable();
    let mut ni = new.iter().peekable();
    loop {
        let take_old = match (oi.peek(), ni.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(o), Some(n)) => {
                if o.0 == n.0 {
                    oi.next();
                    ni.next();
                    continue;
                }
                o.0 < n.0
            }
        };
        if take_old {
            let (_, fd) = oi.next().expect("peeked");
            if let Some(ls) = ls {
                for l in ls.forward_for(id) {
                    l.listener.eventfd_del(&fd.section(asp), fd.match_data, fd.data, &fd.notifier);
                }
            }
            sd.eventfds_removed.push(fd.record());
        } else {
            let (_, fd) = ni.next().expect("peeked");
            if let Some(ls) = ls {
                for l in ls.reverse_for(id) {
                    l.listener.eventfd_add(&fd.section(asp), fd.match_data, fd.data, &fd.notifier);
                }
            }
            sd.eventfds_added.push(fd.record());
        }
    }
    set.extend(new);
}

impl AsEventfd {
    fn record(&self) -> EventfdRecord {
        EventfdRecord { addr: self.addr, size: self.size, match_data: self.match_data, data: self.data }
    }
}
