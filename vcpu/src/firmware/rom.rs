//! The BIOS ROM itself: the reset vector's 16 bytes read the same at
//! `0xfffffff0` and through the low alias at `0xffff0`, and writes to the
//! ROM (through either mapping) are dropped.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::{self, ROM_MARKER, ROM_MARKER_OFFSET};
use super::transcript;

/// The reset vector in the top mapping.
const RESET_VECTOR: u32 = 0xffff_fff0;
/// The reset vector in the low alias.
const RESET_VECTOR_LOW: u32 = 0x000f_fff0;

/// Compares the aliases, then writes to the ROM marker and reads it back.
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let high = layout::rom_addr(ROM_MARKER_OFFSET);
    let low = layout::rom_low_addr(ROM_MARKER_OFFSET);
    let mut marker_seen = a.label();
    let mut end = a.label();

    a.mov(esi, RESET_VECTOR)?;
    a.mov(edi, RESET_VECTOR_LOW)?;
    a.mov(ecx, 4)?;
    a.repe().cmpsd()?;
    a.verdict(transcript::ROM_ALIAS_OK, "rom: alias MISMATCH")?;

    a.cmp(dword_ptr(high), ROM_MARKER)?;
    a.je(marker_seen)?;
    a.print("rom: marker missing\n")?;
    a.fail()?;
    a.jmp(end)?;
    a.bind(&mut marker_seen)?;
    a.mov(dword_ptr(high), !ROM_MARKER)?;
    a.mov(dword_ptr(low), !ROM_MARKER)?;
    a.cmp(dword_ptr(high), ROM_MARKER)?;
    let mut high_kept = a.label();
    a.jne(high_kept)?;
    a.cmp(dword_ptr(low), ROM_MARKER)?;
    a.bind(&mut high_kept)?;
    a.verdict(transcript::ROM_WRITES_DROPPED, "rom: writes NOT dropped")?;
    a.bind(&mut end)?;
    Ok(())
}
