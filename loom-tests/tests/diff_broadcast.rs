//! Broadcast subscribers (`broadcast.rs`): a subscriber hands out diffs in
//! generation order with no gap, or says it fell behind (never more diffs
//! missed than commits happened) and resyncs from a snapshot; applying what
//! it hands out to a snapshot reproduces the current view. The subscription
//! and the snapshot race the commits.
//!
//! The broadcast channel itself (tokio's) has no loom hooks: loom explores
//! the interleavings of the subscription, the snapshots and the commits
//! (which take the topology's turn), not the channel's internals, so the
//! model trusts only what it receives after joining the writer for
//! happens-before.
#![cfg(topos_loom)]

use loom::thread;
use std::collections::BTreeMap;
use topos_runtime::{DiffSubscriber, Observed, Snapshot, Topology};

/// An observer's state: the subscriber, the map it maintains, and the
/// generation that map is at.
struct Observer {
    sub: DiffSubscriber,
    state: BTreeMap<u64, String>,
    at: u64,
    /// The generation of the last thing the subscriber handed out.
    last: u64,
}

impl Observer {
    fn reset(&mut self, snap: &Snapshot) {
        self.state = snap.spaces[0].1.ranges().iter().map(|r| (r.start(), r.region().name().to_string())).collect();
        self.at = snap.generation;
    }

    fn take(&mut self, o: Observed) {
        match o {
            Observed::Diff(d) => {
                assert_eq!(d.generation, self.last + 1, "a diff out of order, or after a gap nobody reported");
                self.last = d.generation;
                // Diffs the snapshot already includes are skipped.
                if d.generation > self.at {
                    for s in &d.spaces {
                        for r in &s.removed {
                            self.state.remove(&r.start);
                        }
                        for r in &s.added {
                            self.state.insert(r.start, r.region_name.to_string());
                        }
                    }
                    self.at = d.generation;
                }
            }
            Observed::Resync { missed, snapshot } => {
                assert!(missed > 0, "a resync that missed nothing");
                assert!(
                    missed <= snapshot.generation - self.last,
                    "{missed} diffs missed after generation {}, resynced at {}",
                    self.last,
                    snapshot.generation
                );
                self.last = snapshot.generation;
                self.reset(&snapshot);
            }
            Observed::Closed => panic!("closed"),
        }
        assert_eq!(self.sub.generation(), self.last);
    }

    fn drain(&mut self) {
        while let Some(o) = self.sub.try_recv() {
            self.take(o);
        }
    }
}

#[test]
fn lagging_subscriber_detects_the_gap_and_resyncs() {
    loom::model(|| {
        // Room for one diff: two commits behind is a gap.
        let topo = Topology::with_diff_capacity(1);
        let root = topo.new_container("root", 0x10000).unwrap();
        let asp = topo.address_space_init(&root, "m").unwrap();
        let (x, y) = (topo.new_ram("x", 0x1000).unwrap(), topo.new_ram("y", 0x1000).unwrap());

        // The observer is spawned and the writer runs first, so that loom's
        // DPOR moves the observer's subscription and snapshot back between
        // and into the commits.
        let observer = {
            let topo = topo.clone();
            thread::spawn(move || {
                let sub = topo.subscribe().unwrap();
                let last = sub.generation();
                let mut o = Observer { sub, state: BTreeMap::new(), at: 0, last };
                o.reset(&topo.snapshot());
                assert!(o.last <= o.at, "subscribed at {} after a snapshot at {}", o.last, o.at);
                o.drain();
                o
            })
        };
        root.add_subregion(0, &x).unwrap();
        root.add_subregion(0x2000, &y).unwrap();
        let mut o = observer.join().unwrap();
        o.drain();
        assert_eq!(o.sub.generation(), topo.generation(), "the subscriber did not catch up");
        assert_eq!(o.at, topo.generation());
        let now: BTreeMap<u64, String> =
            asp.view().ranges().iter().map(|r| (r.start(), r.region().name().to_string())).collect();
        assert_eq!(o.state, now);
    });
}
