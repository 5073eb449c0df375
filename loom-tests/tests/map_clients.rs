//! Bounce-buffer map clients (`map.rs`): a client that registers after a
//! failed map is woken, whatever the interleaving with the unmap that frees
//! the budget, and when it is woken the budget is free for it.
#![cfg(topos_loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;
use std::sync::Arc;
use topos_runtime::{MemoryRegionOps, OpsConfig, Topology};

struct Dev;
impl MemoryRegionOps for Dev {
    fn read(&self, _a: u64, _s: u32) -> u64 {
        0
    }
    fn write(&self, _a: u64, _v: u64, _s: u32) {}
}

#[test]
fn no_lost_wake_up() {
    loom::model(|| {
        let topo = Topology::new();
        let root = topo.new_container("root", 0x10000).unwrap();
        let asp = topo.address_space_init(&root, "m").unwrap();
        let dev = topo.new_io("dev", Dev, OpsConfig::default(), 0x2000).unwrap();
        root.add_subregion(0, &dev).unwrap();
        // A small budget keeps the bounce reads (4 bytes per device call)
        // within loom's branch bound.
        asp.set_bounce_budget(16);
        let first = asp.map(0, 16, true).expect("budget free");
        assert!(!first.is_direct());

        let woken = Arc::new(AtomicBool::new(false));
        let waiter = {
            let asp = asp.clone();
            let woken = woken.clone();
            thread::spawn(move || match asp.map(0x1000, 16, true) {
                Some(m) => {
                    drop(m);
                    false
                }
                None => {
                    // The client retries the map, as a DMA engine would.
                    let retry = asp.clone();
                    asp.register_map_client(move || {
                        let m = retry.map(0x1000, 16, true);
                        assert!(m.is_some(), "woken while the budget is still taken");
                        woken.store(true, Ordering::SeqCst);
                    });
                    true
                }
            })
        };
        asp.unmap(first, 16).unwrap();
        let failed = waiter.join().unwrap();
        assert!(!failed || woken.load(Ordering::SeqCst), "a client registered after a failed map was never woken");
        assert_eq!(asp.bounce_in_use(), 0);
    });
}
