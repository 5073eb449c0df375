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
//!   ([`QEMU_DEFAULT_IOBASE`], [`QEMU_DEFAULT_IOSIZE`]); test harnesses
//!   conventionally pass `iobase=0xf4,iosize=0x04` ([`CONVENTIONAL_IOBASE`],
//!   [`DebugExitConfig::conventional`]). The size is the device's; the base
//!   is where the board maps its region ([`PORTS`]).
//!   Accesses are valid with 1 to 4 bytes; like any MMIO in QEMU an access
//!   starting inside the range is not clamped to it, so a 4-byte write to a
//!   1-byte range reaches the device whole.

#![forbid(unsafe_code)]

use crate::actor::{ActorHandle, Device, DeviceCtx, Spawned};
use crate::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged};
use std::sync::mpsc;
use topos_runtime::{Endianness, HwAddr, ImplConstraints, OpsConfig, ValidConstraints};

/// QEMU's default `iobase` property.
pub const QEMU_DEFAULT_IOBASE: u64 = 0x501;
/// QEMU's default `iosize` property.
pub const QEMU_DEFAULT_IOSIZE: u64 = 2;
/// The port test harnesses conventionally use (`iobase=0xf4`).
pub const CONVENTIONAL_IOBASE: u64 = 0xf4;
/// The size test harnesses conventionally use with it (`iosize=0x04`).
pub const CONVENTIONAL_IOSIZE: u64 = 4;
/// The role of the device's one region: its port range (map it in the I/O
/// space).
pub const PORTS: &str = "ports";

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

/// What makes an `isa-debug-exit`: its number of ports and where its exit
/// requests go.
pub struct DebugExitConfig {
    /// Number of ports (QEMU's `iosize`), 1 or more.
    pub iosize: u64,
    /// Where exit requests go.
    pub sink: Box<dyn ExitSink>,
}

impl std::fmt::Debug for DebugExitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugExitConfig").field("iosize", &self.iosize).finish_non_exhaustive()
    }
}

impl DebugExitConfig {
    /// `iosize` ports reporting to `sink`.
    pub fn new(iosize: u64, sink: impl ExitSink) -> DebugExitConfig {
        DebugExitConfig { iosize, sink: Box::new(sink) }
    }

    /// QEMU's default size (2 ports), reporting to `sink`.
    pub fn qemu_default(sink: impl ExitSink) -> DebugExitConfig {
        DebugExitConfig::new(QEMU_DEFAULT_IOSIZE, sink)
    }

    /// The usual test-harness size (`iosize=0x04`, to map at
    /// [`CONVENTIONAL_IOBASE`]), reporting to `sink`.
    pub fn conventional(sink: impl ExitSink) -> DebugExitConfig {
        DebugExitConfig::new(CONVENTIONAL_IOSIZE, sink)
    }
}

/// The `isa-debug-exit` device (an actor; see its [`DeviceModel`]
/// implementation).
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

    /// How many exit requests the guest made.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The status of the latest request.
    pub fn last_status(&self) -> Option<i32> {
        self.last_status
    }
}

/// Plugging an `isa-debug-exit`: one region, [`PORTS`] (`iosize` ports,
/// for the I/O space).
impl DeviceModel for DebugExit {
    type Config = DebugExitConfig;
    type Handle = ActorHandle<DebugExit>;

    fn plug(config: DebugExitConfig, ctx: PlugCtx) -> crate::Result<Plugged<ActorHandle<DebugExit>>> {
        if config.iosize == 0 {
            return Err(crate::Error::InvalidConfig { device: "isa-debug-exit", reason: "iosize is 0".into() });
        }
        let dev = DebugExit { sink: config.sink, requests: 0, last_status: None };
        let spawned = Spawned::with_options(&ctx.name, dev, ctx.irqs, &ctx.runtime, ctx.actor);
        let region =
            ctx.topology.new_io_arc(&ctx.name, spawned.ops(0), DebugExit::ops_config(), u128::from(config.iosize))?;
        Ok(Plugged::new(vec![DeviceRegion::io(PORTS, region)], spawned.handle()))
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
