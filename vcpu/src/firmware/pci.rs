//! PCI configuration mechanism #1 (address at `0xcf8`, data at `0xcfc`) and
//! the enumeration of bus 0: every present function is printed as
//! `pci 00:SS.F VVVV:DDDD class CCCCCC`, and the first edu device found
//! is remembered in [`var::EDU_CFG`].

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::{var, PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA};
use super::transcript;

/// Config address of bus 0, device 0, function 0, with the enable bit.
pub(crate) const BUS0: u32 = 0x8000_0000;
/// Config address step from one function to the next.
const FUNCTION_STEP: u32 = 0x100;
/// Config address bits selecting the function and register.
const FUNCTION_AND_REGISTER: u32 = 0x7ff;
/// Config address step from one device to the next.
const DEVICE_STEP: u32 = 0x800;
/// Header-type register (dword at 0x0c, bits 16..24); bit 7 of the header
/// type marks a multi-function device.
const HEADER_TYPE_MULTI: u32 = 0x0080_0000;
/// Vendor and device ID of QEMU's edu device, as read from register 0.
pub(crate) const EDU_ID: u32 = 0x11e8_1234;
/// Command register offset.
pub(crate) const COMMAND: u32 = 0x04;
/// Class code register offset (class, subclass, prog-if in bits 8..32).
const CLASS: u32 = 0x08;
/// Header type register offset.
const HEADER: u32 = 0x0c;
/// BAR0 offset.
pub(crate) const BAR0: u32 = 0x10;

/// Emits `pci_read32`, `pci_write32` and `pci_write16`.
pub(crate) fn emit_routines(a: &mut Asm) -> Result<()> {
    // pci_read32: config address eax → eax.
    a.bind_routine(|r| &mut r.pci_read32)?;
    a.push(edx)?;
    a.mov(dx, u32::from(PCI_CONFIG_ADDRESS))?;
    a.out(dx, eax)?;
    a.mov(dx, u32::from(PCI_CONFIG_DATA))?;
    a.in_(eax, dx)?;
    a.pop(edx)?;
    a.ret()?;

    // pci_write32: config address eax, value ecx.
    a.bind_routine(|r| &mut r.pci_write32)?;
    a.push(eax)?;
    a.push(edx)?;
    a.mov(dx, u32::from(PCI_CONFIG_ADDRESS))?;
    a.out(dx, eax)?;
    a.mov(dx, u32::from(PCI_CONFIG_DATA))?;
    a.mov(eax, ecx)?;
    a.out(dx, eax)?;
    a.pop(edx)?;
    a.pop(eax)?;
    a.ret()?;

    // pci_write16: config address eax (bit 1 picks the half), value cx.
    a.bind_routine(|r| &mut r.pci_write16)?;
    a.push(eax)?;
    a.push(edx)?;
    a.mov(edx, eax)?;
    a.and(edx, 3)?;
    a.and(eax, !3u32)?;
    a.push(edx)?;
    a.mov(dx, u32::from(PCI_CONFIG_ADDRESS))?;
    a.out(dx, eax)?;
    a.pop(edx)?;
    a.add(edx, u32::from(PCI_CONFIG_DATA))?;
    a.mov(eax, ecx)?;
    a.out(dx, ax)?;
    a.pop(edx)?;
    a.pop(eax)?;
    a.ret()?;
    Ok(())
}

/// Reads config register `reg` of the function at `ebx` into `eax`.
pub(crate) fn read(a: &mut Asm, reg: u32) -> Result<()> {
    let pci_read32 = a.rt.pci_read32;
    a.mov(eax, ebx)?;
    a.add(eax, reg)?;
    a.call(pci_read32)?;
    Ok(())
}

/// Writes `ecx` to config register `reg` (`width` 16 or 32 bits) of the
/// function at `ebx` (clobbers `eax`).
pub(crate) fn write(a: &mut Asm, reg: u32, width: u32) -> Result<()> {
    let routine = if width == 16 { a.rt.pci_write16 } else { a.rt.pci_write32 };
    a.mov(eax, ebx)?;
    a.add(eax, reg)?;
    a.call(routine)?;
    Ok(())
}

/// Enumerates bus 0.
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let mut function = a.label();
    let mut present = a.label();
    let mut not_edu = a.label();
    let mut next_device = a.label();
    let mut next_function = a.label();
    let mut check = a.label();

    a.mov(ebx, BUS0)?;
    a.bind(&mut function)?;
    read(a, 0)?;
    a.cmp(ax, 0xffff)?;
    a.jne(present)?;
    // Function 0 absent: no device here; another function absent: try the
    // next one.
    a.test(ebx, FUNCTION_AND_REGISTER)?;
    a.jz(next_device)?;
    a.jmp(next_function)?;

    a.bind(&mut present)?;
    a.mov(esi, eax)?;
    a.print(transcript::PCI)?;
    a.mov(eax, ebx)?;
    a.shr(eax, 11)?;
    a.and(eax, 0x1f)?;
    a.print_eax_hex(2)?;
    a.print(".")?;
    a.mov(eax, ebx)?;
    a.shr(eax, 8)?;
    a.and(eax, 7)?;
    a.print_eax_hex(1)?;
    a.print(" ")?;
    a.mov(eax, esi)?;
    a.print_eax_hex(4)?;
    a.print(":")?;
    a.mov(eax, esi)?;
    a.shr(eax, 16)?;
    a.print_eax_hex(4)?;
    a.print(transcript::PCI_CLASS)?;
    read(a, CLASS)?;
    a.shr(eax, 8)?;
    a.print_eax_hex(6)?;
    a.print("\n")?;

    a.cmp(esi, EDU_ID)?;
    a.jne(not_edu)?;
    a.cmp(dword_ptr(var::EDU_CFG), 0)?;
    a.jne(not_edu)?;
    a.mov(dword_ptr(var::EDU_CFG), ebx)?;
    a.bind(&mut not_edu)?;

    // After function 0, look at functions 1..8 only on a multi-function
    // device.
    a.test(ebx, FUNCTION_AND_REGISTER)?;
    a.jnz(next_function)?;
    read(a, HEADER)?;
    a.test(eax, HEADER_TYPE_MULTI)?;
    a.jnz(next_function)?;

    a.bind(&mut next_device)?;
    a.and(ebx, !FUNCTION_AND_REGISTER)?;
    a.add(ebx, DEVICE_STEP)?;
    a.jmp(check)?;
    a.bind(&mut next_function)?;
    a.add(ebx, FUNCTION_STEP)?;
    a.bind(&mut check)?;
    a.cmp(ebx, BUS0 + 32 * DEVICE_STEP)?;
    a.jb(function)?;
    Ok(())
}
