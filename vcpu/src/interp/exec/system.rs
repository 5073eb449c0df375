//! System instructions: control and debug registers, descriptor-table
//! registers, `hlt`, `cli`/`sti`, port I/O with the protected-mode
//! permission checks, `cpuid`, `rdtsc`, MSRs.

use super::{ea, get_reg, read_op_sized, set_reg, vm86_iopl_check, write_op, Op};
use crate::interp::core::Core;
use crate::interp::event::{gp, ud, Event, Step};
use crate::interp::state::{attr, cr0, cr4, flag, Segment};
use iced_x86::{OpKind, Register};

/// `#GP(0)` unless CPL is 0 (real mode counts as 0).
#[inline]
fn privileged(c: &Core) -> Step {
    if c.prot() && c.s.cpl() != 0 || c.s.flags.base() & flag::VM != 0 {
        return Err(gp(0));
    }
    Ok(())
}

pub(crate) fn hlt(c: &mut Core, _op: &Op) -> Step {
    privileged(c)?;
    Err(Event::Halt)
}

/// Whether the CPU may change IF (`cli`, `sti`): CPL ≤ IOPL.
fn may_change_if(c: &Core) -> Step {
    if c.prot() && c.s.cpl() > c.s.iopl() {
        return Err(gp(0));
    }
    vm86_iopl_check(c)
}

pub(crate) fn cli(c: &mut Core, _op: &Op) -> Step {
    may_change_if(c)?;
    c.s.flags.set_bit(flag::IF, false);
    Ok(())
}

pub(crate) fn sti(c: &mut Core, _op: &Op) -> Step {
    may_change_if(c)?;
    if !c.interrupts_enabled() {
        // Interrupts stay off until the next instruction retires.
        c.shadow = true;
    }
    c.s.flags.set_bit(flag::IF, true);
    Ok(())
}

/// The protected-mode I/O permission check: with CPL > IOPL (or in
/// virtual-8086 mode) every port of the access must be allowed by the
/// TSS's I/O bitmap.
pub(crate) fn check_io(c: &mut Core, port: u16, size: usize) -> Step {
    let vm = c.s.flags.base() & flag::VM != 0;
    if !(vm || (c.prot() && c.s.cpl() > c.s.iopl())) {
        return Ok(());
    }
    let tr = c.s.tr;
    if !matches!(tr.attrs & 0xf, 0x9 | 0xb) || tr.limit < 0x67 {
        return Err(gp(0));
    }
    let map = c.read_sys(tr.base.wrapping_add(0x66), 2)? as u32;
    let byte = map + u32::from(port) / 8;
    if byte + 1 > tr.limit {
        return Err(gp(0));
    }
    let bits = c.read_sys(tr.base.wrapping_add(byte), 2)? as u32;
    let mask = ((1u32 << size) - 1) << (port % 8);
    if bits & mask != 0 {
        return Err(gp(0));
    }
    Ok(())
}

/// The port of `in`/`out`: an immediate or DX.
fn port(c: &Core, op: &Op, i: u32) -> u16 {
    match op.ins.op_kind(i) {
        OpKind::Immediate8 => u16::from(op.ins.immediate8()),
        _ => c.s.gpr[2] as u16,
    }
}

pub(crate) fn in_(c: &mut Core, op: &Op) -> Step {
    let size = op.size as usize;
    let p = port(c, op, 1);
    check_io(c, p, size)?;
    let v = c.port_in(p, size)?;
    set_reg(c, op.ins.op0_register(), v);
    Ok(())
}

pub(crate) fn out(c: &mut Core, op: &Op) -> Step {
    let size = op.size2 as usize;
    let p = port(c, op, 0);
    check_io(c, p, size)?;
    let v = get_reg(c, op.ins.op1_register());
    c.port_out(p, v, size)
}

pub(crate) fn cpuid(c: &mut Core, _op: &Op) -> Step {
    let has_apic = c.apic.as_ref().is_some_and(|a| a.base_msr() & (1 << 11) != 0);
    let cpus = c.cpus;
    let r = crate::interp::cpuid::cpuid(c.s.gpr[0], c.s.gpr[1], c.index, cpus, has_apic);
    c.s.gpr[0] = r[0];
    c.s.gpr[3] = r[1];
    c.s.gpr[1] = r[2];
    c.s.gpr[2] = r[3];
    Ok(())
}

pub(crate) fn rdtsc(c: &mut Core, _op: &Op) -> Step {
    if c.s.cr4 & cr4::TSD != 0 && c.prot() && c.s.cpl() != 0 {
        return Err(gp(0));
    }
    let t = c.tsc();
    c.s.gpr[0] = t as u32;
    c.s.gpr[2] = (t >> 32) as u32;
    Ok(())
}

/// IA32_TIME_STAMP_COUNTER.
const MSR_TSC: u32 = 0x10;
/// IA32_APIC_BASE.
const MSR_APIC_BASE: u32 = 0x1b;

pub(crate) fn rdmsr(c: &mut Core, _op: &Op) -> Step {
    privileged(c)?;
    let v = match c.s.gpr[1] {
        MSR_TSC => c.tsc(),
        MSR_APIC_BASE => match &c.apic {
            Some(a) => a.base_msr(),
            None => return Err(gp(0)),
        },
        msr => {
            tracing::debug!(cpu = c.index, msr = format_args!("{msr:#x}"), "rdmsr of an unmodelled MSR: #GP");
            return Err(gp(0));
        }
    };
    c.s.gpr[0] = v as u32;
    c.s.gpr[2] = (v >> 32) as u32;
    Ok(())
}

pub(crate) fn wrmsr(c: &mut Core, _op: &Op) -> Step {
    privileged(c)?;
    let v = u64::from(c.s.gpr[0]) | (u64::from(c.s.gpr[2]) << 32);
    match c.s.gpr[1] {
        MSR_TSC => {
            let now = c.tsc().wrapping_sub(c.tsc_offset);
            c.tsc_offset = v.wrapping_sub(now);
        }
        MSR_APIC_BASE => {
            let ok = match c.apic.as_mut() {
                Some(a) => a.set_base_msr(v),
                None => false,
            };
            if !ok {
                return Err(gp(0));
            }
            c.apic_moved();
        }
        msr => {
            tracing::debug!(cpu = c.index, msr = format_args!("{msr:#x}"), "wrmsr of an unmodelled MSR: #GP");
            return Err(gp(0));
        }
    }
    Ok(())
}

fn control_number(r: Register) -> Option<(bool, usize)> {
    let n = r as usize;
    if (Register::CR0 as usize..=Register::CR15 as usize).contains(&n) {
        Some((true, n - Register::CR0 as usize))
    } else if (Register::DR0 as usize..=Register::DR15 as usize).contains(&n) {
        Some((false, n - Register::DR0 as usize))
    } else {
        None
    }
}

/// Writes CR0 with the architectural checks; flushes what depends on it.
pub(crate) fn write_cr0(c: &mut Core, v: u32) -> Step {
    if v & cr0::PG != 0 && v & cr0::PE == 0 || v & cr0::NW != 0 && v & cr0::CD == 0 {
        return Err(gp(0));
    }
    let old = c.s.cr0;
    c.s.cr0 = v | cr0::ET;
    if (old ^ c.s.cr0) & (cr0::PG | cr0::PE | cr0::WP) != 0 {
        c.flush_tlb();
    }
    c.mode_changed();
    Ok(())
}

fn debug_index(c: &Core, n: usize) -> Step<usize> {
    match n {
        0..=3 | 6 | 7 => Ok(n),
        4 | 5 if c.s.cr4 & cr4::DE == 0 => Ok(n + 2),
        _ => Err(ud()),
    }
}

pub(crate) fn mov_to_control(c: &mut Core, op: &Op) -> Step {
    privileged(c)?;
    let Some((is_cr, n)) = control_number(op.ins.op0_register()) else { return Err(ud()) };
    let v = get_reg(c, op.ins.op1_register());
    if !is_cr {
        let i = debug_index(c, n)?;
        c.s.dr[i] = v;
        return Ok(());
    }
    match n {
        0 => write_cr0(c, v)?,
        2 => c.s.cr2 = v,
        3 => {
            c.s.cr3 = v;
            c.flush_tlb();
        }
        4 => {
            if v & !cr4::SUPPORTED != 0 {
                return Err(gp(0));
            }
            c.s.cr4 = v;
            c.flush_tlb();
        }
        _ => return Err(ud()),
    }
    Ok(())
}

pub(crate) fn mov_from_control(c: &mut Core, op: &Op) -> Step {
    privileged(c)?;
    let Some((is_cr, n)) = control_number(op.ins.op1_register()) else { return Err(ud()) };
    let v = if is_cr {
        match n {
            0 => c.s.cr0,
            2 => c.s.cr2,
            3 => c.s.cr3,
            4 => c.s.cr4,
            _ => return Err(ud()),
        }
    } else {
        c.s.dr[debug_index(c, n)?]
    };
    set_reg(c, op.ins.op0_register(), v);
    Ok(())
}

/// Reads the `m16&32` operand of `lgdt`/`lidt`: (limit, base).
fn read_table_operand(c: &mut Core, op: &Op) -> Step<(u16, u32)> {
    let off = ea(c, op);
    let limit = c.read_seg(op.seg as usize, off, 2)? as u16;
    let base = c.read_seg(op.seg as usize, off.wrapping_add(2), 4)? as u32;
    // A 16-bit operand size loads 24 bits of base.
    let base = if matches!(op.ins.code(), iced_x86::Code::Lgdt_m1632_16 | iced_x86::Code::Lidt_m1632_16) {
        base & 0x00ff_ffff
    } else {
        base
    };
    Ok((limit, base))
}

pub(crate) fn lgdt(c: &mut Core, op: &Op) -> Step {
    privileged(c)?;
    let (limit, base) = read_table_operand(c, op)?;
    c.s.gdtr.limit = limit;
    c.s.gdtr.base = base;
    Ok(())
}

pub(crate) fn lidt(c: &mut Core, op: &Op) -> Step {
    privileged(c)?;
    let (limit, base) = read_table_operand(c, op)?;
    c.s.idtr.limit = limit;
    c.s.idtr.base = base;
    Ok(())
}

fn store_table(c: &mut Core, op: &Op, limit: u16, base: u32) -> Step {
    let off = ea(c, op);
    let base = if matches!(op.ins.code(), iced_x86::Code::Sgdt_m1632_16 | iced_x86::Code::Sidt_m1632_16) {
        base & 0x00ff_ffff
    } else {
        base
    };
    // Both parts are checked before either is written.
    c.seg_addr(op.seg as usize, off, 6, true)?;
    c.write_seg(op.seg as usize, off, u64::from(limit), 2)?;
    c.write_seg(op.seg as usize, off.wrapping_add(2), u64::from(base), 4)
}

pub(crate) fn sgdt(c: &mut Core, op: &Op) -> Step {
    let (l, b) = (c.s.gdtr.limit, c.s.gdtr.base);
    store_table(c, op, l, b)
}

pub(crate) fn sidt(c: &mut Core, op: &Op) -> Step {
    let (l, b) = (c.s.idtr.limit, c.s.idtr.base);
    store_table(c, op, l, b)
}

/// A system descriptor from the GDT for `lldt`/`ltr` (`#GP(sel)` if it
/// is in the LDT or beyond the GDT).
fn gdt_system_descriptor(c: &mut Core, sel: u16) -> Step<u64> {
    if sel & 4 != 0 {
        return Err(gp(u32::from(sel & 0xfffc)));
    }
    c.read_descriptor(sel, gp)
}

pub(crate) fn lldt(c: &mut Core, op: &Op) -> Step {
    if !c.prot() {
        return Err(ud());
    }
    privileged(c)?;
    let sel = read_op_sized(c, op, 0, 2)? as u16;
    if sel & !3 == 0 {
        c.s.ldtr = Segment { selector: sel, base: 0, limit: 0, attrs: 0 };
        return Ok(());
    }
    let desc = gdt_system_descriptor(c, sel)?;
    let s = Segment::from_descriptor(sel, desc);
    if s.attrs & (attr::S | 0xf) != 0x2 {
        return Err(gp(u32::from(sel & 0xfffc)));
    }
    if s.attrs & attr::P == 0 {
        return Err(crate::interp::event::np(u32::from(sel & 0xfffc)));
    }
    c.s.ldtr = s;
    Ok(())
}

pub(crate) fn ltr(c: &mut Core, op: &Op) -> Step {
    if !c.prot() {
        return Err(ud());
    }
    privileged(c)?;
    let sel = read_op_sized(c, op, 0, 2)? as u16;
    if sel & !3 == 0 {
        return Err(gp(0));
    }
    let desc = gdt_system_descriptor(c, sel)?;
    let s = Segment::from_descriptor(sel, desc);
    // An available TSS (16- or 32-bit).
    if !matches!(s.attrs & (attr::S | 0xf), 0x1 | 0x9) {
        return Err(gp(u32::from(sel & 0xfffc)));
    }
    if s.attrs & attr::P == 0 {
        return Err(crate::interp::event::np(u32::from(sel & 0xfffc)));
    }
    // Mark it busy in the GDT.
    if let Some(la) = c.descriptor_addr(sel) {
        let byte = ((desc >> 40) as u8) | 2;
        c.write_sys(la.wrapping_add(5), u64::from(byte), 1)?;
    }
    c.s.tr = Segment { attrs: s.attrs | 2, ..s };
    Ok(())
}

/// `sldt` (and `str`, below) store 16 bits to memory (the memory forms'
/// operand size) and zero-extend into a register.
pub(crate) fn sldt(c: &mut Core, op: &Op) -> Step {
    if !c.prot() {
        return Err(ud());
    }
    let sel = c.s.ldtr.selector;
    write_op(c, op, 0, u32::from(sel))
}

pub(crate) fn str_(c: &mut Core, op: &Op) -> Step {
    if !c.prot() {
        return Err(ud());
    }
    let sel = c.s.tr.selector;
    write_op(c, op, 0, u32::from(sel))
}

pub(crate) fn lmsw(c: &mut Core, op: &Op) -> Step {
    privileged(c)?;
    let v = read_op_sized(c, op, 0, 2)?;
    // Loads MP, EM, TS and PE; PE cannot be cleared this way.
    let new = (c.s.cr0 & !0xe) | (v & 0xf) | (c.s.cr0 & cr0::PE);
    write_cr0(c, new)
}

pub(crate) fn smsw(c: &mut Core, op: &Op) -> Step {
    let v = c.s.cr0;
    if op.ins.op0_kind() == OpKind::Memory {
        let off = ea(c, op);
        c.write_seg(op.seg as usize, off, u64::from(v & 0xffff), 2)
    } else {
        write_op(c, op, 0, v)
    }
}

pub(crate) fn clts(c: &mut Core, _op: &Op) -> Step {
    privileged(c)?;
    c.s.cr0 &= !cr0::TS;
    Ok(())
}

pub(crate) fn invlpg(c: &mut Core, op: &Op) -> Step {
    privileged(c)?;
    let off = ea(c, op);
    let la = c.s.seg[op.seg as usize].base.wrapping_add(off);
    c.flush_page(la);
    Ok(())
}

/// The descriptor `lar`/`lsl`/`verr`/`verw` look at: `#UD` outside
/// protected mode, else the descriptor of the selector in operand `i`, if
/// it is visible at the current privilege (else `None`: ZF cleared).
fn visible_descriptor(c: &mut Core, op: &Op, i: u32) -> Step<Option<Segment>> {
    if !c.prot() {
        return Err(ud());
    }
    let sel = read_op_sized(c, op, i, 2)? as u16;
    if sel & !3 == 0 || c.descriptor_addr(sel).is_none() {
        return Ok(None);
    }
    let desc = c.read_descriptor(sel, gp)?;
    let s = Segment::from_descriptor(sel, desc);
    let conforming_code = s.attrs & (attr::S | attr::CODE | attr::DC) == (attr::S | attr::CODE | attr::DC);
    let (cpl, rpl) = (c.s.cpl(), (sel & 3) as u8);
    if !conforming_code && (s.dpl() < cpl || s.dpl() < rpl) {
        return Ok(None);
    }
    Ok(Some(s))
}

fn set_zf(c: &mut Core, on: bool) {
    c.s.flags.set_some(flag::ZF, if on { flag::ZF } else { 0 });
}

pub(crate) fn lar(c: &mut Core, op: &Op) -> Step {
    let s = visible_descriptor(c, op, 1)?;
    // System types lar accepts: TSSs, LDT, call and task gates.
    let ok = s.filter(|s| s.attrs & attr::S != 0 || matches!(s.attrs & 0xf, 1..=5 | 9 | 0xb | 0xc));
    if let Some(s) = ok {
        let desc_hi = (u32::from(s.attrs & 0xff) << 8) | (u32::from(s.attrs & 0xf000) << 8);
        set_reg(c, op.ins.op0_register(), desc_hi & if op.size == 2 { 0xff00 } else { 0x00ff_ff00 });
    }
    set_zf(c, ok.is_some());
    Ok(())
}

pub(crate) fn lsl(c: &mut Core, op: &Op) -> Step {
    let s = visible_descriptor(c, op, 1)?;
    let ok = s.filter(|s| s.attrs & attr::S != 0 || matches!(s.attrs & 0xf, 1..=3 | 9 | 0xb));
    if let Some(s) = ok {
        set_reg(c, op.ins.op0_register(), s.limit);
    }
    set_zf(c, ok.is_some());
    Ok(())
}

pub(crate) fn verr(c: &mut Core, op: &Op) -> Step {
    let s = visible_descriptor(c, op, 0)?;
    let ok = s.is_some_and(|s| s.attrs & attr::S != 0 && (s.attrs & attr::CODE == 0 || s.attrs & attr::RW != 0));
    set_zf(c, ok);
    Ok(())
}

pub(crate) fn verw(c: &mut Core, op: &Op) -> Step {
    let s = visible_descriptor(c, op, 0)?;
    let ok = s.is_some_and(|s| s.attrs & attr::S != 0 && s.attrs & attr::CODE == 0 && s.attrs & attr::RW != 0);
    set_zf(c, ok);
    Ok(())
}

pub(crate) fn arpl(c: &mut Core, op: &Op) -> Step {
    if !c.prot() {
        return Err(ud());
    }
    let d = read_op_sized(c, op, 0, 2)?;
    let s = get_reg(c, op.ins.op1_register());
    if d & 3 < s & 3 {
        write_op(c, op, 0, (d & !3) | (s & 3))?;
        set_zf(c, true);
    } else {
        set_zf(c, false);
    }
    Ok(())
}

pub(crate) fn fwait(c: &mut Core, _op: &Op) -> Step {
    if c.s.cr0 & (cr0::MP | cr0::TS) == (cr0::MP | cr0::TS) {
        return Err(Event::exception(crate::interp::event::vector::NM, None));
    }
    Ok(())
}
