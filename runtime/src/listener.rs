//! Memory listeners (QEMU's `MemoryListener`): registration, the order of
//! calls, and what happens when a listener fails.
//!
//! The call order and the failure policy are documented on
//! [`MemoryListener`], where users find them.

use crate::address_space::AddressSpace;
use crate::broadcast::SpaceDiff;
use crate::coalesced::for_coalesced;
use crate::error::{Error, Result};
use crate::fault::{Fault, ListenerFailure};
use crate::flatview::FlatRange;
use crate::ioeventfd::{update_ioeventfds, EventNotifier};
use crate::region::MemoryRegion;
use crate::sync::{Arc, AtomicBool, Ordering};
use crate::topology::Topology;
use crate::types::HwAddr;
use std::cell::RefCell;

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
            mr: Some(fr.region().clone()),
            address_space: address_space.clone(),
            offset_within_region: fr.offset_in_region(),
            size: fr.size(),
            offset_within_address_space: fr.start(),
            readonly: fr.readonly(),
        }
    }

    /// `memory_region_section_addr`: the offset within `mr` of the
    /// address-space address `addr`.
    pub fn addr(&self, addr: HwAddr) -> u64 {
        addr.wrapping_sub(self.offset_within_address_space).wrapping_add(self.offset_within_region)
    }
}

/// What a listener callback returns; an error detaches the listener (see
/// [`MemoryListener`]).
pub type ListenerResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Callbacks on changes of the memory map. Every method defaults to doing
/// nothing successfully.
///
/// # Call order
/// Listeners are kept sorted by ascending priority; among equal priorities a
/// later registration comes later. "Forward" calls go in that order,
/// "Reverse" calls in the opposite one:
///
/// | callback | order |
/// | --- | --- |
/// | `begin`, `commit`, `log_global_start`, `region_add`, `region_nop`, `log_start`, `coalesced_mmio_add`, `eventfd_del`, `log_sync` | Forward |
/// | `region_del`, `log_stop`, `log_global_stop`, `coalesced_mmio_del`, `eventfd_add` | Reverse |
///
/// (The swapped directions of the eventfd callbacks are QEMU's.)
///
/// # What a commit calls, and when the guest sees it
/// A commit (see `commit.rs`) runs on the thread that ends the outermost
/// transaction, with the topology's turn held:
///
/// 1. `coalesced_mmio_add` / `coalesced_mmio_del` for coalescing changes made
///    in the transaction, against the views published before it (QEMU sends
///    them when the change is made; no view changes in between).
/// 2. If the topology changed: `begin` on every listener.
/// 3. Per address space, in creation order:
///    * a delete pass (`coalesced_mmio_del`, `region_del` for ranges that
///      went away or changed) and an add pass (`region_nop` with
///      `log_start`/`log_stop` for unchanged ranges, `region_add` and
///      `coalesced_mmio_add` for new ones), both in address order —
///      **before** the address space's new view is published, so a memslot
///      mirror is current before any vCPU can reach the change;
///    * the new view is published;
///    * the ioeventfd diff (`eventfd_del`, `eventfd_add`) — **after** the
///      view is published.
/// 4. The topology's [generation](crate::Topology::generation) moves to the
///    commit's, then `commit` on every listener (if `begin` was called).
/// 5. The diff is broadcast to subscribers.
///
/// Per-section callbacks reach only listeners whose filter is that address
/// space or none; `begin`, `commit` and `log_global_*` reach every listener.
/// A listener must not change the topology from a callback
/// ([`Error::MutationDuringCommit`](crate::Error::MutationDuringCommit)); it
/// may query it.
///
/// # Failure
/// Every callback returns a [`ListenerResult`]. A callback that returns an
/// error, or panics, **detaches** its listener: it gets no further callback,
/// not even in the rest of the commit, and is unregistered without a
/// replay. Everything else goes on: the commit completes, every other
/// listener is called, the views are published, so the topology and every
/// healthy listener stay consistent. The failure reaches the embedder twice:
/// the call that triggered it (a mutator, `commit`, `listener_register`, a
/// dirty-log sync...) returns [`Error::ListenerFailed`](crate::Error::ListenerFailed)
/// — its change *was* made — and the topology records a
/// [`Fault`](crate::Fault) and calls its fault hook, for an embedder that
/// must react whoever committed (a VM whose memslot mirror failed stops).
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
    fn begin(&self) -> ListenerResult {
        Ok(())
    }
    /// A commit ends.
    fn commit(&self) -> ListenerResult {
        Ok(())
    }
    /// A range appeared (or changed: it was deleted and re-added).
    fn region_add(&self, section: &MemoryRegionSection) -> ListenerResult {
        Ok(())
    }
    /// A range went away (or is about to be re-added changed).
    fn region_del(&self, section: &MemoryRegionSection) -> ListenerResult {
        Ok(())
    }
    /// A range is unchanged by this commit.
    fn region_nop(&self, section: &MemoryRegionSection) -> ListenerResult {
        Ok(())
    }
    /// Dirty logging gained clients on a range (`old` → `new` masks).
    fn log_start(&self, section: &MemoryRegionSection, old: u8, new: u8) -> ListenerResult {
        Ok(())
    }
    /// Dirty logging lost clients on a range.
    fn log_stop(&self, section: &MemoryRegionSection, old: u8, new: u8) -> ListenerResult {
        Ok(())
    }
    /// Fold the accelerator's dirty log for the section into the bitmaps.
    fn log_sync(&self, section: &MemoryRegionSection) -> ListenerResult {
        Ok(())
    }
    /// Global (migration) dirty logging starts.
    fn log_global_start(&self) -> ListenerResult {
        Ok(())
    }
    /// Global dirty logging stops.
    fn log_global_stop(&self) -> ListenerResult {
        Ok(())
    }
    /// An ioeventfd became visible at `section` (its `mr` is `None`).
    fn eventfd_add(
        &self,
        section: &MemoryRegionSection,
        match_data: bool,
        data: u64,
        e: &EventNotifier,
    ) -> ListenerResult {
        Ok(())
    }
    /// An ioeventfd stopped being visible.
    fn eventfd_del(
        &self,
        section: &MemoryRegionSection,
        match_data: bool,
        data: u64,
        e: &EventNotifier,
    ) -> ListenerResult {
        Ok(())
    }
    /// Writes to `[addr, addr + len)` may be coalesced.
    fn coalesced_mmio_add(&self, section: &MemoryRegionSection, addr: HwAddr, len: u64) -> ListenerResult {
        Ok(())
    }
    /// Writes to `[addr, addr + len)` must no longer be coalesced.
    fn coalesced_mmio_del(&self, section: &MemoryRegionSection, addr: HwAddr, len: u64) -> ListenerResult {
        Ok(())
    }
}

/// Identifies a registered listener, for [`Topology::listener_unregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(pub(crate) u64);

/// A registered listener.
pub(crate) struct ListenerEntry {
    pub(crate) id: ListenerId,
    pub(crate) priority: i32,
    filter: Option<u64>,
    wants_nop: bool,
    listener: Arc<dyn MemoryListener>,
    /// Set when a callback fails; no callback reaches it afterwards.
    failed: AtomicBool,
}

impl ListenerEntry {
    pub(crate) fn new(id: ListenerId, priority: i32, filter: Option<u64>, listener: Arc<dyn MemoryListener>) -> Self {
        ListenerEntry {
            id,
            priority,
            filter,
            wants_nop: listener.wants_region_nop(),
            listener,
            failed: AtomicBool::new(false),
        }
    }

    /// Whether the listener takes callbacks for address space `as_id`.
    pub(crate) fn wants(&self, as_id: u64) -> bool {
        self.filter.is_none_or(|f| f == as_id)
    }

    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

/// The listeners one commit (or one replay, or one sync) calls, sorted, with
/// the failure policy applied to every call.
pub(crate) struct Listeners {
    entries: Vec<Arc<ListenerEntry>>,
    generation: u64,
    failures: RefCell<Vec<ListenerFailure>>,
}

impl Listeners {
    pub(crate) fn new(entries: Vec<Arc<ListenerEntry>>, generation: u64) -> Self {
        Listeners { entries, generation, failures: RefCell::new(Vec::new()) }
    }

    /// Calls one callback of one listener, unless it has failed; an error
    /// or a panic marks it failed and is recorded.
    pub(crate) fn call(
        &self,
        l: &ListenerEntry,
        callback: &'static str,
        f: impl FnOnce(&dyn MemoryListener) -> ListenerResult,
    ) {
        if l.failed() {
            return;
        }
        let message = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&*l.listener))) {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(p) => {
                let m = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                format!("panicked: {m}")
            }
        };
        l.failed.store(true, Ordering::Release);
        self.failures.borrow_mut().push(ListenerFailure {
            listener: l.id,
            callback,
            message,
            generation: self.generation,
        });
    }

    /// Every listener, Forward.
    pub(crate) fn forward(&self) -> impl Iterator<Item = &ListenerEntry> {
        self.entries.iter().map(|e| &**e)
    }

    /// `callback` on each of `listeners`, in the order given.
    fn each<'a>(
        &self,
        listeners: impl Iterator<Item = &'a Arc<ListenerEntry>>,
        callback: &'static str,
        mut f: impl FnMut(&dyn MemoryListener) -> ListenerResult,
    ) {
        for l in listeners {
            self.call(l, callback, &mut f);
        }
    }

    /// `callback` on every listener, Forward.
    pub(crate) fn each_forward(&self, callback: &'static str, f: impl FnMut(&dyn MemoryListener) -> ListenerResult) {
        self.each(self.entries.iter(), callback, f);
    }

    /// `callback` on every listener, Reverse.
    pub(crate) fn each_reverse(&self, callback: &'static str, f: impl FnMut(&dyn MemoryListener) -> ListenerResult) {
        self.each(self.entries.iter().rev(), callback, f);
    }

    /// `callback` on the listeners of address space `as_id`, Forward.
    pub(crate) fn each_forward_for(
        &self,
        as_id: u64,
        callback: &'static str,
        f: impl FnMut(&dyn MemoryListener) -> ListenerResult,
    ) {
        self.each(self.entries.iter().filter(|l| l.wants(as_id)), callback, f);
    }

    /// `callback` on the listeners of address space `as_id`, Reverse.
    pub(crate) fn each_reverse_for(
        &self,
        as_id: u64,
        callback: &'static str,
        f: impl FnMut(&dyn MemoryListener) -> ListenerResult,
    ) {
        self.each(self.entries.iter().rev().filter(|l| l.wants(as_id)), callback, f);
    }

    /// `region_nop` on the listeners of `as_id` that want it, Forward.
    pub(crate) fn each_nop_for(&self, as_id: u64, f: impl FnMut(&dyn MemoryListener) -> ListenerResult) {
        self.each(self.entries.iter().filter(|l| l.wants_nop && l.wants(as_id)), "region_nop", f);
    }

    /// Whether any listener of `as_id` wants `region_nop`.
    pub(crate) fn nop_for(&self, as_id: u64) -> bool {
        self.entries.iter().any(|l| l.wants_nop && !l.failed() && l.wants(as_id))
    }

    /// Whether any listener takes callbacks for `as_id`.
    pub(crate) fn any_for(&self, as_id: u64) -> bool {
        self.entries.iter().any(|l| !l.failed() && l.wants(as_id))
    }

    /// The failures recorded so far.
    pub(crate) fn into_failures(self) -> Vec<ListenerFailure> {
        self.failures.into_inner()
    }
}

impl Topology {
    /// Runs `f` with the registered listeners (the turn held), then applies
    /// the failure policy: failed listeners are unregistered, each failure
    /// becomes a fault, and the first is returned as an error.
    pub(crate) fn call_listeners<R>(&self, f: impl FnOnce(&Listeners) -> R) -> Result<R> {
        let ls = Listeners::new(self.listener_entries(), self.generation());
        let r = f(&ls);
        self.absorb_failures(ls.into_failures())?;
        Ok(r)
    }

    /// Detaches failed listeners and reports their failures.
    pub(crate) fn absorb_failures(&self, failures: Vec<ListenerFailure>) -> Result<()> {
        if failures.is_empty() {
            return Ok(());
        }
        self.remove_listeners(|l| l.failed());
        for f in &failures {
            self.fault_log().report(Fault::ListenerFailed(f.clone()));
        }
        Err(Error::ListenerFailed(failures[0].clone()))
    }

    /// `memory_listener_register`: registers `listener` with `priority`
    /// (lower = earlier on add, later on delete), for one address space or,
    /// with `None`, for all. Replays the current state to it, per address
    /// space: `begin`, `log_global_start` if global logging is on, then for
    /// each range `region_add`, `coalesced_mmio_add` and `log_start`, then the
    /// ioeventfds (`eventfd_add`), then `commit`. If the replay fails, the
    /// listener is not registered and the failure is returned.
    pub fn listener_register(
        &self,
        listener: Arc<dyn MemoryListener>,
        priority: i32,
        filter: Option<&AddressSpace>,
    ) -> Result<ListenerId> {
        if let Some(f) = filter {
            if f.topo_id() != self.id() {
                return Err(Error::ForeignObject(f.name().to_string()));
            }
        }
        self.with_mutation(|| {
            if let Some(f) = filter {
                if f.is_destroyed() {
                    return Err(Error::AddressSpaceDestroyed(f.name().to_string()));
                }
            }
            let entry =
                Arc::new(ListenerEntry::new(self.next_listener_id(), priority, filter.map(|f| f.id()), listener));
            let ls = Listeners::new(vec![entry.clone()], self.generation());
            let global = self.global_dirty_log();
            for asp in self.address_spaces().iter().filter(|a| entry.wants(a.id())) {
                ls.each_forward("begin", |l| l.begin());
                if global {
                    ls.each_forward("log_global_start", |l| l.log_global_start());
                }
                let view = asp.view();
                for fr in view.iter() {
                    let sec = MemoryRegionSection::from_range(fr, asp);
                    ls.each_forward("region_add", |l| l.region_add(&sec));
                    for_coalesced(fr, |s, len| {
                        ls.each_forward("coalesced_mmio_add", |l| l.coalesced_mmio_add(&sec, s, len))
                    });
                    if fr.dirty_log_mask() != 0 {
                        ls.each_forward("log_start", |l| l.log_start(&sec, 0, fr.dirty_log_mask()));
                    }
                }
                update_ioeventfds(asp, &view, None, None, &mut SpaceDiff::default());
                for fd in asp.registered_eventfds() {
                    let sec = fd.section(asp);
                    ls.each_forward("eventfd_add", |l| l.eventfd_add(&sec, fd.match_data, fd.data, &fd.notifier));
                }
                ls.each_forward("commit", |l| l.commit());
            }
            let failures = ls.into_failures();
            if failures.is_empty() {
                let id = entry.id;
                self.insert_listener(entry);
                Ok(id)
            } else {
                for f in &failures {
                    self.fault_log().report(Fault::ListenerFailed(f.clone()));
                }
                Err(Error::ListenerFailed(failures[0].clone()))
            }
        })
    }

    /// `memory_listener_unregister`: replays, per address space, `begin`,
    /// then for each range `log_stop` (if logging), `region_del` and
    /// `coalesced_mmio_del`, then `eventfd_del` for each ioeventfd, then
    /// `commit`; then removes the listener. Unregistering twice is a no-op.
    /// A failing replay still removes the listener (and reports the
    /// failure).
    pub fn listener_unregister(&self, id: ListenerId) -> Result<()> {
        self.with_mutation(|| {
            let Some(entry) = self.remove_listeners(|l| l.id == id).pop() else {
                return Ok(());
            };
            let ls = Listeners::new(vec![entry.clone()], self.generation());
            for asp in self.address_spaces().iter().filter(|a| entry.wants(a.id())) {
                ls.each_forward("begin", |l| l.begin());
                let view = asp.view();
                for fr in view.iter() {
                    let sec = MemoryRegionSection::from_range(fr, asp);
                    if fr.dirty_log_mask() != 0 {
                        ls.each_forward("log_stop", |l| l.log_stop(&sec, fr.dirty_log_mask(), 0));
                    }
                    ls.each_forward("region_del", |l| l.region_del(&sec));
                    for_coalesced(fr, |s, len| {
                        ls.each_forward("coalesced_mmio_del", |l| l.coalesced_mmio_del(&sec, s, len))
                    });
                }
                for fd in asp.registered_eventfds() {
                    let sec = fd.section(asp);
                    ls.each_forward("eventfd_del", |l| l.eventfd_del(&sec, fd.match_data, fd.data, &fd.notifier));
                }
                ls.each_forward("commit", |l| l.commit());
            }
            let failures = ls.into_failures();
            for f in &failures {
                self.fault_log().report(Fault::ListenerFailed(f.clone()));
            }
            match failures.into_iter().next() {
                Some(f) => Err(Error::ListenerFailed(f)),
                None => Ok(()),
            }
        })
    }
}
