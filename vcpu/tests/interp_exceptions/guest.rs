//! The machine every exception test runs on: 4 MiB of RAM, an IVT (real
//! mode) or a GDT, an IDT and a TSS (protected mode) laid out at fixed
//! addresses, and one handler per vector that does nothing but `hlt`.
//!
//! A test assembles its code at [`CODE`], runs it to the instruction it
//! expects to fault ([`Guest::run_to`]), keeps the state there, and runs
//! on until a handler halts ([`Guest::deliver`]). The handler's address
//! says which vector was delivered; the stack it halted on holds what the
//! CPU pushed, which the host reads back ([`Delivery`]). Nothing in the
//! guest records anything: the host reads the CPU's own writes.
//!
//! | address | what |
//! | --- | --- |
//! | `0x0000` | the real-mode IVT |
//! | [`GDT`] | the GDT ([`sel`] names its entries) |
//! | [`IDT`] | the IDT: 256 interrupt gates to [`HANDLERS`], DPL 0 but for [`USER_VECTORS`] |
//! | [`TSS`] | a 32-bit TSS: SS0:ESP0 = [`sel::DATA0`]:[`STACK0_TOP`] |
//! | [`HANDLERS`] | protected-mode handlers, 16 bytes each: `hlt`, then (`add esp, 4`) `iretd` |
//! | [`REAL_HANDLERS`] | real-mode handlers, 16 bytes each: `hlt; iret` |
//! | [`STACK_TOP`] | the stack the test code starts on (ring 0 and real mode) |
//! | [`STACK0_TOP`] | the ring-0 stack of the TSS |
//! | [`CODE`] | the test code (also run at ring 3) |
//! | [`STACK3_TOP`] | the ring-3 stack |
//! | [`DATA`] | a page of data for the tests |
//! | [`PAGING`] | page tables (the paging tests) |

#![allow(dead_code)] // each test module uses a part

use iced_x86::code_asm::{CodeAssembler, CodeLabel};
use iced_x86::BlockEncoderOptions;
use topos_runtime::{MemoryRegion, StandardSpaces, Topology};
use topos_vcpu::interp::state::{cr0, flag};
use topos_vcpu::interp::{Cpu, CpuState, DescriptorTable, Exit, SegReg, Segment};

/// RAM size.
pub const RAM: u64 = 4 << 20;
/// The GDT.
pub const GDT: u32 = 0x1000;
/// The IDT (256 gates).
pub const IDT: u32 = 0x2000;
/// The TSS.
pub const TSS: u32 = 0x3000;
/// Protected-mode handlers: vector `v` at `HANDLERS + 16 * v`.
pub const HANDLERS: u32 = 0x4000;
/// Real-mode handlers: vector `v` at `0000:REAL_HANDLERS + 16 * v`.
pub const REAL_HANDLERS: u32 = 0x5000;
/// The top of the stack the test code starts on.
pub const STACK_TOP: u32 = 0x7000;
/// The top of the TSS's ring-0 stack.
pub const STACK0_TOP: u32 = 0x8000;
/// Where the test code is assembled and starts.
pub const CODE: u32 = 0x8000;
/// The top of the ring-3 stack.
pub const STACK3_TOP: u32 = 0xa000;
/// A page of data.
pub const DATA: u32 = 0xa000;
/// Page tables live from here up.
pub const PAGING: u32 = 0x10000;
/// Vectors whose gates have DPL 3 (`int3`, `into`, `bound`'s vector and
/// `int 0x80` from ring 3).
pub const USER_VECTORS: [u8; 4] = [3, 4, 5, 0x80];

/// Vectors that push an error code.
pub fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17)
}

/// GDT selectors.
pub mod sel {
    /// Flat 32-bit ring-0 code.
    pub const CODE0: u16 = 0x08;
    /// Flat 32-bit ring-0 data.
    pub const DATA0: u16 = 0x10;
    /// Flat 32-bit ring-3 code (RPL 3).
    pub const CODE3: u16 = 0x18 | 3;
    /// Flat 32-bit ring-3 data (RPL 3).
    pub const DATA3: u16 = 0x20 | 3;
    /// The TSS.
    pub const TSS: u16 = 0x28;
    /// Ring-0 data at [`super::DATA`] with a 256-byte limit.
    pub const SMALL: u16 = 0x30;
    /// Ring-0 writable data, not present.
    pub const ABSENT_DATA: u16 = 0x38;
    /// Ring-0 read-only data (flat).
    pub const READ_ONLY: u16 = 0x40;
    /// Ring-0 32-bit code, not present.
    pub const ABSENT_CODE: u16 = 0x48;
    /// Ring-0 flat 16-bit code.
    pub const CODE16: u16 = 0x50;
    /// Ring-3 data at [`super::DATA`] with a 256-byte limit (a small
    /// ring-3 stack).
    pub const SMALL3: u16 = 0x58 | 3;
    /// Ring-0 execute-only code.
    pub const EXEC_ONLY: u16 = 0x60;
    /// One past the last descriptor (the GDT limit is `END - 1`).
    pub const END: u16 = 0x68;
}

/// An 8-byte code or data descriptor: `access` is the access byte (P, DPL,
/// S, type), `flags` the high nibble (G, D/B, L, AVL).
pub fn descriptor(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    let (base, limit) = (u64::from(base), u64::from(limit));
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(access) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (u64::from(flags & 0xf) << 52)
        | ((base >> 24) << 56)
}

/// An IDT gate: `ty` 0xe (32-bit interrupt), 0xf (32-bit trap), 6/7
/// (16-bit), present unless `present` is false.
pub fn gate(selector: u16, offset: u32, ty: u8, dpl: u8, present: bool) -> u64 {
    let access = (u64::from(present) << 7) | (u64::from(dpl) << 5) | u64::from(ty);
    u64::from(offset & 0xffff) | (u64::from(selector) << 16) | (access << 40) | (u64::from(offset >> 16) << 48)
}

/// Assembled guest code and the addresses of its labels.
pub struct Code {
    /// The bytes, to load at the origin.
    pub bytes: Vec<u8>,
    labels: Vec<(&'static str, u32)>,
}

impl Code {
    /// The address of label `name`.
    pub fn at(&self, name: &str) -> u32 {
        self.labels.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no label {name}")).1
    }
}

/// An assembler with named labels.
pub struct Asm {
    /// iced-x86's assembler (use it directly for instructions).
    pub a: CodeAssembler,
    labels: Vec<(&'static str, CodeLabel)>,
}

impl Asm {
    /// Binds `name` to the next instruction.
    pub fn mark(&mut self, name: &'static str) {
        let mut l = self.a.create_label();
        self.a.set_label(&mut l).expect("a fresh label");
        self.labels.push((name, l));
    }

    /// A label to jump to (bound later with [`CodeAssembler::set_label`]).
    pub fn label(&mut self) -> CodeLabel {
        self.a.create_label()
    }
}

impl std::ops::Deref for Asm {
    type Target = CodeAssembler;
    fn deref(&self) -> &CodeAssembler {
        &self.a
    }
}

impl std::ops::DerefMut for Asm {
    fn deref_mut(&mut self) -> &mut CodeAssembler {
        &mut self.a
    }
}

/// Assembles `bits`-bit code for address `org`.
pub fn assemble(bits: u32, org: u32, f: impl FnOnce(&mut Asm) -> Result<(), iced_x86::IcedError>) -> Code {
    let mut asm = Asm { a: CodeAssembler::new(bits).expect("16 or 32 bits"), labels: Vec::new() };
    f(&mut asm).expect("the test code assembles");
    let r = asm
        .a
        .assemble_options(u64::from(org), BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .expect("the test code encodes");
    let labels = asm.labels.iter().map(|(n, l)| (*n, r.label_ip(l).expect("a bound label") as u32)).collect();
    Code { bytes: r.inner.code_buffer, labels }
}

/// The mode a guest starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Real mode, CS = SS = DS = ES = 0.
    Real,
    /// 32-bit protected mode, ring 0, flat segments.
    Prot,
}

/// A guest machine with one interpreted CPU.
pub struct Guest {
    /// The address spaces.
    pub spaces: StandardSpaces,
    /// The RAM region.
    pub ram: MemoryRegion,
    /// The CPU.
    pub cpu: Cpu,
    /// The mode it started in.
    pub mode: Mode,
    /// The topology (to add regions).
    pub topo: Topology,
}

/// What a handler found when it halted.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The vector whose handler ran.
    pub vector: u8,
    /// ESP (SP in real mode) in the handler.
    pub esp: u32,
    /// SS's selector in the handler.
    pub ss: u16,
    /// CS's selector in the handler.
    pub cs: u16,
    /// EFLAGS in the handler.
    pub eflags: u32,
    /// The first stack slots from ESP up (4 bytes each in protected mode,
    /// 2 in real mode).
    pub slots: [u32; 6],
    /// CR2 in the handler.
    pub cr2: u32,
}

/// The state at the instruction a test expects to fault.
pub type Before = CpuState;

impl Guest {
    /// A machine in `mode` with `code` at [`CODE`].
    pub fn new(mode: Mode, code: &Code) -> Guest {
        let topo = Topology::new();
        let spaces = topo.standard_spaces().expect("address spaces");
        let ram = topo.new_ram("ram", u128::from(RAM)).expect("RAM");
        spaces.system.add_subregion(0, &ram).expect("RAM mapped");
        let cpu = Cpu::new(&spaces.memory, &spaces.io_space);
        let mut g = Guest { spaces, ram, cpu, mode, topo };
        g.build_tables();
        g.write(CODE, &code.bytes);
        g.reset_state(CODE);
        g
    }

    /// Puts the CPU back in the mode it started in, at `eip`: the
    /// segments, descriptor-table registers and TSS of the layout, the
    /// stack at [`STACK_TOP`], interrupts off, no paging.
    pub fn reset_state(&mut self, eip: u32) {
        let mode = self.mode;
        let s = self.cpu.state_mut();
        *s = CpuState::reset();
        match mode {
            Mode::Real => {
                s.seg = [Segment::real_mode(0, false); 6];
                s.seg[SegReg::Cs as usize] = Segment::real_mode(0, true);
                s.idtr = DescriptorTable { base: 0, limit: 0x3ff };
                s.gpr[4] = STACK_TOP;
                s.eip = eip;
                s.set_eflags(flag::FIXED);
            }
            Mode::Prot => {
                s.enter_flat32(eip);
                s.gdtr = DescriptorTable { base: GDT, limit: sel::END - 1 };
                s.idtr = DescriptorTable { base: IDT, limit: 256 * 8 - 1 };
                s.tr = Segment { selector: sel::TSS, base: TSS, limit: 0x67, attrs: 0x8b };
                s.gpr[4] = STACK_TOP;
            }
        }
        s.cr0 &= !(cr0::CD | cr0::NW);
    }

    /// Copies `bytes` to guest-physical `addr`.
    pub fn write(&self, addr: u32, bytes: &[u8]) {
        self.ram.ram().expect("RAM").write(u64::from(addr), bytes).expect("in RAM");
    }

    /// Reads `n` bytes at guest-physical `addr`.
    pub fn read(&self, addr: u32, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.ram.ram().expect("RAM").read(u64::from(addr), &mut b).expect("in RAM");
        b
    }

    /// The 32-bit word at `addr`.
    pub fn read_u32(&self, addr: u32) -> u32 {
        u32::from_le_bytes(self.read(addr, 4).try_into().expect("4 bytes"))
    }

    /// Writes a 32-bit word.
    pub fn write_u32(&self, addr: u32, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }

    /// Writes a 64-bit word.
    pub fn write_u64(&self, addr: u32, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    /// Replaces GDT entry `selector`.
    pub fn set_descriptor(&self, selector: u16, desc: u64) {
        self.write_u64(GDT + u32::from(selector & !7), desc);
    }

    /// Replaces IDT entry `vector`.
    pub fn set_gate(&self, vector: u8, g: u64) {
        self.write_u64(IDT + 8 * u32::from(vector), g);
    }

    /// Writes the IVT, GDT, IDT, TSS and handlers of the layout.
    pub fn build_tables(&mut self) {
        // Real mode: the IVT and its handlers.
        for v in 0..=255u32 {
            let h = REAL_HANDLERS + 16 * v;
            self.write_u32(4 * v, h); // 0000:h
            self.write(h, &[0xf4, 0xcf]); // hlt; iret
        }
        // Protected mode: the GDT.
        use sel::{ABSENT_CODE, ABSENT_DATA, CODE0, CODE16, CODE3, DATA0, DATA3, EXEC_ONLY, READ_ONLY, SMALL, SMALL3};
        let entries: [(u16, u64); 12] = [
            (CODE0, descriptor(0, 0xfffff, 0x9b, 0xc)),
            (DATA0, descriptor(0, 0xfffff, 0x93, 0xc)),
            (CODE3, descriptor(0, 0xfffff, 0xfb, 0xc)),
            (DATA3, descriptor(0, 0xfffff, 0xf3, 0xc)),
            (sel::TSS, descriptor(TSS, 0x67, 0x8b, 0)),
            (SMALL, descriptor(DATA, 0xff, 0x93, 0x4)),
            (ABSENT_DATA, descriptor(0, 0xfffff, 0x13, 0xc)),
            (READ_ONLY, descriptor(0, 0xfffff, 0x91, 0xc)),
            (ABSENT_CODE, descriptor(0, 0xfffff, 0x1b, 0xc)),
            (CODE16, descriptor(0, 0xffff, 0x9b, 0)),
            (SMALL3, descriptor(DATA, 0xff, 0xf3, 0x4)),
            (EXEC_ONLY, descriptor(0, 0xfffff, 0x99, 0xc)),
        ];
        for (s, d) in entries {
            self.set_descriptor(s, d);
        }
        // The IDT and its handlers.
        for v in 0..=255u8 {
            let h = HANDLERS + 16 * u32::from(v);
            let dpl = if USER_VECTORS.contains(&v) { 3 } else { 0 };
            self.set_gate(v, gate(CODE0, h, 0xe, dpl, true));
            let code: &[u8] = if has_error_code(v) { &[0xf4, 0x83, 0xc4, 0x04, 0xcf] } else { &[0xf4, 0xcf] };
            self.write(h, code);
        }
        // The TSS: SS0:ESP0, and an I/O bitmap base beyond the limit.
        self.write_u32(TSS + 4, STACK0_TOP);
        self.write_u32(TSS + 8, u32::from(DATA0));
        self.write_u32(TSS + 0x64, 0xffff << 16);
    }

    /// Switches the CPU to ring 3 at `eip` with the flat ring-3 segments
    /// and the ring-3 stack (as an `iret` to ring 3 would leave it).
    pub fn enter_ring3(&mut self, eip: u32) {
        let s = self.cpu.state_mut();
        let data = Segment { selector: sel::DATA3, base: 0, limit: 0xffff_ffff, attrs: 0xc0f3 };
        let code = Segment { selector: sel::CODE3, base: 0, limit: 0xffff_ffff, attrs: 0xc0fb };
        s.seg = [data, code, data, data, data, data];
        s.gpr[4] = STACK3_TOP;
        s.eip = eip;
    }

    /// The CPU's state.
    pub fn state(&self) -> &CpuState {
        self.cpu.state()
    }

    /// Runs one instruction at a time until EIP is `eip` (in at most 1000
    /// instructions, none of them reaching a handler) and returns the state
    /// there.
    pub fn run_to(&mut self, eip: u32) -> Before {
        for _ in 0..1000 {
            if self.state().eip == eip {
                return self.state().clone();
            }
            let at = self.state().eip;
            assert_eq!(self.cpu.step(), Exit::Limit, "running to {eip:#x}: stopped at {at:#x}");
            assert!(!self.in_handler(), "running to {eip:#x}: the instruction at {at:#x} raised {:?}", self.delivery());
        }
        panic!("EIP never reached {eip:#x} (at {:#x})", self.state().eip);
    }

    fn in_handler(&self) -> bool {
        let cs = self.state().segment(SegReg::Cs);
        let la = cs.base.wrapping_add(self.state().eip);
        (HANDLERS..REAL_HANDLERS + 0x1000).contains(&la)
    }

    /// Runs until a handler halts (in at most 1000 instructions) and
    /// returns what it found.
    pub fn deliver(&mut self) -> Delivery {
        let exit = self.cpu.run(1000);
        assert_eq!(exit, Exit::Halted, "expected a handler to halt; state: {:?}", self.state());
        self.delivery().unwrap_or_else(|| panic!("halted outside a handler at {:#x}", self.state().eip))
    }

    /// Runs until the machine stops by itself and returns why.
    pub fn run(&mut self, budget: u64) -> Exit {
        self.cpu.run(budget)
    }

    /// What a handler halted on, if the CPU halted in one.
    pub fn delivery(&self) -> Option<Delivery> {
        let s = self.state();
        let cs = s.segment(SegReg::Cs);
        let la = cs.base.wrapping_add(s.eip).wrapping_sub(1);
        let (base, real) = if (HANDLERS..HANDLERS + 0x1000).contains(&la) {
            (HANDLERS, false)
        } else if (REAL_HANDLERS..REAL_HANDLERS + 0x1000).contains(&la) {
            (REAL_HANDLERS, true)
        } else {
            return None;
        };
        if (la - base) % 16 != 0 {
            return None;
        }
        let ss = s.segment(SegReg::Ss);
        let (esp, width) = if real || !ss.is_32() { (s.gpr[4] & 0xffff, 2) } else { (s.gpr[4], 4) };
        let mut slots = [0u32; 6];
        for (i, slot) in slots.iter_mut().enumerate() {
            let la = ss.base.wrapping_add(esp).wrapping_add((i * width) as u32);
            if u64::from(la) + 4 <= RAM {
                let v = self.read_u32(la);
                *slot = if width == 2 { v & 0xffff } else { v };
            }
        }
        Some(Delivery {
            vector: ((la - base) / 16) as u8,
            esp,
            ss: ss.selector,
            cs: cs.selector,
            eflags: s.eflags(),
            slots,
            cr2: s.cr2,
        })
    }
}

/// What a test expects a delivery to have pushed.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// The vector.
    pub vector: u8,
    /// The error code, for vectors that push one.
    pub code: Option<u32>,
    /// The return address pushed.
    pub eip: u32,
}

impl Delivery {
    /// Checks a delivery at the same privilege (or in real mode) against
    /// the state `before` the instruction: the vector, error code,
    /// return CS:EIP, the flags (with RF set in the image for a fault in
    /// protected mode), the stack it used (`before`'s, right below the
    /// frame), and the flags in the handler (IF and TF cleared).
    pub fn check(&self, before: &Before, e: Expect) {
        let real = before.cr0 & cr0::PE == 0;
        assert_eq!(self.vector, e.vector, "vector (delivery {self:x?})");
        let code_slots = usize::from(e.code.is_some());
        if let Some(code) = e.code {
            assert_eq!(self.slots[0], code, "error code (delivery {self:x?})");
        }
        let frame = &self.slots[code_slots..];
        assert_eq!(frame[0], e.eip, "return EIP (delivery {self:x?})");
        assert_eq!(frame[1] & 0xffff, u32::from(before.segment(SegReg::Cs).selector), "return CS (delivery {self:x?})");
        let mut flags = before.eflags();
        if real {
            flags &= 0xffff;
        } else if is_fault(e.vector) && e.eip == before.eip {
            flags |= flag::RF;
        }
        assert_eq!(frame[2], flags, "pushed EFLAGS (delivery {self:x?})");
        let width = if real { 2 } else { 4 };
        let pushed = width * (3 + code_slots as u32);
        let sp_mask = if real { 0xffff } else { 0xffff_ffff };
        assert_eq!(self.esp, before.gpr[4].wrapping_sub(pushed) & sp_mask, "ESP in the handler (delivery {self:x?})");
        assert_eq!(self.ss, before.segment(SegReg::Ss).selector, "SS in the handler");
        let cleared = if real { flag::IF | flag::TF | flag::AC } else { flag::TF | flag::NT | flag::RF | flag::IF };
        assert_eq!(self.eflags, before.eflags() & !cleared, "EFLAGS in the handler (delivery {self:x?})");
    }
}

/// Whether exceptions with vector `v` are faults (their pushed EFLAGS has
/// RF set): everything raised by the CPU but the traps and aborts.
pub fn is_fault(v: u8) -> bool {
    !matches!(v, 1 | 3 | 4 | 8 | 18) && v < 32
}

/// Runs `f`, assembled as `bits`-bit code at [`CODE`], in `mode`, to the
/// label `fault`; returns the guest, the state there and the code.
pub fn start(mode: Mode, f: impl FnOnce(&mut Asm) -> Result<(), iced_x86::IcedError>) -> (Guest, Before, Code) {
    let bits = if mode == Mode::Real { 16 } else { 32 };
    let code = assemble(bits, CODE, f);
    let mut g = Guest::new(mode, &code);
    let before = g.run_to(code.at("fault"));
    (g, before, code)
}

/// Both modes, for tests that run the same code in each.
pub const MODES: [Mode; 2] = [Mode::Real, Mode::Prot];
