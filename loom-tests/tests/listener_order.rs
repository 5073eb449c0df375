//! Listener delivery order across concurrent commits: each commit's
//! callbacks reach the listeners as one uninterrupted begin…commit block, in
//! priority order (Forward for adds), and blocks arrive in generation order;
//! the topology's generation moves between the views' publication and the
//! `commit` callbacks.
#![cfg(topos_loom)]

use loom::thread;
use std::sync::{Arc, Mutex};
use topos_loom_tests::model::small;
use topos_runtime::{ListenerResult, MemoryListener, MemoryRegionSection, Topology};

/// (listener tag, callback, generation) in call order.
type Log = Arc<Mutex<Vec<(u8, &'static str, u64)>>>;

struct Rec {
    tag: u8,
    log: Log,
    topo: Mutex<Option<Topology>>,
}

impl Rec {
    fn push(&self, what: &'static str) {
        let gen = self.topo.lock().unwrap().as_ref().map_or(0, |t| t.generation());
        self.log.lock().unwrap().push((self.tag, what, gen));
    }
}

impl MemoryListener for Rec {
    fn begin(&self) -> ListenerResult {
        self.push("begin");
        Ok(())
    }
    fn region_add(&self, _s: &MemoryRegionSection) -> ListenerResult {
        self.push("add");
        Ok(())
    }
    fn commit(&self) -> ListenerResult {
        self.push("commit");
        Ok(())
    }
}

#[test]
fn commits_do_not_interleave_and_follow_priority() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut recs = Vec::new();
        for (tag, prio) in [(10u8, 10), (0u8, 0)] {
            let rec = Arc::new(Rec { tag, log: log.clone(), topo: Mutex::new(Some(topo.clone())) });
            topo.listener_register(rec.clone(), prio, Some(&asp)).unwrap();
            recs.push(rec);
        }
        log.lock().unwrap().clear();
        let spawn = |name: &'static str, addr: u64| {
            let topo = topo.clone();
            let root = root.clone();
            thread::spawn(move || {
                let r = topo.new_ram(name, 0x1000).unwrap();
                root.add_subregion(addr, &r).unwrap();
            })
        };
        let t1 = spawn("x", 0x1000);
        let t2 = spawn("y", 0x3000);
        t1.join().unwrap();
        t2.join().unwrap();
        let log = log.lock().unwrap().clone();
        // Two commits, each: begin L0, begin L10, add L0, add L10, commit L0, commit L10.
        assert_eq!(log.len(), 12, "{log:?}");
        for block in log.chunks(6) {
            let shape: Vec<(u8, &str)> = block.iter().map(|e| (e.0, e.1)).collect();
            assert_eq!(
                shape,
                vec![(0, "begin"), (10, "begin"), (0, "add"), (10, "add"), (0, "commit"), (10, "commit")]
            );
            // Until its views are published the topology is at the previous
            // generation; `commit` callbacks see the commit's own.
            assert!(block[..4].iter().all(|e| e.2 == block[0].2), "one generation per block: {block:?}");
            assert!(block[4..].iter().all(|e| e.2 == block[0].2 + 1), "commit sees the new generation: {block:?}");
        }
        assert!(log[6].2 > log[0].2, "blocks in generation order");
        for rec in recs {
            *rec.topo.lock().unwrap() = None;
        }
    });
}

/// A synchronous listener that mirrors the ranges it is told about, as the
/// KVM memslot mirror does. Its state is behind a loom mutex, so that loom
/// sees the reader and the listener touch it and tries both orders.
#[derive(Default)]
struct Mirror(loom::sync::Mutex<Vec<u64>>);

impl MemoryListener for Mirror {
    fn region_add(&self, s: &MemoryRegionSection) -> ListenerResult {
        self.0.lock().unwrap().push(s.offset_within_address_space);
        Ok(())
    }
    fn region_del(&self, s: &MemoryRegionSection) -> ListenerResult {
        self.0.lock().unwrap().retain(|a| *a != s.offset_within_address_space);
        Ok(())
    }
}

/// A commit calls the listeners before it publishes the view: a vCPU that
/// reaches a new range finds it in the memslot mirror already.
#[test]
fn a_reader_never_sees_a_range_before_the_listeners_do() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let mirror = Arc::new(Mirror::default());
        let id = topo.listener_register(mirror.clone(), 0, Some(&asp)).unwrap();
        let a = topo.new_ram("a", 0x1000).unwrap();
        // The reader is spawned and the writer runs first, so that loom's
        // DPOR moves the reader's load back into the commit (it remembers
        // only the last access to the view, which the commit loads itself).
        let vcpu = {
            let asp = asp.clone();
            let mirror = mirror.clone();
            thread::spawn(move || {
                if asp.view().lookup(0x10).is_some() {
                    assert!(mirror.0.lock().unwrap().contains(&0), "the guest reached a range no listener was told of");
                }
            })
        };
        root.add_subregion(0, &a).unwrap();
        vcpu.join().unwrap();
        assert_eq!(*mirror.0.lock().unwrap(), vec![0]);
        topo.listener_unregister(id).unwrap();
    });
}
