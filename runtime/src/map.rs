//! `address_space_map` / `address_space_unmap`: direct pointers into guest
//! RAM, or bounce buffers within a per-address-space budget, and the map
//! clients woken when budget is released.

use crate::address_space::{AddressSpace, AsInner};
use crate::dispatch::{direct_read, direct_write};
use crate::error::{Error, Result};
use crate::region::MemoryRegion;
use crate::sync::{Arc, Mutex};
use crate::types::HwAddr;

/// The default bounce-buffer budget of an address space (QEMU's
/// `max_bounce_buffer_size`).
pub const DEFAULT_BOUNCE_BUDGET: usize = 4096;

/// The longest single bounce mapping, whatever the budget: a guest-chosen
/// length never makes the host allocate more than this at once.
pub const MAX_BOUNCE_MAPPING: usize = 1 << 20;

type MapClient = Box<dyn FnOnce() + Send>;

struct BounceState {
    used: usize,
    budget: usize,
    clients: Vec<(u64, MapClient)>,
    next_client: u64,
}

/// The bounce budget of one address space and its waiting map clients.
pub(crate) struct Bounce(Mutex<BounceState>);

impl Default for Bounce {
    fn default() -> Self {
        Bounce(Mutex::new(BounceState { used: 0, budget: DEFAULT_BOUNCE_BUDGET, clients: Vec::new(), next_client: 1 }))
    }
}

impl Bounce {
    /// Takes up to `len` bytes of budget (at most [`MAX_BOUNCE_MAPPING`]) as
    /// a zeroed buffer; `None` if no budget is left or the allocation fails.
    fn take(&self, len: u64) -> Option<Box<[u8]>> {
        let n = {
            let mut b = self.0.lock();
            let n = (b.budget.saturating_sub(b.used) as u64).min(len).min(MAX_BOUNCE_MAPPING as u64) as usize;
            b.used += n;
            n
        };
        if n == 0 {
            return None;
        }
        let mut v: Vec<u8> = Vec::new();
        if v.try_reserve_exact(n).is_err() {
            tracing::warn!(bytes = n, "bounce buffer allocation failed");
            self.release(n);
            return None;
        }
        v.resize(n, 0);
        Some(v.into_boxed_slice())
    }

    /// Gives `n` bytes of budget back and wakes the waiting map clients.
    fn release(&self, n: usize) {
        let clients = {
            let mut b = self.0.lock();
            b.used -= n;
            std::mem::take(&mut b.clients)
        };
        for (_, c) in clients {
            c();
        }
    }
}

/// A bounce buffer between `take` and its `Mapping`: gives the budget back if
/// the pre-fill unwinds.
struct MappedBuffer {
    buf: Box<[u8]>,
    asp: Arc<AsInner>,
}

impl MappedBuffer {
    fn into_inner(mut self) -> Box<[u8]> {
        std::mem::take(&mut self.buf)
    }
}

impl Drop for MappedBuffer {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.asp.bounce.release(self.buf.len());
        }
    }
}

impl std::ops::Deref for MappedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for MappedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
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
    /// mappings share memory with the guest and other threads: access them
    /// with atomic (or volatile) operations, never through references or
    /// plain copies (see [guest RAM](crate::docs#guest-ram)); prefer
    /// [`read`](Self::read) and [`write`](Self::write).
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
            self.asp.bounce.release(buf.len());
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

impl AddressSpace {
    /// Sets the bounce-buffer budget in bytes (default
    /// [`DEFAULT_BOUNCE_BUDGET`]).
    pub fn set_bounce_budget(&self, bytes: usize) {
        self.inner().bounce.0.lock().budget = bytes;
    }

    /// `address_space_map`: maps up to `len` bytes at `addr`. RAM (and, for
    /// reads, ROM and romd memory) is mapped directly, extended while the
    /// same region continues contiguously; anything else goes through a
    /// bounce buffer taken from the address space's byte budget (pre-filled
    /// for reads), at most [`MAX_BOUNCE_MAPPING`] bytes at a time: like
    /// QEMU's, the mapping may be shorter than asked, and callers map the
    /// rest afterwards. Returns `None` (QEMU's NULL with `*plen = 0`) when
    /// the budget is used up or the host cannot allocate the buffer; see
    /// [`register_map_client`](Self::register_map_client).
    pub fn map(&self, addr: HwAddr, len: u64, is_write: bool) -> Option<Mapping> {
        if len == 0 {
            return None;
        }
        let view = self.inner().load_view();
        if let Some(pos) = view.lookup_pos(addr) {
            let fr = view.get(pos).expect("looked up");
            let direct = if is_write { direct_write(fr) } else { direct_read(fr) };
            if direct {
                let offset = fr.offset_in_region() + (addr - fr.start());
                let mut mapped = (fr.end() - addr as u128).min(len as u128);
                let mut next_off = offset as u128 + mapped;
                let mut j = view.next_pos(pos);
                while mapped < len as u128 {
                    let Some(n) = j.and_then(|p| view.get(p)) else { break };
                    let contiguous = n.start() as u128 == addr as u128 + mapped
                        && n.region() == fr.region()
                        && n.offset_in_region() as u128 == next_off
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
                    asp: self.inner().clone(),
                    addr,
                    len: mapped as u64,
                    is_write,
                    kind: MapKind::Direct { region: fr.region().clone(), offset },
                });
            }
        }
        drop(view);
        let buf = self.inner().bounce.take(len)?;
        let mut buf = MappedBuffer { buf, asp: self.inner().clone() };
        if !is_write {
            let _ = self.read(addr, &mut buf);
        }
        let buf = buf.into_inner();
        Some(Mapping {
            asp: self.inner().clone(),
            addr,
            len: buf.len() as u64,
            is_write,
            kind: MapKind::Bounce { buf },
        })
    }

    /// `address_space_unmap`: ends a mapping of which `access_len` bytes were
    /// used. For a direct write, every page touched is marked dirty; for a
    /// bounce write, the bytes are written back through the normal path. The
    /// bounce budget is then released and waiting map clients are woken.
    pub fn unmap(&self, mapping: Mapping, access_len: u64) -> Result<()> {
        if !Arc::ptr_eq(&mapping.asp, self.inner()) {
            return Err(Error::ForeignObject("mapping of another address space".into()));
        }
        let access_len = access_len.min(mapping.len);
        if mapping.is_write && access_len > 0 {
            match &mapping.kind {
                MapKind::Direct { region, offset } => {
                    let mask = region.effective_dirty_mask(region.dirty_log_mask());
                    region.note_ram_write(*offset, access_len, mask);
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
        let mut b = self.inner().bounce.0.lock();
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
        self.inner().bounce.0.lock().clients.retain(|(i, _)| *i != id.0);
    }

    /// Bytes of bounce budget in use.
    pub fn bounce_in_use(&self) -> usize {
        self.inner().bounce.0.lock().used
    }
}
