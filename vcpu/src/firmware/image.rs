//! Puts the parts together: the BSP's protected-mode program in report
//! order, the AP program, the shared routines, then the 16-bit pieces that
//! need the entry addresses, all placed in one image.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::{FirmwareError, Result};
use super::layout::{self, var};
use super::{
    console, counters, edu, exit, framebuffer, fw_cfg, pci, pflash, real_mode, remap, rom, smp, timer, transcript,
    virtio_doorbell,
};

/// The BSP's program, from the protected-mode entry to the debug exit.
fn emit_bsp(a: &mut Asm) -> Result<()> {
    a.bind_routine(|r| &mut r.bsp_entry)?;
    a.load_flat_data_segments()?;
    a.mov(esp, layout::BSP_STACK_TOP)?;
    a.cld()?;
    // Clear the shared variables, then mark every AP slot empty.
    a.mov(edi, var::START)?;
    a.mov(ecx, (var::AP_IDS - var::START) / 4)?;
    a.xor(eax, eax)?;
    a.rep().stosd()?;
    a.mov(ecx, layout::MAX_APS)?;
    a.mov(eax, u32::MAX)?;
    a.rep().stosd()?;

    console::emit_init(a)?;
    a.print(&format!("{}\n", transcript::BANNER))?;
    fw_cfg::emit_bsp(a)?;
    smp::emit_bsp(a)?;
    counters::emit_bsp(a)?;
    pci::emit_bsp(a)?;
    edu::emit_bsp(a)?;
    remap::emit_bsp(a)?;
    pflash::emit_bsp(a)?;
    framebuffer::emit_bsp(a)?;
    virtio_doorbell::emit_bsp(a)?;
    rom::emit_bsp(a)?;
    exit::emit_bsp(a)
}

/// Places `part` at `offset`, failing if it overruns `end`.
pub(super) fn place(image: &mut [u8], part: &'static str, bytes: &[u8], offset: usize, end: usize) -> Result<()> {
    let max = end - offset;
    if bytes.len() > max {
        return Err(FirmwareError::TooLarge { part, size: bytes.len(), max });
    }
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// Assembles the whole image.
pub(crate) fn build() -> Result<Vec<u8>> {
    let mut a = Asm::new()?;
    emit_bsp(&mut a)?;
    console::emit_routines(&mut a)?;
    timer::emit_routines(&mut a)?;
    counters::emit_routines(&mut a)?;
    pci::emit_routines(&mut a)?;
    remap::emit_routines(&mut a)?;
    smp::emit_ap(&mut a)?;

    let pm = a.assemble(layout::rom_addr(layout::PM_OFFSET))?;
    let real = real_mode::bsp_entry(pm.bsp_entry)?;
    let trampoline = real_mode::ap_trampoline(pm.ap_entry)?;
    let reset = real_mode::reset_vector()?;

    // Unused ROM reads as 0xff, like erased flash.
    let mut image = vec![0xff; layout::IMAGE_SIZE];
    place(&mut image, "AP trampoline", &trampoline, layout::TRAMPOLINE_OFFSET, layout::POOL_OFFSET)?;
    place(&mut image, "data pool", &pm.pool, layout::POOL_OFFSET, layout::POOL_END)?;
    place(&mut image, "real-mode entry", &real, layout::REAL_MODE_OFFSET, layout::REAL_MODE_END)?;
    place(&mut image, "32-bit code", &pm.code, layout::PM_OFFSET, layout::PM_END)?;
    place(
        &mut image,
        "ROM marker",
        &layout::ROM_MARKER.to_le_bytes(),
        layout::ROM_MARKER_OFFSET,
        layout::RESET_VECTOR_OFFSET,
    )?;
    place(&mut image, "reset vector", &reset, layout::RESET_VECTOR_OFFSET, layout::IMAGE_SIZE)?;
    Ok(image)
}
