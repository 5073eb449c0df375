//! The architectural state of one interpreted x86 CPU: what a user of the
//! library sets before running and reads after.

use super::flags::LazyFlags;

/// A segment register's index in [`CpuState::seg`], in the hardware's
/// encoding order (the `reg` field of `mov sreg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegReg {
    /// ES.
    Es = 0,
    /// CS.
    Cs = 1,
    /// SS.
    Ss = 2,
    /// DS.
    Ds = 3,
    /// FS.
    Fs = 4,
    /// GS.
    Gs = 5,
}

/// A segment register, selector and hidden descriptor cache, as KVM's
/// `kvm_segment` and VMX keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// The visible selector.
    pub selector: u16,
    /// The linear base address.
    pub base: u32,
    /// The limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Access rights in VMX layout: bits 0–3 type, 4 S, 5–6 DPL, 7 P,
    /// 12 AVL, 13 L, 14 D/B, 15 G. Zero means unusable (a null selector
    /// loaded in protected mode).
    pub attrs: u16,
}

/// Bits of [`Segment::attrs`].
pub mod attr {
    /// Accessed (the low type bit).
    pub const ACCESSED: u16 = 1 << 0;
    /// Code: readable. Data: writable.
    pub const RW: u16 = 1 << 1;
    /// Code: conforming. Data: expand-down.
    pub const DC: u16 = 1 << 2;
    /// Code (else data).
    pub const CODE: u16 = 1 << 3;
    /// Code or data (else a system descriptor).
    pub const S: u16 = 1 << 4;
    /// Present.
    pub const P: u16 = 1 << 7;
    /// Default operation size 32 bits (code) / big (stack, expand-down).
    pub const DB: u16 = 1 << 14;
    /// Granularity 4 KiB.
    pub const G: u16 = 1 << 15;
}

impl Segment {
    /// A real-mode segment for `selector` (base `selector << 4`, limit
    /// 64 KiB, a read/write data or execute/read code segment).
    pub fn real_mode(selector: u16, code: bool) -> Segment {
        let ty = if code { 0x9b } else { 0x93 };
        Segment { selector, base: u32::from(selector) << 4, limit: 0xffff, attrs: ty }
    }

    /// A flat 4 GiB 32-bit ring-0 segment: code (execute/read) or data
    /// (read/write).
    pub fn flat32(selector: u16, code: bool) -> Segment {
        let ty = if code { 0x9b } else { 0x93 };
        Segment { selector, base: 0, limit: 0xffff_ffff, attrs: ty | attr::DB | attr::G }
    }

    /// The descriptor privilege level.
    pub fn dpl(&self) -> u8 {
        ((self.attrs >> 5) & 3) as u8
    }

    /// Whether the D/B bit is set (32-bit code, 32-bit stack).
    pub fn is_32(&self) -> bool {
        self.attrs & attr::DB != 0
    }

    /// Whether the segment can be used (present and not null).
    pub fn is_usable(&self) -> bool {
        self.attrs & attr::P != 0
    }

    /// The segment's hidden part from a descriptor (the 8 bytes of a GDT or
    /// LDT entry).
    pub fn from_descriptor(selector: u16, desc: u64) -> Segment {
        let base = ((desc >> 16) & 0xff_ffff) as u32 | (((desc >> 56) as u32) << 24);
        let raw_limit = (desc & 0xffff) as u32 | ((desc >> 32) as u32 & 0xf_0000);
        let attrs = ((desc >> 40) & 0xf0ff) as u16;
        let limit = if attrs & attr::G != 0 { (raw_limit << 12) | 0xfff } else { raw_limit };
        Segment { selector, base, limit, attrs }
    }
}

/// A descriptor-table register (GDTR, IDTR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u32,
    /// Limit (the last valid byte offset).
    pub limit: u16,
}

/// Bits of EFLAGS.
pub mod flag {
    /// Carry.
    pub const CF: u32 = 1 << 0;
    /// Always one.
    pub const FIXED: u32 = 1 << 1;
    /// Parity.
    pub const PF: u32 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u32 = 1 << 4;
    /// Zero.
    pub const ZF: u32 = 1 << 6;
    /// Sign.
    pub const SF: u32 = 1 << 7;
    /// Trap.
    pub const TF: u32 = 1 << 8;
    /// Interrupt enable.
    pub const IF: u32 = 1 << 9;
    /// Direction.
    pub const DF: u32 = 1 << 10;
    /// Overflow.
    pub const OF: u32 = 1 << 11;
    /// I/O privilege level (two bits).
    pub const IOPL: u32 = 3 << 12;
    /// Nested task.
    pub const NT: u32 = 1 << 14;
    /// Resume.
    pub const RF: u32 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u32 = 1 << 17;
    /// Alignment check.
    pub const AC: u32 = 1 << 18;
    /// Virtual interrupt flag.
    pub const VIF: u32 = 1 << 19;
    /// Virtual interrupt pending.
    pub const VIP: u32 = 1 << 20;
    /// CPUID available.
    pub const ID: u32 = 1 << 21;
    /// The six arithmetic flags.
    pub const ARITH: u32 = CF | PF | AF | ZF | SF | OF;
    /// The bits software can change (the rest read as fixed).
    pub const WRITABLE: u32 = ARITH | TF | IF | DF | IOPL | NT | RF | VM | AC | VIF | VIP | ID;
}

/// Bits of CR0.
pub mod cr0 {
    /// Protection enable.
    pub const PE: u32 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u32 = 1 << 1;
    /// x87 emulation: x87 instructions raise `#NM`.
    pub const EM: u32 = 1 << 2;
    /// Task switched.
    pub const TS: u32 = 1 << 3;
    /// Extension type (reads as one).
    pub const ET: u32 = 1 << 4;
    /// Numeric error.
    pub const NE: u32 = 1 << 5;
    /// Write protect (supervisor writes honour read-only pages).
    pub const WP: u32 = 1 << 16;
    /// Alignment mask.
    pub const AM: u32 = 1 << 18;
    /// Not write-through.
    pub const NW: u32 = 1 << 29;
    /// Cache disable.
    pub const CD: u32 = 1 << 30;
    /// Paging.
    pub const PG: u32 = 1 << 31;
}

/// Bits of CR4.
pub mod cr4 {
    /// Virtual-8086 mode extensions.
    pub const VME: u32 = 1 << 0;
    /// Protected-mode virtual interrupts.
    pub const PVI: u32 = 1 << 1;
    /// Time stamp disable (`rdtsc` is privileged).
    pub const TSD: u32 = 1 << 2;
    /// Debugging extensions.
    pub const DE: u32 = 1 << 3;
    /// 4 MiB pages in 32-bit paging.
    pub const PSE: u32 = 1 << 4;
    /// Physical address extension (PAE paging).
    pub const PAE: u32 = 1 << 5;
    /// Machine check enable.
    pub const MCE: u32 = 1 << 6;
    /// Global pages.
    pub const PGE: u32 = 1 << 7;
    /// Performance counters readable at any CPL.
    pub const PCE: u32 = 1 << 8;
    /// The bits this CPU accepts; setting another raises `#GP(0)`.
    pub const SUPPORTED: u32 = VME | PVI | TSD | DE | PSE | PAE | MCE | PGE | PCE;
}

/// The architectural state of one CPU.
///
/// Registers are plain fields; EFLAGS is computed lazily by the interpreter
/// and read and written through [`eflags`](Self::eflags) and
/// [`set_eflags`](Self::set_eflags).
#[derive(Debug, Clone)]
pub struct CpuState {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI (the hardware's encoding order).
    pub gpr: [u32; 8],
    /// The instruction pointer (an offset in CS).
    pub eip: u32,
    pub(crate) flags: LazyFlags,
    /// ES, CS, SS, DS, FS, GS (index with [`SegReg`]).
    pub seg: [Segment; 6],
    /// The LDT register.
    pub ldtr: Segment,
    /// The task register.
    pub tr: Segment,
    /// The GDT register.
    pub gdtr: DescriptorTable,
    /// The IDT register.
    pub idtr: DescriptorTable,
    /// CR0.
    pub cr0: u32,
    /// CR2 (the last page-fault address).
    pub cr2: u32,
    /// CR3 (the page-directory base).
    pub cr3: u32,
    /// CR4.
    pub cr4: u32,
    /// DR0–DR7 (stored; breakpoints are not implemented).
    pub dr: [u32; 8],
    /// IA32_EFER (stored; long mode is not implemented).
    pub efer: u64,
    /// The CPU executed `hlt` and waits for an interrupt.
    pub halted: bool,
    /// The CPU is an application processor waiting for a startup IPI (after
    /// INIT).
    pub wait_for_sipi: bool,
}

impl Default for CpuState {
    fn default() -> CpuState {
        CpuState::reset()
    }
}

impl CpuState {
    /// The power-on state (Intel SDM vol. 3, table 9-1): real mode,
    /// `CS:IP = f000:fff0` with CS base `0xffff0000`.
    pub fn reset() -> CpuState {
        let data = Segment::real_mode(0, false);
        let mut cs = Segment::real_mode(0xf000, true);
        cs.base = 0xffff_0000;
        let mut s = CpuState {
            gpr: [0; 8],
            eip: 0xfff0,
            flags: LazyFlags::new(flag::FIXED),
            seg: [data, cs, data, data, data, data],
            ldtr: Segment { selector: 0, base: 0, limit: 0xffff, attrs: 0x82 },
            tr: Segment { selector: 0, base: 0, limit: 0xffff, attrs: 0x8b },
            gdtr: DescriptorTable { base: 0, limit: 0xffff },
            idtr: DescriptorTable { base: 0, limit: 0xffff },
            cr0: cr0::ET | cr0::CD | cr0::NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            dr: [0, 0, 0, 0, 0xffff_0ff0, 0x400, 0xffff_0ff0, 0x400],
            efer: 0,
            halted: false,
            wait_for_sipi: false,
        };
        // EDX holds the processor signature after reset.
        s.gpr[2] = super::cpuid::SIGNATURE;
        s
    }

    /// EFLAGS.
    pub fn eflags(&self) -> u32 {
        self.flags.get()
    }

    /// Sets EFLAGS (reserved bits are forced to their fixed values).
    pub fn set_eflags(&mut self, value: u32) {
        self.flags.set((value & flag::WRITABLE) | flag::FIXED);
    }

    /// The current privilege level: CS's DPL in protected mode (its RPL
    /// equals it for a loaded CS), 3 in virtual-8086 mode, 0 in real mode.
    pub fn cpl(&self) -> u8 {
        if self.cr0 & cr0::PE == 0 {
            0
        } else if self.flags.base() & flag::VM != 0 {
            3
        } else {
            self.seg[SegReg::Cs as usize].dpl()
        }
    }

    /// EFLAGS.IOPL.
    pub(crate) fn iopl(&self) -> u8 {
        ((self.flags.base() & flag::IOPL) >> 12) as u8
    }

    /// Whether the CPU is in protected mode (CR0.PE, not virtual-8086).
    pub fn protected(&self) -> bool {
        self.cr0 & cr0::PE != 0 && self.flags.base() & flag::VM == 0
    }

    /// A segment register.
    pub fn segment(&self, s: SegReg) -> &Segment {
        &self.seg[s as usize]
    }

    /// Enters flat 32-bit protected mode at `eip` with interrupts off, as a
    /// multiboot loader leaves the CPU: CS `0x08`, data segments `0x10`.
    pub fn enter_flat32(&mut self, eip: u32) {
        self.enter_flat32_with(eip, 0x08, 0x10);
    }

    /// [`enter_flat32`](Self::enter_flat32) with CS `code_sel` and the data
    /// segments (SS too) `data_sel`.
    pub fn enter_flat32_with(&mut self, eip: u32, code_sel: u16, data_sel: u16) {
        self.cr0 |= cr0::PE;
        let data = Segment::flat32(data_sel, false);
        self.seg = [data, Segment::flat32(code_sel, true), data, data, data, data];
        self.eip = eip;
        self.set_eflags(flag::FIXED);
    }
}
