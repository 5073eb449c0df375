//! The stack (`push`, `pop`, `pusha`, `popa`, `pushf`, `popf`, `enter`,
//! `leave`) and segment-register loads (`mov sreg`, `pop sreg`, `lds` and
//! friends).

use super::{ea, get_reg, read_op_sized, set_reg, vm86_iopl_check, write_op, Op};
use crate::interp::core::Core;
use crate::interp::event::{ud, Step};
use crate::interp::state::{flag, SegReg};
use iced_x86::{OpKind, Register};

/// The bytes a `push`/`pop` moves (its stack-pointer change).
#[inline]
fn stack_size(op: &Op) -> usize {
    op.ins.stack_pointer_increment().unsigned_abs() as usize
}

pub(crate) fn push(c: &mut Core, op: &Op) -> Step {
    let n = stack_size(op);
    let v = read_op_sized(c, op, 0, n as u8)?;
    c.push(v, n)
}

pub(crate) fn pop(c: &mut Core, op: &Op) -> Step {
    let n = stack_size(op);
    let v = c.peek(0, n)?;
    let old = c.s.gpr[4];
    // A memory destination is addressed with the incremented ESP.
    c.set_sp(c.sp_offset(n as u32));
    if op.ins.op0_kind() == OpKind::Memory {
        let off = ea(c, op);
        if let Err(e) = c.write_seg(op.seg as usize, off, u64::from(v), n) {
            c.s.gpr[4] = old;
            return Err(e);
        }
        return Ok(());
    }
    write_op(c, op, 0, v)
}

pub(crate) fn push_sreg(c: &mut Core, op: &Op) -> Step {
    let n = stack_size(op);
    let sel = get_reg(c, op.ins.op0_register());
    if n == 4 {
        // A 32-bit push of a segment register writes 16 bits (the CPUs in
        // use leave the upper half of the slot unchanged).
        let sp = c.sp_offset(4u32.wrapping_neg());
        c.write_seg(SegReg::Ss as usize, sp, u64::from(sel), 2)?;
        c.set_sp(sp);
        return Ok(());
    }
    c.push(sel, n)
}

fn sreg_index(r: Register) -> usize {
    r as usize - Register::ES as usize
}

pub(crate) fn pop_sreg(c: &mut Core, op: &Op) -> Step {
    let n = stack_size(op);
    let sel = c.peek(0, n)? as u16;
    let seg = sreg_index(op.ins.op0_register());
    c.load_seg(seg, sel)?;
    c.set_sp(c.sp_offset(n as u32));
    Ok(())
}

pub(crate) fn mov_to_sreg(c: &mut Core, op: &Op) -> Step {
    let seg = sreg_index(op.ins.op0_register());
    if seg == SegReg::Cs as usize {
        return Err(ud());
    }
    let sel = read_op_sized(c, op, 1, 2)? as u16;
    c.load_seg(seg, sel)
}

pub(crate) fn load_far_pointer(c: &mut Core, op: &Op) -> Step {
    let n = op.size as usize;
    let off = ea(c, op);
    let offset = c.read_seg(op.seg as usize, off, n)? as u32;
    let sel = c.read_seg(op.seg as usize, off.wrapping_add(n as u32), 2)? as u16;
    let seg = match op.ins.mnemonic() {
        iced_x86::Mnemonic::Lds => SegReg::Ds,
        iced_x86::Mnemonic::Les => SegReg::Es,
        iced_x86::Mnemonic::Lfs => SegReg::Fs,
        iced_x86::Mnemonic::Lgs => SegReg::Gs,
        _ => SegReg::Ss,
    } as usize;
    c.load_seg(seg, sel)?;
    set_reg(c, op.ins.op0_register(), offset);
    Ok(())
}

pub(crate) fn pusha(c: &mut Core, op: &Op) -> Step {
    let n = stack_size(op) / 8;
    let esp = c.s.gpr[4];
    // Check the whole area first: a fault leaves ESP unchanged.
    let top = c.sp_offset((8 * n as u32).wrapping_neg());
    c.seg_addr(SegReg::Ss as usize, top, 8 * n as u32, true)?;
    for r in 0..8 {
        let v = if r == 4 { esp } else { c.s.gpr[r] };
        c.push(v, n)?;
    }
    Ok(())
}

pub(crate) fn popa(c: &mut Core, op: &Op) -> Step {
    let n = stack_size(op) / 8;
    let mut vals = [0u32; 8];
    for (i, r) in (0..8).rev().enumerate() {
        vals[r] = c.peek((i * n) as u32, n)?;
    }
    // Every register but ESP, which the stack pointer's own update sets;
    // 16-bit pops keep the registers' upper halves.
    let keep = if n == 2 { 0xffff_0000 } else { 0 };
    for r in (0..8).filter(|&r| r != 4) {
        c.s.gpr[r] = (c.s.gpr[r] & keep) | (vals[r] & !keep);
    }
    c.set_sp(c.sp_offset(8 * n as u32));
    Ok(())
}

pub(crate) fn pushf(c: &mut Core, op: &Op) -> Step {
    let n = stack_size(op);
    vm86_iopl_check(c)?;
    let f = c.s.flags.get() & !(flag::VM | flag::RF);
    c.push(f, n)
}

pub(crate) fn popf(c: &mut Core, op: &Op) -> Step {
    let n = stack_size(op);
    vm86_iopl_check(c)?;
    let v = c.pop(n)?;
    let old = c.s.flags.get();
    let cpl = c.s.cpl();
    let iopl = c.s.iopl();
    let mut changeable = flag::ARITH | flag::TF | flag::DF | flag::NT | flag::AC | flag::ID;
    if !c.prot() || cpl == 0 {
        changeable |= flag::IOPL | flag::IF;
    } else if cpl <= iopl {
        changeable |= flag::IF;
    }
    if n == 2 {
        changeable &= 0xffff;
    }
    let new = (old & !changeable) | (v & changeable);
    c.s.set_eflags(new);
    // EFLAGS.AC decides alignment checks.
    c.mode_changed();
    Ok(())
}

pub(crate) fn enter(c: &mut Core, op: &Op) -> Step {
    let n = if op.ins.code() == iced_x86::Code::Enterw_imm16_imm8 { 2 } else { 4 };
    let alloc = u32::from(op.ins.immediate16());
    let level = u32::from(op.ins.immediate8_2nd()) & 31;
    let bp_reg = if c.stack32() { Register::EBP } else { Register::BP };
    let ebp = get_reg(c, bp_reg);
    let old_esp = c.s.gpr[4];
    let old_ebp = c.s.gpr[5];
    let result = (|| -> Step {
        c.push(c.s.gpr[5], n)?;
        // FrameTemp: the whole ESP for a 32-bit operand, whatever the
        // stack size.
        let frame = if n == 4 { c.s.gpr[4] } else { c.sp() };
        if level > 0 {
            let mut bp = ebp;
            for _ in 1..level {
                bp = if c.stack32() { bp.wrapping_sub(n as u32) } else { bp.wrapping_sub(n as u32) & 0xffff };
                let v = c.read_seg(SegReg::Ss as usize, bp, n)? as u32;
                c.push(v, n)?;
            }
            c.push(frame, n)?;
        }
        let sp = c.sp_offset(alloc.wrapping_neg());
        // The new stack top must be writable.
        if alloc > 0 {
            c.seg_addr(SegReg::Ss as usize, sp, 1, true)?;
        }
        if n == 2 {
            set_reg(c, Register::BP, frame);
        } else {
            c.s.gpr[5] = frame;
        }
        c.set_sp(sp);
        Ok(())
    })();
    if result.is_err() {
        c.s.gpr[4] = old_esp;
        c.s.gpr[5] = old_ebp;
    }
    result
}

pub(crate) fn leave(c: &mut Core, op: &Op) -> Step {
    let n = if op.ins.code() == iced_x86::Code::Leavew { 2 } else { 4 };
    let bp = if c.stack32() { c.s.gpr[5] } else { c.s.gpr[5] & 0xffff };
    let v = c.read_seg(SegReg::Ss as usize, bp, n)? as u32;
    c.set_sp(bp.wrapping_add(n as u32));
    if n == 2 {
        set_reg(c, Register::BP, v);
    } else {
        c.s.gpr[5] = v;
    }
    Ok(())
}
