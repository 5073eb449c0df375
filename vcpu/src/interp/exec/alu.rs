//! Arithmetic, logic, moves, conversions, bit operations and the flag
//! instructions.

use super::{
    bits, dst_is_mem, ea, get_reg, mask, mem_la, read_dst, read_op, read_op_sized, set_reg, write_dst, write_op, Op,
};
use crate::interp::core::Core;
use crate::interp::event::Step;
use crate::interp::flags::{parity, FlagOp};
use crate::interp::state::flag;
use iced_x86::{Code, OpKind};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Alu {
    Add,
    Or,
    Adc,
    Sbb,
    And,
    Sub,
    Xor,
    Cmp,
    Test,
}

#[inline(always)]
fn compute(k: Alu, d: u32, s: u32, cin: u32, m: u32) -> u32 {
    (match k {
        Alu::Add => d.wrapping_add(s),
        Alu::Adc => d.wrapping_add(s).wrapping_add(cin),
        Alu::Sub | Alu::Cmp => d.wrapping_sub(s),
        Alu::Sbb => d.wrapping_sub(s).wrapping_sub(cin),
        Alu::And | Alu::Test => d & s,
        Alu::Or => d | s,
        Alu::Xor => d ^ s,
    }) & m
}

#[inline(always)]
fn alu(c: &mut Core, op: &Op, k: Alu) -> Step {
    let m = mask(op.size);
    let src = read_op(c, op, 1)? & m;
    let cin = u32::from(matches!(k, Alu::Adc | Alu::Sbb) && c.s.flags.cf());
    let (dst, res) = if matches!(k, Alu::Cmp | Alu::Test) {
        let d = read_op(c, op, 0)?;
        (d, compute(k, d, src, cin, m))
    } else {
        modify(c, op, |d| compute(k, d, src, cin, m))?
    };
    let fop = match k {
        Alu::Add => FlagOp::Add,
        Alu::Adc if cin != 0 => FlagOp::Adc,
        Alu::Adc => FlagOp::Add,
        Alu::Sub | Alu::Cmp => FlagOp::Sub,
        Alu::Sbb if cin != 0 => FlagOp::Sbb,
        Alu::Sbb => FlagOp::Sub,
        _ => FlagOp::Logic,
    };
    c.s.flags.record(fop, bits(op), dst, src, res);
    Ok(())
}

pub(crate) fn add(c: &mut Core, op: &Op) -> Step {
    alu(c, op, Alu::Add)
}
pub(crate) fn or(c: &mut Core, op: &Op) -> Step {
    alu(c, op, Alu::Or)
}
pub(crate) fn adc(c: &mut Core, op: &Op) -> Step {
    alu(c, op, Alu::Adc)
}
pub(crate) fn sbb(c: &mut Core, op: &Op) -> Step {
    alu(c, op, Alu::Sbb)
}
pub(crate) fn and(c: &mut Core, op: &Op) -> Step {
    alu(c, op, Alu::And)
}
pub(crate) fn sub(c: &mut Core, op: &Op) -> Step {
    alu(c, op, Alu::Sub)
}
pub(crate) fn xor(c: &mut Core, op: &Op) -> Step {
    alu(c, op, Alu::Xor)
}
pub(crate) fn cmp(c: &mut Core, op: &Op) -> Step {
    alu(c, op, Alu::Cmp)
}
pub(crate) fn test(c: &mut Core, op: &Op) -> Step {
    alu(c, op, Alu::Test)
}

/// A read-modify-write of operand 0 through `f` (atomic with `lock`);
/// returns the old value and the new one.
#[inline(always)]
fn modify(c: &mut Core, op: &Op, f: impl Fn(u32) -> u32) -> Step<(u32, u32)> {
    let m = mask(op.size);
    if op.ins.has_lock_prefix() {
        let la = mem_la(c, op, u32::from(op.size), true)?;
        let d = c.atomic_lin(la, op.size as usize, |d| u64::from(f(d as u32) & m))? as u32;
        Ok((d, f(d) & m))
    } else {
        let (d, dst) = read_dst(c, op)?;
        let res = f(d) & m;
        write_dst(c, op, dst, res)?;
        Ok((d, res))
    }
}

pub(crate) fn inc_r32(c: &mut Core, op: &Op) -> Step {
    let r = op.ins.op0_register() as usize - iced_x86::Register::EAX as usize;
    let d = c.s.gpr[r];
    let res = d.wrapping_add(1);
    c.s.gpr[r] = res;
    c.s.flags.record(FlagOp::Inc, 32, d, 1, res);
    Ok(())
}

pub(crate) fn dec_r32(c: &mut Core, op: &Op) -> Step {
    let r = op.ins.op0_register() as usize - iced_x86::Register::EAX as usize;
    let d = c.s.gpr[r];
    let res = d.wrapping_sub(1);
    c.s.gpr[r] = res;
    c.s.flags.record(FlagOp::Dec, 32, d, 1, res);
    Ok(())
}

pub(crate) fn inc(c: &mut Core, op: &Op) -> Step {
    let (d, res) = modify(c, op, |d| d.wrapping_add(1))?;
    c.s.flags.record(FlagOp::Inc, bits(op), d, 1, res);
    Ok(())
}

pub(crate) fn dec(c: &mut Core, op: &Op) -> Step {
    let (d, res) = modify(c, op, |d| d.wrapping_sub(1))?;
    c.s.flags.record(FlagOp::Dec, bits(op), d, 1, res);
    Ok(())
}

pub(crate) fn neg(c: &mut Core, op: &Op) -> Step {
    let (d, res) = modify(c, op, |d| 0u32.wrapping_sub(d))?;
    c.s.flags.record(FlagOp::Sub, bits(op), 0, d, res);
    Ok(())
}

pub(crate) fn not(c: &mut Core, op: &Op) -> Step {
    modify(c, op, |d| !d)?;
    Ok(())
}

pub(crate) fn mov(c: &mut Core, op: &Op) -> Step {
    let v = read_op(c, op, 1)?;
    write_op(c, op, 0, v)
}

/// `mov r32, [mem]`, the commonest load.
pub(crate) fn mov_r32_m32(c: &mut Core, op: &Op) -> Step {
    let off = ea(c, op);
    let v = c.read_seg(op.seg as usize, off, 4)? as u32;
    c.s.gpr[op.ins.op0_register() as usize - iced_x86::Register::EAX as usize] = v;
    Ok(())
}

/// `mov [mem], r32`, the commonest store.
pub(crate) fn mov_m32_r32(c: &mut Core, op: &Op) -> Step {
    let off = ea(c, op);
    let v = c.s.gpr[op.ins.op1_register() as usize - iced_x86::Register::EAX as usize];
    c.write_seg(op.seg as usize, off, u64::from(v), 4)
}

/// `mov` from a segment register to memory stores 16 bits whatever the
/// operand size; to a register it zero-extends (32-bit operand) — both
/// handled by the operand sizes iced-x86 reports.
pub(crate) fn movzx(c: &mut Core, op: &Op) -> Step {
    let v = read_op_sized(c, op, 1, op.size2)?;
    write_op(c, op, 0, v & mask(op.size2))
}

pub(crate) fn movsx(c: &mut Core, op: &Op) -> Step {
    let v = read_op_sized(c, op, 1, op.size2)?;
    let v = if op.size2 == 1 { v as u8 as i8 as i32 as u32 } else { v as u16 as i16 as i32 as u32 };
    write_op(c, op, 0, v)
}

pub(crate) fn lea(c: &mut Core, op: &Op) -> Step {
    let a = ea(c, op);
    set_reg(c, op.ins.op0_register(), a);
    Ok(())
}

pub(crate) fn xchg(c: &mut Core, op: &Op) -> Step {
    let m = mask(op.size);
    if op.ins.op0_kind() == OpKind::Memory || op.ins.op1_kind() == OpKind::Memory {
        // With memory, always locked.
        let r = op.ins.op_register(if op.ins.op0_kind() == OpKind::Memory { 1 } else { 0 });
        let v = get_reg(c, r) & m;
        let la = mem_la(c, op, u32::from(op.size), true)?;
        let old = c.atomic_lin(la, op.size as usize, |_| u64::from(v))? as u32;
        set_reg(c, r, old);
        return Ok(());
    }
    let (a, b) = (op.ins.op0_register(), op.ins.op1_register());
    let (va, vb) = (get_reg(c, a), get_reg(c, b));
    set_reg(c, a, vb);
    set_reg(c, b, va);
    Ok(())
}

pub(crate) fn xadd(c: &mut Core, op: &Op) -> Step {
    let m = mask(op.size);
    let r = op.ins.op1_register();
    let src = get_reg(c, r) & m;
    let dst = if op.ins.has_lock_prefix() {
        let la = mem_la(c, op, u32::from(op.size), true)?;
        c.atomic_lin(la, op.size as usize, |d| u64::from((d as u32).wrapping_add(src) & m))? as u32
    } else {
        let (dst, at) = read_dst(c, op)?;
        let dst = dst & m;
        if dst_is_mem(op) {
            write_dst(c, op, at, dst.wrapping_add(src) & m)?;
        }
        dst
    };
    let res = dst.wrapping_add(src) & m;
    // The old destination goes to the source first, then the sum to a
    // register destination (with one register as both, the sum wins).
    set_reg(c, r, dst);
    if !dst_is_mem(op) {
        write_op(c, op, 0, res)?;
    }
    c.s.flags.record(FlagOp::Add, bits(op), dst, src, res);
    Ok(())
}

fn accumulator(size: u8) -> iced_x86::Register {
    match size {
        1 => iced_x86::Register::AL,
        2 => iced_x86::Register::AX,
        _ => iced_x86::Register::EAX,
    }
}

pub(crate) fn cmpxchg(c: &mut Core, op: &Op) -> Step {
    let m = mask(op.size);
    let acc = accumulator(op.size);
    let expected = get_reg(c, acc) & m;
    let new = get_reg(c, op.ins.op1_register()) & m;
    let old = if dst_is_mem(op) {
        let la = mem_la(c, op, u32::from(op.size), true)?;
        // The destination is written in every case (with its old value
        // when the comparison fails), as the CPU does.
        c.atomic_lin(la, op.size as usize, |d| if d as u32 == expected { u64::from(new) } else { d })? as u32
    } else {
        let d = read_op(c, op, 0)?;
        if d == expected {
            write_op(c, op, 0, new)?;
        }
        d
    };
    c.s.flags.record(FlagOp::Sub, bits(op), expected, old, expected.wrapping_sub(old) & m);
    if old != expected {
        set_reg(c, acc, old);
    }
    Ok(())
}

pub(crate) fn cmpxchg8b(c: &mut Core, op: &Op) -> Step {
    let expected = u64::from(c.s.gpr[0]) | (u64::from(c.s.gpr[2]) << 32);
    let new = u64::from(c.s.gpr[3]) | (u64::from(c.s.gpr[1]) << 32);
    let la = mem_la(c, op, 8, true)?;
    let old = c.atomic_lin(la, 8, |d| if d == expected { new } else { d })?;
    let eq = old == expected;
    c.s.flags.set_some(flag::ZF, if eq { flag::ZF } else { 0 });
    if !eq {
        c.s.gpr[0] = old as u32;
        c.s.gpr[2] = (old >> 32) as u32;
    }
    Ok(())
}

pub(crate) fn bswap(c: &mut Core, op: &Op) -> Step {
    let r = op.ins.op0_register();
    let v = get_reg(c, r);
    // With a 16-bit operand the result is undefined; the CPUs clear it.
    let v = if op.size == 2 { 0 } else { v.swap_bytes() };
    set_reg(c, r, v);
    Ok(())
}

pub(crate) fn cbw(c: &mut Core, op: &Op) -> Step {
    if op.ins.code() == Code::Cbw {
        let v = c.s.gpr[0] as u8 as i8 as i16 as u16;
        set_reg(c, iced_x86::Register::AX, u32::from(v));
    } else {
        c.s.gpr[0] = c.s.gpr[0] as u16 as i16 as i32 as u32;
    }
    Ok(())
}

pub(crate) fn cwd(c: &mut Core, op: &Op) -> Step {
    if op.ins.code() == Code::Cwd {
        let hi = if c.s.gpr[0] & 0x8000 != 0 { 0xffff } else { 0 };
        set_reg(c, iced_x86::Register::DX, hi);
    } else {
        c.s.gpr[2] = if c.s.gpr[0] & 0x8000_0000 != 0 { u32::MAX } else { 0 };
    }
    Ok(())
}

pub(crate) fn setcc(c: &mut Core, op: &Op) -> Step {
    let v = u32::from(c.s.flags.condition(op.cc));
    write_op(c, op, 0, v)
}

pub(crate) fn cmovcc(c: &mut Core, op: &Op) -> Step {
    // The source is read whatever the condition (a memory source faults
    // even when the move does not happen). A 32-bit destination not moved
    // to keeps its value: only in 64-bit code would it be zero-extended.
    let v = read_op(c, op, 1)?;
    if c.s.flags.condition(op.cc) {
        write_op(c, op, 0, v)?;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BitOp {
    Test,
    Set,
    Reset,
    Complement,
}

impl BitOp {
    /// `d` with bit `bit` set, cleared, complemented or kept.
    #[inline(always)]
    fn apply(self, d: u32, bit: u32) -> u32 {
        match self {
            BitOp::Test => d,
            BitOp::Set => d | (1 << bit),
            BitOp::Reset => d & !(1 << bit),
            BitOp::Complement => d ^ (1 << bit),
        }
    }
}

fn bit_op(c: &mut Core, op: &Op, k: BitOp) -> Step {
    let width = u32::from(op.size) * 8;
    let offset = read_op_sized(c, op, 1, op.size)?;
    let (bit, value) = if dst_is_mem(op) && op.ins.op1_kind() == OpKind::Register {
        // A register bit offset addresses memory beyond the operand
        // (signed, in operand-size units).
        let signed = if op.size == 2 { offset as u16 as i16 as i32 } else { offset as i32 };
        let unit = signed.div_euclid(width as i32);
        let bit = signed.rem_euclid(width as i32) as u32;
        let off = ea(c, op).wrapping_add((unit * i32::from(op.size)) as u32);
        let off = if op.addr16 { off & 0xffff } else { off };
        let f = |d: u32| k.apply(d, bit);
        let old = if k == BitOp::Test {
            c.read_seg(op.seg as usize, off, op.size as usize)? as u32
        } else if op.ins.has_lock_prefix() {
            let la = c.seg_addr(op.seg as usize, off, u32::from(op.size), true)?;
            c.atomic_lin(la, op.size as usize, |d| u64::from(f(d as u32)))? as u32
        } else {
            let d = c.read_seg(op.seg as usize, off, op.size as usize)? as u32;
            c.write_seg(op.seg as usize, off, u64::from(f(d)), op.size as usize)?;
            d
        };
        (bit, old)
    } else {
        let bit = offset % width;
        let f = |d: u32| k.apply(d, bit);
        let old = if k == BitOp::Test { read_op(c, op, 0)? } else { modify(c, op, f)?.0 };
        (bit, old)
    };
    let cf = (value >> bit) & 1;
    c.s.flags.set_some(flag::CF, cf);
    Ok(())
}

pub(crate) fn bt(c: &mut Core, op: &Op) -> Step {
    bit_op(c, op, BitOp::Test)
}
pub(crate) fn bts(c: &mut Core, op: &Op) -> Step {
    bit_op(c, op, BitOp::Set)
}
pub(crate) fn btr(c: &mut Core, op: &Op) -> Step {
    bit_op(c, op, BitOp::Reset)
}
pub(crate) fn btc(c: &mut Core, op: &Op) -> Step {
    bit_op(c, op, BitOp::Complement)
}

/// Flags after `bsf`/`bsr`: ZF says whether the source was zero; the others
/// are undefined (computed as the host CPUs do: from the result as a
/// logical operation would, for AMD and Intel alike).
fn bit_scan(c: &mut Core, op: &Op, forward: bool) -> Step {
    let src = read_op(c, op, 1)? & mask(op.size);
    if src == 0 {
        // The destination is left unchanged.
        let f = c.s.flags.get() & !flag::ARITH;
        c.s.flags.set(f | flag::ZF | if parity(0) { flag::PF } else { 0 });
        return Ok(());
    }
    let idx = if forward { src.trailing_zeros() } else { 31 - src.leading_zeros() };
    write_op(c, op, 0, idx)?;
    let f = c.s.flags.get() & !flag::ARITH;
    c.s.flags.set(f | if parity(idx) { flag::PF } else { 0 });
    Ok(())
}

pub(crate) fn bsf(c: &mut Core, op: &Op) -> Step {
    bit_scan(c, op, true)
}
pub(crate) fn bsr(c: &mut Core, op: &Op) -> Step {
    bit_scan(c, op, false)
}

pub(crate) fn sahf(c: &mut Core, _op: &Op) -> Step {
    let ah = (c.s.gpr[0] >> 8) & 0xff;
    let which = flag::SF | flag::ZF | flag::AF | flag::PF | flag::CF;
    c.s.flags.set_some(which, ah);
    Ok(())
}

pub(crate) fn lahf(c: &mut Core, _op: &Op) -> Step {
    let f = (c.s.flags.get() & 0xd5) | flag::FIXED;
    c.s.gpr[0] = (c.s.gpr[0] & !0xff00) | (f << 8);
    Ok(())
}

pub(crate) fn clc(c: &mut Core, _op: &Op) -> Step {
    c.s.flags.set_some(flag::CF, 0);
    Ok(())
}
pub(crate) fn stc(c: &mut Core, _op: &Op) -> Step {
    c.s.flags.set_some(flag::CF, flag::CF);
    Ok(())
}
pub(crate) fn cmc(c: &mut Core, _op: &Op) -> Step {
    let cf = c.s.flags.cf();
    c.s.flags.set_some(flag::CF, if cf { 0 } else { flag::CF });
    Ok(())
}
pub(crate) fn cld(c: &mut Core, _op: &Op) -> Step {
    c.s.flags.set_bit(flag::DF, false);
    Ok(())
}
pub(crate) fn std(c: &mut Core, _op: &Op) -> Step {
    c.s.flags.set_bit(flag::DF, true);
    Ok(())
}

pub(crate) fn xlat(c: &mut Core, op: &Op) -> Step {
    let al = c.s.gpr[0] & 0xff;
    let off = if op.addr16 { (c.s.gpr[3] + al) & 0xffff } else { c.s.gpr[3].wrapping_add(al) };
    let v = c.read_seg(op.seg as usize, off, 1)? as u32;
    set_reg(c, iced_x86::Register::AL, v);
    Ok(())
}

pub(crate) fn salc(c: &mut Core, _op: &Op) -> Step {
    let v = if c.s.flags.cf() { 0xff } else { 0 };
    set_reg(c, iced_x86::Register::AL, v);
    Ok(())
}

pub(crate) fn nop(_c: &mut Core, _op: &Op) -> Step {
    Ok(())
}
