//! The path of a guest access: `address_space_rw` over one loaded view,
//! range by range — RAM copied directly, MMIO legalised (`ops.rs`) and
//! dispatched to the region's ops, holes answered as unassigned.
//!
//! ```text
//! AddressSpace::read/write          Accessor::read/write (cached view+range)
//!        │ one RCU load of the view         │ one atomic load to revalidate
//!        └──────────────┬───────────────────┘
//!              rw_view_from: per FlatRange
//!         ┌──────────────┼──────────────────────┐
//!   RAM (direct)     MMIO: access_size,      hole / reservation /
//!   RamBlock copy    region_read/write:       ROM write: answered,
//!   + note_ram_write flush, ioeventfd,        traced
//!                    RegionOps legalise → ops
//! ```

use crate::flatview::{FlatRange, FlatView};
use crate::ops::{mask_of, RegionOps};
use crate::region::{MemoryRegion, RegionKind};
use crate::topology::TopoShared;
use crate::types::{HwAddr, MemTxResult};
use crate::AddressSpace;

/// Is a read of this range served straight from RAM?
#[inline]
pub(crate) fn direct_read(fr: &FlatRange) -> bool {
    match fr.region().kind() {
        RegionKind::Ram(_) => true,
        RegionKind::RomDevice { .. } => fr.romd(),
        _ => false,
    }
}

/// Is a write to this range stored straight into RAM?
#[inline]
pub(crate) fn direct_write(fr: &FlatRange) -> bool {
    matches!(fr.region().kind(), RegionKind::Ram(_)) && !fr.readonly()
}

fn load_le(buf: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..buf.len()].copy_from_slice(buf);
    u64::from_le_bytes(b)
}

/// `memory_region_dispatch_read` for a terminating region.
pub(crate) fn region_read(shared: &TopoShared, mr: &MemoryRegion, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
    match mr.kind() {
        RegionKind::Io(ops) | RegionKind::RomDevice { ops, .. } => {
            if mr.coalescing().flushes() {
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
    match mr.kind() {
        RegionKind::Io(ops) | RegionKind::RomDevice { ops, .. } => {
            if mr.coalescing().flushes() {
                shared.flush();
            }
            if !ops.access_valid(addr, size, true) {
                return MemTxResult::DecodeError;
            }
            if mr.eventfd_state().signal(mr.name(), addr, size, || ops.to_device_order(value, size)) {
                return MemTxResult::Ok;
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

/// [`region_read`] of an access that [`RegionOps::is_plain`] found plain at
/// its size, at a naturally aligned offset of an I/O region `mr` whose ops
/// are `ops`: the same steps, minus the checks that cannot fail.
#[inline]
pub(crate) fn plain_read(
    shared: &TopoShared,
    mr: &MemoryRegion,
    ops: &RegionOps,
    addr: HwAddr,
    size: u32,
) -> (u64, MemTxResult) {
    if mr.coalescing().flushes() {
        shared.flush();
    }
    if !ops.accepts(addr, size, false) {
        return (0, MemTxResult::DecodeError);
    }
    let (v, r) = ops.ops.read_with_result(addr, size);
    (v & mask_of(size), r)
}

/// [`region_write`] of a plain access (see [`plain_read`]) of a `value`
/// that fits in `size` bytes.
#[inline]
pub(crate) fn plain_write(
    shared: &TopoShared,
    mr: &MemoryRegion,
    ops: &RegionOps,
    addr: HwAddr,
    value: u64,
    size: u32,
) -> MemTxResult {
    if mr.coalescing().flushes() {
        shared.flush();
    }
    if !ops.accepts(addr, size, true) {
        return MemTxResult::DecodeError;
    }
    // Little-endian: the guest's value is the device's.
    if mr.eventfd_state().signal(mr.name(), addr, size, || value) {
        return MemTxResult::Ok;
    }
    ops.ops.write_with_result(addr, value, size)
}

/// The caller's buffer: filled by a read, the source of a write.
pub(crate) enum Buf<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Buf<'_> {
    #[inline]
    pub(crate) fn len(&self) -> usize {
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
/// that range `fr` serves; returns how many bytes it consumed. `done` is
/// below `buf.len()`.
#[inline]
pub(crate) fn access_in_range(
    shared: &TopoShared,
    fr: &FlatRange,
    a: HwAddr,
    buf: &mut Buf<'_>,
    done: usize,
) -> (usize, MemTxResult) {
    let remaining = (buf.len() - done) as u64;
    let off = fr.offset_in_region() + (a - fr.start());
    let in_range = (fr.end() - a as u128).min(remaining as u128) as usize;
    let is_write = buf.is_write();
    let direct = if is_write { direct_write(fr) } else { direct_read(fr) };
    let region = fr.region();
    if direct {
        if let Some(block) = region.ram_block() {
            match buf {
                Buf::Read(b) => block.read_at(off, &mut b[done..done + in_range]),
                Buf::Write(b) => {
                    block.write_at(off, &b[done..done + in_range]);
                    region.note_ram_write(off, in_range as u64, fr.dirty_log_mask());
                }
            }
        }
        return (in_range, MemTxResult::Ok);
    }
    match region.kind() {
        RegionKind::Ram(_) => {
            // A write to ROM: dropped, nothing dirtied.
            tracing::trace!(region = region.name(), addr = a, "write to ROM dropped");
            (in_range, MemTxResult::DecodeError)
        }
        RegionKind::Reservation => {
            let r = if is_write {
                region_write(shared, region, off, 0, 1)
            } else {
                buf.zero(done, in_range);
                region_read(shared, region, off, 1).1
            };
            (in_range, r)
        }
        RegionKind::Io(ops) | RegionKind::RomDevice { ops, .. } => {
            // MMIO: not clamped to the range (QEMU relies on that).
            let l = ops.access_size(remaining, off) as usize;
            match buf {
                Buf::Write(b) => (l, region_write(shared, region, off, load_le(&b[done..done + l]), l as u32)),
                Buf::Read(b) => {
                    let (v, r) = region_read(shared, region, off, l as u32);
                    b[done..done + l].copy_from_slice(&v.to_le_bytes()[..l]);
                    (l, r)
                }
            }
        }
        // Views hold terminating regions only.
        RegionKind::Container | RegionKind::Alias { .. } => {
            buf.zero(done, in_range);
            (in_range, MemTxResult::DecodeError)
        }
    }
}

/// `flatview_read_continue` / `flatview_write_continue` from `done` bytes
/// into the access.
pub(crate) fn rw_view_from(
    shared: &TopoShared,
    view: &FlatView,
    addr: HwAddr,
    mut buf: Buf<'_>,
    mut done: usize,
) -> MemTxResult {
    let mut result = MemTxResult::Ok;
    let len = buf.len();
    while done < len {
        let Some(a) = addr.checked_add(done as u64) else {
            // Past the top of the 64-bit space: nothing decodes.
            buf.zero(done, len - done);
            return result.combine(MemTxResult::DecodeError);
        };
        let remaining = (len - done) as u64;
        let Some(fr) = view.lookup(a) else {
            // A hole: up to the next range.
            let next = view.iter_from(a).next();
            let gap_end = next.map_or(u128::MAX, |r| r.start() as u128);
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

impl AddressSpace {
    /// `address_space_read`: reads `buf.len()` bytes at `addr`. Bytes that
    /// nothing serves read as 0 (all-ones for unclaimed I/O ports, whose
    /// root serves them) and the result says why.
    #[inline]
    pub fn read(&self, addr: HwAddr, buf: &mut [u8]) -> MemTxResult {
        let view = self.inner().load_view();
        rw_view_from(self.inner().shared(), &view, addr, Buf::Read(buf), 0)
    }

    /// `address_space_write`.
    #[inline]
    pub fn write(&self, addr: HwAddr, buf: &[u8]) -> MemTxResult {
        let view = self.inner().load_view();
        rw_view_from(self.inner().shared(), &view, addr, Buf::Write(buf), 0)
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
    /// and friends); other sizes are cut to 8 bytes, and 0 reads nothing.
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
}

/// Whether `size` is an access size a region's ops can be given.
fn valid_size(size: u32) -> bool {
    matches!(size, 1 | 2 | 4 | 8)
}

impl MemoryRegion {
    /// `memory_region_dispatch_read`: a read of `size` bytes (1, 2, 4 or 8)
    /// at `addr` in this region, legalised by its constraints (aliases
    /// forward to their target). The value is in target (little-endian)
    /// layout. Any other size reads 0 with [`MemTxResult::DecodeError`]
    /// (QEMU's callers can only pass those four).
    pub fn dispatch_read(&self, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        if !valid_size(size) {
            tracing::debug!(region = self.name(), addr, size, "dispatch_read: invalid size");
            return (0, MemTxResult::DecodeError);
        }
        if let Some(t) = self.alias_target() {
            return t.dispatch_read(self.alias_offset().wrapping_add(addr), size);
        }
        region_read(self.shared(), self, addr, size)
    }

    /// `memory_region_dispatch_write`; sizes as for
    /// [`dispatch_read`](Self::dispatch_read).
    pub fn dispatch_write(&self, addr: HwAddr, value: u64, size: u32) -> MemTxResult {
        if !valid_size(size) {
            tracing::debug!(region = self.name(), addr, size, "dispatch_write: invalid size");
            return MemTxResult::DecodeError;
        }
        if let Some(t) = self.alias_target() {
            return t.dispatch_write(self.alias_offset().wrapping_add(addr), value, size);
        }
        region_write(self.shared(), self, addr, value, size)
    }
}
