//! Host memory behind RAM regions, and their dirty bitmaps.
//!
//! This module holds the runtime's `unsafe` accesses to guest memory (the
//! one other caller of its copies is `RamPage::load`/`store` in
//! `translate.rs`, for one page): guest RAM is memory shared with the guest
//! and with every vCPU thread, so it is only ever touched through atomic
//! accesses, never through Rust references to its bytes.
//!
//! The memory model of guest RAM these copies implement is documented in
//! [`docs`](crate::docs#guest-ram).

use crate::dirty::DirtyBitmaps;
use crate::error::{Error, Result};
use crate::guest_atomic::AtomicRmw;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// An atomic of width `$a` (value type `$t`) at `$p`, which the caller has
/// proven aligned and inside a live block.
macro_rules! atomic_at {
    ($a:ty, $p:expr) => {
        // SAFETY: guaranteed by the macro's callers (see each call site).
        unsafe { <$a>::from_ptr(($p).cast()) }
    };
}

/// `op` on the aligned atomic at `$p`, on a little-endian host.
macro_rules! native_rmw {
    ($a:ty, $t:ty, $p:expr, $op:expr) => {{
        let a = atomic_at!($a, $p);
        let o = Ordering::SeqCst;
        (match $op {
            AtomicRmw::Xchg(v) => a.swap(v as $t, o),
            AtomicRmw::Add(v) => a.fetch_add(v as $t, o),
            AtomicRmw::Sub(v) => a.fetch_sub(v as $t, o),
            AtomicRmw::And(v) => a.fetch_and(v as $t, o),
            AtomicRmw::Or(v) => a.fetch_or(v as $t, o),
            AtomicRmw::Xor(v) => a.fetch_xor(v as $t, o),
        }) as u64
    }};
}

/// Compare-exchange on the aligned atomic at `$p` (little-endian values).
macro_rules! native_cas {
    ($a:ty, $t:ty, $p:expr, $cur:expr, $new:expr) => {{
        let a = atomic_at!($a, $p);
        a.compare_exchange(($cur as $t).to_le(), ($new as $t).to_le(), Ordering::SeqCst, Ordering::SeqCst)
            .map(|v| <$t>::from_le(v) as u64)
            .map_err(|v| <$t>::from_le(v) as u64)
    }};
}

/// `fetch_update` on the aligned atomic at `$p` (little-endian values).
macro_rules! native_update {
    ($a:ty, $t:ty, $p:expr, $f:expr) => {{
        let a = atomic_at!($a, $p);
        a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| $f(<$t>::from_le(v) as u64).map(|n| (n as $t).to_le()))
            .map(|v| <$t>::from_le(v) as u64)
            .map_err(|v| <$t>::from_le(v) as u64)
    }};
}

/// Where the bytes of a RAM block come from.
#[derive(Debug)]
enum Backing {
    /// Anonymous, zero-filled memory mapped by the runtime.
    Mmap,
    /// Memory owned by the embedder (`new_ram_from_ptr`).
    Foreign,
}

/// One block of guest RAM: host memory plus per-client dirty bitmaps.
#[derive(Debug)]
pub(crate) struct RamBlock {
    ptr: NonNull<u8>,
    len: u64,
    backing: Backing,
    /// QEMU's `ram_addr` of the first byte.
    pub(crate) ram_addr: u64,
    pub(crate) dirty: DirtyBitmaps,
}

// SAFETY: the block owns (or, for foreign memory, was promised exclusive
// use of) `len` bytes at `ptr` for its whole life; the bytes are only accessed
// through atomics, which are valid from any thread.
unsafe impl Send for RamBlock {}
// SAFETY: see `Send`: no `&`/`&mut` to guest bytes is ever created.
unsafe impl Sync for RamBlock {}

static NEXT_RAM_ADDR: AtomicU64 = AtomicU64::new(0);

fn alloc_ram_addr(len: u64) -> u64 {
    // Blocks are laid out in one ram_addr space, page aligned, in creation
    // order (QEMU finds a gap; a bump allocator gives the same uniqueness).
    let span = len.div_ceil(crate::types::PAGE_SIZE).max(1) * crate::types::PAGE_SIZE;
    NEXT_RAM_ADDR.fetch_add(span, Ordering::Relaxed)
}

impl RamBlock {
    /// Anonymous, zero-filled RAM of `len` bytes; every page starts dirty for
    /// every client.
    pub(crate) fn new_anonymous(name: &str, len: u128) -> Result<RamBlock> {
        let alloc_err = |reason: String| Error::RamAllocation { region: name.to_string(), size: len, reason };
        let len64 = u64::try_from(len).map_err(|_| alloc_err("larger than the host address space".into()))?;
        let map_len = usize::try_from(len64.max(1)).map_err(|_| alloc_err("too large".into()))?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // affected, and the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(alloc_err(std::io::Error::last_os_error().to_string()));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| alloc_err("mmap returned null".into()))?;
        Ok(RamBlock {
            ptr,
            len: len64,
            backing: Backing::Mmap,
            ram_addr: alloc_ram_addr(len64),
            dirty: DirtyBitmaps::new_all_dirty(len64),
        })
    }

    /// RAM over memory the embedder owns.
    ///
    /// # Safety
    /// See [`Topology::new_ram_from_ptr`](crate::Topology::new_ram_from_ptr).
    pub(crate) unsafe fn new_foreign(ptr: NonNull<u8>, len: u64) -> RamBlock {
        RamBlock {
            ptr,
            len,
            backing: Backing::Foreign,
            ram_addr: alloc_ram_addr(len),
            dirty: DirtyBitmaps::new_all_dirty(len),
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn host_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Copies `buf.len()` bytes from offset `off` (see the module
    /// documentation for what is atomic). The caller has checked the range
    /// against [`len`](Self::len).
    #[inline]
    pub(crate) fn read_at(&self, off: u64, buf: &mut [u8]) {
        debug_assert!(off as u128 + buf.len() as u128 <= self.len as u128);
        // SAFETY: `off + buf.len() <= len` (checked by every caller), so the
        // bytes lie in the block, which is alive for `&self`; they are only
        // ever accessed atomically (no Rust reference to guest RAM exists).
        unsafe { load(self.at(off), buf) }
    }

    /// Copies `buf` to offset `off`. The caller has checked the range.
    #[inline]
    pub(crate) fn write_at(&self, off: u64, buf: &[u8]) {
        debug_assert!(off as u128 + buf.len() as u128 <= self.len as u128);
        // SAFETY: as in `read_at`.
        unsafe { store(self.at(off), buf) }
    }

    /// The host address of byte `off` (not dereferenced here).
    #[inline]
    fn at(&self, off: u64) -> *mut u8 {
        self.ptr.as_ptr().wrapping_add(off as usize)
    }

    /// How an atomic read-modify-write of `size` bytes at `off` is done on
    /// this host. The caller has checked the range and that `size` is 1, 2,
    /// 4 or 8.
    pub(crate) fn atomic_site(&self, off: u64, size: u32) -> AtomicSite {
        let h = self.at(off) as usize;
        let size = size as usize;
        if h % size == 0 {
            return AtomicSite::Native;
        }
        let word = h & !7;
        let base = self.ptr.as_ptr() as usize;
        // The containing word must belong to the block: a CAS writes all of
        // its 8 bytes (back), and foreign memory may end mid-word.
        let in_word = word == (h + size - 1) & !7 && word >= base && word + 8 <= base + self.len as usize;
        if in_word {
            AtomicSite::InWord
        } else {
            AtomicSite::Split
        }
    }

    /// Atomically applies `op` to the `size` bytes at `off` (a little-endian
    /// value) and returns the old value; `None` (and nothing done) for a
    /// [`Split`](AtomicSite::Split) site.
    #[inline]
    pub(crate) fn atomic_rmw(&self, off: u64, size: u32, op: AtomicRmw) -> Option<u64> {
        match self.atomic_site(off, size) {
            AtomicSite::Native if cfg!(target_endian = "little") => {
                let p = self.at(off);
                // SAFETY (all arms): `p` is aligned to the width (`Native`),
                // its bytes lie in the block (range checked by the caller),
                // and guest RAM is only accessed atomically.
                Some(match size {
                    1 => native_rmw!(AtomicU8, u8, p, op),
                    2 => native_rmw!(AtomicU16, u16, p, op),
                    4 => native_rmw!(AtomicU32, u32, p, op),
                    _ => native_rmw!(AtomicU64, u64, p, op),
                })
            }
            _ => self.atomic_update(off, size, |old| Some(op.apply(old))).map(|r| r.unwrap_or_else(|old| old)),
        }
    }

    /// Atomically replaces the `size` bytes at `off` with `new` if they hold
    /// `current` (both truncated to `size`): `Ok(old)` if it stored,
    /// `Err(actual)` if not; `None` for a split site.
    #[inline]
    pub(crate) fn atomic_cmpxchg(&self, off: u64, size: u32, current: u64, new: u64) -> Option<Result<u64, u64>> {
        match self.atomic_site(off, size) {
            AtomicSite::Native => {
                let p = self.at(off);
                // SAFETY (all arms): as in `atomic_rmw`.
                Some(match size {
                    1 => native_cas!(AtomicU8, u8, p, current, new),
                    2 => native_cas!(AtomicU16, u16, p, current, new),
                    4 => native_cas!(AtomicU32, u32, p, current, new),
                    _ => native_cas!(AtomicU64, u64, p, current, new),
                })
            }
            _ => {
                let cur = current & mask(size);
                self.atomic_update(off, size, |old| (old == cur).then_some(new))
            }
        }
    }

    /// Atomically replaces the `size` bytes at `off` (value `old`) with
    /// `f(old)` unless it returns `None`, retrying if they change meanwhile
    /// (so `f` may run more than once): `Ok(old)` if it stored, `Err(old)`
    /// if `f` declined; `None` for a split site.
    pub(crate) fn atomic_update(
        &self,
        off: u64,
        size: u32,
        mut f: impl FnMut(u64) -> Option<u64>,
    ) -> Option<Result<u64, u64>> {
        let p = self.at(off);
        match self.atomic_site(off, size) {
            // SAFETY (all arms): as in `atomic_rmw`.
            AtomicSite::Native => Some(match size {
                1 => native_update!(AtomicU8, u8, p, f),
                2 => native_update!(AtomicU16, u16, p, f),
                4 => native_update!(AtomicU32, u32, p, f),
                _ => native_update!(AtomicU64, u64, p, f),
            }),
            AtomicSite::InWord => {
                let word = (p as usize & !7) as *mut u8;
                let shift = p as usize & 7;
                let n = size as usize;
                let get = |w: u64| {
                    let mut v = [0u8; 8];
                    v[..n].copy_from_slice(&w.to_ne_bytes()[shift..shift + n]);
                    u64::from_le_bytes(v)
                };
                // SAFETY: `word` is 8-aligned and, by `atomic_site`, its 8
                // bytes lie in the block; guest RAM is only accessed
                // atomically.
                let a = unsafe { AtomicU64::from_ptr(word.cast()) };
                let r = a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                    f(get(w)).map(|new| {
                        let mut b = w.to_ne_bytes();
                        b[shift..shift + n].copy_from_slice(&new.to_le_bytes()[..n]);
                        u64::from_ne_bytes(b)
                    })
                });
                Some(r.map(get).map_err(get))
            }
            AtomicSite::Split => None,
        }
    }
}

/// Where an atomic read-modify-write of guest RAM can be done lock-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtomicSite {
    /// The host address is a multiple of the size: one host atomic.
    Native,
    /// Misaligned, but inside one aligned 8-byte host word of the block: a
    /// compare-exchange loop on that word.
    InWord,
    /// Crosses an aligned 8-byte host word (or the block's edge within one):
    /// no single host atomic covers it.
    Split,
}

/// The low `size` bytes of a value.
#[inline]
pub(crate) fn mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// Ordering of guest RAM loads (see the module documentation).
const LOAD: Ordering = Ordering::Acquire;
/// Ordering of guest RAM stores.
const STORE: Ordering = Ordering::Release;

#[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(dead_code))]
/// Copies at least this long are moved by the CPU's string copy on x86-64
/// (`string_copy`); shorter ones, and all copies elsewhere, by atomic
/// pieces. Around this size the two cost the same.
const STRING_COPY_MIN: usize = 256;

/// Cuts the `len` bytes at host address `addr` into naturally aligned
/// pieces: rising 1-, 2- and 4-byte pieces up to the first 8-byte boundary,
/// a run of 8-byte words, then falling 4-, 2- and 1-byte pieces. Calls
/// `f(offset, width, count)` for each piece (`count` 1) and for the run
/// (`width` 8, `count` words), in address order.
#[inline(always)]
fn walk(addr: usize, len: usize, mut f: impl FnMut(usize, usize, usize)) {
    let mut i = 0;
    for w in [1, 2, 4] {
        if addr.wrapping_add(i) & w != 0 && len - i >= w {
            f(i, w, 1);
            i += w;
        }
    }
    let words = (len - i) / 8;
    if words > 0 {
        f(i, 8, words);
        i += words * 8;
    }
    for w in [4, 2, 1] {
        if len - i >= w {
            f(i, w, 1);
            i += w;
        }
    }
}

/// Loads the naturally aligned piece of `dst.len()` (1, 2, 4 or 8) bytes at
/// `src` with one atomic load into `dst`.
///
/// # Safety
/// `src` is aligned to `dst.len()` and valid for that many bytes, which are
/// only accessed atomically while this runs.
#[inline(always)]
unsafe fn load_piece(src: *const u8, dst: &mut [u8]) {
    let p = src.cast_mut();
    match dst.len() {
        1 => dst[0] = atomic_at!(AtomicU8, p).load(LOAD),
        2 => dst.copy_from_slice(&atomic_at!(AtomicU16, p).load(LOAD).to_ne_bytes()),
        4 => dst.copy_from_slice(&atomic_at!(AtomicU32, p).load(LOAD).to_ne_bytes()),
        _ => dst.copy_from_slice(&atomic_at!(AtomicU64, p).load(LOAD).to_ne_bytes()),
    }
}

/// Stores `src` (1, 2, 4 or 8 bytes) to the naturally aligned piece at
/// `dst` with one atomic store.
///
/// # Safety
/// As [`load_piece`], for writes.
#[inline(always)]
unsafe fn store_piece(dst: *mut u8, src: &[u8]) {
    match src.len() {
        1 => atomic_at!(AtomicU8, dst).store(src[0], STORE),
        2 => atomic_at!(AtomicU16, dst).store(u16::from_ne_bytes([src[0], src[1]]), STORE),
        4 => atomic_at!(AtomicU32, dst).store(u32::from_ne_bytes([src[0], src[1], src[2], src[3]]), STORE),
        _ => {
            let mut w = [0u8; 8];
            w.copy_from_slice(src);
            atomic_at!(AtomicU64, dst).store(u64::from_ne_bytes(w), STORE)
        }
    }
}

/// Copies `dst.len()` bytes of guest memory at `src` into `dst`: an aligned
/// 8- or 4-byte access inline (the hot cases), the rest out of line.
///
/// # Safety
/// `src` is valid for reads of `dst.len()` bytes that are only accessed
/// atomically while this runs.
#[inline(always)]
pub(crate) unsafe fn load(src: *const u8, dst: &mut [u8]) {
    let (n, a) = (dst.len(), src as usize);
    if n == 8 && a % 8 == 0 {
        // SAFETY: aligned (just checked), valid and atomic (the contract).
        dst.copy_from_slice(&atomic_at!(AtomicU64, src.cast_mut()).load(LOAD).to_ne_bytes());
    } else if n == 4 && a % 4 == 0 {
        // SAFETY: as above.
        dst.copy_from_slice(&atomic_at!(AtomicU32, src.cast_mut()).load(LOAD).to_ne_bytes());
    } else {
        // SAFETY: the same contract.
        unsafe { load_copy(src, dst) }
    }
}

/// [`load`] of anything else (aligned 1- and 2-byte accesses are still one
/// piece: see [`walk`]).
///
/// # Safety
/// As [`load`].
#[inline(never)]
unsafe fn load_copy(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if n >= STRING_COPY_MIN {
        // SAFETY: `src` is valid for `n` bytes of reads (the contract), `dst`
        // for `n` bytes of writes, and they do not overlap (`dst` is a Rust
        // buffer; guest RAM is never lent out as one).
        return unsafe { string_copy(dst.as_mut_ptr(), src, n) };
    }
    walk(src as usize, n, |i, w, count| {
        if count == 1 {
            // SAFETY: `walk` yields aligned pieces inside `[src, src + n)`.
            unsafe { load_piece(src.add(i), &mut dst[i..i + w]) }
        } else {
            for (k, d) in dst[i..i + count * 8].chunks_exact_mut(8).enumerate() {
                // SAFETY: an aligned word inside `[src, src + n)`.
                unsafe { load_piece(src.add(i + k * 8), d) }
            }
        }
    });
}

/// Copies `src` into guest memory at `dst`: an aligned 8- or 4-byte access
/// inline, the rest out of line.
///
/// # Safety
/// `dst` is valid for writes of `src.len()` bytes that are only accessed
/// atomically while this runs.
#[inline(always)]
pub(crate) unsafe fn store(dst: *mut u8, src: &[u8]) {
    let (n, a) = (src.len(), dst as usize);
    if n == 8 && a % 8 == 0 {
        let mut w = [0u8; 8];
        w.copy_from_slice(src);
        // SAFETY: aligned (just checked), valid and atomic (the contract).
        atomic_at!(AtomicU64, dst).store(u64::from_ne_bytes(w), STORE);
    } else if n == 4 && a % 4 == 0 {
        let mut w = [0u8; 4];
        w.copy_from_slice(src);
        // SAFETY: as above.
        atomic_at!(AtomicU32, dst).store(u32::from_ne_bytes(w), STORE);
    } else {
        // SAFETY: the same contract.
        unsafe { store_copy(dst, src) }
    }
}

/// [`store`] of anything else.
///
/// # Safety
/// As [`store`].
#[inline(never)]
unsafe fn store_copy(dst: *mut u8, src: &[u8]) {
    let n = src.len();
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if n >= STRING_COPY_MIN {
        // SAFETY: as in `load_copy`, the other way round.
        return unsafe { string_copy(dst, src.as_ptr(), n) };
    }
    walk(dst as usize, n, |i, w, count| {
        if count == 1 {
            // SAFETY: `walk` yields aligned pieces inside `[dst, dst + n)`.
            unsafe { store_piece(dst.add(i), &src[i..i + w]) }
        } else {
            for (k, s) in src[i..i + count * 8].chunks_exact(8).enumerate() {
                // SAFETY: an aligned word inside `[dst, dst + n)`.
                unsafe { store_piece(dst.add(i + k * 8), s) }
            }
        }
    });
}

/// Copies `n` bytes with x86's `rep movsb`, as fast as `memcpy` for long
/// copies (it is what `memcpy` uses for them on these CPUs).
///
/// Why this is race-free: an inline-assembly block stands for some
/// operation Rust code could perform, and `rep movsb` reads and writes each
/// byte exactly once with byte-sized, individually atomic accesses in no
/// promised order: exactly a byte-by-byte copy with relaxed atomic loads and
/// stores, which races with nothing. (A plain `memcpy` of shared memory is a
/// data race; a copy with relaxed atomics in Rust is ~3x slower, since the
/// compiler may not widen or vectorise atomics.) Wider units inside the
/// copy are moved in whole cache lines by the hardware in practice, but
/// only byte atomicity is promised, so only that is documented.
///
/// # Safety
/// `src` is valid for reads and `dst` for writes of `n` bytes; the ranges do
/// not overlap; any of them that is guest RAM is only accessed atomically.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline]
unsafe fn string_copy(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the contract above; the direction flag is clear on entry to
    // an asm block (Rust's rule), so the copy runs upwards over exactly
    // `[src, src + n)` and `[dst, dst + n)`; the block touches no stack
    // and no flags.
    unsafe {
        std::arch::asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags)
        );
    }
}

impl Drop for RamBlock {
    fn drop(&mut self) {
        if let Backing::Mmap = self.backing {
            // SAFETY: `ptr`/`len` are exactly the mapping made in
            // `new_anonymous`, and the last reference to the block is going
            // away, so nothing can access it any more.
            unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.len.max(1) as usize);
            }
        }
    }
}

/// Safe access to the bytes of a RAM region (QEMU's
/// `memory_region_get_ram_ptr`, without handing out references to memory the
/// guest shares). It keeps the region's memory alive.
#[derive(Clone)]
pub struct RamSlice {
    pub(crate) region: crate::region::MemoryRegion,
}

impl RamSlice {
    fn block(&self) -> &RamBlock {
        self.region.ram_block().expect("RamSlice is only made for regions with RAM")
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.block().len()
    }

    /// True for a zero-length block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, off: u64, len: usize) -> Result<()> {
        if off as u128 + len as u128 > self.len() as u128 {
            return Err(Error::OutOfRange { region: self.region.name().to_string(), offset: off, size: len as u128 });
        }
        Ok(())
    }

    /// Copies bytes out of the region (with the atomicity described in the
    /// [guest RAM memory model](crate::docs#guest-ram)).
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check(off, buf.len())?;
        self.block().read_at(off, buf);
        Ok(())
    }

    /// Copies bytes into the region. Like a DMA by the embedder, this marks
    /// nothing dirty (call `set_dirty` if a client must see it), but a vCPU
    /// watching the pages for code learns of it ([`CodeWatch`](crate::CodeWatch)).
    pub fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
        self.check(off, buf.len())?;
        self.block().write_at(off, buf);
        self.region.note_ram_write(off, buf.len() as u64, 0);
        Ok(())
    }

    /// The host address of the first byte, for KVM memslots and the like.
    /// The memory stays valid while this slice (or the region) is alive;
    /// it is shared with vCPU threads, so access it only atomically (or
    /// with volatile accesses), never through references.
    pub fn as_ptr(&self) -> *mut u8 {
        self.block().host_ptr().as_ptr()
    }
}

impl std::fmt::Debug for RamSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamSlice").field("region", &self.region.name()).field("len", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::{walk, AtomicSite, RamBlock};
    use crate::guest_atomic::AtomicRmw;
    use std::ptr::NonNull;

    /// Lock-freedom follows the host address, and a CAS on a containing
    /// word is only used when the whole word belongs to the block.
    #[test]
    fn atomic_sites_follow_host_alignment_and_the_block_edges() {
        let mut backing = [0u64; 4];
        // Host bytes [base + 1, base + 21): starts and ends mid-word.
        let base = backing.as_mut_ptr().cast::<u8>();
        let start = NonNull::new(base.wrapping_add(1)).expect("not null");
        // SAFETY: the 20 bytes lie in `backing`, which outlives the block
        // and is not otherwise touched while it lives.
        let block = unsafe { RamBlock::new_foreign(start, 20) };
        let site = |off, size| block.atomic_site(off, size);
        assert_eq!(site(0, 1), AtomicSite::Native);
        assert_eq!(site(1, 2), AtomicSite::Native, "host base + 2: touches only its own bytes");
        assert_eq!(site(3, 4), AtomicSite::Native, "host base + 4");
        assert_eq!(site(7, 8), AtomicSite::Native, "host base + 8");
        assert_eq!(site(8, 2), AtomicSite::InWord, "host base + 9..11, in the word at base + 8");
        assert_eq!(site(9, 4), AtomicSite::InWord, "host base + 10..14");
        assert_eq!(site(0, 2), AtomicSite::Split, "its word starts before the block");
        assert_eq!(site(16, 2), AtomicSite::Split, "its word ends after the block");
        assert_eq!(site(5, 4), AtomicSite::Split, "crosses the word boundary at base + 8");
        block.write_at(0, &[0x11; 20]);
        assert_eq!(block.atomic_rmw(5, 4, AtomicRmw::Add(1)), None, "split sites are left to the caller");
        assert_eq!(block.atomic_cmpxchg(3, 4, 0x1111_1111, 5), Some(Ok(0x1111_1111)));
        assert_eq!(block.atomic_rmw(8, 2, AtomicRmw::Xor(0x0101)), Some(0x1111));
        assert_eq!(block.atomic_cmpxchg(10, 4, 0, 1), Some(Err(0x1111_1111)));
        assert_eq!(block.atomic_update(12, 2, |v| Some(v + 1)), Some(Ok(0x1111)));
        let mut out = [0u8; 20];
        block.read_at(0, &mut out);
        assert_eq!(out[..16], [0x11, 0x11, 0x11, 5, 0, 0, 0, 0x11, 0x10, 0x10, 0x11, 0x11, 0x12, 0x11, 0x11, 0x11]);
    }

    /// Every copy is cut into naturally aligned pieces that tile it, and no
    /// naturally aligned 1/2/4/8-byte unit inside it is split between
    /// pieces (so each such unit is copied by one atomic access).
    #[test]
    fn walk_tiles_with_aligned_pieces_and_never_splits_an_aligned_unit() {
        for addr in 0x1000usize..0x1040 {
            for len in 0..80 {
                let mut pieces = Vec::new();
                walk(addr, len, |i, w, count| pieces.extend((0..count).map(|k| (addr + i + k * w, w))));
                let mut at = addr;
                for &(p, w) in &pieces {
                    assert_eq!(p, at, "pieces tile the copy ({addr:#x}, {len})");
                    assert!(matches!(w, 1 | 2 | 4 | 8) && p % w == 0, "piece {p:#x}/{w} is aligned");
                    at += w;
                }
                assert_eq!(at, addr + len);
                for s in [1, 2, 4, 8] {
                    let mut u = addr.next_multiple_of(s);
                    while u + s <= addr + len {
                        assert!(
                            pieces.iter().any(|&(p, w)| p <= u && u + s <= p + w),
                            "unit {u:#x}/{s} of ({addr:#x}, {len}) is in one piece: {pieces:?}"
                        );
                        u += s;
                    }
                }
            }
        }
    }
}
