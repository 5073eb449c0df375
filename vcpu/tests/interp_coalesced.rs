//! Coalesced MMIO on the interpreter: writes to a coalesced range wait in
//! the vCPU's buffer until a flush, then reach the device in order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use topos_runtime::{HwAddr, MemoryRegionOps, OpsConfig, StandardSpaces, Topology};
use topos_vcpu::interp::{CoalescedMmio, Cpu, Exit};

#[derive(Default)]
struct Recorder(Mutex<Vec<(HwAddr, u64)>>);

struct Dev(Arc<Recorder>);

impl MemoryRegionOps for Dev {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        self.0 .0.lock().unwrap().len() as u64
    }
    fn write(&self, addr: HwAddr, value: u64, _size: u32) {
        self.0 .0.lock().unwrap().push((addr, value));
    }
}

const DEV: u32 = 0x10_0000;
const FLUSHER: u32 = 0x20_0000;
const READY: u32 = 0x3000;
const GO: u32 = 0x3004;
const SEEN: u32 = 0x3008;

/// mov dword [DEV+4*i], i+1 (i < 3); mov dword [READY], 1;
/// spin: cmp dword [GO], 0; je spin; mov eax, [FLUSHER]; mov [SEEN], eax; hlt
fn guest() -> Vec<u8> {
    let mut c = Vec::new();
    for i in 0..3u32 {
        c.extend_from_slice(&[0xc7, 0x05]);
        c.extend_from_slice(&(DEV + 4 * i).to_le_bytes());
        c.extend_from_slice(&(i + 1).to_le_bytes());
    }
    c.extend_from_slice(&[0xc7, 0x05]);
    c.extend_from_slice(&READY.to_le_bytes());
    c.extend_from_slice(&1u32.to_le_bytes());
    let spin = c.len();
    c.extend_from_slice(&[0x83, 0x3d]);
    c.extend_from_slice(&GO.to_le_bytes());
    c.push(0);
    let back = (spin as i32 - (c.len() as i32 + 2)) as i8;
    c.extend_from_slice(&[0x74, back as u8]);
    c.push(0xa1);
    c.extend_from_slice(&FLUSHER.to_le_bytes());
    c.push(0xa3);
    c.extend_from_slice(&SEEN.to_le_bytes());
    c.push(0xf4);
    c
}

/// RAM with the guest at 0x1000, the coalesced device at [`DEV`] and the
/// flush-coalesced one at [`FLUSHER`], both recording into the recorder.
fn machine() -> (Topology, StandardSpaces, Arc<Recorder>) {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    s.system.add_subregion(0, &topo.new_ram("ram", 0x10000).unwrap()).unwrap();
    let rec = Arc::new(Recorder::default());
    let dev = topo.new_io("dev", Dev(rec.clone()), OpsConfig::default(), 0x1000).unwrap();
    dev.add_coalescing(0, 0x100).unwrap();
    s.system.add_subregion(u64::from(DEV), &dev).unwrap();
    let flusher = topo.new_io("flusher", Dev(rec.clone()), OpsConfig::default(), 0x1000).unwrap();
    flusher.set_flush_coalesced().unwrap();
    s.system.add_subregion(u64::from(FLUSHER), &flusher).unwrap();
    let _ = s.memory.write(0x1000, &guest());
    (topo, s, rec)
}

#[test]
fn coalesced_writes_wait_for_a_flush_and_arrive_in_order() {
    let (topo, s, rec) = machine();

    let coalesced = CoalescedMmio::install(&topo, &s.memory);
    let mut cpu = Cpu::new(&s.memory, &s.io_space);
    cpu.set_coalesced_buffer(coalesced.buffer());
    cpu.state_mut().enter_flat32(0x1000);
    let vcpu = std::thread::spawn(move || (cpu.run(100_000_000), cpu));

    let deadline = Instant::now() + Duration::from_secs(30);
    let read = |a: u32| {
        let mut b = [0u8; 4];
        let _ = s.memory.read(u64::from(a), &mut b);
        u32::from_le_bytes(b)
    };
    while read(READY) == 0 {
        assert!(Instant::now() < deadline, "the guest never got past its writes");
        std::thread::yield_now();
    }
    // The guest made its three writes and spins on RAM: nothing flushed.
    assert!(rec.0.lock().unwrap().is_empty(), "coalesced writes were dispatched before a flush");
    topo.flush_coalesced_mmio();
    let expected = vec![(0, 1), (4, 2), (8, 3)];
    assert_eq!(*rec.0.lock().unwrap(), expected);
    let _ = s.memory.write(u64::from(GO), &1u32.to_le_bytes());
    let (exit, _cpu) = vcpu.join().unwrap();
    assert_eq!(exit, Exit::Halted);
    // The flush region's read saw the three writes.
    assert_eq!(read(SEEN), 3);
}

#[test]
fn an_access_to_a_flush_region_replays_the_buffer_first() {
    let (topo, s, rec) = machine();
    let _ = s.memory.write(u64::from(GO), &1u32.to_le_bytes());
    let coalesced = CoalescedMmio::install(&topo, &s.memory);
    let mut cpu = Cpu::new(&s.memory, &s.io_space);
    cpu.set_coalesced_buffer(coalesced.buffer());
    cpu.state_mut().enter_flat32(0x1000);
    assert_eq!(cpu.run(1000), Exit::Halted);
    let mut b = [0u8; 4];
    let _ = s.memory.read(u64::from(SEEN), &mut b);
    assert_eq!(u32::from_le_bytes(b), 3);
    assert_eq!(*rec.0.lock().unwrap(), vec![(0, 1), (4, 2), (8, 3)]);
}
