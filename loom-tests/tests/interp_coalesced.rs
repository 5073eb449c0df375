//! The interpreter's coalesced-MMIO buffers (`vcpu/src/interp/coalesced.rs`):
//! a vCPU buffering writes while the topology's flush hook drains its
//! buffer from another thread (an access to a flush-coalesced region
//! there), and the vCPU's own flush: every write reaches the device
//! exactly once, in the order the vCPU made them.
#![cfg(topos_loom)]

use loom::thread;
use std::sync::Arc;
use topos_loom_tests::model::small;
use topos_runtime::{MemoryRegionOps, OpsConfig};
use topos_vcpu::interp::CoalescedMmio;

/// Records the writes that reach it.
#[derive(Default)]
struct Dev(loom::sync::Mutex<Vec<(u64, u64)>>);

impl MemoryRegionOps for Dev {
    fn read(&self, _a: u64, _s: u32) -> u64 {
        0
    }
    fn write(&self, addr: u64, value: u64, _s: u32) {
        self.0.lock().unwrap().push((addr, value));
    }
}

#[test]
fn a_flush_from_another_thread_keeps_every_write_once_and_in_order() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let dev = Arc::new(Dev::default());
        let region = topo.new_io_arc("dev", dev.clone(), OpsConfig::default(), 0x100).unwrap();
        region.add_coalescing(0, 0x100).unwrap();
        root.add_subregion(0x1000, &region).unwrap();
        let mmio = CoalescedMmio::install(&topo, &asp);
        let buf = mmio.buffer();
        // The vCPU buffered a first write already; it buffers a second and
        // flushes (before a dispatched access) while the hook drains.
        buf.push(0x1000, 1, 4);
        let vcpu = {
            let buf = buf.clone();
            thread::spawn(move || {
                buf.push(0x1004, 2, 4);
                buf.flush();
            })
        };
        // Another thread's access to a region that flushes coalesced MMIO.
        topo.flush_coalesced_mmio();
        vcpu.join().unwrap();
        assert_eq!(*dev.0.lock().unwrap(), vec![(0, 1), (4, 2)]);
    });
}
