//! Transactions from several threads at once, with readers running: the
//! result is that of some serial order, generations strictly increase, and
//! no reader ever sees half of a transaction.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use topos_runtime::{ListenerResult, MemoryListener, MemoryRegion, Topology};

const THREADS: usize = 4;
const TXNS: u64 = 150;
const SLOT: u64 = 0x10000;
const SHARED_BASE: u64 = 0x80000;

thread_local! {
    static CURRENT: std::cell::Cell<Option<(usize, u64)>> = const { std::cell::Cell::new(None) };
}

/// Records, in commit order, which thread's transaction each commit was and
/// the generation it got.
#[derive(Default)]
struct CommitLog(Mutex<Vec<(usize, u64, u64)>>, Mutex<Option<Topology>>);

impl MemoryListener for CommitLog {
    fn commit(&self) -> ListenerResult {
        let gen = self.1.lock().unwrap().as_ref().map(|t| t.generation()).unwrap_or(0);
        if let Some((t, k)) = CURRENT.with(|c| c.get()) {
            self.0.lock().unwrap().push((t, k, gen));
        }
        Ok(())
    }
}

fn a_addr(t: usize, k: u64) -> u64 {
    t as u64 * SLOT + (k % 16) * 0x1000
}

fn shared_addr(t: usize, k: u64) -> u64 {
    SHARED_BASE + ((t as u64 * 1000 + k) % 256) * 0x100
}

#[test]
fn four_writers_serialize_and_readers_never_see_half_a_transaction() {
    let topo = Topology::new();
    let root = topo.new_container("root", 0x100000).unwrap();
    let asp = topo.address_space_init(&root, "memory").unwrap();
    let shared = topo.new_ram("shared", 0x100).unwrap();
    root.add_subregion(shared_addr(0, 0), &shared).unwrap();
    let mut pairs: Vec<(MemoryRegion, MemoryRegion)> = Vec::new();
    for t in 0..THREADS {
        let a = topo.new_ram(&format!("a{t}"), 0x100).unwrap();
        let b = topo.new_ram(&format!("b{t}"), 0x100).unwrap();
        topo.transaction(|| {
            root.add_subregion(a_addr(t, 0), &a).unwrap();
            root.add_subregion(a_addr(t, 0) + 0x800, &b).unwrap();
        })
        .unwrap();
        pairs.push((a, b));
    }
    let log = Arc::new(CommitLog::default());
    *log.1.lock().unwrap() = Some(topo.clone());
    topo.listener_register(log.clone(), 0, Some(&asp)).unwrap();
    let start_gen = topo.generation();

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let asp = asp.clone();
            let pairs = pairs.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                let mut checks = 0u64;
                let mut last_ptr = std::ptr::null();
                while !stop.load(Ordering::Relaxed) || checks == 0 {
                    let view = asp.view();
                    if std::ptr::eq(Arc::as_ptr(&view), last_ptr) {
                        continue;
                    }
                    last_ptr = Arc::as_ptr(&view);
                    for (a, b) in &pairs {
                        let ra = view.ranges().iter().find(|r| r.region() == a).expect("a mapped");
                        let rb = view.ranges().iter().find(|r| r.region() == b).expect("b mapped");
                        assert_eq!(rb.start(), ra.start() + 0x800, "half-applied transaction observed");
                    }
                    checks += 1;
                }
                checks
            })
        })
        .collect();

    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let topo = topo.clone();
            let (a, b) = pairs[t].clone();
            let shared = shared.clone();
            thread::spawn(move || {
                for k in 1..=TXNS {
                    topo.begin().unwrap();
                    CURRENT.with(|c| c.set(Some((t, k))));
                    a.set_address(a_addr(t, k)).unwrap();
                    shared.set_address(shared_addr(t, k)).unwrap();
                    b.set_address(a_addr(t, k) + 0x800).unwrap();
                    topo.commit().unwrap();
                    CURRENT.with(|c| c.set(None));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }

    let log = log.0.lock().unwrap().clone();
    // Every transaction of every thread committed exactly once.
    assert_eq!(log.len(), THREADS * TXNS as usize);
    for t in 0..THREADS {
        let ks: Vec<u64> = log.iter().filter(|e| e.0 == t).map(|e| e.1).collect();
        assert_eq!(ks, (1..=TXNS).collect::<Vec<_>>(), "thread {t}'s transactions in its own order");
    }
    // Generations strictly increase in commit order.
    assert!(log[0].2 > start_gen);
    assert!(log.windows(2).all(|w| w[1].2 > w[0].2), "generations must strictly increase");

    // Replaying the transactions serially in the recorded order gives the
    // final topology.
    let (lt, lk, _) = *log.last().unwrap();
    let view = asp.view();
    let find = |r: &MemoryRegion| view.ranges().iter().find(|f| f.region() == r).unwrap().start();
    assert_eq!(find(&shared), shared_addr(lt, lk));
    for (t, (a, b)) in pairs.iter().enumerate() {
        assert_eq!(find(a), a_addr(t, TXNS));
        assert_eq!(find(b), a_addr(t, TXNS) + 0x800);
    }
    assert_eq!(view.ranges().len(), 2 * THREADS + 1);
}

#[test]
fn snapshot_generation_is_monotonic_and_consistent() {
    let topo = Topology::new();
    let root = topo.new_container("root", 0x10000).unwrap();
    let asp = topo.address_space_init(&root, "memory").unwrap();
    let r = topo.new_ram("r", 0x1000).unwrap();
    root.add_subregion(0, &r).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let snapshots = Arc::new(AtomicU64::new(0));
    let reader = {
        let topo = topo.clone();
        let stop = stop.clone();
        let snapshots = snapshots.clone();
        thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let s = topo.snapshot();
                assert!(s.generation >= last);
                last = s.generation;
                let (_, view) = &s.spaces[0];
                assert_eq!(view.ranges().len(), 1);
                snapshots.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Commit until the reader has taken snapshots while commits were going
    // on (at least 200 commits either way; no timing involved).
    let mut i = 0u64;
    while i < 200 || snapshots.load(Ordering::Relaxed) < 20 {
        r.set_address((i % 15) * 0x1000).unwrap();
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert_eq!(topo.snapshot().generation, topo.generation());
    assert_eq!(asp.view().ranges()[0].start(), ((i - 1) % 15) * 0x1000);
}
