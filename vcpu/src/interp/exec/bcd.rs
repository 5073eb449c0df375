//! Decimal adjust (`daa`, `das`, `aaa`, `aas`, `aam`, `aad`) and `bound`.

use super::{ea, get_reg, set_reg, Op};
use crate::interp::core::Core;
use crate::interp::event::{de, Event, Step};
use crate::interp::state::flag;
use iced_x86::Register;

/// SF, ZF and PF of `al`, with CF and AF given; OF cleared.
fn szp(c: &mut Core, al: u32, cf: bool, af: bool) {
    let others = if cf { flag::CF } else { 0 } | if af { flag::AF } else { 0 };
    c.s.flags.set_result(8, al, others);
}

pub(crate) fn daa(c: &mut Core, _op: &Op) -> Step {
    let old_al = c.s.gpr[0] & 0xff;
    let old_cf = c.s.flags.cf();
    let mut al = old_al;
    let mut cf = false;
    let af = (al & 0xf) > 9 || c.s.flags.af();
    if af {
        cf = old_cf || al + 6 > 0xff;
        al = (al + 6) & 0xff;
    }
    if old_al > 0x99 || old_cf {
        al = (al + 0x60) & 0xff;
        cf = true;
    }
    set_reg(c, Register::AL, al);
    szp(c, al, cf, af);
    Ok(())
}

pub(crate) fn das(c: &mut Core, _op: &Op) -> Step {
    let old_al = c.s.gpr[0] & 0xff;
    let old_cf = c.s.flags.cf();
    let mut al = old_al;
    let mut cf = false;
    let af = (al & 0xf) > 9 || c.s.flags.af();
    if af {
        cf = old_cf || al < 6;
        al = al.wrapping_sub(6) & 0xff;
    }
    if old_al > 0x99 || old_cf {
        al = al.wrapping_sub(0x60) & 0xff;
        cf = true;
    }
    set_reg(c, Register::AL, al);
    szp(c, al, cf, af);
    Ok(())
}

pub(crate) fn aaa(c: &mut Core, _op: &Op) -> Step {
    let ax = c.s.gpr[0] & 0xffff;
    let adjust = (ax & 0xf) > 9 || c.s.flags.af();
    let ax = if adjust { ax.wrapping_add(0x106) } else { ax };
    let ax = ax & 0xff0f;
    set_reg(c, Register::AX, ax);
    szp(c, ax & 0xff, adjust, adjust);
    Ok(())
}

pub(crate) fn aas(c: &mut Core, _op: &Op) -> Step {
    let ax = c.s.gpr[0] & 0xffff;
    let adjust = (ax & 0xf) > 9 || c.s.flags.af();
    // AX ← AX − 6 (AL borrows from AH), then AH ← AH − 1.
    let ax = if adjust { ax.wrapping_sub(6).wrapping_sub(0x100) & 0xffff } else { ax };
    let ax = ax & 0xff0f;
    set_reg(c, Register::AX, ax);
    szp(c, ax & 0xff, adjust, adjust);
    Ok(())
}

pub(crate) fn aam(c: &mut Core, op: &Op) -> Step {
    let base = u32::from(op.ins.immediate8());
    if base == 0 {
        return Err(de());
    }
    let al = c.s.gpr[0] & 0xff;
    let (ah, al) = (al / base, al % base);
    set_reg(c, Register::AX, (ah << 8) | al);
    szp(c, al, false, false);
    Ok(())
}

pub(crate) fn aad(c: &mut Core, op: &Op) -> Step {
    let base = u32::from(op.ins.immediate8());
    let ax = c.s.gpr[0];
    let al = ((ax & 0xff) + ((ax >> 8) & 0xff) * base) & 0xff;
    set_reg(c, Register::AX, al);
    szp(c, al, false, false);
    Ok(())
}

pub(crate) fn bound(c: &mut Core, op: &Op) -> Step {
    let size = op.size as usize;
    let r = get_reg(c, op.ins.op0_register());
    let off = ea(c, op);
    let lo = c.read_seg(op.seg as usize, off, size)? as u32;
    let hi = c.read_seg(op.seg as usize, off.wrapping_add(size as u32), size)? as u32;
    let (r, lo, hi) = if size == 2 {
        (i32::from(r as u16 as i16), i32::from(lo as u16 as i16), i32::from(hi as u16 as i16))
    } else {
        (r as i32, lo as i32, hi as i32)
    };
    if r < lo || r > hi {
        return Err(Event::exception(crate::interp::event::vector::BR, None));
    }
    Ok(())
}
