//! The I/O APIC of a PC (an 82093AA-style IOAPIC of version 0x20, as
//! QEMU's `pc` and KVM have): 24 pins, registers reached through IOREGSEL
//! (offset `0x00`) and IOWIN (offset `0x10`) in its page at `0xfec00000`,
//! and the version-0x20 EOI register (offset `0x40`).
//!
//! A pure state machine: it turns pin changes, register writes and EOIs
//! into interrupt messages handed to a callback; [`Irqchip`](super::Irqchip)
//! keeps it under a mutex and routes the messages to the local APICs.
//!
//! * Registers: 0x00 ID (bits 24-27), 0x01 version (`0x00170020`: version
//!   0x20, 24 entries), 0x02 arbitration ID (reads the ID), 0x10-0x3f the
//!   redirection table (entry `n` at `0x10 + 2n`, low half first). Other
//!   indices read all-ones and ignore writes.
//! * A redirection entry holds the vector, delivery mode (fixed, lowest
//!   priority, SMI, NMI, INIT, ExtINT), destination mode and destination
//!   (bits 56-63), polarity, trigger mode and mask; delivery status (bit
//!   12) and Remote IRR (bit 14) are read-only. Entries are masked at
//!   reset.
//! * An edge-triggered pin delivers on a rising edge when unmasked; a
//!   masked edge is lost. A level-triggered pin delivers while asserted
//!   and unmasked and sets Remote IRR, which holds further deliveries
//!   until a local APIC's EOI for its vector (or a write of the vector to
//!   the EOI register) clears it; a pin still asserted then delivers
//!   again. Unmasking an asserted level pin delivers it. Switching an
//!   entry to edge clears Remote IRR. Lowering a pin drops its request
//!   (KVM's behaviour).
//! * Polarity is recorded but not applied: the board's lines are already
//!   logical levels (asserted = high), as in QEMU.
//! * IOWIN and the EOI register take 32-bit accesses only (others are
//!   ignored, as in QEMU); IOREGSEL takes any size (its low byte counts).

use super::routing::{DeliveryMode, Destination, Message};

/// The number of pins (GSIs 0-23).
pub(crate) const PINS: usize = 24;
/// The version register: version 0x20, highest entry 23.
pub(crate) const VERSION: u32 = 0x20 | ((PINS as u32 - 1) << 16);

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
/// The read-only bits of an entry (delivery status, Remote IRR).
const READ_ONLY: u64 = (1 << 12) | REMOTE_IRR;

/// The IOAPIC (see the [module](self) documentation).
#[derive(Debug, Clone)]
pub(crate) struct IoApic {
    id: u8,
    ioregsel: u8,
    /// Requests waiting to be delivered, one bit per pin.
    irr: u32,
    /// The pins' levels (for edge detection).
    lines: u32,
    table: [u64; PINS],
}

impl IoApic {
    /// At reset: ID 0, every entry masked.
    pub(crate) fn new() -> IoApic {
        IoApic { id: 0, ioregsel: 0, irr: 0, lines: 0, table: [MASKED; PINS] }
    }

    /// Pin `pin` is now at `level`; deliveries go to `deliver`.
    pub(crate) fn set_pin(&mut self, pin: usize, level: bool, deliver: &mut dyn FnMut(Message)) {
        if pin >= PINS {
            return;
        }
        let bit = 1 << pin;
        let was_high = self.lines & bit != 0;
        if !level {
            self.lines &= !bit;
            self.irr &= !bit;
            return;
        }
        self.lines |= bit;
        let entry = self.table[pin];
        let edge = entry & LEVEL == 0;
        if edge && was_high {
            // No new edge.
            return;
        }
        self.irr |= bit;
        if edge && entry & MASKED != 0 {
            // A masked edge is lost.
            self.irr &= !bit;
            return;
        }
        self.service(pin, deliver);
    }

    /// Delivers pin `pin`'s request if its entry lets it.
    fn service(&mut self, pin: usize, deliver: &mut dyn FnMut(Message)) {
        let bit = 1 << pin;
        let entry = self.table[pin];
        if self.irr & bit == 0 || entry & MASKED != 0 {
            return;
        }
        let level = entry & LEVEL != 0;
        if level {
            if entry & REMOTE_IRR != 0 {
                return;
            }
            self.table[pin] |= REMOTE_IRR;
        } else {
            // An edge is delivered once; the line stays high until lowered.
            self.irr &= !bit;
        }
        let mode = DeliveryMode::from_bits((entry >> 8) as u32);
        let dest = (entry >> 56) as u8;
        let destination = if entry & (1 << 11) != 0 { Destination::Logical(dest) } else { Destination::Physical(dest) };
        if matches!(mode, DeliveryMode::Smi | DeliveryMode::Reserved | DeliveryMode::Startup) {
            tracing::debug!(pin, entry, "IOAPIC: delivery mode not deliverable, dropped");
            if level {
                self.table[pin] &= !REMOTE_IRR;
            }
            return;
        }
        deliver(Message { destination, mode, vector: entry as u8, level });
        // Fixed and lowest-priority level interrupts wait for an EOI; the
        // others are never acknowledged by one.
        if level && !matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) {
            self.table[pin] &= !REMOTE_IRR;
        }
    }

    /// A local APIC's EOI for level-triggered `vector` (or a write of the
    /// EOI register): clears Remote IRR of the entries with that vector
    /// and delivers those still asserted.
    pub(crate) fn eoi(&mut self, vector: u8, deliver: &mut dyn FnMut(Message)) {
        for pin in 0..PINS {
            let entry = self.table[pin];
            if entry as u8 == vector && entry & REMOTE_IRR != 0 {
                self.table[pin] &= !REMOTE_IRR;
                self.service(pin, deliver);
            }
        }
    }

    /// A guest read of `size` bytes at `offset` of the page.
    pub(crate) fn read(&self, offset: u64, size: u32) -> u32 {
        match offset & 0xff {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN if size == 4 => self.read_register(self.ioregsel),
            _ => 0,
        }
    }

    fn read_register(&self, index: u8) -> u32 {
        match index {
            0x00 | 0x02 => u32::from(self.id) << 24,
            0x01 => VERSION,
            0x10..=0x3f => {
                let entry = self.table[usize::from((index - 0x10) >> 1)];
                if index & 1 == 0 {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
            _ => u32::MAX,
        }
    }

    /// A guest write of `value` (`size` bytes) at `offset` of the page.
    pub(crate) fn write(&mut self, offset: u64, value: u32, size: u32, deliver: &mut dyn FnMut(Message)) {
        match offset & 0xff {
            IOREGSEL => self.ioregsel = value as u8,
            IOWIN if size == 4 => self.write_register(value, deliver),
            EOI if size == 4 => self.eoi(value as u8, deliver),
            _ => tracing::debug!(offset, size, "IOAPIC: write ignored"),
        }
    }

    fn write_register(&mut self, value: u32, deliver: &mut dyn FnMut(Message)) {
        let index = self.ioregsel;
        match index {
            0x00 => self.id = ((value >> 24) & 0x0f) as u8,
            0x10..=0x3f => {
                let pin = usize::from((index - 0x10) >> 1);
                let old = self.table[pin];
                let mut entry = if index & 1 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | u64::from(value) << 32
                };
                entry = (entry & !READ_ONLY) | (old & READ_ONLY);
                if entry & LEVEL == 0 {
                    entry &= !REMOTE_IRR;
                }
                self.table[pin] = entry;
                if entry & LEVEL != 0 {
                    // An asserted level pin delivers once it is unmasked.
                    self.service(pin, deliver);
                }
            }
            _ => tracing::debug!(index, value, "IOAPIC: write to a read-only or missing register ignored"),
        }
    }

    /// Entry `pin` of the redirection table.
    #[cfg(test)]
    pub(crate) fn entry(&self, pin: usize) -> u64 {
        self.table[pin]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut IoApic, pin: u8, low: u32, dest: u8, out: &mut Vec<Message>) {
        let mut d = |m| out.push(m);
        io.write(IOREGSEL, u32::from(0x11 + 2 * pin), 4, &mut d);
        io.write(IOWIN, u32::from(dest) << 24, 4, &mut d);
        io.write(IOREGSEL, u32::from(0x10 + 2 * pin), 4, &mut d);
        io.write(IOWIN, low, 4, &mut d);
    }

    fn collect(f: impl FnOnce(&mut dyn FnMut(Message))) -> Vec<Message> {
        let mut out = Vec::new();
        f(&mut |m| out.push(m));
        out
    }

    #[test]
    fn registers_read_back() {
        let mut io = IoApic::new();
        let mut sink = |_m: Message| panic!("nothing to deliver");
        io.write(IOREGSEL, 0x01, 4, &mut sink);
        assert_eq!(io.read(IOWIN, 4), 0x0017_0020);
        assert_eq!(io.read(IOREGSEL, 4), 0x01);
        io.write(IOREGSEL, 0x00, 4, &mut sink);
        io.write(IOWIN, 0xff00_0000, 4, &mut sink);
        assert_eq!(io.read(IOWIN, 4), 0x0f00_0000, "a 4-bit ID");
        io.write(IOREGSEL, 0x02, 1, &mut sink);
        assert_eq!(io.read(IOWIN, 4), 0x0f00_0000, "arbitration ID");
        io.write(IOREGSEL, 0x10, 4, &mut sink);
        assert_eq!(io.read(IOWIN, 4), 0x0001_0000, "masked at reset");
        assert_eq!(io.read(IOWIN, 2), 0, "IOWIN is 32-bit only");
        io.write(IOREGSEL, 0x40, 4, &mut sink);
        assert_eq!(io.read(IOWIN, 4), u32::MAX);
        // Remote IRR and delivery status cannot be written.
        io.write(IOREGSEL, 0x12, 4, &mut sink);
        io.write(IOWIN, 0x0001_d031, 4, &mut sink);
        assert_eq!(io.read(IOWIN, 4), 0x0001_8031);
    }

    #[test]
    fn edge_pins_deliver_on_rising_edges() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        program(&mut io, 2, 0x30, 0, &mut out); // ISA IRQ 0 → pin 2, vector 0x30
        assert!(out.is_empty());
        let m = collect(|d| io.set_pin(2, true, d));
        assert_eq!(
            m,
            [Message { destination: Destination::Physical(0), mode: DeliveryMode::Fixed, vector: 0x30, level: false }]
        );
        assert!(collect(|d| io.set_pin(2, true, d)).is_empty(), "no new edge");
        io.set_pin(2, false, &mut |_| {});
        assert_eq!(collect(|d| io.set_pin(2, true, d)).len(), 1);
        // Masked edges are lost.
        io.set_pin(2, false, &mut |_| {});
        program(&mut io, 2, 0x1_0030, 0, &mut out);
        assert!(collect(|d| io.set_pin(2, true, d)).is_empty());
        program(&mut io, 2, 0x30, 0, &mut out);
        assert!(out.is_empty(), "unmasking does not deliver a lost edge");
    }

    #[test]
    fn level_pins_hold_remote_irr_until_eoi() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        // PCI INTx on GSI 11: level, logical destination 1, lowest priority.
        program(&mut io, 11, 0x8000 | 0x800 | 0x100 | 0x41, 0x01, &mut out);
        let m = collect(|d| io.set_pin(11, true, d));
        assert_eq!(
            m,
            [Message {
                destination: Destination::Logical(1),
                mode: DeliveryMode::LowestPriority,
                vector: 0x41,
                level: true
            }]
        );
        assert_ne!(io.entry(11) & REMOTE_IRR, 0);
        assert!(collect(|d| io.set_pin(11, true, d)).is_empty());
        // EOI while still asserted: delivered again.
        assert_eq!(collect(|d| io.eoi(0x41, d)).len(), 1);
        // The device lowers its line, then the EOI: Remote IRR clears.
        io.set_pin(11, false, &mut |_| {});
        assert!(collect(|d| io.eoi(0x41, d)).is_empty());
        assert_eq!(io.entry(11) & REMOTE_IRR, 0);
        // EOI of another vector does nothing.
        assert_eq!(collect(|d| io.set_pin(11, true, d)).len(), 1);
        assert!(collect(|d| io.eoi(0x42, d)).is_empty());
        assert_ne!(io.entry(11) & REMOTE_IRR, 0);
        // The EOI register does the same as a local APIC's EOI.
        io.set_pin(11, false, &mut |_| {});
        assert!(collect(|d| io.write(EOI, 0x41, 4, d)).is_empty());
        assert_eq!(io.entry(11) & REMOTE_IRR, 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers_it() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        program(&mut io, 10, 0x1_8000 | 0x51, 0, &mut out);
        assert!(collect(|d| io.set_pin(10, true, d)).is_empty());
        program(&mut io, 10, 0x8000 | 0x51, 0, &mut out);
        assert_eq!(out.len(), 1);
        // Switching to edge clears Remote IRR.
        program(&mut io, 10, 0x51, 0, &mut out);
        assert_eq!(io.entry(10) & REMOTE_IRR, 0);
    }

    #[test]
    fn other_delivery_modes() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        program(&mut io, 0, 0x700, 0, &mut out); // ExtINT
        program(&mut io, 1, 0x8400, 0, &mut out); // NMI, level
        program(&mut io, 3, 0x200, 0, &mut out); // SMI: dropped
        let m = collect(|d| {
            io.set_pin(0, true, d);
            io.set_pin(1, true, d);
            io.set_pin(3, true, d);
        });
        let modes: Vec<DeliveryMode> = m.iter().map(|m| m.mode).collect();
        assert_eq!(modes, [DeliveryMode::ExtInt, DeliveryMode::Nmi]);
        assert_eq!(io.entry(1) & REMOTE_IRR, 0, "an NMI is never EOI'd: no Remote IRR");
    }

    #[test]
    fn odd_guest_values_never_panic() {
        let mut io = IoApic::new();
        for i in 0..=300u32 {
            let mut d = |_m: Message| {};
            io.write(u64::from(i), i.wrapping_mul(0x9e37_79b9), (i % 5) + 1, &mut d);
            io.write(IOREGSEL, i, 4, &mut d);
            io.write(IOWIN, i.wrapping_mul(0x0101_0101), 4, &mut d);
            io.read(u64::from(i), 4);
            io.set_pin(i as usize, i & 1 == 0, &mut d);
            io.eoi(i as u8, &mut d);
        }
    }
}
