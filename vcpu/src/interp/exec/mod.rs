//! Instruction semantics. The decoder turns each instruction into an
//! [`Op`]: iced-x86's decoded [`Instruction`], the handler chosen for it
//! once ([`handler_for`]), and the operand facts every execution needs
//! (operand size, segment, address size). A handler runs the instruction
//! against the [`Core`] and either retires it (the run loop then moves EIP
//! to `core.next_eip`) or returns an [`Event`](super::event::Event).
//!
//! One file per family: [`alu`] (arithmetic, logic, moves, bit
//! operations), [`shift`], [`muldiv`], [`string`], [`stack`], [`branch`]
//! (near and far control transfer, `int`/`iret`), [`system`] (control
//! registers, descriptor tables, I/O, `cpuid`, MSRs, `hlt`).

pub(crate) mod alu;
pub(crate) mod bcd;
pub(crate) mod branch;
pub(crate) mod muldiv;
pub(crate) mod shift;
pub(crate) mod stack;
pub(crate) mod string;
pub(crate) mod system;

use super::core::Core;
use super::event::{ud, Event, Step};
use super::state::{cr0, flag};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

/// What executes one decoded instruction.
pub(crate) type Handler = fn(&mut Core, &Op) -> Step;

/// One pre-decoded instruction.
#[derive(Clone)]
pub(crate) struct Op {
    /// The instruction as iced-x86 decoded it (IP = its EIP).
    pub(crate) ins: Instruction,
    /// Its semantics.
    pub(crate) exec: Handler,
    /// Operand size in bytes (1, 2, 4; 8 for `cmpxchg8b`).
    pub(crate) size: u8,
    /// The second operand's size (a register's or the memory operand's).
    pub(crate) size2: u8,
    /// The condition nibble of `jcc`/`setcc`/`cmovcc`.
    pub(crate) cc: u8,
    /// The memory operand's segment register index.
    pub(crate) seg: u8,
    /// The memory operand uses 16-bit addressing.
    pub(crate) addr16: bool,
    /// The block must end after this instruction (it branches, or changes
    /// something the decoder or the interrupt check depends on).
    pub(crate) ends_block: bool,
    /// It may write memory (the run loop then checks for code writes).
    pub(crate) writes_memory: bool,
    /// EIP after it, wrapped to its code size (16-bit code wraps at 64 KiB).
    pub(crate) next: u32,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.ins.code())
    }
}

/// A GPR by iced-x86 register (8-, 16- and 32-bit views).
#[inline(always)]
pub(crate) fn get_reg(c: &Core, r: Register) -> u32 {
    let n = r as usize;
    match n {
        37..=44 => c.s.gpr[n - 37],
        21..=28 => c.s.gpr[n - 21] & 0xffff,
        1..=4 => c.s.gpr[n - 1] & 0xff,
        5..=8 => (c.s.gpr[n - 5] >> 8) & 0xff,
        71..=76 => u32::from(c.s.seg[n - 71].selector),
        _ => 0,
    }
}

/// Writes a GPR view, keeping the bits outside it.
#[inline(always)]
pub(crate) fn set_reg(c: &mut Core, r: Register, v: u32) {
    let n = r as usize;
    match n {
        37..=44 => c.s.gpr[n - 37] = v,
        21..=28 => c.s.gpr[n - 21] = (c.s.gpr[n - 21] & 0xffff_0000) | (v & 0xffff),
        1..=4 => c.s.gpr[n - 1] = (c.s.gpr[n - 1] & !0xff) | (v & 0xff),
        5..=8 => c.s.gpr[n - 5] = (c.s.gpr[n - 5] & !0xff00) | ((v & 0xff) << 8),
        _ => {}
    }
}

/// GPR `r` at the address size: its low 16 bits with a 16-bit address
/// size ([`Op::addr16`]; SI, DI and CX of string instructions, CX of
/// `loop`/`jcxz`).
#[inline]
pub(crate) fn addr_reg(c: &Core, op: &Op, r: usize) -> u32 {
    if op.addr16 {
        c.s.gpr[r] & 0xffff
    } else {
        c.s.gpr[r]
    }
}

/// Writes GPR `r` at the address size (keeping the upper half with a
/// 16-bit address size).
#[inline]
pub(crate) fn set_addr_reg(c: &mut Core, op: &Op, r: usize, v: u32) {
    if op.addr16 {
        c.s.gpr[r] = (c.s.gpr[r] & 0xffff_0000) | (v & 0xffff);
    } else {
        c.s.gpr[r] = v;
    }
}

/// `#GP(0)` in virtual-8086 mode with IOPL below 3 (`pushf`, `popf`,
/// `cli`, `sti` and `int n` are IOPL-sensitive there).
#[inline]
pub(crate) fn vm86_iopl_check(c: &Core) -> Step {
    if c.s.flags.base() & flag::VM != 0 && c.s.iopl() < 3 {
        return Err(super::event::gp(0));
    }
    Ok(())
}

/// The size in bytes of a GPR view.
pub(crate) fn reg_size(r: Register) -> u8 {
    match r as usize {
        37..=44 => 4,
        21..=28 => 2,
        1..=8 => 1,
        71..=76 => 2,
        _ => 4,
    }
}

/// The mask of an operand size.
#[inline(always)]
pub(crate) fn mask(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

/// The effective address (offset in the segment) of the memory operand.
#[inline(always)]
pub(crate) fn ea(c: &Core, op: &Op) -> u32 {
    let ins = &op.ins;
    let mut a = ins.memory_displacement32();
    let b = ins.memory_base();
    if b != Register::None {
        a = a.wrapping_add(get_reg(c, b));
    }
    let i = ins.memory_index();
    if i != Register::None {
        a = a.wrapping_add(get_reg(c, i).wrapping_mul(ins.memory_index_scale()));
    }
    if op.addr16 {
        a & 0xffff
    } else {
        a
    }
}

/// Reads operand `i` at the instruction's operand size.
#[inline(always)]
pub(crate) fn read_op(c: &mut Core, op: &Op, i: u32) -> Step<u32> {
    read_op_sized(c, op, i, op.size)
}

/// Reads operand `i` as `size` bytes (memory) or at its own size.
#[inline(always)]
pub(crate) fn read_op_sized(c: &mut Core, op: &Op, i: u32, size: u8) -> Step<u32> {
    match op.ins.op_kind(i) {
        OpKind::Register => Ok(get_reg(c, op.ins.op_register(i))),
        OpKind::Memory => {
            let off = ea(c, op);
            Ok(c.read_seg(op.seg as usize, off, size as usize)? as u32)
        }
        _ => Ok(op.ins.immediate(i) as u32 & mask(size)),
    }
}

/// Where a read-modify-write's operand 0 is: a register, or a memory
/// destination at this linear address, already checked for writing.
#[derive(Clone, Copy)]
pub(crate) enum Dst {
    Reg,
    Mem(u32),
}

/// Reads operand 0 of a read-modify-write: a memory destination is
/// checked for writing (segment, then page) before it is read, as the CPU
/// translates it for writing first — a `#PF` reports W even when the page
/// is not present, and nothing is read from a page that cannot be written.
/// Returns the value and where [`write_dst`] puts the result.
#[inline(always)]
pub(crate) fn read_dst(c: &mut Core, op: &Op) -> Step<(u32, Dst)> {
    if !dst_is_mem(op) {
        return Ok((read_op(c, op, 0)?, Dst::Reg));
    }
    let la = mem_la(c, op, u32::from(op.size), true)?;
    c.probe_write(la, op.size as usize)?;
    Ok((c.read_lin(la, op.size as usize)? as u32, Dst::Mem(la)))
}

/// Writes the result of a read-modify-write where [`read_dst`] read it
/// from (a memory destination's segment check is not repeated).
#[inline(always)]
pub(crate) fn write_dst(c: &mut Core, op: &Op, dst: Dst, v: u32) -> Step {
    match dst {
        Dst::Reg => {
            set_reg(c, op.ins.op0_register(), v);
            Ok(())
        }
        Dst::Mem(la) => c.write_lin(la, u64::from(v), op.size as usize),
    }
}

/// Writes operand `i` (a register or the memory operand).
#[inline(always)]
pub(crate) fn write_op(c: &mut Core, op: &Op, i: u32, v: u32) -> Step {
    match op.ins.op_kind(i) {
        OpKind::Register => {
            set_reg(c, op.ins.op_register(i), v);
            Ok(())
        }
        _ => {
            let off = ea(c, op);
            c.write_seg(op.seg as usize, off, u64::from(v), op.size as usize)
        }
    }
}

/// The linear address of the memory operand, checked for an access of
/// `size` bytes.
#[inline]
pub(crate) fn mem_la(c: &Core, op: &Op, size: u32, write: bool) -> Step<u32> {
    let off = ea(c, op);
    c.seg_addr(op.seg as usize, off, size, write)
}

/// Whether operand 0 is memory.
#[inline(always)]
pub(crate) fn dst_is_mem(op: &Op) -> bool {
    op.ins.op0_kind() == OpKind::Memory
}

/// An instruction the interpreter does not implement: `#UD` for the
/// guest, and a warning for the host (once per instruction kind).
pub(crate) fn unimplemented(c: &mut Core, op: &Op) -> Step {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let code = op.ins.code();
    let first = SEEN.lock().map(|mut g| g.get_or_insert_with(HashSet::new).insert(code as u16)).unwrap_or(false);
    if first {
        tracing::warn!(
            cpu = c.index,
            eip = format_args!("{:#x}", c.s.eip),
            instruction = ?code,
            "the interpreter does not implement this instruction: #UD for the guest"
        );
    }
    Err(ud())
}

/// An instruction that ends beyond CS's limit: `#GP(0)`.
pub(crate) fn limit_fault(_c: &mut Core, _op: &Op) -> Step {
    Err(super::event::gp(0))
}

/// `#UD` without a warning (invalid encodings, `ud2`, `lock` misuse).
pub(crate) fn invalid(_c: &mut Core, _op: &Op) -> Step {
    Err(ud())
}

/// x87 and SSE: `#NM` when CR0.EM or CR0.TS says to trap (x87), else
/// `#UD` (this CPU has no FPU or SSE).
pub(crate) fn no_fpu(c: &mut Core, op: &Op) -> Step {
    let x87 = is_x87(&op.ins);
    if x87 && c.s.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(Event::exception(super::event::vector::NM, None));
    }
    Err(ud())
}

/// Instructions that may be `lock`-prefixed (with a memory destination).
fn lockable(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Add | Adc
            | And
            | Btc
            | Btr
            | Bts
            | Cmpxchg
            | Cmpxchg8b
            | Dec
            | Inc
            | Neg
            | Not
            | Or
            | Sbb
            | Sub
            | Xor
            | Xadd
            | Xchg
    )
}

/// The size in bytes of operand `i` when it is a register or memory (0
/// otherwise).
fn operand_size(ins: &Instruction, i: u32) -> u8 {
    match ins.op_kind(i) {
        OpKind::Register => reg_size(ins.op_register(i)),
        OpKind::Immediate8 => 1,
        OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
        OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
        OpKind::Memory
        | OpKind::MemorySegSI
        | OpKind::MemorySegESI
        | OpKind::MemorySegDI
        | OpKind::MemorySegEDI
        | OpKind::MemoryESDI
        | OpKind::MemoryESEDI => ins.memory_size().size().min(8) as u8,
        _ => 0,
    }
}

/// Builds the [`Op`] for a decoded instruction.
pub(crate) fn prepare(ins: Instruction) -> Op {
    let mut size = if ins.op_count() > 0 { operand_size(&ins, 0) } else { 0 };
    if size == 0 {
        size = ins.memory_size().size().min(8) as u8;
    }
    if size == 0 {
        size = 4;
    }
    let size2 = if ins.op_count() > 1 { operand_size(&ins, 1) } else { 0 };
    let mut seg = 3u8;
    let mut addr16 = false;
    let mut writes_memory = false;
    for i in 0..ins.op_count() {
        if ins.op_kind(i) == OpKind::Memory {
            seg = (ins.memory_segment() as usize).saturating_sub(71).min(5) as u8;
            let base = ins.memory_base();
            let index = ins.memory_index();
            addr16 = (base != Register::None && reg_size(base) == 2)
                || (index != Register::None && reg_size(index) == 2)
                || (base == Register::None && index == Register::None && ins.memory_displ_size() == 2);
            writes_memory = true;
        }
    }
    if ins.is_string_instruction() {
        size = ins.memory_size().size().clamp(1, 4) as u8;
        seg = (ins.memory_segment() as usize).saturating_sub(71).min(5) as u8;
        addr16 = (0..ins.op_count())
            .any(|i| matches!(ins.op_kind(i), OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI));
    }
    {
        use iced_x86::Code::*;
        if matches!(
            ins.code(),
            Loop_rel8_16_CX
                | Loop_rel8_32_CX
                | Loope_rel8_16_CX
                | Loope_rel8_32_CX
                | Loopne_rel8_16_CX
                | Loopne_rel8_32_CX
                | Jcxz_rel8_16
                | Jcxz_rel8_32
        ) {
            // `loop`/`jcxz` count in CX with a 16-bit address size.
            addr16 = true;
        }
    }
    let (exec, ends_block) = handler_for(&ins);
    let exec = if ins.has_lock_prefix() && (!lockable(ins.mnemonic()) || ins.op0_kind() != OpKind::Memory) {
        invalid as Handler
    } else {
        exec
    };
    let m = ins.mnemonic();
    let stack_or_string = ins.is_stack_instruction() || ins.is_string_instruction();
    let cc = condition_code(&ins);
    let next = match ins.code_size() {
        iced_x86::CodeSize::Code16 => ins.next_ip32() & 0xffff,
        _ => ins.next_ip32(),
    };
    Op {
        next,
        ins,
        exec,
        size,
        size2,
        cc,
        seg,
        addr16,
        ends_block,
        writes_memory: writes_memory || stack_or_string || m == Mnemonic::Int,
    }
}

/// The handler for an instruction, and whether its block must end after it.
fn handler_for(ins: &Instruction) -> (Handler, bool) {
    use Mnemonic::*;
    let m = ins.mnemonic();
    let end = |h: Handler| (h, true);
    let go = |h: Handler| (h, false);
    if ins.is_invalid() {
        return end(invalid);
    }
    match m {
        Add => go(alu::add),
        Or => go(alu::or),
        Adc => go(alu::adc),
        Sbb => go(alu::sbb),
        And => go(alu::and),
        Sub => go(alu::sub),
        Xor => go(alu::xor),
        Cmp => go(alu::cmp),
        Test => go(alu::test),
        Inc if ins.op0_kind() == OpKind::Register && reg_size(ins.op0_register()) == 4 => go(alu::inc_r32),
        Dec if ins.op0_kind() == OpKind::Register && reg_size(ins.op0_register()) == 4 => go(alu::dec_r32),
        Inc => go(alu::inc),
        Dec => go(alu::dec),
        Neg => go(alu::neg),
        Not => go(alu::not),
        Mov if ins.op0_kind() == OpKind::Register && (ins.op0_register() as usize) >= 185 => {
            end(system::mov_to_control)
        }
        Mov if ins.op1_kind() == OpKind::Register && (ins.op1_register() as usize) >= 185 => {
            go(system::mov_from_control)
        }
        Mov if ins.op0_kind() == OpKind::Register && ins.op0_register().is_segment_register() => {
            (stack::mov_to_sreg, ins.op0_register() == Register::SS || ins.op0_register() == Register::CS)
        }
        Mov if ins.op0_kind() == OpKind::Register
            && reg_size(ins.op0_register()) == 4
            && ins.op1_kind() == OpKind::Memory =>
        {
            go(alu::mov_r32_m32)
        }
        Mov if ins.op0_kind() == OpKind::Memory
            && ins.op1_kind() == OpKind::Register
            && reg_size(ins.op1_register()) == 4
            && (ins.op1_register() as usize) < 71 =>
        {
            go(alu::mov_m32_r32)
        }
        Mov => go(alu::mov),
        Movzx => go(alu::movzx),
        Movsx => go(alu::movsx),
        Lea => go(alu::lea),
        Xchg => go(alu::xchg),
        Xadd => go(alu::xadd),
        Cmpxchg => go(alu::cmpxchg),
        Cmpxchg8b => go(alu::cmpxchg8b),
        Bswap => go(alu::bswap),
        Cbw | Cwde => go(alu::cbw),
        Cwd | Cdq => go(alu::cwd),
        Seta | Setae | Setb | Setbe | Sete | Setg | Setge | Setl | Setle | Setne | Setno | Setnp | Setns | Seto
        | Setp | Sets => go(alu::setcc),
        Cmova | Cmovae | Cmovb | Cmovbe | Cmove | Cmovg | Cmovge | Cmovl | Cmovle | Cmovne | Cmovno | Cmovnp
        | Cmovns | Cmovo | Cmovp | Cmovs => go(alu::cmovcc),
        Bt => go(alu::bt),
        Bts => go(alu::bts),
        Btr => go(alu::btr),
        Btc => go(alu::btc),
        Bsf => go(alu::bsf),
        Bsr => go(alu::bsr),
        Sahf => go(alu::sahf),
        Lahf => go(alu::lahf),
        Clc => go(alu::clc),
        Stc => go(alu::stc),
        Cmc => go(alu::cmc),
        Cld => go(alu::cld),
        Std => go(alu::std),
        Xlatb => go(alu::xlat),
        Salc => go(alu::salc),
        Nop | Pause | Wbinvd | Invd | Prefetchnta | Prefetcht0 | Prefetcht1 | Prefetcht2 | Prefetchw => go(alu::nop),
        Lfence | Mfence | Sfence | Clflush => go(alu::nop),
        Daa => go(bcd::daa),
        Das => go(bcd::das),
        Aaa => go(bcd::aaa),
        Aas => go(bcd::aas),
        Aam => go(bcd::aam),
        Aad => go(bcd::aad),
        Bound => go(bcd::bound),

        Shl | Sal => go(shift::shl),
        Shr => go(shift::shr),
        Sar => go(shift::sar),
        Rol => go(shift::rol),
        Ror => go(shift::ror),
        Rcl => go(shift::rcl),
        Rcr => go(shift::rcr),
        Shld => go(shift::shld),
        Shrd => go(shift::shrd),

        Mul => go(muldiv::mul),
        Imul => go(muldiv::imul),
        Div => go(muldiv::div),
        Idiv => go(muldiv::idiv),

        Movsb | Movsw | Movsd if ins.op_count() == 2 && ins.op0_kind() != OpKind::Register => {
            (string::movs, ins.has_rep_prefix())
        }
        Stosb | Stosw | Stosd => (string::stos, ins.has_rep_prefix()),
        Lodsb | Lodsw | Lodsd => (string::lods, ins.has_rep_prefix()),
        Cmpsb | Cmpsw | Cmpsd if ins.op0_kind() != OpKind::Register => {
            (string::cmps, ins.has_repe_prefix() || ins.has_repne_prefix())
        }
        Scasb | Scasw | Scasd => (string::scas, ins.has_repe_prefix() || ins.has_repne_prefix()),
        Insb | Insw | Insd => end(string::ins),
        Outsb | Outsw | Outsd => end(string::outs),

        Push if ins.op0_kind() == OpKind::Register && ins.op0_register().is_segment_register() => go(stack::push_sreg),
        Pop if ins.op0_kind() == OpKind::Register && ins.op0_register().is_segment_register() => {
            (stack::pop_sreg, ins.op0_register() == Register::SS)
        }
        Push => go(stack::push),
        Pop => go(stack::pop),
        Pusha | Pushad => go(stack::pusha),
        Popa | Popad => go(stack::popa),
        Pushf | Pushfd => go(stack::pushf),
        Popf | Popfd => end(stack::popf),
        Enter => go(stack::enter),
        Leave => go(stack::leave),
        Lds | Les | Lfs | Lgs | Lss => (stack::load_far_pointer, m == Lss),

        Jmp => end(branch::jmp),
        Ja | Jae | Jb | Jbe | Je | Jg | Jge | Jl | Jle | Jne | Jno | Jnp | Jns | Jo | Jp | Js => end(branch::jcc),
        Jcxz | Jecxz => end(branch::jcxz),
        Loop => end(branch::loop_),
        Loope => end(branch::loope),
        Loopne => end(branch::loopne),
        Call => end(branch::call),
        Ret => end(branch::ret),
        Retf => end(branch::retf),
        Int => end(branch::int),
        Int3 => end(branch::int3),
        Into => end(branch::into),
        Int1 => end(branch::int1),
        Iret | Iretd => end(branch::iret),

        Hlt => end(system::hlt),
        Cli => end(system::cli),
        Sti => end(system::sti),
        In => go(system::in_),
        Out => go(system::out),
        Cpuid => go(system::cpuid),
        Rdtsc => go(system::rdtsc),
        Rdmsr => go(system::rdmsr),
        Wrmsr => end(system::wrmsr),
        Lgdt => go(system::lgdt),
        Lidt => go(system::lidt),
        Sgdt => go(system::sgdt),
        Sidt => go(system::sidt),
        Lldt => go(system::lldt),
        Sldt => go(system::sldt),
        Ltr => go(system::ltr),
        Str => go(system::str_),
        Lmsw => end(system::lmsw),
        Smsw => go(system::smsw),
        Clts => go(system::clts),
        Invlpg => end(system::invlpg),
        Lar => go(system::lar),
        Lsl => go(system::lsl),
        Verr => go(system::verr),
        Verw => go(system::verw),
        Arpl => go(system::arpl),
        Ud0 | Ud1 | Ud2 => end(invalid),
        Rsm | Sysenter | Sysexit | Syscall | Sysret => end(invalid),
        _ => {
            if m == Wait {
                return go(system::fwait);
            }
            if is_x87(ins) {
                return end(no_fpu);
            }
            let encoding = ins.encoding();
            if encoding != iced_x86::EncodingKind::Legacy || is_sse(ins) {
                return end(no_fpu);
            }
            end(unimplemented)
        }
    }
}

/// Whether an instruction is an x87 escape (opcodes `d8`–`df`). iced-x86
/// gives the register forms with a fixed second byte a two-byte opcode
/// (`fld1` is `d9e8`): the escape is the first byte.
fn is_x87(ins: &Instruction) -> bool {
    let oc = ins.code().op_code();
    let first = oc.op_code() >> (8 * (oc.op_code_len().max(1) - 1));
    oc.table() == iced_x86::OpCodeTableKind::Normal && matches!(first, 0xd8..=0xdf)
}

/// Whether an instruction uses XMM/MMX registers (SSE, MMX).
fn is_sse(ins: &Instruction) -> bool {
    (0..ins.op_count())
        .any(|i| ins.op_kind(i) == OpKind::Register && (ins.op_register(i).is_xmm() || ins.op_register(i).is_mm()))
}

/// The `jcc`/`setcc`/`cmovcc` condition nibble of an instruction.
pub(crate) fn condition_code(ins: &Instruction) -> u8 {
    use iced_x86::ConditionCode as C;
    match ins.condition_code() {
        C::o => 0,
        C::no => 1,
        C::b => 2,
        C::ae => 3,
        C::e => 4,
        C::ne => 5,
        C::be => 6,
        C::a => 7,
        C::s => 8,
        C::ns => 9,
        C::p => 10,
        C::np => 11,
        C::l => 12,
        C::ge => 13,
        C::le => 14,
        C::g => 15,
        C::None => 0,
    }
}

/// The operand width in bits of an [`Op`].
#[inline(always)]
pub(crate) fn bits(op: &Op) -> u8 {
    op.size * 8
}
