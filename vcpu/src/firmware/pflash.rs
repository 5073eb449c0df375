//! The CFI flash topos's board plugs with `--device pflash`, probed at its
//! fixed address [`PFLASH`]: the CFI query command (`0x98`) at the query
//! address, "QRY" and the geometry read back from the query table, then
//! read array (`0xFF`) and a check that the array shows again.
//!
//! The flash is x16 (the board's, like QEMU's `pflash_cfi01` with
//! `width=2`): a command is a 16-bit write, and byte `n` of the query table
//! is the low byte of the 16-bit unit at byte offset `2 n`.
//!
//! A write that switches the flash out of read array mode takes effect for
//! reads a little later on topos (the region leaves romd mode after the
//! write returns), so both switches are waited for with a timeout. Nothing
//! answers "QRY" where nothing decodes the address (QEMU's `pc`): the probe
//! times out and the part is skipped.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::PFLASH;
use super::transcript;

/// Bytes per unit (the flash's bus width).
pub(crate) const WIDTH: u32 = 2;
/// The unit CFI query commands are written to.
const QUERY_UNIT: u32 = 0x55;
/// CFI query command.
const CMD_QUERY: u32 = 0x98;
/// Read array command.
const CMD_READ_ARRAY: u32 = 0xff;
/// Query table: "QRY" at units 0x10..0x13.
const CFI_QRY: u32 = 0x10;
/// Query table: device size, 2^n bytes.
const CFI_SIZE_LOG2: u32 = 0x27;
/// Query table: blocks in the first erase block region, minus one (16 bits
/// over two units).
const CFI_BLOCKS: u32 = 0x2d;
/// Query table: block size of the first region, in 256-byte units (16 bits
/// over two units).
const CFI_BLOCK_SIZE: u32 = 0x2f;
/// How long each mode switch may take to show (µs).
const TIMEOUT_US: u32 = 100_000;

/// Byte offset of query table unit `n`.
const fn unit(n: u32) -> u32 {
    n * WIDTH
}

/// Reads the 16-bit value the query table holds at units `n` (low byte)
/// and `n + 1` (high byte) into `eax` (clobbers `edx`).
fn read_cfi16(a: &mut Asm, n: u32) -> Result<()> {
    a.movzx(eax, byte_ptr(ebp + unit(n)))?;
    a.movzx(edx, byte_ptr(ebp + unit(n + 1)))?;
    a.shl(edx, 8)?;
    a.or(eax, edx)?;
    Ok(())
}

/// Probes the flash and reports its geometry.
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let mut found = a.label();
    let mut no_qry = a.label();
    let mut bad_size = a.label();
    let mut geometry_ok = a.label();
    let mut array = a.label();
    let mut end = a.label();

    a.mov(ebp, PFLASH)?;
    // What read array mode shows where "QRY" will be: shown again after
    // the query.
    a.movzx(esi, word_ptr(ebp + unit(CFI_QRY)))?;
    a.mov(word_ptr(ebp + unit(QUERY_UNIT)), CMD_QUERY)?;
    a.wait_until(TIMEOUT_US, |a, met| {
        a.cmp(word_ptr(ebp + unit(CFI_QRY)), u32::from(b'Q'))?;
        a.je(met)?;
        Ok(())
    })?;
    a.jnc(found)?;
    // Nothing answered the query: whatever is there goes back to reading.
    a.mov(word_ptr(ebp), CMD_READ_ARRAY)?;
    a.print(&format!("{}\n", transcript::PFLASH_ABSENT))?;
    a.jmp(end)?;

    a.bind(&mut found)?;
    a.cmp(word_ptr(ebp + unit(CFI_QRY + 1)), u32::from(b'R'))?;
    a.jne(no_qry)?;
    a.cmp(word_ptr(ebp + unit(CFI_QRY + 2)), u32::from(b'Y'))?;
    a.jne(no_qry)?;
    // ecx: log2 of the size; ebx: blocks; edi: block size in bytes.
    a.movzx(ecx, byte_ptr(ebp + unit(CFI_SIZE_LOG2)))?;
    a.cmp(ecx, 10)?;
    a.jb(bad_size)?;
    a.cmp(ecx, 31)?;
    a.ja(bad_size)?;
    read_cfi16(a, CFI_BLOCKS)?;
    a.lea(ebx, dword_ptr(eax + 1))?;
    read_cfi16(a, CFI_BLOCK_SIZE)?;
    a.shl(eax, 8)?;
    a.mov(edi, eax)?;
    a.print(transcript::PFLASH_CFI)?;
    a.mov(eax, 1)?;
    a.shl(eax, cl)?;
    a.shr(eax, 10)?;
    a.print_eax_dec()?;
    a.print(&format!("{}, ", transcript::PFLASH_KIB))?;
    a.mov(eax, ebx)?;
    a.print_eax_dec()?;
    a.print(transcript::PFLASH_BLOCKS_OF)?;
    a.mov(eax, edi)?;
    a.shr(eax, 10)?;
    a.print_eax_dec()?;
    a.print(&format!("{}\n", transcript::PFLASH_KIB))?;
    // The erase blocks make up the whole device.
    a.mov(eax, ebx)?;
    a.mul(edi)?;
    a.test(edx, edx)?;
    a.jnz(bad_size)?;
    a.mov(edx, 1)?;
    a.shl(edx, cl)?;
    a.cmp(eax, edx)?;
    a.je(geometry_ok)?;
    a.bind(&mut bad_size)?;
    a.print("pflash: cfi geometry INCONSISTENT\n")?;
    a.fail()?;
    a.bind(&mut geometry_ok)?;
    a.jmp(array)?;

    a.bind(&mut no_qry)?;
    a.print("pflash: cfi query FAIL (no QRY)\n")?;
    a.fail()?;

    // Back to read array: the array shows again.
    a.bind(&mut array)?;
    a.mov(word_ptr(ebp), CMD_READ_ARRAY)?;
    a.wait_until(TIMEOUT_US, |a, met| {
        a.movzx(eax, word_ptr(ebp + unit(CFI_QRY)))?;
        a.cmp(eax, esi)?;
        a.je(met)?;
        Ok(())
    })?;
    let mut restored = a.label();
    a.jnc(restored)?;
    a.print("pflash: read array NOT restored\n")?;
    a.fail()?;
    a.jmp(end)?;
    a.bind(&mut restored)?;
    a.print(&format!("{}\n", transcript::PFLASH_READ_ARRAY_OK))?;
    a.bind(&mut end)?;
    Ok(())
}
