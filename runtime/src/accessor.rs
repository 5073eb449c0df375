//! The per-vCPU access path: an [`Accessor`] keeps the view it last used and
//! the range it last hit, and revalidates both with one atomic load.

use crate::address_space::{AddressSpace, AsInner};
use crate::dispatch::{
    access_in_range, direct_read, direct_write, plain_read, plain_write, region_read, region_write, rw_view_from, Buf,
};
use crate::flatview::{FlatRange, FlatView, Pos};
use crate::ops::{mask_of, RegionOps};
use crate::region::{MemoryRegion, RegionKind};
use crate::sync::Arc;
use crate::types::{HwAddr, MemTxResult};

/// A per-thread (per-vCPU) access path with a cache: it keeps the view it
/// last used and the range it last hit, and revalidates both with a single
/// atomic load per access ([`AddressSpace::generation`]). Repeated accesses
/// to the same range skip the lookup entirely, and a repeated device access
/// of the value path ([`read_value`](Self::read_value),
/// [`write_value`](Self::write_value)) also skips the legalisation of its
/// size and alignment when it needs none.
///
/// The cached view stays alive (with its regions and devices) until the next
/// access that finds a newer one, [`refresh`](Self::refresh) or
/// [`release`](Self::release); a vCPU that goes idle should release it.
pub struct Accessor {
    asp: Arc<AsInner>,
    view: Arc<FlatView>,
    /// The address space's publication generation `view` was loaded at
    /// (`u64::MAX` after `release`).
    gen: u64,
    last: Option<Pos>,
    /// The last plain device read and write (see [`PlainIo`]), in `view`.
    plain_read: Option<PlainIo>,
    plain_write: Option<PlainIo>,
}

/// A device access already found *plain* — one I/O range that takes it
/// whole, ops that take it at its size as it is ([`RegionOps::is_plain`]) —
/// and so every naturally aligned access of the same size to the same range:
/// a vCPU's repeated device access skips the legalisation.
///
/// [`RegionOps::is_plain`]: crate::ops::RegionOps::is_plain
#[derive(Debug, Clone, Copy)]
struct PlainIo {
    pos: Pos,
    /// The range's first address.
    start: HwAddr,
    /// The last offset from `start` at which the access still fits.
    span: u64,
    /// The region offset of `start`.
    offset: u64,
    size: u32,
}

impl PlainIo {
    /// The region offset of a `size`-byte access at `addr`, if it is one
    /// this access covers.
    #[inline]
    fn offset_of(&self, addr: HwAddr, size: u32) -> Option<HwAddr> {
        let rel = addr.wrapping_sub(self.start);
        let off = self.offset.wrapping_add(rel);
        (size == self.size && rel <= self.span && off & (u64::from(size) - 1) == 0).then_some(off)
    }
}

impl std::fmt::Debug for Accessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accessor").field("address_space", &self.asp.name()).field("gen", &self.gen).finish()
    }
}

impl AddressSpace {
    /// A per-thread access path with a view and range cache (see
    /// [`Accessor`]).
    pub fn accessor(&self) -> Accessor {
        let mut a = Accessor {
            asp: self.inner().clone(),
            view: Arc::new(FlatView::empty()),
            gen: u64::MAX,
            last: None,
            plain_read: None,
            plain_write: None,
        };
        a.refresh();
        a
    }
}

impl Accessor {
    /// Makes the cache current: one load, and a reload of the view if a
    /// commit published a new one.
    #[inline]
    pub fn refresh(&mut self) -> &Arc<FlatView> {
        // The generation first (Acquire), then the view: the view is at
        // least as new as the generation recorded with it.
        let g = self.asp.generation();
        if g != self.gen {
            self.view = self.asp.view_full();
            self.gen = g;
            self.forget_ranges();
        }
        &self.view
    }

    /// Whether the cached view is still the address space's (one load).
    /// Every access through the accessor makes it so again (it loads the
    /// newest view first), so this says nothing about what was derived from
    /// an older view: check that with [`is_at`](Self::is_at).
    #[inline]
    pub fn is_current(&self) -> bool {
        self.asp.generation() == self.gen
    }

    /// Whether the view published at `generation` is still the address
    /// space's (one load). Anything derived from that view — a software TLB
    /// filled by [`translate`](Self::translate), which records it as
    /// [`PageTranslation::generation`](crate::PageTranslation::generation) —
    /// is valid exactly while this holds.
    #[inline]
    pub fn is_at(&self, generation: u64) -> bool {
        self.asp.generation() == generation
    }

    /// The address space's publication generation of the cached view
    /// ([`AddressSpace::generation`] when it was loaded).
    pub fn generation(&self) -> u64 {
        self.gen
    }

    /// The cached view (as of the last access or refresh).
    pub fn view(&self) -> &Arc<FlatView> {
        &self.view
    }

    /// The address space.
    pub fn address_space(&self) -> AddressSpace {
        AddressSpace::from_inner(self.asp.clone())
    }

    /// The range containing `addr`, through the cache.
    #[inline]
    pub fn lookup(&mut self, addr: HwAddr) -> Option<&FlatRange> {
        self.refresh();
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
        if buf.len() == 0 {
            return MemTxResult::Ok;
        }
        self.refresh();
        let (view, shared) = (&self.view, self.asp.shared());
        let cached = self.last.filter(|p| view.get(*p).is_some_and(|r| r.contains(addr)));
        let Some(pos) = cached.or_else(|| view.lookup_pos(addr)) else {
            return rw_view_from(shared, view, addr, buf, 0);
        };
        self.last = Some(pos);
        let Some(fr) = view.get(pos) else {
            return rw_view_from(shared, view, addr, buf, 0);
        };
        let (n, r) = access_in_range(shared, fr, addr, &mut buf, 0);
        if n >= buf.len() {
            return r;
        }
        r.combine(rw_view_from(shared, view, addr, buf, n))
    }

    /// Reads a little-endian value of 1, 2, 4 or 8 bytes; other sizes are
    /// cut to 8 bytes, and 0 reads nothing.
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

    /// Writes the low `size` bytes of `value` at `addr`, as
    /// [`write_u64`](Self::write_u64) does. When the cached range is one I/O
    /// range that takes the whole access at its own size — a vCPU's
    /// repeated device access — the value goes to the device with no byte
    /// buffer in between, and a repeat of such an access that needs no
    /// split, round-up or byte swap also skips the legalisation.
    #[inline]
    pub fn write_value(&mut self, addr: HwAddr, value: u64, size: u32) -> MemTxResult {
        // What the byte path would take from the value's bytes.
        let value = value & mask_of(size);
        self.refresh();
        let shared = self.asp.shared();
        if let Some((mr, ops, off)) = self.repeat(self.plain_write, addr, size) {
            return plain_write(shared, mr, ops, off, value, size);
        }
        if let Some((pos, fr, off)) = self.single_io(addr, size, true) {
            let memo = remember_plain(fr, pos, off, size);
            let r = region_write(shared, fr.region(), off, value, size);
            self.plain_write = memo;
            return r;
        }
        self.write_u64(addr, value, size)
    }

    /// Reads a little-endian value of `size` bytes at `addr`, as
    /// [`read_u64`](Self::read_u64) does, with the fast paths of
    /// [`write_value`](Self::write_value).
    #[inline]
    pub fn read_value(&mut self, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        self.refresh();
        let shared = self.asp.shared();
        if let Some((mr, ops, off)) = self.repeat(self.plain_read, addr, size) {
            return plain_read(shared, mr, ops, off, size);
        }
        if let Some((pos, fr, off)) = self.single_io(addr, size, false) {
            let memo = remember_plain(fr, pos, off, size);
            // A read rounded up to a wider device access brings more bytes
            // than asked for.
            let (v, r) = region_read(shared, fr.region(), off, size);
            self.plain_read = memo;
            return (v & mask_of(size), r);
        }
        self.read_u64(addr, size)
    }

    /// The region, its ops and the region offset of a `size`-byte access at
    /// `addr`, if it repeats the remembered plain access `memo`.
    #[inline]
    fn repeat(&self, memo: Option<PlainIo>, addr: HwAddr, size: u32) -> Option<(&MemoryRegion, &RegionOps, HwAddr)> {
        let memo = memo?;
        let off = memo.offset_of(addr, size)?;
        let fr = self.view.get(memo.pos)?;
        Some((fr.region(), io_ops(fr)?, off))
    }

    /// The cached range (its position and itself) and the offset of `addr`
    /// in its region, if that range is I/O (not read or written directly)
    /// and takes the `size`-byte access at `addr` whole, in one device
    /// access.
    #[inline]
    fn single_io(&self, addr: HwAddr, size: u32, write: bool) -> Option<(Pos, &FlatRange, HwAddr)> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return None;
        }
        let pos = self.last?;
        let fr = self.view.get(pos)?;
        if !fr.contains(addr) || u128::from(addr) + u128::from(size) > fr.end() {
            return None;
        }
        let direct = if write { direct_write(fr) } else { direct_read(fr) };
        if direct {
            return None;
        }
        let off = fr.offset_in_region() + (addr - fr.start());
        match io_ops(fr) {
            Some(ops) if ops.access_size(u64::from(size), off) == size => Some((pos, fr, off)),
            _ => None,
        }
    }

    /// Drops the cached view (it is reloaded on the next access).
    pub fn release(&mut self) {
        self.view = Arc::new(FlatView::empty());
        self.gen = u64::MAX;
        self.forget_ranges();
    }

    /// Forgets the ranges remembered in the cached view.
    fn forget_ranges(&mut self) {
        self.last = None;
        self.plain_read = None;
        self.plain_write = None;
    }
}

/// The ops of an I/O range (an I/O region, or a ROM device's writes and
/// non-romd reads).
#[inline]
fn io_ops(fr: &FlatRange) -> Option<&RegionOps> {
    match fr.region().kind() {
        RegionKind::Io(ops) | RegionKind::RomDevice { ops, .. } => Some(ops),
        _ => None,
    }
}

/// The [`PlainIo`] of a `size`-byte access at region offset `off` that
/// [`Accessor::single_io`] found to be one access to range `fr` (at `pos`),
/// if it is plain.
fn remember_plain(fr: &FlatRange, pos: Pos, off: HwAddr, size: u32) -> Option<PlainIo> {
    let ops = io_ops(fr)?;
    if off & (u64::from(size) - 1) != 0 || !ops.is_plain(size) {
        return None;
    }
    let span = u64::try_from(fr.size().checked_sub(u128::from(size))?).ok()?;
    Some(PlainIo { pos, start: fr.start(), span, offset: fr.offset_in_region(), size })
}
