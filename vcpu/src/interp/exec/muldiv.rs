//! `mul`, `imul` (one, two and three operands), `div`, `idiv`.
//!
//! After a multiply only CF and OF are defined, after a divide none; the
//! undefined ones are left as the host CPU leaves them
//! ([`undefined`](crate::interp::undefined); the differential test checks
//! them). A divide raises `#DE` for a zero divisor or a quotient that does
//! not fit.

use super::{mask, read_op, read_op_sized, set_reg, write_op, Op};
use crate::interp::core::Core;
use crate::interp::event::{de, Step};
use crate::interp::state::flag;
use crate::interp::undefined;
use iced_x86::Register;

fn set_mul_flags(c: &mut Core, size: u8, low: u32, overflow: bool) {
    let v = if overflow { flag::CF | flag::OF } else { 0 };
    if undefined::MUL_KEEPS_SZAP {
        c.s.flags.set_some(flag::CF | flag::OF, v);
    } else {
        c.s.flags.set_result(size * 8, low, v);
    }
}

/// The accumulator pair as one value (AX for bytes, DX:AX, EDX:EAX).
fn acc_wide(c: &Core, size: u8) -> u64 {
    match size {
        1 => u64::from(c.s.gpr[0] & 0xffff),
        2 => u64::from(c.s.gpr[0] & 0xffff) | (u64::from(c.s.gpr[2] & 0xffff) << 16),
        _ => u64::from(c.s.gpr[0]) | (u64::from(c.s.gpr[2]) << 32),
    }
}

/// Stores a double-width product or a quotient/remainder pair.
fn store_pair(c: &mut Core, size: u8, low: u32, high: u32) {
    match size {
        1 => set_reg(c, Register::AX, (low & 0xff) | ((high & 0xff) << 8)),
        2 => {
            set_reg(c, Register::AX, low);
            set_reg(c, Register::DX, high);
        }
        _ => {
            c.s.gpr[0] = low;
            c.s.gpr[2] = high;
        }
    }
}

pub(crate) fn mul(c: &mut Core, op: &Op) -> Step {
    let w = u32::from(op.size) * 8;
    let m = u64::from(mask(op.size));
    let src = u64::from(read_op(c, op, 0)?) & m;
    let a = u64::from(c.s.gpr[0]) & m;
    let p = a * src;
    let (low, high) = ((p & m) as u32, ((p >> w) & m) as u32);
    store_pair(c, op.size, low, high);
    set_mul_flags(c, op.size, low, high != 0);
    Ok(())
}

fn sext(v: u32, size: u8) -> i64 {
    match size {
        1 => i64::from(v as u8 as i8),
        2 => i64::from(v as u16 as i16),
        _ => i64::from(v as i32),
    }
}

pub(crate) fn imul(c: &mut Core, op: &Op) -> Step {
    let w = u32::from(op.size) * 8;
    let m = u64::from(mask(op.size));
    match op.ins.op_count() {
        1 => {
            let src = sext(read_op(c, op, 0)?, op.size);
            let a = sext(c.s.gpr[0], op.size);
            let p = a * src;
            let low = (p as u64 & m) as u32;
            let high = ((p as u64 >> w) & m) as u32;
            store_pair(c, op.size, low, high);
            set_mul_flags(c, op.size, low, sext(low, op.size) != p);
        }
        n => {
            let (x, y) = if n == 2 {
                (read_op(c, op, 0)?, read_op(c, op, 1)?)
            } else {
                (read_op(c, op, 1)?, read_op_sized(c, op, 2, op.size)?)
            };
            let p = sext(x, op.size) * sext(y, op.size);
            let low = (p as u64 & m) as u32;
            write_op(c, op, 0, low)?;
            set_mul_flags(c, op.size, low, sext(low, op.size) != p);
        }
    }
    Ok(())
}

pub(crate) fn div(c: &mut Core, op: &Op) -> Step {
    let m = u64::from(mask(op.size));
    let divisor = u64::from(read_op(c, op, 0)?) & m;
    if divisor == 0 {
        return Err(de());
    }
    let dividend = acc_wide(c, op.size);
    let q = dividend / divisor;
    let r = dividend % divisor;
    if q > m {
        return Err(de());
    }
    store_pair(c, op.size, q as u32, r as u32);
    set_div_flags(c);
    Ok(())
}

/// The flags a divide leaves (all undefined): as the host CPU does.
fn set_div_flags(c: &mut Core) {
    if undefined::DIV_AF_SET_SZP_CLEAR {
        c.s.flags.set_some(flag::AF | flag::SF | flag::ZF | flag::PF, flag::AF);
    }
}

pub(crate) fn idiv(c: &mut Core, op: &Op) -> Step {
    let w = u32::from(op.size) * 8;
    let divisor = sext(read_op(c, op, 0)?, op.size);
    if divisor == 0 {
        return Err(de());
    }
    let wide = acc_wide(c, op.size);
    let dividend: i128 = match op.size {
        1 => i128::from(wide as u16 as i16),
        2 => i128::from(wide as u32 as i32),
        _ => i128::from(wide as i64),
    };
    let q = dividend / i128::from(divisor);
    let r = dividend % i128::from(divisor);
    let (min, max) = (-(1i128 << (w - 1)), (1i128 << (w - 1)) - 1);
    if q < min || q > max {
        return Err(de());
    }
    store_pair(c, op.size, q as u32, r as u32);
    set_div_flags(c);
    Ok(())
}
