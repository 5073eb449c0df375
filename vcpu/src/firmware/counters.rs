//! Two shared counters every CPU bumps [`ITERATIONS`] times: one with
//! `lock xadd`, one with a plain read-modify-write under an `xchg`
//! spinlock. Any lost update shows as a total below CPUs × iterations.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::var;
use super::transcript;

/// Increments of each counter per CPU.
pub const ITERATIONS: u32 = 1000;
/// How long the BSP waits for every CPU to finish (µs).
const TIMEOUT_US: u32 = 10_000_000;

/// Emits `count_work` (clobbers `eax`, `ecx`).
pub(crate) fn emit_routines(a: &mut Asm) -> Result<()> {
    let mut again = a.label();
    let mut try_lock = a.label();
    let mut wait_free = a.label();
    let mut locked = a.label();
    a.bind_routine(|r| &mut r.count_work)?;
    a.mov(ecx, ITERATIONS)?;
    a.bind(&mut again)?;
    a.mov(eax, 1)?;
    a.lock().xadd(dword_ptr(var::XADD_COUNTER), eax)?;
    // Take the lock: xchg is locked by itself; spin reading while held.
    a.bind(&mut try_lock)?;
    a.mov(eax, 1)?;
    a.xchg(dword_ptr(var::SPIN_LOCK), eax)?;
    a.test(eax, eax)?;
    a.jz(locked)?;
    a.bind(&mut wait_free)?;
    a.pause()?;
    a.cmp(dword_ptr(var::SPIN_LOCK), 0)?;
    a.jne(wait_free)?;
    a.jmp(try_lock)?;
    a.bind(&mut locked)?;
    a.mov(eax, dword_ptr(var::SPIN_COUNTER))?;
    a.inc(eax)?;
    a.mov(dword_ptr(var::SPIN_COUNTER), eax)?;
    // Release: a plain store (x86 stores are not reordered with earlier
    // loads or stores).
    a.mov(dword_ptr(var::SPIN_LOCK), 0)?;
    a.dec(ecx)?;
    a.jnz(again)?;
    a.lock().inc(dword_ptr(var::WORK_DONE))?;
    a.ret()?;
    Ok(())
}

/// Prints `label`, the counter at `addr`, and `ok` if it equals `ebx`.
fn report(a: &mut Asm, label: &str, addr: u32) -> Result<()> {
    let mut bad = a.label();
    let mut end = a.label();
    a.print(label)?;
    a.mov(eax, dword_ptr(addr))?;
    a.print_eax_dec()?;
    a.cmp(eax, ebx)?;
    a.jne(bad)?;
    a.print(&format!("{}\n", transcript::OK_SUFFIX))?;
    a.jmp(end)?;
    a.bind(&mut bad)?;
    a.print(&format!("{}\n", transcript::FAIL_SUFFIX))?;
    a.fail()?;
    a.bind(&mut end)?;
    Ok(())
}

/// Releases the APs into phase 1, does the BSP's share, waits for all CPUs
/// and checks both totals.
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let mut done = a.label();
    let count_work = a.rt.count_work;
    a.mov(dword_ptr(var::PHASE), 1)?;
    a.call(count_work)?;
    a.wait_var_at_least(var::WORK_DONE, var::CPUS_UP, TIMEOUT_US)?;
    a.jnc(done)?;
    a.print("counters: timeout\n")?;
    a.fail()?;
    a.bind(&mut done)?;
    a.mov(ebx, dword_ptr(var::CPUS_UP))?;
    a.imul_3(ebx, ebx, ITERATIONS as i32)?;
    report(a, transcript::LOCK_XADD, var::XADD_COUNTER)?;
    report(a, transcript::SPINLOCK, var::SPIN_COUNTER)?;
    Ok(())
}
