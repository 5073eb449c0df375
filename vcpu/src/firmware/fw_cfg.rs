//! QEMU's firmware configuration device, legacy I/O interface: a 16-bit
//! write of a key to the selector port, then the item's bytes one at a time
//! from the 8-bit data port. Keys as in QEMU's `docs/specs/fw_cfg.rst`.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::{var, FW_CFG_DATA, FW_CFG_SELECTOR};
use super::transcript;

/// `FW_CFG_SIGNATURE`: the four bytes "QEMU".
const KEY_SIGNATURE: u32 = 0x0000;
/// `FW_CFG_RAM_SIZE`: 64-bit little-endian byte count.
const KEY_RAM_SIZE: u32 = 0x0003;
/// `FW_CFG_NB_CPUS`: 16-bit little-endian CPU count.
const KEY_NB_CPUS: u32 = 0x0005;
/// The signature as a little-endian dword.
const SIGNATURE: u32 = u32::from_le_bytes(*b"QEMU");

/// Selects `key` (clobbers `eax`, `edx`).
fn select(a: &mut Asm, key: u32) -> Result<()> {
    a.mov(dx, u32::from(FW_CFG_SELECTOR))?;
    a.mov(eax, key)?;
    a.out(dx, ax)?;
    Ok(())
}

/// Reads the next `n` (1..=4) bytes of the selected item into `eax`, little
/// endian (clobbers `edx`).
fn read(a: &mut Asm, n: u32) -> Result<()> {
    a.mov(dx, u32::from(FW_CFG_DATA))?;
    a.xor(eax, eax)?;
    for _ in 0..n {
        // The low byte is always zero here, so `in al` fills it, and the
        // rotation moves it up: after four rounds byte 0 is in bits 0..8.
        a.in_(al, dx)?;
        a.ror(eax, 8)?;
    }
    if n < 4 {
        a.shr(eax, 8 * (4 - n))?;
    }
    Ok(())
}

/// Jumps to `absent` unless the signature reads "QEMU" (clobbers `eax`,
/// `edx`).
pub(crate) fn emit_check_signature(a: &mut Asm, absent: CodeLabel) -> Result<()> {
    select(a, KEY_SIGNATURE)?;
    read(a, 4)?;
    a.cmp(eax, SIGNATURE)?;
    a.jne(absent)?;
    Ok(())
}

/// Reads the CPU count into `eax` and prints the CPU-count line (clobbers
/// `edx`).
pub(crate) fn emit_cpus(a: &mut Asm) -> Result<()> {
    select(a, KEY_NB_CPUS)?;
    read(a, 2)?;
    a.print(transcript::CPUS)?;
    a.print_eax_dec()?;
    a.print("\n")?;
    Ok(())
}

/// Checks the signature and prints the CPU count and RAM size; stores the
/// CPU count in [`var::NCPUS`] (left 0 without fw_cfg).
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let mut absent = a.label();
    let mut end = a.label();
    emit_check_signature(a, absent)?;
    a.print(&format!("{}\n", transcript::FW_CFG_SIGNATURE))?;

    emit_cpus(a)?;
    a.mov(dword_ptr(var::NCPUS), eax)?;

    select(a, KEY_RAM_SIZE)?;
    read(a, 4)?;
    a.mov(ebx, eax)?;
    read(a, 4)?;
    // MiB = the 64-bit size >> 20, which fits 32 bits below 4 PiB.
    a.shrd(ebx, eax, 20)?;
    a.mov(eax, ebx)?;
    a.print(transcript::RAM)?;
    a.print_eax_dec()?;
    a.print(&format!("{}\n", transcript::RAM_UNIT))?;
    a.jmp(end)?;

    a.bind(&mut absent)?;
    a.print(&format!("{}\n", transcript::FW_CFG_ABSENT))?;
    a.bind(&mut end)?;
    Ok(())
}
