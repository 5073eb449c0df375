//! The generator: a seeded random sequence of instructions for a
//! [`Profile`], its initial registers and data window.
//!
//! A sequence is straight-line code: items (an instruction with the `mov`s
//! that aim its memory operand, set its shift count, its dividend...) end
//! with `out 0xe0, al; hlt`. Every memory access lands in the data window;
//! in ring 0 and real mode the stack pointer is tracked, so pushes, pops,
//! `enter`, `leave` and `[esp+disp]` stay in the window's stack half.
//! Divisions are set up not to fault, except for the rare case that ends
//! on purpose with an exception (ring 0 and real mode).
//!
//! PVM's emulation of ring 0 and real mode fails (an emulation-failure
//! exit) on `daa`, `aaa`, `aas`, `enter` with a nesting level, `int3`,
//! `int n` and `into` in protected mode and `ud2` in real mode, and
//! differs from the SDM in three places found by this test: `enter` with
//! an operand-size prefix pushes the stack's width and sets all of EBP;
//! `aam` and `aad` set SF from more than AL; an exception it raises in real
//! mode (#DE) clears ESP[31:16]. With [`Options::pvm`] the generator leaves
//! those out: no `daa`/`aaa`/`aas`, `enter` at the stack's width with levels
//! that mask to 0, `aam`/`aad` with their flags not compared, ESP's upper
//! half cleared before a real-mode #DE, and only the exceptions PVM
//! delivers.
//!
//! The generator follows which arithmetic flags are architecturally
//! undefined (see [`flags`](super::flags)); in *strict* mode it defines
//! them again (`cmp r32, imm32`) before an instruction reads them, so a
//! comparison against an emulator can leave undefined flags out without
//! their values leaking into registers or memory.

use super::flags::{self, Effect, AF, ARITH, CF, DF, IF, OF, PF, SF, ZF};
use super::layout::{WINDOW, WINDOW_SIZE};
use super::outcome::State;
use super::registry::{code_bits, codes, kind_bits, Profile};
use iced_x86::{Code, Instruction, MemoryOperand, Mnemonic, OpCodeOperandKind as K, Register, RepPrefixKind};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// The data half of the window (offsets): memory operands and strings.
const DATA: (u32, u32) = (0x100, 0x7f00);
/// Where the stack pointer stays (offsets in the window).
const STACK: (u32, u32) = (0x8800, 0xf800);

/// A general register by width (8, 16, 32) and number (encoding order).
pub fn gpr(bits: u32, n: usize) -> Register {
    const R8: [Register; 8] = [
        Register::AL,
        Register::CL,
        Register::DL,
        Register::BL,
        Register::AH,
        Register::CH,
        Register::DH,
        Register::BH,
    ];
    const R16: [Register; 8] = [
        Register::AX,
        Register::CX,
        Register::DX,
        Register::BX,
        Register::SP,
        Register::BP,
        Register::SI,
        Register::DI,
    ];
    const R32: [Register; 8] = [
        Register::EAX,
        Register::ECX,
        Register::EDX,
        Register::EBX,
        Register::ESP,
        Register::EBP,
        Register::ESI,
        Register::EDI,
    ];
    match bits {
        8 => R8[n],
        16 => R16[n],
        _ => R32[n],
    }
}

/// The number of the 32-bit register holding `r` (AH is in EAX).
pub(super) fn holder(r: Register) -> usize {
    (0..8).find(|&n| gpr(32, n) == r.full_register32()).expect("a general register")
}

/// An instruction operand.
#[derive(Debug, Clone, Copy)]
enum Opnd {
    Reg(Register),
    Mem(MemoryOperand),
    /// An immediate, in the unsigned form of its operand's width (sign
    /// extended from 8 bits for the `imm8sex` kinds).
    Imm(u32),
}

/// `code` with `ops`.
fn build(code: Code, ops: &[Opnd]) -> Instruction {
    use Opnd::*;
    let r = match *ops {
        [] => Ok(Instruction::with(code)),
        [Reg(a)] => Instruction::with1(code, a),
        [Mem(a)] => Instruction::with1(code, a),
        [Imm(a)] => Instruction::with1(code, a),
        [Reg(a), Reg(b)] => Instruction::with2(code, a, b),
        [Reg(a), Mem(b)] => Instruction::with2(code, a, b),
        [Reg(a), Imm(b)] => Instruction::with2(code, a, b),
        [Mem(a), Reg(b)] => Instruction::with2(code, a, b),
        [Mem(a), Imm(b)] => Instruction::with2(code, a, b),
        [Imm(a), Imm(b)] => Instruction::with2(code, a, b),
        [Imm(a), Reg(b)] => Instruction::with2(code, a, b),
        [Reg(a), Reg(b), Imm(c)] => Instruction::with3(code, a, b, c),
        [Reg(a), Mem(b), Imm(c)] => Instruction::with3(code, a, b, c),
        [Mem(a), Reg(b), Imm(c)] => Instruction::with3(code, a, b, c),
        [Reg(a), Reg(b), Reg(c)] => Instruction::with3(code, a, b, c),
        [Mem(a), Reg(b), Reg(c)] => Instruction::with3(code, a, b, c),
        _ => panic!("{code:?}: no operand combination {ops:?}"),
    };
    r.unwrap_or_else(|e| panic!("{code:?} {ops:?}: {e}"))
}

/// `mov reg, value` at the register's width.
fn mov_imm(reg: Register, value: u32) -> Instruction {
    let code = match reg.size() {
        1 => Code::Mov_r8_imm8,
        2 => Code::Mov_r16_imm16,
        _ => Code::Mov_r32_imm32,
    };
    let mask = if reg.size() == 4 { u32::MAX } else { (1 << (8 * reg.size())) - 1 };
    build(code, &[Opnd::Reg(reg), Opnd::Imm(value & mask)])
}

/// A case's instructions and where it starts, before assembly.
pub struct Generated {
    /// The instructions, without the final `out 0xe0, al; hlt`.
    pub insns: Vec<Instruction>,
    /// The arithmetic flags undefined after each instruction.
    pub undefined_after: Vec<u32>,
    /// The registers at the start.
    pub start: State,
    /// The window at the start.
    pub window: Vec<u8>,
    /// The arithmetic flags undefined at the end.
    pub undefined: u32,
    /// Whether it ends with an exception instead of reaching its `out`.
    pub faults: bool,
}

/// What the generator may emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Define undefined flags again before an instruction reads them.
    pub strict: bool,
    /// Leave out what PVM's ring-0 and real-mode emulation cannot run.
    pub pvm: bool,
    /// Leave out what QEMU's TCG does not run as the CPU does: the `f6 /1`
    /// and `f7 /1` aliases of `test` (#UD there), the `idiv` overflow
    /// (QEMU 7.2 dies of SIGFPE), `cmpxchg8b` (QEMU 7.2 scrambles EFLAGS,
    /// TF and IF included) and faults in protected mode (QEMU pushes EFLAGS
    /// without RF).
    pub qemu: bool,
}

/// The generator's state while it emits one case.
pub struct Gen {
    pub(super) rng: StdRng,
    pub(super) profile: Profile,
    strict: bool,
    pvm: bool,
    qemu: bool,
    insns: Vec<Instruction>,
    /// The undefined flags after each instruction.
    undefined_after: Vec<u32>,
    /// Arithmetic flags undefined now.
    undefined: u32,
    /// The direction flag now.
    df: bool,
    /// The stack pointer now (ring 0: ESP; real mode: SP, an offset in the
    /// window); unused in 64-bit-compatible code.
    sp: u32,
    /// EBP (BP in real mode) when it is known to point into the stack.
    bp: Option<u32>,
}

impl Gen {
    /// A value of `bits` bits, often an edge case.
    pub(super) fn value(&mut self, bits: u32) -> u64 {
        const EDGES: [u64; 16] = [
            0,
            1,
            2,
            0x7f,
            0x80,
            0xff,
            0x100,
            0x7fff,
            0x8000,
            0xffff,
            0x1_0000,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            0xffff_fffe,
            0x8000_0001,
        ];
        let v = if self.rng.random_bool(0.3) {
            let e = EDGES[self.rng.random_range(0..EDGES.len())];
            if self.rng.random_bool(0.5) {
                e
            } else {
                e.wrapping_neg()
            }
        } else {
            self.rng.random::<u64>()
        };
        if bits >= 64 {
            v
        } else {
            v & ((1u64 << bits) - 1)
        }
    }

    /// The stack's base: the window in ring 0, 0 in real mode (SS is the
    /// window).
    fn stack_base(&self) -> u32 {
        if self.profile == Profile::Real {
            0
        } else {
            WINDOW as u32
        }
    }

    /// Appends `insn`, first defining flags it reads that are undefined (in
    /// strict mode).
    fn emit(&mut self, insn: Instruction, fx: Effect) {
        if self.strict && fx.uses & self.undefined != 0 {
            let n = self.rng.random_range(0..8);
            let imm = self.value(32) as u32;
            self.undefined = 0;
            self.push(build(Code::Cmp_rm32_imm32, &[Opnd::Reg(gpr(32, n)), Opnd::Imm(imm)]));
        }
        self.undefined = fx.apply(self.undefined);
        self.push(insn);
    }

    /// Appends instructions that touch no flag.
    fn setup(&mut self, insns: Vec<Instruction>) {
        for i in insns {
            self.push(i);
        }
    }

    /// Appends one instruction, noting the undefined flags after it.
    fn push(&mut self, insn: Instruction) {
        self.insns.push(insn);
        self.undefined_after.push(self.undefined);
    }

    /// Registers instructions may name: all but ESP/SP in ring 0 and real
    /// mode (the tracked stack pointer).
    fn usable(&self) -> u8 {
        if self.profile == Profile::Native {
            0xff
        } else {
            !(1 << 4)
        }
    }

    /// A random register of `bits` whose holder is not in `avoid`.
    fn reg(&mut self, bits: u32, avoid: u8) -> Register {
        let ok = self.usable() & !avoid;
        let free: Vec<usize> = (0..8).filter(|&n| ok & (1 << if bits == 8 { n & 3 } else { n }) != 0).collect();
        let free = if free.is_empty() { vec![0] } else { free };
        gpr(bits, free[self.rng.random_range(0..free.len())])
    }

    /// An immediate for an operand kind.
    fn imm(&mut self, kind: K) -> u32 {
        match kind {
            K::imm8 => self.value(8) as u32,
            K::imm8sex16 => u32::from(self.value(8) as u8 as i8 as i16 as u16),
            K::imm8sex32 => self.value(8) as u8 as i8 as i32 as u32,
            K::imm16 => self.value(16) as u32,
            K::imm8_const_1 => 1,
            _ => self.value(32) as u32,
        }
    }

    /// Operands for `code`, with the instructions that aim its memory
    /// operand; registers in `avoid` are left alone, and a memory operand
    /// is aimed at the data half (or at `target`).
    fn operands(&mut self, code: Code, avoid: u8) -> (Vec<Opnd>, Vec<Instruction>) {
        let mut setup = Vec::new();
        let ops = code
            .op_code()
            .op_kinds()
            .iter()
            .map(|&kind| match kind {
                K::r8_or_mem | K::r16_or_mem | K::r32_or_mem if self.rng.random_bool(0.4) => {
                    let (m, s) = self.mem(kind_bits(kind) / 8, avoid, DATA.0, DATA.1);
                    setup.extend(s);
                    Opnd::Mem(m)
                }
                K::mem => {
                    let (m, s) = self.mem(8, avoid, DATA.0, DATA.1);
                    setup.extend(s);
                    Opnd::Mem(m)
                }
                K::al => Opnd::Reg(Register::AL),
                K::cl => Opnd::Reg(Register::CL),
                K::ax => Opnd::Reg(Register::AX),
                K::eax => Opnd::Reg(Register::EAX),
                K::imm8 | K::imm8sex16 | K::imm8sex32 | K::imm16 | K::imm32 | K::imm8_const_1 => {
                    Opnd::Imm(self.imm(kind))
                }
                _ => Opnd::Reg(self.reg(kind_bits(kind), avoid)),
            })
            .collect();
        (ops, setup)
    }

    /// A random encoding of `mnemonic` at a random width in `widths`
    /// satisfying `shape`.
    fn pick(&mut self, mnemonic: Mnemonic, widths: &[u32], shape: impl Fn(&[K]) -> bool) -> Option<Code> {
        let bits = widths[self.rng.random_range(0..widths.len())];
        let qemu = self.qemu;
        let all: Vec<Code> = codes(self.profile, mnemonic, bits, shape)
            .into_iter()
            .filter(|&c| {
                !(qemu
                    && matches!(c, Code::Test_rm8_imm8_F6r1 | Code::Test_rm16_imm16_F7r1 | Code::Test_rm32_imm32_F7r1))
            })
            .collect();
        (!all.is_empty()).then(|| all[self.rng.random_range(0..all.len())])
    }

    /// Sets the lock prefix on a lockable read-modify-write of memory,
    /// sometimes.
    fn maybe_lock(&mut self, insn: &mut Instruction, ops: &[Opnd]) {
        if matches!(ops.first(), Some(Opnd::Mem(_)))
            && insn.code().op_code().can_use_lock_prefix()
            && self.rng.random_bool(0.3)
        {
            insn.set_has_lock_prefix(true);
        }
    }

    /// One generic instruction: `mnemonic` with operands filled at random.
    fn generic(&mut self, mnemonic: Mnemonic, widths: &[u32], fx: Effect) {
        let Some(code) = self.pick(mnemonic, widths, |_| true) else { return };
        let (ops, setup) = self.operands(code, 0);
        let mut insn = build(code, &ops);
        self.maybe_lock(&mut insn, &ops);
        self.setup(setup);
        self.emit(insn, fx);
    }

    fn alu2(&mut self) {
        use Mnemonic::*;
        let all = [Add, Or, Adc, Sbb, And, Sub, Xor, Cmp, Test];
        let mn = all[self.rng.random_range(0..all.len())];
        let fx = match mn {
            Add | Sub | Cmp => Effect::sets(ARITH, 0),
            Adc | Sbb => Effect::sets(ARITH, 0).reading(CF),
            _ => Effect::sets(ARITH & !AF, AF),
        };
        self.generic(mn, &[8, 16, 32, 32], fx);
    }

    fn alu1(&mut self) {
        use Mnemonic::*;
        let (mn, fx) = match self.rng.random_range(0..4) {
            0 => (Inc, Effect::sets(ARITH & !CF, 0)),
            1 => (Dec, Effect::sets(ARITH & !CF, 0)),
            2 => (Neg, Effect::sets(ARITH, 0)),
            _ => (Not, Effect::NONE),
        };
        self.generic(mn, &[8, 16, 32], fx);
    }

    /// A shift or rotate count: 0, 1, within the width, the width, beyond
    /// it, or anything (masked to 5 bits by the CPU).
    fn count(&mut self, bits: u32) -> u32 {
        match self.rng.random_range(0..10) {
            0 => 0,
            1 | 2 => 1,
            3..=5 => self.rng.random_range(2..bits),
            6 => bits,
            7 => self.rng.random_range(bits..=bits.max(31)),
            _ => self.rng.random_range(0..256),
        }
    }

    fn shift(&mut self) {
        use Mnemonic::*;
        let all = [Rol, Ror, Rcl, Rcr, Shl, Sal, Shr, Sar];
        let mn = all[self.rng.random_range(0..all.len())];
        let Some(code) = self.pick(mn, &[8, 16, 32], |_| true) else { return };
        let bits = code_bits(code);
        let kinds = code.op_code().op_kinds();
        let by_cl = kinds[1] == K::cl;
        let count = match kinds[1] {
            K::imm8_const_1 => 1,
            _ => self.count(bits),
        };
        let (mut ops, setup) = self.operands(code, if by_cl { 1 << 1 } else { 0 });
        if kinds[1] == K::imm8 {
            ops[1] = Opnd::Imm(count);
        }
        self.setup(setup);
        if by_cl {
            self.setup(vec![mov_imm(Register::CL, count)]);
        }
        let fx = match mn {
            Rol | Ror => flags::rotate(count, false),
            Rcl | Rcr => flags::rotate(count, true),
            _ => flags::shift(count, bits),
        };
        self.emit(build(code, &ops), fx);
    }

    fn double_shift(&mut self) {
        let mn = if self.rng.random_bool(0.5) { Mnemonic::Shld } else { Mnemonic::Shrd };
        let Some(code) = self.pick(mn, &[16, 32], |_| true) else { return };
        let bits = code_bits(code);
        let by_cl = code.op_code().op_kinds()[2] == K::cl;
        let mut count = self.count(bits);
        if self.strict && bits == 16 && count & 0x1f > 16 {
            // The result is undefined; keep the count's upper bits.
            count = (count & !0x1f) | (count & 0xf);
        }
        let (mut ops, setup) = self.operands(code, if by_cl { 1 << 1 } else { 0 });
        if !by_cl {
            ops[2] = Opnd::Imm(count);
        }
        self.setup(setup);
        if by_cl {
            self.setup(vec![mov_imm(Register::CL, count)]);
        }
        self.emit(build(code, &ops), flags::double_shift(count, bits));
    }

    fn multiply(&mut self) {
        let mn = if self.rng.random_bool(0.4) { Mnemonic::Mul } else { Mnemonic::Imul };
        let fx = Effect::sets(CF | OF, SF | ZF | AF | PF);
        self.generic(mn, &[8, 16, 32], fx);
    }

    /// `div`/`idiv` with a dividend, divisor and quotient chosen so that it
    /// does not fault.
    fn divide(&mut self) {
        let signed = self.rng.random_bool(0.5);
        let mn = if signed { Mnemonic::Idiv } else { Mnemonic::Div };
        let Some(code) = self.pick(mn, &[8, 16, 32], |_| true) else { return };
        let bits = code_bits(code);
        // EAX and EDX hold the dividend.
        let avoid = 1 << 0 | 1 << 2;
        let (ops, setup) = self.operands(code, avoid);
        let (dividend, divisor) = self.division(bits, signed);
        self.setup(setup);
        match bits {
            8 => self.setup(vec![mov_imm(Register::AX, dividend as u32)]),
            16 => {
                self.setup(vec![mov_imm(Register::DX, (dividend >> 16) as u32), mov_imm(Register::AX, dividend as u32)])
            }
            _ => self
                .setup(vec![mov_imm(Register::EDX, (dividend >> 32) as u32), mov_imm(Register::EAX, dividend as u32)]),
        }
        let put = match ops[0] {
            Opnd::Reg(r) => mov_imm(r, divisor as u32),
            Opnd::Mem(m) => {
                let c = [Code::Mov_rm8_imm8, Code::Mov_rm16_imm16, Code::Mov_rm32_imm32][(bits / 16) as usize];
                let mask = if bits == 32 { u32::MAX } else { (1 << bits) - 1 };
                build(c, &[Opnd::Mem(m), Opnd::Imm(divisor as u32 & mask)])
            }
            Opnd::Imm(_) => unreachable!("div has no immediate"),
        };
        self.setup(vec![put]);
        self.emit(build(code, &ops), Effect::sets(0, ARITH));
    }

    /// A dividend (2 × `bits` wide) and a non-zero divisor whose quotient
    /// fits in `bits` (signed or not), biased to the edges.
    fn division(&mut self, bits: u32, signed: bool) -> (u64, u64) {
        let mask = (1u64 << bits) - 1;
        if !signed {
            let d = (self.value(bits) & mask).max(1);
            let q = self.value(bits) & mask;
            let r = self.rng.random_range(0..d);
            return (q * d + r, d);
        }
        let half = 1i64 << (bits - 1);
        let sx = |v: u64| ((v << (64 - bits)) as i64) >> (64 - bits);
        let mut d = sx(self.value(bits));
        if d == 0 {
            d = -1;
        }
        let q = sx(self.value(bits)).clamp(-half, half - 1);
        let product = i128::from(q) * i128::from(d);
        let mut r = self.rng.random_range(0..d.unsigned_abs()) as i128;
        if product < 0 || (product == 0 && self.rng.random_bool(0.5)) {
            r = -r;
        }
        let dividend = (product + r) as i64 as u64;
        let dmask = if bits == 32 { u64::MAX } else { (1u64 << (2 * bits)) - 1 };
        (dividend & dmask, d as u64 & mask)
    }

    fn bit_test(&mut self) {
        use Mnemonic::*;
        let all = [Bt, Bts, Btr, Btc];
        let mn = all[self.rng.random_range(0..all.len())];
        let Some(code) = self.pick(mn, &[16, 32], |_| true) else { return };
        let bits = code_bits(code);
        let by_reg = code.op_code().op_kinds()[1] != K::imm8;
        let fx = Effect::sets(CF, OF | SF | ZF | AF | PF);
        if by_reg && self.rng.random_bool(0.5) {
            // A bit string in memory: the offset register reaches up to
            // 256 bytes either side of the operand.
            let off = self.reg(bits, 0);
            let offset = self.rng.random_range(-2048i32..2048);
            let (m, setup) = self.mem(bits / 8, 1 << holder(off), DATA.0 + 0x400, DATA.1 - 0x400);
            self.setup(setup);
            self.setup(vec![mov_imm(off, offset as u32)]);
            let mut insn = build(code, &[Opnd::Mem(m), Opnd::Reg(off)]);
            self.maybe_lock(&mut insn, &[Opnd::Mem(m)]);
            self.emit(insn, fx);
        } else if by_reg {
            let (a, b) = (self.reg(bits, 0), self.reg(bits, 0));
            self.emit(build(code, &[Opnd::Reg(a), Opnd::Reg(b)]), fx);
        } else {
            // An immediate offset is taken modulo the operand size.
            let (ops, setup) = self.operands(code, 0);
            self.setup(setup);
            let mut insn = build(code, &ops);
            self.maybe_lock(&mut insn, &ops);
            self.emit(insn, fx);
        }
    }

    fn bit_scan(&mut self) {
        let mn = if self.rng.random_bool(0.5) { Mnemonic::Bsf } else { Mnemonic::Bsr };
        self.generic(mn, &[16, 32], Effect::sets(ZF, CF | OF | SF | AF | PF));
    }

    fn condition(&mut self) {
        use Mnemonic::*;
        const SET: [Mnemonic; 16] =
            [Seto, Setno, Setb, Setae, Sete, Setne, Setbe, Seta, Sets, Setns, Setp, Setnp, Setl, Setge, Setle, Setg];
        const CMOV: [Mnemonic; 16] = [
            Cmovo, Cmovno, Cmovb, Cmovae, Cmove, Cmovne, Cmovbe, Cmova, Cmovs, Cmovns, Cmovp, Cmovnp, Cmovl, Cmovge,
            Cmovle, Cmovg,
        ];
        let cc = self.rng.random_range(0..16);
        let fx = Effect::NONE.reading(flags::condition_uses(cc as u32));
        if self.rng.random_bool(0.5) {
            self.generic(SET[cc], &[8], fx);
        } else {
            self.generic(CMOV[cc], &[16, 32], fx);
        }
    }

    fn exchange(&mut self) {
        use Mnemonic::*;
        match self.rng.random_range(0..5) {
            0 => self.generic(Bswap, &[32], Effect::NONE),
            1 => self.generic(Xadd, &[8, 16, 32], Effect::sets(ARITH, 0)),
            2 => self.generic(Cmpxchg, &[8, 16, 32], Effect::sets(ARITH, 0)),
            3 => self.generic(Xchg, &[8, 16, 32], Effect::NONE),
            // QEMU 7.2 leaves EFLAGS scrambled after it (TF and IF set).
            _ if self.qemu => self.generic(Xchg, &[8, 16, 32], Effect::NONE),
            _ => self.cmpxchg8b(),
        }
    }

    /// `cmpxchg8b`, equal half of the time.
    fn cmpxchg8b(&mut self) {
        // EAX, ECX, EDX and EBX are its operands.
        let (m, setup) = self.mem(8, 0x0f, DATA.0, DATA.1);
        self.setup(setup);
        let (lo, hi) = (self.value(32) as u32, self.value(32) as u32);
        self.setup(vec![mov_imm(Register::EAX, lo), mov_imm(Register::EDX, hi)]);
        if self.rng.random_bool(0.5) {
            let mut high = m;
            if m.base.size() == 2 || m.index.size() == 2 || (m.base == Register::None && m.displ_size == 2) {
                high.displacement = i64::from((m.displacement as i16).wrapping_add(4));
                high.displ_size = 2;
            } else {
                high.displacement = i64::from((m.displacement as i32).wrapping_add(4));
                high.displ_size = 4;
            }
            self.setup(vec![
                build(Code::Mov_rm32_imm32, &[Opnd::Mem(m), Opnd::Imm(lo)]),
                build(Code::Mov_rm32_imm32, &[Opnd::Mem(high), Opnd::Imm(hi)]),
            ]);
        }
        let mut insn = build(Code::Cmpxchg8b_m64, &[Opnd::Mem(m)]);
        if self.rng.random_bool(0.3) {
            insn.set_has_lock_prefix(true);
        }
        self.emit(insn, Effect::sets(ZF, 0));
    }

    fn moves(&mut self) {
        use Mnemonic::*;
        match self.rng.random_range(0..4) {
            0 => self.generic(Movzx, &[16, 32], Effect::NONE),
            1 => self.generic(Movsx, &[16, 32], Effect::NONE),
            2 => self.generic(Mov, &[8, 16, 32], Effect::NONE),
            _ => self.lea(),
        }
    }

    /// `lea` with random registers: no access, so nothing needs aiming
    /// (16-bit addressing too, except in 64-bit-compatible code).
    fn lea(&mut self) {
        let Some(code) = self.pick(Mnemonic::Lea, &[16, 32], |_| true) else { return };
        let dst = self.reg(code_bits(code), 0);
        let seg = Register::None;
        let m = if self.profile != Profile::Native && self.rng.random_bool(0.3) {
            let (base, index) = [
                (Register::BX, Register::SI),
                (Register::BP, Register::DI),
                (Register::SI, Register::None),
                (Register::BX, Register::None),
            ][self.rng.random_range(0..4)];
            MemoryOperand::new(base, index, 1, i64::from(self.rng.random::<i16>()), 2, false, seg)
        } else {
            let base = gpr(32, self.rng.random_range(0..8));
            let index = gpr(32, [0, 1, 2, 3, 5, 6, 7][self.rng.random_range(0..7)]);
            let disp = i64::from(self.value(32) as u32 as i32);
            MemoryOperand::new(base, index, 1 << self.rng.random_range(0..4), disp, 4, false, seg)
        };
        self.emit(build(code, &[Opnd::Reg(dst), Opnd::Mem(m)]), Effect::NONE);
    }

    fn convert(&mut self) {
        let all = [Code::Cbw, Code::Cwde, Code::Cwd, Code::Cdq];
        let code = all[self.rng.random_range(0..4)];
        self.emit(Instruction::with(code), Effect::NONE);
    }

    fn flag_ops(&mut self) {
        let (code, fx) = match self.rng.random_range(0..7) {
            0 => (Code::Clc, Effect::sets(CF, 0)),
            1 => (Code::Stc, Effect::sets(CF, 0)),
            2 => (Code::Cmc, Effect::sets(CF, 0).reading(CF)),
            3 => (Code::Cld, Effect::NONE),
            4 => (Code::Std, Effect::NONE),
            5 => (Code::Sahf, Effect::sets(SF | ZF | AF | PF | CF, 0)),
            _ => (Code::Lahf, Effect::NONE.reading(SF | ZF | AF | PF | CF)),
        };
        match code {
            Code::Cld => self.df = false,
            Code::Std => self.df = true,
            _ => {}
        }
        self.emit(Instruction::with(code), fx);
    }

    /// The EFLAGS image a `popf` loads: random arithmetic flags and DF;
    /// IOPL, NT, AC and ID at random; never TF or IF.
    fn flags_image(&mut self) -> u32 {
        let mut v = (self.rng.random::<u32>() & (ARITH | DF)) | 2;
        v |= self.rng.random::<u32>() & (0x3000 | 0x4000 | 0x4_0000 | 0x20_0000);
        v
    }

    /// The stack operand width of `code` in bytes.
    fn stack_bytes(code: Code) -> u32 {
        code_bits(code) / 8
    }

    /// Moves the stack pointer back into the middle of the stack half if
    /// `down` bytes below it or `up` above it would leave that half.
    fn room(&mut self, down: u32, up: u32) {
        let base = self.stack_base();
        let off = self.sp.wrapping_sub(base);
        if off < STACK.0 + down || off + up > STACK.1 {
            let new = base + self.rng.random_range(0xa000..0xe000);
            let insn =
                if self.profile == Profile::Real { mov_imm(Register::SP, new) } else { mov_imm(Register::ESP, new) };
            self.setup(vec![insn]);
            self.sp = new;
        }
    }

    /// Makes EBP (BP) point into the stack (near the stack pointer) if it
    /// is not known to; returns it.
    fn frame_pointer(&mut self, above: u32) -> u32 {
        if let Some(bp) = self.bp {
            return bp;
        }
        let bp = self.sp.wrapping_add(self.rng.random_range(0..0x40) + above);
        let insn = if self.profile == Profile::Real { mov_imm(Register::BP, bp) } else { mov_imm(Register::EBP, bp) };
        self.setup(vec![insn]);
        self.bp = Some(bp);
        bp
    }

    fn sub_sp(&mut self, n: u32) {
        self.sp = self.sp.wrapping_sub(n);
    }

    fn stack(&mut self) {
        use Code::*;
        let sixteen = self.profile == Profile::Real;
        let pick = |g: &mut Gen, all: &[Code]| all[g.rng.random_range(0..all.len())];
        match self.rng.random_range(0..12) {
            // push r/m, push imm
            0..=2 => {
                let code = pick(
                    self,
                    &[Push_r16, Push_r32, Push_rm16, Push_rm32, Push_imm16, Pushd_imm32, Pushw_imm8, Pushd_imm8],
                );
                self.room(16, 0);
                let (ops, setup) = if matches!(code, Push_rm16 | Push_rm32) && self.rng.random_bool(0.5) {
                    let bits = code_bits(code);
                    let (m, s) = self.mem(bits / 8, 0, DATA.0, DATA.1);
                    (vec![Opnd::Mem(m)], s)
                } else {
                    self.operands(code, 0)
                };
                self.setup(setup);
                self.sub_sp(Self::stack_bytes(code));
                self.emit(build(code, &ops), Effect::NONE);
            }
            // pop r/m
            3 | 4 => {
                let code = pick(self, &[Pop_r16, Pop_r32, Pop_rm16, Pop_rm32]);
                self.room(0, 16);
                let (ops, setup) = self.operands(code, 0);
                self.setup(setup);
                self.sp = self.sp.wrapping_add(Self::stack_bytes(code));
                if ops.iter().any(|o| matches!(o, Opnd::Reg(r) if holder(*r) == 5)) {
                    self.bp = None;
                }
                self.emit(build(code, &ops), Effect::NONE);
                return;
            }
            // pusha / popa
            5 => {
                let (push, pop) = if self.rng.random_bool(0.5) { (Pushaw, Popaw) } else { (Pushad, Popad) };
                let n = 8 * Self::stack_bytes(push);
                self.room(n + 16, n);
                self.emit(Instruction::with(push), Effect::NONE);
                if self.rng.random_bool(0.7) {
                    // Something in between, then popa.
                    self.sub_sp(n);
                    self.alu2();
                    self.sp = self.sp.wrapping_add(n);
                    self.emit(Instruction::with(pop), Effect::NONE);
                    self.bp = None;
                } else {
                    self.sub_sp(n);
                }
                return;
            }
            // pushf / popf
            6 => {
                let code = pick(self, &[Pushfw, Pushfd]);
                self.room(16, 0);
                self.sub_sp(Self::stack_bytes(code));
                self.emit(Instruction::with(code), Effect::NONE.reading(ARITH));
            }
            7 => {
                let (push, pop) = if self.rng.random_bool(0.5) { (Push_imm16, Popfw) } else { (Pushd_imm32, Popfd) };
                self.room(16, 16);
                let image = self.flags_image();
                let imm = if push == Push_imm16 { image & 0xffff } else { image };
                self.emit(build(push, &[Opnd::Imm(imm)]), Effect::NONE);
                self.emit(Instruction::with(pop), Effect::sets(ARITH, 0));
                self.df = image & DF != 0;
            }
            // enter
            8 => {
                // PVM pushes (and sets EBP at) the stack's width whatever
                // the operand size.
                let code = match (self.pvm, sixteen) {
                    (true, true) => Enterw_imm16_imm8,
                    (true, false) => Enterd_imm16_imm8,
                    _ => pick(self, &[Enterw_imm16_imm8, Enterd_imm16_imm8]),
                };
                let w = Self::stack_bytes(code);
                let size = if self.rng.random_bool(0.8) {
                    self.rng.random_range(0..0x40)
                } else {
                    self.rng.random_range(0..0x400)
                };
                let level = if self.pvm {
                    // Levels that mask to 0.
                    32 * self.rng.random_range(0..8)
                } else if self.rng.random_bool(0.9) {
                    self.rng.random_range(0..6)
                } else {
                    self.rng.random_range(0..256)
                };
                let levels = level & 31;
                // Push EBP, copy levels - 1 frame pointers, push the new one.
                let frame = w * (1 + levels) + size;
                self.room(frame + 16, 0);
                if levels > 0 {
                    // The nesting copies read below EBP.
                    self.frame_pointer(w * levels);
                }
                let frame_temp = self.sp.wrapping_sub(w);
                self.sub_sp(frame);
                let insn = build(code, &[Opnd::Imm(size), Opnd::Imm(level)]);
                self.emit(insn, Effect::NONE);
                // EBP is the frame only when the operand size is the stack's.
                let stack_bytes = if sixteen { 2 } else { 4 };
                self.bp = (w == stack_bytes).then_some(frame_temp);
                return;
            }
            // leave
            9 => {
                let code = pick(self, &[Leavew, Leaved]);
                let w = Self::stack_bytes(code);
                let bp = self.frame_pointer(0);
                let off = bp.wrapping_sub(self.stack_base());
                if !(STACK.0..STACK.1 - 8).contains(&off) {
                    self.bp = None;
                    return;
                }
                self.sp = bp.wrapping_add(w);
                self.emit(Instruction::with(code), Effect::NONE);
            }
            // push esp; pop esp (through a pushed value)
            10 => {
                let code = if sixteen { Push_r16 } else { pick(self, &[Push_r16, Push_r32]) };
                self.room(16, 0);
                let r = if code == Push_r16 { Register::SP } else { Register::ESP };
                self.sub_sp(Self::stack_bytes(code));
                self.emit(build(code, &[Opnd::Reg(r)]), Effect::NONE);
            }
            _ => {
                self.room(16, 16);
                let new = self.stack_base() + self.rng.random_range(0xa000..0xe000);
                if sixteen {
                    self.emit(build(Push_imm16, &[Opnd::Imm(new)]), Effect::NONE);
                    self.emit(build(Pop_r16, &[Opnd::Reg(Register::SP)]), Effect::NONE);
                } else {
                    self.emit(build(Pushd_imm32, &[Opnd::Imm(new)]), Effect::NONE);
                    self.emit(build(Pop_r32, &[Opnd::Reg(Register::ESP)]), Effect::NONE);
                }
                self.sp = new;
            }
        }
        self.bp = None;
    }

    fn bcd(&mut self) {
        if self.rng.random_bool(0.5) {
            let v = self.rng.random::<u16>();
            self.setup(vec![mov_imm(Register::AX, u32::from(v))]);
        }
        let pick = if self.pvm { [1, 4, 5][self.rng.random_range(0..3)] } else { self.rng.random_range(0..6) };
        let (code, imm, fx) = match pick {
            0 => (Code::Daa, None, Effect::sets(CF | AF | SF | ZF | PF, OF).reading(CF | AF)),
            1 => (Code::Das, None, Effect::sets(CF | AF | SF | ZF | PF, OF).reading(CF | AF)),
            2 => (Code::Aaa, None, Effect::sets(AF | CF, OF | SF | ZF | PF).reading(AF)),
            3 => (Code::Aas, None, Effect::sets(AF | CF, OF | SF | ZF | PF).reading(AF)),
            4 => (Code::Aam_imm8, Some(self.base()), Effect::sets(SF | ZF | PF, OF | AF | CF)),
            _ => (Code::Aad_imm8, Some(self.base()), Effect::sets(SF | ZF | PF, OF | AF | CF)),
        };
        let insn = match imm {
            Some(i) => build(code, &[Opnd::Imm(i)]),
            None => Instruction::with(code),
        };
        // PVM computes `aam`'s and `aad`'s SF (and so perhaps ZF and PF)
        // from more than AL: compare only their result there.
        let fx = if self.pvm && imm.is_some() { Effect::sets(0, ARITH) } else { fx };
        self.emit(insn, fx);
    }

    /// The base of `aam`/`aad`: usually 10, never 0.
    fn base(&mut self) -> u32 {
        if self.rng.random_bool(0.6) {
            10
        } else {
            self.rng.random_range(1..256)
        }
    }

    fn string(&mut self) {
        let width = [1u32, 2, 4][self.rng.random_range(0..3)];
        let kind = self.rng.random_range(0..5);
        let compare = kind >= 3;
        let rep = match self.rng.random_range(0..10) {
            0..=2 => RepPrefixKind::None,
            3..=6 => RepPrefixKind::Repe,
            _ if compare => RepPrefixKind::Repne,
            _ => RepPrefixKind::Repe,
        };
        let addr32 = self.profile != Profile::Real || self.rng.random_bool(0.15);
        let count = if rep == RepPrefixKind::None {
            1
        } else {
            match self.rng.random_range(0..10) {
                0 | 1 => 0,
                2..=8 => self.rng.random_range(1..17),
                _ => self.rng.random_range(17..65),
            }
        };
        let span = count.max(1) * width;
        let mut start = || {
            let lo = DATA.0 + if self.df { span } else { 0 };
            let hi = DATA.1 - if self.df { 0 } else { span };
            let mut s = self.rng.random_range(lo..hi);
            if width > 1 && self.profile == Profile::Real && !addr32 {
                s &= !(width - 1);
            }
            s
        };
        let (src, dst) = (start(), start());
        let base = if self.profile == Profile::Real { 0 } else { WINDOW as u32 };
        let bits = if addr32 { 32 } else { 16 };
        let mut setup = vec![mov_imm(gpr(bits, 6), base + src), mov_imm(gpr(bits, 7), base + dst)];
        if rep != RepPrefixKind::None {
            setup.push(mov_imm(gpr(bits, 1), count));
        }
        self.setup(setup);
        let seg = self.segment_override();
        let size = if addr32 { 32 } else { 16 };
        let r = match (kind, width) {
            (0, 1) => Instruction::with_movsb(size, seg, rep),
            (0, 2) => Instruction::with_movsw(size, seg, rep),
            (0, _) => Instruction::with_movsd(size, seg, rep),
            (1, 1) => Instruction::with_stosb(size, rep),
            (1, 2) => Instruction::with_stosw(size, rep),
            (1, _) => Instruction::with_stosd(size, rep),
            (2, 1) => Instruction::with_lodsb(size, seg, rep),
            (2, 2) => Instruction::with_lodsw(size, seg, rep),
            (2, _) => Instruction::with_lodsd(size, seg, rep),
            (3, 1) => Instruction::with_cmpsb(size, seg, rep),
            (3, 2) => Instruction::with_cmpsw(size, seg, rep),
            (3, _) => Instruction::with_cmpsd(size, seg, rep),
            (_, 1) => Instruction::with_scasb(size, rep),
            (_, 2) => Instruction::with_scasw(size, rep),
            (_, _) => Instruction::with_scasd(size, rep),
        };
        let fx = if compare && count > 0 { Effect::sets(ARITH, 0) } else { Effect::NONE };
        self.emit(r.expect("a string instruction"), fx);
    }

    fn xlat(&mut self) {
        let bits = if self.profile == Profile::Real && self.rng.random_bool(0.8) { 16 } else { 32 };
        let base = if self.profile == Profile::Real { 0 } else { WINDOW as u32 };
        let target = base + self.rng.random_range(DATA.0..DATA.1 - 0x100);
        self.setup(vec![mov_imm(gpr(bits, 3), target)]);
        let m = MemoryOperand::new(gpr(bits, 3), Register::AL, 1, 0, 0, false, self.segment_override());
        self.emit(build(Code::Xlat_m8, &[Opnd::Mem(m)]), Effect::NONE);
    }

    /// An instruction that raises an exception, to end a ring-0 or
    /// real-mode case with its delivery.
    fn fault(&mut self) {
        self.room(32, 0);
        let choices: &[u32] = match (self.pvm, self.profile) {
            // QEMU 7.2 computes `idiv`'s 0x8000_0000 / -1 in C: the process
            // dies of SIGFPE; and it pushes no RF for a fault in protected
            // mode (the CPU does): only traps there.
            (false, Profile::Real) if self.qemu => &[0, 2, 3, 4, 5],
            (false, _) if self.qemu => &[3, 4, 5],
            (false, _) => &[0, 1, 2, 3, 4, 5],
            (true, Profile::Real) => &[0, 1, 3, 4, 5],
            (true, _) => &[0, 1, 2],
        };
        let choice = choices[self.rng.random_range(0..choices.len())];
        if self.pvm && self.profile == Profile::Real && choice < 2 {
            // PVM clears ESP[31:16] when it delivers an exception it raised
            // in real mode (not for `int n`); SP is what the CPU uses.
            let and = build(Code::And_rm32_imm32, &[Opnd::Reg(Register::ESP), Opnd::Imm(0xffff)]);
            self.emit(and, Effect::sets(ARITH & !AF, AF));
        }
        // The frame saves FLAGS: in strict mode they are all defined.
        let fx = Effect::NONE.reading(ARITH);
        match choice {
            0 => {
                let r = self.reg(32, 1 << 0 | 1 << 2);
                self.setup(vec![mov_imm(r, 0)]);
                self.emit(build(Code::Div_rm32, &[Opnd::Reg(r)]), fx);
            }
            1 => {
                let r = self.reg(16, 1 << 0 | 1 << 2);
                self.setup(vec![mov_imm(Register::DX, 0x8000), mov_imm(Register::AX, 0), mov_imm(r, 0xffff)]);
                self.emit(build(Code::Idiv_rm16, &[Opnd::Reg(r)]), fx);
            }
            2 => self.emit(Instruction::with(Code::Ud2), fx),
            3 => self.emit(Instruction::with(Code::Int3), fx),
            4 => {
                self.emit(build(Code::Pushd_imm32, &[Opnd::Imm(0x802)]), Effect::NONE);
                self.emit(Instruction::with(Code::Popfd), Effect::sets(ARITH, 0));
                self.emit(Instruction::with(Code::Into), fx);
            }
            _ => {
                let vector = [1u32, 5, 6, 7, 9, 16, 17, 18, 19, 31][self.rng.random_range(0..10)];
                self.emit(build(Code::Int_imm8, &[Opnd::Imm(vector)]), fx);
            }
        }
    }

    /// One item, chosen by weight among those the profile allows.
    fn item(&mut self) {
        let native = self.profile == Profile::Native;
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=15 => self.alu2(),
            16..=21 => self.alu1(),
            22..=33 => self.shift(),
            34..=37 => self.double_shift(),
            38..=42 => self.multiply(),
            43..=47 => self.divide(),
            48..=52 => self.bit_test(),
            53..=55 => self.bit_scan(),
            56..=61 => self.condition(),
            62..=66 => self.exchange(),
            67..=71 => self.moves(),
            72..=73 => self.convert(),
            74..=77 => self.flag_ops(),
            78..=84 => self.string(),
            85 => self.xlat(),
            86..=89 if !native => self.bcd(),
            90..=99 if !native => self.stack(),
            _ => self.alu2(),
        }
        if !matches!(roll, 90..=99) || native {
            // EBP may have been written.
            self.bp = None;
        }
    }
}

/// The little-endian bytes of `words`.
fn le_bytes(words: &[u64]) -> Vec<u8> {
    let mut out = vec![0u8; words.len() * 8];
    for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Generates case `seed` of `profile`.
pub fn generate(profile: Profile, seed: u64, options: Options) -> Generated {
    let salt = match profile {
        Profile::Native => 0x6e61_7469_7665,
        Profile::Prot32 => 0x7072_6f74_3332,
        Profile::Real => 0x7265_616c,
    };
    let mut rng = StdRng::seed_from_u64(seed ^ salt);
    // A xorshift fills the window (StdRng is slow for 64 KiB in a debug
    // build), a word at a time.
    let mut x = rng.next_u64() | 1;
    let mut words = vec![0u64; WINDOW_SIZE / 8];
    for w in words.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    let window: Vec<u8> = le_bytes(&words);
    let Options { strict, pvm, qemu } = options;
    let mut g = Gen {
        rng,
        profile,
        strict,
        pvm,
        qemu,
        insns: Vec::new(),
        undefined_after: Vec::new(),
        undefined: 0,
        df: false,
        sp: 0,
        bp: None,
    };
    let mut gpr = [0u32; 8];
    for v in &mut gpr {
        *v = g.value(32) as u32;
    }
    let mut eflags = (g.rng.random::<u32>() & (ARITH | DF)) | 2;
    match profile {
        Profile::Native => eflags |= IF,
        Profile::Prot32 => {
            g.sp = WINDOW as u32 + g.rng.random_range(0xa000..0xe000);
            gpr[4] = g.sp;
            eflags |= g.rng.random::<u32>() & (0x3000 | 0x4000 | 0x4_0000 | 0x20_0000);
        }
        Profile::Real => {
            g.sp = g.rng.random_range(0xa000..0xe000);
            gpr[4] = (gpr[4] & 0xffff_0000) | g.sp;
            eflags |= g.rng.random::<u32>() & (0x3000 | 0x4000 | 0x4_0000 | 0x20_0000);
        }
    }
    g.df = eflags & DF != 0;
    let items = g.rng.random_range(4..=24);
    for _ in 0..items {
        g.item();
    }
    let faults = profile != Profile::Native && g.rng.random_bool(0.03);
    if faults {
        g.fault();
    }
    let eip = if profile == Profile::Real { 0 } else { super::layout::CODE as u32 };
    Generated {
        insns: g.insns,
        undefined_after: g.undefined_after,
        start: State { gpr, eip, eflags },
        window,
        undefined: g.undefined,
        faults,
    }
}

/// The instructions that end every case: `out 0xe0, al; hlt`.
pub fn terminator() -> [Instruction; 2] {
    [build(Code::Out_imm8_AL, &[Opnd::Imm(0xe0), Opnd::Reg(Register::AL)]), Instruction::with(Code::Hlt)]
}
