//! Dirty bitmap: a page set concurrently with a harvest is either returned
//! by the harvest or still set afterwards, never lost.
#![cfg(topos_loom)]

use loom::thread;
use topos_runtime::{DirtyClient, Topology, PAGE_SIZE};

#[test]
fn concurrent_set_and_test_and_clear_lose_no_bit() {
    loom::model(|| {
        let topo = Topology::new();
        let ram = topo.new_ram("ram", 2 * PAGE_SIZE as u128).unwrap();
        ram.reset_dirty(0, 2 * PAGE_SIZE, DirtyClient::Vga).unwrap();
        let setter = {
            let ram = ram.clone();
            thread::spawn(move || {
                ram.set_dirty_for(0, 1, DirtyClient::Vga.mask()).unwrap();
                ram.set_dirty_for(PAGE_SIZE, 1, DirtyClient::Vga.mask()).unwrap();
            })
        };
        let (first, bits) = ram.snapshot_and_clear_dirty(0, 2 * PAGE_SIZE, DirtyClient::Vga).unwrap();
        let tc = ram.test_and_clear_dirty(PAGE_SIZE, PAGE_SIZE, DirtyClient::Vga).unwrap();
        setter.join().unwrap();
        assert_eq!(first, 0);
        for page in 0..2u64 {
            let harvested = bits[0] & (1 << page) != 0 || (page == 1 && tc);
            let still = ram.get_dirty(page * PAGE_SIZE, 1, DirtyClient::Vga).unwrap();
            assert!(harvested || still, "page {page} lost");
        }
    });
}
