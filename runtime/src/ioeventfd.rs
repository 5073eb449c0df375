//! ioeventfds (QEMU's `memory_region_add_eventfd`): a guest write that
//! matches signals an eventfd instead of reaching the device.
//!
//! Two halves:
//! * per region, the list the dispatch path checks (software ioeventfds:
//!   [`RegionEventfds::signal`]) and the mutators that change it;
//! * per address space, the set of ioeventfds as mapped (address-space
//!   addresses), which a commit recomputes where it may have changed and
//!   reports to listeners as `eventfd_add` / `eventfd_del` (what a KVM
//!   backend turns into `KVM_IOEVENTFD`).

use crate::address_space::AddressSpace;
use crate::broadcast::{EventfdRecord, SpaceDiff};
use crate::error::{Error, Result};
use crate::flatview::FlatView;
use crate::listener::{Listeners, MemoryRegionSection};
use crate::region::MemoryRegion;
use crate::sync::{Arc, AtomicBool, Mutex, Ordering, Rcu};
use crate::transaction::Damage;
use crate::types::HwAddr;
use vmm_sys_util::eventfd::EventFd;

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
    /// Offset within the region.
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

/// Sort key of an ioeventfd (QEMU's "before" order).
pub(crate) type EventfdKey = (HwAddr, u64, bool, u64, usize);

fn notifier_key(n: &EventNotifier) -> usize {
    Arc::as_ptr(n) as usize
}

impl Ioeventfd {
    fn key(&self) -> EventfdKey {
        (
            self.addr,
            self.size,
            self.match_data,
            if self.match_data { self.data } else { 0 },
            notifier_key(&self.notifier),
        )
    }

    /// QEMU's `memory_region_ioeventfd_before` order.
    fn before(&self, other: &Ioeventfd) -> bool {
        self.key() < other.key()
    }

    /// QEMU's `memory_region_ioeventfd_equal`, where a zero size on either
    /// side matches any size.
    fn matches(&self, other: &Ioeventfd) -> bool {
        self.addr == other.addr
            && (self.size == other.size || self.size == 0 || other.size == 0)
            && self.match_data == other.match_data
            && (!self.match_data || self.data == other.data)
            && notifier_key(&self.notifier) == notifier_key(&other.notifier)
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

/// The ioeventfds of one region.
pub(crate) struct RegionEventfds {
    /// Sorted by the "before" order; changed by the turn holder.
    list: Mutex<Vec<Ioeventfd>>,
    /// Snapshot of `list` for the dispatch path.
    published: Rcu<Vec<Ioeventfd>>,
    /// Whether `published` is non-empty: a hint that lets dispatch skip the
    /// load of `published` for the (many) regions without ioeventfds. The
    /// list decides; a stale flag only gives the answer of a write that ran
    /// just before the change, which a racing write may get anyway (the loom
    /// mutation list records this as an equivalent mutant).
    present: AtomicBool,
}

impl Default for RegionEventfds {
    fn default() -> Self {
        RegionEventfds {
            list: Mutex::new(Vec::new()),
            published: Rcu::new(Arc::new(Vec::new())),
            present: AtomicBool::new(false),
        }
    }
}

impl RegionEventfds {
    /// Publishes the list to the dispatch path.
    fn publish(&self, list: &[Ioeventfd]) {
        self.published.swap(Arc::new(list.to_vec()));
        self.present.store(!list.is_empty(), Ordering::Release);
    }

    /// The software ioeventfd path of a write of `size` bytes at `addr`
    /// whose value, in the device's byte order, is `dev_value()`: signals
    /// the first matching eventfd and returns true, or returns false.
    #[inline]
    pub(crate) fn signal(&self, region: &str, addr: HwAddr, size: u32, dev_value: impl FnOnce() -> u64) -> bool {
        if !self.present.load(Ordering::Acquire) {
            return false;
        }
        let dev_value = dev_value();
        let fds = self.published.load();
        for fd in fds.iter() {
            if fd.addr == addr && (fd.size == size as u64 || fd.size == 0) && (!fd.match_data || fd.data == dev_value) {
                if let Err(e) = fd.notifier.write(1) {
                    tracing::warn!(region, error = %e, "ioeventfd signal failed");
                }
                return true;
            }
        }
        false
    }

    /// The current list, in QEMU's order.
    fn snapshot(&self) -> Arc<Vec<Ioeventfd>> {
        self.published.load_full()
    }
}

impl MemoryRegion {
    /// The region's ioeventfds, in QEMU's sorted order.
    pub fn ioeventfds(&self) -> Vec<Ioeventfd> {
        self.eventfd_state().list.lock().clone()
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
        self.change_eventfds(|list| {
            let pos = list.iter().position(|o| fd.before(o)).unwrap_or(list.len());
            list.insert(pos, fd);
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
        self.change_eventfds(|list| {
            let Some(pos) = list.iter().position(|o| o.matches(&fd)) else {
                return Err(Error::NoSuchEventfd(self.name().to_string()));
            };
            list.remove(pos);
            Ok(())
        })
    }

    /// Changes the region's ioeventfd list with `edit` (as one mutation),
    /// publishes it to the dispatch path and records where the address
    /// spaces' sets must be recomputed.
    fn change_eventfds(&self, edit: impl FnOnce(&mut Vec<Ioeventfd>) -> Result<()>) -> Result<()> {
        self.mutate(|topo| {
            let state = self.eventfd_state();
            let mut list = state.list.lock();
            edit(&mut list)?;
            state.publish(&list);
            drop(list);
            let pending = self.is_enabled();
            topo.record(|i| {
                i.eventfds_changed(pending);
                i.damage(Damage::Eventfds(self.clone()));
            });
            Ok(())
        })
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
}

// ----- the address-space side ------------------------------------------------

/// An ioeventfd as registered in an address space.
#[derive(Clone)]
pub(crate) struct AsEventfd {
    pub(crate) addr: HwAddr,
    pub(crate) size: u64,
    pub(crate) match_data: bool,
    pub(crate) data: u64,
    pub(crate) notifier: EventNotifier,
    /// Start of the flat range that registered it.
    owner: HwAddr,
}

/// An address space's registered ioeventfds, in QEMU's order.
pub(crate) type EventfdSet = std::collections::BTreeMap<EventfdKey, AsEventfd>;

impl AsEventfd {
    fn key(&self) -> EventfdKey {
        (
            self.addr,
            self.size,
            self.match_data,
            if self.match_data { self.data } else { 0 },
            notifier_key(&self.notifier),
        )
    }

    /// The section QEMU passes to eventfd callbacks: no region.
    pub(crate) fn section(&self, asp: &AddressSpace) -> MemoryRegionSection {
        MemoryRegionSection {
            mr: None,
            address_space: asp.clone(),
            offset_within_region: 0,
            size: self.size as u128,
            offset_within_address_space: self.addr,
            readonly: false,
        }
    }

    fn record(&self) -> EventfdRecord {
        EventfdRecord { addr: self.addr, size: self.size, match_data: self.match_data, data: self.data }
    }
}

/// The ioeventfds that the ranges of `view` inside `windows` register
/// (QEMU's `address_space_update_ioeventfds`, restricted).
fn eventfds_in(view: &FlatView, windows: Option<&[(u128, u128)]>) -> EventfdSet {
    let mut set = EventfdSet::new();
    for fr in view.ranges_in(windows) {
        let fds = fr.region().eventfd_state().snapshot();
        if fds.is_empty() {
            continue;
        }
        let shift = fr.start() as i128 - fr.offset_in_region() as i128;
        let (fs, fe) = (fr.start() as i128, fr.end() as i128);
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
                    owner: fr.start(),
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
    let mut guard = asp.eventfd_set();
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
    let id = asp.id();
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
        let Some((_, fd)) = (if take_old { oi.next() } else { ni.next() }) else { break };
        let sec = fd.section(asp);
        if take_old {
            if let Some(ls) = ls {
                ls.each_forward_for(id, "eventfd_del", |l| l.eventfd_del(&sec, fd.match_data, fd.data, &fd.notifier));
            }
            sd.eventfds_removed.push(fd.record());
        } else {
            if let Some(ls) = ls {
                ls.each_reverse_for(id, "eventfd_add", |l| l.eventfd_add(&sec, fd.match_data, fd.data, &fd.notifier));
            }
            sd.eventfds_added.push(fd.record());
        }
    }
    set.extend(new);
}
