//! SMP bring-up. The BSP enables its local APIC, copies the AP trampoline
//! to [`layout::TRAMPOLINE`] and sends INIT, SIPI, SIPI to all but itself.
//! Each AP enters protected mode through the trampoline, takes a ticket
//! (`lock xadd`) that picks its stack and its slot in [`var::AP_IDS`],
//! records its APIC ID and checks in. The BSP waits, bounded, for the CPU
//! count fw_cfg gave, then prints the count and the sorted APIC IDs.
//!
//! After checking in, APs follow the BSP's [`var::PHASE`]: the counters,
//! then the remap readers, then they park with interrupts off.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::{self, var, LAPIC, MAX_APS};
use super::transcript;

/// APIC ID register.
const APIC_ID: u32 = 0x20;
/// Spurious-interrupt vector register.
const APIC_SVR: u32 = 0xf0;
/// SVR: APIC software enable plus spurious vector 0xff.
const SVR_ENABLE: u32 = 0x1ff;
/// Interrupt command register, low half.
const APIC_ICR_LOW: u32 = 0x300;
/// Interrupt command register, high half.
const APIC_ICR_HIGH: u32 = 0x310;
/// ICR: delivery status (send pending).
const ICR_PENDING: u32 = 1 << 12;
/// ICR: INIT, level assert, to all excluding self.
const ICR_INIT_ALL_BUT_SELF: u32 = 0x000c_4500;
/// ICR: start-up, level assert, to all excluding self (vector in bits 0..8).
const ICR_SIPI_ALL_BUT_SELF: u32 = 0x000c_4600;
/// How long the BSP waits for all APs (µs).
const CHECK_IN_TIMEOUT_US: u32 = 2_000_000;
/// How long the BSP waits for APs when fw_cfg gave no CPU count (µs).
const UNKNOWN_COUNT_WAIT_US: u32 = 100_000;

/// Waits for the ICR's delivery status to clear (bounded).
fn wait_icr_idle(a: &mut Asm) -> Result<()> {
    a.wait_until(10_000, |a, met| {
        a.test(dword_ptr(LAPIC + APIC_ICR_LOW), ICR_PENDING)?;
        a.jz(met)?;
        Ok(())
    })
}

/// Brings the APs up and prints the `smp:` line; sets [`var::CPUS_UP`].
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let mut single = a.label();
    let mut unknown = a.label();
    let mut counted = a.label();
    let mut candidate = a.label();
    let mut not_bsp = a.label();
    let mut slot = a.label();
    let mut next_slot = a.label();
    let mut next_candidate = a.label();
    let mut slots_clamped = a.label();
    let mut end = a.label();

    a.mov(eax, dword_ptr(LAPIC + APIC_SVR))?;
    a.or(eax, SVR_ENABLE)?;
    a.mov(dword_ptr(LAPIC + APIC_SVR), eax)?;
    a.mov(eax, dword_ptr(LAPIC + APIC_ID))?;
    a.shr(eax, 24)?;
    a.mov(dword_ptr(var::BSP_APIC_ID), eax)?;

    a.cmp(dword_ptr(var::NCPUS), 1)?;
    a.je(single)?;
    a.mov(esi, layout::rom_addr(layout::TRAMPOLINE_OFFSET))?;
    a.mov(edi, layout::TRAMPOLINE)?;
    a.mov(ecx, (layout::TRAMPOLINE_MAX / 4) as u32)?;
    a.rep().movsd()?;
    a.mov(dword_ptr(LAPIC + APIC_ICR_HIGH), 0)?;
    a.mov(dword_ptr(LAPIC + APIC_ICR_LOW), ICR_INIT_ALL_BUT_SELF)?;
    wait_icr_idle(a)?;
    a.delay(10_000)?;
    for _ in 0..2 {
        a.mov(dword_ptr(LAPIC + APIC_ICR_LOW), ICR_SIPI_ALL_BUT_SELF | layout::SIPI_VECTOR)?;
        wait_icr_idle(a)?;
        a.delay(200)?;
    }
    a.cmp(dword_ptr(var::NCPUS), 0)?;
    a.je(unknown)?;
    a.wait_until(CHECK_IN_TIMEOUT_US, |a, met| {
        a.mov(eax, dword_ptr(var::NCPUS))?;
        a.dec(eax)?;
        a.cmp(dword_ptr(var::AP_COUNT), eax)?;
        a.jae(met)?;
        Ok(())
    })?;
    a.jmp(counted)?;
    a.bind(&mut unknown)?;
    a.delay(UNKNOWN_COUNT_WAIT_US)?;
    a.bind(&mut single)?;
    a.bind(&mut counted)?;
    a.mov(eax, dword_ptr(var::AP_COUNT))?;
    a.inc(eax)?;
    a.mov(dword_ptr(var::CPUS_UP), eax)?;

    // "smp: N cpus up, apic ids a b c": candidates 0..=255 in order, each
    // printed once per CPU that has it.
    a.print(transcript::SMP)?;
    a.print_eax_dec()?;
    a.print(transcript::SMP_IDS)?;
    a.xor(ebx, ebx)?;
    a.bind(&mut candidate)?;
    a.cmp(ebx, dword_ptr(var::BSP_APIC_ID))?;
    a.jne(not_bsp)?;
    a.print(" ")?;
    a.mov(eax, ebx)?;
    a.print_eax_dec()?;
    a.bind(&mut not_bsp)?;
    a.mov(ecx, dword_ptr(var::AP_TICKET))?;
    a.cmp(ecx, MAX_APS)?;
    a.jbe(slots_clamped)?;
    a.mov(ecx, MAX_APS)?;
    a.bind(&mut slots_clamped)?;
    a.test(ecx, ecx)?;
    a.jz(next_candidate)?;
    a.mov(esi, var::AP_IDS)?;
    a.bind(&mut slot)?;
    a.cmp(ebx, dword_ptr(esi))?;
    a.jne(next_slot)?;
    a.print(" ")?;
    a.mov(eax, ebx)?;
    a.print_eax_dec()?;
    a.bind(&mut next_slot)?;
    a.add(esi, 4)?;
    a.dec(ecx)?;
    a.jnz(slot)?;
    a.bind(&mut next_candidate)?;
    a.inc(ebx)?;
    a.cmp(ebx, 256)?;
    a.jb(candidate)?;
    a.print("\n")?;

    a.cmp(dword_ptr(var::NCPUS), 0)?;
    a.je(end)?;
    a.mov(eax, dword_ptr(var::CPUS_UP))?;
    a.cmp(eax, dword_ptr(var::NCPUS))?;
    a.je(end)?;
    a.print("smp: FAIL, fw_cfg counts ")?;
    a.mov(eax, dword_ptr(var::NCPUS))?;
    a.print_eax_dec()?;
    a.print("\n")?;
    a.fail()?;
    a.bind(&mut end)?;
    Ok(())
}

/// The APs' protected-mode program.
pub(crate) fn emit_ap(a: &mut Asm) -> Result<()> {
    let mut park = a.label();
    let count_work = a.rt.count_work;
    let remap_reader = a.rt.remap_reader;
    a.bind_routine(|r| &mut r.ap_entry)?;
    a.load_flat_data_segments()?;
    a.cld()?;
    a.mov(eax, 1)?;
    a.lock().xadd(dword_ptr(var::AP_TICKET), eax)?;
    a.cmp(eax, MAX_APS)?;
    a.jae(park)?;
    a.mov(esp, eax)?;
    a.shl(esp, layout::AP_STACK_SHIFT)?;
    a.add(esp, layout::AP_STACKS + layout::AP_STACK_SIZE)?;
    a.mov(ebx, dword_ptr(LAPIC + APIC_ID))?;
    a.shr(ebx, 24)?;
    a.mov(dword_ptr(eax * 4 + var::AP_IDS), ebx)?;
    a.lock().inc(dword_ptr(var::AP_COUNT))?;

    a.spin_until_at_least(var::PHASE, 1)?;
    a.call(count_work)?;
    a.spin_until_at_least(var::PHASE, 2)?;
    a.call(remap_reader)?;
    a.lock().inc(dword_ptr(var::READERS_DONE))?;

    a.bind(&mut park)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(park)?;
    Ok(())
}
