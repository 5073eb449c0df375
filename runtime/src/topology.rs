//! The topology: one machine's region tree, address spaces and listeners
//! (QEMU's global memory state), behind a cheap cloneable handle, and the
//! constructors of its regions.
//!
//! A newcomer's map of the crate is in [`docs`](crate::docs); in short, the
//! topology's turn and the intent a transaction records are in
//! `transaction.rs`, the commit that consumes it in `commit.rs`.

use crate::address_space::AddressSpace;
use crate::broadcast::DiffSender;
use crate::damage::RenderCaches;
use crate::error::{Error, Result};
use crate::fault::FaultLog;
use crate::listener::{ListenerEntry, ListenerId};
use crate::ops::{MemoryRegionOps, OpsConfig, RegionOps};
use crate::ram::RamBlock;
use crate::region::{check_size, MemoryRegion, RegionKind};
use crate::sync::{fence, thread_local, Arc, AtomicBool, AtomicU64, Mutex, MutexGuard, Ordering, Rcu, Weak};
use crate::transaction::{Intent, Turn};
use crate::types::HwAddr;
use std::ptr::NonNull;

/// The hook that drains a backend's coalesced-MMIO ring (see
/// [`Topology::set_coalesced_flush_hook`]).
pub type FlushHook = Arc<dyn Fn() + Send + Sync>;

/// State shared with regions and address spaces on the lock-free paths.
pub(crate) struct TopoShared {
    global_dirty: AtomicBool,
    /// Held weakly: a hook that refers to the topology (through an address
    /// space it replays writes into) must not keep it alive.
    flush_hook: Rcu<Option<Weak<dyn Fn() + Send + Sync>>>,
    /// The generation of the last commit whose views are all published.
    generation: AtomicU64,
    /// A sequence count, odd while a commit is publishing its views: lets a
    /// reader that cannot take the turn read every view at one generation
    /// (a seqlock; see `Topology::snapshot`).
    publication: AtomicU64,
    /// Writes that hit a watched code page (see `code_watch.rs`).
    code_epoch: AtomicU64,
    diffs: DiffSender,
}

impl TopoShared {
    pub(crate) fn global_dirty_log(&self) -> bool {
        self.global_dirty.load(Ordering::Acquire)
    }

    /// Sets global dirty logging; returns the previous value.
    pub(crate) fn set_global_dirty_log(&self, on: bool) -> bool {
        self.global_dirty.swap(on, Ordering::AcqRel)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A commit starts publishing views (turn holder only).
    pub(crate) fn begin_publication(&self) {
        let s = self.publication.load(Ordering::Relaxed);
        self.publication.store(s + 1, Ordering::Relaxed);
        fence(Ordering::Release);
    }

    /// Every view of commit `generation` is published: the topology's
    /// generation moves (turn holder only).
    pub(crate) fn end_publication(&self, generation: u64) {
        self.generation.store(generation, Ordering::Release);
        let s = self.publication.load(Ordering::Relaxed);
        self.publication.store(s + 1, Ordering::Release);
    }

    /// Runs `read` until it ran while no commit was publishing, and returns
    /// its result (the read side of the `publication` seqlock; `read` must
    /// only load atomics and published views).
    pub(crate) fn read_published<R>(&self, mut read: impl FnMut() -> R) -> R {
        loop {
            let s1 = self.publication.load(Ordering::Acquire);
            if s1 % 2 == 0 {
                let r = read();
                fence(Ordering::Acquire);
                if self.publication.load(Ordering::Relaxed) == s1 {
                    return r;
                }
            }
            crate::sync::yield_now();
        }
    }

    #[inline]
    pub(crate) fn code_write_epoch(&self) -> u64 {
        self.code_epoch.load(Ordering::Acquire)
    }

    /// A write hit a watched code page.
    pub(crate) fn code_written(&self) {
        self.code_epoch.fetch_add(1, Ordering::AcqRel);
    }

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
        if let Some(h) = hook.as_ref().as_ref().and_then(Weak::upgrade) {
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

/// The actor's state, touched by the holder of the turn (and read briefly
/// by queries such as [`Topology::address_spaces`]).
pub(crate) struct TopoState {
    pub(crate) address_spaces: Vec<AddressSpace>,
    pub(crate) listeners: Vec<Arc<ListenerEntry>>,
    next_listener: u64,
    /// What the open transaction did.
    pub(crate) intent: Intent,
    /// One rendered view per physical root.
    pub(crate) renders: RenderCaches,
}

pub(crate) struct TopoInner {
    id: u64,
    turn: Turn,
    state: Mutex<TopoState>,
    shared: Arc<TopoShared>,
    faults: FaultLog,
}

impl TopoInner {
    pub(crate) fn turn(&self) -> &Turn {
        &self.turn
    }
}

/// A memory topology: the region tree, its address spaces and listeners
/// (QEMU's global memory state, one per machine). Cloning gives another
/// handle to the same topology.
#[derive(Clone)]
pub struct Topology(Arc<TopoInner>);

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
            turn: Turn::new(),
            state: Mutex::new(TopoState {
                address_spaces: Vec::new(),
                listeners: Vec::new(),
                next_listener: 1,
                intent: Intent::default(),
                renders: RenderCaches::default(),
            }),
            shared: Arc::new(TopoShared {
                global_dirty: AtomicBool::new(false),
                flush_hook: Rcu::new(Arc::new(None)),
                generation: AtomicU64::new(0),
                publication: AtomicU64::new(0),
                code_epoch: AtomicU64::new(0),
                diffs: tx,
            }),
            faults: FaultLog::default(),
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

    // ----- crate plumbing ------------------------------------------------

    pub(crate) fn inner(&self) -> &TopoInner {
        &self.0
    }

    pub(crate) fn id(&self) -> u64 {
        self.0.id
    }

    pub(crate) fn downgrade(&self) -> Weak<TopoInner> {
        Arc::downgrade(&self.0)
    }

    pub(crate) fn upgrade(weak: &Weak<TopoInner>) -> Option<Topology> {
        weak.upgrade().map(Topology)
    }

    pub(crate) fn shared(&self) -> &Arc<TopoShared> {
        &self.0.shared
    }

    /// The actor's state, locked (briefly; never across a call out).
    pub(crate) fn state(&self) -> MutexGuard<'_, TopoState> {
        self.0.state.lock()
    }

    pub(crate) fn fault_log(&self) -> &FaultLog {
        &self.0.faults
    }

    pub(crate) fn diff_sender(&self) -> &DiffSender {
        &self.0.shared.diffs
    }

    /// The registered listeners, sorted by priority.
    pub(crate) fn listener_entries(&self) -> Vec<Arc<ListenerEntry>> {
        self.state().listeners.clone()
    }

    pub(crate) fn next_listener_id(&self) -> ListenerId {
        let mut st = self.state();
        let id = ListenerId(st.next_listener);
        st.next_listener += 1;
        id
    }

    /// Adds a listener after those of lower or equal priority.
    pub(crate) fn insert_listener(&self, entry: Arc<ListenerEntry>) {
        let mut st = self.state();
        let pos = st.listeners.iter().position(|l| l.priority > entry.priority).unwrap_or(st.listeners.len());
        st.listeners.insert(pos, entry);
    }

    /// Removes (and returns) the listeners matching `pred`.
    pub(crate) fn remove_listeners(&self, pred: impl Fn(&ListenerEntry) -> bool) -> Vec<Arc<ListenerEntry>> {
        let mut st = self.state();
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut st.listeners).into_iter().partition(|l| pred(l));
        st.listeners = kept;
        gone
    }

    // ----- public --------------------------------------------------------

    /// The generation of the most recent commit (0 before the first). It
    /// moves only once every view of that commit is published, so a reader
    /// that sees generation *g* and then loads a view sees the view of *g*
    /// or a newer one.
    pub fn generation(&self) -> u64 {
        self.0.shared.generation()
    }

    /// Installs the hook that drains a backend's coalesced-MMIO ring, or
    /// removes it. It is called at every transaction begin, before accesses
    /// to regions that flush coalesced MMIO, and when coalescing is cleared.
    ///
    /// The topology holds the hook weakly, so that a hook may replay writes
    /// into an address space (which refers to the topology) without keeping
    /// the topology alive: the backend keeps the `Arc` for as long as the
    /// hook should run.
    pub fn set_coalesced_flush_hook(&self, hook: Option<&FlushHook>) {
        self.0.shared.flush_hook.swap(Arc::new(hook.map(Arc::downgrade)));
    }

    /// Runs the coalesced-MMIO flush hook, if one is installed.
    pub fn flush_coalesced_mmio(&self) {
        self.0.shared.flush();
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
        if target.topo_id() != self.id() {
            return Err(Error::ForeignObject(target.name().to_string()));
        }
        if target.is_destroyed() {
            return Err(Error::Destroyed(target.name().to_string()));
        }
        let r = MemoryRegion::new(self, name, size, RegionKind::Alias { target: target.clone() });
        r.state().alias_offset = offset;
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
        r.state().readonly = true;
        Ok(r)
    }

    /// `memory_region_init_reservation`: claims space nothing in the runtime
    /// serves. Guest accesses return [`MemTxResult::ReservationAccess`](crate::MemTxResult)
    /// (read 0, writes dropped) instead of aborting.
    pub fn new_reservation(&self, name: &str, size: u128) -> Result<MemoryRegion> {
        check_size(name, size)?;
        Ok(MemoryRegion::new(self, name, size, RegionKind::Reservation))
    }
}
