//! Interrupt messages between the IOAPIC and the local APICs (the APIC
//! bus of the xAPIC architecture): who receives a message, and what
//! receiving it means for each delivery mode.
//!
//! A message comes from an IOAPIC redirection entry or from a local APIC's
//! ICR. Its destination is matched against every local APIC's routing
//! state (ID, logical destination, destination format, enable bits —
//! mirrored in atomics by the owning vCPU, so that any thread can route):
//!
//! * physical: the APIC whose ID equals the destination, or every APIC
//!   for `0xff`;
//! * logical, flat model (DFR `0xf`): every APIC whose logical ID shares a
//!   bit with the destination; cluster model (DFR `0x0`): same cluster
//!   (high nibble) and a shared bit in the low nibble; `0xff` is every
//!   APIC in both models;
//! * the ICR's shorthands: self, all including self, all excluding self.
//!
//! A local APIC that is disabled in its `IA32_APIC_BASE` MSR receives
//! nothing. Fixed and lowest-priority interrupts are accepted only by an
//! APIC that is also software-enabled (SVR bit 8), as KVM does; NMI,
//! INIT, SIPI and ExtINT are accepted by a software-disabled one.
//! Lowest priority goes to one APIC of the set: the one with the lowest
//! task priority (the lowest index among equals) — the SDM's arbitration
//! without focus processors, which the architecture leaves to the
//! implementation. SMI and the reserved modes are dropped (traced).

use super::lapic::LapicShared;

/// How a message is delivered (the 3-bit delivery mode of redirection
/// entries, LVT entries and the ICR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeliveryMode {
    /// 000: the vector, to every destination.
    Fixed,
    /// 001: the vector, to one destination.
    LowestPriority,
    /// 010: system management interrupt (not modelled).
    Smi,
    /// 011: reserved.
    Reserved,
    /// 100: NMI.
    Nmi,
    /// 101: INIT.
    Init,
    /// 110: start-up IPI (reserved in the IOAPIC).
    Startup,
    /// 111: external interrupt: the vector comes from the 8259's INTA.
    ExtInt,
}

impl DeliveryMode {
    /// The mode encoded in the low 3 bits of `bits`.
    pub(crate) fn from_bits(bits: u32) -> DeliveryMode {
        match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            3 => DeliveryMode::Reserved,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::Startup,
            _ => DeliveryMode::ExtInt,
        }
    }
}

/// Who a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Destination {
    /// An APIC ID (`0xff`: every APIC).
    Physical(u8),
    /// A logical destination (a bit set in flat mode; cluster and bits in
    /// cluster mode; `0xff`: every APIC).
    Logical(u8),
    /// The sender only (ICR shorthand 01), by CPU index.
    Only(u32),
    /// Every APIC (ICR shorthand 10).
    All,
    /// Every APIC but the sender (ICR shorthand 11), by CPU index.
    AllBut(u32),
}

/// One interrupt message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Message {
    /// Who receives it.
    pub(crate) destination: Destination,
    /// How.
    pub(crate) mode: DeliveryMode,
    /// The vector (fixed, lowest priority, start-up); ignored otherwise.
    pub(crate) vector: u8,
    /// Level-triggered (the receiver sets the vector's TMR bit, and its
    /// EOI goes to the IOAPIC).
    pub(crate) level: bool,
}

/// Whether the APIC `index` (state `lapic`) is addressed by `destination`.
fn addressed(index: u32, lapic: &LapicShared, destination: Destination) -> bool {
    match destination {
        Destination::Physical(0xff) | Destination::Logical(0xff) | Destination::All => true,
        Destination::Physical(id) => lapic.routing_id() == u32::from(id),
        Destination::Logical(mda) => {
            let logical = lapic.routing_logical_id();
            match lapic.routing_model() {
                0xf => logical & u32::from(mda) != 0,
                0x0 => logical >> 4 == u32::from(mda >> 4) && logical & u32::from(mda) & 0x0f != 0,
                model => {
                    tracing::debug!(cpu = index, model, "local APIC: reserved destination model, not addressed");
                    false
                }
            }
        }
        Destination::Only(cpu) => index == cpu,
        Destination::AllBut(cpu) => index != cpu,
    }
}

/// Delivers `message` to the local APICs `lapics` (indexed by CPU).
pub(crate) fn deliver(lapics: &[LapicShared], message: Message) {
    let targets = lapics
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l))
        .filter(|(i, l)| l.hardware_enabled() && addressed(*i, l, message.destination));
    match message.mode {
        DeliveryMode::Fixed => {
            for (_, lapic) in targets {
                lapic.post_fixed(message.vector, message.level);
            }
        }
        DeliveryMode::LowestPriority => {
            let chosen = targets.filter(|(_, l)| l.software_enabled()).min_by_key(|(i, l)| (l.routing_priority(), *i));
            match chosen {
                Some((_, lapic)) => {
                    lapic.post_fixed(message.vector, message.level);
                }
                None => tracing::debug!(?message, "local APIC: lowest-priority interrupt with no enabled target"),
            }
        }
        DeliveryMode::Nmi => targets.for_each(|(_, l)| l.post_nmi()),
        DeliveryMode::Init => targets.for_each(|(_, l)| l.post_init()),
        DeliveryMode::Startup => targets.for_each(|(_, l)| l.post_startup(message.vector)),
        DeliveryMode::ExtInt => targets.for_each(|(_, l)| l.post_extint()),
        DeliveryMode::Smi | DeliveryMode::Reserved => {
            tracing::debug!(?message, "local APIC: SMI or reserved delivery mode, dropped");
        }
    }
}
