//! [`InterpVcpu`]: the interpreter as a [`VcpuBackend`].

use super::apic::Apic;
use super::cpu::{Cpu, Exit};
use super::state::SegReg;
use crate::backend::{Liveness, RunExit, VcpuBackend, VcpuIo};
use crate::control::Kick;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use topos_runtime::AddressSpace;

/// An interpreted vCPU for the vCPU layer ([`crate::vm::Vm`]).
#[derive(Debug)]
pub struct InterpVcpu {
    cpu: Cpu,
    kick: Arc<FlagKick>,
}

/// A kick sets the flag the run loop polls once per block.
#[derive(Debug)]
struct FlagKick(Arc<AtomicBool>);

impl Kick for FlagKick {
    fn kick(&self) {
        self.0.store(true, Ordering::Release);
    }
    fn clear(&self) {
        self.0.store(false, Ordering::Release);
    }
}

impl InterpVcpu {
    /// vCPU `index` of `cpus` over `memory` and `io`, with `apic`.
    /// Application processors (an APIC that is not the BSP's) wait for a
    /// startup IPI.
    pub fn new(memory: &AddressSpace, io: &AddressSpace, index: u32, cpus: u32, apic: Option<Box<dyn Apic>>) -> Self {
        let mut cpu = Cpu::with_io(VcpuIo::new(memory, io), index, apic);
        cpu.set_cpu_count(cpus);
        let kick = Arc::new(FlagKick(cpu.kick_flag()));
        InterpVcpu { cpu, kick }
    }

    /// The CPU (to set registers before it runs, e.g. a kernel's entry).
    pub fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }
}

impl VcpuBackend for InterpVcpu {
    fn run(&mut self, io: &mut VcpuIo) -> Result<RunExit, crate::Error> {
        // The VM's accessors (and counters) are used while running.
        std::mem::swap(self.cpu.io(), io);
        let exit = self.cpu.run(u64::MAX);
        std::mem::swap(self.cpu.io(), io);
        Ok(match exit {
            Exit::Halted => RunExit::Halted { interrupts_enabled: self.cpu.core.interrupts_enabled() },
            Exit::WaitForSipi => RunExit::Halted { interrupts_enabled: false },
            Exit::Shutdown => RunExit::Shutdown,
            // An access fault is in `io`: the vCPU layer takes it.
            Exit::Kicked | Exit::Limit | Exit::AccessFault => RunExit::Kicked,
        })
    }

    fn kicker(&self) -> Arc<dyn Kick> {
        self.kick.clone()
    }

    fn dump(&mut self) -> String {
        let s = self.cpu.state();
        let g = &s.gpr;
        let cs = s.segment(SegReg::Cs);
        format!(
            "interp vcpu: eax={:08x} ebx={:08x} ecx={:08x} edx={:08x} esi={:08x} edi={:08x} ebp={:08x} esp={:08x}\n\
             eip={:08x} eflags={:08x} cs={:04x} (base {:08x}) cr0={:08x} cr2={:08x} cr3={:08x} cr4={:08x} retired={}",
            g[0],
            g[3],
            g[1],
            g[2],
            g[6],
            g[7],
            g[5],
            g[4],
            s.eip,
            s.eflags(),
            cs.selector,
            cs.base,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            self.cpu.instructions()
        )
    }

    fn liveness(&mut self) -> Liveness {
        let s = self.cpu.state();
        if s.wait_for_sipi || (s.halted && !self.cpu.core.interrupts_enabled()) {
            Liveness::Dead
        } else if s.halted {
            Liveness::Waiting
        } else {
            Liveness::Running
        }
    }
}
