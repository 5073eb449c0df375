//! QEMU's `isa-debug-exit` (`hw/misc/debugexit.c`): an I/O port range a
//! guest writes to in order to end the VM with a status of its choosing,
//! used by test kernels to report success or failure.
//!
//! * A guest write of value `v` (1 to 4 bytes, little-endian, at any offset
//!   of the range) requests an exit with status `(v << 1) | 1`, truncated to
//!   an `i32` as QEMU's C `int` is. The status is always odd, so it can
//!   never be confused with a clean 0 exit; a process exit code keeps its
//!   low 8 bits (writing `0x10` gives status `0x21`, exit code 33).
//! * Reads return 0 (QEMU's read handler), at every offset and size.
//! * QEMU calls `exit()` (older versions) or requests a shutdown with the
//!   code (newer ones). Here the device never ends the process: it hands the
//!   status to an [`ExitSink`] the embedder provides (a
//!   `std::sync::mpsc::Sender<i32>`, a closure, ...) and carries on; every
//!   write is a request, and it is up to the embedder to stop the vCPUs.
//! * QEMU's properties default to `iobase = 0x501`, `iosize = 2`
//!   ([`DebugExitConfig::default`]); test harnesses conventionally pass
//!   `iobase=0xf4,iosize=0x04` ([`DebugExitConfig::conventional`]).
//!   Accesses are valid with 1 to 4 bytes; like any MMIO in QEMU an access
//!   starting inside the range is not clamped to it, so a 4-byte write to a
//!   1-byte range reaches the device whole.

#![forbid(unsafe_code)]

use crate::actor::{ActorHandle, Device, DeviceCtx, Spawned};
use crate::wakeups::DeviceRuntime;
use std::sync::mpsc;
use topos_runtime::{Endianness, HwAddr, ImplConstraints, MemoryRegion, OpsConfig, Topology, ValidConstraints};

/// QEMU's default `iobase` property.
pub const QEMU_DEFAULT_IOBASE: u64 = 0x501;
/// QEMU's default `iosize` property.
pub const QEMU_DEFAULT_IOSIZE: u64 = 2;
/// The port test harnesses conventionally use (`iobase=0xf4`).
pub const CONVENTIONAL_IOBASE: u64 = 0xf4;
/// The size test harnesses conventionally use with it (`iosize=0x04`).
pub const CONVENTIONAL_IOSIZE: u64 = 4;

/// The exit status QEMU derives from a written value: `(value << 1) | 1`,
/// truncated to a C `int`.
pub fn exit_status(value: u64) -> i32 {
    ((value << 1) | 1) as u32 as i32
}

/// Where the device's exit requests go.
pub trait ExitSink: Send + 'static {
    /// The guest asked the VM to exit with `status`.
    fn request_exit(&self, status: i32);
}

impl ExitSink for mpsc::Sender<i32> {
    fn request_exit(&self, status: i32) {
        // A receiver that is gone no longer cares.
        let _ = self.send(status);
    }
}

impl ExitSink for mpsc::SyncSender<i32> {
    fn request_exit(&self, status: i32) {
        // Never block the vCPU: if the channel is full, earlier requests
        // are still waiting to be acted on.
        let _ = self.try_send(status);
    }
}

impl<F: Fn(i32) + Send + 'static> ExitSink for F {
    fn request_exit(&self, status: i32) {
        self(status)
    }
}

/// Placement of the port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugExitConfig {
    /// First port.
    pub iobase: u64,
    /// Number of ports.
    pub iosize: u64,
}

impl Default for DebugExitConfig {
    /// QEMU's property defaults: 2 ports at `0x501`.
    fn default() -> Self {
        DebugExitConfig { iobase: QEMU_DEFAULT_IOBASE, iosize: QEMU_DEFAULT_IOSIZE }
    }
}

impl DebugExitConfig {
    /// `iosize` ports at `iobase`.
    pub fn new(iobase: u64, iosize: u64) -> DebugExitConfig {
        DebugExitConfig { iobase, iosize }
    }

    /// `iobase=0xf4,iosize=0x04`, the usual test-harness setting.
    pub fn conventional() -> DebugExitConfig {
        DebugExitConfig { iobase: CONVENTIONAL_IOBASE, iosize: CONVENTIONAL_IOSIZE }
    }
}

/// The `isa-debug-exit` device (an actor; see [`DebugExit::spawn`]).
pub struct DebugExit {
    sink: Box<dyn ExitSink>,
    requests: u64,
    last_status: Option<i32>,
}

impl std::fmt::Debug for DebugExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugExit")
            .field("requests", &self.requests)
            .field("last_status", &self.last_status)
            .finish_non_exhaustive()
    }
}

impl DebugExit {
    /// A device reporting exit requests to `sink`.
    pub fn new(sink: impl ExitSink) -> DebugExit {
        DebugExit { sink: Box::new(sink), requests: 0, last_status: None }
    }

    /// The access rules (QEMU's `debug_exit_ops`): 1 to 4 bytes,
    /// little-endian.
    pub fn ops_config() -> OpsConfig {
        OpsConfig {
            endianness: Endianness::Little,
            valid: ValidConstraints { min_access_size: 1, max_access_size: 4, unaligned: false },
            impl_: ImplConstraints { min_access_size: 1, max_access_size: 4, unaligned: false },
        }
    }

    /// Spawns a device reporting to `sink` and maps it in `io` (an I/O-port
    /// container such as `StandardSpaces::io`) as `config` says. Returns
    /// the region (unmap it with `io.del_subregion` to unplug the device)
    /// and a handle to the actor.
    pub fn spawn(
        topo: &Topology,
        io: &MemoryRegion,
        config: DebugExitConfig,
        sink: impl ExitSink,
        runtime: &DeviceRuntime,
    ) -> topos_runtime::Result<(MemoryRegion, ActorHandle<DebugExit>)> {
        let spawned = Spawned::new("isa-debug-exit", DebugExit::new(sink), Vec::new(), runtime);
        let region =
            topo.new_io_arc("isa-debug-exit", spawned.ops(0), DebugExit::ops_config(), u128::from(config.iosize))?;
        io.add_subregion(config.iobase, &region)?;
        Ok((region, spawned.handle()))
    }

    /// How many exit requests the guest made.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The status of the latest request.
    pub fn last_status(&self) -> Option<i32> {
        self.last_status
    }
}

impl Device for DebugExit {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: HwAddr, _size: u32) -> u64 {
        0
    }

    fn write(&mut self, ctx: &mut DeviceCtx<'_>, _region: usize, _addr: HwAddr, value: u64, _size: u32) {
        let status = exit_status(value);
        self.requests += 1;
        self.last_status = Some(status);
        tracing::info!(device = ctx.name(), status, "guest requested exit");
        self.sink.request_exit(status);
    }
}
