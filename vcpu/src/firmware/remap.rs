//! Topology changes under running vCPUs. While the APs read edu's ident
//! register at both [`EDU_BAR_A`] and [`EDU_BAR_B`] in a loop, the BSP moves
//! BAR0 between the two [`MOVES`] times: on even moves by rewriting BAR0
//! with decoding on, on odd moves with memory decoding turned off around
//! the rewrite. After each step the BSP reads both addresses itself and
//! expects exactly the current mapping (ident where BAR0 is mapped,
//! [`UNASSIGNED`] elsewhere). An AP read may see either value (it races
//! with the move) but nothing else. The verdict line is fixed; the AP read
//! counts vary from run to run and are printed on their own line.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::edu::{self, COMMAND_MEM_MASTER, IDENT, REG_IDENT};
use super::error::Result;
use super::layout::{var, EDU_BAR_A, EDU_BAR_B};
use super::pci;
use super::transcript;

/// BAR0 moves the BSP makes.
pub const MOVES: u32 = 200;
/// What a read of an address nothing decodes returns. QEMU reads
/// unassigned memory as 0 (since 1.7), and so does topos.
pub const UNASSIGNED: u32 = 0;
/// XOR of the two addresses: flips the current one into the other.
const FLIP: u32 = EDU_BAR_A ^ EDU_BAR_B;
/// How long the BSP waits for the readers to start and to stop (µs).
const TIMEOUT_US: u32 = 2_000_000;

/// Counts a read of `eax` into `ebx` (ident), `ecx` (unassigned) or `edx`
/// (anything else).
fn classify(a: &mut Asm) -> Result<()> {
    let mut not_ident = a.label();
    let mut other = a.label();
    let mut done = a.label();
    a.cmp(eax, IDENT)?;
    a.jne(not_ident)?;
    a.inc(ebx)?;
    a.jmp(done)?;
    a.bind(&mut not_ident)?;
    a.cmp(eax, UNASSIGNED)?;
    a.jne(other)?;
    a.inc(ecx)?;
    a.jmp(done)?;
    a.bind(&mut other)?;
    a.inc(edx)?;
    a.bind(&mut done)?;
    Ok(())
}

/// Emits `remap_reader`: an AP's read loop, run while the phase is 2.
pub(crate) fn emit_routines(a: &mut Asm) -> Result<()> {
    let mut read = a.label();
    let mut done = a.label();
    a.bind_routine(|r| &mut r.remap_reader)?;
    a.cmp(dword_ptr(var::REMAP_ACTIVE), 0)?;
    a.je(done)?;
    a.lock().inc(dword_ptr(var::READERS))?;
    a.xor(ebx, ebx)?;
    a.xor(ecx, ecx)?;
    a.xor(edx, edx)?;
    a.bind(&mut read)?;
    a.mov(eax, dword_ptr(EDU_BAR_A + REG_IDENT))?;
    classify(a)?;
    a.mov(eax, dword_ptr(EDU_BAR_B + REG_IDENT))?;
    classify(a)?;
    a.cmp(dword_ptr(var::PHASE), 2)?;
    a.je(read)?;
    a.lock().add(dword_ptr(var::READ_IDENT), ebx)?;
    a.lock().add(dword_ptr(var::READ_UNASSIGNED), ecx)?;
    a.lock().add(dword_ptr(var::READ_OTHER), edx)?;
    a.bind(&mut done)?;
    a.ret()?;
    Ok(())
}

/// Reads the ident register at `base` and counts a mismatch with
/// `expected` in [`var::REMAP_BAD`] (clobbers `eax`).
fn expect_read(a: &mut Asm, base: AsmRegister32, expected: u32) -> Result<()> {
    let mut ok = a.label();
    a.mov(eax, dword_ptr(base + REG_IDENT))?;
    a.cmp(eax, expected)?;
    a.je(ok)?;
    a.inc(dword_ptr(var::REMAP_BAD))?;
    a.bind(&mut ok)?;
    Ok(())
}

/// Waits until the dword at `addr` reaches CPUS_UP − 1; on a timeout
/// prints `what` and counts a failure.
fn wait_for_aps(a: &mut Asm, addr: u32, what: &str) -> Result<()> {
    let mut ok = a.label();
    a.wait_until(TIMEOUT_US, |a, met| {
        a.mov(eax, dword_ptr(var::CPUS_UP))?;
        a.dec(eax)?;
        a.cmp(dword_ptr(addr), eax)?;
        a.jae(met)?;
        Ok(())
    })?;
    a.jnc(ok)?;
    a.print(&format!("remap: timeout waiting for {what}\n"))?;
    a.fail()?;
    a.bind(&mut ok)?;
    Ok(())
}

/// Prints `label` and the dword at `addr` in decimal.
fn print_count(a: &mut Asm, label: &str, addr: u32) -> Result<()> {
    a.print(label)?;
    a.mov(eax, dword_ptr(addr))?;
    a.print_eax_dec()
}

/// The BSP's side: release the readers, move BAR0, collect the counts.
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let mut active = a.label();
    let mut step = a.label();
    let mut direct = a.label();
    let mut moved = a.label();
    let mut inconsistent = a.label();
    let mut end = a.label();

    a.cmp(dword_ptr(var::REMAP_ACTIVE), 0)?;
    a.jne(active)?;
    a.mov(dword_ptr(var::PHASE), 3)?;
    a.print(&format!("{}\n", transcript::REMAP_ABSENT))?;
    a.jmp(end)?;

    a.bind(&mut active)?;
    a.mov(dword_ptr(var::PHASE), 2)?;
    wait_for_aps(a, var::READERS, "readers to start")?;
    a.mov(ebx, dword_ptr(var::EDU_CFG))?;
    a.mov(edi, EDU_BAR_A)?;
    a.xor(esi, esi)?;
    a.bind(&mut step)?;
    a.test(esi, 1)?;
    a.jz(direct)?;
    // Odd step: decoding off, nothing answers at either address; move.
    a.mov(ecx, edu::COMMAND_MASTER)?;
    pci::write(a, pci::COMMAND, 16)?;
    a.mov(edx, EDU_BAR_A)?;
    expect_read(a, edx, UNASSIGNED)?;
    a.mov(edx, EDU_BAR_B)?;
    expect_read(a, edx, UNASSIGNED)?;
    a.xor(edi, FLIP)?;
    a.mov(ecx, edi)?;
    pci::write(a, pci::BAR0, 32)?;
    a.mov(ecx, COMMAND_MEM_MASTER)?;
    pci::write(a, pci::COMMAND, 16)?;
    a.jmp(moved)?;
    // Even step: rewrite BAR0 with decoding on.
    a.bind(&mut direct)?;
    a.xor(edi, FLIP)?;
    a.mov(ecx, edi)?;
    pci::write(a, pci::BAR0, 32)?;
    a.bind(&mut moved)?;
    expect_read(a, edi, IDENT)?;
    a.mov(edx, edi)?;
    a.xor(edx, FLIP)?;
    expect_read(a, edx, UNASSIGNED)?;
    a.inc(esi)?;
    a.cmp(esi, MOVES)?;
    a.jb(step)?;

    a.mov(dword_ptr(var::PHASE), 3)?;
    wait_for_aps(a, var::READERS_DONE, "readers to stop")?;
    a.print(&format!("{}{MOVES}{}", transcript::REMAP, transcript::REMAP_READS))?;
    print_count(a, "ident=", var::READ_IDENT)?;
    print_count(a, " unassigned=", var::READ_UNASSIGNED)?;
    print_count(a, " other=", var::READ_OTHER)?;
    a.print("\n")?;
    a.cmp(dword_ptr(var::REMAP_BAD), 0)?;
    a.jne(inconsistent)?;
    a.cmp(dword_ptr(var::READ_OTHER), 0)?;
    a.jne(inconsistent)?;
    a.print(&format!("{}\n", transcript::REMAP_CONSISTENT))?;
    a.jmp(end)?;
    a.bind(&mut inconsistent)?;
    print_count(a, "remap: INCONSISTENT, bsp mismatches=", var::REMAP_BAD)?;
    a.print("\n")?;
    a.fail()?;
    a.bind(&mut end)?;
    Ok(())
}
