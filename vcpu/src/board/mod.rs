//! topos's `pc` board: QEMU's `pc` machine (i440FX + PIIX3) for everything
//! it models, so the same firmware runs on both.
//!
//! | what | where | as in QEMU |
//! | --- | --- | --- |
//! | RAM, BIOS, holes | see [`memory_map`] | `-m`, `-bios` |
//! | 16550A UART | ports `0x3f8..0x400`, IRQ 4 | `-serial` (COM1) |
//! | `isa-debug-exit` | ports `0xf4..0xf8` | `-device isa-debug-exit,iobase=0xf4,iosize=0x04` |
//! | POST port | port `0x80`: writes ignored, reads `0xff` | `ioport80` |
//! | `fw_cfg` | ports `0x510`, `0x511` | signature, ID, RAM size, CPU count |
//! | PCI host bridge | ports `0xcf8`, `0xcfc` | i440FX at 00.0 (`8086:1237`, class 0600), PIIX3 at 01.0 (`8086:7000`, class 0601, multi-function), its IDE at 01.1 (`8086:7010`, 010180) and ACPI at 01.3 (`8086:7113`, 068000): configuration headers only, the chipset's registers and the IDE and ACPI functions themselves are not modelled |
//! | `--device edu` | PCI slots 2, 3, ... in order, INTx on GSI 11 | `-device edu` |
//! | `--device framebuffer` | video RAM at `0xfd000000` (4 MiB, dirty-logged), registers at `0xfe000000` | (none) |
//! | `--device virtio-doorbell` | virtio-mmio registers at `0xfe001000`, IRQ 5 | (none on `pc`) |
//! | `--device pflash` | a 1 MiB CFI flash ending at `0xff000000` | |
//! | `--pflash FILE` | the BIOS as a CFI flash ending at 4 GiB | `-drive if=pflash` |
//! | local APICs, PICs, PIT, IOAPIC | on KVM, in the kernel (nothing mapped here); on the interpreter, user space ([`topos_devices::irqchip`], given as [`BoardWiring::irqchip`]): PICs at ports `0x20`, `0xa0`, ELCRs `0x4d0`-`0x4d1`, PIT `0x40`-`0x43` and port `0x61`, IOAPIC at `0xfec00000`; each vCPU reaches its local APIC page itself | `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`; TCG's `pic`, `pit`, `pcspk`, `elcr`, `ioapic`, `apic` |
//! | a Multiboot kernel | see [`multiboot`] | `-kernel`, `-append` |
//!
//! Every device is plugged through the devices' plug contract; the board
//! only decides where the regions go.

pub mod memory_map;
pub mod multiboot;

use crate::error::{Error, Result};
use memory_map::MemoryMap;
use std::sync::Arc;
use topos_devices::debug_exit::{self, DebugExit, DebugExitConfig, ExitSink};
use topos_devices::edu::{Edu, EduOptions};
use topos_devices::framebuffer::{self, FbConfig, FbMode, FbRegs, Framebuffer};
use topos_devices::fw_cfg::{self, FwCfg, FwCfgConfig};
use topos_devices::irqchip::Irqchip;
use topos_devices::pci::{PciConfig, PciHost, PciHostBridge, PciHostConfig, PciPlacement};
use topos_devices::pflash::{self, PflashCfi01, PflashConfig, PflashImage};
use topos_devices::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged};
use topos_devices::uart::{self, Serial16550, SerialConfig, SerialSink};
use topos_devices::virtio_doorbell::{self, Doorbell, DoorbellConfig, VirtioDoorbell};
use topos_devices::{ActorHandle, DeviceRuntime, InterruptSink, IrqLine};
use topos_runtime::{HwAddr, MemoryRegion, MemoryRegionOps, OpsConfig, StandardSpaces, Topology};

/// The GSI every PCI function's INTx is wired to.
pub const PCI_INTX_GSI: u32 = 11;
/// The first slot `--device` models take.
pub const FIRST_DEVICE_SLOT: u8 = 2;
/// The POST diagnostic port.
pub const POST_PORT: u64 = 0x80;

/// Where the framebuffer's video RAM goes (16 MiB below the PCI BAR area
/// the firmware uses).
pub const FRAMEBUFFER_VRAM_BASE: u64 = 0xfd00_0000;
/// The framebuffer's video RAM size.
pub const FRAMEBUFFER_VRAM_SIZE: u64 = 4 << 20;
/// The framebuffer's mode at reset: 1024x768, 32 bits per pixel, one page
/// per scanline (so page-granular dirty tracking is exact per scanline).
pub const FRAMEBUFFER_MODE: FbMode = FbMode { width: 1024, height: 768, bytes_per_pixel: 4, stride: 4096 };
/// Where the framebuffer's registers go.
pub const FRAMEBUFFER_REGS_BASE: u64 = 0xfe00_0000;
/// Where the virtio-mmio doorbell goes (QEMU's `virtio-mmio` transports
/// have no fixed place on `pc`).
pub const VIRTIO_DOORBELL_BASE: u64 = 0xfe00_1000;
/// Where a `--device pflash` (a second flash) ends: 16 MiB below 4 GiB,
/// clear of any BIOS image (at most 16 MiB).
pub const PFLASH_DEVICE_END: u64 = 0xff00_0000;
/// The erase block size of a `--device pflash`.
pub const PFLASH_DEVICE_BLOCK_SIZE: u64 = 0x10000;
/// The erase blocks of a `--device pflash`.
pub const PFLASH_DEVICE_BLOCKS: u32 = 16;
/// The size of a `--device pflash` (1 MiB).
pub const PFLASH_DEVICE_SIZE: u64 = PFLASH_DEVICE_BLOCKS as u64 * PFLASH_DEVICE_BLOCK_SIZE;

/// A device model the board can plug (`--device`): `edu` as a PCI function
/// (slots from [`FIRST_DEVICE_SLOT`]), the others at fixed addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciModel {
    /// QEMU's `edu` teaching device (PCI).
    Edu,
    /// The dirty-logged framebuffer: video RAM at [`FRAMEBUFFER_VRAM_BASE`],
    /// registers at [`FRAMEBUFFER_REGS_BASE`].
    Framebuffer,
    /// The virtio-mmio doorbell at [`VIRTIO_DOORBELL_BASE`], IRQ 5.
    VirtioDoorbell,
    /// A CFI flash (erased, 1 MiB) ending at [`PFLASH_DEVICE_END`].
    Pflash,
}

impl std::str::FromStr for PciModel {
    type Err = Error;

    fn from_str(s: &str) -> Result<PciModel> {
        match s {
            "edu" => Ok(PciModel::Edu),
            "framebuffer" => Ok(PciModel::Framebuffer),
            "virtio-doorbell" => Ok(PciModel::VirtioDoorbell),
            "pflash" => Ok(PciModel::Pflash),
            other => Err(Error::Config(format!(
                "unknown device `{other}` (known: edu, framebuffer, virtio-doorbell, pflash)"
            ))),
        }
    }
}

/// What the board is made of.
pub struct PcConfig {
    /// Guest RAM in bytes.
    pub ram_size: u64,
    /// vCPUs.
    pub cpus: u16,
    /// The firmware image (a raw BIOS, as QEMU's `-bios`: a multiple of
    /// 64 KiB, at most 16 MiB).
    pub bios: Vec<u8>,
    /// Boot from a CFI flash holding this image instead of a ROM (as
    /// `-drive if=pflash`): the same place, but writable through the flash's
    /// command set.
    pub bios_in_flash: bool,
    /// PCI devices, in slot order from [`FIRST_DEVICE_SLOT`].
    pub devices: Vec<PciModel>,
    /// Where the UART's output goes.
    pub serial: SerialSink,
    /// A Multiboot kernel to start instead of the BIOS (`--kernel`).
    pub kernel: Option<multiboot::Kernel>,
}

impl std::fmt::Debug for PcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcConfig")
            .field("ram_size", &self.ram_size)
            .field("cpus", &self.cpus)
            .field("bios", &self.bios.len())
            .field("devices", &self.devices)
            .field("kernel", &self.kernel.as_ref().map(|k| &k.path))
            .finish_non_exhaustive()
    }
}

/// What the board connects to outside itself.
pub struct BoardWiring {
    /// Where device interrupt lines go (GSIs of the accelerator's irqchip;
    /// with a user-space [`irqchip`](Self::irqchip), its
    /// [`interrupt_sink`](Irqchip::interrupt_sink)).
    pub interrupts: Arc<dyn InterruptSink>,
    /// The interrupt controllers, when they are in user space (the
    /// interpreter): the board maps their ports and the IOAPIC's page in
    /// its build transaction. `None` when the accelerator has them (KVM's
    /// in-kernel irqchip): nothing is mapped for them.
    pub irqchip: Option<Arc<Irqchip>>,
    /// Where the guest's `isa-debug-exit` writes go.
    pub exit: Box<dyn ExitSink>,
    /// What the accelerator adds to the memory map a `--kernel` sees.
    pub memory_map: multiboot::MapOptions,
}

/// An interrupt sink that drops every change (for building a board only to
/// print its map).
#[derive(Debug, Default)]
pub struct NoInterrupts;

impl InterruptSink for NoInterrupts {
    fn set_level(&self, _line: u32, _level: bool) {}
}

/// The POST port: ignores writes, reads all-ones (QEMU's `ioport80`).
struct PostPort;

impl MemoryRegionOps for PostPort {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        0xff
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {}
}

/// A PCI function that is only a configuration header (the i440FX host
/// bridge and the PIIX3's functions: their registers are not modelled).
struct Identity;

impl DeviceModel for Identity {
    type Config = PciConfig;
    type Handle = ();

    fn plug(config: PciConfig, _ctx: PlugCtx) -> topos_devices::Result<Plugged<()>> {
        Ok(Plugged::new(Vec::<DeviceRegion>::new(), ()).with_pci_identity(config))
    }
}

/// The built board.
#[derive(Debug)]
pub struct PcBoard {
    /// The topology.
    pub topo: Topology,
    /// `system`, `io` and their address spaces.
    pub spaces: StandardSpaces,
    /// RAM, BIOS and the PCI container.
    pub map: MemoryMap,
    /// The PCI host.
    pub pci: PciHost,
    /// vCPUs the board was built for.
    pub cpus: u16,
    /// The device runtime (timers, ioeventfds, drainers).
    pub runtime: DeviceRuntime,
    /// Where the boot processor starts, when not at the reset vector (a
    /// `--kernel`).
    pub entry: Option<multiboot::Flat32Entry>,
    /// The devices the board plugged, for the embedder to reach.
    pub devices: BoardDevices,
    /// The user-space interrupt controllers the board mapped, if it was
    /// given them ([`BoardWiring::irqchip`]).
    pub irqchip: Option<Arc<Irqchip>>,
}

/// Handles to the board's devices (the `--device` ones that were given).
#[derive(Debug, Default)]
pub struct BoardDevices {
    /// The `edu`s, in slot order.
    pub edus: Vec<ActorHandle<Edu>>,
    /// The framebuffer (a display calls its `update`).
    pub framebuffer: Option<Framebuffer>,
    /// The virtio-mmio doorbell.
    pub virtio_doorbell: Option<Doorbell>,
    /// The `--device pflash` flash.
    pub pflash: Option<ActorHandle<PflashCfi01>>,
}

impl PcBoard {
    /// Builds the board in `topo` (whose standard spaces are `spaces`).
    pub fn build(topo: &Topology, spaces: &StandardSpaces, config: PcConfig, wiring: BoardWiring) -> Result<PcBoard> {
        let bios_len = config.bios.len() as u64;
        if bios_len == 0 || bios_len % (64 << 10) != 0 || bios_len > (16 << 20) {
            return Err(Error::Config(format!(
                "a BIOS image must be a non-zero multiple of 64 KiB up to 16 MiB, not {bios_len} bytes"
            )));
        }
        if config.cpus == 0 || config.cpus > 255 {
            return Err(Error::Config(format!("--smp must be 1 to 255, not {}", config.cpus)));
        }
        if config.ram_size < (1 << 20) || config.ram_size % (1 << 20) != 0 {
            return Err(Error::Config(format!(
                "memory must be a whole number of MiB, at least 1, not {}",
                config.ram_size
            )));
        }
        let runtime = DeviceRuntime::new().map_err(Error::Thread)?;
        let ctx = |name: &str| PlugCtx::new(topo, &runtime, name);
        // One transaction: one commit, so every memslot is set before any
        // ioeventfd is registered (each KVM change after an ioeventfd can
        // wait for a grace period).
        let cpus = config.cpus;
        let (map, pci, entry, devices) = topo.transaction(|| -> Result<_> {
            let flash_bios = if config.bios_in_flash {
                let geometry =
                    PflashConfig { block_size: 0x10000, num_blocks: (bios_len / 0x10000) as u32, ..Default::default() };
                let image = PflashImage { config: geometry, content: config.bios.clone() };
                Some(PflashCfi01::plug(image, ctx("system.flash0"))?.region(pflash::FLASH)?.clone())
            } else {
                None
            };
            let map = memory_map::build(topo, spaces, config.ram_size, &config.bios, flash_bios)?;
            if let Some(irqchip) = &wiring.irqchip {
                irqchip.map(topo, &spaces.io, &spaces.system)?;
            }
            let irq = |gsi: u32| IrqLine::new(wiring.interrupts.clone(), gsi);

            let com1 =
                Serial16550::plug(SerialConfig::new(config.serial), ctx("serial0").with_irq(irq(uart::COM1_IRQ)))?;
            com1.map(uart::PORTS, &spaces.io, uart::COM1_BASE)?;
            let exit = DebugExit::plug(DebugExitConfig { iosize: 4, sink: wiring.exit }, ctx("isa-debug-exit"))?;
            exit.map(debug_exit::PORTS, &spaces.io, debug_exit::CONVENTIONAL_IOBASE)?;
            let post = topo.new_io("ioport80", PostPort, OpsConfig::default(), 1)?;
            spaces.io.add_subregion(POST_PORT, &post)?;
            let fw = FwCfgConfig::new().with_ram_size(config.ram_size).with_cpus(config.cpus);
            let fw = FwCfg::plug(fw, ctx("fw_cfg"))?;
            fw.map(fw_cfg::PORTS, &spaces.io, fw_cfg::IO_BASE)?;

            let host_config =
                PciHostConfig { system: spaces.system.clone(), pci_mem: map.pci.clone(), io: spaces.io.clone() };
            let host = PciHostBridge::plug(host_config, ctx("i440fx-pcihost"))?;
            host.map(topos_devices::pci::CONFIG_ADDRESS, &spaces.io, topos_devices::pci::CONFIG_ADDRESS_PORT)?;
            host.map(topos_devices::pci::CONFIG_DATA, &spaces.io, topos_devices::pci::CONFIG_DATA_PORT)?;
            let pci = host.handle;
            pci.plug_model::<Identity>(PciPlacement::slot(0), PciConfig::new(0x8086, 0x1237, 0x0600), ctx("i440fx"))?;
            let mut piix3 = PciConfig::new(0x8086, 0x7000, 0x0601);
            piix3.multifunction = true;
            pci.plug_model::<Identity>(PciPlacement::slot(1), piix3, ctx("piix3"))?;
            let mut ide = PciConfig::new(0x8086, 0x7010, 0x0101);
            ide.prog_if = 0x80;
            pci.plug_model::<Identity>(PciPlacement::function(1, 1), ide, ctx("piix3-ide"))?;
            pci.plug_model::<Identity>(
                PciPlacement::function(1, 3),
                PciConfig::new(0x8086, 0x7113, 0x0680),
                ctx("piix4-pm"),
            )?;
            let mut slot = FIRST_DEVICE_SLOT;
            let once = |seen: &mut bool, what: &str| {
                if std::mem::replace(seen, true) {
                    Err(Error::Config(format!("--device {what} can be given once (it has a fixed address)")))
                } else {
                    Ok(())
                }
            };
            let (mut fb, mut doorbell, mut flash) = (false, false, false);
            let mut devices = BoardDevices::default();
            for (i, model) in config.devices.iter().enumerate() {
                match model {
                    PciModel::Edu => {
                        if slot > 31 {
                            return Err(Error::Config("more PCI devices than slots".into()));
                        }
                        let at = PciPlacement::slot(slot).with_intx(irq(PCI_INTX_GSI));
                        devices.edus.push(pci.plug_model::<Edu>(at, EduOptions::default(), ctx(&format!("edu{i}")))?);
                        slot += 1;
                    }
                    PciModel::Framebuffer => {
                        once(&mut fb, "framebuffer")?;
                        let config = FbConfig { vram_size: FRAMEBUFFER_VRAM_SIZE, mode: FRAMEBUFFER_MODE };
                        let p = FbRegs::plug(config, ctx("framebuffer"))?;
                        p.map(framebuffer::VRAM, &spaces.system, FRAMEBUFFER_VRAM_BASE)?;
                        p.map(framebuffer::REGS, &spaces.system, FRAMEBUFFER_REGS_BASE)?;
                        devices.framebuffer = Some(p.handle);
                    }
                    PciModel::VirtioDoorbell => {
                        once(&mut doorbell, "virtio-doorbell")?;
                        let p = VirtioDoorbell::plug(DoorbellConfig::default(), ctx("virtio-mmio").with_irq(irq(5)))?;
                        p.map(virtio_doorbell::REGS, &spaces.system, VIRTIO_DOORBELL_BASE)?;
                        devices.virtio_doorbell = Some(p.handle);
                    }
                    PciModel::Pflash => {
                        once(&mut flash, "pflash")?;
                        let geometry = PflashConfig {
                            block_size: PFLASH_DEVICE_BLOCK_SIZE,
                            num_blocks: PFLASH_DEVICE_BLOCKS,
                            ..Default::default()
                        };
                        let size = geometry.size();
                        let p =
                            PflashCfi01::plug(PflashImage { config: geometry, content: Vec::new() }, ctx("pflash1"))?;
                        p.map(pflash::FLASH, &spaces.system, PFLASH_DEVICE_END - size)?;
                        devices.pflash = Some(p.handle);
                    }
                }
            }
            let entry = match &config.kernel {
                Some(k) => Some(
                    multiboot::load(k, &map.ram.ram()?, map.below_4g, map.above_4g, wiring.memory_map)
                        .map_err(|e| Error::Config(format!("--kernel {}: {e}", k.path)))?,
                ),
                None => None,
            };
            Ok((map, pci, entry, devices))
        })??;
        Ok(PcBoard {
            topo: topo.clone(),
            spaces: spaces.clone(),
            map,
            pci,
            cpus,
            runtime,
            entry,
            devices,
            irqchip: wiring.irqchip,
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &MemoryRegion {
        &self.map.ram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use topos_runtime::MtreeOptions;

    fn build(irqchip: Option<Arc<Irqchip>>) -> PcBoard {
        let topo = Topology::new();
        let spaces = topo.standard_spaces().unwrap();
        let interrupts: Arc<dyn InterruptSink> = match &irqchip {
            Some(chip) => chip.interrupt_sink(),
            None => Arc::new(NoInterrupts),
        };
        let config = PcConfig {
            ram_size: 16 << 20,
            cpus: 2,
            bios: vec![0xf4; 64 << 10],
            bios_in_flash: false,
            devices: vec![PciModel::Edu],
            serial: SerialSink::Null,
            kernel: None,
        };
        let wiring =
            BoardWiring { interrupts, irqchip, exit: Box::new(|_status: i32| {}), memory_map: Default::default() };
        PcBoard::build(&topo, &spaces, config, wiring).unwrap()
    }

    const IRQCHIP_LINES: [&str; 7] = [
        "0000000000000020-0000000000000021 (prio 0, i/o): pic",
        "0000000000000040-0000000000000043 (prio 0, i/o): pit",
        "0000000000000061-0000000000000061 (prio 0, i/o): pcspk",
        "00000000000000a0-00000000000000a1 (prio 0, i/o): pic",
        "00000000000004d0-00000000000004d0 (prio 0, i/o): elcr",
        "00000000000004d1-00000000000004d1 (prio 0, i/o): elcr",
        "00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic",
    ];

    #[test]
    fn a_user_space_irqchip_is_mapped_where_qemu_maps_it() {
        let chip = Irqchip::new(2);
        let board = build(Some(chip.clone()));
        let mtree = board.topo.mtree(MtreeOptions::default()).unwrap();
        for line in IRQCHIP_LINES {
            assert!(mtree.contains(line), "{line} missing from\n{mtree}");
        }
        // The IOAPIC wins over the PCI hole below it, and answers.
        let _ = board.spaces.memory.write_u64(topos_devices::irqchip::IOAPIC_BASE, 1, 4);
        assert_eq!(board.spaces.memory.read_u64(topos_devices::irqchip::IOAPIC_BASE + 0x10, 4).0, 0x0017_0020);
        // The PIC's mask register reads back through the I/O space.
        let _ = board.spaces.io_space.write_u64(0x21, 0xb8, 1);
        assert_eq!(board.spaces.io_space.read_u64(0x21, 1).0, 0xb8);
        assert!(board.irqchip.is_some());
    }

    #[test]
    fn with_the_accelerators_irqchip_nothing_is_mapped_for_it() {
        let board = build(None);
        let mtree = board.topo.mtree(MtreeOptions::default()).unwrap();
        for line in IRQCHIP_LINES {
            assert!(!mtree.contains(line), "{line} in\n{mtree}");
        }
    }
}
