//! A failing listener is detached (`listener.rs`, `fault.rs`): after a
//! callback fails, the listener gets no further callback, neither in the
//! rest of that commit nor in a commit racing it; the commit still
//! completes for everybody else; the failure is returned to the caller
//! whose change triggered it and recorded once as a fault.
#![cfg(topos_loom)]

use loom::thread;
use std::sync::{Arc, Mutex};
use topos_loom_tests::model::{lay, layout, small};
use topos_runtime::{Error, Fault, ListenerResult, MemoryListener, MemoryRegionSection};

/// Fails its first `region_add`.
#[derive(Default)]
struct Flaky(Mutex<Vec<&'static str>>);

impl MemoryListener for Flaky {
    fn begin(&self) -> ListenerResult {
        self.0.lock().unwrap().push("begin");
        Ok(())
    }
    fn region_add(&self, _s: &MemoryRegionSection) -> ListenerResult {
        self.0.lock().unwrap().push("add");
        Err("memslot table full".into())
    }
    fn region_nop(&self, _s: &MemoryRegionSection) -> ListenerResult {
        self.0.lock().unwrap().push("nop");
        Ok(())
    }
    fn commit(&self) -> ListenerResult {
        self.0.lock().unwrap().push("commit");
        Ok(())
    }
}

/// Records what it is told.
#[derive(Default)]
struct Healthy(Mutex<Vec<(&'static str, u64)>>);

impl MemoryListener for Healthy {
    fn region_add(&self, s: &MemoryRegionSection) -> ListenerResult {
        self.0.lock().unwrap().push(("add", s.offset_within_address_space));
        Ok(())
    }
    fn commit(&self) -> ListenerResult {
        self.0.lock().unwrap().push(("commit", 0));
        Ok(())
    }
}

#[test]
fn a_failed_listener_is_detached_and_the_commits_complete() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let (x, y) = (topo.new_ram("x", 0x1000).unwrap(), topo.new_ram("y", 0x1000).unwrap());
        let flaky = Arc::new(Flaky::default());
        let healthy = Arc::new(Healthy::default());
        topo.listener_register(flaky.clone(), 0, Some(&asp)).unwrap();
        topo.listener_register(healthy.clone(), 10, Some(&asp)).unwrap();
        flaky.0.lock().unwrap().clear();
        healthy.0.lock().unwrap().clear();

        let other = {
            let root = root.clone();
            thread::spawn(move || root.add_subregion(0x3000, &y))
        };
        let mine = root.add_subregion(0x1000, &x);
        let theirs = other.join().unwrap();

        // Whichever commit came first hit the failure and reported it.
        let failed: Vec<_> = [&mine, &theirs].into_iter().filter_map(|r| r.as_ref().err()).collect();
        assert_eq!(failed.len(), 1, "the failure reached {} callers: {mine:?} {theirs:?}", failed.len());
        assert!(matches!(failed[0], Error::ListenerFailed(f) if f.callback == "region_add"), "{:?}", failed[0]);
        // Nothing reached the listener after its failure.
        assert_eq!(*flaky.0.lock().unwrap(), ["begin", "add"]);
        // Everybody else saw both commits complete.
        let h = healthy.0.lock().unwrap().clone();
        assert_eq!(h.iter().filter(|e| e.0 == "commit").count(), 2, "{h:?}");
        let mut adds: Vec<u64> = h.iter().filter(|e| e.0 == "add").map(|e| e.1).collect();
        adds.sort_unstable();
        assert_eq!(adds, [0x1000, 0x3000]);
        assert_eq!(layout(&asp), lay(&[(0x1000, "x"), (0x3000, "y")]));
        let faults = topo.faults().iter().filter(|f| matches!(f, Fault::ListenerFailed(_))).count();
        assert_eq!(faults, 1);
    });
}
