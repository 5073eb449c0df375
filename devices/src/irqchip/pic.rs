//! The 8259A programmable interrupt controller pair of a PC: a master at
//! ports `0x20`-`0x21` and a slave at `0xa0`-`0xa1` cascaded into the
//! master's IR2, plus the PIIX edge/level control registers (ELCR) at
//! `0x4d0`-`0x4d1`.
//!
//! A pure state machine: no locks, no time. [`Irqchip`](super::Irqchip)
//! keeps it under a mutex, feeds it line changes and port accesses, and
//! forwards its INTR output ([`PicPair::output`]) to the boot processor.
//!
//! What is modelled (as the 8259A datasheet describes it, and as QEMU's
//! `pc` and KVM's in-kernel PIC behave):
//!
//! * initialization: ICW1 (edge sense reset, single/cascade, ICW4 needed),
//!   ICW2 (vector base, low 3 bits ignored), ICW3 (accepted, ignored: the
//!   cascade is fixed on IR2), ICW4 (auto-EOI, special fully nested mode;
//!   the 8086 mode and buffered-mode bits are ignored);
//! * OCW1 (IMR), OCW2 (non-specific and specific EOI, rotate on EOI,
//!   rotate in auto-EOI mode, set priority), OCW3 (read IRR/ISR, poll,
//!   special mask mode);
//! * edge triggering with a per-line edge latch, and level triggering per
//!   line through the ELCR (IRQ 0, 1, 2, 8 and 13 are always edge, as on
//!   the PIIX); ICW1's LTIM bit (level for every line) is not modelled and
//!   is traced;
//! * rotating priorities, the cascade (the slave's INT drives the master's
//!   IR2, which is always edge-sensitive), and INTA: the master's highest
//!   request is acknowledged, through the slave for IR2, and a request that
//!   went away between INTR and INTA gives the spurious IRQ 7 of the chip
//!   that lost it (vector base + 7, with no ISR bit set);
//! * the poll command (OCW3 bit 2): the next read of that chip acknowledges
//!   its highest request and returns it with bit 7 set (or 0).

/// One 8259A.
#[derive(Debug, Clone)]
struct Chip {
    /// Whether this is the master (special fully nested mode ignores the
    /// in-service cascade input only there).
    master: bool,
    /// Interrupt request register.
    irr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// In-service register.
    isr: u8,
    /// The input lines' levels (the edge detector's memory).
    lines: u8,
    /// The IR number with the lowest priority is `priority_add - 1`:
    /// priority `p` belongs to IR `(p + priority_add) & 7`.
    priority_add: u8,
    /// Vector base (ICW2, low 3 bits clear).
    irq_base: u8,
    /// OCW3 selected the ISR for reads of the command port (else the IRR).
    read_isr: bool,
    /// OCW3 asked for a poll: the next read acknowledges.
    poll: bool,
    /// Special mask mode (OCW3).
    special_mask: bool,
    /// Which initialization word comes next on the data port.
    init: Init,
    /// ICW1 said ICW4 follows.
    init4: bool,
    /// ICW1 said single mode (no ICW3).
    single: bool,
    /// Automatic EOI (ICW4).
    auto_eoi: bool,
    /// Rotate priorities on automatic EOI (OCW2).
    rotate_on_auto_eoi: bool,
    /// Special fully nested mode (ICW4).
    special_fully_nested: bool,
    /// Edge/level control: 1 = level-triggered.
    elcr: u8,
    /// Which ELCR bits can be set.
    elcr_mask: u8,
}

/// Where the data port's next write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Init {
    /// Initialized: data port writes are OCW1.
    Ready,
    /// ICW2 is next.
    Icw2,
    /// ICW3 is next.
    Icw3,
    /// ICW4 is next.
    Icw4,
}

impl Chip {
    fn new(master: bool) -> Chip {
        Chip {
            master,
            irr: 0,
            imr: 0,
            isr: 0,
            lines: 0,
            priority_add: 0,
            irq_base: 0,
            read_isr: false,
            poll: false,
            special_mask: false,
            init: Init::Ready,
            init4: false,
            single: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            elcr: 0,
            // The PIIX's ELCR: IRQ 0, 1 and 2 (master), 8 and 13 (slave)
            // are edge only.
            elcr_mask: if master { 0xf8 } else { 0xde },
        }
    }

    /// The priority (0 = highest) of the best request in `mask`, or 8.
    fn priority(&self, mask: u8) -> u8 {
        (0..8).find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0).unwrap_or(8)
    }

    /// The IR this chip asks the CPU (or the master) to serve, if any.
    fn request(&self) -> Option<u8> {
        let wanted = self.priority(self.irr & !self.imr);
        if wanted == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.master {
            in_service &= !(1 << 2);
        }
        (wanted < self.priority(in_service)).then_some((wanted + self.priority_add) & 7)
    }

    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1 << irq;
        if self.elcr & bit != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// The INTA cycle's effect on this chip for IR `irq`.
    fn acknowledge(&mut self, irq: u8) {
        let bit = 1 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        // A level-triggered request stays while its line is asserted.
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
    }

    /// ICW1: start initialization.
    fn icw1(&mut self, value: u8) {
        if value & 0x08 != 0 {
            tracing::debug!(master = self.master, "8259: ICW1 level-triggered mode (LTIM) is not modelled");
        }
        // The edge detectors are reset: an edge-triggered line must go
        // low and high again to request. Level-triggered requests whose
        // line is still asserted remain.
        self.irr = self.elcr & self.lines;
        self.imr = 0;
        self.isr = 0;
        self.priority_add = 0;
        self.irq_base = 0;
        self.read_isr = false;
        self.poll = false;
        self.special_mask = false;
        self.auto_eoi = false;
        self.rotate_on_auto_eoi = false;
        self.special_fully_nested = false;
        self.init4 = value & 0x01 != 0;
        self.single = value & 0x02 != 0;
        self.init = Init::Icw2;
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            self.icw1(value);
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            // OCW2.
            match value >> 5 {
                0 => self.rotate_on_auto_eoi = false,
                4 => self.rotate_on_auto_eoi = true,
                1 | 5 => {
                    let p = self.priority(self.isr);
                    if p != 8 {
                        let irq = (p + self.priority_add) & 7;
                        self.isr &= !(1 << irq);
                        if value >> 5 == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << (value & 7)),
                6 => self.priority_add = (value + 1) & 7,
                7 => {
                    let irq = value & 7;
                    self.isr &= !(1 << irq);
                    self.priority_add = (irq + 1) & 7;
                }
                // 2: no operation.
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init {
            Init::Ready => self.imr = value,
            Init::Icw2 => {
                self.irq_base = value & 0xf8;
                self.init = match (self.single, self.init4) {
                    (false, _) => Init::Icw3,
                    (true, true) => Init::Icw4,
                    (true, false) => Init::Ready,
                };
            }
            Init::Icw3 => self.init = if self.init4 { Init::Icw4 } else { Init::Ready },
            Init::Icw4 => {
                if value & 0x01 == 0 {
                    tracing::debug!(master = self.master, "8259: MCS-80/85 mode is not modelled (8086 mode assumed)");
                }
                self.special_fully_nested = value & 0x10 != 0;
                self.auto_eoi = value & 0x02 != 0;
                self.init = Init::Ready;
            }
        }
    }

    /// A read of the command port (`port` 0) or the data port (1), without
    /// the poll command.
    fn read_register(&self, port: u8) -> u8 {
        match (port, self.read_isr) {
            (0, true) => self.isr,
            (0, false) => self.irr,
            _ => self.imr,
        }
    }
}

/// The master and slave 8259As of a PC and their ELCRs (see the
/// [module](self) documentation).
#[derive(Debug, Clone)]
pub(crate) struct PicPair {
    chips: [Chip; 2],
}

/// The master.
const MASTER: usize = 0;
/// The slave.
const SLAVE: usize = 1;
/// The master's input the slave's INT drives.
const CASCADE_IRQ: u8 = 2;

impl PicPair {
    /// Both chips at power-on: uninitialized (vector base 0), nothing
    /// masked, every line edge-triggered.
    pub(crate) fn new() -> PicPair {
        PicPair { chips: [Chip::new(true), Chip::new(false)] }
    }

    /// The slave's INT drives the master's IR2.
    fn cascade(&mut self) {
        let int = self.chips[SLAVE].request().is_some();
        self.chips[MASTER].set_line(CASCADE_IRQ, int);
    }

    /// ISA IRQ `irq` (0-15; 2 is the cascade and is ignored, others
    /// above 15 too) is now at `level`.
    pub(crate) fn set_irq(&mut self, irq: u32, level: bool) {
        match irq {
            0 | 1 | 3..=7 => self.chips[MASTER].set_line(irq as u8, level),
            8..=15 => {
                self.chips[SLAVE].set_line((irq - 8) as u8, level);
                self.cascade();
            }
            _ => tracing::debug!(irq, "8259: no such input"),
        }
    }

    /// The master's INT output: the CPU's INTR.
    pub(crate) fn output(&self) -> bool {
        self.chips[MASTER].request().is_some()
    }

    /// The INTA cycle: acknowledges the highest-priority request and
    /// returns its vector (spurious IRQ 7 of the master, or of the slave
    /// for a cascaded request, if the request went away).
    pub(crate) fn acknowledge(&mut self) -> u8 {
        match self.chips[MASTER].request() {
            Some(CASCADE_IRQ) => {
                let vector = match self.chips[SLAVE].request() {
                    Some(irq) => {
                        self.chips[SLAVE].acknowledge(irq);
                        self.chips[SLAVE].irq_base | irq
                    }
                    None => {
                        tracing::debug!("8259: spurious IRQ 15");
                        self.chips[SLAVE].irq_base | 7
                    }
                };
                self.cascade();
                self.chips[MASTER].acknowledge(CASCADE_IRQ);
                vector
            }
            Some(irq) => {
                self.chips[MASTER].acknowledge(irq);
                self.chips[MASTER].irq_base | irq
            }
            None => {
                tracing::debug!("8259: spurious IRQ 7");
                self.chips[MASTER].irq_base | 7
            }
        }
    }

    /// A guest read of `port` (0: command, 1: data) of chip `chip` (0:
    /// master, 1: slave).
    pub(crate) fn read(&mut self, chip: usize, port: u8) -> u8 {
        let chip = chip.min(SLAVE);
        let c = &mut self.chips[chip];
        if c.poll {
            c.poll = false;
            let value = match c.request() {
                Some(irq) => {
                    c.acknowledge(irq);
                    0x80 | irq
                }
                None => 0,
            };
            self.cascade();
            return value;
        }
        c.read_register(port & 1)
    }

    /// A guest write of `value` to `port` (0: command, 1: data) of chip
    /// `chip` (0: master, 1: slave).
    pub(crate) fn write(&mut self, chip: usize, port: u8, value: u8) {
        let chip = chip.min(SLAVE);
        if port & 1 == 0 {
            self.chips[chip].write_command(value);
        } else {
            self.chips[chip].write_data(value);
        }
        self.cascade();
    }

    /// The ELCR of chip `chip` (0: master at `0x4d0`, 1: slave at `0x4d1`).
    pub(crate) fn elcr(&self, chip: usize) -> u8 {
        self.chips[chip.min(SLAVE)].elcr
    }

    /// A guest write to the ELCR of chip `chip`. A line switched to level
    /// requests at once if it is asserted.
    pub(crate) fn write_elcr(&mut self, chip: usize, value: u8) {
        let c = &mut self.chips[chip.min(SLAVE)];
        let new = value & c.elcr_mask;
        c.elcr = new;
        c.irr |= new & c.lines;
        self.cascade();
    }

    /// The vector base chip `chip` was given (ICW2).
    #[cfg(test)]
    pub(crate) fn base(&self, chip: usize) -> u8 {
        self.chips[chip].irq_base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence a PC BIOS (and Linux's `init_8259A`) programs: master
    /// at vector 0x08 or 0x20, slave at 0x70 or 0x28, cascade on IR2, 8086
    /// mode, then masks.
    fn init(pic: &mut PicPair, master_base: u8, slave_base: u8, auto_eoi: bool) {
        let icw4 = if auto_eoi { 0x03 } else { 0x01 };
        pic.write(0, 0, 0x11);
        pic.write(0, 1, master_base);
        pic.write(0, 1, 0x04);
        pic.write(0, 1, icw4);
        pic.write(1, 0, 0x11);
        pic.write(1, 1, slave_base);
        pic.write(1, 1, 0x02);
        pic.write(1, 1, icw4);
        pic.write(0, 1, 0x00);
        pic.write(1, 1, 0x00);
    }

    fn pulse(pic: &mut PicPair, irq: u32) {
        pic.set_irq(irq, true);
        pic.set_irq(irq, false);
    }

    #[test]
    fn initialization_sets_the_vector_bases_and_clears_state() {
        let mut pic = PicPair::new();
        pulse(&mut pic, 1);
        assert!(pic.output(), "an unprogrammed PIC requests with vector base 0");
        init(&mut pic, 0x20, 0x28, false);
        assert_eq!((pic.base(0), pic.base(1)), (0x20, 0x28));
        assert!(!pic.output(), "ICW1 clears edge requests");
        // Low bits of ICW2 are ignored.
        pic.write(0, 0, 0x11);
        pic.write(0, 1, 0x27);
        pic.write(0, 1, 0x04);
        pic.write(0, 1, 0x01);
        assert_eq!(pic.base(0), 0x20);
        assert_eq!(pic.read(0, 1), 0, "ICW1 clears the IMR");
    }

    #[test]
    fn an_edge_is_acknowledged_once_and_eoi_lets_the_next_in() {
        let mut pic = PicPair::new();
        init(&mut pic, 0x08, 0x70, false);
        pulse(&mut pic, 0);
        pulse(&mut pic, 1);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x08, "IRQ 0 has the highest priority");
        assert_eq!(pic.read(0, 0) & 0x03, 0x02, "IRR: IRQ 1 still waits");
        assert!(!pic.output(), "IRQ 1 is below the in-service IRQ 0");
        pic.write(0, 0, 0x0b); // OCW3: read ISR
        assert_eq!(pic.read(0, 0), 0x01);
        pic.write(0, 0, 0x20); // non-specific EOI
        assert_eq!(pic.read(0, 0), 0x00);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x09);
        pic.write(0, 0, 0x61); // specific EOI for IRQ 1
        assert!(!pic.output());
        // A line held high does not request again without a new edge.
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), 0x0b);
        pic.write(0, 0, 0x20);
        assert!(!pic.output());
        pic.set_irq(3, true);
        assert!(!pic.output());
    }

    #[test]
    fn masked_lines_wait_in_irr() {
        let mut pic = PicPair::new();
        init(&mut pic, 0x08, 0x70, false);
        pic.write(0, 1, 0xee); // mask everything but IRQ 0 and 4
        assert_eq!(pic.read(0, 1), 0xee);
        pulse(&mut pic, 5);
        assert!(!pic.output());
        pic.write(0, 1, 0xce); // unmask IRQ 5
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x0d);
    }

    #[test]
    fn the_slave_cascades_through_ir2() {
        let mut pic = PicPair::new();
        init(&mut pic, 0x08, 0x70, false);
        pulse(&mut pic, 8 + 4); // IRQ 12
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x74);
        pic.write(1, 0, 0x0b);
        pic.write(0, 0, 0x0b);
        assert_eq!((pic.read(0, 0), pic.read(1, 0)), (0x04, 0x10), "ISR bits on both chips");
        // Both chips need their EOI.
        pic.write(1, 0, 0x20);
        pulse(&mut pic, 8 + 1);
        assert!(!pic.output(), "IR2 still in service on the master");
        pic.write(0, 0, 0x20);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x71);
        // Masking IR2 on the master masks every slave line.
        pic.write(1, 0, 0x20);
        pic.write(0, 0, 0x20);
        pic.write(0, 1, 0x04);
        pulse(&mut pic, 8 + 6);
        assert!(!pic.output());
    }

    #[test]
    fn level_triggered_lines_request_while_asserted() {
        let mut pic = PicPair::new();
        init(&mut pic, 0x08, 0x70, false);
        pic.write_elcr(1, 0xff);
        assert_eq!(pic.elcr(1), 0xde, "IRQ 8 and 13 cannot be level-triggered");
        pic.write_elcr(0, 0xff);
        assert_eq!(pic.elcr(0), 0xf8);
        pic.set_irq(11, true);
        assert_eq!(pic.acknowledge(), 0x73);
        pic.write(1, 0, 0x20);
        pic.write(0, 0, 0x20);
        assert!(pic.output(), "still asserted: requests again after EOI");
        pic.set_irq(11, false);
        // The master latched IR2's edge, but the slave's request is gone
        // before INTA: spurious IRQ 15.
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x77);
        pic.write(0, 0, 0x20);
        pic.write(1, 0, 0x0b);
        assert_eq!(pic.read(1, 0), 0, "a spurious IRQ 15 sets no slave ISR bit");
        // A level request that vanishes between INTR and INTA on the master
        // is a spurious IRQ 7.
        pic.set_irq(5, true);
        assert!(pic.output());
        pic.set_irq(5, false);
        assert!(!pic.output(), "deasserted: the request is gone");
        assert_eq!(pic.acknowledge(), 0x0f, "spurious IRQ 7");
        pic.write(0, 0, 0x0b);
        assert_eq!(pic.read(0, 0), 0, "a spurious IRQ 7 sets no ISR bit");
    }

    #[test]
    fn auto_eoi_and_rotation() {
        let mut pic = PicPair::new();
        init(&mut pic, 0x08, 0x70, true);
        pulse(&mut pic, 0);
        assert_eq!(pic.acknowledge(), 0x08);
        pic.write(0, 0, 0x0b);
        assert_eq!(pic.read(0, 0), 0, "auto-EOI leaves no ISR bit");
        pulse(&mut pic, 0);
        assert!(pic.output());
        // Rotation: after a rotate-on-non-specific-EOI of IRQ 3, IRQ 4 has
        // the highest priority and IRQ 3 the lowest.
        let mut pic = PicPair::new();
        init(&mut pic, 0x08, 0x70, false);
        pulse(&mut pic, 3);
        assert_eq!(pic.acknowledge(), 0x0b);
        pic.write(0, 0, 0xa0); // rotate on non-specific EOI
        pulse(&mut pic, 1);
        pulse(&mut pic, 5);
        assert_eq!(pic.acknowledge(), 0x0d, "IRQ 5 now outranks IRQ 1");
        // Set priority: IRQ 0 lowest, so IRQ 1 first.
        pic.write(0, 0, 0x20);
        pic.write(0, 0, 0xc0);
        pulse(&mut pic, 0);
        assert_eq!(pic.acknowledge(), 0x09);
    }

    #[test]
    fn poll_and_special_mask() {
        let mut pic = PicPair::new();
        init(&mut pic, 0x08, 0x70, false);
        pulse(&mut pic, 6);
        pic.write(0, 0, 0x0c); // OCW3: poll
        assert_eq!(pic.read(0, 0), 0x86);
        pic.write(0, 0, 0x0c);
        assert_eq!(pic.read(0, 0), 0x00, "nothing left to poll");
        assert_eq!(pic.read(0, 1), 0, "the poll is for one read");
        // Special mask mode: masking the in-service IRQ 6 lets IRQ 7 in.
        pulse(&mut pic, 7);
        assert!(!pic.output(), "IRQ 7 is below the in-service IRQ 6");
        pic.write(0, 1, 0x40);
        pic.write(0, 0, 0x68); // OCW3: set special mask
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x0f);
    }

    #[test]
    fn odd_guest_values_never_panic() {
        let mut pic = PicPair::new();
        for value in 0..=255u8 {
            for chip in 0..3 {
                pic.write(chip, 0, value);
                pic.write(chip, 1, value);
                pic.write(chip, 3, value);
                pic.read(chip, 0);
                pic.read(chip, 7);
                pic.write_elcr(chip, value);
            }
            pic.set_irq(u32::from(value), value & 1 != 0);
            pic.acknowledge();
        }
    }
}
