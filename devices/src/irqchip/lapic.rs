//! The local APIC of one vCPU: [`LocalApic`] (its documentation describes
//! the model and the posting protocol) and its shared half.

use super::clock::{next_period, period_of};
use super::routing::{DeliveryMode, Destination, Message};
use super::{Irqchip, Waker};
use crate::sync::{fence, Arc, AtomicBool, AtomicU32, Mutex, Ordering};

/// The version register: version 0x14, highest LVT entry 5.
pub const APIC_VERSION: u32 = 0x0005_0014;
/// The APIC page's guest-physical address at reset.
pub const APIC_DEFAULT_BASE: u64 = 0xfee0_0000;
/// The APIC bus (timer input) frequency, as QEMU's and KVM's: 1 GHz, one
/// tick per nanosecond before the divider.
pub const APIC_BUS_HZ: u64 = 1_000_000_000;
/// The physical address width `IA32_APIC_BASE` is checked against: base
/// bits at or above it are reserved (a write setting one is refused).
pub const APIC_BASE_ADDRESS_BITS: u32 = 36;

/// `IA32_APIC_BASE`: the boot processor flag.
const MSR_BSP: u64 = 1 << 8;
/// `IA32_APIC_BASE`: the APIC global enable.
const MSR_ENABLE: u64 = 1 << 11;
/// `IA32_APIC_BASE`: the bits a write may set (BSP, enable, base).
const MSR_WRITABLE: u64 = MSR_BSP | MSR_ENABLE | (((1 << APIC_BASE_ADDRESS_BITS) - 1) & !0xfff);

/// SVR: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// SVR: the writable bits (vector, enable, focus processor checking).
const SVR_WRITABLE: u32 = 0x3ff;

/// LVT and ICR: the mask bit.
const MASKED: u32 = 1 << 16;
/// LVT timer: periodic mode.
const TIMER_PERIODIC: u32 = 1 << 17;

/// LVT entries, in register order from `0x320`.
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_COUNT: usize = 6;
/// The writable bits of each LVT entry.
const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0003_00ff, // timer: vector, mask, periodic
    0x0001_07ff, // thermal: vector, delivery mode, mask
    0x0001_07ff, // performance counters: vector, delivery mode, mask
    0x0001_a7ff, // LINT0: vector, delivery mode, polarity, trigger mode, mask
    0x0001_a7ff, // LINT1
    0x0001_00ff, // error: vector, mask
];
/// LINT0 at the BSP's reset: ExtINT, unmasked (virtual wire).
const LINT0_EXTINT: u32 = 7 << 8;

/// Pending event bits of `LapicShared::events`.
const EV_NMI: u32 = 1 << 0;
const EV_INIT: u32 = 1 << 1;
const EV_SIPI: u32 = 1 << 2;
const EV_EXTINT: u32 = 1 << 3;
/// Where a pending SIPI's vector is kept.
const SIPI_SHIFT: u32 = 8;

/// Routing status bits of `LapicShared::status`.
const ST_HW_ENABLED: u32 = 1 << 0;
const ST_SW_ENABLED: u32 = 1 << 1;

/// What INIT or SIPI asks of the vCPU ([`LocalApic::take_startup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// INIT: reset the processor (its local APIC with
    /// [`LocalApic::reset`]); an application processor then waits for a
    /// SIPI.
    Init,
    /// A start-up IPI with this vector: a processor waiting for SIPI
    /// starts in real mode at `vector << 12` (CS `vector << 8`, IP 0).
    /// Ignored by a processor that is not waiting for one.
    Sipi(u8),
}

/// The APIC timer's state (under `LapicShared::timer`; times in ns of the
/// [`Irqchip`]'s clock).
#[derive(Debug, Clone)]
pub(crate) struct ApicTimer {
    /// The LVT timer entry.
    lvt: u32,
    /// The initial count register.
    initial: u32,
    /// The divide configuration register (bits 0, 1, 3).
    divide: u32,
    /// When it next expires; `None` when stopped or a one-shot ran out.
    deadline: Option<u64>,
}

impl ApicTimer {
    fn new() -> ApicTimer {
        ApicTimer { lvt: MASKED, initial: 0, divide: 0, deadline: None }
    }

    /// Bus clocks per timer tick (1, 2, 4, ... 128).
    fn divisor(&self) -> u64 {
        let code = (self.divide & 3) | ((self.divide & 8) >> 1);
        1 << ((code + 1) & 7)
    }

    fn periodic(&self) -> bool {
        self.lvt & TIMER_PERIODIC != 0
    }

    /// The span of one count-down, in ns (at least 200 µs when periodic).
    fn span(&self) -> u64 {
        let span = u64::from(self.initial) * self.divisor();
        if self.periodic() {
            period_of(span, "local APIC")
        } else {
            span
        }
    }

    /// The guest wrote the initial count: counting restarts now.
    fn set_initial(&mut self, count: u32, now: u64) {
        self.initial = count;
        self.deadline = (count != 0).then(|| now + self.span());
    }

    /// The guest wrote the divide configuration: the count left is kept
    /// and counts down at the new rate.
    fn set_divide(&mut self, value: u32, now: u64) {
        let old = self.divisor();
        self.divide = value & 0xb;
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_sub(now) / old * self.divisor();
            self.deadline = Some(now + left);
        }
    }

    /// The current count register.
    fn current(&self, now: u64) -> u32 {
        match self.deadline {
            Some(deadline) if deadline > now => ((deadline - now) / self.divisor()).min(u64::from(self.initial)) as u32,
            _ => 0,
        }
    }

    /// At or after the deadline: the vector to post (if the entry is not
    /// masked), and the next deadline set.
    pub(crate) fn expire(&mut self, now: u64) -> Option<u8> {
        match self.deadline {
            Some(deadline) if deadline <= now => {
                if self.periodic() && self.initial != 0 {
                    self.deadline = Some(next_period(deadline, now, self.span()));
                } else {
                    self.deadline = None;
                }
                (self.lvt & MASKED == 0).then_some(self.lvt as u8)
            }
            _ => None,
        }
    }

    /// When it next expires.
    pub(crate) fn deadline(&self) -> Option<u64> {
        self.deadline
    }
}

/// The half of a local APIC other threads touch (see [`LocalApic`]).
pub(crate) struct LapicShared {
    /// Interrupt request register, 256 bits.
    irr: [AtomicU32; 8],
    /// Trigger mode register (set with the IRR bit: 1 = level).
    tmr: [AtomicU32; 8],
    /// Pending NMI, INIT, SIPI (with its vector) and ExtINT.
    events: AtomicU32,
    /// Something may need the vCPU's attention.
    attention: AtomicBool,
    /// Kicks the vCPU's thread.
    waker: Mutex<Option<Waker>>,
    /// Routing mirrors, written by the owner: APIC ID.
    id: AtomicU32,
    /// The LDR (logical ID in bits 24-31).
    ldr: AtomicU32,
    /// The DFR (model in bits 28-31).
    dfr: AtomicU32,
    /// `ST_*` bits.
    status: AtomicU32,
    /// The TPR (for lowest-priority arbitration).
    tpr: AtomicU32,
    /// The APIC timer.
    pub(crate) timer: Mutex<ApicTimer>,
}

impl std::fmt::Debug for LapicShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LapicShared")
            .field("id", &self.routing_id())
            .field("events", &self.events.load(Ordering::Relaxed))
            .field("attention", &self.attention.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl LapicShared {
    /// CPU `cpu`'s at power-on: ID `cpu`, enabled in the MSR, software
    /// disabled.
    pub(crate) fn new(cpu: u32) -> LapicShared {
        LapicShared {
            irr: Default::default(),
            tmr: Default::default(),
            events: AtomicU32::new(0),
            attention: AtomicBool::new(false),
            waker: Mutex::new(None),
            id: AtomicU32::new(cpu & 0xff),
            ldr: AtomicU32::new(0),
            dfr: AtomicU32::new(0xffff_ffff),
            status: AtomicU32::new(ST_HW_ENABLED),
            tpr: AtomicU32::new(0),
            timer: Mutex::new(ApicTimer::new()),
        }
    }

    pub(crate) fn routing_id(&self) -> u32 {
        self.id.load(Ordering::Relaxed)
    }

    pub(crate) fn routing_logical_id(&self) -> u32 {
        self.ldr.load(Ordering::Relaxed) >> 24
    }

    pub(crate) fn routing_model(&self) -> u32 {
        self.dfr.load(Ordering::Relaxed) >> 28
    }

    pub(crate) fn routing_priority(&self) -> u32 {
        self.tpr.load(Ordering::Relaxed)
    }

    pub(crate) fn hardware_enabled(&self) -> bool {
        self.status.load(Ordering::Relaxed) & ST_HW_ENABLED != 0
    }

    pub(crate) fn software_enabled(&self) -> bool {
        self.status.load(Ordering::Relaxed) & ST_SW_ENABLED != 0
    }

    /// Sets the attention flag, then wakes the vCPU. Called after the
    /// event is recorded; the fence pairs with the one in
    /// [`LocalApic`]'s look (see the type's documentation).
    pub(crate) fn notify(&self) {
        fence(Ordering::SeqCst);
        self.attention.store(true, Ordering::Release);
        let waker = self.waker.lock().clone();
        if let Some(waker) = waker {
            waker();
        }
    }

    /// Installs the vCPU's waker; calls it if something was posted before.
    pub(crate) fn set_waker(&self, waker: Waker) {
        *self.waker.lock() = Some(waker.clone());
        if self.attention.load(Ordering::Acquire) {
            waker();
        }
    }

    /// Posts a fixed interrupt (from the IOAPIC, an IPI or the APIC's own
    /// LVT): sets its TMR bit as `level` says and its IRR bit. Dropped,
    /// as KVM does, by an APIC that is not enabled.
    pub(crate) fn post_fixed(&self, vector: u8, level: bool) {
        if self.status.load(Ordering::Relaxed) != ST_HW_ENABLED | ST_SW_ENABLED {
            tracing::debug!(vector, "local APIC: fixed interrupt to a disabled APIC dropped");
            return;
        }
        let (word, bit) = (usize::from(vector >> 5), 1u32 << (vector & 31));
        if level {
            self.tmr[word].fetch_or(bit, Ordering::Relaxed);
        } else {
            self.tmr[word].fetch_and(!bit, Ordering::Relaxed);
        }
        // Release: whoever sees the IRR bit sees the TMR bit.
        self.irr[word].fetch_or(bit, Ordering::Release);
        self.notify();
    }

    pub(crate) fn post_nmi(&self) {
        self.events.fetch_or(EV_NMI, Ordering::AcqRel);
        self.notify();
    }

    /// INIT: pending, and a SIPI that came before it is void.
    pub(crate) fn post_init(&self) {
        let _ = self.events.fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
            Some((e | EV_INIT) & !(EV_SIPI | 0xff << SIPI_SHIFT))
        });
        self.notify();
    }

    /// A SIPI with `vector` (a later one replaces one not yet taken).
    pub(crate) fn post_startup(&self, vector: u8) {
        let _ = self.events.fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
            Some((e & !(0xff << SIPI_SHIFT)) | EV_SIPI | u32::from(vector) << SIPI_SHIFT)
        });
        self.notify();
    }

    pub(crate) fn post_extint(&self) {
        self.events.fetch_or(EV_EXTINT, Ordering::AcqRel);
        self.notify();
    }

    /// The highest vector in the IRR.
    fn highest_irr(&self) -> Option<u8> {
        highest_by(|w| self.irr[w].load(Ordering::Acquire))
    }
}

/// The highest bit set in a 256-bit register.
fn highest(bits: &[u32; 8]) -> Option<u8> {
    highest_by(|w| bits[w])
}

/// The highest bit set in a 256-bit register whose 32-bit words `word`
/// reads (from the top, stopping at the first word with a bit set).
fn highest_by(word: impl Fn(usize) -> u32) -> Option<u8> {
    (0..8).rev().find_map(|w| {
        let bits = word(w);
        (bits != 0).then(|| (w * 32 + 31 - bits.leading_zeros() as usize) as u8)
    })
}

/// The vCPU-owned half of a local APIC (xAPIC, memory-mapped; no x2APIC).
/// Obtained from [`Irqchip::take_lapic`]; keeps its [`Irqchip`] alive.
///
/// A local APIC is split in two halves:
///
/// * [`LocalApic`], owned by the vCPU thread: the registers only the CPU
///   itself reads or writes (ISR, TPR, SVR, LVT, ICR, ...), reached through
///   `&mut self` from the interpreter's accesses to the APIC page and from
///   its interrupt checks;
/// * `LapicShared`, inside the [`Irqchip`]: what other threads touch —
///   the IRR and TMR (set by the IOAPIC, by other vCPUs' IPIs, by the
///   timer), the pending NMI, INIT, SIPI and ExtINT, the *attention* flag,
///   the waker, the APIC timer, and atomic mirrors of the routing state
///   (ID, logical destination, DFR, enable bits, TPR) that senders read to
///   pick their targets.
///
/// ## Posting, attention and halts
///
/// Any thread posts an event to a local APIC in three steps: it records
/// the event (sets the IRR bit with release ordering, or the
/// NMI/INIT/SIPI/ExtINT bit), then — after a sequentially consistent fence
/// — sets the APIC's attention flag, then calls the vCPU's waker (which
/// kicks its thread out of a halt).
///
/// The vCPU thread polls [`LocalApic::attention`] once per block (one
/// acquire load). When it is set, the CPU core calls the `take_*` methods;
/// each first clears the flag and issues a sequentially consistent fence,
/// then takes what it can, then sets the flag again if anything is still
/// pending (an interrupt it could not take, an NMI besides an interrupt,
/// ...). The two fences make this a store-fence-load handshake: either the
/// look sees the event, or the poster's flag store is ordered after the
/// clear — no event is ever left pending with the flag clear. Writes of the
/// vCPU's own that can make a held interrupt deliverable (EOI, TPR, SVR,
/// LINT0, the base MSR) set the flag too.
///
/// Before halting, the vCPU thread reads its control's kick count, checks
/// [`LocalApic::interrupt_pending`] (and NMI/INIT/SIPI), and only then
/// waits, in a wait that returns at once if a kick came after the count
/// was read (`Control::halt` in the vCPU crate). A post that the check
/// missed kicks after the check, hence after the count was read: the halt
/// ends. The loom model `loom-tests/tests/irqchip_post.rs` checks this
/// with the real code, and `Irqchip::set_waker` closes the same race for
/// events posted before a waker exists.
///
/// ## Registers
///
/// ID (writable, as KVM allows in xAPIC mode), version `0x00050014`
/// (version 0x14, six LVT entries, as KVM reports), TPR, APR (computed as
/// the SDM gives it), PPR, EOI, LDR, DFR, SVR (vector, APIC software
/// enable, focus-check disable; clearing the enable masks every LVT entry
/// and keeps them masked while disabled), ISR, TMR, IRR, ESR (no error is
/// ever latched), ICR, the LVT entries (timer, thermal, performance,
/// LINT0, LINT1, error) and the timer's initial count, current count and
/// divide configuration. Reserved bits read as 0 and ignore writes;
/// reserved registers read 0. Reads take the dword at a 16-byte boundary
/// (the CPU core extracts smaller reads from it); writes must be 32-bit at
/// a 16-byte boundary, others are ignored (as KVM does).
///
/// ## IPIs
///
/// A write of the ICR's low half sends: fixed, lowest priority, NMI, INIT,
/// start-up; to the destination in ICR bits 56-63 — physical (an APIC ID,
/// `0xff` for all) or logical (flat or cluster model, as each target's
/// DFR says) — or to a shorthand (self, all including self, all excluding
/// self). Lowest priority goes to the target with the lowest TPR. An APIC
/// disabled in its MSR receives nothing; a software-disabled one takes
/// NMI, INIT and SIPI but drops fixed and lowest-priority interrupts (as
/// KVM does). An INIT "level de-assert" (level-triggered, level bit clear)
/// does nothing, as on every processor since the Pentium 4. SMI and ExtINT
/// IPIs are dropped (traced). The delivery-status bit always reads idle: a
/// message is delivered before the write returns.
///
/// ## The timer
///
/// One-shot and periodic modes (TSC-deadline is not offered), counting at
/// the 1 GHz bus clock of QEMU and KVM divided by the divide configuration;
/// the current count is computed from the host's monotonic clock, and
/// expiries come from the [`Irqchip`]'s deadline thread, so a halted vCPU
/// is woken. A periodic period is at least 200 µs (KVM's
/// `min_timer_period_us`); expiries the host missed are not made up for.
///
/// ## The 8259 through LINT0
///
/// The boot processor's LINT0 is the PIC's INTR. At reset it is
/// programmed ExtINT and unmasked (what firmware sets up for virtual-wire
/// mode, and what KVM's reset gives the BSP). The PIC's interrupts reach
/// the boot processor when LINT0 is unmasked ExtINT, or when its APIC is
/// disabled, globally (MSR) or by software (SVR); the vector then comes
/// from the PIC's INTA cycle. An ExtINT message from the IOAPIC does the
/// same on any CPU. A PIC interrupt goes before the APIC's own, as on KVM.
pub struct LocalApic {
    chip: Arc<Irqchip>,
    cpu: u32,
    /// `IA32_APIC_BASE`.
    base: u64,
    id: u32,
    isr: [u32; 8],
    tpr: u32,
    svr: u32,
    ldr: u32,
    dfr: u32,
    esr: u32,
    icr: u32,
    icr2: u32,
    lvt: [u32; LVT_COUNT],
}

impl std::fmt::Debug for LocalApic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalApic")
            .field("cpu", &self.cpu)
            .field("base", &format_args!("{:#x}", self.base))
            .field("id", &self.id)
            .field("tpr", &self.tpr)
            .field("svr", &format_args!("{:#x}", self.svr))
            .field("isr", &self.isr)
            .field("lvt", &self.lvt)
            .finish_non_exhaustive()
    }
}

impl LocalApic {
    /// CPU `cpu`'s, at power-on.
    pub(crate) fn new(chip: Arc<Irqchip>, cpu: u32) -> LocalApic {
        let mut apic = LocalApic {
            chip,
            cpu,
            base: 0,
            id: cpu & 0xff,
            isr: [0; 8],
            tpr: 0,
            svr: 0xff,
            ldr: 0,
            dfr: 0xffff_ffff,
            esr: 0,
            icr: 0,
            icr2: 0,
            lvt: [MASKED; LVT_COUNT],
        };
        apic.power_on();
        apic
    }

    fn shared(&self) -> &LapicShared {
        &self.chip.shared.lapics[self.cpu as usize]
    }

    /// The power-on state (the ID is kept).
    fn power_on(&mut self) {
        self.base = APIC_DEFAULT_BASE | MSR_ENABLE | if self.is_bsp() { MSR_BSP } else { 0 };
        self.isr = [0; 8];
        self.tpr = 0;
        self.svr = 0xff;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.esr = 0;
        self.icr = 0;
        self.icr2 = 0;
        self.lvt = [MASKED; LVT_COUNT];
        if self.is_bsp() {
            self.lvt[LVT_LINT0] = LINT0_EXTINT;
        }
        let sh = &self.chip.shared.lapics[self.cpu as usize];
        for w in 0..8 {
            sh.irr[w].store(0, Ordering::Relaxed);
            sh.tmr[w].store(0, Ordering::Relaxed);
        }
        sh.events.fetch_and(!(EV_NMI | EV_EXTINT), Ordering::AcqRel);
        sh.ldr.store(0, Ordering::Relaxed);
        sh.dfr.store(0xffff_ffff, Ordering::Relaxed);
        sh.tpr.store(0, Ordering::Relaxed);
        sh.id.store(self.id, Ordering::Relaxed);
        self.mirror_status();
        {
            let mut timer = sh.timer.lock();
            *timer = ApicTimer::new();
            self.chip.shared.arm(self.cpu as usize, None);
        }
    }

    fn mirror_status(&self) {
        let mut status = 0;
        if self.base & MSR_ENABLE != 0 {
            status |= ST_HW_ENABLED;
            if self.svr & SVR_ENABLE != 0 {
                status |= ST_SW_ENABLED;
            }
        }
        self.shared().status.store(status, Ordering::Relaxed);
    }

    /// The APIC ID (the CPU index at power-on; the guest may change it).
    pub fn apic_id(&self) -> u32 {
        self.id
    }

    /// Whether this is the boot processor (CPU 0).
    pub fn is_bsp(&self) -> bool {
        self.cpu == 0
    }

    /// The CPU index this APIC belongs to.
    pub fn cpu(&self) -> u32 {
        self.cpu
    }

    /// `IA32_APIC_BASE` (MSR `0x1b`): at power-on `0xfee00000`, enabled
    /// (bit 11), and the boot processor flag (bit 8) on CPU 0.
    pub fn base_msr(&self) -> u64 {
        self.base
    }

    /// A `wrmsr` of `IA32_APIC_BASE`; `false` (nothing changed) if `value`
    /// sets a reserved bit (bits 0-7, 9, 10 — x2APIC is not offered — and
    /// the base above [`APIC_BASE_ADDRESS_BITS`]): the core raises `#GP`.
    ///
    /// Clearing the enable bit disables the APIC (it receives nothing, and
    /// the PIC reaches the boot processor directly) and clears the SVR's
    /// software enable, as QEMU does; setting it again enables it (as KVM
    /// allows). The BSP flag is writable, as on KVM (it does not change
    /// [`is_bsp`](Self::is_bsp)).
    pub fn set_base_msr(&mut self, value: u64) -> bool {
        if value & !MSR_WRITABLE != 0 {
            tracing::debug!(cpu = self.cpu, value, "local APIC: IA32_APIC_BASE write with reserved bits");
            return false;
        }
        self.base = value;
        if value & MSR_ENABLE == 0 {
            self.svr &= !SVR_ENABLE;
        }
        self.mirror_status();
        self.refresh_attention();
        true
    }

    /// The guest-physical address of the APIC's register page while it is
    /// enabled in `IA32_APIC_BASE` (the core sends that page's accesses to
    /// [`read`](Self::read) and [`write`](Self::write)).
    pub fn page(&self) -> Option<u64> {
        (self.base & MSR_ENABLE != 0).then_some(self.base & MSR_WRITABLE & !0xfff)
    }

    /// The processor priority: the TPR, or the class of the highest
    /// in-service vector if that is higher.
    fn ppr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, u32::from);
        if self.tpr & 0xf0 >= isrv & 0xf0 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// The arbitration priority, as the SDM defines it.
    fn apr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, u32::from) & 0xf0;
        let irrv = self.shared().highest_irr().map_or(0, u32::from) & 0xf0;
        let tpr_class = self.tpr & 0xf0;
        if tpr_class >= isrv && tpr_class >= irrv {
            self.tpr
        } else {
            tpr_class.max(isrv).max(irrv)
        }
    }

    /// The highest vector of the IRR that the PPR lets in now.
    fn deliverable_vector(&self) -> Option<u8> {
        if self.shared().status.load(Ordering::Relaxed) != ST_HW_ENABLED | ST_SW_ENABLED {
            return None;
        }
        let vector = self.shared().highest_irr()?;
        (u32::from(vector) & 0xf0 > self.ppr() & 0xf0).then_some(vector)
    }

    /// Whether the PIC's INTR reaches this CPU (see the type's
    /// documentation).
    fn accepts_pic(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        self.is_bsp()
            && (self.base & MSR_ENABLE == 0
                || self.svr & SVR_ENABLE == 0
                || (lint0 & MASKED == 0 && DeliveryMode::from_bits(lint0 >> 8) == DeliveryMode::ExtInt))
    }

    /// Whether the PIC requests an interrupt this CPU takes.
    fn pic_pending(&self) -> bool {
        self.accepts_pic() && self.chip.shared.pic_intr.load(Ordering::Acquire)
    }

    /// Whether anything is left for the vCPU to look at.
    fn anything_pending(&self) -> bool {
        self.shared().events.load(Ordering::Acquire) & (EV_NMI | EV_INIT | EV_SIPI | EV_EXTINT) != 0
            || self.interrupt_pending()
    }

    /// Sets the attention flag if anything is pending.
    fn refresh_attention(&self) {
        if self.anything_pending() {
            self.shared().attention.store(true, Ordering::Release);
        }
    }

    /// Clears the attention flag before a look (see the type's
    /// documentation).
    fn begin_look(&self) {
        self.shared().attention.store(false, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Cheap (one atomic load): whether something was posted that the core
    /// should look at (a maskable interrupt, NMI, INIT or SIPI), through
    /// [`take_interrupt`](Self::take_interrupt),
    /// [`take_nmi`](Self::take_nmi) and
    /// [`take_startup`](Self::take_startup). It stays set while something
    /// is pending that the core has not taken (for instance an interrupt
    /// while the guest runs with `EFLAGS.IF` clear).
    pub fn attention(&self) -> bool {
        self.shared().attention.load(Ordering::Acquire)
    }

    /// If a maskable interrupt is deliverable now, acknowledges it and
    /// returns its vector. The core calls this only when `EFLAGS.IF` is set
    /// and no interrupt shadow is in effect.
    ///
    /// In order: an ExtINT message from the IOAPIC, or the PIC's INTR when
    /// it reaches this CPU (see the type's documentation), is acknowledged
    /// at the PIC (its INTA cycle gives the vector); otherwise the highest
    /// IRR vector whose priority class is above the PPR moves from the IRR
    /// to the ISR.
    pub fn take_interrupt(&mut self) -> Option<u8> {
        self.begin_look();
        let taken = self.acknowledge();
        self.refresh_attention();
        taken
    }

    fn acknowledge(&mut self) -> Option<u8> {
        let sh = &self.chip.shared.lapics[self.cpu as usize];
        if sh.events.fetch_and(!EV_EXTINT, Ordering::AcqRel) & EV_EXTINT != 0 {
            return Some(self.chip.shared.pic_acknowledge(false).unwrap_or(0));
        }
        if self.pic_pending() {
            if let Some(vector) = self.chip.shared.pic_acknowledge(true) {
                return Some(vector);
            }
        }
        let vector = self.deliverable_vector()?;
        let (word, bit) = (usize::from(vector >> 5), 1u32 << (vector & 31));
        self.shared().irr[word].fetch_and(!bit, Ordering::AcqRel);
        self.isr[word] |= bit;
        Some(vector)
    }

    /// Whether a maskable interrupt is pending that `EFLAGS.IF` = 1 would
    /// let in (for the halt and liveness decisions), without acknowledging
    /// it.
    pub fn interrupt_pending(&self) -> bool {
        self.shared().events.load(Ordering::Acquire) & EV_EXTINT != 0
            || self.pic_pending()
            || self.deliverable_vector().is_some()
    }

    /// Takes a pending NMI (several NMIs before one is taken are one).
    pub fn take_nmi(&mut self) -> bool {
        self.begin_look();
        let had = self.shared().events.fetch_and(!EV_NMI, Ordering::AcqRel) & EV_NMI != 0;
        self.refresh_attention();
        had
    }

    /// Takes a pending INIT, or else a pending SIPI. An INIT voids a SIPI
    /// that came before it; a SIPI that comes after an INIT is kept for the
    /// next call.
    pub fn take_startup(&mut self) -> Option<Startup> {
        self.begin_look();
        let taken = self
            .shared()
            .events
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                if e & EV_INIT != 0 {
                    Some(e & !EV_INIT)
                } else if e & EV_SIPI != 0 {
                    Some(e & !(EV_SIPI | 0xff << SIPI_SHIFT))
                } else {
                    None
                }
            })
            .ok()
            .map(|e| if e & EV_INIT != 0 { Startup::Init } else { Startup::Sipi((e >> SIPI_SHIFT) as u8) });
        self.refresh_attention();
        taken
    }

    /// INIT: the APIC's own reset to its power-on state, `IA32_APIC_BASE`
    /// included; the APIC ID is kept. Requests and NMIs pending are
    /// dropped, a SIPI (or INIT) posted since the INIT being handled is
    /// kept; the timer stops.
    pub fn reset(&mut self) {
        self.power_on();
        self.refresh_attention();
    }

    /// A 32-bit read of the register at `offset` in the APIC page (the
    /// dword at the 16-byte boundary; offsets 4-15 of a slot, and reserved
    /// registers, read 0).
    pub fn read(&mut self, offset: u32) -> u32 {
        if offset & 0xc != 0 {
            return 0;
        }
        let index = (offset >> 4) & 0xff;
        let sh = &self.chip.shared.lapics[self.cpu as usize];
        match index {
            0x02 => self.id << 24,
            0x03 => APIC_VERSION,
            0x08 => self.tpr,
            0x09 => self.apr(),
            0x0a => self.ppr(),
            0x0d => self.ldr,
            0x0e => self.dfr | 0x0fff_ffff,
            0x0f => self.svr,
            0x10..=0x17 => self.isr[(index & 7) as usize],
            0x18..=0x1f => sh.tmr[(index & 7) as usize].load(Ordering::Acquire),
            0x20..=0x27 => sh.irr[(index & 7) as usize].load(Ordering::Acquire),
            0x28 => self.esr,
            0x30 => self.icr,
            0x31 => self.icr2,
            0x32..=0x37 => self.lvt[(index - 0x32) as usize],
            0x38 => sh.timer.lock().initial,
            0x39 => {
                let now = self.chip.shared.clock.now();
                sh.timer.lock().current(now)
            }
            0x3e => sh.timer.lock().divide,
            // EOI (write-only), remote read, reserved.
            _ => 0,
        }
    }

    /// A 32-bit write of `value` to the register at `offset` in the APIC
    /// page (may send IPIs, arm the timer, end an interrupt, ...).
    pub fn write(&mut self, offset: u32, value: u32) {
        if offset & 0xf != 0 {
            tracing::debug!(cpu = self.cpu, offset, "local APIC: unaligned write ignored");
            return;
        }
        let index = (offset >> 4) & 0xff;
        match index {
            0x02 => {
                self.id = value >> 24;
                self.shared().id.store(self.id, Ordering::Relaxed);
            }
            0x08 => {
                self.tpr = value & 0xff;
                self.shared().tpr.store(self.tpr, Ordering::Relaxed);
                self.refresh_attention();
            }
            0x0b => self.eoi(),
            0x0d => {
                self.ldr = value & 0xff00_0000;
                self.shared().ldr.store(self.ldr, Ordering::Relaxed);
            }
            0x0e => {
                self.dfr = value | 0x0fff_ffff;
                self.shared().dfr.store(self.dfr, Ordering::Relaxed);
            }
            0x0f => self.write_svr(value),
            // A write latches the errors seen since the last one: none.
            0x28 => self.esr = 0,
            0x30 => {
                self.icr = value & !(1 << 12);
                self.send_ipi();
            }
            0x31 => self.icr2 = value & 0xff00_0000,
            0x32..=0x37 => self.write_lvt((index - 0x32) as usize, value),
            0x38 => self.with_timer(|t, now| t.set_initial(value, now)),
            0x3e => self.with_timer(|t, now| t.set_divide(value, now)),
            _ => {
                tracing::debug!(cpu = self.cpu, offset, value, "local APIC: write to a read-only or reserved register")
            }
        }
    }

    fn with_timer(&self, f: impl FnOnce(&mut ApicTimer, u64)) {
        let shared = &self.chip.shared;
        let now = shared.clock.now();
        let mut timer = shared.lapics[self.cpu as usize].timer.lock();
        f(&mut timer, now);
        shared.arm(self.cpu as usize, timer.deadline());
    }

    fn write_svr(&mut self, value: u32) {
        self.svr = value & SVR_WRITABLE;
        if self.svr & SVR_ENABLE == 0 {
            for n in 0..LVT_COUNT {
                self.lvt[n] |= MASKED;
            }
            let lvt = self.lvt[LVT_TIMER];
            self.with_timer(|t, _| t.lvt = lvt);
        }
        self.mirror_status();
        self.refresh_attention();
    }

    fn write_lvt(&mut self, n: usize, value: u32) {
        let mut value = value & LVT_WRITABLE[n];
        if self.svr & SVR_ENABLE == 0 {
            value |= MASKED;
        }
        self.lvt[n] = value;
        match n {
            LVT_TIMER => self.with_timer(|t, _| t.lvt = value),
            LVT_LINT0 => self.refresh_attention(),
            _ => {}
        }
    }

    /// EOI: ends the highest in-service interrupt; a level-triggered one's
    /// EOI goes to the IOAPIC.
    fn eoi(&mut self) {
        if let Some(vector) = highest(&self.isr) {
            let (word, bit) = (usize::from(vector >> 5), 1u32 << (vector & 31));
            self.isr[word] &= !bit;
            if self.shared().tmr[word].load(Ordering::Acquire) & bit != 0 {
                self.chip.shared.ioapic_eoi(vector);
            }
        }
        self.refresh_attention();
    }

    /// Sends the IPI the ICR describes.
    fn send_ipi(&mut self) {
        let low = self.icr;
        let mode = DeliveryMode::from_bits(low >> 8);
        let vector = low as u8;
        let level_triggered = low & (1 << 15) != 0;
        let assert = low & (1 << 14) != 0;
        if level_triggered
            && !assert
            && matches!(mode, DeliveryMode::Init | DeliveryMode::Fixed | DeliveryMode::LowestPriority)
        {
            // INIT level de-assert (and its like): no message.
            return;
        }
        let dest = (self.icr2 >> 24) as u8;
        let destination = match (low >> 18) & 3 {
            0 if low & (1 << 11) != 0 => Destination::Logical(dest),
            0 => Destination::Physical(dest),
            1 => Destination::Only(self.cpu),
            2 => Destination::All,
            _ => Destination::AllBut(self.cpu),
        };
        if mode == DeliveryMode::ExtInt {
            tracing::debug!(cpu = self.cpu, low, "local APIC: ExtINT IPI dropped");
            return;
        }
        self.chip.shared.deliver(Message { destination, mode, vector, level: level_triggered });
    }
}
