//! The broadcast of commit diffs to asynchronous observers: what changed in
//! each commit, tagged with its generation, and a way to resync from a
//! snapshot after falling behind.

use crate::address_space::AddressSpace;
use crate::error::Result;
use crate::flatview::{FlatRange, FlatView};
use crate::region::RegionId;
use crate::sync::{Arc, Weak};
use crate::topology::{TopoInner, Topology};
use crate::types::HwAddr;

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
            start: fr.start(),
            size: fr.size(),
            region: fr.region().id(),
            region_name: fr.region().name_arc().clone(),
            offset_in_region: fr.offset_in_region(),
            readonly: fr.readonly(),
            romd: fr.romd(),
            dirty_log_mask: fr.dirty_log_mask(),
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
    pub spaces: Vec<(AddressSpace, Arc<FlatView>)>,
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

/// The sending side, kept by the topology.
pub(crate) type DiffSender = tokio::sync::broadcast::Sender<Arc<CommitDiff>>;

/// An asynchronous observer of commit diffs (tokio broadcast). Never loses a
/// diff silently: if it falls behind, the next receive says so and hands
/// over a snapshot to resync from.
pub struct DiffSubscriber {
    rx: tokio::sync::broadcast::Receiver<Arc<CommitDiff>>,
    topo: Weak<TopoInner>,
    /// Generation of the last thing handed out (diff or snapshot).
    last: u64,
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
        let Some(topo) = Topology::upgrade(&self.topo) else {
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

impl Topology {
    /// Subscribes an asynchronous observer to the diffs of every future
    /// commit (see [`DiffSubscriber`]).
    pub fn subscribe(&self) -> Result<DiffSubscriber> {
        self.with_query(|| DiffSubscriber {
            rx: self.diff_sender().subscribe(),
            topo: self.downgrade(),
            last: self.generation(),
        })
    }

    /// Every address space with its current view, at one generation.
    ///
    /// Built with the topology's turn held (so after any transaction open on
    /// another thread). A thread that holds a device's turn may not wait for
    /// it: there the snapshot is read without the turn, retrying until no
    /// commit was publishing meanwhile, and leaves out address spaces whose
    /// creation is not committed yet. Either way it is one generation.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        // Built on demand, not kept per commit: the shared state that regions
        // point to must not hold the address spaces, or the topology would
        // keep itself alive.
        let build = || {
            let spaces = self.address_spaces().into_iter().map(|a| {
                let v = a.view();
                (a, v)
            });
            Arc::new(Snapshot { generation: self.generation(), spaces: spaces.collect() })
        };
        self.with_query(build).unwrap_or_else(|_| {
            self.shared().read_published(|| {
                let generation = self.generation();
                let spaces = self
                    .address_spaces()
                    .into_iter()
                    // Never published: created in a transaction still open.
                    .filter(|a| a.generation() > 0)
                    .map(|a| {
                        let v = a.view();
                        (a, v)
                    });
                Arc::new(Snapshot { generation, spaces: spaces.collect() })
            })
        })
    }
}
