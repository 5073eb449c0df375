//! The topology's generation rule (`commit.rs`, `TopoShared::set_generation`):
//! the generation moves only once every view of its commit is published, so
//! a reader that observes `Topology::generation() == g` and then loads any
//! address space's view sees that view as of `g` or newer.
//!
//! Two address spaces over two roots, both changed by one transaction: the
//! rule must hold for the one published last and for the one published
//! first. Under loom the RCU cell's loads may be stale (see the runtime's
//! `sync` module), so a generation stored too early, or with too weak an
//! ordering, shows as an old view loaded after the new generation.
#![cfg(topos_loom)]

use loom::thread;
use topos_loom_tests::model::{lay, layout};
use topos_runtime::Topology;

#[test]
fn a_reader_that_sees_generation_g_loads_views_at_least_as_new_as_g() {
    loom::model(|| {
        let topo = Topology::new();
        let (r1, r2) = (topo.new_container("r1", 0x10000).unwrap(), topo.new_container("r2", 0x10000).unwrap());
        let (as1, as2) = (topo.address_space_init(&r1, "m1").unwrap(), topo.address_space_init(&r2, "m2").unwrap());
        let (a, b) = (topo.new_ram("a", 0x1000).unwrap(), topo.new_ram("b", 0x1000).unwrap());
        let g0 = topo.generation();

        // The reader is the spawned thread and the writer runs first: loom's
        // DPOR remembers only the last access to an atomic, and the commit
        // itself loads the generation and the views before storing them, so
        // a reader's loads made *before* the commit would be forgotten and
        // never moved into it. Loads made after the commit are seen and
        // moved back into every gap of the commit.
        let reader = {
            let topo = topo.clone();
            thread::spawn(move || {
                let g = topo.generation();
                // Last published first: a generation moved after the first
                // address space only is caught by the second.
                let (l2, l1) = (layout(&as2), layout(&as1));
                if g > g0 {
                    assert_eq!(g, g0 + 1);
                    assert_eq!(l1, lay(&[(0, "a")]), "generation {g} seen, then an older view of m1");
                    assert_eq!(l2, lay(&[(0, "b")]), "generation {g} seen, then an older view of m2");
                }
            })
        };
        topo.transaction(|| {
            r1.add_subregion(0, &a).unwrap();
            r2.add_subregion(0, &b).unwrap();
        })
        .unwrap();
        reader.join().unwrap();
        assert_eq!(topo.generation(), g0 + 1);
    });
}
