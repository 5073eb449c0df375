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

pub mod address_space;
pub mod dirty;
pub mod docs;
pub mod error;
pub mod flatview;
pub mod guest_atomic;
pub mod listener;
pub mod mtree;
pub mod ops;
pub mod ram;
pub mod region;
pub(crate) mod sync;
pub mod topology;
pub mod turns;
pub mod types;

pub use address_space::{Accessor, AddressSpace, MapClientId, Mapping, DEFAULT_BOUNCE_BUDGET};
pub use error::{Error, Result};
pub use flatview::{live_views, FlatRange, FlatView};
pub use guest_atomic::AtomicRmw;
pub use listener::{
    CommitDiff, DiffSubscriber, EventfdRecord, ListenerId, MemoryListener, MemoryRegionSection, Observed, RangeRecord,
    Snapshot, SpaceDiff,
};
pub use mtree::MtreeOptions;
pub use ops::{
    ImplConstraints, MemoryRegionOps, MmioTable, OldRead, OldWrite, OpsConfig, PortioEntry, PortioTable, UnassignedIo,
    ValidConstraints,
};
pub use ram::RamSlice;
pub use region::{new_event_notifier, EventNotifier, Ioeventfd, MemoryRegion, RegionId, WeakRegion};
pub use topology::{FlushHook, StandardSpaces, Topology};
pub use types::{DirtyClient, Endianness, HwAddr, MemTxResult, PAGE_SIZE, SIZE_MAX};

#[cfg(test)]
mod send_sync {
    fn is_send_sync<T: Send + Sync>() {}
    #[test]
    fn handles_are_send_and_sync() {
        is_send_sync::<super::Topology>();
        is_send_sync::<super::AddressSpace>();
        is_send_sync::<super::MemoryRegion>();
        is_send_sync::<super::FlatView>();
        is_send_sync::<super::Mapping>();
    }
}
