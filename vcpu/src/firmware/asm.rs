//! The 32-bit assembly context every part of the firmware emits into: the
//! iced-x86 [`CodeAssembler`], the ROM data pool its strings live in, the
//! labels of the shared routines, and small emitters (print a string, wait
//! for a condition with a timeout, count a failure).
//!
//! Register conventions: the shared routines preserve every register except
//! the ones they document as outputs; the direction flag is clear.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use super::error::{FirmwareError, Result};
use super::layout::{self, var};

/// Constant data placed at known addresses (in ROM for the firmware), so
/// code can refer to it by absolute address before the code itself is
/// assembled.
pub(crate) struct Pool {
    /// Where the pool's first byte is.
    base: u32,
    /// The room it has.
    max: usize,
    bytes: Vec<u8>,
    strings: HashMap<String, u32>,
}

impl Pool {
    fn new(base: u32, max: usize) -> Pool {
        Pool { base, max, bytes: Vec::new(), strings: HashMap::new() }
    }

    /// The address of a NUL-terminated copy of `s`.
    pub(crate) fn cstr(&mut self, s: &str) -> Result<u32> {
        if let Some(&addr) = self.strings.get(s) {
            return Ok(addr);
        }
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        let addr = self.data(&data)?;
        self.strings.insert(s.to_owned(), addr);
        Ok(addr)
    }

    /// The address of a copy of `data`, 4-byte aligned.
    pub(crate) fn data(&mut self, data: &[u8]) -> Result<u32> {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
        let offset = self.bytes.len();
        if offset + data.len() > self.max {
            return Err(FirmwareError::TooLarge { part: "data pool", size: offset + data.len(), max: self.max });
        }
        self.bytes.extend_from_slice(data);
        Ok(self.base + offset as u32)
    }
}

/// Labels of the routines shared by the parts (each part binds its own).
#[derive(Clone, Copy)]
pub(crate) struct Routines {
    /// `al` → COM1.
    pub putc: CodeLabel,
    /// NUL-terminated string at `esi` → COM1.
    pub puts: CodeLabel,
    /// `eax` as unsigned decimal.
    pub put_dec: CodeLabel,
    /// The low `ecx` hex digits of `eax` (lowercase).
    pub put_hex: CodeLabel,
    /// Arms the local APIC timer for `eax` microseconds (one-shot, masked).
    pub timer_start: CodeLabel,
    /// PCI config read: address `eax` → `eax`.
    pub pci_read32: CodeLabel,
    /// PCI config write: address `eax`, value `ecx`.
    pub pci_write32: CodeLabel,
    /// PCI config 16-bit write: address `eax` (2-aligned), value `cx`.
    pub pci_write16: CodeLabel,
    /// The counter work every CPU runs (clobbers `eax`, `ecx`).
    pub count_work: CodeLabel,
    /// An AP's share of the remap phase (clobbers everything but `esp`).
    pub remap_reader: CodeLabel,
    /// The entry point of the BSP in protected mode.
    pub bsp_entry: CodeLabel,
    /// The entry point of the APs in protected mode.
    pub ap_entry: CodeLabel,
}

/// The 32-bit code being assembled, with its data pool.
pub(crate) struct Asm {
    code: CodeAssembler,
    /// ROM data the code refers to.
    pub pool: Pool,
    /// Shared routine labels.
    pub rt: Routines,
    /// Address of the dword counting failed checks.
    failures: u32,
}

impl Deref for Asm {
    type Target = CodeAssembler;
    fn deref(&self) -> &CodeAssembler {
        &self.code
    }
}

impl DerefMut for Asm {
    fn deref_mut(&mut self) -> &mut CodeAssembler {
        &mut self.code
    }
}

/// Upper bound on polling iterations per microsecond of timeout. It only
/// matters if the local APIC timer does not run; a working timer ends every
/// wait first, since no emulator polls the timer 20 times per microsecond.
const BACKSTOP_ITERATIONS_PER_US: u32 = 20;

impl Asm {
    /// A fresh 32-bit assembler for the firmware, with unbound routine
    /// labels: its pool is in the image's pool slot, its failure counter is
    /// [`var::FAILURES`].
    pub(crate) fn new() -> Result<Asm> {
        let pool_max = layout::POOL_END - layout::POOL_OFFSET;
        Asm::with_layout(layout::rom_addr(layout::POOL_OFFSET), pool_max, var::FAILURES)
    }

    /// A fresh 32-bit assembler with unbound routine labels, its pool at
    /// `pool_base` (at most `pool_max` bytes) and its failure counter at
    /// `failures`.
    pub(crate) fn with_layout(pool_base: u32, pool_max: usize, failures: u32) -> Result<Asm> {
        let mut code = CodeAssembler::new(32)?;
        let rt = Routines {
            putc: code.create_label(),
            puts: code.create_label(),
            put_dec: code.create_label(),
            put_hex: code.create_label(),
            timer_start: code.create_label(),
            pci_read32: code.create_label(),
            pci_write32: code.create_label(),
            pci_write16: code.create_label(),
            count_work: code.create_label(),
            remap_reader: code.create_label(),
            bsp_entry: code.create_label(),
            ap_entry: code.create_label(),
        };
        Ok(Asm { code, pool: Pool::new(pool_base, pool_max), rt, failures })
    }

    /// Binds `label` to the next instruction. Several labels may share an
    /// address (a zero-byte marker carries any label bound just before).
    pub(crate) fn bind(&mut self, label: &mut CodeLabel) -> Result<()> {
        self.code.zero_bytes()?;
        self.code.set_label(label)?;
        Ok(())
    }

    /// Binds the shared routine label `which` picks to the next instruction.
    pub(crate) fn bind_routine(&mut self, which: fn(&mut Routines) -> &mut CodeLabel) -> Result<()> {
        let mut label = *which(&mut self.rt);
        self.bind(&mut label)?;
        *which(&mut self.rt) = label;
        Ok(())
    }

    /// Loads the flat data selector into every data segment register
    /// (first thing on a CPU that just entered protected mode); clobbers AX.
    pub(crate) fn load_flat_data_segments(&mut self) -> Result<()> {
        self.mov(ax, super::layout::DATA32 as u32)?;
        for seg in [ds, es, ss, fs, gs] {
            self.mov(seg, ax)?;
        }
        Ok(())
    }

    /// A new label.
    pub(crate) fn label(&mut self) -> CodeLabel {
        self.code.create_label()
    }

    /// Prints `s` (no registers change).
    pub(crate) fn print(&mut self, s: &str) -> Result<()> {
        let addr = self.pool.cstr(s)?;
        let puts = self.rt.puts;
        self.push(esi)?;
        self.mov(esi, addr)?;
        self.call(puts)?;
        self.pop(esi)?;
        Ok(())
    }

    /// Prints `eax` in decimal (no registers change).
    pub(crate) fn print_eax_dec(&mut self) -> Result<()> {
        let put_dec = self.rt.put_dec;
        self.call(put_dec)?;
        Ok(())
    }

    /// Prints the low `digits` hex digits of `eax` (no registers change).
    pub(crate) fn print_eax_hex(&mut self, digits: u32) -> Result<()> {
        let put_hex = self.rt.put_hex;
        self.push(ecx)?;
        self.mov(ecx, digits)?;
        self.call(put_hex)?;
        self.pop(ecx)?;
        Ok(())
    }

    /// The address of the dword counting failed checks.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts one failed check (flags change).
    pub(crate) fn fail(&mut self) -> Result<()> {
        let failures = self.failures;
        self.inc(dword_ptr(failures))?;
        Ok(())
    }

    /// Prints `ok_line` if ZF is set, else `fail_line` and counts a
    /// failure (each gets a newline).
    pub(crate) fn verdict(&mut self, ok_line: &str, fail_line: &str) -> Result<()> {
        let mut bad = self.label();
        let mut end = self.label();
        self.jnz(bad)?;
        self.print(&format!("{ok_line}\n"))?;
        self.jmp(end)?;
        self.bind(&mut bad)?;
        self.print(&format!("{fail_line}\n"))?;
        self.fail()?;
        self.bind(&mut end)?;
        Ok(())
    }

    /// Polls until `cond` is met or `timeout_us` microseconds pass on the
    /// local APIC timer. `cond` emits a test that jumps to the label it is
    /// given when the condition holds; it may clobber `eax` and `edx` but
    /// not `ecx`. Afterwards CF is clear if the condition held and set on a
    /// timeout; `ecx` is preserved, `eax` and `edx` are not.
    pub(crate) fn wait_until<F>(&mut self, timeout_us: u32, cond: F) -> Result<()>
    where
        F: FnOnce(&mut Asm, CodeLabel) -> Result<()>,
    {
        let timer_start = self.rt.timer_start;
        let mut poll = self.label();
        let mut timed_out = self.label();
        let mut met = self.label();
        let mut end = self.label();
        self.push(ecx)?;
        self.mov(eax, timeout_us)?;
        self.call(timer_start)?;
        self.mov(ecx, timeout_us.saturating_mul(BACKSTOP_ITERATIONS_PER_US).max(1))?;
        self.bind(&mut poll)?;
        cond(self, met)?;
        self.pause()?;
        self.cmp(dword_ptr(layout::LAPIC + super::timer::TIMER_CURRENT), 0)?;
        self.je(timed_out)?;
        self.dec(ecx)?;
        self.jnz(poll)?;
        self.bind(&mut timed_out)?;
        self.pop(ecx)?;
        self.stc()?;
        self.jmp(end)?;
        self.bind(&mut met)?;
        self.pop(ecx)?;
        self.clc()?;
        self.bind(&mut end)?;
        Ok(())
    }

    /// Waits until the dword at `addr` is at least the dword at `target`
    /// (unsigned), or `timeout_us` passes; CF as for [`Asm::wait_until`].
    pub(crate) fn wait_var_at_least(&mut self, addr: u32, target: u32, timeout_us: u32) -> Result<()> {
        self.wait_until(timeout_us, |a, met| {
            a.mov(eax, dword_ptr(addr))?;
            a.cmp(eax, dword_ptr(target))?;
            a.jae(met)?;
            Ok(())
        })
    }

    /// Busy-waits `us` microseconds on the local APIC timer.
    pub(crate) fn delay(&mut self, us: u32) -> Result<()> {
        self.push(eax)?;
        self.push(edx)?;
        self.wait_until(us, |_, _| Ok(()))?;
        self.pop(edx)?;
        self.pop(eax)?;
        Ok(())
    }

    /// Spins (with `pause`, unbounded) until the dword at `addr` is at least
    /// `value`. Only APs wait like this: the BSP ends the run.
    pub(crate) fn spin_until_at_least(&mut self, addr: u32, value: u32) -> Result<()> {
        let mut again = self.label();
        let mut check = self.label();
        self.jmp(check)?;
        self.bind(&mut again)?;
        self.pause()?;
        self.bind(&mut check)?;
        self.cmp(dword_ptr(addr), value)?;
        self.jb(again)?;
        Ok(())
    }

    /// Assembles the code linked at `ip`; returns the bytes and the
    /// addresses of the BSP and AP entry points.
    pub(crate) fn assemble(mut self, ip: u32) -> Result<Assembled> {
        let result = self.code.assemble_options(u64::from(ip), BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
        let bsp_entry = result.label_ip(&self.rt.bsp_entry)? as u32;
        let ap_entry = result.label_ip(&self.rt.ap_entry)? as u32;
        Ok(Assembled { code: result.inner.code_buffer, pool: self.pool.bytes, bsp_entry, ap_entry })
    }

    /// Assembles the code linked at `ip`, for a program entered at its first
    /// instruction; returns the machine code and the pool's bytes.
    pub(crate) fn assemble_flat(mut self, ip: u32) -> Result<(Vec<u8>, Vec<u8>)> {
        let code = self.code.assemble(u64::from(ip))?;
        Ok((code, self.pool.bytes))
    }
}

/// The assembled 32-bit code and its pool.
pub(crate) struct Assembled {
    /// Machine code, linked at the address given to [`Asm::assemble`].
    pub code: Vec<u8>,
    /// Data pool contents.
    pub pool: Vec<u8>,
    /// Address of the BSP's protected-mode entry.
    pub bsp_entry: u32,
    /// Address of the APs' protected-mode entry.
    pub ap_entry: u32,
}
