//! Timeouts on the local APIC timer. QEMU (TCG) and KVM both clock it at
//! 1 GHz before the divider; with divide-by-128 it counts 7.8125 ticks per
//! microsecond, so a one-shot count of `8 × µs` times out a little late,
//! never early. The LVT entry stays masked: the firmware polls the current
//! count and takes no interrupts.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::LAPIC;

/// LVT timer register.
pub(crate) const TIMER_LVT: u32 = 0x320;
/// Initial count register.
pub(crate) const TIMER_INITIAL: u32 = 0x380;
/// Current count register.
pub(crate) const TIMER_CURRENT: u32 = 0x390;
/// Divide configuration register.
pub(crate) const TIMER_DIVIDE: u32 = 0x3e0;
/// Divide configuration value for divide-by-128.
const DIVIDE_BY_128: u32 = 0b1010;
/// LVT value: masked, one-shot, vector 0xff.
const LVT_MASKED_ONE_SHOT: u32 = 0x0001_00ff;

/// Emits `timer_start`: arm the timer for `eax` microseconds.
pub(crate) fn emit_routines(a: &mut Asm) -> Result<()> {
    a.bind_routine(|r| &mut r.timer_start)?;
    a.push(eax)?;
    a.mov(dword_ptr(LAPIC + TIMER_DIVIDE), DIVIDE_BY_128)?;
    a.mov(dword_ptr(LAPIC + TIMER_LVT), LVT_MASKED_ONE_SHOT)?;
    a.shl(eax, 3)?;
    a.mov(dword_ptr(LAPIC + TIMER_INITIAL), eax)?;
    a.pop(eax)?;
    a.ret()?;
    Ok(())
}
