//! The interpreter runner: one [`Cpu`] for every case, over RAM laid out
//! as the KVM runner's, its registers set directly (the modes KVM enters
//! with `KVM_SET_SREGS`), run until the `hlt` after the case's `out` or a
//! fault stub's.

use super::case::Case;
use super::frame::{unwind, Frame};
use super::layout::*;
use super::outcome::{End, Outcome, State};
use super::registry::Profile;
use topos_runtime::{MemoryRegion, StandardSpaces, Topology};
use topos_vcpu::interp::{Cpu, CpuState, DescriptorTable, Exit, SegReg, Segment};

/// More instructions than any case runs.
const LIMIT: u64 = 1_000_000;

/// The interpreter with its own topology and RAM.
pub struct InterpRunner {
    cpu: Cpu,
    ram: MemoryRegion,
    _spaces: StandardSpaces,
    _topo: Topology,
}

impl InterpRunner {
    /// A CPU over 2 MiB of RAM holding the system image.
    pub fn new() -> InterpRunner {
        let topo = Topology::new();
        let spaces = topo.standard_spaces().unwrap();
        let ram = topo.new_ram("ram", RAM_SIZE.into()).unwrap();
        spaces.system.add_subregion(0, &ram).unwrap();
        for (addr, bytes) in system_image() {
            ram.ram().unwrap().write(addr, &bytes).unwrap();
        }
        let cpu = Cpu::new(&spaces.memory, &spaces.io_space);
        InterpRunner { cpu, ram, _spaces: spaces, _topo: topo }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.ram.ram().unwrap().read(addr, &mut b).unwrap();
        b
    }

    /// The registers `profile`'s cases start from (as the KVM runner sets
    /// them for ring 0 and real mode).
    fn enter(&mut self, profile: Profile, start: &State) {
        let s = self.cpu.state_mut();
        *s = CpuState::reset();
        if profile == Profile::Real {
            s.cr0 = 0x10;
            let data = Segment::real_mode((WINDOW >> 4) as u16, false);
            s.seg = [data; 6];
            s.seg[SegReg::Cs as usize] = Segment::real_mode((CODE >> 4) as u16, true);
            s.idtr = DescriptorTable { base: IVT as u32, limit: u16::from(VECTORS) * 4 - 1 };
        } else {
            s.cr0 = 0x31;
            let data = Segment::flat32(SEL_DATA0, false);
            s.seg = [data; 6];
            s.seg[SegReg::Cs as usize] = Segment::flat32(SEL_CODE32, true);
            s.idtr = DescriptorTable { base: IDT32 as u32, limit: u16::from(VECTORS) * 8 - 1 };
            s.tr = Segment { selector: SEL_TSS32, base: TSS32 as u32, limit: 0x67, attrs: 0x8b };
        }
        s.gdtr = DescriptorTable { base: GDT as u32, limit: GDT_LIMIT };
        s.gpr = start.gpr;
        s.eip = start.eip;
        s.set_eflags(start.eflags);
    }

    /// Runs `case`: 64-bit-compatible and ring-0 cases in 32-bit protected
    /// mode at CPL 0, real-mode cases in real mode.
    pub fn run_case(&mut self, case: &Case) -> Outcome {
        let ram = self.ram.ram().unwrap();
        ram.write(CODE, &case.code).unwrap();
        ram.write(WINDOW, &case.window).unwrap();
        ram.write(RING0_STACK_TOP - 0x40, &[0; 0x40]).unwrap();
        self.enter(case.profile, &case.start);
        let exit = self.cpu.run(LIMIT);
        let s = self.cpu.state();
        let mut state = State { gpr: s.gpr, eip: s.eip, eflags: s.eflags() };
        let cs_base = s.segment(SegReg::Cs).base;
        let stubs = STUBS as u32..STUBS as u32 + 4 * u32::from(VECTORS);
        let end = match exit {
            Exit::Halted if cs_base == case.code_base() && state.eip == case.terminator() + 3 => {
                state.eip = case.terminator();
                End::Terminated
            }
            Exit::Halted if cs_base == 0 && stubs.contains(&state.eip) => {
                let vector = ((state.eip - STUBS as u32) / 4) as u8;
                let frame = if case.profile == Profile::Real { Frame::Real } else { Frame::Prot32 };
                unwind(frame, vector, &mut state, |addr, len| self.read(addr, len))
            }
            Exit::Halted => End::Other(format!("halted at {:#x}:{:#x}", s.segment(SegReg::Cs).selector, state.eip)),
            Exit::Shutdown => End::Shutdown,
            other => End::Other(format!("interpreter exit {other:?}")),
        };
        Outcome { end, state, window: self.read(WINDOW, WINDOW_SIZE) }
    }
}
