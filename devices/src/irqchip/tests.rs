//! Tests of the controllers together, through the interfaces the CPU
//! core, the board and the guest use (each model's own tests are in its
//! file). Timers are checked with bounded waits for the waker's kick,
//! never with sleeps.

use super::*;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::time::Duration;
use topos_runtime::StandardSpaces;

/// Long enough for a loaded machine; only failures wait this long.
const PATIENCE: Duration = Duration::from_secs(20);

// Register offsets in the APIC page.
const ID: u32 = 0x20;
const VERSION: u32 = 0x30;
const TPR: u32 = 0x80;
const PPR: u32 = 0xa0;
const EOI: u32 = 0xb0;
const LDR: u32 = 0xd0;
const DFR: u32 = 0xe0;
const SVR: u32 = 0xf0;
const ISR: u32 = 0x100;
const TMR: u32 = 0x180;
const IRR: u32 = 0x200;
const ICR: u32 = 0x300;
const ICR2: u32 = 0x310;
const LVT_TIMER: u32 = 0x320;
const LVT_LINT0: u32 = 0x350;
const TIMER_INITIAL: u32 = 0x380;
const TIMER_CURRENT: u32 = 0x390;
const TIMER_DIVIDE: u32 = 0x3e0;

/// A waker that counts its calls and reports each on a channel.
struct Kicks {
    count: Arc<AtomicUsize>,
    rx: mpsc::Receiver<()>,
}

impl Kicks {
    fn install(chip: &Irqchip, cpu: u32) -> Kicks {
        let count = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let c = count.clone();
        chip.set_waker(
            cpu,
            Arc::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
                let _ = tx.lock().unwrap().send(());
            }),
        );
        Kicks { count, rx }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits (bounded) for the next kick.
    fn wait(&self) {
        self.rx.recv_timeout(PATIENCE).expect("the vCPU was never woken");
    }
}

/// `n` local APICs of one chip, software-enabled (SVR 0x1ff).
fn enabled(n: u32) -> (Arc<Irqchip>, Vec<LocalApic>) {
    let chip = Irqchip::new(n);
    let mut apics: Vec<LocalApic> = (0..n).map(|i| chip.take_lapic(i).unwrap()).collect();
    for a in &mut apics {
        a.write(SVR, 0x1ff);
    }
    (chip, apics)
}

fn bit(apic: &mut LocalApic, base: u32, vector: u8) -> bool {
    apic.read(base + 0x10 * u32::from(vector >> 5)) & (1 << (vector & 31)) != 0
}

fn ipi(from: &mut LocalApic, dest: u8, low: u32) {
    from.write(ICR2, u32::from(dest) << 24);
    from.write(ICR, low);
}

#[test]
fn local_apics_start_as_kvm_resets_them() {
    let chip = Irqchip::new(2);
    let mut bsp = chip.take_lapic(0).unwrap();
    let mut ap = chip.take_lapic(1).unwrap();
    assert!(chip.take_lapic(1).is_none(), "taken once");
    assert!(chip.take_lapic(2).is_none(), "out of range");
    assert!(bsp.is_bsp() && !ap.is_bsp());
    assert_eq!((bsp.apic_id(), ap.apic_id()), (0, 1));
    assert_eq!(bsp.base_msr(), 0xfee0_0900);
    assert_eq!(ap.base_msr(), 0xfee0_0800);
    assert_eq!(ap.page(), Some(0xfee0_0000));
    assert_eq!(ap.read(ID), 1 << 24);
    assert_eq!(ap.read(VERSION), 0x0005_0014);
    assert_eq!(ap.read(SVR), 0xff);
    assert_eq!(ap.read(DFR), 0xffff_ffff);
    assert_eq!(ap.read(LVT_TIMER), 0x1_0000);
    assert_eq!(ap.read(LVT_LINT0), 0x1_0000);
    assert_eq!(bsp.read(LVT_LINT0), 0x700, "the BSP's LINT0 is unmasked ExtINT (virtual wire)");
    assert_eq!(ap.read(0x3f0), 0, "reserved registers read 0");
    assert_eq!(ap.read(ID + 4), 0, "bytes 4-15 of a slot read 0");
    assert!(!bsp.attention() && !bsp.interrupt_pending());
    assert!(Irqchip::try_new(0).is_err() && Irqchip::try_new(256).is_err());
}

#[test]
fn the_base_msr_checks_reserved_bits_and_disables() {
    let chip = Irqchip::new(1);
    let mut apic = chip.take_lapic(0).unwrap();
    for reserved in [1 << 0, 1 << 9, 1 << 10, 1 << 36, 1 << 63] {
        assert!(!apic.set_base_msr(0xfee0_0900 | reserved));
    }
    assert_eq!(apic.base_msr(), 0xfee0_0900);
    assert!(apic.set_base_msr(0xfed0_0900));
    assert_eq!(apic.page(), Some(0xfed0_0000), "relocated");
    apic.write(SVR, 0x1ff);
    assert!(apic.set_base_msr(0xfee0_0100));
    assert_eq!(apic.page(), None, "globally disabled");
    assert_eq!(apic.read(SVR) & 0x100, 0, "disabling clears the software enable");
    assert!(apic.set_base_msr(0xfee0_0900));
    assert_eq!(apic.page(), Some(0xfee0_0000));
}

#[test]
fn a_fixed_ipi_reaches_the_other_vcpu_and_wakes_it() {
    let (chip, mut apics) = enabled(2);
    let kicks = Kicks::install(&chip, 1);
    let (bsp, ap) = apics.split_at_mut(1);
    let (bsp, ap) = (&mut bsp[0], &mut ap[0]);
    ipi(bsp, 1, 0x4050); // fixed, physical, assert, vector 0x50
    assert_eq!(bsp.read(ICR) & (1 << 12), 0, "delivery status reads idle once sent");
    assert_eq!(kicks.count(), 1);
    assert!(ap.attention() && ap.interrupt_pending());
    assert!(bit(ap, IRR, 0x50));
    assert!(!bsp.attention());
    assert_eq!(ap.take_interrupt(), Some(0x50));
    assert!(!ap.attention(), "nothing else pending");
    assert!(bit(ap, ISR, 0x50) && !bit(ap, IRR, 0x50));
    assert_eq!(ap.read(PPR), 0x50);
    ap.write(EOI, 0);
    assert!(!bit(ap, ISR, 0x50));
    assert_eq!(ap.take_interrupt(), None);
}

#[test]
fn priorities_hold_and_nest() {
    let (_chip, mut apics) = enabled(1);
    let apic = &mut apics[0];
    let self_ipi = |a: &mut LocalApic, v: u32| a.write(ICR, 0x4_4000 | v);
    // The TPR holds back classes at or below it.
    apic.write(TPR, 0x40);
    self_ipi(apic, 0x45);
    assert!(apic.attention(), "posted: the core looks");
    assert!(!apic.interrupt_pending());
    assert_eq!(apic.take_interrupt(), None);
    assert!(!apic.attention(), "held back: nothing for the core to do until the TPR drops");
    apic.write(TPR, 0x3f);
    assert!(apic.attention(), "lowering the TPR lets it in");
    assert_eq!(apic.take_interrupt(), Some(0x45));
    apic.write(TPR, 0);
    // A higher class nests; the same class waits for the EOI.
    self_ipi(apic, 0x41);
    self_ipi(apic, 0x61);
    assert_eq!(apic.take_interrupt(), Some(0x61));
    assert_eq!(apic.take_interrupt(), None, "0x41 and 0x45's class is below 0x61's");
    apic.write(EOI, 0); // ends 0x61
    assert_eq!(apic.read(PPR), 0x40);
    assert!(!apic.interrupt_pending(), "0x41 is in 0x45's class");
    apic.write(EOI, 0); // ends 0x45
    assert!(apic.attention());
    assert_eq!(apic.take_interrupt(), Some(0x41));
    apic.write(EOI, 0);
    // Vectors 0-15 are never delivered (the SDM calls them illegal).
    self_ipi(apic, 0x05);
    assert_eq!(apic.take_interrupt(), None);
}

#[test]
fn a_software_disabled_apic_takes_nmi_init_and_sipi_but_no_fixed_interrupt() {
    let chip = Irqchip::new(2);
    let mut bsp = chip.take_lapic(0).unwrap();
    let mut ap = chip.take_lapic(1).unwrap();
    bsp.write(SVR, 0x1ff);
    ipi(&mut bsp, 1, 0x4051);
    assert!(!ap.attention() && !bit(&mut ap, IRR, 0x51));
    ipi(&mut bsp, 1, 0x4400); // NMI
    assert!(ap.attention());
    assert!(ap.take_nmi());
    assert!(!ap.take_nmi(), "taken once");
    assert!(!ap.attention());
}

#[test]
fn init_and_sipi_start_an_application_processor() {
    let chip = Irqchip::new(2);
    let kicks = Kicks::install(&chip, 1);
    let mut bsp = chip.take_lapic(0).unwrap();
    let mut ap = chip.take_lapic(1).unwrap();
    ap.write(TPR, 0x20);
    // What firmware sends: INIT assert, INIT de-assert, SIPI, SIPI.
    ipi(&mut bsp, 1, 0xc500);
    ipi(&mut bsp, 1, 0x8500);
    assert_eq!(kicks.count(), 1, "INIT de-assert sends nothing");
    assert!(ap.attention());
    assert_eq!(ap.take_startup(), Some(Startup::Init));
    ap.reset();
    assert_eq!(ap.read(TPR), 0, "INIT resets the APIC");
    assert_eq!(ap.apic_id(), 1, "and keeps its ID");
    assert_eq!(ap.take_startup(), None);
    ipi(&mut bsp, 1, 0x4608);
    ipi(&mut bsp, 1, 0x4608);
    assert_eq!(ap.take_startup(), Some(Startup::Sipi(0x08)));
    assert_eq!(ap.take_startup(), None, "two SIPIs before a look are one");
    // A SIPI before an INIT is void; one after it is kept.
    ipi(&mut bsp, 1, 0x4609);
    ipi(&mut bsp, 1, 0x4500);
    ipi(&mut bsp, 1, 0x460a);
    assert_eq!(ap.take_startup(), Some(Startup::Init));
    assert_eq!(ap.take_startup(), Some(Startup::Sipi(0x0a)));
    // Shorthand "all excluding self", as Linux and SeaBIOS broadcast.
    bsp.write(ICR, 0xc_4500);
    assert_eq!(ap.take_startup(), Some(Startup::Init));
    assert_eq!(bsp.take_startup(), None);
}

#[test]
fn shorthands_and_logical_destinations() {
    let (_chip, mut apics) = enabled(4);
    // Flat model: CPU i has logical ID 1 << i.
    for (i, a) in apics.iter_mut().enumerate() {
        a.write(LDR, 1 << (24 + i));
    }
    ipi(&mut apics[0], 0b1010, 0x4830); // fixed, logical
    let got: Vec<bool> = apics.iter_mut().map(|a| bit(a, IRR, 0x30)).collect();
    assert_eq!(got, [false, true, false, true]);
    // All including self, all excluding self.
    apics[2].write(ICR, 0x8_4031);
    apics[2].write(ICR, 0xc_4032);
    let got: Vec<(bool, bool)> = apics.iter_mut().map(|a| (bit(a, IRR, 0x31), bit(a, IRR, 0x32))).collect();
    assert_eq!(got, [(true, true), (true, true), (true, false), (true, true)]);
    // Cluster model: cluster 1, members 1 and 2.
    for (i, a) in apics.iter_mut().enumerate() {
        a.write(DFR, 0x0fff_ffff);
        a.write(LDR, (0x10 | (1 << i)) << 24);
    }
    ipi(&mut apics[0], 0x16, 0x4833);
    let got: Vec<bool> = apics.iter_mut().map(|a| bit(a, IRR, 0x33)).collect();
    assert_eq!(got, [false, true, true, false]);
    ipi(&mut apics[0], 0x26, 0x4834);
    assert!(!apics.iter_mut().any(|a| bit(a, IRR, 0x34)), "another cluster");
    // Physical broadcast.
    ipi(&mut apics[0], 0xff, 0x4035);
    assert!(apics.iter_mut().all(|a| bit(a, IRR, 0x35)));
    // Lowest priority: one target, the lowest TPR.
    for (i, a) in apics.iter_mut().enumerate() {
        a.write(TPR, [0x30, 0x20, 0x10, 0x40][i]);
    }
    ipi(&mut apics[0], 0xff, 0x4136);
    let got: Vec<bool> = apics.iter_mut().map(|a| bit(a, IRR, 0x36)).collect();
    assert_eq!(got, [false, false, true, false]);
}

#[test]
fn an_event_posted_before_the_waker_is_set_is_not_lost() {
    let (chip, mut apics) = enabled(2);
    ipi(&mut apics[0], 1, 0x4040);
    let kicks = Kicks::install(&chip, 1);
    assert_eq!(kicks.count(), 1, "set_waker kicks for what is pending");
    let _ = Kicks::install(&chip, 0);
    assert_eq!(apics[1].take_interrupt(), Some(0x40));
}

#[test]
fn the_apic_timer_fires_one_shot_into_the_irr_and_wakes_the_vcpu() {
    let (chip, mut apics) = enabled(1);
    let kicks = Kicks::install(&chip, 0);
    let apic = &mut apics[0];
    // A far deadline (divide by 128: about 550 s) counts down.
    apic.write(TIMER_DIVIDE, 0xa);
    assert_eq!(apic.read(TIMER_DIVIDE), 0xa);
    apic.write(LVT_TIMER, 0x41);
    apic.write(TIMER_INITIAL, u32::MAX);
    assert_eq!(apic.read(TIMER_INITIAL), u32::MAX);
    let first = apic.read(TIMER_CURRENT);
    let second = apic.read(TIMER_CURRENT);
    assert!(first > 0 && second <= first, "{first} {second}");
    // A near one: 1 ms (divide by 16).
    apic.write(TIMER_DIVIDE, 0x3);
    apic.write(TIMER_INITIAL, 62_500);
    kicks.wait();
    assert_eq!(apic.read(TIMER_CURRENT), 0, "one-shot: ran out");
    assert!(bit(apic, IRR, 0x41) && !bit(apic, TMR, 0x41));
    assert_eq!(apic.take_interrupt(), Some(0x41));
    apic.write(EOI, 0);
    // Periodic: it keeps firing.
    apic.write(LVT_TIMER, 0x2_0042);
    apic.write(TIMER_DIVIDE, 0xb); // divide by 1
    apic.write(TIMER_INITIAL, 300_000); // 300 µs
    for _ in 0..3 {
        while apic.take_interrupt() != Some(0x42) {
            kicks.wait();
        }
        apic.write(EOI, 0);
    }
    // Stopping it: initial count 0.
    apic.write(TIMER_INITIAL, 0);
    assert_eq!(apic.read(TIMER_CURRENT), 0);
}

#[test]
fn the_deadline_thread_ends_with_the_irqchip() {
    let (chip, mut apics) = enabled(2);
    apics[1].write(LVT_TIMER, 0x41);
    apics[1].write(TIMER_INITIAL, u32::MAX); // far away
    assert!(chip.shared.clock.spawned(), "a deadline starts the thread");
    let shared = Arc::downgrade(&chip.shared);
    drop(apics);
    drop(chip);
    // The thread held the state alive until it left, and dropping the
    // Irqchip joined it.
    assert!(shared.upgrade().is_none(), "the deadline thread is gone");
}

/// A chip mapped in a topology, as the board maps it.
fn mapped(cpus: u32) -> (Arc<Irqchip>, StandardSpaces, Topology) {
    let topo = Topology::new();
    let spaces = topo.standard_spaces().unwrap();
    let chip = Irqchip::new(cpus);
    chip.map(&topo, &spaces.io, &spaces.system).unwrap();
    (chip, spaces, topo)
}

fn outb(s: &StandardSpaces, port: u64, value: u8) {
    let _ = s.io_space.write_u64(port, u64::from(value), 1);
}

fn inb(s: &StandardSpaces, port: u64) -> u8 {
    s.io_space.read_u64(port, 1).0 as u8
}

fn ioapic_write(s: &StandardSpaces, index: u32, value: u32) {
    let _ = s.memory.write_u64(IOAPIC_BASE, u64::from(index), 4);
    let _ = s.memory.write_u64(IOAPIC_BASE + 0x10, u64::from(value), 4);
}

fn ioapic_read(s: &StandardSpaces, index: u32) -> u32 {
    let _ = s.memory.write_u64(IOAPIC_BASE, u64::from(index), 4);
    s.memory.read_u64(IOAPIC_BASE + 0x10, 4).0 as u32
}

/// The PICs as a BIOS sets them up: master at 0x08, slave at 0x70.
fn init_pics(s: &StandardSpaces) {
    for (port, base, cascade) in [(0x20, 0x08, 0x04), (0xa0, 0x70, 0x02)] {
        outb(s, port, 0x11);
        outb(s, port + 1, base);
        outb(s, port + 1, cascade);
        outb(s, port + 1, 0x01);
        outb(s, port + 1, 0x00);
    }
}

#[test]
fn the_regions_are_where_qemu_puts_them() {
    let (_chip, s, topo) = mapped(1);
    let mtree = topo.mtree(Default::default()).unwrap();
    for line in [
        "0000000000000020-0000000000000021 (prio 0, i/o): pic",
        "0000000000000040-0000000000000043 (prio 0, i/o): pit",
        "0000000000000061-0000000000000061 (prio 0, i/o): pcspk",
        "00000000000000a0-00000000000000a1 (prio 0, i/o): pic",
        "00000000000004d0-00000000000004d0 (prio 0, i/o): elcr",
        "00000000000004d1-00000000000004d1 (prio 0, i/o): elcr",
        "00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic",
    ] {
        assert!(mtree.contains(line), "{line} missing from\n{mtree}");
    }
    assert_eq!(ioapic_read(&s, 1), 0x0017_0020);
    outb(&s, 0x4d1, 0xff);
    assert_eq!(inb(&s, 0x4d1), 0xde);
}

#[test]
fn a_device_interrupt_reaches_the_bsp_through_the_pic() {
    let (chip, s, _topo) = mapped(2);
    let kicks = Kicks::install(&chip, 0);
    let ap_kicks = Kicks::install(&chip, 1);
    let mut bsp = chip.take_lapic(0).unwrap();
    let ap = chip.take_lapic(1).unwrap();
    init_pics(&s);
    let sink = chip.interrupt_sink();
    sink.set_level(4, true); // the UART's IRQ 4
    assert_eq!(kicks.count(), 1);
    assert_eq!(ap_kicks.count(), 0, "only the BSP's LINT0 is wired");
    assert!(bsp.attention() && bsp.interrupt_pending());
    assert!(!ap.interrupt_pending());
    assert_eq!(bsp.take_interrupt(), Some(0x0c));
    sink.set_level(4, false);
    outb(&s, 0x20, 0x20); // EOI
    assert!(!bsp.interrupt_pending());
    // Through the slave (IRQ 11, level-triggered via the ELCR, as PCI INTx).
    outb(&s, 0x4d1, 0x08);
    sink.set_level(11, true);
    assert_eq!(bsp.take_interrupt(), Some(0x73));
    outb(&s, 0xa0, 0x20);
    outb(&s, 0x20, 0x20);
    assert!(bsp.interrupt_pending(), "still asserted");
    sink.set_level(11, false);
    // Gone before INTA: the master latched the cascade's edge, so the CPU
    // gets the slave's spurious IRQ 15, as on an 8259.
    assert_eq!(bsp.take_interrupt(), Some(0x77));
    outb(&s, 0x20, 0x20);
    assert!(!bsp.interrupt_pending());
    // An enabled APIC with LINT0 masked does not take the PIC's INTR; a
    // software-disabled one does.
    bsp.write(SVR, 0x1ff);
    bsp.write(LVT_LINT0, 0x1_0700);
    sink.set_level(3, true);
    assert!(!bsp.interrupt_pending());
    assert_eq!(bsp.take_interrupt(), None);
    bsp.write(LVT_LINT0, 0x700);
    assert!(bsp.attention() && bsp.interrupt_pending());
    bsp.write(SVR, 0xff);
    assert_eq!(bsp.read(LVT_LINT0), 0x1_0700, "software disable masks the LVT");
    assert_eq!(bsp.take_interrupt(), Some(0x0b));
}

#[test]
fn a_level_interrupt_through_the_ioapic_holds_remote_irr_until_eoi() {
    let (chip, s, _topo) = mapped(2);
    let mut apics: Vec<LocalApic> = (0..2).map(|i| chip.take_lapic(i).unwrap()).collect();
    for a in &mut apics {
        a.write(SVR, 0x1ff);
    }
    // An IOAPIC system masks the PICs.
    outb(&s, 0x21, 0xff);
    outb(&s, 0xa1, 0xff);
    // GSI 11 (PCI INTx), level, active low as ACPI says, to APIC 1.
    ioapic_write(&s, 0x10 + 2 * 11 + 1, 1 << 24);
    ioapic_write(&s, 0x10 + 2 * 11, 0xa000 | 0x61);
    let sink = chip.interrupt_sink();
    sink.set_level(11, true);
    let entry = ioapic_read(&s, 0x10 + 2 * 11);
    assert_ne!(entry & (1 << 14), 0, "Remote IRR set");
    let ap = &mut apics[1];
    assert_eq!(ap.take_interrupt(), Some(0x61));
    assert!(bit(ap, TMR, 0x61), "level: TMR set");
    // The handler quiets the device, then EOIs: Remote IRR clears.
    sink.set_level(11, false);
    ap.write(EOI, 0);
    assert_eq!(ioapic_read(&s, 0x10 + 2 * 11) & (1 << 14), 0);
    assert!(!ap.interrupt_pending());
    // An EOI while still asserted delivers again.
    sink.set_level(11, true);
    assert_eq!(ap.take_interrupt(), Some(0x61));
    ap.write(EOI, 0);
    assert!(ap.interrupt_pending());
    assert_eq!(ap.take_interrupt(), Some(0x61));
    // ISA IRQ 0 arrives on pin 2 (edge).
    ioapic_write(&s, 0x10 + 2 * 2, 0x30);
    sink.set_level(0, true);
    sink.set_level(0, false);
    assert_eq!(apics[0].take_interrupt(), Some(0x30));
    assert!(!bit(&mut apics[0], TMR, 0x30));
}

#[test]
fn the_pit_ticks_into_the_pic_and_wakes_the_bsp() {
    let (chip, s, _topo) = mapped(1);
    let kicks = Kicks::install(&chip, 0);
    let mut bsp = chip.take_lapic(0).unwrap();
    init_pics(&s);
    outb(&s, 0x21, 0xfe); // only IRQ 0
                          // Channel 0, mode 2, 1 ms.
    outb(&s, 0x43, 0x34);
    outb(&s, 0x40, (1193 & 0xff) as u8);
    outb(&s, 0x40, (1193 >> 8) as u8);
    for _ in 0..3 {
        while bsp.take_interrupt() != Some(0x08) {
            kicks.wait();
        }
        outb(&s, 0x20, 0x20);
    }
    // Channel 2 through port 0x61, as firmware calibrates: gate on, mode 0.
    outb(&s, 0x61, 0x01);
    outb(&s, 0x43, 0xb0);
    outb(&s, 0x42, 0xff);
    outb(&s, 0x42, 0xff);
    assert_eq!(inb(&s, 0x61) & 0x03, 0x01, "gate on, speaker off");
    outb(&s, 0x43, 0xe8); // read back channel 2's status
    assert_eq!(inb(&s, 0x42) & 0x3f, 0x30, "LSB then MSB, mode 0");
}

#[test]
fn the_pit_ticks_through_the_ioapic_to_an_enabled_apic() {
    let (chip, s, _topo) = mapped(1);
    let kicks = Kicks::install(&chip, 0);
    let mut bsp = chip.take_lapic(0).unwrap();
    bsp.write(SVR, 0x1ff);
    bsp.write(LVT_LINT0, 0x1_0700); // the PIC off, as an IOAPIC kernel does
    ioapic_write(&s, 0x10 + 2 * 2, 0x30);
    outb(&s, 0x43, 0x30); // channel 0, mode 0: one shot
    outb(&s, 0x40, 0x00);
    outb(&s, 0x40, 0x10);
    while bsp.take_interrupt() != Some(0x30) {
        kicks.wait();
    }
}

#[test]
fn guest_register_writes_never_panic() {
    let (chip, s, _topo) = mapped(2);
    let mut apics: Vec<LocalApic> = (0..2).map(|i| chip.take_lapic(i).unwrap()).collect();
    let mut x: u32 = 0x1234_5678;
    for i in 0..20_000u32 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let a = &mut apics[(i & 1) as usize];
        let offset = (x >> 8) & 0xfff;
        // Keep the timer from firing a flood: no tiny periodic counts.
        if offset & 0xff0 == TIMER_INITIAL {
            continue;
        }
        a.write(offset & !0xf, x);
        a.read(offset);
        let _ = a.set_base_msr(u64::from(x) << 4);
        let _ = a.take_interrupt();
        let _ = a.take_nmi();
        if a.take_startup() == Some(Startup::Init) {
            a.reset();
        }
        outb(&s, u64::from(x & 0x7f), x as u8);
        inb(&s, u64::from(x >> 25));
        let _ = s.memory.write_u64(IOAPIC_BASE + u64::from(x & 0xff), u64::from(x), 4);
        chip.set_gsi(x % 40, x & 0x100 != 0);
    }
}
