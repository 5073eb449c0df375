//! Host memory behind RAM regions, and their dirty bitmaps.
//!
//! This module and `RamSlice` hold the runtime's `unsafe`: guest RAM is
//! memory shared with the guest and with every vCPU thread, so it is only
//! ever touched through raw-pointer copies and atomics, never through Rust
//! references to its bytes.

use crate::dirty::DirtyBitmaps;
use crate::error::{Error, Result};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

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
// through raw copies and atomics, which are valid from any thread.
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

    /// Copies `buf.len()` bytes from offset `off`. The caller has checked the
    /// range against [`len`](Self::len).
    #[inline]
    pub(crate) fn read_at(&self, off: u64, buf: &mut [u8]) {
        debug_assert!(off as u128 + buf.len() as u128 <= self.len as u128);
        // SAFETY: `off + buf.len() <= len` (checked by every caller), the
        // block is alive for `&self`, and `buf` cannot overlap guest RAM
        // because no Rust reference to guest RAM is ever handed out.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off as usize), buf.as_mut_ptr(), buf.len()) }
    }

    /// Copies `buf` to offset `off`. The caller has checked the range.
    #[inline]
    pub(crate) fn write_at(&self, off: u64, buf: &[u8]) {
        debug_assert!(off as u128 + buf.len() as u128 <= self.len as u128);
        // SAFETY: as in `read_at`.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.as_ptr().add(off as usize), buf.len()) }
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

    /// Copies bytes out of the region.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check(off, buf.len())?;
        self.block().read_at(off, buf);
        Ok(())
    }

    /// Copies bytes into the region. Like a DMA by the embedder, this marks
    /// nothing dirty; call `set_dirty` if a client must see it.
    pub fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
        self.check(off, buf.len())?;
        self.block().write_at(off, buf);
        Ok(())
    }

    /// The host address of the first byte, for KVM memslots and the like.
    /// The memory stays valid while this slice (or the region) is alive.
    pub fn as_ptr(&self) -> *mut u8 {
        self.block().host_ptr().as_ptr()
    }
}

impl std::fmt::Debug for RamSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamSlice").field("region", &self.region.name()).field("len", &self.len()).finish()
    }
}
