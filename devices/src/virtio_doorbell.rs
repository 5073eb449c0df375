//! A virtio-mmio device (virtio 1.x, register layout version 2, as QEMU's
//! `hw/virtio/virtio-mmio.c` exposes it) reduced to its transport: feature
//! negotiation, queue setup registers, the status handshake, interrupts, and
//! the queue doorbell.
//!
//! The doorbell (`QueueNotify`, 0x050) is an ioeventfd: a 4-byte guest write
//! there signals an eventfd instead of calling the device, and the device
//! runtime wakes the actor through [`Device::eventfd`]. The guest never waits
//! for the device to handle a kick. Because the ioeventfd belongs to the
//! region, moving the device (`set_address`) moves the doorbell with it.
//!
//! With [`NotifyMatch::PerQueue`] there is one eventfd per queue, matching the
//! queue index written (QEMU's `virtio_mmio_ioeventfd_assign`); with
//! [`NotifyMatch::Any`] one eventfd takes every 4-byte write and the device
//! cannot tell which queue was kicked. A write that no eventfd matches (an
//! out-of-range queue index, or another size) reaches the device's `write`
//! handler, which handles it the slow way.
//!
//! There are no virtqueues behind the doorbell: a kick is recorded, sent to
//! the backend channel if there is one, and, once the driver has set
//! `DRIVER_OK` and the kicked queue is ready, answered with a used-buffer
//! interrupt (`InterruptStatus` bit 0, interrupt line 0 raised until the
//! guest acknowledges it).
//!
//! Unlike QEMU, which assigns the ioeventfds when the driver sets
//! `DRIVER_OK`, the doorbell's ioeventfds are registered when it is made and
//! stay for its lifetime.
//!
//! Registers below 0x100 take 32-bit accesses only (others read 0 and are
//! ignored, as in QEMU); the configuration space (0x100..0x200) is empty.

#![forbid(unsafe_code)]

use crate::actor::{ActorHandle, Device, DeviceCtx, Spawned};
use crate::error::{Error, Result};
use crate::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged};
use std::sync::mpsc;
use topos_runtime::{new_event_notifier, EventNotifier, HwAddr, OpsConfig};

/// The role of the device's one region: its registers (map it in memory).
pub const REGS: &str = "regs";

/// `MagicValue`: "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// `Version` of the register layout (virtio 1.x).
pub const VERSION: u32 = 2;
/// QEMU's vendor id ("QEMU").
pub const VENDOR_QEMU: u32 = 0x554d_4551;
/// `VIRTIO_F_VERSION_1`, always offered.
pub const F_VERSION_1: u64 = 1 << 32;

/// Register offsets (virtio-mmio version 2).
pub mod reg {
    use topos_runtime::HwAddr;
    /// Magic value, read-only.
    pub const MAGIC_VALUE: HwAddr = 0x000;
    /// Layout version, read-only.
    pub const VERSION: HwAddr = 0x004;
    /// Device id, read-only.
    pub const DEVICE_ID: HwAddr = 0x008;
    /// Vendor id, read-only.
    pub const VENDOR_ID: HwAddr = 0x00c;
    /// Device features (32 bits selected by `DEVICE_FEATURES_SEL`), read-only.
    pub const DEVICE_FEATURES: HwAddr = 0x010;
    /// Device features word select, write-only.
    pub const DEVICE_FEATURES_SEL: HwAddr = 0x014;
    /// Driver features (32 bits selected by `DRIVER_FEATURES_SEL`), write-only.
    pub const DRIVER_FEATURES: HwAddr = 0x020;
    /// Driver features word select, write-only.
    pub const DRIVER_FEATURES_SEL: HwAddr = 0x024;
    /// Queue select, write-only.
    pub const QUEUE_SEL: HwAddr = 0x030;
    /// Maximum size of the selected queue, read-only.
    pub const QUEUE_NUM_MAX: HwAddr = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: HwAddr = 0x038;
    /// The selected queue is ready.
    pub const QUEUE_READY: HwAddr = 0x044;
    /// Queue notify (the doorbell), write-only.
    pub const QUEUE_NOTIFY: HwAddr = 0x050;
    /// Interrupt status, read-only.
    pub const INTERRUPT_STATUS: HwAddr = 0x060;
    /// Interrupt acknowledge, write-only.
    pub const INTERRUPT_ACK: HwAddr = 0x064;
    /// Device status.
    pub const STATUS: HwAddr = 0x070;
    /// Descriptor area, low 32 bits.
    pub const QUEUE_DESC_LOW: HwAddr = 0x080;
    /// Descriptor area, high 32 bits.
    pub const QUEUE_DESC_HIGH: HwAddr = 0x084;
    /// Driver (available) area, low 32 bits.
    pub const QUEUE_DRIVER_LOW: HwAddr = 0x090;
    /// Driver (available) area, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: HwAddr = 0x094;
    /// Device (used) area, low 32 bits.
    pub const QUEUE_DEVICE_LOW: HwAddr = 0x0a0;
    /// Device (used) area, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: HwAddr = 0x0a4;
    /// Configuration generation, read-only.
    pub const CONFIG_GENERATION: HwAddr = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: HwAddr = 0x100;
}

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Device status: the guest has a driver.
pub const STATUS_DRIVER: u32 = 2;
/// Device status: the driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Interrupt status: a used buffer was returned.
pub const INT_VRING: u32 = 1;
/// Interrupt status: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Size of the device's region.
pub const REGION_SIZE: u64 = 0x200;

/// How the doorbell's ioeventfds match guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyMatch {
    /// One eventfd per queue, matching the queue index written.
    PerQueue,
    /// One eventfd for every 4-byte write, whatever the value.
    Any,
}

/// What a [`Doorbell`] is made of.
#[derive(Debug, Clone)]
pub struct DoorbellConfig {
    /// The virtio device id (e.g. 1 for a network card, 2 for a block
    /// device).
    pub device_id: u32,
    /// The vendor id.
    pub vendor_id: u32,
    /// Device features besides `VIRTIO_F_VERSION_1`, which is always
    /// offered.
    pub features: u64,
    /// Number of queues, 1 to 1024.
    pub num_queues: u16,
    /// Maximum size of each queue.
    pub queue_num_max: u16,
    /// How QueueNotify writes are matched.
    pub notify: NotifyMatch,
    /// Where kicks are also sent, if anywhere (a stand-in for the device's
    /// queue processing).
    pub backend: Option<mpsc::Sender<Kick>>,
}

impl Default for DoorbellConfig {
    fn default() -> Self {
        DoorbellConfig {
            device_id: 2,
            vendor_id: VENDOR_QEMU,
            features: 0,
            num_queues: 1,
            queue_num_max: 256,
            notify: NotifyMatch::PerQueue,
            backend: None,
        }
    }
}

/// How a kick reached the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickPath {
    /// Through the doorbell's ioeventfd (the device's `write` was skipped).
    Ioeventfd,
    /// Through the device's `write` handler.
    Trapped,
}

/// One queue notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kick {
    /// The queue kicked, or `None` if the doorbell cannot tell
    /// ([`NotifyMatch::Any`]).
    pub queue: Option<u16>,
    /// How the kick arrived.
    pub path: KickPath,
}

#[derive(Debug, Clone, Copy, Default)]
struct Queue {
    num: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// The eventfd index of the doorbell that matches any value.
const ANY_QUEUE: usize = usize::MAX;

/// The device state, run as an actor (see its [`DeviceModel`]
/// implementation).
#[derive(Debug)]
pub struct VirtioDoorbell {
    config: DoorbellConfig,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    status: u32,
    interrupt_status: u32,
    /// Kicks per queue.
    kicks: Vec<u64>,
    /// Kicks that named no queue ([`NotifyMatch::Any`]).
    anonymous_kicks: u64,
    /// Kicks that came through the `write` handler.
    trapped_kicks: u64,
    /// Writes that reached the `write` handler.
    writes: u64,
    backend: Option<mpsc::Sender<Kick>>,
}

impl VirtioDoorbell {
    fn new(mut config: DoorbellConfig) -> VirtioDoorbell {
        let backend = config.backend.take();
        let n = config.num_queues as usize;
        VirtioDoorbell {
            config,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: vec![Queue::default(); n],
            status: 0,
            interrupt_status: 0,
            kicks: vec![0; n],
            anonymous_kicks: 0,
            trapped_kicks: 0,
            writes: 0,
            backend,
        }
    }

    /// Features the device offers.
    pub fn device_features(&self) -> u64 {
        self.config.features | F_VERSION_1
    }

    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The interrupt status register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Kicks received for `queue` (by either path).
    pub fn kicks(&self, queue: u16) -> u64 {
        self.kicks.get(queue as usize).copied().unwrap_or(0)
    }

    /// Kicks that named no queue.
    pub fn anonymous_kicks(&self) -> u64 {
        self.anonymous_kicks
    }

    /// Kicks that came through the `write` handler rather than an eventfd.
    pub fn trapped_kicks(&self) -> u64 {
        self.trapped_kicks
    }

    /// Guest writes that reached the device's `write` handler.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Whether `queue` is ready.
    pub fn queue_ready(&self, queue: u16) -> bool {
        self.queues.get(queue as usize).is_some_and(|q| q.ready)
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn update_irq(&self, ctx: &DeviceCtx<'_>) {
        if let Some(irq) = ctx.irq(0) {
            irq.set(self.interrupt_status != 0);
        }
    }

    fn reset(&mut self, ctx: &DeviceCtx<'_>) {
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues.iter_mut().for_each(|q| *q = Queue::default());
        self.status = 0;
        self.interrupt_status = 0;
        self.update_irq(ctx);
    }

    fn kick(&mut self, ctx: &DeviceCtx<'_>, queue: Option<u16>, path: KickPath) {
        if path == KickPath::Trapped {
            self.trapped_kicks += 1;
        }
        let ready = match queue {
            Some(q) => {
                if let Some(k) = self.kicks.get_mut(q as usize) {
                    *k += 1;
                }
                self.queue_ready(q)
            }
            None => {
                self.anonymous_kicks += 1;
                self.queues.iter().any(|q| q.ready)
            }
        };
        if ready && self.status & STATUS_DRIVER_OK != 0 {
            self.interrupt_status |= INT_VRING;
            self.update_irq(ctx);
        }
        if let Some(tx) = &self.backend {
            let _ = tx.send(Kick { queue, path });
        }
    }

    fn read_reg(&self, addr: HwAddr) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        let half = |v: u64, high: bool| if high { (v >> 32) as u32 } else { v as u32 };
        match addr {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.config.device_id,
            reg::VENDOR_ID => self.config.vendor_id,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |_| self.config.queue_num_max as u32),
            reg::QUEUE_NUM => q.map_or(0, |q| q.num),
            reg::QUEUE_READY => q.map_or(0, |q| q.ready as u32),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => q.map_or(0, |q| half(q.desc, addr == reg::QUEUE_DESC_HIGH)),
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                q.map_or(0, |q| half(q.driver, addr == reg::QUEUE_DRIVER_HIGH))
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                q.map_or(0, |q| half(q.device, addr == reg::QUEUE_DEVICE_HIGH))
            }
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, ctx: &DeviceCtx<'_>, addr: HwAddr, v: u32) {
        let set_half = |field: &mut u64, high: bool| {
            *field = if high { (*field & 0xffff_ffff) | (v as u64) << 32 } else { (*field & !0xffff_ffff) | v as u64 };
        };
        match addr {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v as u64) << 32,
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                let max = self.config.queue_num_max as u32;
                if let Some(q) = self.selected() {
                    if v <= max {
                        q.num = v;
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.ready = v & 1 != 0;
                }
            }
            reg::QUEUE_NOTIFY => {
                if v < self.config.num_queues as u32 {
                    let queue = match self.config.notify {
                        NotifyMatch::PerQueue => Some(v as u16),
                        NotifyMatch::Any => None,
                    };
                    self.kick(ctx, queue, KickPath::Trapped);
                } else {
                    tracing::debug!(queue = v, "virtio-mmio: notify of a queue that does not exist");
                }
            }
            reg::INTERRUPT_ACK => {
                self.interrupt_status &= !v;
                self.update_irq(ctx);
            }
            reg::STATUS => {
                if v == 0 {
                    self.reset(ctx);
                    return;
                }
                let mut v = v & 0xff;
                let newly = v & !self.status;
                if newly & STATUS_FEATURES_OK != 0 && self.driver_features & !self.device_features() != 0 {
                    // The driver accepted features the device does not
                    // offer: refuse FEATURES_OK.
                    v &= !STATUS_FEATURES_OK;
                }
                self.status = v;
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                if let Some(q) = self.selected() {
                    set_half(&mut q.desc, addr == reg::QUEUE_DESC_HIGH);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.selected() {
                    set_half(&mut q.driver, addr == reg::QUEUE_DRIVER_HIGH);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected() {
                    set_half(&mut q.device, addr == reg::QUEUE_DEVICE_HIGH);
                }
            }
            _ => {
                tracing::debug!(addr, "virtio-mmio: write to a read-only or unknown register");
            }
        }
    }
}

impl Device for VirtioDoorbell {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, size: u32) -> u64 {
        if addr >= reg::CONFIG {
            return 0;
        }
        if size != 4 {
            tracing::debug!(addr, size, "virtio-mmio: register read of the wrong size");
            return 0;
        }
        self.read_reg(addr) as u64
    }

    fn write(&mut self, ctx: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, value: u64, size: u32) {
        self.writes += 1;
        if addr >= reg::CONFIG {
            return;
        }
        if size != 4 {
            tracing::debug!(addr, size, "virtio-mmio: register write of the wrong size");
            return;
        }
        self.write_reg(ctx, addr, value as u32);
    }

    fn eventfd(&mut self, ctx: &mut DeviceCtx<'_>, index: usize) {
        let queue = if index == ANY_QUEUE { None } else { u16::try_from(index).ok() };
        self.kick(ctx, queue, KickPath::Ioeventfd);
    }
}

/// A virtio-mmio doorbell device as the embedder holds it (the handle of a
/// plugged doorbell).
pub struct Doorbell {
    handle: ActorHandle<VirtioDoorbell>,
    notifiers: Vec<EventNotifier>,
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doorbell")
            .field("device", &self.handle)
            .field("eventfds", &self.notifiers.len())
            .finish_non_exhaustive()
    }
}

/// Plugging a doorbell: one region, [`REGS`] ([`REGION_SIZE`] bytes, for
/// memory), with its QueueNotify ioeventfds registered on it (they move
/// with it) and watched. Interrupt line 0 of the context is the device's.
impl DeviceModel for VirtioDoorbell {
    type Config = DoorbellConfig;
    type Handle = Doorbell;

    fn plug(config: DoorbellConfig, ctx: PlugCtx) -> Result<Plugged<Doorbell>> {
        if !(1..=1024).contains(&config.num_queues) {
            let reason = format!("{} queues (1 to 1024)", config.num_queues);
            return Err(Error::InvalidConfig { device: "virtio-mmio", reason });
        }
        let doorbells: Vec<(usize, bool, u64)> = match config.notify {
            NotifyMatch::PerQueue => (0..config.num_queues).map(|q| (q as usize, true, q as u64)).collect(),
            NotifyMatch::Any => vec![(ANY_QUEUE, false, 0)],
        };
        let spawned = Spawned::with_options(&ctx.name, VirtioDoorbell::new(config), ctx.irqs, &ctx.runtime, ctx.actor);
        let topo = &ctx.topology;
        let region = topo.new_io_arc(&ctx.name, spawned.ops(0), OpsConfig::with_impl(1, 4), u128::from(REGION_SIZE))?;
        let handle = spawned.handle();
        let mut notifiers = Vec::new();
        topo.transaction(|| -> Result<()> {
            for (index, match_data, data) in doorbells {
                let e = new_event_notifier()?;
                region.add_eventfd(reg::QUEUE_NOTIFY, 4, match_data, data, &e)?;
                handle.watch_eventfd(e.clone(), index)?;
                notifiers.push(e);
            }
            Ok(())
        })??;
        Ok(Plugged::new(vec![DeviceRegion::memory(REGS, region)], Doorbell { handle, notifiers }))
    }
}

impl Doorbell {
    /// A handle to the device's actor.
    pub fn handle(&self) -> &ActorHandle<VirtioDoorbell> {
        &self.handle
    }

    /// The doorbell's eventfds: one per queue, or one for all.
    pub fn notifiers(&self) -> &[EventNotifier] {
        &self.notifiers
    }
}
