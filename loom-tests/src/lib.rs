//! loom models of topos's concurrency protocols.
//!
//! Each file in `tests/` models one protocol against the real code: built
//! with `--cfg topos_loom`, the runtime and the device harness take their
//! locks, atomics, cells, queues, thread identities and drainer threads from
//! loom (see the `sync` modules of `topos_runtime` and `topos_devices`), so
//! loom explores the interleavings of the runtime's own publication,
//! transaction, listener, broadcast, dirty-bitmap and bounce buffer code,
//! and of the device harness's turn, mailbox, hand-off and no-block rule
//! (the `device_*` files).
//!
//! ```sh
//! # bounded, as CI runs them
//! LOOM_MAX_PREEMPTIONS=2 RUSTFLAGS="--cfg topos_loom" \
//!     cargo test -p topos-loom-tests --release --target-dir target/loom
//! # unbounded (much longer)
//! RUSTFLAGS="--cfg topos_loom" cargo test -p topos-loom-tests --release --target-dir target/loom
//! ```
//!
//! Without `--cfg topos_loom` the test files compile to nothing.

/// Helpers shared by the models.
pub mod model {
    use topos_runtime::{AddressSpace, MemoryRegion, Result, Topology};

    /// A topology with one 64 KiB root container in address space "m".
    pub fn small() -> Result<(Topology, MemoryRegion, AddressSpace)> {
        let topo = Topology::new();
        let root = topo.new_container("root", 0x10000)?;
        let asp = topo.address_space_init(&root, "m")?;
        Ok((topo, root, asp))
    }

    /// The (start, region name) pairs of the address space's current view.
    pub fn layout(asp: &AddressSpace) -> Vec<(u64, String)> {
        asp.view().ranges().iter().map(|r| (r.start(), r.region().name().to_string())).collect()
    }
}

/// Helpers shared by the device harness models.
pub mod devices {
    use std::sync::{Arc, Mutex};
    use topos_devices::runtime::HwAddr;
    use topos_devices::{Device, DeviceCtx};

    /// What a [`Recorder`] saw, in order.
    ///
    /// A std mutex, invisible to loom: nothing in its critical sections
    /// yields to loom, and the models read it once their threads are done.
    pub type Log = Arc<Mutex<Vec<u64>>>;

    /// Records every value written to it; reads return how many it has.
    /// Its handlers run inside the harness's turn cell, so loom checks that
    /// the turn makes them exclusive.
    pub struct Recorder(pub Log);

    impl Recorder {
        /// A recorder and its log.
        pub fn new() -> (Recorder, Log) {
            let log = Log::default();
            (Recorder(log.clone()), log)
        }
    }

    impl Device for Recorder {
        fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: HwAddr, _size: u32) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn write(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: HwAddr, value: u64, _size: u32) {
            self.0.lock().unwrap().push(value);
        }
    }

    /// Whether `a` comes before `b` in `log` (both present).
    pub fn before(log: &[u64], a: u64, b: u64) -> bool {
        matches!((log.iter().position(|&v| v == a), log.iter().position(|&v| v == b)), (Some(i), Some(j)) if i < j)
    }
}
