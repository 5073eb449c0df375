//! Page-granular, lock-free dirty bitmaps, one per client.
//!
//! Bits are set with `fetch_or` and harvested with `swap`, one 64-page word at
//! a time, so writers on vCPU threads never wait for a harvester and no bit
//! set concurrently with a `test_and_clear` is lost: it is either returned by
//! that call or left set for the next one.
//!
//! Beside the clients' bitmaps, one more marks the pages a vCPU caches code
//! from (the self-modifying-code watch, `code_watch.rs`): writes through the
//! runtime clear the watch bits of the pages they touch and report whether
//! any was set. Until some page of a block has been watched, the check costs
//! writers one relaxed load. (QEMU keeps the same state inverted in its CODE
//! client; topos keeps the CODE client as semantics.md §6 describes it, never
//! touched by writes.)

use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::types::{DirtyClient, PAGE_SHIFT};

/// Dirty bitmaps for the pages of one RAM block.
#[derive(Debug)]
pub(crate) struct DirtyBitmaps {
    pages: u64,
    maps: [Box<[AtomicU64]>; 3],
    /// Pages watched for writes (a vCPU caches code from them).
    watched: Box<[AtomicU64]>,
    /// Set once any page was watched: from then on writes check `watched`.
    watch_armed: AtomicBool,
}

fn words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

impl DirtyBitmaps {
    /// Bitmaps for `len` bytes, with every page dirty for every client (new
    /// RAM starts dirty, as in QEMU).
    pub(crate) fn new_all_dirty(len: u64) -> Self {
        let pages = len.div_ceil(1 << PAGE_SHIFT);
        let make = || -> Box<[AtomicU64]> {
            (0..words(pages))
                .map(|w| {
                    let first = w as u64 * 64;
                    let n = (pages - first).min(64);
                    AtomicU64::new(if n == 64 { u64::MAX } else { (1u64 << n) - 1 })
                })
                .collect()
        };
        let watched = (0..words(pages)).map(|_| AtomicU64::new(0)).collect();
        DirtyBitmaps { pages, maps: [make(), make(), make()], watched, watch_armed: AtomicBool::new(false) }
    }

    /// Page range [first, end) for a byte range, clamped to the block.
    fn page_range(&self, addr: u64, size: u64) -> (u64, u64) {
        if size == 0 {
            return (0, 0);
        }
        let first = addr >> PAGE_SHIFT;
        let last = (addr.saturating_add(size - 1)) >> PAGE_SHIFT;
        (first.min(self.pages), (last + 1).min(self.pages))
    }

    /// Calls `f(word_index, mask)` for each word that the page range touches.
    fn for_words(first: u64, end: u64, mut f: impl FnMut(usize, u64)) {
        let mut p = first;
        while p < end {
            let w = p / 64;
            let bit = p % 64;
            let n = (end - p).min(64 - bit);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            f(w as usize, mask);
            p += n;
        }
    }

    /// Sets the pages of a byte range dirty for every client in `mask`.
    pub(crate) fn set_range(&self, addr: u64, size: u64, mask: u8) {
        let (first, end) = self.page_range(addr, size);
        for client in DirtyClient::ALL {
            if mask & client.mask() != 0 {
                let map = &self.maps[client as usize];
                Self::for_words(first, end, |w, m| {
                    // Skip the atomic RMW when the bits are already set.
                    if map[w].load(Ordering::Relaxed) & m != m {
                        map[w].fetch_or(m, Ordering::Release);
                    }
                });
            }
        }
    }

    /// True if any page of the byte range is dirty for `client`.
    pub(crate) fn get_range(&self, addr: u64, size: u64, client: DirtyClient) -> bool {
        let (first, end) = self.page_range(addr, size);
        let map = &self.maps[client as usize];
        let mut any = false;
        Self::for_words(first, end, |w, m| any |= map[w].load(Ordering::Acquire) & m != 0);
        any
    }

    /// Clears the pages of the byte range for `client`.
    pub(crate) fn reset_range(&self, addr: u64, size: u64, client: DirtyClient) {
        let (first, end) = self.page_range(addr, size);
        let map = &self.maps[client as usize];
        Self::for_words(first, end, |w, m| {
            map[w].fetch_and(!m, Ordering::AcqRel);
        });
    }

    /// Clears the byte range for `client` and returns whether any page was
    /// dirty, atomically per word.
    pub(crate) fn test_and_clear_range(&self, addr: u64, size: u64, client: DirtyClient) -> bool {
        let (first, end) = self.page_range(addr, size);
        let map = &self.maps[client as usize];
        let mut any = false;
        Self::for_words(first, end, |w, m| any |= map[w].fetch_and(!m, Ordering::AcqRel) & m != 0);
        any
    }

    /// Harvests the pages of the byte range for `client`: returns one bit per
    /// page (bit i of word j is page `first + 64*j + i`) and clears them.
    pub(crate) fn snapshot_and_clear(&self, addr: u64, size: u64, client: DirtyClient) -> (u64, Vec<u64>) {
        let (first, end) = self.page_range(addr, size);
        let map = &self.maps[client as usize];
        let mut out = vec![0u64; words(end - first)];
        if first % 64 == 0 {
            // Word-aligned: whole-word swaps.
            Self::for_words(first, end, |w, m| {
                let bits = if m == u64::MAX {
                    map[w].swap(0, Ordering::AcqRel)
                } else {
                    map[w].fetch_and(!m, Ordering::AcqRel) & m
                };
                out[w - (first / 64) as usize] = bits;
            });
        } else {
            Self::for_words(first, end, |w, m| {
                let bits = map[w].fetch_and(!m, Ordering::AcqRel) & m;
                let mut b = bits;
                while b != 0 {
                    let i = b.trailing_zeros() as u64;
                    b &= b - 1;
                    let rel = w as u64 * 64 + i - first;
                    out[(rel / 64) as usize] |= 1 << (rel % 64);
                }
            });
        }
        (first, out)
    }

    /// A write through the runtime touched `[addr, addr + size)`: stops
    /// watching its pages and returns true if any was watched.
    #[inline]
    pub(crate) fn note_code_write(&self, addr: u64, size: u64) -> bool {
        if !self.watch_armed.load(Ordering::Relaxed) {
            return false;
        }
        self.note_code_write_slow(addr, size)
    }

    #[cold]
    fn note_code_write_slow(&self, addr: u64, size: u64) -> bool {
        let (first, end) = self.page_range(addr, size);
        let mut hit = false;
        Self::for_words(first, end, |w, m| {
            if self.watched[w].load(Ordering::Relaxed) & m != 0 {
                hit |= self.watched[w].fetch_and(!m, Ordering::AcqRel) & m != 0;
            }
        });
        hit
    }

    /// Starts watching the page holding byte `addr` for writes.
    pub(crate) fn watch_code(&self, addr: u64) {
        if !self.watch_armed.load(Ordering::Relaxed) {
            // A write that happens after this (in the happens-before sense)
            // sees the flag; a write racing with it may not, as a
            // cross-modifying write racing with a fetch on a CPU may not.
            self.watch_armed.store(true, Ordering::Release);
        }
        let (first, end) = self.page_range(addr, 1);
        Self::for_words(first, end, |w, m| {
            self.watched[w].fetch_or(m, Ordering::AcqRel);
        });
    }

    /// Whether the page holding byte `addr` was written since it was
    /// watched.
    pub(crate) fn code_written(&self, addr: u64) -> bool {
        let (first, end) = self.page_range(addr, 1);
        let mut watched = false;
        Self::for_words(first, end, |w, m| watched |= self.watched[w].load(Ordering::Acquire) & m != 0);
        !watched
    }
}
