//! An application processor on the interpreter handles every startup IPI
//! waiting for it: an INIT and the SIPI right behind it (a BSP that sends
//! them back to back, as `vcpu/benches/interp` does and QEMU accepts) start
//! the AP at the SIPI's vector instead of leaving it waiting for a SIPI that
//! was already posted.

use std::collections::VecDeque;
use topos_runtime::Topology;
use topos_vcpu::backend::VcpuIo;
use topos_vcpu::interp::{Apic, Cpu, Exit, SegReg, Startup};

/// An APIC that only holds posted startups (not the BSP's).
struct StartupsOnly(VecDeque<Startup>);

impl Apic for StartupsOnly {
    fn page(&self) -> Option<u64> {
        None
    }
    fn read(&mut self, _offset: u32) -> u32 {
        0
    }
    fn write(&mut self, _offset: u32, _value: u32) {}
    fn base_msr(&self) -> u64 {
        0xfee0_0800
    }
    fn set_base_msr(&mut self, _value: u64) -> bool {
        true
    }
    fn attention(&self) -> bool {
        !self.0.is_empty()
    }
    fn take_interrupt(&mut self) -> Option<u8> {
        None
    }
    fn take_nmi(&mut self) -> bool {
        false
    }
    fn take_startup(&mut self) -> Option<Startup> {
        self.0.pop_front()
    }
    fn reset(&mut self) {}
    fn is_bsp(&self) -> bool {
        false
    }
}

#[test]
fn init_then_sipi_posted_together_start_the_ap() {
    let topo = Topology::new();
    let spaces = topo.standard_spaces().unwrap();
    spaces.system.add_subregion(0, &topo.new_ram("ram", 0x10000).unwrap()).unwrap();
    // The SIPI vector 0x08 starts the AP at 0800:0000: `hlt`.
    assert!(spaces.memory.write(0x8000, &[0xf4]).is_ok());
    let apic = StartupsOnly(VecDeque::from([Startup::Init, Startup::Sipi(0x08)]));
    let mut cpu = Cpu::with_io(VcpuIo::new(&spaces.memory, &spaces.io_space), 1, Some(Box::new(apic)));
    assert_eq!(cpu.run(100), Exit::Halted);
    assert_eq!(cpu.state().segment(SegReg::Cs).selector, 0x0800);
    assert_eq!(cpu.state().eip, 1);
}

#[test]
fn an_ap_without_a_sipi_waits() {
    let topo = Topology::new();
    let spaces = topo.standard_spaces().unwrap();
    spaces.system.add_subregion(0, &topo.new_ram("ram", 0x10000).unwrap()).unwrap();
    let apic = StartupsOnly(VecDeque::from([Startup::Init]));
    let mut cpu = Cpu::with_io(VcpuIo::new(&spaces.memory, &spaces.io_space), 1, Some(Box::new(apic)));
    assert_eq!(cpu.run(100), Exit::WaitForSipi);
}
