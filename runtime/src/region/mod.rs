//! Memory regions: the nodes of the topology tree.
//!
//! A [`MemoryRegion`] is a cheap, cloneable handle. Its kind, name and size
//! are fixed at creation; its mutable attributes (address, priority, enabled,
//! readonly, alias offset, romd mode, coalescing, ioeventfds, dirty-log mask)
//! change only through the topology actor and take effect for the guest at
//! the outermost commit.
//!
//! This module holds the node and its queries; the mutators live beside it:
//! [`tree`] (subregions, address, enable, destroy) and [`attributes`]
//! (readonly, alias offset, romd, dirty-log mask, flush-coalesced). The
//! ioeventfds, coalesced ranges and dirty bitmaps of a region have files of
//! their own (`ioeventfd.rs`, `coalesced.rs`, `dirty_log.rs`).

mod attributes;
mod tree;

use crate::coalesced::RegionCoalescing;
use crate::error::{Error, Result};
use crate::ioeventfd::RegionEventfds;
use crate::ops::RegionOps;
use crate::ram::{RamBlock, RamSlice};
use crate::sync::{Arc, AtomicUsize, Mutex, MutexGuard, Ordering, Weak};
use crate::topology::{TopoInner, TopoShared, Topology};
use crate::types::{DirtyClient, HwAddr, SIZE_MAX};

/// A process-unique region identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(u64);

impl RegionId {
    /// The raw number.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

/// The fixed kind of a region.
pub(crate) enum RegionKind {
    /// A pure container (`memory_region_init`).
    Container,
    /// Device callbacks (`memory_region_init_io`).
    Io(RegionOps),
    /// RAM (`memory_region_init_ram`, `_ram_ptr`).
    Ram(RamBlock),
    /// RAM for reads while in romd mode, ops for writes.
    RomDevice { ops: RegionOps, ram: RamBlock },
    /// A window onto another region.
    Alias { target: MemoryRegion },
    /// Claims space that nothing in the runtime serves.
    Reservation,
}

/// Where a subregion sits in its container: `[start, last]`, and whether it
/// can render anything at all (enabled and not empty).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildGeo {
    pub(crate) start: u64,
    pub(crate) last: u64,
    pub(crate) live: bool,
}

impl ChildGeo {
    pub(crate) fn of(addr: u64, size: u128, enabled: bool) -> ChildGeo {
        let last = (addr as u128 + size.max(1) - 1).min(u64::MAX as u128) as u64;
        ChildGeo { start: addr, last, live: enabled && size > 0 }
    }
}

/// The mutable attributes of a region that rendering reads; changed only by
/// the thread holding the topology's turn.
pub(crate) struct RegionState {
    pub(crate) parent: Option<Weak<RegionInner>>,
    pub(crate) addr: HwAddr,
    pub(crate) priority: i32,
    pub(crate) enabled: bool,
    pub(crate) readonly: bool,
    pub(crate) romd: bool,
    pub(crate) alias_offset: HwAddr,
    /// Sorted by descending priority, newest first among equals.
    pub(crate) subregions: Vec<MemoryRegion>,
    /// Placement of each subregion (same order), so rendering can skip
    /// children far from the addresses it renders without locking them.
    pub(crate) child_geo: Vec<ChildGeo>,
    pub(crate) dirty_log_mask: u8,
    pub(crate) destroyed: bool,
}

pub(crate) struct RegionInner {
    id: RegionId,
    name: Arc<str>,
    size: u128,
    kind: RegionKind,
    topo_id: u64,
    topo: Weak<TopoInner>,
    shared: Arc<TopoShared>,
    state: Mutex<RegionState>,
    eventfds: RegionEventfds,
    coalescing: RegionCoalescing,
    /// Number of live aliases whose target is this region.
    alias_refs: AtomicUsize,
    /// Number of live address spaces rooted here.
    as_roots: AtomicUsize,
    /// The aliases whose target this region is.
    aliases: Mutex<Vec<Weak<RegionInner>>>,
}

impl Drop for RegionInner {
    fn drop(&mut self) {
        if let RegionKind::Alias { target } = &self.kind {
            if !self.state.lock().destroyed {
                target.0.alias_refs.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// A handle to a memory region (QEMU's `MemoryRegion *`). Clones refer to the
/// same region; the region, its host memory and its device live while any
/// handle, container, alias or published FlatView refers to it.
#[derive(Clone)]
pub struct MemoryRegion(Arc<RegionInner>);

/// A handle that does not keep the region alive (for a device that needs to
/// change its own region without owning it, which would keep it alive
/// forever).
#[derive(Clone, Debug)]
pub struct WeakRegion(Weak<RegionInner>);

impl WeakRegion {
    /// The region, if it still exists.
    pub fn upgrade(&self) -> Option<MemoryRegion> {
        self.0.upgrade().map(MemoryRegion)
    }
}

impl std::fmt::Debug for RegionInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionInner").field("name", &self.name).finish_non_exhaustive()
    }
}

impl PartialEq for MemoryRegion {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for MemoryRegion {}

impl std::hash::Hash for MemoryRegion {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.id.hash(state)
    }
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("name", &self.name())
            .field("size", &format_args!("{:#x}", self.size()))
            .field("kind", &self.kind_name())
            .finish()
    }
}

/// Checks a region size: at most 2^64.
pub(crate) fn check_size(name: &str, size: u128) -> Result<()> {
    if size > SIZE_MAX {
        return Err(Error::Overflow(format!("region `{name}` of size {size:#x} exceeds 2^64")));
    }
    Ok(())
}

impl MemoryRegion {
    /// A new region of `topo` (the constructors are on [`Topology`]).
    pub(crate) fn new(topo: &Topology, name: &str, size: u128, kind: RegionKind) -> MemoryRegion {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        if let RegionKind::Alias { target } = &kind {
            target.0.alias_refs.fetch_add(1, Ordering::AcqRel);
        }
        let r = MemoryRegion(Arc::new(RegionInner {
            id: RegionId(NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            name: Arc::from(name),
            size,
            kind,
            topo_id: topo.id(),
            topo: topo.downgrade(),
            shared: topo.shared().clone(),
            state: Mutex::new(RegionState {
                parent: None,
                addr: 0,
                priority: 0,
                enabled: true,
                readonly: false,
                romd: true,
                alias_offset: 0,
                subregions: Vec::new(),
                child_geo: Vec::new(),
                dirty_log_mask: 0,
                destroyed: false,
            }),
            eventfds: RegionEventfds::default(),
            coalescing: RegionCoalescing::default(),
            alias_refs: AtomicUsize::new(0),
            as_roots: AtomicUsize::new(0),
            aliases: Mutex::new(Vec::new()),
        }));
        if let RegionKind::Alias { target } = &r.0.kind {
            let mut list = target.0.aliases.lock();
            list.retain(|w| w.strong_count() > 0);
            list.push(Arc::downgrade(&r.0));
        }
        r
    }

    // ----- crate plumbing ------------------------------------------------

    /// The region's kind.
    pub(crate) fn kind(&self) -> &RegionKind {
        &self.0.kind
    }

    /// The region's mutable attributes, locked. Held only briefly and never
    /// across a call out of the runtime.
    pub(crate) fn state(&self) -> MutexGuard<'_, RegionState> {
        self.0.state.lock()
    }

    /// The topology state shared with the lock-free paths.
    pub(crate) fn shared(&self) -> &TopoShared {
        &self.0.shared
    }

    /// The identity of the topology the region belongs to.
    pub(crate) fn topo_id(&self) -> u64 {
        self.0.topo_id
    }

    /// The region's ioeventfds.
    pub(crate) fn eventfd_state(&self) -> &RegionEventfds {
        &self.0.eventfds
    }

    /// The region's coalesced ranges and flush flag.
    pub(crate) fn coalescing(&self) -> &RegionCoalescing {
        &self.0.coalescing
    }

    /// Counts an address space rooted at this region (`delta` is +1 or -1).
    pub(crate) fn count_as_root(&self, add: bool) {
        if add {
            self.0.as_roots.fetch_add(1, Ordering::AcqRel);
        } else {
            self.0.as_roots.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether some live address space is rooted at this region.
    pub(crate) fn is_as_root(&self) -> bool {
        self.0.as_roots.load(Ordering::Acquire) > 0
    }

    /// The live aliases whose target is this region.
    pub(crate) fn aliases(&self) -> Vec<MemoryRegion> {
        self.0.aliases.lock().iter().filter_map(Weak::upgrade).map(MemoryRegion).collect()
    }

    pub(crate) fn ram_block(&self) -> Option<&RamBlock> {
        match &self.0.kind {
            RegionKind::Ram(b) => Some(b),
            RegionKind::RomDevice { ram, .. } => Some(ram),
            _ => None,
        }
    }

    pub(crate) fn ops(&self) -> Option<&RegionOps> {
        match &self.0.kind {
            RegionKind::Io(o) => Some(o),
            RegionKind::RomDevice { ops, .. } => Some(ops),
            _ => None,
        }
    }

    pub(crate) fn need_ram(&self) -> Result<&RamBlock> {
        self.ram_block().ok_or_else(|| Error::WrongKind { region: self.name().to_string(), expected: "RAM" })
    }

    /// The topology, if it still exists.
    pub(crate) fn topology(&self) -> Result<Topology> {
        Topology::upgrade(&self.0.topo).ok_or(Error::TopologyGone)
    }

    pub(crate) fn check_same_topology(&self, other: &MemoryRegion) -> Result<()> {
        if self.0.topo_id != other.0.topo_id {
            return Err(Error::ForeignObject(other.name().to_string()));
        }
        Ok(())
    }

    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.0.state.lock().destroyed {
            return Err(Error::Destroyed(self.name().to_string()));
        }
        Ok(())
    }

    /// Runs `f` as one mutation inside the topology actor: nested in the
    /// caller's transaction if there is one, its own transaction otherwise.
    pub(crate) fn mutate<R>(&self, f: impl FnOnce(&Topology) -> Result<R>) -> Result<R> {
        let topo = self.topology()?;
        topo.with_mutation(|| {
            self.check_alive()?;
            f(&topo)
        })
    }

    // ----- queries -------------------------------------------------------

    /// A handle that does not keep the region alive.
    pub fn downgrade(&self) -> WeakRegion {
        WeakRegion(Arc::downgrade(&self.0))
    }

    /// The region's identity.
    pub fn id(&self) -> RegionId {
        self.0.id
    }

    /// `memory_region_name`.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The name as a shared string.
    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.0.name
    }

    /// `memory_region_size`: up to 2^64, hence `u128`.
    pub fn size(&self) -> u128 {
        self.0.size
    }

    /// The kind as a word ("container", "io", "ram", "rom-device", "alias",
    /// "reservation").
    pub fn kind_name(&self) -> &'static str {
        match &self.0.kind {
            RegionKind::Container => "container",
            RegionKind::Io(_) => "io",
            RegionKind::Ram(_) => "ram",
            RegionKind::RomDevice { .. } => "rom-device",
            RegionKind::Alias { .. } => "alias",
            RegionKind::Reservation => "reservation",
        }
    }

    /// `memory_region_is_ram`: RAM or RAM from a caller's pointer.
    pub fn is_ram(&self) -> bool {
        matches!(self.0.kind, RegionKind::Ram(_))
    }

    /// `memory_region_is_rom`: RAM that is read-only.
    pub fn is_rom(&self) -> bool {
        self.is_ram() && self.0.state.lock().readonly
    }

    /// True for ROM devices (`memory_region_init_rom_device`).
    pub fn is_rom_device(&self) -> bool {
        matches!(self.0.kind, RegionKind::RomDevice { .. })
    }

    /// `memory_region_is_romd`: a ROM device currently in romd (array) mode.
    pub fn is_romd(&self) -> bool {
        self.is_rom_device() && self.0.state.lock().romd
    }

    /// True for aliases.
    pub fn is_alias(&self) -> bool {
        matches!(self.0.kind, RegionKind::Alias { .. })
    }

    /// True for reservations.
    pub fn is_reservation(&self) -> bool {
        matches!(self.0.kind, RegionKind::Reservation)
    }

    /// True for pure containers.
    pub fn is_container(&self) -> bool {
        matches!(self.0.kind, RegionKind::Container)
    }

    /// QEMU's `terminates`: RAM, I/O, ROM device and reservation regions
    /// fill the gaps their children leave; containers and aliases do not.
    pub(crate) fn terminates(&self) -> bool {
        !matches!(self.0.kind, RegionKind::Container | RegionKind::Alias { .. })
    }

    /// `memory_region_is_logging`: any dirty-log client is on.
    pub fn is_logging(&self) -> bool {
        self.0.state.lock().dirty_log_mask != 0
    }

    /// The region's own dirty-log mask (bits of [`DirtyClient::mask`]).
    pub fn dirty_log_mask(&self) -> u8 {
        self.0.state.lock().dirty_log_mask
    }

    /// `memory_region_get_dirty_log_mask`: the clients logging the region's
    /// writes, its own mask plus MIGRATION for RAM while global dirty
    /// logging is on (what an accelerator's dirty-log flag follows).
    pub fn effective_dirty_log_mask(&self) -> u8 {
        self.effective_dirty_mask(self.dirty_log_mask())
    }

    /// QEMU's `memory_region_get_dirty_log_mask`: the own mask plus
    /// MIGRATION for RAM while global dirty logging is on.
    pub(crate) fn effective_dirty_mask(&self, own: u8) -> u8 {
        if self.0.shared.global_dirty_log() && self.ram_block().is_some() {
            own | DirtyClient::Migration.mask()
        } else {
            own
        }
    }

    /// Address within the container (or as last set).
    pub fn addr(&self) -> HwAddr {
        self.0.state.lock().addr
    }

    /// Priority among siblings.
    pub fn priority(&self) -> i32 {
        self.0.state.lock().priority
    }

    /// Whether the region is enabled.
    pub fn is_enabled(&self) -> bool {
        self.0.state.lock().enabled
    }

    /// The region's own readonly flag.
    pub fn is_readonly(&self) -> bool {
        self.0.state.lock().readonly
    }

    /// The container, if the region is a subregion.
    pub fn container(&self) -> Option<MemoryRegion> {
        self.0.state.lock().parent.as_ref().and_then(Weak::upgrade).map(MemoryRegion)
    }

    /// The subregions in rendering order (priority descending, newest first).
    pub fn subregions(&self) -> Vec<MemoryRegion> {
        self.0.state.lock().subregions.clone()
    }

    /// For an alias: its target.
    pub fn alias_target(&self) -> Option<MemoryRegion> {
        match &self.0.kind {
            RegionKind::Alias { target } => Some(target.clone()),
            _ => None,
        }
    }

    /// For an alias: its offset into the target.
    pub fn alias_offset(&self) -> HwAddr {
        self.0.state.lock().alias_offset
    }

    /// Whether [`destroy`](Self::destroy) was called.
    pub fn is_destroyed(&self) -> bool {
        self.0.state.lock().destroyed
    }

    /// Safe access to the region's host memory (RAM and ROM devices).
    pub fn ram(&self) -> Result<RamSlice> {
        self.need_ram()?;
        Ok(RamSlice { region: self.clone() })
    }

    /// `memory_region_get_ram_ptr`: the host address of the region's memory,
    /// valid while the region is alive. For KVM memslots and similar; use
    /// [`ram`](Self::ram) for safe access. The memory is shared with the
    /// guest and every vCPU: whoever dereferences the pointer must use atomic
    /// (or volatile) accesses (see [guest RAM](crate::docs#guest-ram)).
    pub fn ram_ptr(&self) -> Result<*mut u8> {
        Ok(self.need_ram()?.host_ptr().as_ptr())
    }

    /// `memory_region_get_ram_addr`: the region's offset in the global RAM
    /// address space.
    pub fn ram_addr(&self) -> Result<u64> {
        Ok(self.need_ram()?.ram_addr)
    }
}
