//! Broadcast subscribers: a subscriber that falls behind is told so and
//! resyncs from a snapshot; applying what it receives always reproduces the
//! current view.
#![cfg(topos_loom)]

use loom::thread;
use std::collections::BTreeMap;
use topos_runtime::{Observed, Topology};

#[test]
fn lagging_subscriber_detects_the_gap_and_resyncs() {
    loom::model(|| {
        let topo = Topology::with_diff_capacity(1);
        let root = topo.new_container("root", 0x10000).unwrap();
        let asp = topo.address_space_init(&root, "m").unwrap();
        let mut sub = topo.subscribe().unwrap();
        let snap = topo.snapshot();
        let mut state: BTreeMap<u64, String> = BTreeMap::new();
        for r in snap.spaces[0].1.ranges() {
            state.insert(r.start(), r.region().name().to_string());
        }
        let writer = {
            let topo = topo.clone();
            let root = root.clone();
            thread::spawn(move || {
                for (i, name) in ["x", "y"].into_iter().enumerate() {
                    let r = topo.new_ram(name, 0x1000).unwrap();
                    root.add_subregion(i as u64 * 0x2000, &r).unwrap();
                }
            })
        };
        let apply = |o: Observed, state: &mut BTreeMap<u64, String>| match o {
            Observed::Diff(d) => {
                for s in &d.spaces {
                    for r in &s.removed {
                        state.remove(&r.start);
                    }
                    for r in &s.added {
                        state.insert(r.start, r.region_name.to_string());
                    }
                }
            }
            Observed::Resync { missed, snapshot } => {
                assert!(missed > 0);
                state.clear();
                for r in snapshot.spaces[0].1.ranges() {
                    state.insert(r.start(), r.region().name().to_string());
                }
            }
            Observed::Closed => panic!("closed"),
        };
        // Receive concurrently with the writer…
        if let Some(o) = sub.try_recv() {
            apply(o, &mut state);
        }
        writer.join().unwrap();
        // …then drain.
        while let Some(o) = sub.try_recv() {
            apply(o, &mut state);
        }
        assert_eq!(sub.generation(), topo.generation());
        let now: BTreeMap<u64, String> =
            asp.view().ranges().iter().map(|r| (r.start(), r.region().name().to_string())).collect();
        assert_eq!(state, now);
    });
}
