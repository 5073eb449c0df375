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
//! * Each function has a bus-master address space: a "bus master container"
//!   holding a "bus master" alias of system memory, enabled only while the
//!   command register's bus-master bit is set. DMA while it is clear reads
//!   zeros and writes nothing, like unassigned memory in QEMU.
//! * INTx: the function's interrupt line passes through the bridge, which
//!   reflects its level in status bit 3 and masks it while command bit 10
//!   is set. Routing pins to interrupt controller inputs is the board's
//!   business: it hands [`PciHost::plug`] the line to drive.
//! * Only function 0 of each slot is populated (single-function devices),
//!   and no capabilities are offered (the capability pointer reads 0).
//!
//! # Plugging a function in
//!
//! A device model needs its bus-master space and interrupt line when it is
//! spawned, and the bridge needs the device's BAR regions, which exist only
//! once it is spawned. So plugging is two steps:
//!
//! ```
//! use topos_devices::pci::{BarKind, BarSpec, PciConfig, PciFunction, PciHost};
//! use topos_devices::{Device, DeviceCtx, DeviceRuntime, Spawned};
//! use topos_devices::runtime::{OpsConfig, Topology};
//!
//! struct Dummy;
//! impl Device for Dummy {
//!     fn read(&mut self, _: &mut DeviceCtx<'_>, _: usize, _: u64, _: u32) -> u64 { 0x42 }
//!     fn write(&mut self, _: &mut DeviceCtx<'_>, _: usize, _: u64, _: u64, _: u32) {}
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let topo = Topology::new();
//! let spaces = topo.standard_spaces()?;
//! let rt = DeviceRuntime::new()?;
//! let pci_mem = PciHost::pci_memory(&topo, &spaces.system)?;
//! let host = PciHost::spawn(&topo, &spaces, &pci_mem, &rt)?;
//!
//! // 1. Reserve slot 4: the bus-master space and the INTx line exist now.
//! let plug = host.plug(4, "dummy", None)?;
//! let dev = Spawned::new("dummy", Dummy, vec![plug.irq_line()], &rt);
//! let bar = topo.new_io_arc("dummy-mmio", dev.ops(0), OpsConfig::default(), 0x1000)?;
//! // 2. Publish the function with its BAR regions.
//! let mut config = PciConfig::new(0x1234, 0x0001, 0x00ff);
//! config.bars.push(BarSpec { index: 0, size: 0x1000, kind: BarKind::Memory32 { prefetchable: false } });
//! host.attach(plug, PciFunction { config, bar_regions: vec![bar] })?;
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

use crate::actor::{ActorError, ActorHandle, Device, DeviceCtx, Spawned, WritePolicy};
use crate::irq::{InterruptSink, IrqLine};
use crate::wakeups::DeviceRuntime;
use std::sync::{Arc, Mutex, Weak};
use topos_runtime::turns;
use topos_runtime::{
    AddressSpace, HwAddr, MemTxResult, MemoryRegion, OpsConfig, StandardSpaces, Topology, WeakRegion, SIZE_MAX,
};

/// I/O port of CONFIG_ADDRESS.
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

/// Errors of plugging functions into the bridge (the guest never causes
/// one).
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// The slot number is not below 32.
    #[error("slot {0} does not exist (bus 0 has slots 0-31)")]
    NoSuchSlot(u8),
    /// A function is already plugged into the slot.
    #[error("slot {0} is in use")]
    SlotInUse(u8),
    /// No function is plugged into the slot.
    #[error("slot {0} is empty")]
    SlotEmpty(u8),
    /// The function's description is inconsistent.
    #[error("invalid PCI function: {0}")]
    InvalidFunction(String),
    /// The memory API refused an operation.
    #[error(transparent)]
    Memory(#[from] topos_runtime::Error),
    /// The bridge actor is gone or failed.
    #[error(transparent)]
    Actor(#[from] ActorError),
}

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
            revision: 0,
            class,
            prog_if: 0,
            subsystem_vendor_id: DEFAULT_SUBSYSTEM_VENDOR_ID,
            subsystem_id: DEFAULT_SUBSYSTEM_ID,
            interrupt_pin: 0,
            bars: Vec::new(),
        }
    }

    fn validate(&self, regions: &[MemoryRegion]) -> Result<(), PciError> {
        let bad = |m: String| Err(PciError::InvalidFunction(m));
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
pub struct PciFunction {
    /// Identity and BARs.
    pub config: PciConfig,
    /// The region each BAR maps, same order as `config.bars`.
    pub bar_regions: Vec<MemoryRegion>,
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
/// function that is being built. Pass it to [`PciHost::attach`]; dropping it
/// instead releases the address space.
pub struct PciPlug {
    slot: u8,
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
    /// The slot.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// The function's bus-master path, for the device model.
    pub fn bus_master(&self) -> BusMaster {
        BusMaster { space: self.bus_master.as_ref().map(Arc::downgrade).unwrap_or_default() }
    }

    /// The interrupt line to give the device (its INTx pin): routed through
    /// the bridge to the line given to [`PciHost::plug`].
    pub fn irq_line(&self) -> IrqLine {
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
    fn remove(&self, space: &AddressSpace) -> Result<(), topos_runtime::Error> {
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
/// (region 1), and every function's configuration space. Spawned by
/// [`PciHost::spawn`].
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
    ports: [MemoryRegion; 2],
}

impl std::fmt::Debug for PciHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciHost").field("ports", &self.ports).finish_non_exhaustive()
    }
}

impl PciHost {
    /// Creates QEMU's `pci` container (2^64 bytes) in `system` at address 0,
    /// priority -1: PCI memory shows wherever nothing else is mapped.
    pub fn pci_memory(topo: &Topology, system: &MemoryRegion) -> Result<MemoryRegion, PciError> {
        let pci = topo.new_container("pci", SIZE_MAX)?;
        system.add_subregion_overlap(0, &pci, -1)?;
        Ok(pci)
    }

    /// Spawns the bridge and maps CONFIG_ADDRESS and CONFIG_DATA in the I/O
    /// space. Memory BARs will be mapped in `pci_mem` (a container the board
    /// placed in system memory), I/O BARs in `spaces.io`; bus masters see
    /// `spaces.system`.
    pub fn spawn(
        topo: &Topology,
        spaces: &StandardSpaces,
        pci_mem: &MemoryRegion,
        runtime: &DeviceRuntime,
    ) -> Result<PciHost, PciError> {
        let dev = PciHostBridge { config_reg: 0, functions: (0..256).map(|_| None).collect() };
        let spawned = Spawned::new("pci-host", dev, Vec::new(), runtime);
        let idx = topo.new_io_arc("pci-conf-idx", spawned.ops(REGION_CONF_IDX), OpsConfig::default(), 4)?;
        // Non-posted: a configuration write has taken effect when it returns.
        let data_ops = spawned.ops_with(REGION_CONF_DATA, WritePolicy::NonPosted);
        let data = topo.new_io_arc("pci-conf-data", data_ops, OpsConfig::default(), 4)?;
        topo.transaction(|| -> Result<(), PciError> {
            spaces.io.add_subregion(CONFIG_ADDRESS_PORT, &idx)?;
            spaces.io.add_subregion(CONFIG_DATA_PORT, &data)?;
            Ok(())
        })??;
        Ok(PciHost {
            topo: topo.clone(),
            system: spaces.system.clone(),
            pci_mem: pci_mem.downgrade(),
            io: spaces.io.downgrade(),
            bridge: spawned.handle(),
            ports: [idx, data],
        })
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

    /// Reserves `slot` for a function called `name`: creates its bus-master
    /// address space (disabled until the guest sets the bus-master bit) and
    /// its INTx path to `intx` (the board's line for the slot's pin, if it
    /// wires one).
    pub fn plug(&self, slot: u8, name: &str, intx: Option<IrqLine>) -> Result<PciPlug, PciError> {
        if slot >= PCI_SLOT_MAX {
            return Err(PciError::NoSuchSlot(slot));
        }
        if self.bridge.with(move |b, _| b.occupied(slot))? {
            return Err(PciError::SlotInUse(slot));
        }
        let container = self.topo.new_container("bus master container", SIZE_MAX)?;
        let alias = self.topo.new_alias("bus master", &self.system, 0, self.system.size())?;
        let bm = self.topo.transaction(|| -> Result<AddressSpace, PciError> {
            alias.set_enabled(false)?;
            container.add_subregion(0, &alias)?;
            Ok(self.topo.address_space_init(&container, name)?)
        })??;
        Ok(PciPlug {
            slot,
            name: name.to_string(),
            topo: self.topo.clone(),
            bus_master: Some(Arc::new(bm)),
            alias,
            router: Arc::new(IntxRouter { state: Mutex::new((false, false)), out: intx }),
        })
    }

    /// Publishes the function reserved by `plug` with its BAR regions. It
    /// starts with the command register clear: nothing mapped, no DMA.
    pub fn attach(&self, mut plug: PciPlug, function: PciFunction) -> Result<(), PciError> {
        function.config.validate(&function.bar_regions)?;
        let slot = plug.slot;
        let f = Function::new(&mut plug, function, self.pci_mem.clone(), self.io.clone());
        let refused = self.bridge.with(move |b, _| {
            let entry = &mut b.functions[usize::from(slot) << 3];
            if entry.is_some() {
                return Some(f);
            }
            *entry = Some(f);
            None
        })?;
        if let Some(f) = refused {
            plug.bus_master = Some(f.bus_master);
            return Err(PciError::SlotInUse(slot));
        }
        Ok(())
    }

    /// Unplugs the function in `slot`: takes it off the bus (configuration
    /// cycles no longer reach it), then unmaps its BARs and destroys its
    /// bus-master address space in one transaction, with the bridge free;
    /// the device stops once nothing else refers to its regions. It waits
    /// for the topology, so a caller holding a device turn gets
    /// [`topos_runtime::Error::InsideDeviceTurn`] and nothing changes.
    pub fn detach(&self, slot: u8) -> Result<(), PciError> {
        if slot >= PCI_SLOT_MAX {
            return Err(PciError::NoSuchSlot(slot));
        }
        if turns::holds_device_turn() {
            return Err(topos_runtime::Error::InsideDeviceTurn.into());
        }
        let f = self.bridge.with(move |b, _| b.functions[usize::from(slot) << 3].take())?;
        let f = f.ok_or(PciError::SlotEmpty(slot))?;
        f.router.update(|s| s.1 = true);
        f.mappings.remove(&f.bus_master)?;
        Ok(())
    }
}
