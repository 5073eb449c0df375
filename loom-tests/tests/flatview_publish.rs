//! RCU publish/retire: a reader holding a view keeps it, and every region it
//! references, alive; readers see one transaction's views whole, old or new,
//! never a mix; the old view is freed after its last reader.
//!
//! The loom RCU cell holds retired values only weakly, as arc-swap does (see
//! the runtime's `sync` module), so "freed after the last reader" checks
//! that nothing in the runtime (render caches, the commit) keeps a retired
//! view or a removed region.
#![cfg(topos_loom)]

use loom::thread;
use std::sync::Arc;
use topos_loom_tests::model::{layout, small};

#[test]
fn reader_sees_old_or_new_and_old_view_is_freed_after_last_reader() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let a = topo.new_ram("a", 0x1000).unwrap();
        let b = topo.new_ram("b", 0x1000).unwrap();
        root.add_subregion(0, &a).unwrap();
        root.add_subregion(0x1000, &b).unwrap();
        let old = Arc::downgrade(&asp.view());

        let reader = {
            let asp = asp.clone();
            thread::spawn(move || {
                let view = asp.view();
                let l: Vec<(u64, String)> =
                    view.ranges().iter().map(|r| (r.start(), r.region().name().to_string())).collect();
                // One transaction moved both: old layout or new, never a mix.
                let old_l = vec![(0, "a".to_string()), (0x1000, "b".to_string())];
                let new_l = vec![(0x4000, "a".to_string()), (0x5000, "b".to_string())];
                assert!(l == old_l || l == new_l, "mixed view: {l:?}");
                // The regions the view names are alive and readable even if
                // the writer has removed them meanwhile.
                for r in view.ranges() {
                    let mut byte = [0xffu8];
                    r.region().ram().unwrap().read(0, &mut byte).unwrap();
                    assert_eq!(byte, [0]);
                }
                view
            })
        };

        topo.transaction(|| {
            a.set_address(0x4000).unwrap();
            b.set_address(0x5000).unwrap();
        })
        .unwrap();
        assert_eq!(layout(&asp), vec![(0x4000, "a".to_string()), (0x5000, "b".to_string())]);

        let held = reader.join().unwrap();
        let held_is_old = Arc::ptr_eq(&held, &old.upgrade().unwrap_or_else(|| held.clone()));
        drop(held);
        // Once the last reader is gone, the retired view is freed.
        assert!(old.upgrade().is_none(), "retired view still alive (reader held old: {held_is_old})");
    });
}

#[test]
fn removed_region_lives_while_a_reader_holds_a_view_naming_it() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let a = topo.new_ram("a", 0x1000).unwrap();
        root.add_subregion(0, &a).unwrap();
        a.ram().unwrap().write(0, &[0x5a]).unwrap();
        let weak = a.downgrade();

        // The reader is spawned and the writer runs first, so that loom's
        // DPOR moves the reader's load back into the removal's commit.
        let reader = thread::spawn(move || {
            let view = asp.view();
            // Whatever the writer has done meanwhile, a region the view
            // names is alive and its memory readable.
            for r in view.ranges() {
                let mut byte = [0u8];
                r.region().ram().unwrap().read(0, &mut byte).unwrap();
                assert_eq!(byte, [0x5a]);
            }
            (asp, view)
        });
        root.del_subregion(&a).unwrap();
        a.destroy().unwrap();
        drop(a);
        let (asp, view) = reader.join().unwrap();
        assert!(asp.view().ranges().is_empty());
        if !view.ranges().is_empty() {
            assert!(weak.upgrade().is_some(), "a region freed under a reader's view");
        }
        drop(view);
        assert!(weak.upgrade().is_none(), "the removed region outlived the last view naming it");
    });
}
