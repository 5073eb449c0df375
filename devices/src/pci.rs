//! A PCI host bridge with configuration mechanism #1, bus 0 only.
//!
//! The guest selects a function and a register by writing CONFIG_ADDRESS
//! (I/O port `0xcf8`, 32 bits: bit 31 enable, bits 23–16 bus, 15–8 devfn,
//! 7–0 register) and then accesses CONFIG_DATA (`0xcfc`–`0xcff`, 1, 2 or 4
//! bytes at the matching offset). The bridge keeps every function's type-0
//! configuration header itself, as QEMU's PCI core does: identification,
//! command, status, BARs, interrupt line and pin. Functions only serve their
//! BAR regions; they never answer configuration cycles.
//!
//! Semantics follow QEMU (`hw/pci/pci.c`, `hw/pci/pci_host.c`):
//!
//! * Absent functions (and every bus but 0) read all-ones and ignore writes;
//!   so does CONFIG_DATA while the enable bit of CONFIG_ADDRESS is clear.
//!   CONFIG_ADDRESS latches only 4-byte writes at `0xcf8` and reads back the
//!   latched value whatever the access.
//! * Writes go through per-byte write masks: command bits 0 (I/O), 1
//!   (memory), 2 (bus master) and 10 (INTx disable), cache line size,
//!   interrupt line, the address bits of implemented BARs (so writing
//!   all-ones reads back the size mask with the type bits), and the
//!   device-specific area `0x40..0x100`. Everything else is read-only.
//! * After a write that touches the command register or a BAR, each BAR is
//!   mapped when its space's enable bit is set and its address is valid (not
//!   0, not wrapping, below 4 GiB for 32-bit BARs: the all-ones sizing
//!   pattern is therefore never mapped), and unmapped otherwise. Memory BARs
//!   go into the PCI memory container, I/O BARs into the I/O space, both at
//!   priority 1. All changes of one write happen in one topology transaction.
//! * Each function has a bus-master address space: a "bus master container"
//!   holding a "bus master" alias of system memory, enabled only while the
//!   command register's bus-master bit is set. DMA while it is clear reads
//!   zeros and writes nothing, like unassigned memory in QEMU.
//! * INTx: the function's interrupt line passes through the bridge, which
//!   reflects its level in status bit 3 and masks it while command bit 10
//!   is set. Routing pins to interrupt controller inputs is the board's
//!   business: it gives [`PciHost::plug_model`] the line to drive.
//! * A slot holds function 0 and, if the board places them
//!   ([`PciPlacement::function`]), functions 1 to 7; a function 0 whose
//!   identity says [`multifunction`](PciConfig::multifunction) sets bit 7
//!   of its header type, which tells enumerators to look at the others. No
//!   capabilities are offered (the capability pointer reads 0).
//!
//! # Remapping outside the bridge's turn
//!
//! A thread that holds a device's turn never waits for the topology (see
//! [`topos_runtime::turns`]), and a thread inside a transaction may be
//! waiting for the bridge (a configuration read). So the bridge's handler
//! does not remap: it records the function's *desired* mappings (BAR
//! addresses and the bus-master enable, from the configuration space) and
//! defers an *apply* ([`DeviceCtx::defer`]) that runs once the thread holds
//! no turn. Each apply runs one transaction which, inside it, compares the
//! latest desired state with the *applied* one and makes the difference;
//! the topology's turn serializes the appliers, so the last one to run
//! applies the latest state. [`PciHostBridge::bar_mapping`] reports the
//! applied state.
//!
//! A guest expects a configuration write to have taken effect when its `out`
//! returns, so CONFIG_DATA is a [non-posted](crate::WritePolicy::NonPosted)
//! region: a write that finds the bridge busy waits until it was handled and
//! its apply is done, instead of being posted. A write from an idle bridge
//! runs on the caller's thread and applies before returning as well.
//! (Inside a transaction of the caller's own, the apply waits for that
//! transaction's commit, as every topology change made in it does.)
//!
//! # Plugging
//!
//! The bridge is a [`DeviceModel`] like any other ([`PciHostBridge`]): its
//! two regions, [`CONFIG_ADDRESS`] and [`CONFIG_DATA`], go where the board
//! maps them (ports `0xcf8` and `0xcfc` on a PC), and its handle is a
//! [`PciHost`]. A function is any [`DeviceModel`] the board plugs through
//! [`PciHost::plug_model`]: the host reserves the slot, gives the model its
//! bus-master space and INTx line, and attaches the model's regions as its
//! BARs.
//!
//! ```
//! use topos_devices::pci::{PciConfig, PciHost, PciHostBridge, PciHostConfig, PciPlacement};
//! use topos_devices::pci::{CONFIG_ADDRESS, CONFIG_ADDRESS_PORT, CONFIG_DATA, CONFIG_DATA_PORT};
//! use topos_devices::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged};
//! use topos_devices::runtime::{OpsConfig, Topology};
//! use topos_devices::{ActorHandle, Device, DeviceCtx, DeviceRuntime, Spawned};
//!
//! /// A function with one 4 KiB register BAR.
//! struct Dummy;
//! impl Device for Dummy {
//!     fn read(&mut self, _: &mut DeviceCtx<'_>, _: usize, _: u64, _: u32) -> u64 { 0x42 }
//!     fn write(&mut self, _: &mut DeviceCtx<'_>, _: usize, _: u64, _: u64, _: u32) {}
//! }
//! impl DeviceModel for Dummy {
//!     type Config = ();
//!     type Handle = ActorHandle<Dummy>;
//!     fn plug(_: (), ctx: PlugCtx) -> topos_devices::Result<Plugged<ActorHandle<Dummy>>> {
//!         let dev = Spawned::new(&ctx.name, Dummy, ctx.irqs, &ctx.runtime);
//!         let bar = ctx.topology.new_io_arc(&ctx.name, dev.ops(0), OpsConfig::default(), 0x1000)?;
//!         Ok(Plugged::new(vec![DeviceRegion::memory("regs", bar)], dev.handle()))
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let topo = Topology::new();
//! let spaces = topo.standard_spaces()?;
//! let rt = DeviceRuntime::new()?;
//! let pci_mem = PciHost::pci_memory(&topo, &spaces.system)?;
//! let config = PciHostConfig { system: spaces.system.clone(), pci_mem, io: spaces.io.clone() };
//! let bridge = PciHostBridge::plug(config, PlugCtx::new(&topo, &rt, "pci-host"))?;
//! bridge.map(CONFIG_ADDRESS, &spaces.io, CONFIG_ADDRESS_PORT)?;
//! bridge.map(CONFIG_DATA, &spaces.io, CONFIG_DATA_PORT)?;
//! let host = bridge.handle;
//!
//! // The board gives the dummy an identity; its BAR comes from its region.
//! let at = PciPlacement::slot(4).with_identity(PciConfig::new(0x1234, 0x0001, 0x00ff));
//! host.plug_model::<Dummy>(at, (), PlugCtx::new(&topo, &rt, "dummy"))?;
//!
//! spaces.io_space.write_u64(0xcf8, 0x8000_0000 | 4 << 11, 4);
//! assert_eq!(spaces.io_space.read_u64(0xcfc, 4).0, 0x0001_1234);
//! # Ok(())
//! # }
//! ```
//!
//! The device keeps a [`BusMaster`], which does not own the address space:
//! the bus-master space reaches system memory, which holds the device's own
//! BARs, so owning it would make the device keep itself alive.

use crate::actor::{ActorHandle, Device, DeviceCtx, Spawned, WritePolicy};
use crate::error::{Error, Result};
use crate::irq::{InterruptSink, IrqLine};
use crate::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged, Space};
use std::sync::{Arc, Mutex, Weak};
use topos_runtime::turns;
use topos_runtime::{AddressSpace, HwAddr, MemTxResult, MemoryRegion, OpsConfig, Topology, WeakRegion, SIZE_MAX};

/// The role of the bridge's CONFIG_ADDRESS region (4 ports, for the I/O
/// space).
pub const CONFIG_ADDRESS: &str = "config-address";
/// The role of the bridge's CONFIG_DATA region (4 ports, for the I/O
/// space).
pub const CONFIG_DATA: &str = "config-data";
/// I/O port of CONFIG_ADDRESS on a PC.
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
/// First I/O port of CONFIG_DATA.
pub const CONFIG_DATA_PORT: u64 = 0xcfc;
/// CONFIG_ADDRESS enable bit.
pub const CONFIG_ENABLE: u32 = 1 << 31;

/// Offset of the vendor ID (16 bits).
pub const PCI_VENDOR_ID: u8 = 0x00;
/// Offset of the device ID (16 bits).
pub const PCI_DEVICE_ID: u8 = 0x02;
/// Offset of the command register (16 bits).
pub const PCI_COMMAND: u8 = 0x04;
/// Offset of the status register (16 bits).
pub const PCI_STATUS: u8 = 0x06;
/// Offset of the revision ID.
pub const PCI_REVISION_ID: u8 = 0x08;
/// Offset of the programming interface byte.
pub const PCI_CLASS_PROG: u8 = 0x09;
/// Offset of the class code word (subclass, then base class).
pub const PCI_CLASS_DEVICE: u8 = 0x0a;
/// Offset of the cache line size.
pub const PCI_CACHE_LINE_SIZE: u8 = 0x0c;
/// Offset of the header type.
pub const PCI_HEADER_TYPE: u8 = 0x0e;
/// Offset of BAR 0; BAR `n` is at `0x10 + 4 * n`.
pub const PCI_BASE_ADDRESS_0: u8 = 0x10;
/// Offset of the subsystem vendor ID.
pub const PCI_SUBSYSTEM_VENDOR_ID: u8 = 0x2c;
/// Offset of the subsystem ID.
pub const PCI_SUBSYSTEM_ID: u8 = 0x2e;
/// Offset of the interrupt line (read-write, for software).
pub const PCI_INTERRUPT_LINE: u8 = 0x3c;
/// Offset of the interrupt pin (read-only: 0 none, 1–4 INTA–INTD).
pub const PCI_INTERRUPT_PIN: u8 = 0x3d;

/// Command bit: respond to I/O space accesses.
pub const PCI_COMMAND_IO: u16 = 0x1;
/// Command bit: respond to memory space accesses.
pub const PCI_COMMAND_MEMORY: u16 = 0x2;
/// Command bit: the function may master the bus (DMA).
pub const PCI_COMMAND_MASTER: u16 = 0x4;
/// Command bit: INTx emulation disabled.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 0x400;
/// Status bit: the function's INTx is asserted.
pub const PCI_STATUS_INTERRUPT: u16 = 0x8;

/// QEMU's default subsystem vendor ID (Red Hat / Qumranet).
pub const DEFAULT_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// QEMU's default subsystem ID.
pub const DEFAULT_SUBSYSTEM_ID: u16 = 0x1100;

/// Number of device slots on the bus.
pub const PCI_SLOT_MAX: u8 = 32;
/// Size of a conventional configuration space.
const CONFIG_SPACE_SIZE: usize = 256;
/// Start of the device-specific area.
const CONFIG_HEADER_SIZE: usize = 0x40;

/// Status bits that are write-1-to-clear (parity, aborts, system error).
const STATUS_W1C: u16 = 0xf900;
/// Command bits the guest may change.
const COMMAND_WMASK: u16 = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;

/// Region numbers of the host bridge actor.
const REGION_CONF_IDX: usize = 0;
const REGION_CONF_DATA: usize = 1;

/// The kind of a base address register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// An I/O space BAR (mapped in the I/O space while command bit 0 is set).
    Io,
    /// A 32-bit memory BAR.
    Memory32 {
        /// Prefetchable (bit 3).
        prefetchable: bool,
    },
    /// A 64-bit memory BAR; it takes this BAR slot and the next.
    Memory64 {
        /// Prefetchable (bit 3).
        prefetchable: bool,
    },
}

impl BarKind {
    /// The read-only type bits in the BAR's low dword.
    pub fn type_bits(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Memory32 { prefetchable } => (prefetchable as u32) << 3,
            BarKind::Memory64 { prefetchable } => 0x4 | (prefetchable as u32) << 3,
        }
    }

    fn is_io(self) -> bool {
        matches!(self, BarKind::Io)
    }
}

/// One implemented BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// BAR number, 0–5 (0–4 for a 64-bit BAR).
    pub index: u8,
    /// Size in bytes: a power of two, at least 16 for memory and 4 for I/O.
    pub size: u64,
    /// What the BAR decodes.
    pub kind: BarKind,
}

/// The read-only identity of a function and its BARs (a type-0 header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciConfig {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Function 0 of a slot with other functions (header type bit 7).
    pub multifunction: bool,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Base class and subclass as one word (QEMU's `class_id`, e.g. `0x00ff`
    /// for "other", `0x0200` for Ethernet).
    pub class: u16,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin: 0 for none, 1–4 for INTA–INTD.
    pub interrupt_pin: u8,
    /// The implemented BARs.
    pub bars: Vec<BarSpec>,
}

impl PciConfig {
    /// A function with QEMU's defaults: revision 0, no interrupt pin, no
    /// BARs, subsystem `1af4:1100`.
    pub fn new(vendor_id: u16, device_id: u16, class: u16) -> PciConfig {
        PciConfig {
            vendor_id,
            device_id,
            multifunction: false,
            revision: 0,
            class,
            prog_if: 0,
            subsystem_vendor_id: DEFAULT_SUBSYSTEM_VENDOR_ID,
            subsystem_id: DEFAULT_SUBSYSTEM_ID,
            interrupt_pin: 0,
            bars: Vec::new(),
        }
    }

    fn validate(&self, regions: &[MemoryRegion]) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidFunction(m));
        if self.interrupt_pin > 4 {
            return bad(format!("interrupt pin {} (must be 0-4)", self.interrupt_pin));
        }
        if regions.len() != self.bars.len() {
            return bad(format!("{} BARs but {} regions", self.bars.len(), regions.len()));
        }
        let mut used = [false; 6];
        for (bar, region) in self.bars.iter().zip(regions) {
            let (slots, min, max) = match bar.kind {
                BarKind::Io => (1, 4, 1 << 31),
                BarKind::Memory32 { .. } => (1, 16, 1 << 31),
                BarKind::Memory64 { .. } => (2, 16, 1 << 63),
            };
            let i = bar.index as usize;
            if i + slots > 6 {
                return bad(format!("BAR {i} does not fit"));
            }
            for u in &mut used[i..i + slots] {
                if *u {
                    return bad(format!("BAR {i} overlaps another BAR"));
                }
                *u = true;
            }
            if !bar.size.is_power_of_two() || bar.size < min || bar.size > max {
                return bad(format!("BAR {i} size {:#x} (power of two in {min:#x}..={max:#x})", bar.size));
            }
            if region.size() != bar.size as u128 {
                return bad(format!(
                    "BAR {i}: region `{}` is {:#x} bytes, not {:#x}",
                    region.name(),
                    region.size(),
                    bar.size
                ));
            }
            if region.container().is_some() {
                return bad(format!("BAR {i}: region `{}` is already mapped", region.name()));
            }
        }
        Ok(())
    }
}

/// A function to attach: its header and one region per BAR (in the order of
/// [`PciConfig::bars`]).
#[derive(Debug)]
struct PciFunction {
    /// Identity and BARs.
    config: PciConfig,
    /// The region each BAR maps, same order as `config.bars`.
    bar_regions: Vec<MemoryRegion>,
}

/// A function's path to memory as a bus master (its DMA address space).
///
/// It does not own the address space (see the [module](self) docs): once
/// the function is detached or the bridge is gone, reads return zeros and
/// writes are dropped, both with [`MemTxResult::DecodeError`].
#[derive(Debug, Clone, Default)]
pub struct BusMaster {
    space: Weak<AddressSpace>,
}

impl BusMaster {
    /// A bus master connected to nothing.
    pub fn detached() -> BusMaster {
        BusMaster::default()
    }

    /// The bus-master address space while the function is plugged in. Do not
    /// store it in the device (that would keep the device alive).
    pub fn address_space(&self) -> Option<AddressSpace> {
        self.space.upgrade().map(|a| (*a).clone())
    }

    /// DMA read (QEMU's `pci_dma_read`).
    pub fn read(&self, addr: HwAddr, buf: &mut [u8]) -> MemTxResult {
        match self.space.upgrade() {
            Some(a) => a.read(addr, buf),
            None => {
                buf.fill(0);
                MemTxResult::DecodeError
            }
        }
    }

    /// DMA write (QEMU's `pci_dma_write`).
    pub fn write(&self, addr: HwAddr, buf: &[u8]) -> MemTxResult {
        match self.space.upgrade() {
            Some(a) => a.write(addr, buf),
            None => MemTxResult::DecodeError,
        }
    }
}

/// Routes a function's INTx to the board's line: the level shows in status
/// bit 3, and command bit 10 masks it.
struct IntxRouter {
    /// (level asserted by the device, INTx disabled by the guest).
    state: Mutex<(bool, bool)>,
    out: Option<IrqLine>,
}

impl IntxRouter {
    fn update(&self, f: impl FnOnce(&mut (bool, bool))) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        if let Some(out) = &self.out {
            out.set(s.0 && !s.1);
        }
    }

    fn level(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl InterruptSink for IntxRouter {
    fn set_level(&self, _line: u32, level: bool) {
        self.update(|s| s.0 = level);
    }
}

/// A reserved slot: the bus-master address space and the INTx line of a
/// function that is being built. Attached, or dropped, which releases the
/// address space.
struct PciPlug {
    slot: u8,
    /// Slot and function: the index of the function's configuration space.
    devfn: usize,
    name: String,
    topo: Topology,
    bus_master: Option<Arc<AddressSpace>>,
    alias: MemoryRegion,
    router: Arc<IntxRouter>,
}

impl std::fmt::Debug for PciPlug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciPlug").field("slot", &self.slot).field("name", &self.name).finish_non_exhaustive()
    }
}

impl PciPlug {
    /// The function's bus-master path, for the device model.
    fn bus_master(&self) -> BusMaster {
        BusMaster { space: self.bus_master.as_ref().map(Arc::downgrade).unwrap_or_default() }
    }

    /// The interrupt line to give the device (its INTx pin): routed through
    /// the bridge to the board's line.
    fn irq_line(&self) -> IrqLine {
        let n = self.router.out.as_ref().map_or(0, IrqLine::number);
        IrqLine::new(self.router.clone(), n)
    }
}

impl Drop for PciPlug {
    fn drop(&mut self) {
        if let Some(bm) = self.bus_master.take() {
            let _ = self.topo.address_space_destroy(&bm);
        }
    }
}

/// Where a function's BARs are mapped (`None`: unmapped; QEMU's
/// `io_regions[i].addr`) and whether it masters the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Targets {
    bars: Vec<Option<u64>>,
    master: bool,
}

/// The mapping state of a function, shared between the bridge's handler
/// (which sets the desired state) and the appliers it defers (which make the
/// topology match). The lock is only held for short, non-blocking sections.
#[derive(Debug)]
struct MapState {
    desired: Targets,
    applied: Targets,
    /// The function was detached: appliers leave the topology alone.
    removed: bool,
}

/// What an applier needs to change a function's mappings, without owning
/// the function's bus-master space or the topology (either would keep the
/// bridge alive through its own regions).
struct Mappings {
    name: String,
    /// Each BAR and the region it maps.
    bars: Vec<(BarSpec, MemoryRegion)>,
    /// The "bus master" alias, enabled while the function masters the bus.
    alias: MemoryRegion,
    space: Weak<AddressSpace>,
    pci_mem: WeakRegion,
    io: WeakRegion,
    state: Mutex<MapState>,
}

impl Mappings {
    fn lock(&self) -> std::sync::MutexGuard<'_, MapState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the desired state; true if it changed (an apply is due).
    fn desire(&self, want: Targets) -> bool {
        let mut s = self.lock();
        if s.desired == want {
            return false;
        }
        s.desired = want;
        true
    }

    /// Makes the topology match the latest desired state, in one
    /// transaction. Runs with no turn held (it waits for the topology).
    fn apply(&self) {
        let Some(space) = self.space.upgrade() else { return };
        let topo = match space.topology() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(function = %self.name, error = %e, "PCI: cannot update mappings");
                return;
            }
        };
        let r = topo.transaction(|| {
            // Inside the transaction: appliers are serialized, and each one
            // reads the state its predecessors left.
            let (want, mut now) = {
                let s = self.lock();
                if s.removed {
                    return;
                }
                (s.desired.clone(), s.applied.clone())
            };
            let (mem, io) = (self.pci_mem.upgrade(), self.io.upgrade());
            for (i, (spec, region)) in self.bars.iter().enumerate() {
                if want.bars[i] == now.bars[i] {
                    continue;
                }
                let Some(container) = (if spec.kind.is_io() { io.as_ref() } else { mem.as_ref() }) else {
                    now.bars[i] = None;
                    continue;
                };
                if now.bars[i].take().is_some() {
                    if let Err(e) = container.del_subregion(region) {
                        tracing::warn!(function = %self.name, bar = spec.index, error = %e, "PCI: unmapping a BAR failed");
                    }
                }
                if let Some(addr) = want.bars[i] {
                    match container.add_subregion_overlap(addr, region, 1) {
                        Ok(()) => now.bars[i] = Some(addr),
                        Err(e) => {
                            tracing::warn!(function = %self.name, bar = spec.index, error = %e, "PCI: mapping a BAR failed")
                        }
                    }
                }
                tracing::debug!(function = %self.name, bar = spec.index, addr = ?now.bars[i], "PCI: BAR mapping");
            }
            if want.master != now.master {
                match self.alias.set_enabled(want.master) {
                    Ok(()) => now.master = want.master,
                    Err(e) => tracing::warn!(function = %self.name, error = %e, "PCI: bus master enable failed"),
                }
            }
            self.lock().applied = now;
        });
        if let Err(e) = r {
            tracing::warn!(function = %self.name, error = %e, "PCI: mapping transaction failed");
        }
    }

    /// Unmaps everything, disables bus mastering and destroys `space`, in
    /// one transaction; appliers that run later do nothing.
    fn remove(&self, space: &AddressSpace) -> std::result::Result<(), topos_runtime::Error> {
        let topo = space.topology()?;
        topo.transaction(|| {
            let applied = {
                let mut s = self.lock();
                s.removed = true;
                s.applied.clone()
            };
            let (mem, io) = (self.pci_mem.upgrade(), self.io.upgrade());
            for ((spec, region), at) in self.bars.iter().zip(&applied.bars) {
                let container = if spec.kind.is_io() { io.as_ref() } else { mem.as_ref() };
                if let (Some(_), Some(c)) = (at, container) {
                    let _ = c.del_subregion(region);
                }
            }
            let _ = self.alias.set_enabled(false);
            let _ = topo.address_space_destroy(space);
            let mut s = self.lock();
            s.applied = Targets { bars: vec![None; self.bars.len()], master: false };
        })
    }
}

/// The bridge's state for one function.
struct Function {
    config: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    w1cmask: [u8; CONFIG_SPACE_SIZE],
    router: Arc<IntxRouter>,
    mappings: Arc<Mappings>,
    bus_master: Arc<AddressSpace>,
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

fn ranges_overlap(a: usize, alen: usize, b: usize, blen: usize) -> bool {
    a < b + blen && b < a + alen
}

impl Function {
    fn new(plug: &mut PciPlug, f: PciFunction, pci_mem: WeakRegion, io: WeakRegion) -> Function {
        let c = &f.config;
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        let mut wmask = [0u8; CONFIG_SPACE_SIZE];
        let mut w1cmask = [0u8; CONFIG_SPACE_SIZE];
        put(&mut config, PCI_VENDOR_ID as usize, &c.vendor_id.to_le_bytes());
        put(&mut config, PCI_DEVICE_ID as usize, &c.device_id.to_le_bytes());
        config[PCI_REVISION_ID as usize] = c.revision;
        config[PCI_CLASS_PROG as usize] = c.prog_if;
        put(&mut config, PCI_CLASS_DEVICE as usize, &c.class.to_le_bytes());
        put(&mut config, PCI_SUBSYSTEM_VENDOR_ID as usize, &c.subsystem_vendor_id.to_le_bytes());
        put(&mut config, PCI_SUBSYSTEM_ID as usize, &c.subsystem_id.to_le_bytes());
        config[PCI_INTERRUPT_PIN as usize] = c.interrupt_pin;
        if c.multifunction {
            config[PCI_HEADER_TYPE as usize] = 0x80;
        }
        put(&mut wmask, PCI_COMMAND as usize, &COMMAND_WMASK.to_le_bytes());
        put(&mut w1cmask, PCI_STATUS as usize, &STATUS_W1C.to_le_bytes());
        wmask[PCI_CACHE_LINE_SIZE as usize] = 0xff;
        wmask[PCI_INTERRUPT_LINE as usize] = 0xff;
        wmask[CONFIG_HEADER_SIZE..].fill(0xff);
        let mut bars = Vec::new();
        for (spec, region) in c.bars.iter().zip(f.bar_regions) {
            let off = PCI_BASE_ADDRESS_0 as usize + 4 * spec.index as usize;
            put(&mut config, off, &spec.kind.type_bits().to_le_bytes());
            let mask = !(spec.size - 1);
            if matches!(spec.kind, BarKind::Memory64 { .. }) {
                put(&mut wmask, off, &mask.to_le_bytes());
            } else {
                put(&mut wmask, off, &(mask as u32).to_le_bytes());
            }
            bars.push((*spec, region));
        }
        let bus_master = plug.bus_master.take().expect("a plug is attached once");
        let none = Targets { bars: vec![None; bars.len()], master: false };
        let mappings = Mappings {
            name: plug.name.clone(),
            bars,
            alias: plug.alias.clone(),
            space: Arc::downgrade(&bus_master),
            pci_mem,
            io,
            state: Mutex::new(MapState { desired: none.clone(), applied: none, removed: false }),
        };
        Function { config, wmask, w1cmask, router: plug.router.clone(), mappings: Arc::new(mappings), bus_master }
    }

    fn word(&self, off: u8) -> u16 {
        u16::from_le_bytes([self.config[off as usize], self.config[off as usize + 1]])
    }

    fn byte(&self, off: usize) -> u8 {
        let b = self.config[off];
        if off == PCI_STATUS as usize && self.router.level() {
            b | PCI_STATUS_INTERRUPT as u8
        } else {
            b
        }
    }

    /// `pci_default_read_config`: little-endian bytes from `off`, cut at the
    /// end of the space.
    fn read(&self, off: usize, len: usize) -> u32 {
        let n = len.min(4).min(CONFIG_SPACE_SIZE - off);
        (0..n).fold(0u32, |v, i| v | u32::from(self.byte(off + i)) << (8 * i))
    }

    /// `pci_default_write_config`.
    fn write(&mut self, ctx: &DeviceCtx<'_>, off: usize, value: u32, len: usize) {
        let n = len.min(4).min(CONFIG_SPACE_SIZE - off);
        for i in 0..n {
            let a = off + i;
            let b = (value >> (8 * i)) as u8;
            let (wm, w1c) = (self.wmask[a], self.w1cmask[a]);
            self.config[a] = (self.config[a] & !wm) | (b & wm);
            self.config[a] &= !(b & w1c);
        }
        if ranges_overlap(off, n, PCI_COMMAND as usize, 2) || ranges_overlap(off, n, PCI_BASE_ADDRESS_0 as usize, 24) {
            self.update_mappings(ctx);
        }
    }

    /// `pci_bar_address`: where BAR `bar` decodes now, or `None`.
    fn bar_address(&self, bar: &BarSpec) -> Option<u64> {
        let cmd = self.word(PCI_COMMAND);
        let off = PCI_BASE_ADDRESS_0 as usize + 4 * bar.index as usize;
        let low = u32::from_le_bytes(self.config[off..off + 4].try_into().unwrap_or_default()) as u64;
        let size = bar.size;
        let (enable, raw) = match bar.kind {
            BarKind::Io => (PCI_COMMAND_IO, low),
            BarKind::Memory32 { .. } => (PCI_COMMAND_MEMORY, low),
            BarKind::Memory64 { .. } => {
                let high = u32::from_le_bytes(self.config[off + 4..off + 8].try_into().unwrap_or_default()) as u64;
                (PCI_COMMAND_MEMORY, high << 32 | low)
            }
        };
        if cmd & enable == 0 {
            return None;
        }
        let addr = raw & !(size - 1);
        let last = addr.wrapping_add(size - 1);
        if last <= addr || addr == 0 || last == u64::MAX {
            return None;
        }
        // 32-bit BARs (and I/O BARs) that reach the top of 4 GiB are taken
        // for unprogrammed: the sizing pattern lands there.
        if !matches!(bar.kind, BarKind::Memory64 { .. }) && last >= u32::MAX as u64 {
            return None;
        }
        Some(addr)
    }

    /// `pci_update_mappings` plus the INTx and bus-master side effects of a
    /// command write: INTx masking at once, the mappings through a deferred
    /// apply (see the [module](self) docs).
    fn update_mappings(&mut self, ctx: &DeviceCtx<'_>) {
        let cmd = self.word(PCI_COMMAND);
        self.router.update(|s| s.1 = cmd & PCI_COMMAND_INTX_DISABLE != 0);
        let bars = self.mappings.bars.iter().map(|(spec, _)| self.bar_address(spec)).collect();
        if self.mappings.desire(Targets { bars, master: cmd & PCI_COMMAND_MASTER != 0 }) {
            let m = self.mappings.clone();
            ctx.defer(move || m.apply());
        }
    }
}

/// The host bridge device: CONFIG_ADDRESS (region 0) and CONFIG_DATA
/// (region 1), and every function's configuration space (see its
/// [`DeviceModel`] implementation).
pub struct PciHostBridge {
    config_reg: u32,
    functions: Vec<Option<Function>>,
}

impl PciHostBridge {
    fn function(&self, addr: u32) -> Option<&Function> {
        if (addr >> 16) & 0xff != 0 {
            return None;
        }
        self.functions.get(((addr >> 8) & 0xff) as usize)?.as_ref()
    }

    /// Whether `slot` (function 0) is occupied.
    pub fn occupied(&self, slot: u8) -> bool {
        self.function(u32::from(slot) << 11).is_some()
    }

    /// The address where BAR `index` of the function in `slot` is mapped
    /// in the topology (inspection for tests and monitors). A configuration
    /// write that moved the BAR shows here once its apply has run.
    pub fn bar_mapping(&self, slot: u8, index: u8) -> Option<u64> {
        let m = &self.function(u32::from(slot) << 11)?.mappings;
        let i = m.bars.iter().position(|(spec, _)| spec.index == index)?;
        m.lock().applied.bars[i]
    }
}

impl Device for PciHostBridge {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, region: usize, addr: HwAddr, size: u32) -> u64 {
        match region {
            // Whatever the offset and size, as QEMU's `pci_host_config_read`.
            REGION_CONF_IDX => u64::from(self.config_reg),
            REGION_CONF_DATA => {
                if self.config_reg & CONFIG_ENABLE == 0 {
                    return 0xffff_ffff;
                }
                let a = self.config_reg | (addr as u32 & 3);
                match self.function(a) {
                    Some(f) => u64::from(f.read((a & 0xff) as usize, size as usize)),
                    None => 0xffff_ffff,
                }
            }
            _ => u64::MAX,
        }
    }

    fn write(&mut self, ctx: &mut DeviceCtx<'_>, region: usize, addr: HwAddr, value: u64, size: u32) {
        match region {
            REGION_CONF_IDX if addr == 0 && size == 4 => self.config_reg = value as u32,
            REGION_CONF_DATA if self.config_reg & CONFIG_ENABLE != 0 => {
                let a = self.config_reg | (addr as u32 & 3);
                if (a >> 16) & 0xff != 0 {
                    return;
                }
                if let Some(Some(f)) = self.functions.get_mut(((a >> 8) & 0xff) as usize) {
                    f.write(ctx, (a & 0xff) as usize, value as u32, size as usize);
                }
            }
            _ => {}
        }
    }
}

/// The board's handle on the PCI host bridge: plugs functions in and out.
pub struct PciHost {
    topo: Topology,
    system: MemoryRegion,
    pci_mem: WeakRegion,
    io: WeakRegion,
    bridge: ActorHandle<PciHostBridge>,
}

impl std::fmt::Debug for PciHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciHost").field("bridge", &self.bridge).finish_non_exhaustive()
    }
}

/// Where a board's PCI host puts its functions' BARs, and what their bus
/// masters see.
#[derive(Debug, Clone)]
pub struct PciHostConfig {
    /// What bus masters reach (system memory): each function's bus-master
    /// space is an alias of it.
    pub system: MemoryRegion,
    /// Where memory BARs are mapped: a container the board placed in
    /// system memory (see [`PciHost::pci_memory`]).
    pub pci_mem: MemoryRegion,
    /// Where I/O BARs are mapped (the I/O space's root).
    pub io: MemoryRegion,
}

/// Plugging the host bridge: two regions, [`CONFIG_ADDRESS`] and
/// [`CONFIG_DATA`] (4 ports each, for the I/O space; CONFIG_DATA is
/// non-posted, see the [module](self) documentation); the handle is the
/// board's [`PciHost`].
impl DeviceModel for PciHostBridge {
    type Config = PciHostConfig;
    type Handle = PciHost;

    fn plug(config: PciHostConfig, ctx: PlugCtx) -> Result<Plugged<PciHost>> {
        let dev = PciHostBridge { config_reg: 0, functions: (0..256).map(|_| None).collect() };
        let spawned = Spawned::with_options(&ctx.name, dev, ctx.irqs, &ctx.runtime, ctx.actor);
        let topo = &ctx.topology;
        let idx = topo.new_io_arc("pci-conf-idx", spawned.ops(REGION_CONF_IDX), OpsConfig::default(), 4)?;
        // Non-posted: a configuration write has taken effect when it returns.
        let data_ops = spawned.ops_with(REGION_CONF_DATA, WritePolicy::NonPosted);
        let data = topo.new_io_arc("pci-conf-data", data_ops, OpsConfig::default(), 4)?;
        let host = PciHost {
            topo: topo.clone(),
            system: config.system,
            pci_mem: config.pci_mem.downgrade(),
            io: config.io.downgrade(),
            bridge: spawned.handle(),
        };
        Ok(Plugged::new(vec![DeviceRegion::io(CONFIG_ADDRESS, idx), DeviceRegion::io(CONFIG_DATA, data)], host))
    }
}

/// Where and as what a board puts a device on the PCI bus (see
/// [`PciHost::plug_model`]).
#[derive(Debug, Clone)]
pub struct PciPlacement {
    /// The slot, 0 to 31.
    pub slot: u8,
    /// The function in the slot, 0 to 7.
    pub function: u8,
    /// The board's line for the slot's interrupt pin, if it wires one.
    pub intx: Option<IrqLine>,
    /// The function's header; `None` takes the model's own. Its BARs, if it
    /// lists none, are made from the model's regions.
    pub identity: Option<PciConfig>,
}

impl PciPlacement {
    /// Slot `slot`, no interrupt wired, the model's own identity.
    pub fn slot(slot: u8) -> PciPlacement {
        PciPlacement { slot, function: 0, intx: None, identity: None }
    }

    /// Function `function` (0 to 7) of slot `slot`, no interrupt wired,
    /// the model's own identity.
    pub fn function(slot: u8, function: u8) -> PciPlacement {
        PciPlacement { slot, function, intx: None, identity: None }
    }

    /// Wires the function's INTx to `line`.
    pub fn with_intx(mut self, line: IrqLine) -> PciPlacement {
        self.intx = Some(line);
        self
    }

    /// Gives the function `identity` instead of the model's own.
    pub fn with_identity(mut self, identity: PciConfig) -> PciPlacement {
        self.identity = Some(identity);
        self
    }
}

/// BARs 0, 1, ... for `regions`, in order: I/O regions as I/O BARs, memory
/// as 32-bit memory BARs, or 64-bit ones (two slots) beyond 2 GiB.
fn bars_for(regions: &[DeviceRegion]) -> Vec<BarSpec> {
    let mut index = 0u8;
    regions
        .iter()
        .map(|r| {
            let size = r.region.size().min(u128::from(u64::MAX)) as u64;
            let kind = match r.space {
                Space::Io => BarKind::Io,
                Space::Memory if size > 1 << 31 => BarKind::Memory64 { prefetchable: r.prefetchable },
                Space::Memory => BarKind::Memory32 { prefetchable: r.prefetchable },
            };
            let bar = BarSpec { index, size, kind };
            index = index.saturating_add(if matches!(kind, BarKind::Memory64 { .. }) { 2 } else { 1 });
            bar
        })
        .collect()
}

impl PciHost {
    /// Creates QEMU's `pci` container (2^64 bytes) in `system` at address 0,
    /// priority -1: PCI memory shows wherever nothing else is mapped.
    pub fn pci_memory(topo: &Topology, system: &MemoryRegion) -> Result<MemoryRegion> {
        let pci = topo.new_container("pci", SIZE_MAX)?;
        system.add_subregion_overlap(0, &pci, -1)?;
        Ok(pci)
    }

    /// The topology the bridge lives in.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// The PCI memory container, if it still exists.
    pub fn pci_mem(&self) -> Option<MemoryRegion> {
        self.pci_mem.upgrade()
    }

    /// The bridge actor (inspection: [`ActorHandle::is_failed`],
    /// [`PciHostBridge::bar_mapping`]).
    pub fn bridge(&self) -> &ActorHandle<PciHostBridge> {
        &self.bridge
    }

    /// The bus-master path of the function in `slot` (inspection: what its
    /// DMA reaches).
    pub fn bus_master(&self, slot: u8) -> Result<BusMaster> {
        if slot >= PCI_SLOT_MAX {
            return Err(Error::NoSuchSlot(slot));
        }
        let space = self
            .bridge
            .with(move |b, _| b.functions[usize::from(slot) << 3].as_ref().map(|f| Arc::downgrade(&f.bus_master)))?;
        space.map(|space| BusMaster { space }).ok_or(Error::SlotEmpty(slot))
    }

    /// Plugs a device of model `M` into the bus as `at` says: reserves the
    /// slot, makes the device with the slot's bus-master space and INTx
    /// line (they replace those of `ctx`), and attaches it with its regions
    /// as BARs. The function starts with its command register clear: nothing
    /// mapped, no DMA. Returns the device's handle.
    pub fn plug_model<M: DeviceModel>(&self, at: PciPlacement, config: M::Config, ctx: PlugCtx) -> Result<M::Handle> {
        let plug = self.plug(at.slot, at.function, &ctx.name, at.intx)?;
        let mut ctx = ctx.with_bus_master(plug.bus_master());
        ctx.irqs = vec![plug.irq_line()];
        let plugged = M::plug(config, ctx)?;
        let Some(mut identity) = at.identity.or(plugged.pci) else {
            return Err(Error::InvalidFunction("the model has no PCI identity and the board gave none".into()));
        };
        if identity.bars.is_empty() {
            identity.bars = bars_for(&plugged.regions);
        }
        let bar_regions = plugged.regions.into_iter().map(|r| r.region).collect();
        self.attach(plug, PciFunction { config: identity, bar_regions })?;
        Ok(plugged.handle)
    }

    /// Reserves `slot` for a function called `name`: creates its bus-master
    /// address space (disabled until the guest sets the bus-master bit) and
    /// its INTx path to `intx` (the board's line for the slot's pin, if it
    /// wires one).
    fn plug(&self, slot: u8, function: u8, name: &str, intx: Option<IrqLine>) -> Result<PciPlug> {
        if slot >= PCI_SLOT_MAX || function >= 8 {
            return Err(Error::NoSuchSlot(slot));
        }
        let devfn = usize::from(slot) << 3 | usize::from(function);
        if self.bridge.with(move |b, _| b.functions[devfn].is_some())? {
            return Err(Error::SlotInUse(slot));
        }
        let container = self.topo.new_container("bus master container", SIZE_MAX)?;
        let alias = self.topo.new_alias("bus master", &self.system, 0, self.system.size())?;
        let bm = self.topo.transaction(|| -> Result<AddressSpace> {
            alias.set_enabled(false)?;
            container.add_subregion(0, &alias)?;
            Ok(self.topo.address_space_init(&container, name)?)
        })??;
        Ok(PciPlug {
            slot,
            devfn,
            name: name.to_string(),
            topo: self.topo.clone(),
            bus_master: Some(Arc::new(bm)),
            alias,
            router: Arc::new(IntxRouter { state: Mutex::new((false, false)), out: intx }),
        })
    }

    /// Publishes the function reserved by `plug` with its BAR regions.
    fn attach(&self, mut plug: PciPlug, function: PciFunction) -> Result<()> {
        function.config.validate(&function.bar_regions)?;
        let (slot, devfn) = (plug.slot, plug.devfn);
        let f = Function::new(&mut plug, function, self.pci_mem.clone(), self.io.clone());
        let refused = self.bridge.with(move |b, _| {
            let entry = &mut b.functions[devfn];
            if entry.is_some() {
                return Some(f);
            }
            *entry = Some(f);
            None
        })?;
        if let Some(f) = refused {
            plug.bus_master = Some(f.bus_master);
            return Err(Error::SlotInUse(slot));
        }
        Ok(())
    }

    /// Unplugs the function in `slot`: takes it off the bus (configuration
    /// cycles no longer reach it), then unmaps its BARs and destroys its
    /// bus-master address space in one transaction, with the bridge free;
    /// the device stops once nothing else refers to its regions. It waits
    /// for the topology, so a caller holding a device turn gets
    /// [`topos_runtime::Error::InsideDeviceTurn`] and nothing changes.
    pub fn detach(&self, slot: u8) -> Result<()> {
        if slot >= PCI_SLOT_MAX {
            return Err(Error::NoSuchSlot(slot));
        }
        if turns::holds_device_turn() {
            return Err(topos_runtime::Error::InsideDeviceTurn.into());
        }
        let f = self.bridge.with(move |b, _| b.functions[usize::from(slot) << 3].take())?;
        let f = f.ok_or(Error::SlotEmpty(slot))?;
        f.router.update(|s| s.1 = true);
        f.mappings.remove(&f.bus_master)?;
        Ok(())
    }
}
