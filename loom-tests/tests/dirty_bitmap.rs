//! Dirty bitmaps (`dirty.rs`): a page set concurrently with a harvest is
//! either returned by the harvest or still set afterwards, never lost; and a
//! harvest returns only pages that were set. Both harvest paths are covered:
//! the per-page one (a range not aligned to a 64-page word, or part of a
//! word) and the whole-word one (a word-aligned range covering whole words).
#![cfg(topos_loom)]

use loom::thread;
use topos_runtime::{DirtyClient, MemoryRegion, Topology, PAGE_SIZE};

const VGA: DirtyClient = DirtyClient::Vga;

/// A RAM region of `pages` pages, all clean for VGA.
fn clean_ram(topo: &Topology, pages: u64) -> MemoryRegion {
    let ram = topo.new_ram("ram", (pages * PAGE_SIZE) as u128).unwrap();
    ram.reset_dirty(0, pages * PAGE_SIZE, VGA).unwrap();
    ram
}

#[test]
fn concurrent_set_harvest_and_test_and_clear_lose_no_bit() {
    loom::model(|| {
        let topo = Topology::new();
        let ram = clean_ram(&topo, 3);
        let setter = {
            let ram = ram.clone();
            thread::spawn(move || {
                ram.set_dirty_for(PAGE_SIZE, 1, VGA.mask()).unwrap();
                ram.set_dirty_for(2 * PAGE_SIZE, 1, VGA.mask()).unwrap();
            })
        };
        // Pages 1 and 2, not word-aligned: the per-page harvest.
        let (first, bits) = ram.snapshot_and_clear_dirty(PAGE_SIZE, 2 * PAGE_SIZE, VGA).unwrap();
        // Then page 2 alone.
        let tc = ram.test_and_clear_dirty(2 * PAGE_SIZE, PAGE_SIZE, VGA).unwrap();
        setter.join().unwrap();
        assert_eq!((first, bits.len()), (1, 1));
        assert_eq!(bits[0] & !0b11, 0, "harvested pages nobody set");
        for page in 1..3u64 {
            let harvested = bits[0] & (1 << (page - 1)) != 0 || (page == 2 && tc);
            let still = ram.get_dirty(page * PAGE_SIZE, 1, VGA).unwrap();
            assert!(harvested || still, "page {page} lost");
        }
        assert!(!(tc && bits[0] & 0b10 != 0), "page 2 harvested twice");
    });
}

#[test]
fn partial_word_harvest_loses_no_bit() {
    loom::model(|| {
        let topo = Topology::new();
        let ram = clean_ram(&topo, 2);
        let setter = {
            let ram = ram.clone();
            thread::spawn(move || ram.set_dirty_for(0, 1, VGA.mask()).unwrap())
        };
        // Two pages from a word boundary: the word is cleared under a mask.
        let (first, bits) = ram.snapshot_and_clear_dirty(0, 2 * PAGE_SIZE, VGA).unwrap();
        setter.join().unwrap();
        assert_eq!((first, bits.len()), (0, 1));
        let harvested = bits[0] & 1 != 0;
        let still = ram.get_dirty(0, 1, VGA).unwrap();
        assert!(harvested != still, "page 0 lost or harvested twice");
    });
}

#[test]
fn whole_word_harvest_loses_no_bit() {
    loom::model(|| {
        let topo = Topology::new();
        // One whole 64-page word: the harvest swaps the word out at once.
        let ram = clean_ram(&topo, 64);
        let setter = {
            let ram = ram.clone();
            thread::spawn(move || {
                ram.set_dirty_for(0, 1, VGA.mask()).unwrap();
                ram.set_dirty_for(63 * PAGE_SIZE, 1, VGA.mask()).unwrap();
            })
        };
        let (first, bits) = ram.snapshot_and_clear_dirty(0, 64 * PAGE_SIZE, VGA).unwrap();
        setter.join().unwrap();
        assert_eq!((first, bits.len()), (0, 1));
        assert_eq!(bits[0] & !(1 | 1 << 63), 0, "harvested pages nobody set");
        for page in [0u64, 63] {
            let harvested = bits[0] & (1 << page) != 0;
            let still = ram.get_dirty(page * PAGE_SIZE, 1, VGA).unwrap();
            assert!(harvested != still, "page {page} lost or harvested twice");
        }
    });
}
