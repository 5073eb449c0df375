//! ioeventfds (`ioeventfd.rs`, `commit.rs`): a guest write racing
//! `add_eventfd` either signals the eventfd or reaches the device, never
//! both and never neither, and a write after it signals; listeners hear of
//! an ioeventfd (`eventfd_add`, what a KVM backend turns into
//! `KVM_IOEVENTFD`) only once the view that maps it is published.
#![cfg(topos_loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use std::sync::Arc;
use topos_loom_tests::model::small;
use topos_runtime::{
    new_event_notifier, EventNotifier, ListenerResult, MemoryListener, MemoryRegionOps, MemoryRegionSection, OpsConfig,
};

/// Counts the writes that reach it.
#[derive(Default)]
struct Dev(AtomicUsize);
impl MemoryRegionOps for Dev {
    fn read(&self, _a: u64, _s: u32) -> u64 {
        0
    }
    fn write(&self, _a: u64, _v: u64, _s: u32) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn signals(fd: &EventNotifier) -> u64 {
    fd.read().unwrap_or(0)
}

#[test]
fn a_write_racing_add_eventfd_goes_one_way() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let dev = Arc::new(Dev::default());
        let region = topo.new_io_arc("dev", dev.clone(), OpsConfig::default(), 0x100).unwrap();
        root.add_subregion(0x1000, &region).unwrap();
        let fd = new_event_notifier().unwrap();
        // The vCPU is spawned and the writer runs first (loom's DPOR moves
        // the vCPU's loads back into `add_eventfd`).
        let vcpu = {
            let asp = asp.clone();
            thread::spawn(move || assert!(asp.write(0x1010, &[1, 0, 0, 0]).is_ok()))
        };
        region.add_eventfd(0x10, 4, false, 0, &fd).unwrap();
        vcpu.join().unwrap();
        let (signalled, reached) = (signals(&fd), dev.0.load(Ordering::SeqCst) as u64);
        assert_eq!(signalled + reached, 1, "signalled {signalled}, reached the device {reached}");
        // After add_eventfd, the write signals.
        assert!(asp.write(0x1010, &[1, 0, 0, 0]).is_ok());
        assert_eq!(signals(&fd), 1);
        assert_eq!(dev.0.load(Ordering::SeqCst) as u64, reached);
    });
}

/// Records the ioeventfds it is told of (a KVM backend's `KVM_IOEVENTFD`).
#[derive(Default)]
struct Kvm(loom::sync::Mutex<Vec<u64>>);

impl MemoryListener for Kvm {
    fn eventfd_add(&self, s: &MemoryRegionSection, _m: bool, _d: u64, _e: &EventNotifier) -> ListenerResult {
        self.0.lock().unwrap().push(s.offset_within_address_space);
        Ok(())
    }
}

#[test]
fn listeners_hear_of_an_eventfd_only_once_its_view_is_published() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let kvm = Arc::new(Kvm::default());
        let id = topo.listener_register(kvm.clone(), 0, Some(&asp)).unwrap();
        let region = topo.new_io("dev", Dev::default(), OpsConfig::default(), 0x100).unwrap();
        let fd = new_event_notifier().unwrap();
        region.add_eventfd(0x10, 4, false, 0, &fd).unwrap();
        let vcpu = {
            let asp = asp.clone();
            let kvm = kvm.clone();
            thread::spawn(move || {
                if kvm.0.lock().unwrap().contains(&0x1010) {
                    assert!(
                        asp.view().lookup(0x1010).is_some(),
                        "an ioeventfd registered before its view is published"
                    );
                }
            })
        };
        root.add_subregion(0x1000, &region).unwrap();
        vcpu.join().unwrap();
        assert_eq!(*kvm.0.lock().unwrap(), [0x1010]);
        topo.listener_unregister(id).unwrap();
    });
}
