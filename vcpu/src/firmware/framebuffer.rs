//! The linear framebuffer topos's board plugs with `--device framebuffer`
//! (registers at [`FRAMEBUFFER_REGS`], video RAM at [`FRAMEBUFFER_VRAM`]):
//! detected through its video RAM size and format registers, set to
//! [`MODE_WIDTH`] × [`MODE_HEIGHT`] at [`MODE_BYTES_PER_PIXEL`] bytes per
//! pixel with a stride of one page ([`MODE_STRIDE`]), then scanlines
//! [`DRAWN_LINES`] are filled and read back.
//!
//! Which scanlines are dirty is something the device tells its display
//! (`Framebuffer::update` on the host), not the guest: the firmware prints
//! the scanlines it drew, and a host-side test checks that exactly those
//! are reported. With a stride of one page, page-granular dirty tracking
//! reports exactly the scanlines written, not their neighbours.
//!
//! Where nothing decodes the registers (QEMU's `pc`) the video RAM size
//! reads 0 and the part is skipped.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::{FRAMEBUFFER_REGS, FRAMEBUFFER_VRAM};
use super::transcript;

/// Register: width in pixels.
const REG_WIDTH: u32 = 0x00;
/// Register: height in scanlines.
const REG_HEIGHT: u32 = 0x04;
/// Register: stride in bytes.
const REG_STRIDE: u32 = 0x08;
/// Register: bytes per pixel (1 to 4).
const REG_FORMAT: u32 = 0x0c;
/// Register: video RAM size in bytes (read-only).
const REG_VRAM_SIZE: u32 = 0x10;
/// Register: bit 0 set while the mode is valid (read-only).
const REG_STATUS: u32 = 0x14;
/// The smallest video RAM the firmware believes in.
const VRAM_MIN: u32 = 1 << 20;

/// Width of the mode the firmware sets.
pub const MODE_WIDTH: u32 = 1024;
/// Height of the mode the firmware sets.
pub const MODE_HEIGHT: u32 = 768;
/// Bytes per pixel of the mode the firmware sets.
pub const MODE_BYTES_PER_PIXEL: u32 = 4;
/// Stride of the mode the firmware sets: one 4 KiB page per scanline.
pub const MODE_STRIDE: u32 = 4096;
/// The scanlines the firmware draws, in order.
pub const DRAWN_LINES: [u32; 3] = [10, 20, 30];

/// The colour scanline `y` is filled with.
pub const fn line_colour(y: u32) -> u32 {
    0x0040_8000 | y
}

/// Detects the framebuffer, sets the mode, draws and checks the scanlines.
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let mut present = a.label();
    let mut implausible = a.label();
    let mut too_small = a.label();
    let mut rejected = a.label();
    let mut bad_pixels = a.label();
    let mut end = a.label();
    let mode_kib = MODE_STRIDE * MODE_HEIGHT / 1024;

    a.mov(ebp, FRAMEBUFFER_REGS)?;
    a.mov(eax, dword_ptr(ebp + REG_VRAM_SIZE))?;
    a.test(eax, eax)?;
    a.jnz(present)?;
    a.print(&format!("{}\n", transcript::FRAMEBUFFER_ABSENT))?;
    a.jmp(end)?;

    // Plausible registers: a power-of-two video RAM of at least VRAM_MIN,
    // a format of 1 to 4 bytes per pixel.
    a.bind(&mut present)?;
    a.lea(ecx, dword_ptr(eax - 1))?;
    a.test(ecx, eax)?;
    a.jnz(implausible)?;
    a.cmp(eax, VRAM_MIN)?;
    a.jb(implausible)?;
    a.mov(ecx, dword_ptr(ebp + REG_FORMAT))?;
    a.dec(ecx)?;
    a.cmp(ecx, 3)?;
    a.ja(implausible)?;
    a.shr(eax, 10)?;
    a.print(transcript::FRAMEBUFFER_VRAM)?;
    a.print_eax_dec()?;
    a.print(&format!("{}\n", transcript::FRAMEBUFFER_KIB))?;
    a.cmp(eax, mode_kib)?;
    a.jb(too_small)?;

    a.mov(dword_ptr(ebp + REG_WIDTH), MODE_WIDTH)?;
    a.mov(dword_ptr(ebp + REG_HEIGHT), MODE_HEIGHT)?;
    a.mov(dword_ptr(ebp + REG_STRIDE), MODE_STRIDE)?;
    a.mov(dword_ptr(ebp + REG_FORMAT), MODE_BYTES_PER_PIXEL)?;
    a.test(dword_ptr(ebp + REG_STATUS), 1)?;
    a.jz(rejected)?;
    a.print(&format!("{}\n", transcript::framebuffer_mode()))?;

    for y in DRAWN_LINES {
        a.mov(edi, FRAMEBUFFER_VRAM + y * MODE_STRIDE)?;
        a.mov(ecx, MODE_WIDTH * MODE_BYTES_PER_PIXEL / 4)?;
        a.mov(eax, line_colour(y))?;
        a.rep().stosd()?;
    }
    // The first and the last pixel of each line read back.
    for y in DRAWN_LINES {
        let line = FRAMEBUFFER_VRAM + y * MODE_STRIDE;
        a.cmp(dword_ptr(line), line_colour(y))?;
        a.jne(bad_pixels)?;
        a.cmp(dword_ptr(line + MODE_WIDTH * MODE_BYTES_PER_PIXEL - 4), line_colour(y))?;
        a.jne(bad_pixels)?;
    }
    a.print(&format!("{}\n", transcript::framebuffer_drew()))?;
    a.jmp(end)?;

    a.bind(&mut implausible)?;
    a.print("framebuffer: registers IMPLAUSIBLE\n")?;
    a.fail()?;
    a.jmp(end)?;
    a.bind(&mut too_small)?;
    a.print(&format!("framebuffer: video RAM too SMALL for {MODE_WIDTH}x{MODE_HEIGHT}\n"))?;
    a.fail()?;
    a.jmp(end)?;
    a.bind(&mut rejected)?;
    a.print(&format!("framebuffer: mode {MODE_WIDTH}x{MODE_HEIGHT} REJECTED\n"))?;
    a.fail()?;
    a.jmp(end)?;
    a.bind(&mut bad_pixels)?;
    a.print("framebuffer: drawn pixels read back WRONG\n")?;
    a.fail()?;
    a.bind(&mut end)?;
    Ok(())
}
