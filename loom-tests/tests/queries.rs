//! Queries of the actor state take the topology's turn (`with_query` in
//! `transaction.rs`): a snapshot is one generation, `info mtree` never shows
//! half a transaction, and a thread that holds a device's turn is refused
//! at once instead of waiting for the topology (the deadlock-freedom rule of
//! `turns.rs`).
#![cfg(topos_loom)]

use loom::thread;
use std::sync::Arc;
use topos_loom_tests::model::{lay, layout_of, small};
use topos_runtime::turns::DeviceTurn;
use topos_runtime::{AddressSpace, Error, MemoryRegion, Topology};

/// `a` at 0 and `b` at 0x1000, committed; the transaction of the models
/// moves them to 0x4000 and 0x5000.
fn two_regions() -> (Topology, AddressSpace, MemoryRegion, MemoryRegion) {
    let (topo, root, asp) = small().unwrap();
    let (a, b) = (topo.new_ram("a", 0x1000).unwrap(), topo.new_ram("b", 0x1000).unwrap());
    topo.transaction(|| {
        root.add_subregion(0, &a).unwrap();
        root.add_subregion(0x1000, &b).unwrap();
    })
    .unwrap();
    (topo, asp, a, b)
}

fn move_both(topo: &Topology, a: &MemoryRegion, b: &MemoryRegion) {
    topo.transaction(|| {
        a.set_address(0x4000).unwrap();
        b.set_address(0x5000).unwrap();
    })
    .unwrap();
}

// In each model the querying thread is spawned and the writer runs first:
// loom's DPOR remembers only the last access to an atomic or lock, so the
// query's accesses are moved back into the transaction only if they come
// after it in the first execution.

#[test]
fn a_snapshot_is_one_generation() {
    loom::model(|| {
        let (topo, asp, a, b) = two_regions();
        let g0 = topo.generation();
        let reader = {
            let topo = topo.clone();
            thread::spawn(move || {
                let snap = topo.snapshot();
                assert_eq!(snap.spaces.len(), 1);
                let seen = layout_of(&snap.spaces[0].1);
                let want = match snap.generation - g0 {
                    0 => lay(&[(0, "a"), (0x1000, "b")]),
                    1 => lay(&[(0x4000, "a"), (0x5000, "b")]),
                    _ => panic!("generation {} was never committed", snap.generation),
                };
                assert_eq!(seen, want, "snapshot at generation {} holds another generation's view", snap.generation);
            })
        };
        move_both(&topo, &a, &b);
        reader.join().unwrap();
        drop(asp);
    });
}

#[test]
fn mtree_never_shows_half_a_transaction() {
    loom::model(|| {
        let (topo, _asp, a, b) = two_regions();
        let reader = {
            let topo = topo.clone();
            thread::spawn(move || {
                let text = topo.mtree(Default::default()).unwrap();
                let shows = |start: u64, name: &str| {
                    let line = format!("{:016x}-{:016x} (prio 0, ram): {name}", start, start + 0xfff);
                    text.lines().any(|l| l.trim() == line)
                };
                let old = shows(0, "a") && shows(0x1000, "b");
                let new = shows(0x4000, "a") && shows(0x5000, "b");
                assert!(old != new, "info mtree shows half a transaction:\n{text}");
            })
        };
        move_both(&topo, &a, &b);
        reader.join().unwrap();
    });
}

/// While another thread holds the topology's turn and waits for something
/// this thread holds, a thread in a device turn asks for the topology: it is
/// refused at once. Were it to wait, loom would report the deadlock.
#[test]
fn a_device_turn_holder_is_refused_the_topology_instead_of_waiting() {
    loom::model(|| {
        let (topo, root, _asp) = small().unwrap();
        let gate = Arc::new(loom::sync::Mutex::new(()));
        let held = gate.lock().unwrap();
        let holder = {
            let topo = topo.clone();
            let gate = gate.clone();
            thread::spawn(move || {
                topo.transaction(|| drop(gate.lock().unwrap())).unwrap();
            })
        };
        {
            let _device = DeviceTurn::enter();
            assert!(matches!(topo.subscribe(), Err(Error::InsideDeviceTurn)), "subscribe inside a device turn");
            assert!(matches!(root.set_enabled(false), Err(Error::InsideDeviceTurn)), "a mutator inside a device turn");
            assert!(matches!(topo.begin(), Err(Error::InsideDeviceTurn)), "begin inside a device turn");
        }
        drop(held);
        holder.join().unwrap();
        // Outside the device turn the same calls wait for the turn and work.
        assert!(topo.subscribe().is_ok());
        root.set_enabled(false).unwrap();
    });
}

/// Inside a device turn `snapshot` cannot take the topology's turn; it reads
/// the views and the generation without it and must still be one generation
/// (it was torn by a commit running meanwhile before the publication
/// seqlock).
#[test]
fn a_snapshot_inside_a_device_turn_is_one_generation() {
    loom::model(|| {
        let (topo, asp, a, b) = two_regions();
        let g0 = topo.generation();
        let reader = {
            let topo = topo.clone();
            thread::spawn(move || {
                let _device = DeviceTurn::enter();
                let snap = topo.snapshot();
                let seen = layout_of(&snap.spaces[0].1);
                let want = match snap.generation - g0 {
                    0 => lay(&[(0, "a"), (0x1000, "b")]),
                    _ => lay(&[(0x4000, "a"), (0x5000, "b")]),
                };
                assert_eq!(seen, want, "snapshot at generation {} holds another generation's view", snap.generation);
            })
        };
        move_both(&topo, &a, &b);
        reader.join().unwrap();
        drop(asp);
    });
}
