//! Assembling small guest harnesses (BIOS images the tests build): far
//! jumps, and a closure's code at a fixed address.

use iced_x86::code_asm::CodeAssembler;
use iced_x86::{Code, IcedError, Instruction};

/// A far jump to `selector:offset` (16- or 32-bit offset).
pub fn jmp_far(a: &mut CodeAssembler, selector: u16, offset: u32, bits32: bool) -> Result<(), IcedError> {
    let code = if bits32 { Code::Jmp_ptr1632 } else { Code::Jmp_ptr1616 };
    a.add_instruction(Instruction::with_far_branch(code, selector, offset)?)
}

/// Assembles `f`'s code for `bitness` at `ip`.
pub fn asm(bitness: u32, ip: u32, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).expect("an assembler");
    f(&mut a).expect("the harness assembles");
    a.assemble(u64::from(ip)).expect("the harness assembles")
}
