//! [`Cpu`]: one interpreted x86 CPU over the runtime's address spaces —
//! set its registers, run it, read why it stopped.

use super::apic::{Apic, Startup};
use super::block::{decode, BlockCache, Key};
use super::core::Core;
use super::event::Event;
use super::interrupt::Source;
use super::state::{flag, CpuState, SegReg, Segment};
use crate::backend::VcpuIo;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use topos_runtime::AddressSpace;

/// A block that loops to itself asks the local APIC for posted events once
/// per this many runs (a post also sets the kick flag, polled every run,
/// when the APIC has a waker).
const APIC_POLL_RUNS: u32 = 32;

/// DR6.BS: the debug trap came from single-stepping (EFLAGS.TF).
const DR6_BS: u32 = 1 << 14;

/// Why [`Cpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The CPU executed `hlt` (EIP is after it) and no interrupt woke it.
    Halted,
    /// The instruction limit was reached.
    Limit,
    /// A triple fault (or an event the interpreter does not model, such as
    /// a task switch): the machine shuts down.
    Shutdown,
    /// Someone asked the CPU to return ([`Cpu::kick_flag`]).
    Kicked,
    /// An application processor waits for a startup IPI.
    WaitForSipi,
    /// A guest access the VM's policy stops on (see
    /// [`VcpuIo::take_fault`]).
    AccessFault,
}

/// One interpreted x86 CPU.
///
/// ```
/// use topos_runtime::Topology;
/// use topos_vcpu::interp::{Cpu, Exit, SegReg};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let topo = Topology::new();
/// let spaces = topo.standard_spaces()?;
/// spaces.system.add_subregion(0, &topo.new_ram("ram", 0x10000)?)?;
/// // mov eax, 5; add eax, eax; hlt — at 0x1000, run in flat 32-bit mode.
/// spaces.memory.write(0x1000, &[0xb8, 5, 0, 0, 0, 0x01, 0xc0, 0xf4]);
/// let mut cpu = Cpu::new(&spaces.memory, &spaces.io_space);
/// cpu.state_mut().enter_flat32(0x1000);
/// assert_eq!(cpu.run(100), Exit::Halted);
/// assert_eq!(cpu.state().gpr[0], 10);
/// assert_eq!(cpu.state().eip, 0x1008);
/// assert_eq!(cpu.state().segment(SegReg::Cs).selector, 0x08);
/// assert_eq!(cpu.instructions(), 3);
/// // One instruction at a time (the CPU stays halted until told otherwise):
/// cpu.state_mut().halted = false;
/// cpu.state_mut().eip = 0x1005;
/// assert_eq!(cpu.step(), Exit::Limit);
/// assert_eq!(cpu.state().gpr[0], 20);
/// # Ok(()) }
/// ```
pub struct Cpu {
    pub(crate) core: Core,
    cache: BlockCache,
}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpu").field("state", &self.core.s).finish_non_exhaustive()
    }
}

impl Cpu {
    /// A CPU in its power-on state over `memory` and `io` (the memory and
    /// port address spaces), with no local APIC.
    pub fn new(memory: &AddressSpace, io: &AddressSpace) -> Cpu {
        Cpu::with_io(VcpuIo::new(memory, io), 0, None)
    }

    /// A CPU with a given index (its APIC ID) and local APIC, reaching the
    /// machine through `io`.
    pub fn with_io(io: VcpuIo, index: u32, apic: Option<Box<dyn Apic>>) -> Cpu {
        let memory = io_memory_space(&io);
        let mut core = Core::new(io, index, apic);
        if core.apic.as_ref().is_some_and(|a| !a.is_bsp()) {
            core.s.wait_for_sipi = true;
        }
        Cpu { core, cache: BlockCache::new(&memory) }
    }

    /// Sets the CPU count `cpuid` reports.
    pub fn set_cpu_count(&mut self, cpus: u32) {
        self.core.cpus = cpus.max(1);
    }

    /// The registers.
    pub fn state(&self) -> &CpuState {
        &self.core.s
    }

    /// The registers, to change. Changing CR0, CR3, CR4 or a segment takes
    /// effect at the next instruction.
    pub fn state_mut(&mut self) -> &mut CpuState {
        self.core.flush_tlb();
        &mut self.core.s
    }

    /// Instructions retired so far.
    pub fn instructions(&self) -> u64 {
        self.core.retired
    }

    /// The flag a kick sets: while it is set, [`run`](Self::run) returns
    /// [`Exit::Kicked`] at the next block boundary. The caller clears it.
    pub fn kick_flag(&self) -> Arc<AtomicBool> {
        self.core.attention.clone()
    }

    /// The vCPU's path to the machine (its accessors and counters).
    pub fn io(&mut self) -> &mut VcpuIo {
        &mut self.core.io
    }

    /// Buffers this CPU's writes to coalesced MMIO ranges in `buffer`
    /// (see [`CoalescedMmio`](super::CoalescedMmio)).
    pub fn set_coalesced_buffer(&mut self, buffer: Arc<super::coalesced::CoalescedBuffer>) {
        self.core.coalesced = Some(buffer);
        self.core.flush_tlb();
    }

    /// Runs one instruction (or delivers one pending event).
    pub fn step(&mut self) -> Exit {
        self.run(1)
    }

    /// Runs until `hlt`, a shutdown, a kick, or `max_instructions`.
    pub fn run(&mut self, max_instructions: u64) -> Exit {
        self.core.mode_changed();
        let mut budget = max_instructions;
        let exit = self.run_loop(&mut budget);
        // As KVM drains its ring at every exit.
        self.core.flush_coalesced();
        exit
    }

    fn run_loop(&mut self, budget: &mut u64) -> Exit {
        loop {
            if self.core.attention.load(Ordering::Acquire) {
                return Exit::Kicked;
            }
            if let Some(exit) = self.poll_apic() {
                return exit;
            }
            if self.core.s.wait_for_sipi {
                return Exit::WaitForSipi;
            }
            if self.core.s.halted {
                return Exit::Halted;
            }
            if *budget == 0 {
                return Exit::Limit;
            }
            self.core.revalidate();
            if std::mem::take(&mut self.core.view_changed) {
                self.cache.clear();
            }
            if self.cache.code_written() {
                self.cache.drop_written();
            }
            if let Err(exit) = self.run_block(budget) {
                return exit;
            }
        }
    }

    /// Finds or decodes the block at CS:EIP and runs it (one instruction if
    /// an interrupt shadow is pending).
    fn run_block(&mut self, budget: &mut u64) -> Result<(), Exit> {
        let cs = &self.core.s.seg[SegReg::Cs as usize];
        let bits: u8 = if cs.is_32() { 32 } else { 16 };
        let la = cs.base.wrapping_add(self.core.s.eip);
        let phys = match self.core.phys(la, super::paging::Access::Fetch) {
            Ok(p) => p,
            Err(e) => return self.handle(e),
        };
        let key = Key { phys, eip: self.core.s.eip, bits };
        let slot = match self.cache.get(&key) {
            Some(i) => i,
            None => match decode(&mut self.core, &self.cache) {
                Ok((block, Some(watch))) => self.cache.insert(block, watch),
                Ok((block, None)) => {
                    // Uncached: run it once.
                    return self.run_ops(&block.ops, budget);
                }
                Err(e) => return self.handle(e),
            },
        };
        // `run_ops` needs the core mutably and the block shared: they are
        // different fields.
        let Cpu { core, cache } = self;
        let cs_base = core.s.seg[SegReg::Cs as usize].base;
        let mut runs: u32 = 0;
        loop {
            core.flushed = false;
            runs = runs.wrapping_add(1);
            run_ops(core, &cache.block(slot).ops, budget, cache)?;
            // A block that jumps back to its own start (a loop) runs again
            // at once when nothing the run loop looks at changed.
            let cs = &core.s.seg[SegReg::Cs as usize];
            let same = core.s.eip == key.eip && cs.base == cs_base && cs.is_32() == (bits == 32) && !core.flushed;
            if !same
                || *budget == 0
                || core.s.halted
                || core.attention.load(Ordering::Relaxed)
                // What the APIC posts also kicks the vCPU (its waker), so
                // the APIC itself is asked every few runs only.
                || (runs % APIC_POLL_RUNS == 0 && core.apic.as_ref().is_some_and(|a| a.attention()))
                || !core.tlb_is_current()
                || cache.code_written()
            {
                return Ok(());
            }
        }
    }

    fn run_ops(&mut self, ops: &[super::exec::Op], budget: &mut u64) -> Result<(), Exit> {
        let Cpu { core, cache } = self;
        run_ops(core, ops, budget, cache)
    }

    fn handle(&mut self, e: Event) -> Result<(), Exit> {
        handle_event(&mut self.core, e)
    }

    /// Looks at what the APIC posted: startup IPIs, NMIs, interrupts.
    fn poll_apic(&mut self) -> Option<Exit> {
        let core = &mut self.core;
        let apic = core.apic.as_mut()?;
        if !apic.attention() {
            return None;
        }
        // Every startup posted so far, in the APIC's order (an INIT and the
        // SIPI right after it can both be waiting: handling only the INIT
        // would park the AP with its SIPI still pending and no kick left).
        while let Some(s) = core.apic.as_mut().and_then(|a| a.take_startup()) {
            match s {
                Startup::Init => {
                    let Some(apic) = core.apic.as_mut() else { break };
                    let bsp = apic.is_bsp();
                    apic.reset();
                    core.s = CpuState::reset();
                    core.s.wait_for_sipi = !bsp;
                    core.shadow = false;
                    core.apic_moved();
                    core.mode_changed();
                }
                Startup::Sipi(v) if core.s.wait_for_sipi => {
                    core.s.wait_for_sipi = false;
                    core.s.halted = false;
                    let sel = u16::from(v) << 8;
                    core.s.seg[SegReg::Cs as usize] = Segment::real_mode(sel, true);
                    core.s.eip = 0;
                    core.mode_changed();
                }
                Startup::Sipi(_) => {}
            }
        }
        if core.s.wait_for_sipi {
            return None;
        }
        let apic = core.apic.as_mut()?;
        if !core.nmi_blocked && apic.take_nmi() {
            core.s.halted = false;
            core.nmi_blocked = true;
            if let Err(e) = core.deliver(2, None, Source::External) {
                return handle_event(core, e).err();
            }
        }
        if core.shadow || !core.interrupts_enabled() {
            return None;
        }
        let apic = core.apic.as_mut()?;
        if let Some(v) = apic.take_interrupt() {
            core.s.halted = false;
            if let Err(e) = core.deliver(v, None, Source::External) {
                return handle_event(core, e).err();
            }
        }
        None
    }
}

/// The memory address space behind a `VcpuIo`.
fn io_memory_space(io: &VcpuIo) -> AddressSpace {
    io.memory_ref().address_space()
}

/// Runs `ops` until one ends the block (or the budget runs out). Inlined
/// into the block loop: a call per block run cost a sixth of a two-instruction
/// loop's time (`cargo bench -p topos-vcpu --bench interp -- loop`).
#[inline(always)]
fn run_ops(core: &mut Core, ops: &[super::exec::Op], budget: &mut u64, cache: &BlockCache) -> Result<(), Exit> {
    // One instruction only: the one after `sti`/`mov ss`, which runs with
    // interrupts still inhibited (they are looked at after it), and under
    // single-step (EFLAGS.TF: a debug trap after it when it completed; a
    // fault's or an interrupt's delivery clears TF).
    let single_step = core.s.flags.base() & flag::TF != 0;
    let mut ops = ops;
    if core.shadow || single_step {
        ops = &ops[..1.min(ops.len())];
        core.shadow = false;
    }
    let (retired, deliveries) = (core.retired, core.deliveries);
    for op in ops {
        if *budget == 0 {
            return Ok(());
        }
        core.next_eip = op.next;
        match (op.exec)(core, op) {
            Ok(()) => {
                // Only an instruction that ends its block can change CS or
                // jump; the others go on at their precomputed next EIP.
                core.s.eip = if !op.ends_block {
                    op.next
                } else if core.s.seg[SegReg::Cs as usize].is_32() {
                    core.next_eip
                } else {
                    core.next_eip & 0xffff
                };
                core.retired += 1;
                *budget -= 1;
            }
            Err(e) => {
                *budget = budget.saturating_sub(1);
                return handle_event(core, e);
            }
        }
        if op.writes_memory && cache.code_written() && !single_step {
            // This block's code may have been written: look again.
            return Ok(());
        }
    }
    if single_step && core.retired > retired && core.deliveries == deliveries && !core.s.halted {
        core.s.dr[6] |= DR6_BS;
        return core.deliver(super::event::vector::DB, None, Source::Exception).or_else(|e| handle_event(core, e));
    }
    Ok(())
}

/// Handles what an instruction raised: delivers exceptions and software
/// interrupts, returns the exits.
fn handle_event(core: &mut Core, e: Event) -> Result<(), Exit> {
    let r = match e {
        Event::Exception { vector, code } => core.deliver(vector, code, Source::Exception),
        Event::SoftInt(v) => {
            let at = core.s.eip;
            core.s.eip = core.next_eip;
            core.retired += 1;
            core.deliver_software(v, at)
        }
        Event::Halt => {
            core.s.eip = core.next_eip;
            core.retired += 1;
            core.s.halted = true;
            return Ok(());
        }
        Event::Shutdown => return Err(Exit::Shutdown),
        Event::AccessFault => return Err(Exit::AccessFault),
    };
    match r {
        Ok(()) => Ok(()),
        Err(Event::Shutdown) => Err(Exit::Shutdown),
        Err(Event::AccessFault) => Err(Exit::AccessFault),
        Err(_) => Err(Exit::Shutdown),
    }
}
