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

use crate::address_space::{AddressSpace, AsEventfd, AsInner};
use crate::error::{Error, Result};
use crate::flatview::{physical_root, render, FlatRange, FlatView};
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
    pub(crate) snapshot: Rcu<Snapshot>,
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
            }),
            shared: Arc::new(TopoShared {
                global_dirty: AtomicBool::new(false),
                flush_hook: Rcu::new(Arc::new(None)),
                generation: AtomicU64::new(0),
                snapshot: Rcu::new(Arc::new(Snapshot { generation: 0, spaces: Vec::new() })),
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
            for fr in view.ranges.iter().filter(|fr| fr.region == *mr) {
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
                let entry = ListenerEntry { id, priority, filter: filter.map(|f| f.0.id), listener: listener.clone() };
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
                for fr in view.ranges.iter() {
                    let sec = MemoryRegionSection::from_range(fr, asp);
                    listener.region_add(&sec);
                    for_coalesced(fr, |s, l| listener.coalesced_mmio_add(&sec, s, l));
                    if fr.dirty_log_mask != 0 {
                        listener.log_start(&sec, 0, fr.dirty_log_mask);
                    }
                }
                for fd in asp.0.ioeventfds.lock().iter() {
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
                for fr in view.ranges.iter() {
                    let sec = MemoryRegionSection::from_range(fr, asp);
                    if fr.dirty_log_mask != 0 {
                        listener.log_stop(&sec, fr.dirty_log_mask, 0);
                    }
                    listener.region_del(&sec);
                    for_coalesced(fr, |s, l| listener.coalesced_mmio_del(&sec, s, l));
                }
                for fd in asp.0.ioeventfds.lock().iter() {
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
            shared: self.0.shared.clone(),
            last: self.generation(),
        })
    }

    /// Every address space with its current view, at one generation.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.0.shared.snapshot.load_full()
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
            Ok(())
        })
    }

    /// `memory_global_dirty_log_stop`: a commit that drops the MIGRATION bit
    /// (`log_stop`), then `log_global_stop` on every listener (Reverse).
    pub fn global_dirty_log_stop(&self) -> Result<()> {
        let was_on = self.with_mutation(|| {
            let was = self.0.shared.global_dirty.swap(false, Ordering::AcqRel);
            self.mark_pending(was);
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
                    for fr in view.ranges.iter() {
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

        let new_views: Vec<Option<Arc<FlatView>>> = if topo {
            let mut cache: HashMap<Option<RegionId>, Arc<FlatView>> = HashMap::new();
            let views = ases
                .iter()
                .map(|asp| {
                    let phys = if asp.0.destroyed.load(Ordering::Acquire) { None } else { physical_root(&asp.0.root) };
                    let key = phys.as_ref().map(MemoryRegion::id);
                    Some(cache.entry(key).or_insert_with(|| Arc::new(render(phys.as_ref()))).clone())
                })
                .collect();
            for l in listeners.forward() {
                l.listener.begin();
            }
            views
        } else {
            vec![None; ases.len()]
        };

        for (asp, new) in ases.iter().zip(new_views) {
            let mut sd = SpaceDiff { address_space: asp.0.id, name: asp.0.name.clone(), ..Default::default() };
            if let Some(new) = new {
                let old = asp.0.view.load_full();
                if !Arc::ptr_eq(&old, &new) {
                    if listeners.any_for(asp.0.id) || want_diff {
                        topology_passes(asp, &old, &new, &listeners, &mut sd);
                    }
                    asp.0.publish(new);
                }
            }
            update_ioeventfds(asp, &listeners, &mut sd);
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
        let live: Vec<AddressSpace> = {
            let mut st = self.0.state.lock();
            st.address_spaces.retain(|a| {
                let gone = a.0.destroyed.load(Ordering::Acquire);
                if gone {
                    a.0.root.0.as_roots.fetch_sub(1, Ordering::AcqRel);
                }
                !gone
            });
            st.address_spaces.clone()
        };
        let spaces = live.iter().map(|a| (a.clone(), a.0.view.load_full())).collect();
        self.0.shared.snapshot.swap(Arc::new(Snapshot { generation, spaces }));
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

/// QEMU's `address_space_update_topology_pass`, both passes.
fn topology_passes(asp: &AddressSpace, old: &FlatView, new: &FlatView, ls: &Listeners, sd: &mut SpaceDiff) {
    let id = asp.0.id;
    let (o, n) = (&old.ranges, &new.ranges);
    // Delete pass.
    let (mut i, mut j) = (0, 0);
    while i < o.len() || j < n.len() {
        if i < o.len()
            && (j == n.len() || o[i].start < n[j].start || (o[i].start == n[j].start && !o[i].same_as(&n[j])))
        {
            let fr = &o[i];
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
        } else if i < o.len() && j < n.len() && o[i].same_as(&n[j]) {
            i += 1;
            j += 1;
        } else {
            j += 1;
        }
    }
    // Add pass.
    let (mut i, mut j) = (0, 0);
    while i < o.len() || j < n.len() {
        if i < o.len()
            && (j == n.len() || o[i].start < n[j].start || (o[i].start == n[j].start && !o[i].same_as(&n[j])))
        {
            i += 1;
        } else if i < o.len() && j < n.len() && o[i].same_as(&n[j]) {
            let (fo, fr) = (&o[i], &n[j]);
            let sec = MemoryRegionSection::from_range(fr, asp);
            for l in ls.forward_for(id) {
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
            let fr = &n[j];
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

/// QEMU's `address_space_update_ioeventfds` and `_add_del_ioeventfds`.
fn update_ioeventfds(asp: &AddressSpace, ls: &Listeners, sd: &mut SpaceDiff) {
    let view = asp.0.view.load_full();
    let mut new: Vec<AsEventfd> = Vec::new();
    for fr in view.ranges.iter() {
        let fds = fr.region.0.eventfds.load();
        if fds.is_empty() {
            continue;
        }
        let shift = fr.start as i128 - fr.offset_in_region as i128;
        for fd in fds.iter() {
            let a = fd.addr as i128 + shift;
            let e = a + fd.size as i128;
            let (fs, fe) = (fr.start as i128, fr.end() as i128);
            let intersects = if fd.size == 0 { a >= fs && a < fe } else { a < fe && e > fs };
            if intersects && a >= 0 && a <= u64::MAX as i128 {
                new.push(AsEventfd {
                    addr: a as u64,
                    size: fd.size,
                    match_data: fd.match_data,
                    data: fd.data,
                    notifier: fd.notifier.clone(),
                });
            }
        }
    }
    new.sort_by_key(AsEventfd::key);
    let mut old_guard = asp.0.ioeventfds.lock();
    let old = std::mem::take(&mut *old_guard);
    let id = asp.0.id;
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        if i < old.len() && (j == new.len() || old[i].key() < new[j].key()) {
            let fd = &old[i];
            for l in ls.forward_for(id) {
                l.listener.eventfd_del(&fd.section(asp), fd.match_data, fd.data, &fd.notifier);
            }
            sd.eventfds_removed.push(fd.record());
            i += 1;
        } else if j < new.len() && (i == old.len() || new[j].key() < old[i].key()) {
            let fd = &new[j];
            for l in ls.reverse_for(id) {
                l.listener.eventfd_add(&fd.section(asp), fd.match_data, fd.data, &fd.notifier);
            }
            sd.eventfds_added.push(fd.record());
            j += 1;
        } else {
            i += 1;
            j += 1;
        }
    }
    *old_guard = new;
}

impl AsEventfd {
    fn record(&self) -> EventfdRecord {
        EventfdRecord { addr: self.addr, size: self.size, match_data: self.match_data, data: self.data }
    }
}
