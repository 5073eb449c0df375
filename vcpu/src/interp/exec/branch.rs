//! Control transfer: near and far `jmp`, `jcc`, `loop`, `jcxz`, `call`,
//! `ret`, `retf`, `int`, `iret`.
//!
//! Far transfers in protected mode go to code segments at the same
//! privilege (conforming or not); `retf` and `iret` also return to an
//! outer privilege. Call gates, task gates and returns to virtual-8086
//! mode are not modelled: they raise `#GP` (with a warning).

use super::{addr_reg, read_op_sized, set_addr_reg, vm86_iopl_check, Op};
use crate::interp::core::Core;
use crate::interp::event::{gp, np, Event, Step};
use crate::interp::state::{attr, flag, SegReg, Segment};
use iced_x86::OpKind;

/// The near target of a direct branch.
#[inline(always)]
fn near_target(op: &Op) -> u32 {
    match op.ins.op0_kind() {
        OpKind::NearBranch16 => u32::from(op.ins.near_branch16()),
        _ => op.ins.near_branch32(),
    }
}

/// `#GP(0)` unless `off` is within CS's limit (a real-mode far transfer
/// keeps the limit of the CS it leaves).
#[inline(always)]
fn check_cs_limit(c: &Core, off: u32) -> Step {
    if off > c.s.seg[SegReg::Cs as usize].limit {
        return Err(gp(0));
    }
    Ok(())
}

/// Sets the next EIP after a limit check (`#GP(0)` beyond CS's limit).
#[inline(always)]
fn go(c: &mut Core, target: u32) -> Step {
    check_cs_limit(c, target)?;
    c.next_eip = target;
    Ok(())
}

/// The near target of `jmp`/`call`: direct, or from a register or memory.
fn target(c: &mut Core, op: &Op) -> Step<u32> {
    match op.ins.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 => Ok(near_target(op)),
        _ => read_op_sized(c, op, 0, op.size),
    }
}

/// The operand size of a near branch (2 or 4).
fn branch_size(op: &Op) -> usize {
    match op.ins.op0_kind() {
        OpKind::NearBranch16 => 2,
        OpKind::NearBranch32 => 4,
        _ => op.size as usize,
    }
}

pub(crate) fn jmp(c: &mut Core, op: &Op) -> Step {
    match op.ins.op0_kind() {
        OpKind::FarBranch16 => far_jump(c, op.ins.far_branch_selector(), u32::from(op.ins.far_branch16())),
        OpKind::FarBranch32 => far_jump(c, op.ins.far_branch_selector(), op.ins.far_branch32()),
        OpKind::Memory if is_far_pointer(op) => {
            let (sel, off) = read_far_pointer(c, op)?;
            far_jump(c, sel, off)
        }
        _ => {
            let t = target(c, op)?;
            go(c, t)
        }
    }
}

fn is_far_pointer(op: &Op) -> bool {
    matches!(op.ins.memory_size(), iced_x86::MemorySize::SegPtr16 | iced_x86::MemorySize::SegPtr32)
}

/// Reads a `m16:16` / `m16:32` far pointer operand: (selector, offset).
fn read_far_pointer(c: &mut Core, op: &Op) -> Step<(u16, u32)> {
    let n = if op.ins.memory_size() == iced_x86::MemorySize::SegPtr16 { 2 } else { 4 };
    let off = super::ea(c, op);
    let o = c.read_seg(op.seg as usize, off, n)? as u32;
    let sel = c.read_seg(op.seg as usize, off.wrapping_add(n as u32), 2)? as u16;
    Ok((sel, o))
}

pub(crate) fn jcc(c: &mut Core, op: &Op) -> Step {
    if c.s.flags.condition(op.cc) {
        go(c, near_target(op))?;
    }
    Ok(())
}

/// ECX (CX with a 16-bit address size), decremented; returns the new count.
#[inline]
fn decrement_counter(c: &mut Core, op: &Op) -> u32 {
    set_addr_reg(c, op, 1, addr_reg(c, op, 1).wrapping_sub(1));
    addr_reg(c, op, 1)
}

pub(crate) fn jcxz(c: &mut Core, op: &Op) -> Step {
    if addr_reg(c, op, 1) == 0 {
        go(c, near_target(op))?;
    }
    Ok(())
}

pub(crate) fn loop_(c: &mut Core, op: &Op) -> Step {
    if decrement_counter(c, op) != 0 {
        go(c, near_target(op))?;
    }
    Ok(())
}

pub(crate) fn loope(c: &mut Core, op: &Op) -> Step {
    if decrement_counter(c, op) != 0 && c.s.flags.zf() {
        go(c, near_target(op))?;
    }
    Ok(())
}

pub(crate) fn loopne(c: &mut Core, op: &Op) -> Step {
    if decrement_counter(c, op) != 0 && !c.s.flags.zf() {
        go(c, near_target(op))?;
    }
    Ok(())
}

pub(crate) fn call(c: &mut Core, op: &Op) -> Step {
    match op.ins.op0_kind() {
        OpKind::FarBranch16 => far_call(c, op.ins.far_branch_selector(), u32::from(op.ins.far_branch16()), 2),
        OpKind::FarBranch32 => far_call(c, op.ins.far_branch_selector(), op.ins.far_branch32(), 4),
        OpKind::Memory if is_far_pointer(op) => {
            let n = if op.ins.memory_size() == iced_x86::MemorySize::SegPtr16 { 2 } else { 4 };
            let (sel, off) = read_far_pointer(c, op)?;
            far_call(c, sel, off, n)
        }
        _ => {
            let n = branch_size(op);
            let t = target(c, op)?;
            check_cs_limit(c, t)?;
            let ret = c.next_eip;
            c.push(ret, n)?;
            c.next_eip = t;
            Ok(())
        }
    }
}

pub(crate) fn ret(c: &mut Core, op: &Op) -> Step {
    let n = if matches!(op.ins.code(), iced_x86::Code::Retnw | iced_x86::Code::Retnw_imm16) { 2 } else { 4 };
    let t = c.peek(0, n)?;
    check_cs_limit(c, t)?;
    let imm = if op.ins.op_count() > 0 { u32::from(op.ins.immediate16()) } else { 0 };
    c.set_sp(c.sp_offset(n as u32 + imm));
    c.next_eip = t;
    Ok(())
}

fn far_jump(c: &mut Core, sel: u16, off: u32) -> Step {
    if !c.prot() {
        check_cs_limit(c, off)?;
        c.set_cs_real(sel);
        c.next_eip = off;
        return Ok(());
    }
    let cs = protected_target(c, sel, off)?;
    c.set_cs(cs);
    c.next_eip = off;
    Ok(())
}

/// The code segment of a far `jmp`/`call` to `sel:off` in protected mode,
/// checked (the offset against its limit too) and marked accessed.
fn protected_target(c: &mut Core, sel: u16, off: u32) -> Step<Segment> {
    let (cs, desc) = code_descriptor(c, sel)?;
    if off > cs.limit {
        return Err(gp(0));
    }
    c.set_accessed(sel, desc)?;
    Ok(cs)
}

/// The code-segment descriptor a far `jmp`/`call` names (gates are not
/// followed).
fn code_descriptor(c: &mut Core, sel: u16) -> Step<(Segment, u64)> {
    if sel & !3 != 0 {
        if let Some(la) = c.descriptor_addr(sel) {
            let desc = c.read_sys(la, 8)?;
            if desc & (1 << 44) == 0 {
                tracing::warn!(cpu = c.index, selector = sel, "far transfer through a gate: not modelled (#GP)");
                return Err(gp(u32::from(sel & 0xfffc)));
            }
        }
    }
    c.code_segment_for_transfer(sel)
}

fn far_call(c: &mut Core, sel: u16, off: u32, n: usize) -> Step {
    let old_cs = u32::from(c.s.seg[SegReg::Cs as usize].selector);
    let ret = c.next_eip;
    let old_sp = c.s.gpr[4];
    if !c.prot() {
        check_cs_limit(c, off)?;
        c.push(old_cs, n)?;
        if let Err(e) = c.push(ret, n) {
            c.s.gpr[4] = old_sp;
            return Err(e);
        }
        c.set_cs_real(sel);
        c.next_eip = off;
        return Ok(());
    }
    // The descriptor is marked accessed as it loads, before the pushes.
    let cs = protected_target(c, sel, off)?;
    let pushed = c.push(old_cs, n).and_then(|_| c.push(ret, n));
    if let Err(e) = pushed {
        c.s.gpr[4] = old_sp;
        return Err(e);
    }
    c.set_cs(cs);
    c.next_eip = off;
    Ok(())
}

pub(crate) fn retf(c: &mut Core, op: &Op) -> Step {
    let n = if matches!(op.ins.code(), iced_x86::Code::Retfw | iced_x86::Code::Retfw_imm16) { 2 } else { 4 };
    let imm = if op.ins.op_count() > 0 { u32::from(op.ins.immediate16()) } else { 0 };
    let off = c.peek(0, n)?;
    let sel = c.peek(n as u32, n)? as u16;
    if !c.prot() {
        check_cs_limit(c, off)?;
        c.set_sp(c.sp_offset(2 * n as u32 + imm));
        c.set_cs_real(sel);
        c.next_eip = off;
        return Ok(());
    }
    let (cs, desc) = return_target(c, sel)?;
    if off > cs.limit {
        return Err(gp(0));
    }
    let outer = cs.dpl() > c.s.cpl() || (sel & 3) as u8 > c.s.cpl();
    if outer {
        let esp = c.peek(2 * n as u32 + imm, n)?;
        let ss_sel = c.peek(3 * n as u32 + imm, n)? as u16;
        let rpl = (sel & 3) as u8;
        let (new_ss, ss_desc) = c.stack_segment(ss_sel, rpl)?;
        c.set_accessed(sel, desc)?;
        c.set_accessed(ss_sel, ss_desc)?;
        c.set_cs(cs);
        c.s.seg[SegReg::Ss as usize] = new_ss;
        let esp = esp.wrapping_add(imm);
        c.set_sp(esp);
        null_outer_data_segments(c);
    } else {
        c.set_accessed(sel, desc)?;
        c.set_sp(c.sp_offset(2 * n as u32 + imm));
        c.set_cs(cs);
    }
    c.next_eip = off;
    Ok(())
}

/// The code segment a `retf`/`iret` returns to (same or outer privilege).
fn return_target(c: &mut Core, sel: u16) -> Step<(Segment, u64)> {
    if sel & !3 == 0 {
        return Err(gp(0));
    }
    let desc = c.read_descriptor(sel, gp)?;
    let s = Segment::from_descriptor(sel, desc);
    let rpl = (sel & 3) as u8;
    let err = gp(u32::from(sel & 0xfffc));
    let a = s.attrs;
    if rpl < c.s.cpl() || a & attr::S == 0 || a & attr::CODE == 0 {
        return Err(err);
    }
    if a & attr::DC != 0 {
        if s.dpl() > rpl {
            return Err(err);
        }
    } else if s.dpl() != rpl {
        return Err(err);
    }
    if a & attr::P == 0 {
        return Err(np(u32::from(sel & 0xfffc)));
    }
    Ok((Segment { selector: sel, attrs: a | attr::ACCESSED, ..s }, desc))
}

/// After a return to an outer privilege, data segments the new CPL may
/// not use are nulled.
fn null_outer_data_segments(c: &mut Core) {
    let cpl = c.s.cpl();
    for seg in [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs] {
        let s = &mut c.s.seg[seg as usize];
        let conforming_code = s.attrs & (attr::CODE | attr::DC) == (attr::CODE | attr::DC);
        if s.is_usable() && !conforming_code && s.dpl() < cpl {
            *s = Segment { selector: 0, base: 0, limit: 0, attrs: 0 };
        }
    }
}

pub(crate) fn int(c: &mut Core, op: &Op) -> Step {
    vm86_iopl_check(c)?;
    Err(Event::SoftInt(op.ins.immediate8()))
}

pub(crate) fn int3(_c: &mut Core, _op: &Op) -> Step {
    Err(Event::SoftInt(3))
}

pub(crate) fn into(c: &mut Core, _op: &Op) -> Step {
    if c.s.flags.of() {
        return Err(Event::SoftInt(4));
    }
    Ok(())
}

pub(crate) fn int1(c: &mut Core, _op: &Op) -> Step {
    // A trap: delivered with EIP after the instruction, no DPL check.
    c.s.eip = c.next_eip;
    Err(Event::exception(1, None))
}

pub(crate) fn iret(c: &mut Core, op: &Op) -> Step {
    // An `iret` ends NMI blocking (even one that faults later does not
    // matter: the handler's `iret` is what unblocks on hardware too).
    c.nmi_blocked = false;
    let n = if op.ins.code() == iced_x86::Code::Iretw { 2 } else { 4 };
    let off = c.peek(0, n)?;
    let sel = c.peek(n as u32, n)? as u16;
    let new_flags = c.peek(2 * n as u32, n)?;
    let old = c.s.flags.get();
    if !c.prot() {
        if c.s.flags.base() & flag::VM != 0 {
            tracing::warn!(cpu = c.index, "iret in virtual-8086 mode: not modelled (#GP)");
            return Err(gp(0));
        }
        check_cs_limit(c, off)?;
        c.set_sp(c.sp_offset(3 * n as u32));
        c.set_cs_real(sel);
        let keep = if n == 2 { 0xffff_0000 } else { flag::VM | flag::VIF | flag::VIP };
        c.s.set_eflags((old & keep) | (new_flags & !keep));
        c.next_eip = off;
        return Ok(());
    }
    if old & flag::NT != 0 {
        tracing::warn!(cpu = c.index, "iret with NT set (a task return): not modelled (#GP)");
        return Err(gp(0));
    }
    if n == 4 && new_flags & flag::VM != 0 && c.s.cpl() == 0 {
        tracing::warn!(cpu = c.index, "iret to virtual-8086 mode: not modelled (#GP)");
        return Err(gp(0));
    }
    let cpl = c.s.cpl();
    let (cs, desc) = return_target(c, sel)?;
    if off > cs.limit {
        return Err(gp(0));
    }
    let iopl = c.s.iopl();
    let mut changeable = flag::ARITH | flag::TF | flag::DF | flag::NT | flag::AC | flag::ID | flag::RF;
    if cpl == 0 {
        changeable |= flag::IOPL | flag::VIF | flag::VIP;
    }
    if cpl <= iopl {
        changeable |= flag::IF;
    }
    if n == 2 {
        changeable &= 0xffff;
    }
    let flags = (old & !changeable) | (new_flags & changeable);
    let rpl = (sel & 3) as u8;
    if rpl > cpl {
        let esp = c.peek(3 * n as u32, n)?;
        let ss_sel = c.peek(4 * n as u32, n)? as u16;
        let (new_ss, ss_desc) = c.stack_segment(ss_sel, rpl)?;
        c.set_accessed(sel, desc)?;
        c.set_accessed(ss_sel, ss_desc)?;
        c.s.set_eflags(flags);
        c.set_cs(cs);
        c.s.seg[SegReg::Ss as usize] = new_ss;
        c.set_sp(esp);
        null_outer_data_segments(c);
    } else {
        c.set_accessed(sel, desc)?;
        c.set_sp(c.sp_offset(3 * n as u32));
        c.s.set_eflags(flags);
        c.set_cs(cs);
    }
    c.next_eip = off;
    Ok(())
}
