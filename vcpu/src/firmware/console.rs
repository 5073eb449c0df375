//! Output on the 16550 UART at COM1: one byte at a time, each after the
//! Line Status Register says the transmitter holding register is empty
//! (bit 5), with a bounded poll so a missing UART cannot hang the firmware.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::COM1;

/// LSR polls before a byte is written anyway.
const LSR_POLLS: u32 = 100_000;
/// Line Status Register: transmitter holding register empty.
const LSR_THRE: u32 = 0x20;

/// Sets 8 data bits, no parity, one stop bit, interrupts off.
pub(crate) fn emit_init(a: &mut Asm) -> Result<()> {
    a.push(eax)?;
    a.push(edx)?;
    a.mov(dx, (COM1 + 1) as u32)?;
    a.xor(al, al)?;
    a.out(dx, al)?; // IER: no interrupts
    a.mov(dx, (COM1 + 3) as u32)?;
    a.mov(al, 3)?;
    a.out(dx, al)?; // LCR: 8N1, DLAB off
    a.pop(edx)?;
    a.pop(eax)?;
    Ok(())
}

/// Emits `putc`, `puts`, `put_dec` and `put_hex`.
pub(crate) fn emit_routines(a: &mut Asm) -> Result<()> {
    let rt = a.rt;

    // putc: al → COM1.
    let mut poll = a.label();
    let mut ready = a.label();
    a.bind_routine(|r| &mut r.putc)?;
    a.push(edx)?;
    a.push(ecx)?;
    a.push(eax)?;
    a.mov(ecx, LSR_POLLS)?;
    a.mov(dx, (COM1 + 5) as u32)?;
    a.bind(&mut poll)?;
    a.in_(al, dx)?;
    a.test(al, LSR_THRE)?;
    a.jnz(ready)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(poll)?;
    a.bind(&mut ready)?;
    a.pop(eax)?;
    a.mov(dx, COM1 as u32)?;
    a.out(dx, al)?;
    a.pop(ecx)?;
    a.pop(edx)?;
    a.ret()?;

    // puts: NUL-terminated string at esi.
    let mut next = a.label();
    let mut done = a.label();
    a.bind_routine(|r| &mut r.puts)?;
    a.push(eax)?;
    a.push(esi)?;
    a.bind(&mut next)?;
    a.lodsb()?;
    a.test(al, al)?;
    a.jz(done)?;
    a.call(rt.putc)?;
    a.jmp(next)?;
    a.bind(&mut done)?;
    a.pop(esi)?;
    a.pop(eax)?;
    a.ret()?;

    // put_dec: eax, unsigned decimal. Digits go on the stack, least
    // significant first, and come off in print order.
    let mut divide = a.label();
    let mut emit = a.label();
    a.bind_routine(|r| &mut r.put_dec)?;
    a.push(eax)?;
    a.push(ebx)?;
    a.push(ecx)?;
    a.push(edx)?;
    a.mov(ebx, 10)?;
    a.xor(ecx, ecx)?;
    a.bind(&mut divide)?;
    a.xor(edx, edx)?;
    a.div(ebx)?;
    a.push(edx)?;
    a.inc(ecx)?;
    a.test(eax, eax)?;
    a.jnz(divide)?;
    a.bind(&mut emit)?;
    a.pop(eax)?;
    a.add(al, b'0' as u32)?;
    a.call(rt.putc)?;
    a.dec(ecx)?;
    a.jnz(emit)?;
    a.pop(edx)?;
    a.pop(ecx)?;
    a.pop(ebx)?;
    a.pop(eax)?;
    a.ret()?;

    // put_hex: the low ecx (1..=8) nibbles of eax, most significant first.
    let mut nibble = a.label();
    let mut digit = a.label();
    a.bind_routine(|r| &mut r.put_hex)?;
    a.push(eax)?;
    a.push(ecx)?;
    a.push(edx)?;
    a.mov(edx, eax)?;
    a.bind(&mut nibble)?;
    a.dec(ecx)?;
    a.push(ecx)?;
    a.shl(ecx, 2)?;
    a.mov(eax, edx)?;
    a.shr(eax, cl)?;
    a.pop(ecx)?;
    a.and(eax, 0xf)?;
    a.cmp(al, 10)?;
    a.jb(digit)?;
    a.add(al, (b'a' - b'0' - 10) as u32)?;
    a.bind(&mut digit)?;
    a.add(al, b'0' as u32)?;
    a.call(rt.putc)?;
    a.test(ecx, ecx)?;
    a.jnz(nibble)?;
    a.pop(edx)?;
    a.pop(ecx)?;
    a.pop(eax)?;
    a.ret()?;
    Ok(())
}
