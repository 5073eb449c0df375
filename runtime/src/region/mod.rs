//! Memory regions: the nodes of the topology tree.
//!
//! A [`MemoryRegion`] is a cheap, cloneable handle. Its kind, name and size
//! are fixed at creation; its mutable attributes (address, priority, enabled,
//! readonly, alias offset, romd mode, coalescing, ioeventfds, dirty-log mask)
//! change only through the topology actor and take effect for the guest at
//! the outermost commit.

use crate::error::{Error, Result};
use crate::ops::RegionOps;
use crate::ram::{RamBlock, RamSlice};
use crate::sync::{Arc, AtomicBool, AtomicUsize, Mutex, Ordering, Rcu, Weak};
use crate::topology::{TopoInner, TopoShared, Topology};
use crate::types::{DirtyClient, HwAddr, SIZE_MAX};
use std::collections::HashSet;
use vmm_sys_util::eventfd::EventFd;

/// A process-unique region identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub(crate) u64);

impl RegionId {
    /// The raw number.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

/// The eventfd signalled by an ioeventfd (QEMU's `EventNotifier`).
pub type EventNotifier = Arc<EventFd>;

/// Makes a new non-blocking eventfd for [`MemoryRegion::add_eventfd`].
pub fn new_event_notifier() -> Result<EventNotifier> {
    EventFd::new(libc::EFD_NONBLOCK).map(Arc::new).map_err(|e| Error::Eventfd(e.to_string()))
}

/// One ioeventfd of a region (`MemoryRegionIoeventfd`): a write of `size`
/// bytes at `addr` (matching `data` if `match_data`) signals `notifier`
/// instead of reaching the device. A size of 0 matches any size.
#[derive(Clone)]
pub struct Ioeventfd {
    /// Offset within the region (or, in an address-space set, the address).
    pub addr: HwAddr,
    /// Access size to match; 0 matches any.
    pub size: u64,
    /// Whether `data` must match.
    pub match_data: bool,
    /// The value to match, in the device's byte order as the guest writes it.
    pub data: u64,
    /// The eventfd to signal.
    pub notifier: EventNotifier,
}

impl Ioeventfd {
    fn key(&self) -> (HwAddr, u64, bool, u64, usize) {
        (self.addr, self.size, self.match_data, if self.match_data { self.data } else { 0 }, self.notifier_key())
    }

    pub(crate) fn notifier_key(&self) -> usize {
        Arc::as_ptr(&self.notifier) as usize
    }

    /// QEMU's `memory_region_ioeventfd_before` order.
    pub(crate) fn before(&self, other: &Ioeventfd) -> bool {
        self.key() < other.key()
    }

    /// QEMU's `memory_region_ioeventfd_equal`, where a zero size on either
    /// side matches any size.
    pub(crate) fn matches(&self, other: &Ioeventfd) -> bool {
        self.addr == other.addr
            && (self.size == other.size || self.size == 0 || other.size == 0)
            && self.match_data == other.match_data
            && (!self.match_data || self.data == other.data)
            && self.notifier_key() == other.notifier_key()
    }
}

impl std::fmt::Debug for Ioeventfd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioeventfd")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("size", &self.size)
            .field("match_data", &self.match_data)
            .field("data", &format_args!("{:#x}", self.data))
            .finish()
    }
}

impl PartialEq for Ioeventfd {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Ioeventfd {}

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
    fn of(addr: u64, size: u128, enabled: bool) -> ChildGeo {
        let last = (addr as u128 + size.max(1) - 1).min(u64::MAX as u128) as u64;
        ChildGeo { start: addr, last, live: enabled && size > 0 }
    }
}

/// The mutable attributes of a region; changed only by the topology actor.
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
    /// Coalesced ranges within the region: (offset, size).
    pub(crate) coalesced: Vec<(HwAddr, u128)>,
    pub(crate) dirty_log_mask: u8,
    /// Sorted by the "before" order.
    pub(crate) ioeventfds: Vec<Ioeventfd>,
    pub(crate) destroyed: bool,
}

pub(crate) struct RegionInner {
    pub(crate) id: RegionId,
    pub(crate) name: Arc<str>,
    pub(crate) size: u128,
    pub(crate) kind: RegionKind,
    pub(crate) topo_id: u64,
    pub(crate) topo: Weak<TopoInner>,
    pub(crate) shared: Arc<TopoShared>,
    pub(crate) state: Mutex<RegionState>,
    /// Flush coalesced MMIO before accesses (read lock-free on dispatch).
    pub(crate) flush_coalesced: AtomicBool,
    /// Snapshot of `state.ioeventfds` for the dispatch path.
    pub(crate) eventfds: Rcu<Vec<Ioeventfd>>,
    /// Whether `eventfds` is non-empty (checked before loading it).
    pub(crate) has_eventfds: AtomicBool,
    /// Number of live aliases whose target is this region.
    pub(crate) alias_refs: AtomicUsize,
    /// Number of live address spaces rooted here.
    pub(crate) as_roots: AtomicUsize,
    /// The aliases whose target this region is.
    pub(crate) aliases: Mutex<Vec<Weak<RegionInner>>>,
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
pub struct MemoryRegion(pub(crate) Arc<RegionInner>);

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
    pub(crate) fn new(topo: &Topology, name: &str, size: u128, kind: RegionKind) -> MemoryRegion {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let inner = &topo.0;
        if let RegionKind::Alias { target } = &kind {
            target.0.alias_refs.fetch_add(1, Ordering::AcqRel);
        }
        let r = MemoryRegion(Arc::new(RegionInner {
            id: RegionId(NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            name: Arc::from(name),
            size,
            kind,
            topo_id: inner.id,
            topo: Arc::downgrade(inner),
            shared: inner.shared.clone(),
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
                coalesced: Vec::new(),
                dirty_log_mask: 0,
                ioeventfds: Vec::new(),
                destroyed: false,
            }),
            flush_coalesced: AtomicBool::new(false),
            eventfds: Rcu::new(Arc::new(Vec::new())),
            has_eventfds: AtomicBool::new(false),
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

    /// The live aliases whose target is this region.
    pub(crate) fn aliases(&self) -> Vec<MemoryRegion> {
        self.0.aliases.lock().iter().filter_map(Weak::upgrade).map(MemoryRegion).collect()
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

    /// QEMU's `memory_region_get_dirty_log_mask`: the own mask plus
    /// MIGRATION for RAM while global dirty logging is on.
    pub(crate) fn effective_dirty_mask(&self, own: u8) -> u8 {
        let global = self.0.shared.global_dirty.load(Ordering::Acquire);
        if global && self.ram_block().is_some() {
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

    /// The coalesced ranges (offset, size) of the region.
    pub fn coalesced_ranges(&self) -> Vec<(HwAddr, u128)> {
        self.0.state.lock().coalesced.clone()
    }

    /// Whether coalesced MMIO is flushed before accesses to the region.
    pub fn flush_coalesced(&self) -> bool {
        self.0.flush_coalesced.load(Ordering::Acquire)
    }

    /// The region's ioeventfds, in QEMU's sorted order.
    pub fn ioeventfds(&self) -> Vec<Ioeventfd> {
        self.0.state.lock().ioeventfds.clone()
    }

    /// Whether [`destroy`](Self::destroy) was called.
    pub fn is_destroyed(&self) -> bool {
        self.0.state.lock().destroyed
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

    fn need_ram(&self) -> Result<&RamBlock> {
        self.ram_block().ok_or_else(|| Error::WrongKind { region: self.name().to_string(), expected: "RAM" })
    }

    /// Safe access to the region's host memory (RAM and ROM devices).
    pub fn ram(&self) -> Result<RamSlice> {
        self.need_ram()?;
        Ok(RamSlice { region: self.clone() })
    }

    /// `memory_region_get_ram_ptr`: the host address of the region's memory,
    /// valid while the region is alive. For KVM memslots and similar; use
    /// [`ram`](Self::ram) for safe access.
    pub fn ram_ptr(&self) -> Result<*mut u8> {
        Ok(self.need_ram()?.host_ptr().as_ptr())
    }

    /// `memory_region_get_ram_addr`: the region's offset in the global RAM
    /// address space.
    pub fn ram_addr(&self) -> Result<u64> {
        Ok(self.need_ram()?.ram_addr)
    }

    // ----- dirty logging --------------------------------------------------

    fn dirty_range(&self, addr: HwAddr, size: u64) -> Result<&RamBlock> {
        let b = self.need_ram()?;
        if addr as u128 + size as u128 > b.len() as u128 {
            return Err(Error::OutOfRange { region: self.name().to_string(), offset: addr, size: size as u128 });
        }
        Ok(b)
    }

    /// `memory_region_get_dirty`: true if any page touched by the range is
    /// dirty for `client` (the range is widened to whole pages).
    pub fn get_dirty(&self, addr: HwAddr, size: u64, client: DirtyClient) -> Result<bool> {
        Ok(self.dirty_range(addr, size)?.dirty.get_range(addr, size, client))
    }

    /// `memory_region_set_dirty`: marks the pages of the range dirty for the
    /// clients in the region's log mask, plus MIGRATION while global dirty
    /// logging is on.
    pub fn set_dirty(&self, addr: HwAddr, size: u64) -> Result<()> {
        let b = self.dirty_range(addr, size)?;
        let mask = self.effective_dirty_mask(self.dirty_log_mask());
        b.dirty.set_range(addr, size, mask);
        Ok(())
    }

    /// Marks pages dirty for an explicit set of clients (used by the KVM
    /// dirty-log sync, which reports pages dirty for every client).
    pub fn set_dirty_for(&self, addr: HwAddr, size: u64, mask: u8) -> Result<()> {
        self.dirty_range(addr, size)?.dirty.set_range(addr, size, mask);
        Ok(())
    }

    /// `memory_region_reset_dirty`: clears the range's pages for `client`.
    pub fn reset_dirty(&self, addr: HwAddr, size: u64, client: DirtyClient) -> Result<()> {
        self.dirty_range(addr, size)?.dirty.reset_range(addr, size, client);
        Ok(())
    }

    /// `memory_region_test_and_clear_dirty`: clears the range for `client`
    /// and tells whether any of its pages was dirty, atomically per word.
    pub fn test_and_clear_dirty(&self, addr: HwAddr, size: u64, client: DirtyClient) -> Result<bool> {
        Ok(self.dirty_range(addr, size)?.dirty.test_and_clear_range(addr, size, client))
    }

    /// Harvests the range for `client` (modern QEMU's
    /// `memory_region_snapshot_and_clear_dirty`): returns the first page
    /// number and one bit per page from it, clearing what it returns.
    pub fn snapshot_and_clear_dirty(&self, addr: HwAddr, size: u64, client: DirtyClient) -> Result<(u64, Vec<u64>)> {
        Ok(self.dirty_range(addr, size)?.dirty.snapshot_and_clear(addr, size, client))
    }

    /// Marks pages dirty after a write of `len` bytes at `off` through the
    /// runtime, with the mask of the flat range that was written.
    #[inline]
    pub(crate) fn dirty_after_write(&self, off: u64, len: u64, mask: u8) {
        if mask != 0 {
            if let Some(b) = self.ram_block() {
                b.dirty.set_range(off, len, mask & !DirtyClient::Code.mask());
            }
        }
    }

    // ----- mutators (through the topology actor) -----------------------------

    pub(crate) fn topology(&self) -> Result<Topology> {
        self.0.topo.upgrade().map(Topology).ok_or(Error::TopologyGone)
    }

    fn check_same_topology(&self, other: &MemoryRegion) -> Result<()> {
        if self.0.topo_id != other.0.topo_id {
            return Err(Error::ForeignObject(other.name().to_string()));
        }
        Ok(())
    }

    fn check_alive(&self) -> Result<()> {
        if self.0.state.lock().destroyed {
            return Err(Error::Destroyed(self.name().to_string()));
        }
        Ok(())
    }

    /// Runs `f` as one mutation inside the topology actor: nested in the
    /// caller's transaction if there is one, its own transaction otherwise.
    fn mutate<R>(&self, f: impl FnOnce(&Topology) -> Result<R>) -> Result<R> {
        let topo = self.topology()?;
        topo.with_mutation(|| {
            self.check_alive()?;
            f(&topo)
        })
    }

    /// True if `target` can be reached from `self` through subregions and
    /// alias targets (including `self == target`).
    fn reaches(&self, target: &MemoryRegion) -> bool {
        let mut seen = HashSet::new();
        let mut stack = vec![self.clone()];
        while let Some(r) = stack.pop() {
            if r == *target {
                return true;
            }
            if !seen.insert(r.id()) {
                continue;
            }
            if let Some(t) = r.alias_target() {
                stack.push(t);
            }
            stack.extend(r.0.state.lock().subregions.iter().cloned());
        }
        false
    }

    /// Changes one attribute that rendering reads: nothing happens if the
    /// value does not change; otherwise a commit is due (if the region is
    /// enabled, QEMU's rule) and the region is re-rendered where it shows.
    fn update_attr<T: PartialEq + Copy>(
        &self,
        field: fn(&mut RegionState) -> &mut T,
        new: impl FnOnce(T) -> T,
    ) -> Result<()> {
        self.mutate(|topo| {
            let mut st = self.0.state.lock();
            let slot = field(&mut st);
            let value = new(*slot);
            if *slot == value {
                return Ok(());
            }
            *slot = value;
            let pending = st.enabled;
            drop(st);
            topo.mark_pending(pending);
            topo.damage_region(self);
            Ok(())
        })
    }

    fn add_subregion_common(&self, offset: HwAddr, child: &MemoryRegion, priority: i32) -> Result<()> {
        self.check_same_topology(child)?;
        self.mutate(|topo| {
            child.check_alive()?;
            if self.is_alias() {
                return Err(Error::AliasCannotContain(self.name().to_string()));
            }
            if let Some(p) = child.container() {
                return Err(Error::AlreadyHasParent { region: child.name().to_string(), parent: p.name().to_string() });
            }
            if child.0.state.lock().parent.is_some() {
                // The parent is being dropped; treat as still attached.
                return Err(Error::AlreadyHasParent { region: child.name().to_string(), parent: "?".into() });
            }
            if child.reaches(self) {
                return Err(Error::AliasCycle { region: child.name().to_string(), container: self.name().to_string() });
            }
            {
                let mut cs = child.0.state.lock();
                cs.parent = Some(Arc::downgrade(&self.0));
                cs.addr = offset;
                cs.priority = priority;
            }
            let child_enabled = child.is_enabled();
            let mut st = self.0.state.lock();
            // Insert before the first sibling whose priority is <= ours.
            let pos =
                st.subregions.iter().position(|o| o.0.state.lock().priority <= priority).unwrap_or(st.subregions.len());
            st.subregions.insert(pos, child.clone());
            st.child_geo.insert(pos, ChildGeo::of(offset, child.size(), child_enabled));
            let pending = st.enabled && child_enabled;
            drop(st);
            topo.mark_pending(pending);
            topo.damage_child(self, offset, child.size());
            // The child renders at its own address where it is a root (of an
            // address space, or of a shared view): those views move with it.
            topo.damage_root_placed(child);
            Ok(())
        })
    }

    /// `memory_region_add_subregion`: adds `child` at `offset` with priority 0.
    pub fn add_subregion(&self, offset: HwAddr, child: &MemoryRegion) -> Result<()> {
        self.add_subregion_common(offset, child, 0)
    }

    /// `memory_region_add_subregion_overlap`: adds `child` at `offset` with a
    /// priority; higher priorities hide lower ones, and among equal
    /// priorities the most recently added child wins.
    pub fn add_subregion_overlap(&self, offset: HwAddr, child: &MemoryRegion, priority: i32) -> Result<()> {
        self.add_subregion_common(offset, child, priority)
    }

    /// `memory_region_del_subregion`.
    pub fn del_subregion(&self, child: &MemoryRegion) -> Result<()> {
        self.check_same_topology(child)?;
        self.mutate(|topo| {
            let mut st = self.0.state.lock();
            let Some(pos) = st.subregions.iter().position(|c| c == child) else {
                return Err(Error::NotAChild { region: child.name().to_string(), container: self.name().to_string() });
            };
            let removed = st.subregions.remove(pos);
            st.child_geo.remove(pos);
            let pending = st.enabled && child.is_enabled();
            drop(st);
            let addr = {
                let mut cs = removed.0.state.lock();
                cs.parent = None;
                cs.addr
            };
            drop(removed);
            topo.mark_pending(pending);
            topo.damage_child(self, addr, child.size());
            Ok(())
        })
    }

    /// `memory_region_set_enabled`.
    pub fn set_enabled(&self, enabled: bool) -> Result<()> {
        self.mutate(|topo| {
            let mut st = self.0.state.lock();
            if st.enabled == enabled {
                return Ok(());
            }
            st.enabled = enabled;
            let parent = st.parent.as_ref().and_then(Weak::upgrade);
            let geo = ChildGeo::of(st.addr, self.size(), enabled);
            drop(st);
            if let Some(p) = parent {
                let mut ps = p.state.lock();
                if let Some(k) = ps.subregions.iter().position(|c| Arc::ptr_eq(&c.0, &self.0)) {
                    ps.child_geo[k] = geo;
                }
            }
            topo.mark_pending(true);
            topo.damage_enable(self);
            Ok(())
        })
    }

    /// `memory_region_set_address`: moves the region within its container.
    /// A real move re-inserts it, so it becomes the newest among siblings of
    /// equal priority (as in QEMU).
    pub fn set_address(&self, addr: HwAddr) -> Result<()> {
        let topo = self.topology()?;
        topo.with_mutation(|| {
            self.check_alive()?;
            let (cur, parent, prio) = {
                let st = self.0.state.lock();
                (st.addr, st.parent.as_ref().and_then(Weak::upgrade), st.priority)
            };
            match parent {
                Some(p) if cur != addr => {
                    let p = MemoryRegion(p);
                    p.del_subregion(self)?;
                    p.add_subregion_common(addr, self, prio)
                }
                _ => {
                    // No container: QEMU only stores the address. The root of
                    // an address space renders at its own address, though, so
                    // re-render rather than leave its view stale.
                    let moved = {
                        let mut st = self.0.state.lock();
                        let moved = st.addr != addr;
                        st.addr = addr;
                        moved && st.enabled
                    };
                    topo.mark_pending(moved && self.0.as_roots.load(Ordering::Acquire) > 0);
                    if moved {
                        topo.damage_region(self);
                    }
                    Ok(())
                }
            }
        })
    }

    /// `memory_region_set_alias_offset`.
    pub fn set_alias_offset(&self, offset: HwAddr) -> Result<()> {
        if !self.is_alias() {
            return Err(Error::WrongKind { region: self.name().to_string(), expected: "an alias" });
        }
        self.update_attr(|st| &mut st.alias_offset, |_| offset)
    }

    /// `memory_region_set_readonly`.
    pub fn set_readonly(&self, readonly: bool) -> Result<()> {
        self.update_attr(|st| &mut st.readonly, |_| readonly)
    }

    /// `memory_region_rom_device_set_readable` (modern `set_romd`): in romd
    /// mode reads come straight from the backing RAM; otherwise they reach
    /// the ops too.
    pub fn rom_device_set_readable(&self, readable: bool) -> Result<()> {
        if !self.is_rom_device() {
            return Err(Error::WrongKind { region: self.name().to_string(), expected: "a ROM device" });
        }
        self.update_attr(|st| &mut st.romd, |_| readable)
    }

    /// `memory_region_set_log`: turns dirty logging for one client on or off.
    /// A call that changes nothing triggers nothing.
    pub fn set_log(&self, log: bool, client: DirtyClient) -> Result<()> {
        let bit = client.mask();
        self.update_attr(|st| &mut st.dirty_log_mask, |m| if log { m | bit } else { m & !bit })
    }

    /// `memory_region_set_coalescing`: coalesce the whole region.
    pub fn set_coalescing(&self) -> Result<()> {
        let topo = self.topology()?;
        topo.with_mutation(|| {
            self.clear_coalescing()?;
            self.add_coalescing(0, self.size())
        })
    }

    /// `memory_region_add_coalescing`: coalesce writes to a sub-range.
    /// Sends `coalesced_mmio_add` for each place the region is mapped and
    /// turns on flushing before accesses. Nothing is re-rendered.
    pub fn add_coalescing(&self, offset: HwAddr, size: u128) -> Result<()> {
        if offset as u128 + size > self.size() {
            return Err(Error::OutOfRange { region: self.name().to_string(), offset, size });
        }
        self.mutate(|topo| {
            self.0.state.lock().coalesced.push((offset, size));
            self.0.flush_coalesced.store(true, Ordering::Release);
            topo.coalesced_notify(self, offset, size, true);
            Ok(())
        })
    }

    /// `memory_region_clear_coalescing`: flushes the ring, removes every
    /// coalesced range (sending `coalesced_mmio_del`) and stops flushing.
    pub fn clear_coalescing(&self) -> Result<()> {
        let topo = self.topology()?;
        if self.0.state.lock().coalesced.is_empty() {
            return Ok(());
        }
        topo.flush_coalesced_mmio();
        self.mutate(|topo| {
            self.0.flush_coalesced.store(false, Ordering::Release);
            let ranges = std::mem::take(&mut self.0.state.lock().coalesced);
            for (off, size) in ranges {
                topo.coalesced_notify(self, off, size, false);
            }
            Ok(())
        })
    }

    /// `memory_region_set_flush_coalesced`.
    pub fn set_flush_coalesced(&self) -> Result<()> {
        self.check_alive()?;
        self.0.flush_coalesced.store(true, Ordering::Release);
        Ok(())
    }

    /// `memory_region_clear_flush_coalesced`: flushes, then stops flushing
    /// unless the region itself has coalesced ranges.
    pub fn clear_flush_coalesced(&self) -> Result<()> {
        self.check_alive()?;
        self.topology()?.flush_coalesced_mmio();
        if self.0.state.lock().coalesced.is_empty() {
            self.0.flush_coalesced.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// `memory_region_add_eventfd`: a guest write of `size` bytes at `addr`
    /// (matching `data` if `match_data`; size 0 matches any size) signals
    /// `notifier` instead of calling the device. `data` is given as the
    /// guest writes it to a device of this region's byte order.
    pub fn add_eventfd(
        &self,
        addr: HwAddr,
        size: u64,
        match_data: bool,
        data: u64,
        notifier: &EventNotifier,
    ) -> Result<()> {
        let fd = self.make_ioeventfd(addr, size, match_data, data, notifier)?;
        self.mutate(|topo| {
            let mut st = self.0.state.lock();
            let pos = st.ioeventfds.iter().position(|o| fd.before(o)).unwrap_or(st.ioeventfds.len());
            st.ioeventfds.insert(pos, fd);
            self.eventfds_changed(topo, st);
            Ok(())
        })
    }

    /// `memory_region_del_eventfd`: removes a matching ioeventfd (a zero size
    /// on either side matches any size).
    pub fn del_eventfd(
        &self,
        addr: HwAddr,
        size: u64,
        match_data: bool,
        data: u64,
        notifier: &EventNotifier,
    ) -> Result<()> {
        let fd = self.make_ioeventfd(addr, size, match_data, data, notifier)?;
        self.mutate(|topo| {
            let mut st = self.0.state.lock();
            let Some(pos) = st.ioeventfds.iter().position(|o| o.matches(&fd)) else {
                return Err(Error::NoSuchEventfd(self.name().to_string()));
            };
            st.ioeventfds.remove(pos);
            self.eventfds_changed(topo, st);
            Ok(())
        })
    }

    /// Publishes the changed ioeventfd list to the dispatch path and asks
    /// the next commit to recompute where it is registered.
    fn eventfds_changed(&self, topo: &Topology, st: crate::sync::MutexGuard<'_, RegionState>) {
        self.0.eventfds.swap(Arc::new(st.ioeventfds.clone()));
        self.0.has_eventfds.store(!st.ioeventfds.is_empty(), Ordering::Release);
        let pending = st.enabled;
        drop(st);
        topo.mark_ioeventfd_pending(pending);
        topo.damage_eventfds(self);
    }

    fn make_ioeventfd(
        &self,
        addr: HwAddr,
        size: u64,
        match_data: bool,
        data: u64,
        notifier: &EventNotifier,
    ) -> Result<Ioeventfd> {
        if size > 8 || (size != 0 && !size.is_power_of_two()) {
            return Err(Error::InvalidConstraints(format!("ioeventfd size {size} is not 0, 1, 2, 4 or 8")));
        }
        if addr as u128 + size as u128 > self.size() {
            return Err(Error::OutOfRange { region: self.name().to_string(), offset: addr, size: size as u128 });
        }
        // Store the value as the device sees it after byte-order adjustment,
        // so dispatch can compare without converting (QEMU does the same).
        let data = match self.ops() {
            Some(o) if match_data => o.to_device_order(data, size as u32),
            _ => data,
        };
        Ok(Ioeventfd { addr, size, match_data, data, notifier: notifier.clone() })
    }

    /// `memory_region_destroy`: fails while the region is a subregion, the
    /// target of an alias, or the root of an address space; otherwise
    /// detaches its subregions and marks it destroyed. Its memory is freed
    /// when the last handle and the last view referring to it are gone.
    pub fn destroy(&self) -> Result<()> {
        self.mutate(|topo| {
            if self.container().is_some() {
                return Err(Error::StillMapped(self.name().to_string()));
            }
            let aliases = self.0.alias_refs.load(Ordering::Acquire);
            if aliases > 0 {
                return Err(Error::StillAliased { region: self.name().to_string(), aliases });
            }
            if self.0.as_roots.load(Ordering::Acquire) > 0 {
                return Err(Error::IsAddressSpaceRoot(self.name().to_string()));
            }
            let children = {
                let mut st = self.0.state.lock();
                st.child_geo.clear();
                std::mem::take(&mut st.subregions)
            };
            let enabled = self.is_enabled();
            for c in &children {
                let addr = {
                    let mut cs = c.0.state.lock();
                    cs.parent = None;
                    cs.addr
                };
                topo.mark_pending(enabled && c.is_enabled());
                topo.damage_child(self, addr, c.size());
            }
            self.0.state.lock().destroyed = true;
            if let RegionKind::Alias { target } = &self.0.kind {
                target.0.alias_refs.fetch_sub(1, Ordering::AcqRel);
            }
            Ok(())
        })
    }
}
