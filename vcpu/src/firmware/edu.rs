//! QEMU's edu device (`docs/specs/edu.rst`): size BAR0, map it at
//! [`EDU_BAR_A`], turn on memory decoding and bus mastering, then check the
//! ident register, the liveness register, a factorial and a DMA round trip
//! (RAM → the device's buffer at 0x40000 → RAM).

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::{var, DMA_DST, DMA_LEN, DMA_SRC, EDU_BAR_A};
use super::pci;
use super::transcript;

/// Ident register value of edu 1.0.
pub(crate) const IDENT: u32 = 0x0100_00ed;
/// Ident register.
pub(crate) const REG_IDENT: u32 = 0x00;
/// Liveness register: reads back the complement of what was written.
const REG_LIVENESS: u32 = 0x04;
/// Factorial register.
const REG_FACTORIAL: u32 = 0x08;
/// Status register; bit 0 is set while a factorial is computed.
const REG_STATUS: u32 = 0x20;
/// DMA source address.
const REG_DMA_SRC: u32 = 0x80;
/// DMA destination address.
const REG_DMA_DST: u32 = 0x88;
/// DMA byte count.
const REG_DMA_COUNT: u32 = 0x90;
/// DMA command: bit 0 start (clears when done), bit 1 device → RAM.
const REG_DMA_CMD: u32 = 0x98;
/// The device's DMA buffer, in its own address space.
const DMA_BUFFER: u32 = 0x4_0000;
/// Command register: memory decoding and bus mastering.
pub(crate) const COMMAND_MEM_MASTER: u32 = 0x6;
/// Command register: bus mastering only.
pub(crate) const COMMAND_MASTER: u32 = 0x4;
/// The largest BAR0 the firmware maps (edu's is 1 MiB, which the expected
/// transcript assumes).
pub(crate) const BAR_MAX: u32 = 1 << 20;
/// Value written to the liveness register.
const LIVENESS_PROBE: u32 = 0x1234_5678;
/// Factorial argument and result.
pub(crate) const FACTORIAL_N: u32 = 10;
/// 10!.
pub(crate) const FACTORIAL_RESULT: u32 = 3_628_800;
/// How long a factorial or a DMA may take (µs); QEMU's DMA takes 100 ms.
const TIMEOUT_US: u32 = 2_000_000;

/// Starts a DMA of [`DMA_LEN`] bytes and waits for it; CF set on timeout.
fn dma(a: &mut Asm, src: u32, dst: u32, cmd: u32) -> Result<()> {
    a.mov(dword_ptr(ebp + REG_DMA_SRC), src)?;
    a.mov(dword_ptr(ebp + REG_DMA_DST), dst)?;
    a.mov(dword_ptr(ebp + REG_DMA_COUNT), DMA_LEN)?;
    a.mov(dword_ptr(ebp + REG_DMA_CMD), cmd)?;
    a.wait_until(TIMEOUT_US, |a, met| {
        a.test(dword_ptr(ebp + REG_DMA_CMD), 1)?;
        a.jz(met)?;
        Ok(())
    })
}

/// Finds, maps and tests edu; sets [`var::REMAP_ACTIVE`] once BAR0 is
/// mapped at [`EDU_BAR_A`].
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let mut found = a.label();
    let mut bad_bar = a.label();
    let mut fact_timeout = a.label();
    let mut fact_checked = a.label();
    let mut dma_timeout = a.label();
    let mut fill = a.label();
    let mut end = a.label();

    a.cmp(dword_ptr(var::EDU_CFG), 0)?;
    a.jne(found)?;
    a.print(&format!("{}\n", transcript::EDU_ABSENT))?;
    a.jmp(end)?;

    a.bind(&mut found)?;
    a.mov(ebx, dword_ptr(var::EDU_CFG))?;
    // Decoding off while BAR0 holds the sizing pattern.
    a.xor(ecx, ecx)?;
    pci::write(a, pci::COMMAND, 16)?;
    a.mov(ecx, u32::MAX)?;
    pci::write(a, pci::BAR0, 32)?;
    pci::read(a, pci::BAR0)?;
    a.mov(esi, eax)?;
    a.and(eax, !0xfu32)?;
    a.neg(eax)?;
    a.print(transcript::EDU_BAR)?;
    a.print_eax_hex(8)?;
    a.print(transcript::EDU_BAR_AT)?;
    a.mov(edi, eax)?;
    a.mov(eax, EDU_BAR_A)?;
    a.print_eax_hex(8)?;
    a.print("\n")?;
    // A 32-bit memory BAR (bits 0..3 clear) of 1 byte to 1 MiB.
    a.test(esi, 0x7)?;
    a.jnz(bad_bar)?;
    a.test(edi, edi)?;
    a.jz(bad_bar)?;
    a.cmp(edi, BAR_MAX)?;
    a.ja(bad_bar)?;
    a.mov(ecx, EDU_BAR_A)?;
    pci::write(a, pci::BAR0, 32)?;
    a.mov(ecx, COMMAND_MEM_MASTER)?;
    pci::write(a, pci::COMMAND, 16)?;
    a.mov(dword_ptr(var::REMAP_ACTIVE), 1)?;
    a.mov(ebp, EDU_BAR_A)?;

    a.mov(eax, dword_ptr(ebp + REG_IDENT))?;
    a.print(transcript::EDU_IDENT)?;
    a.print_eax_hex(8)?;
    a.print("\n")?;
    a.cmp(eax, IDENT)?;
    let mut ident_ok = a.label();
    a.je(ident_ok)?;
    a.fail()?;
    a.bind(&mut ident_ok)?;

    a.mov(dword_ptr(ebp + REG_LIVENESS), LIVENESS_PROBE)?;
    a.cmp(dword_ptr(ebp + REG_LIVENESS), !LIVENESS_PROBE)?;
    a.verdict(transcript::EDU_LIVENESS_OK, "edu: liveness FAIL")?;

    a.mov(dword_ptr(ebp + REG_FACTORIAL), FACTORIAL_N)?;
    a.wait_until(TIMEOUT_US, |a, met| {
        a.test(dword_ptr(ebp + REG_STATUS), 1)?;
        a.jz(met)?;
        Ok(())
    })?;
    a.jc(fact_timeout)?;
    a.mov(eax, dword_ptr(ebp + REG_FACTORIAL))?;
    a.print(&format!("{}{}! = ", transcript::EDU_FACTORIAL, FACTORIAL_N))?;
    a.print_eax_dec()?;
    a.cmp(eax, FACTORIAL_RESULT)?;
    a.je(fact_checked)?;
    a.print(transcript::FAIL_SUFFIX)?;
    a.fail()?;
    a.jmp(fact_checked)?;
    a.bind(&mut fact_timeout)?;
    a.print("edu: factorial timeout")?;
    a.fail()?;
    a.bind(&mut fact_checked)?;
    a.print("\n")?;

    // DMA: a pattern out to the device and back into a cleared buffer.
    a.mov(edi, DMA_SRC)?;
    a.mov(ecx, DMA_LEN / 4)?;
    a.mov(eax, 0x0123_4567)?;
    a.bind(&mut fill)?;
    a.stosd()?;
    a.add(eax, 0x9e37_79b9u32)?;
    a.dec(ecx)?;
    a.jnz(fill)?;
    a.mov(edi, DMA_DST)?;
    a.mov(ecx, DMA_LEN / 4)?;
    a.xor(eax, eax)?;
    a.rep().stosd()?;
    dma(a, DMA_SRC, DMA_BUFFER, 1)?;
    a.jc(dma_timeout)?;
    dma(a, DMA_BUFFER, DMA_DST, 3)?;
    a.jc(dma_timeout)?;
    a.mov(esi, DMA_SRC)?;
    a.mov(edi, DMA_DST)?;
    a.mov(ecx, DMA_LEN / 4)?;
    a.repe().cmpsd()?;
    a.verdict(transcript::EDU_DMA_OK, "edu: dma FAIL (data differs)")?;
    a.jmp(end)?;
    a.bind(&mut dma_timeout)?;
    a.print("edu: dma FAIL (timeout)\n")?;
    a.fail()?;
    a.jmp(end)?;

    a.bind(&mut bad_bar)?;
    a.print("edu: bar0 unusable\n")?;
    a.fail()?;
    a.bind(&mut end)?;
    Ok(())
}
