//! QEMU's `edu` educational PCI device (`docs/specs/edu.rst`), register for
//! register, so that a driver written against QEMU behaves the same here.
//!
//! PCI identity `1234:11e8`, revision `0x10`, class `0x00ff`, interrupt pin
//! INTA; BAR 0 is 1 MiB of MMIO:
//!
//! | offset | access | register |
//! | --- | --- | --- |
//! | `0x00` | RO | identification `0x010000ed` |
//! | `0x04` | RW | liveness check: reads the bitwise inverse of what was written |
//! | `0x08` | RW | factorial: a written value is replaced by its factorial (modulo 2^32) once the computation ends |
//! | `0x20` | RW | status: `0x01` computing (RO), `0x80` raise interrupt `0x01` when a factorial ends |
//! | `0x24` | RO | interrupt status |
//! | `0x60` | WO | interrupt raise: ORed into the interrupt status |
//! | `0x64` | WO | interrupt acknowledge: cleared from the interrupt status |
//! | `0x80` | RW | DMA source address |
//! | `0x88` | RW | DMA destination address |
//! | `0x90` | RW | DMA transfer count |
//! | `0x98` | RW | DMA command: `0x01` start, `0x02` direction EDU→RAM, `0x04` raise interrupt `0x100` when done |
//!
//! Accesses must be 4 bytes below `0x80` and 4 or 8 bytes from `0x80` on;
//! other sizes are refused by the memory core (1 and 2 bytes) or read
//! all-ones and are ignored (8 bytes below `0x80`). Unknown offsets read
//! all-ones. The DMA registers cannot be changed while a transfer runs.
//!
//! The factorial and the DMA complete asynchronously (device timers), so a
//! driver must poll the status or the command register, or wait for the
//! interrupt, exactly as on QEMU. The DMA moves data between the device's
//! 4 KiB buffer (device address `0x40000`) and guest memory through the
//! function's bus-master address space: with bus mastering off it reads
//! zeros and writes nothing. DMA addresses are masked to 28 bits (QEMU's
//! default `dma_mask`); transfers that do not fit in the buffer are skipped,
//! as in current QEMU.
//!
//! The bus-master access may land on any device's registers, its own
//! included, and a thread holding a device's turn must never wait for
//! another device or the topology (`topos_runtime::turns`). So when the DMA
//! timer fires the device only snapshots the transfer (copying the buffer
//! slice for EDU→RAM); the transfer itself runs once the thread holds no
//! turn, and its data, the end of the run bit and the interrupt come back
//! through the device's mailbox. Two edus DMA-ing from each other's
//! registers therefore never wait for each other while holding a turn.
//!
//! The interrupt is the INTx line (`ctx.irq(0)`), asserted while the
//! interrupt status is non-zero. QEMU's MSI capability is not modelled.

use crate::actor::{ActorHandle, Device, DeviceCtx, Spawned};
use crate::pci::{BarKind, BarSpec, BusMaster, PciConfig};
use crate::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged};
use std::time::Duration;
use topos_runtime::{HwAddr, ImplConstraints, OpsConfig, ValidConstraints};

/// PCI vendor ID (QEMU).
pub const EDU_VENDOR_ID: u16 = 0x1234;
/// PCI device ID.
pub const EDU_DEVICE_ID: u16 = 0x11e8;
/// PCI revision.
pub const EDU_REVISION: u8 = 0x10;
/// PCI class ("other").
pub const EDU_CLASS: u16 = 0x00ff;
/// Size of BAR 0.
pub const EDU_MMIO_SIZE: u64 = 1 << 20;
/// Value of the identification register (version 1.0).
pub const EDU_ID: u32 = 0x0100_00ed;
/// The role of the edu's one region: its registers (BAR 0 as a PCI
/// function).
pub const MMIO: &str = "mmio";

/// Register offsets in BAR 0.
pub mod reg {
    /// Identification.
    pub const ID: u64 = 0x00;
    /// Liveness check.
    pub const LIVENESS: u64 = 0x04;
    /// Factorial.
    pub const FACTORIAL: u64 = 0x08;
    /// Status.
    pub const STATUS: u64 = 0x20;
    /// Interrupt status.
    pub const IRQ_STATUS: u64 = 0x24;
    /// Interrupt raise.
    pub const IRQ_RAISE: u64 = 0x60;
    /// Interrupt acknowledge.
    pub const IRQ_ACK: u64 = 0x64;
    /// DMA source address.
    pub const DMA_SRC: u64 = 0x80;
    /// DMA destination address.
    pub const DMA_DST: u64 = 0x88;
    /// DMA transfer count.
    pub const DMA_COUNT: u64 = 0x90;
    /// DMA command.
    pub const DMA_CMD: u64 = 0x98;
}

/// Status bit: a factorial is being computed.
pub const STATUS_COMPUTING: u32 = 0x01;
/// Status bit: raise interrupt [`FACT_IRQ`] when a factorial ends.
pub const STATUS_IRQFACT: u32 = 0x80;
/// Interrupt status value raised by a finished factorial.
pub const FACT_IRQ: u32 = 0x001;
/// Interrupt status value raised by a finished DMA.
pub const DMA_IRQ: u32 = 0x100;
/// DMA command bit: start (reads back set while the transfer runs).
pub const DMA_CMD_RUN: u64 = 0x1;
/// DMA command bit: direction, set for EDU→RAM.
pub const DMA_CMD_TO_RAM: u64 = 0x2;
/// DMA command bit: raise [`DMA_IRQ`] when done.
pub const DMA_CMD_IRQ: u64 = 0x4;
/// Device address of the DMA buffer.
pub const DMA_BUF_ADDR: u64 = 0x40000;
/// Size of the DMA buffer.
pub const DMA_BUF_SIZE: usize = 4096;

const TIMER_FACTORIAL: u64 = 1;
const TIMER_DMA: u64 = 2;

/// Tunables of an edu instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EduOptions {
    /// How long a factorial computation takes (QEMU computes in a thread).
    pub factorial_delay: Duration,
    /// How long until a started DMA runs (QEMU: 100 ms of virtual time).
    pub dma_delay: Duration,
    /// Mask applied to DMA guest addresses (QEMU's `dma_mask` property).
    pub dma_mask: u64,
}

impl Default for EduOptions {
    fn default() -> Self {
        EduOptions {
            factorial_delay: Duration::from_micros(10),
            dma_delay: Duration::from_millis(100),
            dma_mask: (1 << 28) - 1,
        }
    }
}

/// The edu device state (an actor; see its [`DeviceModel`] implementation).
pub struct Edu {
    liveness: u32,
    fact: u32,
    status: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_count: u64,
    dma_cmd: u64,
    buf: Box<[u8; DMA_BUF_SIZE]>,
    bus_master: BusMaster,
    options: EduOptions,
}

impl std::fmt::Debug for Edu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edu")
            .field("status", &self.status)
            .field("irq_status", &self.irq_status)
            .field("dma_cmd", &self.dma_cmd)
            .finish_non_exhaustive()
    }
}

/// `n!` modulo 2^32, as QEMU's 32-bit loop computes it. From 34 on the
/// product has at least 32 factors of two, so it is 0.
fn factorial(n: u32) -> u32 {
    if n >= 34 {
        return 0;
    }
    (1..=n).fold(1u32, |acc, k| acc.wrapping_mul(k))
}

/// The buffer offset of a `count`-byte transfer at device address `start`,
/// if it fits in the buffer (QEMU's `edu_check_range`).
fn buffer_range(start: u64, count: u64) -> Option<usize> {
    let end = start.checked_add(count)?;
    (start >= DMA_BUF_ADDR && end <= DMA_BUF_ADDR + DMA_BUF_SIZE as u64).then(|| (start - DMA_BUF_ADDR) as usize)
}

impl Edu {
    /// A new device that masters the bus through `bus_master`.
    pub fn new(bus_master: BusMaster, options: EduOptions) -> Edu {
        Edu {
            liveness: 0,
            fact: 0,
            status: 0,
            irq_status: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_count: 0,
            dma_cmd: 0,
            buf: Box::new([0; DMA_BUF_SIZE]),
            bus_master,
            options,
        }
    }

    /// The function's configuration header.
    pub fn pci_config() -> PciConfig {
        let mut c = PciConfig::new(EDU_VENDOR_ID, EDU_DEVICE_ID, EDU_CLASS);
        c.revision = EDU_REVISION;
        c.interrupt_pin = 1;
        c.bars.push(BarSpec { index: 0, size: EDU_MMIO_SIZE, kind: BarKind::Memory32 { prefetchable: false } });
        c
    }

    /// The access rules of BAR 0 (4 to 8 bytes, aligned).
    pub fn ops_config() -> OpsConfig {
        OpsConfig {
            valid: ValidConstraints { min_access_size: 4, max_access_size: 8, unaligned: false },
            impl_: ImplConstraints { min_access_size: 4, max_access_size: 8, unaligned: false },
            ..OpsConfig::default()
        }
    }

    fn update_irq(&self, ctx: &DeviceCtx<'_>) {
        if let Some(line) = ctx.irq(0) {
            line.set(self.irq_status != 0);
        }
    }

    fn raise_irq(&mut self, ctx: &DeviceCtx<'_>, value: u32) {
        self.irq_status |= value;
        self.update_irq(ctx);
    }

    fn lower_irq(&mut self, ctx: &DeviceCtx<'_>, value: u32) {
        self.irq_status &= !value;
        self.update_irq(ctx);
    }

    fn finish_factorial(&mut self, ctx: &DeviceCtx<'_>) {
        if self.status & STATUS_COMPUTING == 0 {
            return;
        }
        self.fact = factorial(self.fact);
        self.status &= !STATUS_COMPUTING;
        if self.status & STATUS_IRQFACT != 0 {
            self.raise_irq(ctx, FACT_IRQ);
        }
    }

    /// The DMA timer expired: starts the transfer. The bus-master access
    /// may reach any device's registers (another edu's, a flash's), and a
    /// thread holding this device's turn must never wait for another device
    /// or the topology; so the transfer runs outside the turn
    /// ([`DeviceCtx::defer`]), and its result and completion come back
    /// through the mailbox ([`ActorHandle::post`]). The DMA registers stay
    /// locked until then, as while QEMU's timer is pending.
    fn start_dma(&mut self, ctx: &DeviceCtx<'_>) {
        if self.dma_cmd & DMA_CMD_RUN == 0 {
            return;
        }
        let count = self.dma_count;
        let mask = self.options.dma_mask;
        let to_ram = self.dma_cmd & DMA_CMD_TO_RAM != 0;
        let (buf_addr, guest) = if to_ram { (self.dma_src, self.dma_dst) } else { (self.dma_dst, self.dma_src) };
        let Some(off) = buffer_range(buf_addr, count) else {
            tracing::debug!(device = ctx.name(), buf_addr, count, "edu: DMA out of buffer, skipped");
            self.finish_dma(ctx, None);
            return;
        };
        let Some(me) = ctx.handle::<Edu>() else { return };
        let bus_master = self.bus_master.clone();
        let name = ctx.name().to_string();
        let guest = guest & mask;
        if to_ram {
            // Copy the slice now: the transfer runs after the turn.
            let data = self.buf[off..off + count as usize].to_vec();
            ctx.defer(move || {
                let r = bus_master.write(guest, &data);
                if !r.is_ok() {
                    tracing::debug!(device = %name, result = ?r, "edu: DMA write incomplete");
                }
                let _ = me.post(|d, ctx| d.finish_dma(ctx, None));
            });
        } else {
            ctx.defer(move || {
                let mut data = vec![0; count as usize];
                let r = bus_master.read(guest, &mut data);
                if !r.is_ok() {
                    tracing::debug!(device = %name, result = ?r, "edu: DMA read incomplete");
                }
                let _ = me.post(move |d, ctx| d.finish_dma(ctx, Some((off, data))));
            });
        }
    }

    /// The transfer is over: stores what it read into the buffer, clears
    /// the run bit and raises the completion interrupt if asked.
    fn finish_dma(&mut self, ctx: &DeviceCtx<'_>, read: Option<(usize, Vec<u8>)>) {
        if let Some((off, data)) = read {
            self.buf[off..off + data.len()].copy_from_slice(&data);
        }
        self.dma_cmd &= !DMA_CMD_RUN;
        if self.dma_cmd & DMA_CMD_IRQ != 0 {
            self.raise_irq(ctx, DMA_IRQ);
        }
    }

    fn size_ok(addr: HwAddr, size: u32) -> bool {
        if addr < 0x80 {
            size == 4
        } else {
            size == 4 || size == 8
        }
    }
}

/// Plugging an edu: one region, [`MMIO`] (1 MiB of registers); a PCI device
/// by nature ([`Edu::pci_config`]), usually plugged through
/// [`PciHost::plug_model`](crate::pci::PciHost::plug_model), which gives it
/// its bus-master space and INTA. Interrupt line 0 of the context is INTA.
impl DeviceModel for Edu {
    type Config = EduOptions;
    type Handle = ActorHandle<Edu>;

    fn plug(options: EduOptions, ctx: PlugCtx) -> crate::Result<Plugged<ActorHandle<Edu>>> {
        let dev = Edu::new(ctx.bus_master.clone(), options);
        let spawned = Spawned::with_options(&ctx.name, dev, ctx.irqs, &ctx.runtime, ctx.actor);
        let mmio = ctx.topology.new_io_arc(
            &format!("{}-mmio", ctx.name),
            spawned.ops(0),
            Edu::ops_config(),
            u128::from(EDU_MMIO_SIZE),
        )?;
        Ok(Plugged::new(vec![DeviceRegion::memory(MMIO, mmio)], spawned.handle()).with_pci_identity(Edu::pci_config()))
    }
}

impl Device for Edu {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, size: u32) -> u64 {
        if !Edu::size_ok(addr, size) {
            return u64::MAX;
        }
        match addr {
            reg::ID => u64::from(EDU_ID),
            reg::LIVENESS => u64::from(self.liveness),
            reg::FACTORIAL => u64::from(self.fact),
            reg::STATUS => u64::from(self.status),
            reg::IRQ_STATUS => u64::from(self.irq_status),
            reg::DMA_SRC => self.dma_src,
            reg::DMA_DST => self.dma_dst,
            reg::DMA_COUNT => self.dma_count,
            reg::DMA_CMD => self.dma_cmd,
            _ => u64::MAX,
        }
    }

    fn write(&mut self, ctx: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, value: u64, size: u32) {
        if !Edu::size_ok(addr, size) {
            return;
        }
        let running = self.dma_cmd & DMA_CMD_RUN != 0;
        match addr {
            reg::LIVENESS => self.liveness = !(value as u32),
            reg::FACTORIAL if self.status & STATUS_COMPUTING == 0 => {
                self.fact = value as u32;
                self.status |= STATUS_COMPUTING;
                ctx.set_timer(self.options.factorial_delay, TIMER_FACTORIAL);
            }
            reg::STATUS => {
                if value & u64::from(STATUS_IRQFACT) != 0 {
                    self.status |= STATUS_IRQFACT;
                } else {
                    self.status &= !STATUS_IRQFACT;
                }
            }
            reg::IRQ_RAISE => self.raise_irq(ctx, value as u32),
            reg::IRQ_ACK => self.lower_irq(ctx, value as u32),
            reg::DMA_SRC if !running => self.dma_src = value,
            reg::DMA_DST if !running => self.dma_dst = value,
            reg::DMA_COUNT if !running => self.dma_count = value,
            reg::DMA_CMD if !running && value & DMA_CMD_RUN != 0 => {
                self.dma_cmd = value;
                ctx.set_timer(self.options.dma_delay, TIMER_DMA);
            }
            _ => {}
        }
    }

    fn timer(&mut self, ctx: &mut DeviceCtx<'_>, token: u64) {
        match token {
            TIMER_FACTORIAL => self.finish_factorial(ctx),
            TIMER_DMA => self.start_dma(ctx),
            _ => {}
        }
    }
}
