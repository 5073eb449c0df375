//! Address spaces (QEMU's `AddressSpace`): a root region and the FlatView
//! its tree renders to, published by RCU for the lock-free access paths
//! (`dispatch.rs`, `accessor.rs`, `map.rs`, `find.rs`).

use crate::error::{Error, Result};
use crate::flatview::FlatView;
use crate::ioeventfd::{AsEventfd, EventfdSet};
use crate::map::Bounce;
use crate::region::MemoryRegion;
use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex, MutexGuard, Ordering, Rcu, RcuGuard, Weak};
use crate::topology::{TopoInner, TopoShared, Topology};

pub(crate) struct AsInner {
    id: u64,
    name: Arc<str>,
    root: MemoryRegion,
    view: Rcu<FlatView>,
    /// The generation of the commit that last published `view`, stored
    /// (Release) after the view: a reader that loads it and then the view
    /// sees at least the view of that generation. One load tells a cache
    /// whether its view is still current.
    generation: AtomicU64,
    topo: Weak<TopoInner>,
    shared: Arc<TopoShared>,
    /// The registered ioeventfd set, owned by the topology actor; `None`
    /// while nobody observes the address space.
    ioeventfds: Mutex<Option<EventfdSet>>,
    destroyed: AtomicBool,
    pub(crate) bounce: Bounce,
}

impl AsInner {
    /// The current view, without reference-count traffic.
    #[inline]
    pub(crate) fn load_view(&self) -> RcuGuard<FlatView> {
        self.view.load()
    }

    /// The current view, owned.
    #[inline]
    pub(crate) fn view_full(&self) -> Arc<FlatView> {
        self.view.load_full()
    }

    /// The generation of the last publication (Acquire).
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn shared(&self) -> &TopoShared {
        &self.shared
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

/// An address space (QEMU's `AddressSpace`): a root region whose rendered
/// FlatView every access resolves against. Cloning gives another handle.
#[derive(Clone)]
pub struct AddressSpace(Arc<AsInner>);

impl PartialEq for AddressSpace {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for AddressSpace {}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace").field("name", &self.name()).field("root", &self.root().name()).finish()
    }
}

impl AddressSpace {
    // ----- crate plumbing ------------------------------------------------

    pub(crate) fn inner(&self) -> &Arc<AsInner> {
        &self.0
    }

    pub(crate) fn from_inner(inner: Arc<AsInner>) -> AddressSpace {
        AddressSpace(inner)
    }

    pub(crate) fn topo_id(&self) -> u64 {
        self.0.root.topo_id()
    }

    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.0.name
    }

    pub(crate) fn is_destroyed(&self) -> bool {
        self.0.destroyed.load(Ordering::Acquire)
    }

    /// Publishes a new view at `generation` (topology actor only): the view
    /// first, then the generation (Release).
    pub(crate) fn publish(&self, view: Arc<FlatView>, generation: u64) {
        self.0.view.swap(view);
        self.0.generation.store(generation, Ordering::Release);
    }

    /// The registered ioeventfd set (topology actor only).
    pub(crate) fn eventfd_set(&self) -> MutexGuard<'_, Option<EventfdSet>> {
        self.0.ioeventfds.lock()
    }

    /// The registered ioeventfds, copied, in QEMU's order.
    pub(crate) fn registered_eventfds(&self) -> Vec<AsEventfd> {
        self.0.ioeventfds.lock().iter().flat_map(|s| s.values().cloned()).collect()
    }

    /// Stops maintaining the ioeventfd set (nobody observes the space).
    pub(crate) fn forget_eventfds(&self) {
        *self.0.ioeventfds.lock() = None;
    }

    // ----- public --------------------------------------------------------

    /// A process-unique identity.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// The address space's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The root region given to `address_space_init`.
    pub fn root(&self) -> &MemoryRegion {
        &self.0.root
    }

    /// The topology the address space belongs to.
    pub fn topology(&self) -> Result<Topology> {
        Topology::upgrade(&self.0.topo).ok_or(Error::TopologyGone)
    }

    /// The current FlatView (a reader's snapshot; holding it keeps it alive).
    pub fn view(&self) -> Arc<FlatView> {
        self.0.view.load_full()
    }

    /// The current FlatView without reference-count traffic, for a short
    /// critical section (one access).
    #[inline]
    pub fn load_view(&self) -> RcuGuard<FlatView> {
        self.0.view.load()
    }

    /// The generation of the commit that last published a view into this
    /// address space (commits that leave its view unchanged do not count).
    /// A cache of anything derived from the view — an [`Accessor`](crate::Accessor),
    /// a software TLB — is current while this has not moved: one load tells.
    /// A view loaded after reading this is at least that new.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.0.generation()
    }

    /// Whether two address spaces currently share one FlatView (their roots
    /// render the same tree).
    pub fn shares_view_with(&self, other: &AddressSpace) -> bool {
        Arc::ptr_eq(&self.0.view.load_full(), &other.0.view.load_full())
    }
}

impl Topology {
    /// `address_space_init`: a new address space over `root`, populated at
    /// once (listeners that take every address space see its ranges added in
    /// a commit of its own).
    pub fn address_space_init(&self, root: &MemoryRegion, name: &str) -> Result<AddressSpace> {
        if root.topo_id() != self.id() {
            return Err(Error::ForeignObject(root.name().to_string()));
        }
        self.with_mutation(|| {
            if root.is_destroyed() {
                return Err(Error::Destroyed(root.name().to_string()));
            }
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let asp = AddressSpace(Arc::new(AsInner {
                id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                name: Arc::from(name),
                root: root.clone(),
                view: Rcu::new(Arc::new(FlatView::empty())),
                generation: AtomicU64::new(0),
                topo: self.downgrade(),
                shared: self.shared().clone(),
                ioeventfds: Mutex::new(None),
                destroyed: AtomicBool::new(false),
                bounce: Bounce::default(),
            }));
            root.count_as_root(true);
            self.state().address_spaces.push(asp.clone());
            self.record(|i| i.changed(true));
            Ok(asp)
        })
    }

    /// `address_space_destroy`: listeners see all of its ranges (and
    /// ioeventfds) deleted, then it is unlinked. Its root may then be
    /// destroyed. Accesses through remaining handles find nothing.
    pub fn address_space_destroy(&self, asp: &AddressSpace) -> Result<()> {
        if asp.topo_id() != self.id() {
            return Err(Error::ForeignObject(asp.name().to_string()));
        }
        self.with_mutation(|| {
            if asp.0.destroyed.swap(true, Ordering::AcqRel) {
                return Err(Error::AddressSpaceDestroyed(asp.name().to_string()));
            }
            self.record(|i| i.changed(true));
            Ok(())
        })
    }

    /// The live address spaces, in creation order.
    pub fn address_spaces(&self) -> Vec<AddressSpace> {
        self.state().address_spaces.clone()
    }

    /// Drops destroyed address spaces from the list (end of a commit).
    pub(crate) fn unlink_destroyed_address_spaces(&self) {
        self.state().address_spaces.retain(|a| {
            let gone = a.is_destroyed();
            if gone {
                a.root().count_as_root(false);
            }
            !gone
        });
    }
}
