//! Address spaces: the guest's view of a region tree, and the lock-free
//! access paths through it (`address_space_rw`, `map`/`unmap`, `find`).

use crate::error::{Error, Result};
use crate::flatview::{FlatRange, FlatView, Pos};
use crate::listener::MemoryRegionSection;
use crate::region::{EventNotifier, MemoryRegion, RegionKind};
use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex, Ordering, Rcu, RcuGuard, Weak};
use crate::topology::{TopoInner, TopoShared, Topology};
use crate::types::{HwAddr, MemTxResult};

/// The default bounce-buffer budget of an address space (QEMU's
/// `max_bounce_buffer_size`).
pub const DEFAULT_BOUNCE_BUDGET: usize = 4096;

/// An ioeventfd as registered in an address space.
#[derive(Clone)]
pub(crate) struct AsEventfd {
    pub(crate) addr: HwAddr,
    pub(crate) size: u64,
    pub(crate) match_data: bool,
    pub(crate) data: u64,
    pub(crate) notifier: EventNotifier,
    /// Start of the flat range that registered it.
    pub(crate) owner: HwAddr,
}

/// Sort key of an address-space ioeventfd (QEMU's "before" order).
pub(crate) type EventfdKey = (HwAddr, u64, bool, u64, usize);

/// An address space's registered ioeventfds, in QEMU's order.
pub(crate) type EventfdSet = std::collections::BTreeMap<EventfdKey, AsEventfd>;

impl AsEventfd {
    pub(crate) fn key(&self) -> EventfdKey {
        (
            self.addr,
            self.size,
            self.match_data,
            if self.match_data { self.data } else { 0 },
            Arc::as_ptr(&self.notifier) as usize,
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
}

type MapClient = Box<dyn FnOnce() + Send>;

struct BounceState {
    used: usize,
    budget: usize,
    clients: Vec<(u64, MapClient)>,
    next_client: u64,
}

pub(crate) struct AsInner {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) root: MemoryRegion,
    pub(crate) view: Rcu<FlatView>,
    /// Bumped (Release) after every publication of `view`, so accessors can
    /// tell with one load whether their cached view is still current.
    pub(crate) view_gen: AtomicU64,
    topo: Weak<TopoInner>,
    pub(crate) shared: Arc<TopoShared>,
    /// The registered ioeventfd set, owned by the topology actor; `None`
    /// while nobody observes the address space.
    pub(crate) ioeventfds: Mutex<Option<EventfdSet>>,
    pub(crate) destroyed: AtomicBool,
    bounce: Mutex<BounceState>,
}

impl AsInner {
    /// Publishes a new view (topology actor only).
    pub(crate) fn publish(&self, view: Arc<FlatView>) {
        self.view.swap(view);
        self.view_gen.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn new(id: u64, name: &str, root: MemoryRegion, topo: Weak<TopoInner>, shared: Arc<TopoShared>) -> Self {
        AsInner {
            id,
            name: Arc::from(name),
            root,
            view: Rcu::new(Arc::new(FlatView::empty())),
            view_gen: AtomicU64::new(0),
            topo,
            shared,
            ioeventfds: Mutex::new(None),
            destroyed: AtomicBool::new(false),
            bounce: Mutex::new(BounceState {
                used: 0,
                budget: DEFAULT_BOUNCE_BUDGET,
                clients: Vec::new(),
                next_client: 1,
            }),
        }
    }

    pub(crate) fn topo_id(&self) -> u64 {
        self.root.0.topo_id
    }

    fn release_bounce(&self, n: usize) {
        let clients = {
            let mut b = self.bounce.lock();
            b.used -= n;
            std::mem::take(&mut b.clients)
        };
        for (_, c) in clients {
            c();
        }
    }
}

/// An address space (QEMU's `AddressSpace`): a root region whose rendered
/// FlatView every access resolves against. Cloning gives another handle.
#[derive(Clone)]
pub struct AddressSpace(pub(crate) Arc<AsInner>);

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

/// A mapping returned by [`AddressSpace::map`]: either a direct pointer into
/// guest RAM or a bounce buffer. Give it back with [`AddressSpace::unmap`];
/// dropping it releases it without writing anything back.
pub struct Mapping {
    asp: Arc<AsInner>,
    addr: HwAddr,
    len: u64,
    is_write: bool,
    kind: MapKind,
}

enum MapKind {
    Direct { region: MemoryRegion, offset: u64 },
    Bounce { buf: Box<[u8]> },
}

impl Mapping {
    /// The address-space address that was mapped.
    pub fn addr(&self) -> HwAddr {
        self.addr
    }
    /// How many bytes were mapped (QEMU's `*plen` on return).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True if nothing was mapped (never returned by `map`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// True if the mapping points straight at guest RAM.
    pub fn is_direct(&self) -> bool {
        matches!(self.kind, MapKind::Direct { .. })
    }
    /// The host address of the mapped bytes, valid until unmapped. Direct
    /// mappings share memory with the guest and other threads: use raw
    /// copies, not references.
    pub fn as_ptr(&self) -> *mut u8 {
        match &self.kind {
            MapKind::Direct { region, offset } => {
                let base = region.ram_block().map_or(std::ptr::null_mut(), |b| b.host_ptr().as_ptr());
                base.wrapping_add(*offset as usize)
            }
            MapKind::Bounce { buf } => buf.as_ptr().cast_mut(),
        }
    }
    /// Copies mapped bytes out, starting `off` bytes into the mapping.
    pub fn read(&self, off: u64, out: &mut [u8]) -> Result<()> {
        self.check(off, out.len())?;
        match &self.kind {
            MapKind::Direct { region, offset } => {
                if let Some(b) = region.ram_block() {
                    b.read_at(offset + off, out);
                }
            }
            MapKind::Bounce { buf } => out.copy_from_slice(&buf[off as usize..off as usize + out.len()]),
        }
        Ok(())
    }
    /// Copies bytes into the mapping.
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.check(off, data.len())?;
        match &mut self.kind {
            MapKind::Direct { region, offset } => {
                if let Some(b) = region.ram_block() {
                    b.write_at(*offset + off, data);
                }
            }
            MapKind::Bounce { buf } => buf[off as usize..off as usize + data.len()].copy_from_slice(data),
        }
        Ok(())
    }
    fn check(&self, off: u64, n: usize) -> Result<()> {
        if off as u128 + n as u128 > self.len as u128 {
            return Err(Error::OutOfRange { region: "mapping".into(), offset: off, size: n as u128 });
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let MapKind::Bounce { buf } = &self.kind {
            self.asp.release_bounce(buf.len());
        }
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &format_args!("{:#x}", self.len))
            .field("direct", &self.is_direct())
            .field("is_write", &self.is_write)
            .finish()
    }
}

/// Identifies a map client registered with [`AddressSpace::register_map_client`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapClientId(u64);

/// Is a read of this range served straight from RAM?
#[inline]
fn direct_read(fr: &FlatRange) -> bool {
    match fr.region.0.kind {
        RegionKind::Ram(_) => true,
        RegionKind::RomDevice { .. } => fr.romd,
        _ => false,
    }
}

/// Is a write to this range stored straight into RAM?
#[inline]
fn direct_write(fr: &FlatRange) -> bool {
    matches!(fr.region.0.kind, RegionKind::Ram(_)) && !fr.readonly
}

fn load_le(buf: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..buf.len()].copy_from_slice(buf);
    u64::from_le_bytes(b)
}

/// `memory_region_dispatch_read` for a terminating region.
pub(crate) fn region_read(shared: &TopoShared, mr: &MemoryRegion, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
    match &mr.0.kind {
        RegionKind::Io(ops) | RegionKind::RomDevice { ops, .. } => {
            if mr.0.flush_coalesced.load(Ordering::Relaxed) {
                shared.flush();
            }
            ops.dispatch_read(addr, size)
        }
        RegionKind::Reservation => {
            tracing::warn!(region = mr.name(), addr, size, "guest read from a reservation");
            (0, MemTxResult::ReservationAccess)
        }
        _ => (0, MemTxResult::DecodeError),
    }
}

/// `memory_region_dispatch_write` for a terminating region, with the
/// software ioeventfd path.
pub(crate) fn region_write(shared: &TopoShared, mr: &MemoryRegion, addr: HwAddr, value: u64, size: u32) -> MemTxResult {
    match &mr.0.kind {
        RegionKind::Io(ops) | RegionKind::RomDevice { ops, .. } => {
            if mr.0.flush_coalesced.load(Ordering::Relaxed) {
                shared.flush();
            }
            if !ops.access_valid(addr, size, true) {
                return MemTxResult::DecodeError;
            }
            if mr.0.has_eventfds.load(Ordering::Acquire) {
                let fds = mr.0.eventfds.load();
                let dev = ops.to_device_order(value, size);
                for fd in fds.iter() {
                    if fd.addr == addr && (fd.size == size as u64 || fd.size == 0) && (!fd.match_data || fd.data == dev)
                    {
                        if let Err(e) = fd.notifier.write(1) {
                            tracing::warn!(region = mr.name(), error = %e, "ioeventfd signal failed");
                        }
                        return MemTxResult::Ok;
                    }
                }
            }
            ops.dispatch_write(addr, value, size)
        }
        RegionKind::Reservation => {
            tracing::warn!(region = mr.name(), addr, size, "guest write to a reservation");
            MemTxResult::ReservationAccess
        }
        _ => MemTxResult::DecodeError,
    }
}

/// The caller's buffer: filled by a read, the source of a write.
pub(crate) enum Buf<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Buf<'_> {
    #[inline]
    fn len(&self) -> usize {
        match self {
            Buf::Read(b) => b.len(),
            Buf::Write(b) => b.len(),
        }
    }
    #[inline]
    fn is_write(&self) -> bool {
        matches!(self, Buf::Write(_))
    }
    #[inline]
    fn zero(&mut self, from: usize, n: usize) {
        if let Buf::Read(b) = self {
            b[from..from + n].fill(0);
        }
    }
}

/// Performs the part of an access at `done` bytes into `buf` (address `a`)
/// that range `fr` serves; returns how many bytes it consumed.
#[inline]
fn access_in_range(
    shared: &TopoShared,
    fr: &FlatRange,
    a: HwAddr,
    buf: &mut Buf<'_>,
    done: usize,
) -> (usize, MemTxResult) {
    let remaining = (buf.len() - done) as u64;
    let off = fr.offset_in_region + (a - fr.start);
    let in_range = (fr.end() - a as u128).min(remaining as u128) as usize;
    let is_write = buf.is_write();
    let direct = if is_write { direct_write(fr) } else { direct_read(fr) };
    if direct {
        if let Some(block) = fr.region.ram_block() {
            match buf {
                Buf::Read(b) => block.read_at(off, &mut b[done..done + in_range]),
                Buf::Write(b) => {
                    block.write_at(off, &b[done..done + in_range]);
                    fr.region.dirty_after_write(off, in_range as u64, fr.dirty_log_mask);
                }
            }
        }
        return (in_range, MemTxResult::Ok);
    }
    match &fr.region.0.kind {
        RegionKind::Ram(_) => {
            // A write to ROM: dropped, nothing dirtied.
            tracing::trace!(region = fr.region.name(), addr = a, "write to ROM dropped");
            (in_range, MemTxResult::DecodeError)
        }
        RegionKind::Reservation => {
            let r = if is_write {
                region_write(shared, &fr.region, off, 0, 1)
            } else {
                buf.zero(done, in_range);
                region_read(shared, &fr.region, off, 1).1
            };
            (in_range, r)
        }
        _ => {
            // MMIO: not clamped to the range (QEMU relies on that).
            let ops = fr.region.ops().expect("terminating non-RAM regions have ops");
            let l = ops.access_size(remaining, off) as usize;
            match buf {
                Buf::Write(b) => (l, region_write(shared, &fr.region, off, load_le(&b[done..done + l]), l as u32)),
                Buf::Read(b) => {
                    let (v, r) = region_read(shared, &fr.region, off, l as u32);
                    b[done..done + l].copy_from_slice(&v.to_le_bytes()[..l]);
                    (l, r)
                }
            }
        }
    }
}

/// `flatview_read_continue` / `flatview_write_continue` from `done` bytes
/// into the access.
fn rw_view_from(shared: &TopoShared, view: &FlatView, addr: HwAddr, mut buf: Buf<'_>, mut done: usize) -> MemTxResult {
    let mut result = MemTxResult::Ok;
    let len = buf.len();
    while done < len {
        let Some(a) = addr.checked_add(done as u64) else {
            // Past the top of the 64-bit space: nothing decodes.
            buf.zero(done, len - done);
            return result.combine(MemTxResult::DecodeError);
        };
        let remaining = (len - done) as u64;
        let Some(fr) = view.lookup_pos(a).and_then(|p| view.get(p)) else {
            // A hole: up to the next range.
            let next = view.pos_at_or_after(a).and_then(|p| view.get(p));
            let gap_end = next.map_or(u128::MAX, |r| r.start as u128);
            let l = (gap_end - a as u128).min(remaining as u128) as usize;
            buf.zero(done, l);
            tracing::trace!(addr = a, len = l, is_write = buf.is_write(), "unassigned access");
            result = result.combine(MemTxResult::DecodeError);
            done += l;
            continue;
        };
        let (n, r) = access_in_range(shared, fr, a, &mut buf, done);
        result = result.combine(r);
        done += n;
    }
    result
}

/// One whole access through a view.
#[inline]
fn rw_view(shared: &TopoShared, view: &FlatView, addr: HwAddr, buf: Buf<'_>) -> MemTxResult {
    rw_view_from(shared, view, addr, buf, 0)
}

impl AddressSpace {
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
        self.0.topo.upgrade().map(Topology).ok_or(Error::TopologyGone)
    }

    /// A per-thread access path with a view and range cache (see
    /// [`Accessor`]).
    pub fn accessor(&self) -> Accessor {
        Accessor { asp: self.0.clone(), view: self.0.view.load_full(), gen: u64::MAX, last: None }
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

    /// Whether two address spaces currently share one FlatView (their roots
    /// render the same tree).
    pub fn shares_view_with(&self, other: &AddressSpace) -> bool {
        Arc::ptr_eq(&self.0.view.load_full(), &other.0.view.load_full())
    }

    /// `address_space_read`: reads `buf.len()` bytes at `addr`. Bytes that
    /// nothing serves read as 0 (all-ones for unclaimed I/O ports, whose
    /// root serves them) and the result says why.
    #[inline]
    pub fn read(&self, addr: HwAddr, buf: &mut [u8]) -> MemTxResult {
        let view = self.0.view.load();
        rw_view(&self.0.shared, &view, addr, Buf::Read(buf))
    }

    /// `address_space_write`.
    #[inline]
    pub fn write(&self, addr: HwAddr, buf: &[u8]) -> MemTxResult {
        let view = self.0.view.load();
        rw_view(&self.0.shared, &view, addr, Buf::Write(buf))
    }

    /// `address_space_rw`.
    pub fn rw(&self, addr: HwAddr, buf: &mut [u8], is_write: bool) -> MemTxResult {
        if is_write {
            self.write(addr, buf)
        } else {
            self.read(addr, buf)
        }
    }

    /// Reads a little-endian value of 1, 2, 4 or 8 bytes (`address_space_ldl`
    /// and friends).
    pub fn read_u64(&self, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        let mut b = [0u8; 8];
        let n = (size as usize).min(8);
        let r = self.read(addr, &mut b[..n]);
        (u64::from_le_bytes(b), r)
    }

    /// Writes a little-endian value of 1, 2, 4 or 8 bytes.
    pub fn write_u64(&self, addr: HwAddr, value: u64, size: u32) -> MemTxResult {
        let n = (size as usize).min(8);
        self.write(addr, &value.to_le_bytes()[..n])
    }

    /// Sets the bounce-buffer budget in bytes (default
    /// [`DEFAULT_BOUNCE_BUDGET`]).
    pub fn set_bounce_budget(&self, bytes: usize) {
        self.0.bounce.lock().budget = bytes;
    }

    /// `address_space_map`: maps up to `len` bytes at `addr`. RAM (and, for
    /// reads, ROM and romd memory) is mapped directly, extended while the
    /// same region continues contiguously; anything else goes through a
    /// bounce buffer taken from the address space's byte budget (pre-filled
    /// for reads). Returns `None` (QEMU's NULL with `*plen = 0`) when the
    /// budget is used up; see [`register_map_client`](Self::register_map_client).
    pub fn map(&self, addr: HwAddr, len: u64, is_write: bool) -> Option<Mapping> {
        if len == 0 {
            return None;
        }
        let view = self.0.view.load();
        if let Some(pos) = view.lookup_pos(addr) {
            let fr = view.get(pos).expect("looked up");
            let direct = if is_write { direct_write(fr) } else { direct_read(fr) };
            if direct {
                let offset = fr.offset_in_region + (addr - fr.start);
                let mut mapped = (fr.end() - addr as u128).min(len as u128);
                let mut next_off = offset as u128 + mapped;
                let mut j = view.next_pos(pos);
                while mapped < len as u128 {
                    let Some(n) = j.and_then(|p| view.get(p)) else { break };
                    let contiguous = n.start as u128 == addr as u128 + mapped
                        && n.region == fr.region
                        && n.offset_in_region as u128 == next_off
                        && (if is_write { direct_write(n) } else { direct_read(n) });
                    if !contiguous {
                        break;
                    }
                    let take = n.size().min(len as u128 - mapped);
                    mapped += take;
                    next_off += take;
                    j = j.and_then(|p| view.next_pos(p));
                }
                return Some(Mapping {
                    asp: self.0.clone(),
                    addr,
                    len: mapped as u64,
                    is_write,
                    kind: MapKind::Direct { region: fr.region.clone(), offset },
                });
            }
        }
        drop(view);
        let alloc = {
            let mut b = self.0.bounce.lock();
            let alloc = (b.budget.saturating_sub(b.used) as u64).min(len) as usize;
            b.used += alloc;
            alloc
        };
        if alloc == 0 {
            return None;
        }
        let mut buf = vec![0u8; alloc].into_boxed_slice();
        if !is_write {
            let _ = self.read(addr, &mut buf);
        }
        Some(Mapping { asp: self.0.clone(), addr, len: alloc as u64, is_write, kind: MapKind::Bounce { buf } })
    }

    /// `address_space_unmap`: ends a mapping of which `access_len` bytes were
    /// used. For a direct write, every page touched is marked dirty; for a
    /// bounce write, the bytes are written back through the normal path. The
    /// bounce budget is then released and waiting map clients are woken.
    pub fn unmap(&self, mapping: Mapping, access_len: u64) -> Result<()> {
        if !Arc::ptr_eq(&mapping.asp, &self.0) {
            return Err(Error::ForeignObject("mapping of another address space".into()));
        }
        let access_len = access_len.min(mapping.len);
        if mapping.is_write && access_len > 0 {
            match &mapping.kind {
                MapKind::Direct { region, offset } => {
                    let mask = region.effective_dirty_mask(region.dirty_log_mask());
                    region.dirty_after_write(*offset, access_len, mask);
                }
                MapKind::Bounce { buf } => {
                    let _ = self.write(mapping.addr, &buf[..access_len as usize]);
                }
            }
        }
        drop(mapping);
        Ok(())
    }

    /// Registers a one-shot callback to run when bounce budget is released
    /// (QEMU's map client). If budget is free right now it runs at once, so a
    /// client that registers after a failed `map` can never miss the wake-up.
    pub fn register_map_client(&self, client: impl FnOnce() + Send + 'static) -> MapClientId {
        let mut b = self.0.bounce.lock();
        let id = MapClientId(b.next_client);
        b.next_client += 1;
        if b.used < b.budget {
            drop(b);
            client();
        } else {
            b.clients.push((id.0, Box::new(client)));
        }
        id
    }

    /// Cancels a map client that has not run yet.
    pub fn unregister_map_client(&self, id: MapClientId) {
        self.0.bounce.lock().clients.retain(|(i, _)| *i != id.0);
    }

    /// Bytes of bounce budget in use.
    pub fn bounce_in_use(&self) -> usize {
        self.0.bounce.lock().used
    }

    /// The lowest-addressed range overlapping `[addr, addr + size)`, clipped
    /// to it (`memory_region_find` on an address-space address).
    pub fn find(&self, addr: HwAddr, size: u128) -> Option<MemoryRegionSection> {
        let view = self.0.view.load();
        let fr = view.pos_at_or_after(addr).and_then(|p| view.get(p))?;
        let qend = addr as u128 + size;
        if !(qend > fr.start as u128 && (addr as u128) < fr.end()) {
            return None;
        }
        let s = (addr as u128).max(fr.start as u128);
        let e = qend.min(fr.end());
        Some(MemoryRegionSection {
            mr: Some(fr.region.clone()),
            address_space: self.clone(),
            offset_within_region: fr.offset_in_region + (s as u64 - fr.start),
            size: e.saturating_sub(s),
            offset_within_address_space: s as u64,
            readonly: fr.readonly,
        })
    }
}

/// A per-thread (per-vCPU) access path with a cache: it keeps the view it
/// last used and the range it last hit, and revalidates both with a single
/// atomic load per access. Repeated accesses to the same range skip the
/// lookup entirely.
///
/// The cached view stays alive (with its regions and devices) until the next
/// access that finds a newer one, or [`release`](Self::release); a vCPU that
/// goes idle should release it.
pub struct Accessor {
    asp: Arc<AsInner>,
    view: Arc<FlatView>,
    gen: u64,
    last: Option<Pos>,
}

impl std::fmt::Debug for Accessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accessor").field("address_space", &self.asp.name).field("gen", &self.gen).finish()
    }
}

impl Accessor {
    #[inline]
    fn current(&mut self) -> &FlatView {
        let g = self.asp.view_gen.load(Ordering::Acquire);
        if g != self.gen {
            self.view = self.asp.view.load_full();
            self.gen = g;
            self.last = None;
        }
        &self.view
    }

    /// The range containing `addr`, through the cache.
    #[inline]
    pub fn lookup(&mut self, addr: HwAddr) -> Option<&FlatRange> {
        self.current();
        if let Some(r) = self.last.and_then(|p| self.view.get(p)) {
            if r.contains(addr) {
                return self.last.and_then(|p| self.view.get(p));
            }
        }
        let p = self.view.lookup_pos(addr)?;
        self.last = Some(p);
        self.view.get(p)
    }

    /// Like [`AddressSpace::read`], through the cache.
    #[inline]
    pub fn read(&mut self, addr: HwAddr, buf: &mut [u8]) -> MemTxResult {
        self.access(addr, Buf::Read(buf))
    }

    /// Like [`AddressSpace::write`], through the cache.
    #[inline]
    pub fn write(&mut self, addr: HwAddr, buf: &[u8]) -> MemTxResult {
        self.access(addr, Buf::Write(buf))
    }

    /// The first step through the cached range, the rest (if the access
    /// leaves it) through the view.
    #[inline]
    fn access(&mut self, addr: HwAddr, mut buf: Buf<'_>) -> MemTxResult {
        self.current();
        let (view, shared) = (&self.view, &self.asp.shared);
        let cached = self.last.filter(|p| view.get(*p).is_some_and(|r| r.contains(addr)));
        let Some(pos) = cached.or_else(|| view.lookup_pos(addr)) else {
            return rw_view(shared, view, addr, buf);
        };
        self.last = Some(pos);
        let Some(fr) = view.get(pos) else {
            return rw_view(shared, view, addr, buf);
        };
        let (n, r) = access_in_range(shared, fr, addr, &mut buf, 0);
        if n >= buf.len() {
            return r;
        }
        r.combine(rw_view_from(shared, view, addr, buf, n))
    }

    /// Reads a little-endian value of 1, 2, 4 or 8 bytes.
    #[inline]
    pub fn read_u64(&mut self, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        let mut b = [0u8; 8];
        let n = (size as usize).min(8);
        let r = self.read(addr, &mut b[..n]);
        (u64::from_le_bytes(b), r)
    }

    /// Writes a little-endian value of 1, 2, 4 or 8 bytes.
    #[inline]
    pub fn write_u64(&mut self, addr: HwAddr, value: u64, size: u32) -> MemTxResult {
        let n = (size as usize).min(8);
        self.write(addr, &value.to_le_bytes()[..n])
    }

    /// Drops the cached view (it is reloaded on the next access).
    pub fn release(&mut self) {
        self.view = Arc::new(FlatView::empty());
        self.gen = u64::MAX;
        self.last = None;
    }
}

impl MemoryRegion {
    /// `memory_region_dispatch_read`: a read of `size` bytes at `addr` in
    /// this region, legalised by its constraints (aliases forward to their
    /// target). The value is in target (little-endian) layout.
    pub fn dispatch_read(&self, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        if let Some(t) = self.alias_target() {
            return t.dispatch_read(self.alias_offset().wrapping_add(addr), size);
        }
        region_read(&self.0.shared, self, addr, size)
    }

    /// `memory_region_dispatch_write`.
    pub fn dispatch_write(&self, addr: HwAddr, value: u64, size: u32) -> MemTxResult {
        if let Some(t) = self.alias_target() {
            return t.dispatch_write(self.alias_offset().wrapping_add(addr), value, size);
        }
        region_write(&self.0.shared, self, addr, value, size)
    }
}
