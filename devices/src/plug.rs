//! One way to plug a device: configuration in, regions and a handle out;
//! the board maps the regions.
//!
//! Every model implements [`DeviceModel`]. The board gives it its
//! configuration (the model's properties, as QEMU's `-device` would) and a
//! [`PlugCtx`]: the topology, the device runtime, an instance name, the
//! interrupt lines wired to the device and its bus-master path. The model
//! spawns its actor and makes its regions — unmapped — and returns them in
//! a [`Plugged`] with the handle the embedder keeps. Where the regions go is
//! the board's business alone:
//!
//! * at fixed addresses, in system memory or in the I/O space
//!   ([`Plugged::map`]) — a UART at `0x3f8`, `isa-debug-exit` at `0xf4`, a
//!   flash just below 4 GiB, the PCI host's ports at `0xcf8` and `0xcfc`;
//! * as the BARs of a PCI function, through the host bridge
//!   ([`PciHost::plug_model`](crate::pci::PciHost::plug_model)): the host
//!   reserves the slot, hands the model its bus-master path and INTx line,
//!   and attaches the regions as BARs 0, 1, ... in order. A model that has
//!   a PCI identity (edu) offers it in [`Plugged::pci`]; the board may give
//!   any model one ([`PciPlacement`](crate::pci::PciPlacement)).
//!
//! A device lives as long as one of its regions is referred to (mapped, or
//! held in a [`Plugged`]); the handle does not keep it alive.
//!
//! ```
//! use topos_devices::plug::{DeviceModel, PlugCtx};
//! use topos_devices::uart::{Serial16550, SerialConfig, SerialSink, COM1_BASE, PORTS};
//! use topos_devices::runtime::Topology;
//! use topos_devices::DeviceRuntime;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let topo = Topology::new();
//! let spaces = topo.standard_spaces()?;
//! let rt = DeviceRuntime::new()?;
//! let (sink, out) = SerialSink::buffer();
//! let com1 = Serial16550::plug(SerialConfig::new(sink), PlugCtx::new(&topo, &rt, "com1"))?;
//! com1.map(PORTS, &spaces.io, COM1_BASE)?;
//! spaces.io_space.write_u64(COM1_BASE, u64::from(b'!'), 1);
//! assert_eq!(out.contents(), b"!");
//! # Ok(())
//! # }
//! ```

use crate::actor::ActorOptions;
use crate::error::{Error, Result};
use crate::irq::IrqLine;
use crate::pci::{BusMaster, PciConfig};
use crate::wakeups::DeviceRuntime;
use topos_runtime::{MemoryRegion, Topology};

/// A device model a board can plug (see the [module](self) documentation).
pub trait DeviceModel {
    /// Everything that makes one device of this model (its properties).
    type Config;
    /// What the embedder keeps to talk to the device.
    type Handle;

    /// Spawns the device and makes its regions, unmapped.
    fn plug(config: Self::Config, ctx: PlugCtx) -> Result<Plugged<Self::Handle>>;
}

/// What a board hands every device it plugs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PlugCtx {
    /// The topology the device's regions belong to.
    pub topology: Topology,
    /// Delivers the device's timers and ioeventfds and drains its mailbox.
    pub runtime: DeviceRuntime,
    /// The instance name: the actor's, and the base of its regions' names.
    pub name: String,
    /// The interrupt lines wired to the device, in the order its model
    /// documents (most have one).
    pub irqs: Vec<IrqLine>,
    /// The device's path to memory for DMA (none unless the board gives
    /// one; a PCI function gets its bus-master space from the host).
    pub bus_master: BusMaster,
    /// The actor's mailbox bound and budget.
    pub actor: ActorOptions,
}

impl PlugCtx {
    /// A device named `name`, with no interrupt line, no DMA and default
    /// actor options.
    pub fn new(topology: &Topology, runtime: &DeviceRuntime, name: &str) -> PlugCtx {
        PlugCtx {
            topology: topology.clone(),
            runtime: runtime.clone(),
            name: name.to_string(),
            irqs: Vec::new(),
            bus_master: BusMaster::detached(),
            actor: ActorOptions::default(),
        }
    }

    /// Wires one more interrupt line to the device.
    pub fn with_irq(mut self, line: IrqLine) -> PlugCtx {
        self.irqs.push(line);
        self
    }

    /// Gives the device a path to memory for DMA.
    pub fn with_bus_master(mut self, bus_master: BusMaster) -> PlugCtx {
        self.bus_master = bus_master;
        self
    }

    /// Sets the actor's mailbox bound and budget.
    pub fn with_actor_options(mut self, options: ActorOptions) -> PlugCtx {
        self.actor = options;
        self
    }
}

/// Which address space a region is meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Memory (MMIO or RAM): system memory, or a memory BAR.
    Memory,
    /// Ports: the I/O space, or an I/O BAR.
    Io,
}

/// One region of a plugged device.
#[derive(Debug, Clone)]
pub struct DeviceRegion {
    /// What the region is to the device (`"regs"`, `"vram"`, ...; each
    /// model documents its roles).
    pub role: &'static str,
    /// The region, unmapped until the board maps it.
    pub region: MemoryRegion,
    /// The space it is meant for.
    pub space: Space,
    /// As a memory BAR: prefetchable (memory without read side effects).
    pub prefetchable: bool,
}

impl DeviceRegion {
    /// A memory region (MMIO registers) with role `role`.
    pub fn memory(role: &'static str, region: MemoryRegion) -> DeviceRegion {
        DeviceRegion { role, region, space: Space::Memory, prefetchable: false }
    }

    /// Prefetchable memory (RAM-like: video RAM, flash) with role `role`.
    pub fn prefetchable(role: &'static str, region: MemoryRegion) -> DeviceRegion {
        DeviceRegion { role, region, space: Space::Memory, prefetchable: true }
    }

    /// A port range with role `role`.
    pub fn io(role: &'static str, region: MemoryRegion) -> DeviceRegion {
        DeviceRegion { role, region, space: Space::Io, prefetchable: false }
    }
}

/// A plugged device: its regions, unmapped, and its handle.
#[derive(Debug)]
#[non_exhaustive]
pub struct Plugged<H> {
    /// The device's regions, in the model's order (the order of its BARs
    /// when it is a PCI function).
    pub regions: Vec<DeviceRegion>,
    /// What the embedder keeps to talk to the device.
    pub handle: H,
    /// The model's own PCI identity (a type-0 header without BARs), if it
    /// is a PCI device by nature.
    pub pci: Option<PciConfig>,
}

impl<H> Plugged<H> {
    /// A device with `regions` and `handle`, not a PCI device by nature.
    pub fn new(regions: Vec<DeviceRegion>, handle: H) -> Plugged<H> {
        Plugged { regions, handle, pci: None }
    }

    /// Offers `identity` for when the board makes the device a PCI
    /// function.
    pub fn with_pci_identity(mut self, identity: PciConfig) -> Plugged<H> {
        self.pci = Some(identity);
        self
    }

    /// The region with role `role`.
    pub fn region(&self, role: &str) -> Result<&MemoryRegion> {
        self.regions
            .iter()
            .find(|r| r.role == role)
            .map(|r| &r.region)
            .ok_or_else(|| Error::NoSuchRegion(role.to_string()))
    }

    /// Maps the region with role `role` at `addr` in `container` (system
    /// memory, the I/O space, or any container of the board's).
    pub fn map(&self, role: &str, container: &MemoryRegion, addr: u64) -> Result<()> {
        container.add_subregion(addr, self.region(role)?)?;
        Ok(())
    }
}
