//! Guest atomics on [`AddressSpace`] and [`Accessor`]; what is atomic with
//! respect to what is documented in [`docs`](crate::docs#guest-atomics).

use crate::accessor::Accessor;
use crate::address_space::AddressSpace;
use crate::dispatch::{region_read, region_write};
use crate::flatview::{FlatRange, FlatView};
use crate::ram::mask;
use crate::region::RegionKind;
use crate::sync::RcuGuard;
use crate::types::{HwAddr, MemTxResult};

/// A read-modify-write operation for [`AddressSpace::atomic_rmw`] and
/// [`Accessor::atomic_rmw`]. The operand is truncated to the access size;
/// arithmetic wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AtomicRmw {
    /// Stores the operand (`xchg`).
    Xchg(u64),
    /// Adds the operand (`lock add`, `lock xadd`, `lock inc`).
    Add(u64),
    /// Subtracts the operand (`lock sub`, `lock dec`).
    Sub(u64),
    /// Bitwise and (`lock and`, `lock btr`).
    And(u64),
    /// Bitwise or (`lock or`, `lock bts`).
    Or(u64),
    /// Bitwise exclusive or (`lock xor`, `lock btc`, `lock not`).
    Xor(u64),
}

impl AtomicRmw {
    /// The value the operation stores over `old` (not truncated).
    pub fn apply(self, old: u64) -> u64 {
        match self {
            AtomicRmw::Xchg(v) => v,
            AtomicRmw::Add(v) => old.wrapping_add(v),
            AtomicRmw::Sub(v) => old.wrapping_sub(v),
            AtomicRmw::And(v) => old & v,
            AtomicRmw::Or(v) => old | v,
            AtomicRmw::Xor(v) => old ^ v,
        }
    }
}

/// Serialises the atomics that no single host atomic covers (see the module
/// documentation). It guards no Rust data, only guest bytes, and is never
/// held while a device or caller code runs; it is `std`'s because guest-RAM
/// atomics are not part of the loom-modelled protocols.
static SPLIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn split_lock() -> std::sync::MutexGuard<'static, ()> {
    SPLIT_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One guest atomic, before it runs.
enum Op<F> {
    Rmw(AtomicRmw),
    Cas { current: u64, new: u64 },
    Update(F),
}

impl<F: FnMut(u64) -> Option<u64>> Op<F> {
    /// The value to store over `old` (already truncated to `size`), if any.
    fn compute(&mut self, old: u64, size: u32) -> Option<u64> {
        match self {
            Op::Rmw(op) => Some(op.apply(old)),
            Op::Cas { current, new } => (old == *current & mask(size)).then_some(*new),
            Op::Update(f) => f(old),
        }
    }
}

/// The outcome of an atomic: `Ok(old)` if it stored, `Err(old)` if not.
type Outcome = (Result<u64, u64>, MemTxResult);

/// How an atomic finds the range that serves an address: the view it
/// loaded once ([`AddressSpace`]) or the accessor's cache ([`Accessor`]).
///
/// The atomics go through their own walk over the ranges rather than
/// through `read`/`write`: every inlined copy of the ordinary access path
/// is one more call site for the compiler to weigh, and adding some here
/// was enough to push it out of line on the hot path (+10% on an 8-byte
/// read through `AddressSpace`).
trait Path {
    fn range(&mut self, addr: HwAddr) -> Option<&FlatRange>;
}

impl Path for RcuGuard<FlatView> {
    #[inline]
    fn range(&mut self, addr: HwAddr) -> Option<&FlatRange> {
        self.lookup(addr)
    }
}

impl Path for Accessor {
    #[inline]
    fn range(&mut self, addr: HwAddr) -> Option<&FlatRange> {
        self.lookup(addr)
    }
}

/// Whether writes to the range are stored straight into RAM.
#[inline]
fn writable_ram(fr: &FlatRange) -> bool {
    matches!(*fr.region.kind(), RegionKind::Ram(_)) && !fr.readonly
}

/// Runs one atomic.
#[inline]
fn run<P: Path, F: FnMut(u64) -> Option<u64>>(path: &mut P, addr: HwAddr, size: u32, mut op: Op<F>) -> Outcome {
    if !matches!(size, 1 | 2 | 4 | 8) {
        tracing::warn!(addr, size, "guest atomic of an illegal size");
        return (Err(0), MemTxResult::DecodeError);
    }
    if let Some(fr) = path.range(addr) {
        if let Some(done) = lock_free(fr, addr, size, &mut op) {
            return done;
        }
    }
    match ram_parts(path, addr, size) {
        Some(parts) => split(&parts, size, &mut op),
        None => through_paths(path, addr, size, &mut op),
    }
}

/// The lock-free cases: the whole access in one writable RAM range, and one
/// host atomic (or a CAS loop on one host word) covers it.
#[inline]
fn lock_free<F: FnMut(u64) -> Option<u64>>(fr: &FlatRange, addr: HwAddr, size: u32, op: &mut Op<F>) -> Option<Outcome> {
    let last = addr.checked_add(size as u64 - 1)?;
    if last > fr.last || !writable_ram(fr) {
        return None;
    }
    let block = fr.region.ram_block()?;
    let off = fr.offset_in_region + (addr - fr.start);
    let r = match op {
        Op::Rmw(o) => block.atomic_rmw(off, size, *o).map(Ok),
        Op::Cas { current, new } => block.atomic_cmpxchg(off, size, *current, *new),
        Op::Update(f) => block.atomic_update(off, size, f),
    }?;
    if r.is_ok() {
        fr.region.note_ram_write(off, size as u64, fr.dirty_log_mask);
    }
    Some((r, MemTxResult::Ok))
}

/// A piece of a crossing atomic: `len` bytes at `off` in `fr`'s RAM.
struct Part {
    fr: FlatRange,
    off: u64,
    len: usize,
}

/// The pieces of an access that lies wholly in writable RAM (one range or
/// several); `None` if any byte is something else.
fn ram_parts<P: Path>(path: &mut P, addr: HwAddr, size: u32) -> Option<Vec<Part>> {
    let end = addr as u128 + size as u128;
    if end > crate::types::SIZE_MAX {
        return None;
    }
    let mut parts = Vec::new();
    let mut a = addr as u128;
    while a < end {
        let fr = path.range(a as u64)?;
        if !writable_ram(fr) {
            return None;
        }
        let len = (fr.end().min(end) - a) as usize;
        parts.push(Part { fr: fr.clone(), off: fr.offset_in_region + (a as u64 - fr.start), len });
        a += len as u128;
    }
    Some(parts)
}

fn read_parts(parts: &[Part]) -> u64 {
    let mut b = [0u8; 8];
    let mut i = 0;
    for p in parts {
        if let Some(block) = p.fr.region.ram_block() {
            block.read_at(p.off, &mut b[i..i + p.len]);
        }
        i += p.len;
    }
    u64::from_le_bytes(b)
}

fn write_parts(parts: &[Part], value: u64) {
    let b = value.to_le_bytes();
    let mut i = 0;
    for p in parts {
        if let Some(block) = p.fr.region.ram_block() {
            block.write_at(p.off, &b[i..i + p.len]);
        }
        i += p.len;
    }
}

/// A crossing atomic on RAM, under [`SPLIT_LOCK`]. `fetch_update`'s closure
/// runs outside the lock, and the store happens only if the value is still
/// the one it saw.
fn split<F: FnMut(u64) -> Option<u64>>(parts: &[Part], size: u32, op: &mut Op<F>) -> Outcome {
    tracing::trace!(size, "guest atomic crossing a host word: serialised");
    let r = loop {
        let guard = split_lock();
        let old = read_parts(parts);
        let new = if let Op::Update(f) = op {
            drop(guard);
            let Some(new) = f(old) else { return (Err(old), MemTxResult::Ok) };
            let guard = split_lock();
            if read_parts(parts) != old {
                continue;
            }
            write_parts(parts, new);
            drop(guard);
            break Ok(old);
        } else {
            op.compute(old, size)
        };
        match new {
            Some(new) => write_parts(parts, new),
            None => return (Err(old), MemTxResult::Ok),
        }
        drop(guard);
        break Ok(old);
    };
    for p in parts {
        p.fr.region.note_ram_write(p.off, p.len as u64, p.fr.dirty_log_mask);
    }
    (r, MemTxResult::Ok)
}

/// Anything but writable RAM: a read, then a write, each with the ordinary
/// access rules; not atomic (see the module documentation).
fn through_paths<P: Path, F: FnMut(u64) -> Option<u64>>(
    path: &mut P,
    addr: HwAddr,
    size: u32,
    op: &mut Op<F>,
) -> Outcome {
    tracing::trace!(addr, size, "guest atomic outside RAM: read, then write");
    let n = size as usize;
    let mut b = [0u8; 8];
    let read = walk_ranges(path, addr, Dir::Read(&mut b[..n]));
    let old = u64::from_le_bytes(b);
    let (outcome, store) = match op.compute(old, size) {
        Some(new) => (Ok(old), Some(new)),
        // A failed compare-exchange writes the old value back (x86, QEMU).
        None if matches!(op, Op::Cas { .. }) => (Err(old), Some(old)),
        None => (Err(old), None),
    };
    let written = store.map_or(MemTxResult::Ok, |v| walk_ranges(path, addr, Dir::Write(&v.to_le_bytes()[..n])));
    (outcome, read.combine(written))
}

/// The direction of one step of [`through_paths`].
enum Dir<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// One read or write of up to 8 bytes with the rules of `address_space_rw`:
/// RAM (and romd ROM devices, for reads) directly, writes to ROM dropped,
/// devices called with the access cut by their constraints, holes and the
/// top of the address space reading 0. Holes are stepped a byte at a time
/// (the accesses are at most 8 bytes long).
fn walk_ranges<P: Path>(path: &mut P, addr: HwAddr, mut dir: Dir<'_>) -> MemTxResult {
    let len = match &dir {
        Dir::Read(b) => b.len(),
        Dir::Write(b) => b.len(),
    };
    let mut result = MemTxResult::Ok;
    let mut done = 0;
    while done < len {
        let remaining = len - done;
        let Some(fr) = addr.checked_add(done as u64).and_then(|a| path.range(a)) else {
            if let Dir::Read(b) = &mut dir {
                b[done] = 0;
            }
            result = result.combine(MemTxResult::DecodeError);
            done += 1;
            continue;
        };
        let a = addr + done as u64;
        let off = fr.offset_in_region + (a - fr.start);
        let in_range = (fr.end() - a as u128).min(remaining as u128) as usize;
        let shared = fr.region.shared();
        let (n, r) = match (fr.region.kind(), &mut dir) {
            (RegionKind::Ram(block), Dir::Read(b)) => {
                block.read_at(off, &mut b[done..done + in_range]);
                (in_range, MemTxResult::Ok)
            }
            (RegionKind::RomDevice { ram, .. }, Dir::Read(b)) if fr.romd => {
                ram.read_at(off, &mut b[done..done + in_range]);
                (in_range, MemTxResult::Ok)
            }
            (RegionKind::Ram(block), Dir::Write(b)) => {
                if fr.readonly {
                    (in_range, MemTxResult::DecodeError)
                } else {
                    block.write_at(off, &b[done..done + in_range]);
                    fr.region.note_ram_write(off, in_range as u64, fr.dirty_log_mask);
                    (in_range, MemTxResult::Ok)
                }
            }
            (RegionKind::Reservation, Dir::Read(b)) => {
                b[done..done + in_range].fill(0);
                (in_range, region_read(shared, &fr.region, off, 1).1)
            }
            (RegionKind::Reservation, Dir::Write(_)) => (in_range, region_write(shared, &fr.region, off, 0, 1)),
            (_, dir) => {
                // A device: the access is cut by its constraints and, as in
                // `address_space_rw`, not clamped to the range.
                let Some(ops) = fr.region.ops() else {
                    return result.combine(MemTxResult::DecodeError);
                };
                let l = (ops.access_size(remaining as u64, off) as usize).min(remaining);
                match dir {
                    Dir::Read(b) => {
                        let (v, r) = region_read(shared, &fr.region, off, l as u32);
                        b[done..done + l].copy_from_slice(&v.to_le_bytes()[..l]);
                        (l, r)
                    }
                    Dir::Write(b) => {
                        let mut v = [0u8; 8];
                        v[..l].copy_from_slice(&b[done..done + l]);
                        (l, region_write(shared, &fr.region, off, u64::from_le_bytes(v), l as u32))
                    }
                }
            }
        };
        result = result.combine(r);
        done += n.max(1);
    }
    result
}

/// The `fetch_update` closure type of the operations that have none.
type NoUpdate = fn(u64) -> Option<u64>;

fn old_value((r, t): Outcome) -> (u64, MemTxResult) {
    (r.unwrap_or_else(|old| old), t)
}

impl AddressSpace {
    /// Atomically applies `op` to the `size`-byte (1, 2, 4 or 8)
    /// little-endian value at `addr` and returns the old value. See the
    /// [documentation](crate::docs#guest-atomics) for what is atomic with
    /// respect to what.
    pub fn atomic_rmw(&self, addr: HwAddr, size: u32, op: AtomicRmw) -> (u64, MemTxResult) {
        old_value(run::<_, NoUpdate>(&mut self.load_view(), addr, size, Op::Rmw(op)))
    }

    /// Atomically stores `new` over the `size`-byte value at `addr` if it is
    /// `current` (both truncated to `size`): `Ok(old)` if it stored,
    /// `Err(actual)` if not (`lock cmpxchg`; `cmpxchg8b` is the 8-byte case).
    pub fn atomic_compare_exchange(
        &self,
        addr: HwAddr,
        size: u32,
        current: u64,
        new: u64,
    ) -> (Result<u64, u64>, MemTxResult) {
        run::<_, NoUpdate>(&mut self.load_view(), addr, size, Op::Cas { current, new })
    }

    /// Atomically stores `f(old)` over the `size`-byte value at `addr`
    /// unless `f` returns `None`; if the value changes between the read and
    /// the store, retries with the new value (so `f` may run several times
    /// and must not access guest memory). `Ok(old)` if it stored, `Err(old)`
    /// if `f` declined.
    pub fn atomic_fetch_update(
        &self,
        addr: HwAddr,
        size: u32,
        f: impl FnMut(u64) -> Option<u64>,
    ) -> (Result<u64, u64>, MemTxResult) {
        run(&mut self.load_view(), addr, size, Op::Update(f))
    }
}

impl Accessor {
    /// Like [`AddressSpace::atomic_rmw`], through the cache.
    pub fn atomic_rmw(&mut self, addr: HwAddr, size: u32, op: AtomicRmw) -> (u64, MemTxResult) {
        old_value(run::<_, NoUpdate>(self, addr, size, Op::Rmw(op)))
    }

    /// Like [`AddressSpace::atomic_compare_exchange`], through the cache.
    pub fn atomic_compare_exchange(
        &mut self,
        addr: HwAddr,
        size: u32,
        current: u64,
        new: u64,
    ) -> (Result<u64, u64>, MemTxResult) {
        run::<_, NoUpdate>(self, addr, size, Op::Cas { current, new })
    }

    /// Like [`AddressSpace::atomic_fetch_update`], through the cache.
    pub fn atomic_fetch_update(
        &mut self,
        addr: HwAddr,
        size: u32,
        f: impl FnMut(u64) -> Option<u64>,
    ) -> (Result<u64, u64>, MemTxResult) {
        run(self, addr, size, Op::Update(f))
    }
}
