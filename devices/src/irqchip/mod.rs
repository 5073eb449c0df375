//! The interrupt controllers of a PC in user space, for the x86
//! interpreter (KVM has them in the kernel): the 8259 PIC pair, the 8254
//! PIT, the IOAPIC, and one local APIC per vCPU — wired as QEMU's `pc`
//! wires them.
//!
//! | part | file | guest interface |
//! | --- | --- | --- |
//! | [`Irqchip`] | `mod.rs` | one per VM: owns everything below; device lines (GSIs) come in through [`Irqchip::interrupt_sink`] |
//! | 8259A pair + ELCR | `pic.rs` | ports `0x20`-`0x21`, `0xa0`-`0xa1`, `0x4d0`-`0x4d1` |
//! | 8254 PIT | `pit.rs` | ports `0x40`-`0x43`, `0x61` (channel 2 gate/OUT, as QEMU's `pcspk`) |
//! | IOAPIC | `ioapic.rs` | MMIO at [`IOAPIC_BASE`] (24 pins) |
//! | local APIC | `lapic.rs` | the page at [`LocalApic::page`], reached by the vCPU itself ([`LocalApic::read`], [`LocalApic::write`]), `IA32_APIC_BASE` |
//! | interrupt messages | `routing.rs` | IOAPIC → local APICs, IPIs |
//! | time | `clock.rs` | the deadline thread that fires the APIC timers and the PIT |
//!
//! ## Wiring (QEMU's `pc`)
//!
//! GSIs 0-15 are the ISA IRQs: each goes to the PIC input of the same
//! number and to the IOAPIC pin of the same number, except ISA IRQ 0 (the
//! PIT), which goes to IOAPIC pin 2 (the interrupt source override every
//! `pc` firmware reports). GSIs 16-23 go to the IOAPIC only. The PIC's
//! INTR goes to the boot processor's LINT0 (see [`LocalApic`]). The PIT's
//! channel 0 drives GSI 0.
//!
//! ## Threads and locks
//!
//! The PIC, the PIT and the IOAPIC each sit behind their own mutex, held
//! only for the access at hand; a guest access to their ports or page
//! from any vCPU runs on that vCPU's thread, a device's line change on the
//! device's. Interrupts reach a local APIC by *posting* (atomics, then its
//! attention flag, then its vCPU's waker: see [`LocalApic`]), never by
//! locking the vCPU. Lock order, for whoever extends this: a PIT or APIC
//! timer's lock before the PIC's and the IOAPIC's, all of those before the
//! clock's; a waker (a vCPU kick) may be called with any of them held and
//! must not call back in.
//!
//! ```
//! use std::sync::mpsc;
//! use std::sync::Arc;
//! use std::time::Duration;
//! use topos_devices::irqchip::Irqchip;
//!
//! let chip = Irqchip::new(1);
//! let mut apic = chip.take_lapic(0).unwrap();
//! let (kick, kicked) = mpsc::channel();
//! let kick = std::sync::Mutex::new(kick);
//! chip.set_waker(0, Arc::new(move || drop(kick.lock().unwrap().send(()))));
//! apic.write(0xf0, 0x1ff); // SVR: software-enable the APIC
//! apic.write(0x320, 0x40); // LVT timer: vector 0x40, one-shot
//! apic.write(0x3e0, 0x0b); // divide by 1
//! apic.write(0x380, 1000); // 1 µs
//! kicked.recv_timeout(Duration::from_secs(10)).unwrap();
//! assert!(apic.attention());
//! assert_eq!(apic.take_interrupt(), Some(0x40));
//! ```

#![forbid(unsafe_code)]

mod clock;
mod ioapic;
mod lapic;
mod pic;
mod pit;
mod regions;
mod routing;

pub use lapic::{LocalApic, Startup, APIC_BASE_ADDRESS_BITS, APIC_BUS_HZ, APIC_DEFAULT_BASE, APIC_VERSION};

use crate::error::{Error, Result};
use crate::irq::InterruptSink;
use crate::sync::{Arc, AtomicBool, Mutex, Ordering, Weak};
use clock::Clock;
use ioapic::IoApic;
use lapic::LapicShared;
use pic::PicPair;
use pit::Pit;
use routing::Message;
use topos_runtime::{MemoryRegion, Topology};

/// Where the IOAPIC's registers are in system memory.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// The IOAPIC's pins (GSIs 0-23).
pub const IOAPIC_PINS: u32 = ioapic::PINS as u32;
/// The GSIs: 0-15 ISA IRQs (PIC and IOAPIC), 16-23 IOAPIC only.
pub const GSIS: u32 = IOAPIC_PINS;
/// The most vCPUs an [`Irqchip`] serves (xAPIC IDs 0-254; 255 is the
/// broadcast address).
pub const MAX_CPUS: u32 = 255;
/// The 8259 master's ports.
pub const PIC_MASTER_PORT: u64 = 0x20;
/// The 8259 slave's ports.
pub const PIC_SLAVE_PORT: u64 = 0xa0;
/// The ELCR ports (master, then slave).
pub const ELCR_PORT: u64 = 0x4d0;
/// The 8254's ports.
pub const PIT_PORT: u64 = 0x40;
/// Port `0x61`: the PIT channel 2 gate and output (QEMU's `pcspk`).
pub const SPEAKER_PORT: u64 = 0x61;

/// How a vCPU is woken when something is posted to it (a closure that
/// kicks its thread).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// The interrupt controllers of one VM (see the [module](self)
/// documentation): the PICs, the PIT, the IOAPIC, and the shared halves of
/// the local APICs. Dropping it (once every [`LocalApic`] is dropped too)
/// stops its deadline thread.
pub struct Irqchip {
    shared: Arc<Shared>,
}

/// Everything the regions, the interrupt sink and the deadline thread
/// share.
pub(crate) struct Shared {
    me: Weak<Shared>,
    cpus: u32,
    lapics: Box<[LapicShared]>,
    taken: Box<[AtomicBool]>,
    pic: Mutex<PicPair>,
    /// The PIC's INTR output (a mirror, written under `pic`).
    pic_intr: AtomicBool,
    ioapic: Mutex<IoApic>,
    pit: Mutex<Pit>,
    clock: Clock,
}

impl std::fmt::Debug for Irqchip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Irqchip")
            .field("cpus", &self.shared.cpus)
            .field("pic_intr", &self.shared.pic_intr.load(Ordering::Relaxed))
            .field("lapics", &self.shared.lapics)
            .field("clock", &self.shared.clock)
            .finish_non_exhaustive()
    }
}

impl Irqchip {
    /// The controllers of a VM with `cpus` vCPUs, at power-on. `cpus` is
    /// clamped to 1..=[`MAX_CPUS`] (with a warning); [`try_new`](Self::try_new)
    /// refuses instead.
    pub fn new(cpus: u32) -> Arc<Irqchip> {
        let clamped = cpus.clamp(1, MAX_CPUS);
        if clamped != cpus {
            tracing::warn!(cpus, clamped, "Irqchip::new: vCPU count out of range, clamped");
        }
        Irqchip::build(clamped)
    }

    /// The controllers of a VM with `cpus` vCPUs; an error unless `cpus`
    /// is 1 to [`MAX_CPUS`].
    pub fn try_new(cpus: u32) -> Result<Arc<Irqchip>> {
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(Error::InvalidConfig {
                device: "irqchip",
                reason: format!("{cpus} vCPUs (the local APICs serve 1 to {MAX_CPUS})"),
            });
        }
        Ok(Irqchip::build(cpus))
    }

    fn build(cpus: u32) -> Arc<Irqchip> {
        let clock = Clock::new(cpus as usize + 1);
        let pit = Pit::new(clock.now());
        let shared = Arc::new_cyclic(|me| Shared {
            me: me.clone(),
            cpus,
            lapics: (0..cpus).map(LapicShared::new).collect(),
            taken: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
            pic: Mutex::new(PicPair::new()),
            pic_intr: AtomicBool::new(false),
            ioapic: Mutex::new(IoApic::new()),
            pit: Mutex::new(pit),
            clock,
        });
        Arc::new(Irqchip { shared })
    }

    /// How many vCPUs it serves.
    pub fn cpus(&self) -> u32 {
        self.shared.cpus
    }

    /// The vCPU-owned half of CPU `cpu`'s local APIC, at power-on; `None`
    /// if it was taken before or `cpu` is out of range.
    pub fn take_lapic(self: &Arc<Self>, cpu: u32) -> Option<LocalApic> {
        let taken = self.shared.taken.get(cpu as usize)?;
        if taken.swap(true, Ordering::SeqCst) {
            return None;
        }
        Some(LocalApic::new(self.clone(), cpu))
    }

    /// Where device interrupt lines go: line `n` is GSI `n` (see the
    /// [module](self) documentation for the wiring; lines from 24 on are
    /// ignored, traced).
    pub fn interrupt_sink(self: &Arc<Self>) -> Arc<dyn InterruptSink> {
        Arc::new(GsiSink(self.shared.clone()))
    }

    /// Sets GSI `gsi` to `level` (what the [`interrupt_sink`](Self::interrupt_sink) does).
    pub fn set_gsi(&self, gsi: u32, level: bool) {
        self.shared.set_gsi(gsi, level);
    }

    /// Maps the controllers' registers: in `io`, the PICs (`0x20`-`0x21`,
    /// `0xa0`-`0xa1`), the ELCRs (`0x4d0`, `0x4d1`), the PIT (`0x40`-`0x43`)
    /// and port `0x61`; in `system`, the IOAPIC at [`IOAPIC_BASE`]. The
    /// regions are named as QEMU names them (`pic`, `elcr`, `pit`, `pcspk`,
    /// `ioapic`). Call it inside the board's build transaction.
    pub fn map(&self, topo: &Topology, io: &MemoryRegion, system: &MemoryRegion) -> Result<()> {
        regions::map(&self.shared, topo, io, system)
    }

    /// How CPU `cpu`'s vCPU is woken when something is posted to it (the
    /// machine passes a closure that kicks that vCPU's thread). Replaces an
    /// earlier waker. Events posted before a waker is set are not lost:
    /// they are pending, and the waker is called at once if any is. A `cpu`
    /// out of range is ignored (traced).
    pub fn set_waker(&self, cpu: u32, waker: Waker) {
        match self.shared.lapics.get(cpu as usize) {
            Some(lapic) => lapic.set_waker(waker),
            None => tracing::warn!(cpu, "Irqchip::set_waker: no such vCPU"),
        }
    }
}

impl Drop for Irqchip {
    fn drop(&mut self) {
        self.shared.clock.shutdown();
    }
}

/// The sink device lines are wired to.
struct GsiSink(Arc<Shared>);

impl InterruptSink for GsiSink {
    fn set_level(&self, line: u32, level: bool) {
        self.0.set_gsi(line, level);
    }
}

/// The clock slot of the PIT (after the local APICs').
fn pit_slot(cpus: u32) -> usize {
    cpus as usize
}

impl Shared {
    fn upgrade(&self) -> Option<Arc<Shared>> {
        self.me.upgrade()
    }

    /// Sets timer source `slot`'s next deadline.
    pub(crate) fn arm(&self, slot: usize, deadline: Option<u64>) {
        self.clock.arm(slot, deadline, self);
    }

    /// The deadline thread found source `slot` due at `now`.
    fn fire(&self, slot: usize, now: u64) {
        if slot == pit_slot(self.cpus) {
            let mut pit = self.pit.lock();
            if pit.expire(now) {
                self.set_gsi(0, true);
                self.set_gsi(0, false);
            }
            self.arm(slot, pit.deadline());
        } else if let Some(lapic) = self.lapics.get(slot) {
            let mut timer = lapic.timer.lock();
            if let Some(vector) = timer.expire(now) {
                lapic.post_fixed(vector, false);
            }
            self.arm(slot, timer.deadline());
        }
    }

    /// A PIT access at the clock's current time; re-arms its deadline.
    fn with_pit<R>(&self, f: impl FnOnce(&mut Pit, u64) -> R) -> R {
        let now = self.clock.now();
        let mut pit = self.pit.lock();
        let r = f(&mut pit, now);
        self.arm(pit_slot(self.cpus), pit.deadline());
        r
    }

    /// A PIC operation; forwards a rise of INTR to the boot processor.
    fn with_pic<R>(&self, f: impl FnOnce(&mut PicPair) -> R) -> R {
        let (r, rose) = {
            let mut pic = self.pic.lock();
            let r = f(&mut pic);
            let out = pic.output();
            let was = self.pic_intr.swap(out, Ordering::AcqRel);
            (r, out && !was)
        };
        if rose {
            self.lapics[0].notify();
        }
        r
    }

    /// The PIC's INTA cycle: the vector (if `only_if_requesting`, only
    /// while INTR is up).
    pub(crate) fn pic_acknowledge(&self, only_if_requesting: bool) -> Option<u8> {
        self.with_pic(|pic| (!only_if_requesting || pic.output()).then(|| pic.acknowledge()))
    }

    /// GSI `gsi` is now at `level`.
    fn set_gsi(&self, gsi: u32, level: bool) {
        if gsi >= GSIS {
            tracing::debug!(gsi, "interrupt controllers: no such GSI");
            return;
        }
        if gsi < 16 && gsi != 2 {
            self.with_pic(|pic| pic.set_irq(gsi, level));
        }
        let pin = if gsi == 0 { 2 } else { gsi as usize };
        self.ioapic.lock().set_pin(pin, level, &mut |m| self.deliver(m));
    }

    /// A local APIC's EOI of a level-triggered vector.
    pub(crate) fn ioapic_eoi(&self, vector: u8) {
        self.ioapic.lock().eoi(vector, &mut |m| self.deliver(m));
    }

    /// Delivers an interrupt message to the local APICs.
    pub(crate) fn deliver(&self, message: Message) {
        routing::deliver(&self.lapics, message);
    }
}

#[cfg(test)]
mod tests;
