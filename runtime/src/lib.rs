//! # topos-runtime
//!
//! QEMU's physical memory API (`include/exec/memory.h`) for a concurrent
//! Rust emulator: regions and their tree, transactions serialized by a
//! topology actor, FlatViews rendered per commit and published by RCU, guest
//! accesses dispatched without locks, listeners that receive each commit's
//! diff in QEMU's order, dirty logging, ioeventfd and coalesced-MMIO
//! bookkeeping, and `info mtree` text.
//!
//! ```
//! use topos_runtime::{Topology, DirtyClient};
//! let topo = Topology::new();
//! let spaces = topo.standard_spaces()?;
//! let ram = topo.new_ram("ram", 0x10000)?;
//! spaces.system.add_subregion(0, &ram)?;
//! spaces.memory.write(0x10, &[1, 2, 3, 4]).is_ok().then_some(()).unwrap();
//! let mut buf = [0u8; 4];
//! assert!(spaces.memory.read(0x10, &mut buf).is_ok());
//! assert_eq!(buf, [1, 2, 3, 4]);
//! assert!(ram.get_dirty(0, 0x1000, DirtyClient::Vga)?);
//! # Ok::<(), topos_runtime::Error>(())
//! ```
//!
//! See [`docs`] for the memory model and a table of QEMU names.

#![warn(unreachable_pub)]

// One concept per file; the map from QEMU's header to these files is in
// `docs`. All modules are private and the API is re-exported below, except
// `docs` (documentation only) and `turns` (the rule device actors follow).
mod accessor;
mod address_space;
mod broadcast;
mod coalesced;
mod code_watch;
mod commit;
mod damage;
mod diff;
mod dirty;
mod dirty_log;
mod dispatch;
pub mod docs;
mod error;
mod fault;
mod find;
mod flatview;
mod guest_atomic;
mod ioeventfd;
mod listener;
pub mod locks {
    //! The poison-ignoring mutex and condition variable the runtime locks
    //! with, for the device harness to use too: under `--cfg topos_loom`
    //! they are loom's, in both crates at once.
    pub use crate::sync::{Condvar, Mutex, MutexGuard};
}
mod map;
mod mtree;
mod ops;
mod ops_tables;
mod ram;
mod region;
mod render;
pub(crate) mod sync;
mod topology;
mod transaction;
mod translate;
pub mod turns;
mod types;

pub use accessor::Accessor;
pub use address_space::AddressSpace;
pub use broadcast::{CommitDiff, DiffSubscriber, EventfdRecord, Observed, RangeRecord, Snapshot, SpaceDiff};
pub use code_watch::CodeWatch;
pub use error::{Error, Result};
pub use fault::{Fault, FaultHook, ListenerFailure};
pub use flatview::{live_views, FlatRange, FlatView};
pub use guest_atomic::AtomicRmw;
pub use ioeventfd::{new_event_notifier, EventNotifier, Ioeventfd};
pub use listener::{ListenerId, ListenerResult, MemoryListener, MemoryRegionSection};
pub use map::{MapClientId, Mapping, DEFAULT_BOUNCE_BUDGET, MAX_BOUNCE_MAPPING};
pub use mtree::MtreeOptions;
pub use ops::{ImplConstraints, MemoryRegionOps, OpsConfig, UnassignedIo, ValidConstraints};
pub use ops_tables::{MmioTable, OldRead, OldWrite, PortioEntry, PortioTable};
pub use ram::RamSlice;
pub use region::{MemoryRegion, RegionId, WeakRegion};
pub use topology::{FlushHook, StandardSpaces, Topology};
pub use translate::{PageTarget, PageTranslation, RamPage};
pub use types::{DirtyClient, Endianness, HwAddr, MemTxResult, PAGE_SHIFT, PAGE_SIZE, SIZE_MAX};

#[cfg(test)]
mod send_sync {
    fn is_send_sync<T: Send + Sync>() {}
    fn is_send<T: Send>() {}
    #[test]
    fn handles_are_send_and_sync() {
        is_send_sync::<super::Topology>();
        is_send_sync::<super::AddressSpace>();
        is_send_sync::<super::MemoryRegion>();
        is_send_sync::<super::FlatView>();
        is_send_sync::<super::Mapping>();
        is_send_sync::<super::PageTranslation>();
        is_send_sync::<super::CodeWatch>();
        is_send_sync::<super::Fault>();
        is_send::<super::Accessor>();
    }
}
