//! Regression tests, named `r<issue>_<what>`: each failed before its fix.

use topos_runtime::{FlatView, Topology};

fn spans(view: &FlatView) -> Vec<(u64, u128, String)> {
    view.ranges().iter().map(|r| (r.start(), r.end(), r.region().name().to_string())).collect()
}

/// Issue 7: an address-space root that is also a subregion renders at its
/// own address; giving it a container (or moving it within one) must move
/// its view at once, not at some later commit.
#[test]
fn r7_root_that_is_a_subregion_moves_its_view() {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let sub = topo.new_container("sub", 0x10_0000).unwrap();
    let ram = topo.new_ram("ram", 0x1000).unwrap();
    sub.add_subregion(0x100, &ram).unwrap();
    let a = topo.address_space_init(&sub, "a").unwrap();
    assert_eq!(spans(&a.view()), vec![(0x100, 0x1100, "ram".to_string())]);

    // Adding a parent places the root at 0x10000.
    s.system.add_subregion(0x10000, &sub).unwrap();
    assert_eq!(spans(&a.view()), vec![(0x10100, 0x11100, "ram".to_string())]);
    // Moving it within the parent moves the view.
    sub.set_address(0x20000).unwrap();
    assert_eq!(spans(&a.view()), vec![(0x20100, 0x21100, "ram".to_string())]);
    // And system memory sees the same.
    assert_eq!(s.memory.view().lookup(0x20100).map(|r| r.region().name().to_string()), Some("ram".into()));

    // A disabled parent does not hide the root's own move.
    let parked = topo.new_container("parked", 0x100_0000).unwrap();
    parked.set_enabled(false).unwrap();
    s.system.del_subregion(&sub).unwrap();
    parked.add_subregion(0x30000, &sub).unwrap();
    assert_eq!(spans(&a.view()), vec![(0x30100, 0x31100, "ram".to_string())]);
}

// ---------------------------------------------------------------------------
// Issue 7: guest paths that panicked, and sizes
// ---------------------------------------------------------------------------

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use topos_runtime::{
    Error, Fault, HwAddr, ListenerResult, MemTxResult, MemoryListener, MemoryRegionOps, MemoryRegionSection, OpsConfig,
    MAX_BOUNCE_MAPPING, SIZE_MAX,
};

/// A device that counts its calls and answers 0x5a.
#[derive(Default)]
struct Counting {
    calls: AtomicUsize,
}

impl MemoryRegionOps for Counting {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        0x5a
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

fn mmio_board() -> (Topology, topos_runtime::StandardSpaces, Arc<Counting>, topos_runtime::MemoryRegion) {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let dev = Arc::new(Counting::default());
    let mmio = topo.new_io_arc("mmio", dev.clone(), OpsConfig::default(), 0x1000).unwrap();
    s.system.add_subregion(0x1000, &mmio).unwrap();
    (topo, s, dev, mmio)
}

#[test]
fn r7_zero_length_accesses_to_mmio_do_nothing_and_succeed() {
    let (_topo, s, dev, _mmio) = mmio_board();
    let mut acc = s.memory.accessor();
    let mut empty = [0u8; 0];
    assert_eq!(acc.read(0x1000, &mut empty), MemTxResult::Ok);
    assert_eq!(acc.write(0x1000, &empty), MemTxResult::Ok);
    assert_eq!(acc.read_u64(0x1000, 0), (0, MemTxResult::Ok));
    assert_eq!(s.memory.read_u64(0x1000, 0), (0, MemTxResult::Ok));
    assert_eq!(s.memory.read(0x1000, &mut empty), MemTxResult::Ok);
    assert_eq!(dev.calls.load(Ordering::SeqCst), 0, "a zero-length access reaches no device");
}

#[test]
fn r7_dispatch_with_an_illegal_size_is_refused_before_the_device() {
    let (_topo, _s, dev, mmio) = mmio_board();
    for size in [0u32, 3, 5, 16, u32::MAX] {
        assert_eq!(mmio.dispatch_read(0, size), (0, MemTxResult::DecodeError), "read size {size}");
        assert_eq!(mmio.dispatch_write(0, 1, size), MemTxResult::DecodeError, "write size {size}");
    }
    assert_eq!(dev.calls.load(Ordering::SeqCst), 0);
    assert_eq!(mmio.dispatch_read(0, 4), (0x5a, MemTxResult::Ok));
}

#[test]
fn r7_add_coalescing_that_overflows_is_refused() {
    let (_topo, _s, _dev, mmio) = mmio_board();
    assert!(matches!(mmio.add_coalescing(1, u128::MAX), Err(Error::OutOfRange { .. })));
    assert!(matches!(mmio.add_coalescing(0, SIZE_MAX), Err(Error::OutOfRange { .. })));
    assert!(mmio.coalesced_ranges().is_empty());
    assert!(!mmio.flush_coalesced());
}

#[test]
fn r7_find_with_huge_or_zero_sizes() {
    let (topo, s, _dev, mmio) = mmio_board();
    // The query is clipped to the 64-bit space instead of overflowing.
    let sec = s.memory.find(0x1800, u128::MAX).expect("mmio overlaps");
    assert_eq!((sec.offset_within_address_space, sec.size), (0x1800, 0x800));
    let sec = topo.find(&s.system, u64::MAX, u128::MAX);
    assert!(sec.is_none());
    // Zero-size queries: QEMU's comparison matches strictly inside a range
    // (a zero-size section) and nowhere else (semantics.md §7.1).
    assert!(s.memory.find(0x1000, 0).is_none(), "first byte");
    assert!(s.memory.find(0x3000, 0).is_none(), "hole");
    let inside = s.memory.find(0x1800, 0).expect("inside");
    assert_eq!((inside.mr.as_ref(), inside.size), (Some(&mmio), 0));
}

#[test]
fn r7_bounce_mappings_never_allocate_a_guest_chosen_length() {
    let (_topo, s, _dev, _mmio) = mmio_board();
    s.memory.set_bounce_budget(usize::MAX);
    let m = s.memory.map(0x1000, u64::MAX, false).expect("a bounce mapping");
    assert!(!m.is_direct());
    assert_eq!(m.len(), MAX_BOUNCE_MAPPING as u64, "as QEMU's map, shorter than asked");
    assert_eq!(s.memory.bounce_in_use(), MAX_BOUNCE_MAPPING);
    drop(m);
    assert_eq!(s.memory.bounce_in_use(), 0);
}

// ---------------------------------------------------------------------------
// Issue 7: listeners that fail or panic
// ---------------------------------------------------------------------------

/// Records region_add/region_del; fails (or panics) on the `n`th region_add
/// if told to.
struct Mirror {
    log: Mutex<Vec<String>>,
    fail_on: Option<(&'static str, bool)>,
}

impl Mirror {
    fn new(fail_on: Option<(&'static str, bool)>) -> Arc<Mirror> {
        Arc::new(Mirror { log: Mutex::new(Vec::new()), fail_on })
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

fn name(s: &MemoryRegionSection) -> String {
    s.mr.as_ref().map_or("-".into(), |m| m.name().to_string())
}

impl MemoryListener for Mirror {
    fn region_add(&self, s: &MemoryRegionSection) -> ListenerResult {
        if let Some((n, panics)) = self.fail_on {
            if name(s) == n {
                if panics {
                    panic!("listener panics on {n}");
                }
                return Err(format!("cannot add {n}").into());
            }
        }
        self.log.lock().unwrap().push(format!("add {} @{:#x}", name(s), s.offset_within_address_space));
        Ok(())
    }
    fn region_del(&self, s: &MemoryRegionSection) -> ListenerResult {
        self.log.lock().unwrap().push(format!("del {} @{:#x}", name(s), s.offset_within_address_space));
        Ok(())
    }
}

fn listener_failure_keeps_the_topology_consistent(panics: bool) {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let healthy = Mirror::new(None);
    let failing = Mirror::new(Some(("bad", panics)));
    topo.listener_register(healthy.clone(), 0, Some(&s.memory)).unwrap();
    topo.listener_register(failing.clone(), 1, Some(&s.memory)).unwrap();
    let hooked = Arc::new(Mutex::new(Vec::new()));
    let h = hooked.clone();
    let hook: topos_runtime::FaultHook = Arc::new(move |f: &Fault| h.lock().unwrap().push(f.clone()));
    topo.set_fault_hook(Some(&hook));

    let bad = topo.new_ram("bad", 0x1000).unwrap();
    let err = s.system.add_subregion(0x4000, &bad).expect_err("the listener failed");
    let Error::ListenerFailed(failure) = err else { panic!("{err:?}") };
    assert_eq!(failure.callback, "region_add");
    assert_eq!(failure.generation, topo.generation());
    // The change was made and published anyway.
    assert_eq!(s.memory.view().lookup(0x4000).map(|r| r.region().name().to_string()), Some("bad".into()));
    assert!(s.memory.write(0x4000, &[1]).is_ok(), "reachable by guests at once");
    assert_eq!(healthy.take(), vec!["add bad @0x4000"]);
    assert_eq!(topo.faults(), vec![Fault::ListenerFailed(failure.clone())]);
    assert_eq!(*hooked.lock().unwrap(), vec![Fault::ListenerFailed(failure)]);

    // The next commit: the healthy listener does not get region_add for
    // `bad` again, and the failed one was detached.
    let good = topo.new_ram("good", 0x1000).unwrap();
    s.system.add_subregion(0x8000, &good).unwrap();
    assert_eq!(healthy.take(), vec!["add good @0x8000"]);
    assert!(failing.take().is_empty(), "a failed listener gets nothing more");
    s.system.del_subregion(&bad).unwrap();
    assert_eq!(healthy.take(), vec!["del bad @0x4000"]);
}

#[test]
fn r7_a_failing_listener_is_detached_and_the_commit_completes() {
    listener_failure_keeps_the_topology_consistent(false);
}

#[test]
fn r7_a_panicking_listener_is_detached_and_the_commit_completes() {
    listener_failure_keeps_the_topology_consistent(true);
}

#[test]
fn r7_a_panicking_transaction_body_with_a_panicking_listener_does_not_abort() {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    topo.listener_register(Mirror::new(Some(("bad", true))), 0, None).unwrap();
    let bad = topo.new_ram("bad", 0x1000).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        topo.transaction(|| {
            s.system.add_subregion(0, &bad).unwrap();
            panic!("the body fails");
        })
    }));
    assert!(r.is_err(), "the body's panic propagates");
    // The cleanup commit ran (the listener panicked in it) and the topology
    // is usable.
    assert_eq!(s.memory.view().lookup(0).map(|r| r.region().name().to_string()), Some("bad".into()));
    assert!(matches!(topo.faults().as_slice(), [Fault::ListenerFailed(_)]));
    s.system.del_subregion(&bad).unwrap();
}

// ---------------------------------------------------------------------------
// Issue 7: abandoned transactions
// ---------------------------------------------------------------------------

fn abandoned_transaction_is_completed_by_the_next_user(
    body: impl FnOnce(&Topology, &topos_runtime::MemoryRegion) + Send + 'static,
) {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let ram = topo.new_ram("ram", 0x1000).unwrap();
    let (t, r) = (topo.clone(), ram.clone());
    let sys = s.system.clone();
    let _ = std::thread::spawn(move || {
        t.begin().unwrap();
        sys.add_subregion(0x2000, &r).unwrap();
        body(&t, &r);
    })
    .join();
    assert!(s.memory.view().lookup(0x2000).is_none(), "not committed yet");
    // Every later use goes on: the abandoned changes are committed first.
    let other = topo.new_ram("other", 0x1000).unwrap();
    s.system.add_subregion(0x8000, &other).unwrap();
    assert_eq!(s.memory.view().lookup(0x2000).map(|r| r.region().name().to_string()), Some("ram".into()));
    assert_eq!(s.memory.view().lookup(0x8000).map(|r| r.region().name().to_string()), Some("other".into()));
    assert!(matches!(topo.faults().as_slice(), [Fault::TransactionAbandoned { .. }]), "{:?}", topo.faults());
    assert!(!topo.mtree(Default::default()).unwrap().is_empty());
    let _ = topo.snapshot();
    let _ = topo.subscribe().unwrap();
}

#[test]
fn r7_a_thread_that_exits_inside_a_transaction_does_not_wedge_the_topology() {
    abandoned_transaction_is_completed_by_the_next_user(|_, _| {});
}

#[test]
fn r7_a_thread_that_panics_inside_a_transaction_does_not_wedge_the_topology() {
    abandoned_transaction_is_completed_by_the_next_user(|_, _| panic!("the owner dies"));
}

// ---------------------------------------------------------------------------
// Issue 7: the generation never runs ahead of what readers can see
// ---------------------------------------------------------------------------

/// Checks, from inside region_add (before publication), that the topology's
/// generation has not moved yet.
struct GenerationProbe {
    topo: Mutex<Option<Topology>>,
    seen: Mutex<Vec<(u64, usize)>>,
}

impl MemoryListener for GenerationProbe {
    fn region_add(&self, s: &MemoryRegionSection) -> ListenerResult {
        if let Some(t) = self.topo.lock().unwrap().as_ref() {
            let visible = s.address_space.view().len();
            self.seen.lock().unwrap().push((t.generation(), visible));
        }
        Ok(())
    }
}

#[test]
fn r7_generation_moves_only_after_publication() {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let probe = Arc::new(GenerationProbe { topo: Mutex::new(Some(topo.clone())), seen: Mutex::new(Vec::new()) });
    topo.listener_register(probe.clone(), 0, Some(&s.memory)).unwrap();
    let before = topo.generation();
    s.system.add_subregion(0, &topo.new_ram("ram", 0x1000).unwrap()).unwrap();
    let after = topo.generation();
    assert_eq!(after, before + 1);
    // During the listener call, the new view was not published and the
    // generation had not moved.
    assert_eq!(*probe.seen.lock().unwrap(), vec![(before, 0)]);
    let view = s.memory.view();
    assert_eq!(view.generation(), after, "the view carries its commit's generation");
    assert_eq!(s.memory.generation(), after);
    assert_eq!(s.memory.accessor().generation(), after);
    // A commit that does not change "memory" leaves its generation alone.
    s.io.add_subregion(0x80, &topo.new_ram("port", 1).unwrap()).unwrap();
    assert_eq!(topo.generation(), after + 1);
    assert_eq!(s.memory.generation(), after);
    *probe.topo.lock().unwrap() = None;
}

// ---------------------------------------------------------------------------
// Issue 7: the coalesced flush hook without a reference cycle
// ---------------------------------------------------------------------------

#[test]
fn r7_a_flush_hook_that_holds_the_address_space_does_not_leak_the_topology() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (weak_view, hook) = {
        let topo = Topology::new();
        let s = topo.standard_spaces().unwrap();
        s.system.add_subregion(0, &topo.new_ram("ram", 0x1000).unwrap()).unwrap();
        let asp = s.memory.clone();
        let c = calls.clone();
        // A backend's hook replays coalesced writes into the address space.
        let hook: topos_runtime::FlushHook = Arc::new(move || {
            let _ = asp.write(0, &[1]);
            c.fetch_add(1, Ordering::SeqCst);
        });
        topo.set_coalesced_flush_hook(Some(&hook));
        topo.flush_coalesced_mmio();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        (Arc::downgrade(&s.memory.view()), hook)
    };
    // The hook (kept by its backend) holds the address space; the topology
    // holds the hook only weakly, so dropping the hook frees everything.
    drop(hook);
    assert!(weak_view.upgrade().is_none(), "the topology outlived its last handle");
}
