//! The topology's turn (`transaction.rs`): one thread at a time changes the
//! topology, however many wait; a transaction abandoned by its thread is
//! completed by the next thread that needs the turn; during a commit,
//! listener callbacks may query the topology but not change it, and the
//! turn is not given away before the commit ends.
#![cfg(topos_loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use std::sync::{Arc, Mutex};
use topos_loom_tests::model::{lay, layout, small};
use topos_runtime::{Error, Fault, ListenerResult, MemoryListener, MemoryRegion, Topology};

/// Two threads wait for the turn while a third holds it; when it is given
/// back, both are woken and they take it one after the other.
#[test]
fn two_waiters_take_the_turn_one_at_a_time() {
    loom::model(|| {
        let topo = Topology::new();
        let inside = Arc::new(AtomicUsize::new(0));
        topo.begin().unwrap();
        let waiter = || {
            let topo = topo.clone();
            let inside = inside.clone();
            thread::spawn(move || {
                topo.transaction(|| {
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two threads hold the turn");
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
                .unwrap();
            })
        };
        let (t1, t2) = (waiter(), waiter());
        topo.commit().unwrap();
        t1.join().unwrap();
        t2.join().unwrap();
    });
}

/// A thread that ends inside a transaction does not wedge the topology: the
/// next thread that needs the turn (one already waiting for it, or one that
/// comes later) commits what it changed, reports it once, then does its own
/// work.
#[test]
fn an_abandoned_transaction_is_completed_by_the_next_thread() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let (a, b) = (topo.new_ram("a", 0x1000).unwrap(), topo.new_ram("b", 0x1000).unwrap());
        let g0 = topo.generation();
        let quitter = {
            let topo = topo.clone();
            let root = root.clone();
            thread::spawn(move || {
                topo.begin().unwrap();
                root.add_subregion(0, &a).unwrap();
                // The thread ends with the transaction open.
            })
        };
        root.add_subregion(0x2000, &b).unwrap();
        quitter.join().unwrap();
        // If the quitter came second, this query is the next to need the turn.
        let _ = topo.mtree(Default::default());
        assert_eq!(layout(&asp), lay(&[(0, "a"), (0x2000, "b")]));
        assert_eq!(topo.generation(), g0 + 2, "the abandoned transaction was not committed on its own");
        let abandoned = topo.faults().iter().filter(|f| matches!(f, Fault::TransactionAbandoned { .. })).count();
        assert_eq!(abandoned, 1);
    });
}

/// Logs begin/commit and, from `commit`, queries the topology (allowed) and
/// tries to change it (refused).
struct Meddler {
    log: Mutex<Vec<&'static str>>,
    topo: Mutex<Option<(Topology, MemoryRegion)>>,
}

impl MemoryListener for Meddler {
    fn begin(&self) -> ListenerResult {
        self.log.lock().unwrap().push("begin");
        Ok(())
    }
    fn commit(&self) -> ListenerResult {
        let held = self.topo.lock().unwrap().clone();
        if let Some((topo, region)) = held {
            // A query from a callback: allowed, and sees the commit's views.
            let snap = topo.snapshot();
            assert_eq!(snap.generation, topo.generation());
            // A change from a callback: refused.
            assert!(
                matches!(region.set_enabled(false), Err(Error::MutationDuringCommit)),
                "a listener changed the topology"
            );
        }
        self.log.lock().unwrap().push("commit");
        Ok(())
    }
}

/// Two threads commit while a listener queries from its `commit` callback:
/// the query does not end the commit early or give the turn away, so the
/// commits stay one after the other.
#[test]
fn a_listener_may_query_but_not_change_the_topology_during_a_commit() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let (x, y) = (topo.new_ram("x", 0x1000).unwrap(), topo.new_ram("y", 0x1000).unwrap());
        let meddler = Arc::new(Meddler { log: Mutex::new(Vec::new()), topo: Mutex::new(None) });
        let id = topo.listener_register(meddler.clone(), 0, Some(&asp)).unwrap();
        *meddler.topo.lock().unwrap() = Some((topo.clone(), x.clone()));
        meddler.log.lock().unwrap().clear();
        let other = {
            let root = root.clone();
            thread::spawn(move || root.add_subregion(0x3000, &y).unwrap())
        };
        root.add_subregion(0x1000, &x).unwrap();
        other.join().unwrap();
        assert_eq!(*meddler.log.lock().unwrap(), ["begin", "commit", "begin", "commit"], "commits interleaved");
        assert_eq!(layout(&asp), lay(&[(0x1000, "x"), (0x3000, "y")]));
        assert!(x.is_enabled());
        *meddler.topo.lock().unwrap() = None;
        topo.listener_unregister(id).unwrap();
    });
}
