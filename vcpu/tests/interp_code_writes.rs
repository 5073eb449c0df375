//! The interpreter's caches follow the machine: decoded blocks are dropped
//! when their code is written (by the guest itself, by the host or a
//! device, by another vCPU), and the software TLB follows the memory view
//! (a region mapped over RAM) and the page tables (`invlpg`, CR3 loads).

use topos_runtime::{StandardSpaces, Topology};
use topos_vcpu::interp::{Cpu, Exit};

fn machine() -> (Topology, StandardSpaces) {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    s.system.add_subregion(0, &topo.new_ram("ram", 0x40_0000).unwrap()).unwrap();
    (topo, s)
}

fn load(s: &StandardSpaces, addr: u64, bytes: &[u8]) {
    assert_eq!(s.memory.write(addr, bytes), topos_runtime::MemTxResult::Ok);
}

fn run_from(cpu: &mut Cpu, eip: u32) -> Exit {
    let st = cpu.state_mut();
    st.halted = false;
    st.eip = eip;
    cpu.run(10_000)
}

#[test]
fn a_guest_that_patches_the_next_instruction_runs_the_patched_one() {
    let (_t, s) = machine();
    // mov byte [0x1008], 7 (the immediate of the mov below); mov eax, 1; hlt
    let code = [0xc6, 0x05, 0x08, 0x10, 0, 0, 7, 0xb8, 1, 0, 0, 0, 0xf4];
    load(&s, 0x1000, &code);
    let mut cpu = Cpu::new(&s.memory, &s.io_space);
    cpu.state_mut().enter_flat32(0x1000);
    assert_eq!(cpu.run(100), Exit::Halted);
    assert_eq!(cpu.state().gpr[0], 7, "the mov ran as patched, in the same block as the store");
}

#[test]
fn code_written_by_the_host_between_runs_is_decoded_again() {
    let (_t, s) = machine();
    // mov eax, 1; hlt
    load(&s, 0x2000, &[0xb8, 1, 0, 0, 0, 0xf4]);
    let mut cpu = Cpu::new(&s.memory, &s.io_space);
    cpu.state_mut().enter_flat32(0x2000);
    assert_eq!(cpu.run(100), Exit::Halted);
    assert_eq!(cpu.state().gpr[0], 1);
    // The block is cached; a DMA-like write from the host replaces it.
    load(&s, 0x2001, &[2]);
    assert_eq!(run_from(&mut cpu, 0x2000), Exit::Halted);
    assert_eq!(cpu.state().gpr[0], 2);
}

#[test]
fn code_written_by_another_vcpu_is_seen() {
    let (_t, s) = machine();
    // CPU A runs `mov eax, 1; hlt` from 0x3000; CPU B, on another thread,
    // writes `mov eax, 3` over it.
    load(&s, 0x3000, &[0xb8, 1, 0, 0, 0, 0xf4]);
    // CPU B: mov byte [0x3001], 3; hlt
    load(&s, 0x4000, &[0xc6, 0x05, 0x01, 0x30, 0, 0, 3, 0xf4]);
    let mut a = Cpu::new(&s.memory, &s.io_space);
    let mut b = Cpu::new(&s.memory, &s.io_space);
    a.state_mut().enter_flat32(0x3000);
    b.state_mut().enter_flat32(0x4000);
    assert_eq!(a.run(100), Exit::Halted);
    assert_eq!(a.state().gpr[0], 1);
    let b = std::thread::spawn(move || b.run(100)).join().unwrap();
    assert_eq!(b, Exit::Halted);
    assert_eq!(run_from(&mut a, 0x3000), Exit::Halted);
    assert_eq!(a.state().gpr[0], 3);
}

#[test]
fn the_tlb_follows_a_region_mapped_over_ram() {
    let (topo, s) = machine();
    load(&s, 0x5000, &0x1111_1111u32.to_le_bytes());
    // mov eax, [0x5000]; hlt
    load(&s, 0x6000, &[0xa1, 0, 0x50, 0, 0, 0xf4]);
    let mut cpu = Cpu::new(&s.memory, &s.io_space);
    cpu.state_mut().enter_flat32(0x6000);
    assert_eq!(cpu.run(100), Exit::Halted);
    assert_eq!(cpu.state().gpr[0], 0x1111_1111);
    let over = topo.new_ram("over", 0x1000).unwrap();
    s.system.add_subregion_overlap(0x5000, &over, 1).unwrap();
    load(&s, 0x5000, &0x2222_2222u32.to_le_bytes());
    assert_eq!(run_from(&mut cpu, 0x6000), Exit::Halted);
    assert_eq!(cpu.state().gpr[0], 0x2222_2222, "the page now maps the new region");
    s.system.del_subregion(&over).unwrap();
    assert_eq!(run_from(&mut cpu, 0x6000), Exit::Halted);
    assert_eq!(cpu.state().gpr[0], 0x1111_1111, "and the RAM again once it is gone");
}

/// 32-bit paging: the page directory at 0x10000 maps 0..4 MiB with 4 KiB
/// pages from the table at 0x11000, identity but for linear 0x8000.
fn page_tables(s: &StandardSpaces, frame_of_8000: u32) {
    load(s, 0x10000, &(0x11000u32 | 3).to_le_bytes());
    let mut pt = Vec::new();
    for i in 0..1024u32 {
        let frame = if i == 8 { frame_of_8000 } else { i << 12 };
        pt.extend_from_slice(&(frame | 3).to_le_bytes());
    }
    load(s, 0x11000, &pt);
}

#[test]
fn invlpg_and_cr3_loads_drop_stale_translations() {
    let (_t, s) = machine();
    load(&s, 0x20000, &0xaaaa_aaaau32.to_le_bytes());
    load(&s, 0x21000, &0xbbbb_bbbbu32.to_le_bytes());
    page_tables(&s, 0x20000);
    // mov eax, [0x8000]; hlt
    load(&s, 0x6000, &[0xa1, 0, 0x80, 0, 0, 0xf4]);
    // invlpg [0x8000]; mov eax, [0x8000]; hlt
    load(&s, 0x6100, &[0x0f, 0x01, 0x3d, 0, 0x80, 0, 0, 0xa1, 0, 0x80, 0, 0, 0xf4]);
    // mov eax, cr3; mov cr3, eax; mov eax, [0x8000]; hlt
    load(&s, 0x6200, &[0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8, 0xa1, 0, 0x80, 0, 0, 0xf4]);
    let mut cpu = Cpu::new(&s.memory, &s.io_space);
    {
        let st = cpu.state_mut();
        st.enter_flat32(0x6000);
        st.cr3 = 0x10000;
        st.cr0 |= 1 << 31;
    }
    assert_eq!(cpu.run(100), Exit::Halted);
    assert_eq!(cpu.state().gpr[0], 0xaaaa_aaaa);
    // Point linear 0x8000 at the other frame; invlpg makes it visible.
    load(&s, 0x11000 + 8 * 4, &(0x21000u32 | 3).to_le_bytes());
    assert_eq!(run_from(&mut cpu, 0x6100), Exit::Halted);
    assert_eq!(cpu.state().gpr[0], 0xbbbb_bbbb);
    // And back, through a CR3 load.
    load(&s, 0x11000 + 8 * 4, &(0x20000u32 | 3).to_le_bytes());
    assert_eq!(run_from(&mut cpu, 0x6200), Exit::Halted);
    assert_eq!(cpu.state().gpr[0], 0xaaaa_aaaa);
}

/// A device whose first read maps `over` at 0x5000 (a commit made while
/// the vCPU is inside a block).
struct Remapper(std::sync::Mutex<Option<(topos_runtime::MemoryRegion, topos_runtime::MemoryRegion)>>);

impl topos_runtime::MemoryRegionOps for Remapper {
    fn read(&self, _addr: u64, _size: u32) -> u64 {
        if let Some((system, over)) = self.0.lock().unwrap().take() {
            system.add_subregion_overlap(0x5000, &over, 1).unwrap();
        }
        0
    }
    fn write(&self, _addr: u64, _value: u64, _size: u32) {}
}

/// RAM holding 0x1111_1111 at 0x5000, and a [`Remapper`] at 0x500000
/// that maps a zeroed page over it.
fn remapping_machine() -> (Topology, StandardSpaces) {
    let (topo, s) = machine();
    load(&s, 0x5000, &0x1111_1111u32.to_le_bytes());
    let over = topo.new_ram("over", 0x1000).unwrap();
    let dev = Remapper(std::sync::Mutex::new(Some((s.system.clone(), over))));
    let dev = topo.new_io("remapper", dev, topos_runtime::OpsConfig::default(), 0x1000).unwrap();
    s.system.add_subregion(0x50_0000, &dev).unwrap();
    (topo, s)
}

#[test]
fn the_tlb_follows_a_view_change_that_a_later_device_access_loaded_first() {
    // Within one run: the TLB takes 0x5000 → RAM; a device read maps
    // another region there; a second device read brings the vCPU's memory
    // path up to the new view; the next block must still see that the TLB
    // was filled from the old one.
    let (_topo, s) = remapping_machine();
    // mov eax, [0x5000]; mov ebx, [0x500000]; mov ebx, [0x500000];
    // jmp 0x7100
    let code = [0xa1, 0, 0x50, 0, 0, 0x8b, 0x1d, 0, 0, 0x50, 0, 0x8b, 0x1d, 0, 0, 0x50, 0, 0xe9, 0xea, 0, 0, 0];
    load(&s, 0x7000, &code);
    // mov eax, [0x5000]; hlt
    load(&s, 0x7100, &[0xa1, 0, 0x50, 0, 0, 0xf4]);
    let mut cpu = Cpu::new(&s.memory, &s.io_space);
    cpu.state_mut().enter_flat32(0x7000);
    assert_eq!(cpu.run(100), Exit::Halted);
    assert_eq!(cpu.state().gpr[0], 0, "the page maps the (zeroed) region the device mapped");
}

#[test]
fn a_self_looping_block_follows_a_view_change_that_a_device_access_loaded() {
    // As above, in a loop that runs until it sees the new region: the
    // block runs again without a look-up, which must not skip the check.
    let (_topo, s) = remapping_machine();
    // 0x7000: mov eax, [0x5000]; mov ebx, [0x500000]; mov ebx, [0x500000];
    // test eax, eax; jnz 0x7000; hlt
    let code =
        [0xa1, 0, 0x50, 0, 0, 0x8b, 0x1d, 0, 0, 0x50, 0, 0x8b, 0x1d, 0, 0, 0x50, 0, 0x85, 0xc0, 0x75, 0xeb, 0xf4];
    load(&s, 0x7000, &code);
    let mut cpu = Cpu::new(&s.memory, &s.io_space);
    cpu.state_mut().enter_flat32(0x7000);
    assert_eq!(cpu.run(1000), Exit::Halted, "the loop saw the new region");
    assert_eq!(cpu.state().gpr[0], 0);
}
