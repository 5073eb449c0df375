//! The interpreter's runner: a fresh [`Cpu`] per scenario (an empty TLB and
//! block cache, as a fresh QEMU CPU would not have, but nothing stale can
//! matter: the scenario loads CR3 first), over 8 MiB of RAM holding the
//! scenario at [`BASE`], entered as QEMU's harness enters it: flat 32-bit
//! ring 0, paging off, EFER.NXE as the scenario asks (the interpreter's
//! `wrmsr` does not model EFER, so the runner sets it, as the harness does
//! with `wrmsr` on QEMU).

use super::gen::Scenario;
use super::guest::{Image, HLT};
use super::layout::*;
use super::outcome::{End, Outcome};
use topos_runtime::{MemoryRegion, StandardSpaces, Topology};
use topos_vcpu::interp::{Cpu, Exit};

/// More instructions than any scenario runs.
const LIMIT: u64 = 1_000_000;

/// The interpreter with its own machine.
pub struct InterpRunner {
    ram: MemoryRegion,
    spaces: StandardSpaces,
    _topo: Topology,
}

impl InterpRunner {
    pub fn new() -> InterpRunner {
        let topo = Topology::new();
        let spaces = topo.standard_spaces().expect("address spaces");
        let ram = topo.new_ram("ram", 8 << 20).expect("RAM");
        spaces.system.add_subregion(0, &ram).expect("RAM mapped");
        InterpRunner { ram, spaces, _topo: topo }
    }

    /// Runs scenario `s` built as `img`.
    pub fn run(&mut self, s: &Scenario, img: &Image) -> Outcome {
        let ram = self.ram.ram().expect("RAM");
        ram.write(BASE, &img.bytes).expect("the image fits");
        ram.write(BASE + off::RET, &HLT.to_le_bytes()).expect("the image fits");
        let mut cpu = Cpu::new(&self.spaces.memory, &self.spaces.io_space);
        let st = cpu.state_mut();
        st.enter_flat32(at(off::MAIN));
        st.efer = if s.paging.nx() { 1 << 11 } else { 0 };
        let exit = cpu.run(LIMIT);
        let eip = cpu.state().eip;
        let end = match exit {
            Exit::Halted if eip == HLT + 1 => End::Finished,
            Exit::Shutdown => End::Shutdown,
            other => End::Other(format!("{other:?} at EIP {eip:#x}")),
        };
        let mut bytes = vec![0u8; USED];
        ram.read(BASE, &mut bytes).expect("the image fits");
        Outcome { end, bytes }
    }
}
