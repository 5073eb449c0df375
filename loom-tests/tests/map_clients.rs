//! Bounce-buffer map clients: a client that registers after a failed map is
//! woken, whatever the interleaving with the unmap that frees the budget.
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
            thread::spawn(move || match asp.map(0x1000, 16, false) {
                Some(m) => drop(m),
                None => {
                    let w = woken.clone();
                    asp.register_map_client(move || w.store(true, Ordering::SeqCst));
                }
            })
        };
        asp.unmap(first, 16).unwrap();
        waiter.join().unwrap();
        // Either the second map succeeded, or its client ran.
        assert!(woken.load(Ordering::SeqCst) || asp.bounce_in_use() == 0);
        assert_eq!(asp.bounce_in_use(), 0);
    });
}
