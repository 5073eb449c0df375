//! What the interpreter needs of a local APIC. The machine plugs in the
//! user-space local APIC of `topos_devices::irqchip`; a library user may
//! plug in another, or none (then the CPU has no APIC: no APIC page, no
//! interrupts but those the embedder delivers itself).

/// A startup event posted to a CPU by another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// INIT: an application processor resets and waits for a SIPI; the
    /// bootstrap processor resets.
    Init,
    /// A startup IPI with its vector (the AP starts at `vector << 12` in
    /// real mode).
    Sipi(u8),
}

/// A CPU's local APIC, as the interpreter drives it from the vCPU's thread.
pub trait Apic: Send {
    /// The guest-physical page of the registers while the APIC is enabled.
    fn page(&self) -> Option<u64>;
    /// A 32-bit register read at `offset` in the page.
    fn read(&mut self, offset: u32) -> u32;
    /// A 32-bit register write at `offset` in the page.
    fn write(&mut self, offset: u32, value: u32);
    /// IA32_APIC_BASE.
    fn base_msr(&self) -> u64;
    /// Writes IA32_APIC_BASE; false raises `#GP`.
    fn set_base_msr(&mut self, value: u64) -> bool;
    /// Whether something was posted that the CPU should look at (one
    /// atomic load; polled once per block).
    fn attention(&self) -> bool;
    /// Acknowledges and returns the highest-priority deliverable maskable
    /// interrupt (called with IF set and no interrupt shadow).
    fn take_interrupt(&mut self) -> Option<u8>;
    /// Takes a pending NMI.
    fn take_nmi(&mut self) -> bool;
    /// Takes a pending INIT or SIPI.
    fn take_startup(&mut self) -> Option<Startup>;
    /// The APIC's own INIT reset.
    fn reset(&mut self);
    /// Whether this is the bootstrap processor's APIC.
    fn is_bsp(&self) -> bool;
}

/// The user-space local APIC of `topos_devices::irqchip` as the
/// interpreter's [`Apic`].
impl Apic for topos_devices::irqchip::LocalApic {
    fn page(&self) -> Option<u64> {
        topos_devices::irqchip::LocalApic::page(self)
    }
    fn read(&mut self, offset: u32) -> u32 {
        topos_devices::irqchip::LocalApic::read(self, offset)
    }
    fn write(&mut self, offset: u32, value: u32) {
        topos_devices::irqchip::LocalApic::write(self, offset, value)
    }
    fn base_msr(&self) -> u64 {
        topos_devices::irqchip::LocalApic::base_msr(self)
    }
    fn set_base_msr(&mut self, value: u64) -> bool {
        topos_devices::irqchip::LocalApic::set_base_msr(self, value)
    }
    fn attention(&self) -> bool {
        topos_devices::irqchip::LocalApic::attention(self)
    }
    fn take_interrupt(&mut self) -> Option<u8> {
        topos_devices::irqchip::LocalApic::take_interrupt(self)
    }
    fn take_nmi(&mut self) -> bool {
        topos_devices::irqchip::LocalApic::take_nmi(self)
    }
    fn take_startup(&mut self) -> Option<Startup> {
        topos_devices::irqchip::LocalApic::take_startup(self).map(|s| match s {
            topos_devices::irqchip::Startup::Init => Startup::Init,
            topos_devices::irqchip::Startup::Sipi(v) => Startup::Sipi(v),
        })
    }
    fn reset(&mut self) {
        topos_devices::irqchip::LocalApic::reset(self)
    }
    fn is_bsp(&self) -> bool {
        topos_devices::irqchip::LocalApic::is_bsp(self)
    }
}
