//! The verdict: `result: pass` or `result: fail`, then a write to QEMU's
//! `isa-debug-exit` port. QEMU exits with status `(v << 1) | 1` for a
//! written value `v`, so [`EXIT_PASS`] (0) gives status
//! [`QEMU_STATUS_PASS`] (1) and [`EXIT_FAIL`] (1) gives
//! [`QEMU_STATUS_FAIL`] (3). Without the device the write is dropped and the
//! BSP halts.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::DEBUG_EXIT;
use super::transcript;

/// Value written to the debug-exit port when every check passed.
pub const EXIT_PASS: u32 = 0;
/// Value written to the debug-exit port when a check failed.
pub const EXIT_FAIL: u32 = 1;
/// QEMU's exit status after [`EXIT_PASS`].
pub const QEMU_STATUS_PASS: i32 = ((EXIT_PASS << 1) | 1) as i32;
/// QEMU's exit status after [`EXIT_FAIL`].
pub const QEMU_STATUS_FAIL: i32 = ((EXIT_FAIL << 1) | 1) as i32;

/// Prints the result line (from the failure count [`Asm::fail`] keeps),
/// writes the debug-exit port and halts.
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let mut failed = a.label();
    let mut write = a.label();
    let mut halt = a.label();
    let failures = a.failures();
    a.cmp(dword_ptr(failures), 0)?;
    a.jne(failed)?;
    a.print(&format!("{}\n", transcript::RESULT_PASS))?;
    a.mov(eax, EXIT_PASS)?;
    a.jmp(write)?;
    a.bind(&mut failed)?;
    a.print(&format!("{}\n", transcript::RESULT_FAIL))?;
    a.mov(eax, EXIT_FAIL)?;
    a.bind(&mut write)?;
    a.out(DEBUG_EXIT as u32, eax)?;
    a.bind(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)?;
    Ok(())
}
