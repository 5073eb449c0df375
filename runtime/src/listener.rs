//! Memory listeners (QEMU's `MemoryListener`) and the broadcast of commit
//! diffs to asynchronous observers.
//!
//! # Call order
//! Listeners are kept sorted by ascending priority; among equal priorities a
//! later registration comes later. "Forward" calls go in that order,
//! "Reverse" calls in the opposite one:
//!
//! | callback | order |
//! | --- | --- |
//! | `begin`, `commit`, `log_global_start`, `region_add`, `region_nop`, `log_start`, `coalesced_mmio_add`, `eventfd_del`, `log_sync` | Forward |
//! | `region_del`, `log_stop`, `log_global_stop`, `coalesced_mmio_del`, `eventfd_add` | Reverse |
//!
//! (The swapped directions of the eventfd callbacks are QEMU's.) A commit
//! calls `begin` on every listener, then, per address space in creation
//! order, a delete pass (`coalesced_mmio_del` and `region_del` for ranges
//! that went away or changed) and an add pass (`region_nop` with
//! `log_start`/`log_stop` for unchanged ranges, `region_add` and
//! `coalesced_mmio_add` for new ones), both in address order, then the
//! ioeventfd diff, and finally `commit` on every listener. Per-section
//! callbacks reach only listeners whose filter is that address space or none;
//! `begin`, `commit` and `log_global_*` reach every listener.
//!
//! Callbacks run synchronously on the committing thread before the new view
//! is published, so a listener such as a KVM memslot mirror is current
//! before any vCPU can see the change. A listener must not change the
//! topology from a callback ([`Error::MutationDuringCommit`](crate::Error)).

use crate::address_space::AddressSpace;
use crate::flatview::FlatRange;
use crate::region::{EventNotifier, MemoryRegion, RegionId};
use crate::sync::Arc;
use crate::types::HwAddr;

/// A fragment of a region as mapped in an address space
/// (`MemoryRegionSection`).
#[derive(Clone, Debug)]
pub struct MemoryRegionSection {
    /// The terminating region, or `None` for ioeventfd and empty sections.
    pub mr: Option<MemoryRegion>,
    /// The address space the section belongs to.
    pub address_space: AddressSpace,
    /// Where the section starts within `mr`.
    pub offset_within_region: u64,
    /// Size in bytes (up to 2^64).
    pub size: u128,
    /// Where the section starts in the address space.
    pub offset_within_address_space: HwAddr,
    /// Writes to the section are ignored.
    pub readonly: bool,
}

impl MemoryRegionSection {
    pub(crate) fn from_range(fr: &FlatRange, address_space: &AddressSpace) -> Self {
        MemoryRegionSection {
            mr: Some(fr.region.clone()),
            address_space: address_space.clone(),
            offset_within_region: fr.offset_in_region,
            size: fr.size(),
            offset_within_address_space: fr.start,
            readonly: fr.readonly,
        }
    }

    /// `memory_region_section_addr`: the offset within `mr` of the
    /// address-space address `addr`.
    pub fn addr(&self, addr: HwAddr) -> u64 {
        addr.wrapping_sub(self.offset_within_address_space).wrapping_add(self.offset_within_region)
    }
}

/// Callbacks on changes of the memory map. Every method defaults to doing
/// nothing; see the [module documentation](self) for the order of calls.
#[allow(unused_variables)]
pub trait MemoryListener: Send + Sync + 'static {
    /// Whether the listener wants `region_nop` for every unchanged range of
    /// every commit (QEMU's behaviour, the default). A listener that returns
    /// false lets the runtime diff only what changed, which keeps commits on
    /// large topologies cheap; it still gets every other callback.
    fn wants_region_nop(&self) -> bool {
        true
    }
    /// A commit starts.
    fn begin(&self) {}
    /// A commit ends.
    fn commit(&self) {}
    /// A range appeared (or changed: it was deleted and re-added).
    fn region_add(&self, section: &MemoryRegionSection) {}
    /// A range went away (or is about to be re-added changed).
    fn region_del(&self, section: &MemoryRegionSection) {}
    /// A range is unchanged by this commit.
    fn region_nop(&self, section: &MemoryRegionSection) {}
    /// Dirty logging gained clients on a range (`old` → `new` masks).
    fn log_start(&self, section: &MemoryRegionSection, old: u8, new: u8) {}
    /// Dirty logging lost clients on a range.
    fn log_stop(&self, section: &MemoryRegionSection, old: u8, new: u8) {}
    /// Fold the accelerator's dirty log for the section into the bitmaps.
    fn log_sync(&self, section: &MemoryRegionSection) {}
    /// Global (migration) dirty logging starts.
    fn log_global_start(&self) {}
    /// Global dirty logging stops.
    fn log_global_stop(&self) {}
    /// An ioeventfd became visible at `section` (its `mr` is `None`).
    fn eventfd_add(&self, section: &MemoryRegionSection, match_data: bool, data: u64, e: &EventNotifier) {}
    /// An ioeventfd stopped being visible.
    fn eventfd_del(&self, section: &MemoryRegionSection, match_data: bool, data: u64, e: &EventNotifier) {}
    /// Writes to `[addr, addr + len)` may be coalesced.
    fn coalesced_mmio_add(&self, section: &MemoryRegionSection, addr: HwAddr, len: u64) {}
    /// Writes to `[addr, addr + len)` must no longer be coalesced.
    fn coalesced_mmio_del(&self, section: &MemoryRegionSection, addr: HwAddr, len: u64) {}
}

/// Identifies a registered listener, for [`Topology::listener_unregister`](crate::Topology::listener_unregister).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(pub(crate) u64);

#[derive(Clone)]
pub(crate) struct ListenerEntry {
    pub(crate) id: ListenerId,
    pub(crate) priority: i32,
    pub(crate) filter: Option<u64>,
    pub(crate) wants_nop: bool,
    pub(crate) listener: Arc<dyn MemoryListener>,
}

impl ListenerEntry {
    pub(crate) fn wants(&self, as_id: u64) -> bool {
        self.filter.is_none_or(|f| f == as_id)
    }
}

/// The listeners of one commit, sorted, with helpers for both orders.
pub(crate) struct Listeners(pub(crate) Vec<ListenerEntry>);

impl Listeners {
    pub(crate) fn forward(&self) -> impl Iterator<Item = &ListenerEntry> {
        self.0.iter()
    }
    pub(crate) fn forward_for(&self, as_id: u64) -> impl Iterator<Item = &ListenerEntry> {
        self.0.iter().filter(move |l| l.wants(as_id))
    }
    pub(crate) fn reverse_for(&self, as_id: u64) -> impl Iterator<Item = &ListenerEntry> {
        self.0.iter().rev().filter(move |l| l.wants(as_id))
    }
    pub(crate) fn nop_for(&self, as_id: u64) -> bool {
        self.0.iter().any(|l| l.wants_nop && l.wants(as_id))
    }
    pub(crate) fn any_for(&self, as_id: u64) -> bool {
        self.0.iter().any(|l| l.wants(as_id))
    }
}

/// A range as recorded in a [`CommitDiff`]: identity and placement, without
/// keeping the region alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRecord {
    /// First address.
    pub start: HwAddr,
    /// Size in bytes.
    pub size: u128,
    /// The serving region's identity.
    pub region: RegionId,
    /// The serving region's name.
    pub region_name: Arc<str>,
    /// Offset within the region.
    pub offset_in_region: u64,
    /// Inherited readonly flag.
    pub readonly: bool,
    /// romd flag.
    pub romd: bool,
    /// Effective dirty-log mask.
    pub dirty_log_mask: u8,
}

impl RangeRecord {
    pub(crate) fn of(fr: &FlatRange) -> Self {
        RangeRecord {
            start: fr.start,
            size: fr.size(),
            region: fr.region.id(),
            region_name: fr.region.0.name.clone(),
            offset_in_region: fr.offset_in_region,
            readonly: fr.readonly,
            romd: fr.romd,
            dirty_log_mask: fr.dirty_log_mask,
        }
    }
}

/// An ioeventfd as recorded in a [`CommitDiff`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventfdRecord {
    /// Address in the address space.
    pub addr: HwAddr,
    /// Access size (0 = any).
    pub size: u64,
    /// Whether data must match.
    pub match_data: bool,
    /// Data to match.
    pub data: u64,
}

/// What one commit changed in one address space.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpaceDiff {
    /// The address space's identity.
    pub address_space: u64,
    /// Its name.
    pub name: Arc<str>,
    /// Ranges that went away or changed (in address order).
    pub removed: Vec<RangeRecord>,
    /// Ranges that appeared or changed (in address order).
    pub added: Vec<RangeRecord>,
    /// Unchanged ranges whose dirty-log mask changed: (range, old mask).
    pub log_changed: Vec<(RangeRecord, u8)>,
    /// ioeventfds that went away.
    pub eventfds_removed: Vec<EventfdRecord>,
    /// ioeventfds that appeared.
    pub eventfds_added: Vec<EventfdRecord>,
    /// The address space was destroyed by this commit.
    pub destroyed: bool,
}

impl SpaceDiff {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty()
            && self.added.is_empty()
            && self.log_changed.is_empty()
            && self.eventfds_removed.is_empty()
            && self.eventfds_added.is_empty()
            && !self.destroyed
    }
}

/// The diffs of one commit, tagged with its generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitDiff {
    /// The commit's generation (strictly increasing).
    pub generation: u64,
    /// Per address space that changed, in address-space order.
    pub spaces: Vec<SpaceDiff>,
}

/// A consistent picture of every address space at one generation.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The generation of the last commit included.
    pub generation: u64,
    /// Each live address space with its view.
    pub spaces: Vec<(AddressSpace, Arc<crate::flatview::FlatView>)>,
}

/// What a [`DiffSubscriber`] receives.
#[derive(Debug, Clone)]
pub enum Observed {
    /// The next commit's diff, in generation order with no gap.
    Diff(Arc<CommitDiff>),
    /// The subscriber fell behind and missed `missed` diffs; here is the
    /// whole state at `snapshot.generation`. Diffs after it follow.
    Resync {
        /// How many diffs were lost.
        missed: u64,
        /// The state to continue from.
        snapshot: Arc<Snapshot>,
    },
    /// The topology is gone; no more diffs will come.
    Closed,
}

/// An asynchronous observer of commit diffs (tokio broadcast). Never loses a
/// diff silently: if it falls behind, the next receive says so and hands
/// over a snapshot to resync from.
pub struct DiffSubscriber {
    pub(crate) rx: tokio::sync::broadcast::Receiver<Arc<CommitDiff>>,
    pub(crate) topo: crate::sync::Weak<crate::topology::TopoInner>,
    /// Generation of the last thing handed out (diff or snapshot).
    pub(crate) last: u64,
}

impl DiffSubscriber {
    fn accept(&mut self, d: Arc<CommitDiff>) -> Option<Observed> {
        if d.generation <= self.last {
            return None; // Already covered by a snapshot.
        }
        if d.generation != self.last + 1 {
            // A gap that the channel did not report (cannot happen with
            // broadcast, but never hand out a diff that does not follow).
            return Some(self.resync(d.generation - self.last - 1));
        }
        self.last = d.generation;
        Some(Observed::Diff(d))
    }

    fn resync(&mut self, missed: u64) -> Observed {
        let Some(topo) = self.topo.upgrade().map(crate::topology::Topology) else {
            return Observed::Closed;
        };
        let snapshot = topo.snapshot();
        self.last = snapshot.generation;
        Observed::Resync { missed, snapshot }
    }

    /// Waits for the next diff (or resync).
    pub async fn recv(&mut self) -> Observed {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match self.rx.recv().await {
                Ok(d) => {
                    if let Some(o) = self.accept(d) {
                        return o;
                    }
                }
                Err(RecvError::Lagged(n)) => return self.resync(n),
                Err(RecvError::Closed) => return Observed::Closed,
            }
        }
    }

    /// Like [`recv`](Self::recv) but blocking, for threads outside tokio.
    pub fn blocking_recv(&mut self) -> Observed {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match self.rx.blocking_recv() {
                Ok(d) => {
                    if let Some(o) = self.accept(d) {
                        return o;
                    }
                }
                Err(RecvError::Lagged(n)) => return self.resync(n),
                Err(RecvError::Closed) => return Observed::Closed,
            }
        }
    }

    /// Returns what is already available without waiting, if anything.
    pub fn try_recv(&mut self) -> Option<Observed> {
        use tokio::sync::broadcast::error::TryRecvError;
        loop {
            match self.rx.try_recv() {
                Ok(d) => {
                    if let Some(o) = self.accept(d) {
                        return Some(o);
                    }
                }
                Err(TryRecvError::Lagged(n)) => return Some(self.resync(n)),
                Err(TryRecvError::Closed) => return Some(Observed::Closed),
                Err(TryRecvError::Empty) => return None,
            }
        }
    }

    /// The generation the subscriber has caught up to.
    pub fn generation(&self) -> u64 {
        self.last
    }
}
