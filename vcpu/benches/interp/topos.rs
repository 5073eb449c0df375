//! The guest on topos: the `pc` board built by [`Machine::new`] on the
//! interpreter or on KVM, with the bench's marker device over the marker
//! port; and the `dec ecx; jnz` loop through the interpreter's library API
//! alone ([`Cpu::run`], no board).

use super::common::thread_cpu;
use super::guest::{self, Kind, MARK_PORT};
use super::stats::Run;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use topos_devices::uart::SerialSink;
use topos_runtime::{HwAddr, MemoryRegionOps, OpsConfig, Topology};
use topos_vcpu::board::{PcConfig, PciModel};
use topos_vcpu::interp::{Cpu, Exit};
use topos_vcpu::machine::{Accel, Machine};
use topos_vcpu::vm::StopReason;

/// Guest RAM, as QEMU's `pc` default (`-m 128`).
pub const RAM_SIZE: u64 = 128 << 20;

/// A marker time: seconds since the device was made, and the writing
/// thread's CPU time.
type Stamp = (f64, Duration);

/// The marker device over [`MARK_PORT`]: records when each CPU wrote its
/// start and end keys (on the vCPU's thread, as it dispatches the write).
struct Markers {
    base: Instant,
    marks: Mutex<Vec<(Option<Stamp>, Option<Stamp>)>>,
}

impl MemoryRegionOps for Markers {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        0
    }

    fn write(&self, addr: HwAddr, value: u64, _size: u32) {
        let Some((i, end)) = guest::parse_marker_key(value).filter(|_| addr == 0) else { return };
        let now = (self.base.elapsed().as_secs_f64(), thread_cpu());
        if let Some(m) = self.marks.lock().unwrap().get_mut(i) {
            if end {
                m.1 = Some(now);
            } else {
                m.0 = Some(now);
            }
        }
    }
}

/// One run of the guest on topos's board on `accel` with `cpus` vCPUs, each
/// doing `iterations` of `kind`. Checks the exit status and that every
/// vCPU dispatched at least `iterations` accesses of the right kind.
pub fn run(accel: Accel, kind: Kind, iterations: u32, cpus: u32, timeout: Duration) -> Result<Run, String> {
    let config = PcConfig {
        ram_size: RAM_SIZE,
        cpus: cpus as u16,
        bios: guest::bios(kind, iterations, cpus),
        bios_in_flash: false,
        devices: vec![PciModel::Edu, PciModel::Edu],
        serial: SerialSink::Null,
        kernel: None,
    };
    let machine = Machine::new(config, accel).map_err(|e| format!("building the board: {e}"))?;
    let board = machine.board();
    let markers = Arc::new(Markers { base: Instant::now(), marks: Mutex::new(vec![(None, None); cpus as usize]) });
    let region = board
        .topo
        .new_io_arc("bench-markers", markers.clone(), OpsConfig::default(), 2)
        .map_err(|e| format!("marker region: {e}"))?;
    board.spaces.io.add_subregion_overlap(u64::from(MARK_PORT), &region, 1).map_err(|e| e.to_string())?;
    let vm = machine.start().map_err(|e| format!("starting the vCPUs: {e}"))?;
    let handles = vm.vcpus().to_vec();
    let reason = match machine.latch().wait_timeout(timeout) {
        Some(_) => vm.wait(),
        None => {
            vm.stop();
            return Err(format!("{kind:?} on {accel:?} with {cpus} vCPUs: no exit within {timeout:?}"));
        }
    };
    if reason != StopReason::DebugExit(guest::STATUS_OK) {
        let status = guest::describe_status(reason.exit_status());
        return Err(format!("{kind:?} on {accel:?}: {} ({status})", reason.describe()));
    }
    for h in &handles {
        let c = h.io_counts();
        let got = match kind {
            Kind::Loop => u64::from(iterations),
            Kind::PioWrite => c.pio,
            Kind::MmioWrite | Kind::MmioRead => c.mmio,
        };
        if got < u64::from(iterations) {
            return Err(format!("{kind:?} on {accel:?}: vCPU {} dispatched {got} accesses", h.index()));
        }
    }
    let marks = markers.marks.lock().unwrap().clone();
    let mut wall = Vec::new();
    let mut cpu = 0.0;
    for (i, m) in marks.iter().enumerate() {
        let (Some(s), Some(e)) = m else { return Err(format!("vCPU {i}: a marker is missing: {m:?}")) };
        wall.push((s.0, e.0));
        cpu += (e.1 - s.1).as_secs_f64();
    }
    Ok(Run::from_marks(&wall, u64::from(iterations), Some(cpu)))
}

/// The `dec ecx; jnz` loop through the library API: a [`Cpu`] over a
/// topology with only RAM, run to its `hlt` on this thread.
pub fn library_loop(iterations: u32) -> Run {
    let topo = Topology::new();
    let spaces = topo.standard_spaces().unwrap();
    spaces.system.add_subregion(0, &topo.new_ram("ram", 0x10000).unwrap()).unwrap();
    // dec ecx; jnz $-1; hlt
    assert!(spaces.memory.write(0x1000, &[0x49, 0x75, 0xfd, 0xf4]).is_ok());
    let mut cpu = Cpu::new(&spaces.memory, &spaces.io_space);
    cpu.state_mut().enter_flat32(0x1000);
    cpu.state_mut().gpr[1] = iterations;
    let (t, c) = (Instant::now(), thread_cpu());
    let exit = cpu.run(u64::MAX);
    let (elapsed, cpu_time) = (t.elapsed().as_secs_f64(), (thread_cpu() - c).as_secs_f64());
    assert_eq!(exit, Exit::Halted);
    assert_eq!(cpu.instructions(), 2 * u64::from(iterations) + 1);
    Run { iterations: u64::from(iterations), elapsed, cpu: Some(cpu_time) }
}
