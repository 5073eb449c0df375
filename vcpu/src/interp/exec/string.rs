//! String instructions (`movs`, `stos`, `lods`, `cmps`, `scas`, `ins`,
//! `outs`) with `rep`/`repe`/`repne`.
//!
//! A repeated instruction runs at most [`BURST`] iterations per execution
//! and then leaves EIP on itself, so interrupts, kicks and code writes are
//! seen between bursts, as the CPU takes interrupts between iterations.
//! Each burst counts as one instruction against [`Cpu::run`]'s limit
//! (a limit counts instructions, not iterations).
//!
//! [`Cpu::run`]: crate::interp::Cpu::run A
//! fault in an iteration leaves the registers as the completed iterations
//! left them, so the instruction restarts where it stopped.

use super::{addr_reg, mask, set_addr_reg, Op};
use crate::interp::core::Core;
use crate::interp::event::Step;
use crate::interp::flags::FlagOp;
use crate::interp::state::{flag, SegReg};

/// Iterations of a repeated string instruction per execution.
const BURST: u32 = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rep {
    None,
    /// `rep`, or `repe`/`repz` on `cmps`/`scas`.
    E,
    /// `repne`/`repnz` on `cmps`/`scas`.
    Ne,
}

fn rep_kind(op: &Op, compares: bool) -> Rep {
    if op.ins.has_repne_prefix() && compares {
        Rep::Ne
    } else if op.ins.has_rep_prefix() || op.ins.has_repe_prefix() || op.ins.has_repne_prefix() {
        Rep::E
    } else {
        Rep::None
    }
}

/// The index step: the operand size, negative when DF is set.
#[inline]
fn delta(c: &Core, op: &Op) -> u32 {
    if c.s.flags.base() & flag::DF != 0 {
        u32::from(op.size).wrapping_neg()
    } else {
        u32::from(op.size)
    }
}

const CX: usize = 1;
const SI: usize = 6;
const DI: usize = 7;
const ES: usize = SegReg::Es as usize;

/// Runs `one` (an iteration, given the index step; returns whether a
/// compare matched, for `repe`/`repne`) as the prefix says.
fn repeat(c: &mut Core, op: &Op, compares: bool, mut one: impl FnMut(&mut Core, u32) -> Step<bool>) -> Step {
    let rep = rep_kind(op, compares);
    // No iteration changes DF.
    let d = delta(c, op);
    if rep == Rep::None {
        one(c, d)?;
        return Ok(());
    }
    for _ in 0..BURST {
        if addr_reg(c, op, CX) == 0 {
            return Ok(());
        }
        let equal = one(c, d)?;
        let n = addr_reg(c, op, CX).wrapping_sub(1);
        set_addr_reg(c, op, CX, n);
        if compares && ((rep == Rep::E && !equal) || (rep == Rep::Ne && equal)) {
            return Ok(());
        }
        if n == 0 {
            return Ok(());
        }
    }
    // Not finished: run this instruction again.
    c.next_eip = c.s.eip;
    Ok(())
}

pub(crate) fn movs(c: &mut Core, op: &Op) -> Step {
    let size = op.size as usize;
    repeat(c, op, false, |c, d| {
        let (si, di) = (addr_reg(c, op, SI), addr_reg(c, op, DI));
        let v = c.read_seg(op.seg as usize, si, size)?;
        c.write_seg(ES, di, v, size)?;
        set_addr_reg(c, op, SI, si.wrapping_add(d));
        set_addr_reg(c, op, DI, di.wrapping_add(d));
        Ok(true)
    })
}

pub(crate) fn stos(c: &mut Core, op: &Op) -> Step {
    let (size, m) = (op.size as usize, mask(op.size));
    repeat(c, op, false, |c, d| {
        let di = addr_reg(c, op, DI);
        let v = u64::from(c.s.gpr[0] & m);
        c.write_seg(ES, di, v, size)?;
        set_addr_reg(c, op, DI, di.wrapping_add(d));
        Ok(true)
    })
}

pub(crate) fn lods(c: &mut Core, op: &Op) -> Step {
    let (size, m) = (op.size as usize, mask(op.size));
    repeat(c, op, false, |c, d| {
        let si = addr_reg(c, op, SI);
        let v = c.read_seg(op.seg as usize, si, size)? as u32;
        c.s.gpr[0] = if size == 4 { v } else { (c.s.gpr[0] & !m) | (v & m) };
        set_addr_reg(c, op, SI, si.wrapping_add(d));
        Ok(true)
    })
}

pub(crate) fn cmps(c: &mut Core, op: &Op) -> Step {
    let (size, m) = (op.size as usize, mask(op.size));
    repeat(c, op, true, |c, d| {
        let (si, di) = (addr_reg(c, op, SI), addr_reg(c, op, DI));
        let a = c.read_seg(op.seg as usize, si, size)? as u32;
        let b = c.read_seg(ES, di, size)? as u32;
        let res = a.wrapping_sub(b) & m;
        c.s.flags.record(FlagOp::Sub, op.size * 8, a, b, res);
        set_addr_reg(c, op, SI, si.wrapping_add(d));
        set_addr_reg(c, op, DI, di.wrapping_add(d));
        Ok(res == 0)
    })
}

pub(crate) fn scas(c: &mut Core, op: &Op) -> Step {
    let (size, m) = (op.size as usize, mask(op.size));
    repeat(c, op, true, |c, d| {
        let di = addr_reg(c, op, DI);
        let a = c.s.gpr[0] & m;
        let b = c.read_seg(ES, di, size)? as u32;
        let res = a.wrapping_sub(b) & m;
        c.s.flags.record(FlagOp::Sub, op.size * 8, a, b, res);
        set_addr_reg(c, op, DI, di.wrapping_add(d));
        Ok(res == 0)
    })
}

pub(crate) fn ins(c: &mut Core, op: &Op) -> Step {
    let size = op.size as usize;
    let port = c.s.gpr[2] as u16;
    super::system::check_io(c, port, size)?;
    repeat(c, op, false, |c, d| {
        let di = addr_reg(c, op, DI);
        // The destination is checked before the port is read.
        let la = c.seg_addr(ES, di, size as u32, true)?;
        c.phys(la, crate::interp::paging::Access::Write)?;
        let v = c.port_in(port, size)?;
        c.write_lin(la, u64::from(v), size)?;
        set_addr_reg(c, op, DI, di.wrapping_add(d));
        Ok(true)
    })
}

pub(crate) fn outs(c: &mut Core, op: &Op) -> Step {
    let size = op.size as usize;
    let port = c.s.gpr[2] as u16;
    super::system::check_io(c, port, size)?;
    repeat(c, op, false, |c, d| {
        let si = addr_reg(c, op, SI);
        let v = c.read_seg(op.seg as usize, si, size)? as u32;
        c.port_out(port, v, size)?;
        set_addr_reg(c, op, SI, si.wrapping_add(d));
        Ok(true)
    })
}
