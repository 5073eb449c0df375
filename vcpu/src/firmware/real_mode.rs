//! The 16-bit code: the reset vector, the BSP's real-mode entry and the AP
//! trampoline. Both entries write nothing to ROM: the GDT is built in RAM
//! by immediate stores (and its descriptors have the Accessed bit set), so
//! neither loading it nor loading selectors makes the CPU write ROM.

use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction, MemoryOperand, Register};

use super::error::Result;
use super::layout::{self, CODE32, GDT, GDTR, GDT_ENTRIES};

/// CR0 bits cleared on the way to protected mode: CD and NW (caching on).
const CR0_CD_NW: u32 = 0x6000_0000;
/// CR0.PE.
const CR0_PE: u32 = 1;

/// The reset vector: `jmp far f000:0000` (16 bytes, padded with `hlt`).
pub(crate) fn reset_vector() -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(16)?;
    a.add_instruction(Instruction::with_far_branch(Code::Jmp_ptr1616, layout::REAL_MODE_SEGMENT, 0)?)?;
    a.cli()?;
    a.hlt()?;
    Ok(a.assemble(u64::from(layout::RESET_VECTOR_OFFSET as u32 & 0xffff))?)
}

/// Emits `lgdt [GDTR]`, sets CR0.PE (clearing CD/NW) and far-jumps to
/// `CODE32:entry`. Expects DS = 0.
fn enter_protected_mode(a: &mut CodeAssembler, entry: u32) -> Result<()> {
    // o32 lgdt: load all 32 bits of the base (DS-relative, 16-bit address).
    let gdtr = MemoryOperand::with_base_displ_size(Register::None, i64::from(GDTR), 2);
    a.add_instruction(Instruction::with1(Code::Lgdt_m1632, gdtr)?)?;
    a.mov(eax, cr0)?;
    a.and(eax, !CR0_CD_NW)?;
    a.or(eax, CR0_PE)?;
    a.mov(cr0, eax)?;
    a.add_instruction(Instruction::with_far_branch(Code::Jmp_ptr1632, CODE32, entry)?)?;
    Ok(())
}

/// The BSP's real-mode entry, run at `f000:0000`: builds the GDT in RAM and
/// enters protected mode at `bsp_entry`.
pub(crate) fn bsp_entry(bsp_entry: u32) -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.cld()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, layout::BSP_STACK_TOP)?;
    for (i, entry) in GDT_ENTRIES.iter().enumerate() {
        let at = GDT + 8 * i as u32;
        a.mov(dword_ptr(at), *entry as u32)?;
        a.mov(dword_ptr(at + 4), (*entry >> 32) as u32)?;
    }
    a.mov(word_ptr(GDTR), (8 * GDT_ENTRIES.len() - 1) as u32)?;
    a.mov(dword_ptr(GDTR + 2), GDT)?;
    enter_protected_mode(&mut a, bsp_entry)?;
    Ok(a.assemble(0)?)
}

/// The AP trampoline, run at `0800:0000` after the BSP copies it to
/// [`layout::TRAMPOLINE`]: loads the BSP's GDT and enters protected mode at
/// `ap_entry`.
pub(crate) fn ap_trampoline(ap_entry: u32) -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.cld()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    enter_protected_mode(&mut a, ap_entry)?;
    Ok(a.assemble(0)?)
}
