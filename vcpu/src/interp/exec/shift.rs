//! Shifts and rotates (`shl`/`shr`/`sar`, `rol`/`ror`/`rcl`/`rcr`,
//! `shld`/`shrd`), with the flags the CPU leaves.
//!
//! Flags the SDM leaves undefined (OF for counts above 1, AF) are
//! computed as the host CPU does ([`undefined`](crate::interp::undefined));
//! the differential test against KVM's ring-3 (native) execution checks
//! them.

use super::{mask, read_dst, read_op, read_op_sized, write_dst, Dst, Op};
use crate::interp::core::Core;
use crate::interp::event::Step;
use crate::interp::state::flag;
use crate::interp::undefined;

/// The shift count: CL or an immediate (1 for the short forms), masked to
/// five bits.
#[inline]
fn count(c: &mut Core, op: &Op, i: u32) -> Step<u32> {
    if op.ins.op_count() <= i {
        return Ok(1);
    }
    Ok(read_op_sized(c, op, i, 1)? & 0x1f)
}

/// Stores the result flags of a shift: SF, ZF, PF from `res`, CF and OF
/// given, AF as the host CPU leaves it (undefined: AMD sets it).
fn set_flags(c: &mut Core, size: u8, res: u32, cf: bool, of: bool) {
    let af = if undefined::SHIFT_AF { flag::AF } else { 0 };
    let others = af | if cf { flag::CF } else { 0 } | if of { flag::OF } else { 0 };
    c.s.flags.set_result(size * 8, res, others);
}

/// Stores CF and OF only (rotates).
fn set_cf_of(c: &mut Core, cf: bool, of: bool) {
    let v = if cf { flag::CF } else { 0 } | if of { flag::OF } else { 0 };
    c.s.flags.set_some(flag::CF | flag::OF, v);
}

/// The count, the destination's value, the width in bits and where the
/// result goes of a shift or rotate by CL or an immediate; `None` for a
/// count of zero (nothing changes, not even the flags).
#[inline]
fn operands(c: &mut Core, op: &Op) -> Step<Option<(u32, u32, u32, Dst)>> {
    let n = count(c, op, 1)?;
    // A memory destination is checked for writing before it is read (a
    // #PF says W), as for every read-modify-write.
    let (d, at) = read_dst(c, op)?;
    Ok((n != 0).then(|| (n, d & mask(op.size), u32::from(op.size) * 8, at)))
}

pub(crate) fn shl(c: &mut Core, op: &Op) -> Step {
    let Some((n, d, w, at)) = operands(c, op)? else { return Ok(()) };
    let m = mask(op.size);
    let wide = u64::from(d) << n;
    let res = (wide as u32) & m;
    let cf = (wide >> w) & 1 != 0;
    write_dst(c, op, at, res)?;
    let of = ((res >> (w - 1)) & 1 != 0) != cf;
    set_flags(c, op.size, res, cf, of);
    Ok(())
}

pub(crate) fn shr(c: &mut Core, op: &Op) -> Step {
    let Some((n, d, w, at)) = operands(c, op)? else { return Ok(()) };
    let res = if n >= 32 { 0 } else { d >> n };
    let cf = n <= w && (u64::from(d) >> (n - 1)) & 1 != 0;
    write_dst(c, op, at, res)?;
    // OF is defined for a count of 1 (the operand's sign); for larger
    // counts the CPUs compute it from the result's two top bits, which is
    // the same for a count of 1.
    let of = ((res >> (w - 1)) ^ (res >> (w - 2))) & 1 != 0;
    set_flags(c, op.size, res, cf, of);
    Ok(())
}

pub(crate) fn sar(c: &mut Core, op: &Op) -> Step {
    let Some((n, d, _, at)) = operands(c, op)? else { return Ok(()) };
    let sd = match op.size {
        1 => d as u8 as i8 as i64,
        2 => d as u16 as i16 as i64,
        _ => d as i32 as i64,
    };
    let res = (sd >> n.min(63)) as u32 & mask(op.size);
    let cf = (sd >> (n - 1).min(63)) & 1 != 0;
    write_dst(c, op, at, res)?;
    set_flags(c, op.size, res, cf, false);
    Ok(())
}

pub(crate) fn rol(c: &mut Core, op: &Op) -> Step {
    let Some((n, d, w, at)) = operands(c, op)? else { return Ok(()) };
    let r = n % w;
    let res = if r == 0 { d } else { ((d << r) | (d >> (w - r))) & mask(op.size) };
    write_dst(c, op, at, res)?;
    let cf = res & 1 != 0;
    let of = ((res >> (w - 1)) & 1 != 0) != cf;
    set_cf_of(c, cf, of);
    Ok(())
}

pub(crate) fn ror(c: &mut Core, op: &Op) -> Step {
    let Some((n, d, w, at)) = operands(c, op)? else { return Ok(()) };
    let r = n % w;
    let res = if r == 0 { d } else { ((d >> r) | (d << (w - r))) & mask(op.size) };
    write_dst(c, op, at, res)?;
    let msb = (res >> (w - 1)) & 1 != 0;
    let next = (res >> (w - 2)) & 1 != 0;
    set_cf_of(c, msb, msb != next);
    Ok(())
}

/// `rcl`/`rcr`: the operand and CF rotated as one value of width + 1 bits.
/// A count that is a multiple of that width rotates nothing but still sets
/// OF (as AMD CPUs do; OF is undefined for counts above 1): CF xor the
/// result's sign after `rcl`, the result's two top bits xored after `rcr`.
fn rotate_through_carry(c: &mut Core, op: &Op, left: bool) -> Step {
    let Some((n, d, w, at)) = operands(c, op)? else { return Ok(()) };
    let span = w + 1;
    let r = n % span;
    let full = (u64::from(c.s.flags.cf()) << w) | u64::from(d);
    let rotated = match (r, left) {
        (0, _) => full,
        (r, true) => ((full << r) | (full >> (span - r))) & ((1u64 << span) - 1),
        (r, false) => ((full >> r) | (full << (span - r))) & ((1u64 << span) - 1),
    };
    let res = (rotated as u32) & mask(op.size);
    let cf = (rotated >> w) & 1 != 0;
    write_dst(c, op, at, res)?;
    let msb = (res >> (w - 1)) & 1 != 0;
    let of = if left { msb != cf } else { msb != ((res >> (w - 2)) & 1 != 0) };
    set_cf_of(c, cf, of);
    Ok(())
}

pub(crate) fn rcl(c: &mut Core, op: &Op) -> Step {
    rotate_through_carry(c, op, true)
}

pub(crate) fn rcr(c: &mut Core, op: &Op) -> Step {
    rotate_through_carry(c, op, false)
}

/// `shld`/`shrd`: the destination shifted with bits coming in from the
/// source. For 16-bit operands with counts above 16 the result and CF are
/// undefined; the interpreter does what AMD CPUs do (measured on the host):
/// the source rotated by the count less 16, CF clear. OF (defined for a
/// count of 1) is CF xor the result's sign after `shld` (with two 16-bit
/// exceptions, below) and the result's two top bits xored after `shrd`.
fn double_shift(c: &mut Core, op: &Op, left: bool) -> Step {
    let n = count(c, op, 2)?;
    if n == 0 {
        return Ok(());
    }
    let (d, at) = read_dst(c, op)?;
    let d = d & mask(op.size);
    let s = read_op(c, op, 1)? & mask(op.size);
    let w = u32::from(op.size) * 8;
    let (res, cf) = if w == 32 {
        if left {
            let wide = (u64::from(d) << 32) | u64::from(s);
            ((wide << n >> 32) as u32, (u64::from(d) >> (32 - n)) & 1 != 0)
        } else {
            let wide = (u64::from(s) << 32) | u64::from(d);
            ((wide >> n) as u32, (u64::from(d) >> (n - 1)) & 1 != 0)
        }
    } else if n > 16 {
        let r = n - 16;
        let s16 = s as u16;
        let res = if left { s16.rotate_left(r) } else { s16.rotate_right(r) };
        (u32::from(res), false)
    } else if left {
        let wide = (d << 16) | s;
        let shifted = u64::from(wide) << n;
        (((shifted >> 16) & 0xffff) as u32, (shifted >> 32) & 1 != 0)
    } else {
        let wide = (s << 16) | d;
        ((wide >> n) & 0xffff, (wide >> (n - 1)) & 1 != 0)
    };
    write_dst(c, op, at, res)?;
    let msb = (res >> (w - 1)) & 1 != 0;
    let of = if left {
        match (w, n) {
            // AMD: clear for the 16-bit rotation of counts above 16, and
            // CF itself for 16.
            (16, 17..) => false,
            (16, 16) => cf,
            _ => msb != cf,
        }
    } else {
        msb != ((res >> (w - 2)) & 1 != 0)
    };
    set_flags(c, op.size, res, cf, of);
    Ok(())
}

pub(crate) fn shld(c: &mut Core, op: &Op) -> Step {
    double_shift(c, op, true)
}

pub(crate) fn shrd(c: &mut Core, op: &Op) -> Step {
    double_shift(c, op, false)
}
