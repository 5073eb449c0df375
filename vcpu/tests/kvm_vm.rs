//! vCPU threads on KVM (issue 8): a guest's debug-exit write stops the VM
//! with QEMU's status, and pausing, resuming and kicking vCPUs that run
//! guest code without exits never loses a kick or hangs (bounded by a
//! watchdog, not by sleeps). What misbehaving guests do (triple faults
//! among them) is in `guest_misbehaviour.rs`. Skipped with a printed
//! reason where `/dev/kvm` cannot be opened.

mod support;

use std::sync::Arc;
use std::time::Instant;
use support::{kvm_machine as machine, wait_bounded, wait_until, KvmMachine as Machine, WATCHDOG};
use topos_vcpu::board::multiboot::Flat32Entry;
use topos_vcpu::control::Activity;
use topos_vcpu::kvm::KvmVcpu;
use topos_vcpu::vm::StopReason;

/// A vCPU in real mode at `ip` (segment 0), with `bx` set.
fn vcpu_at(m: &Machine, index: u32, ip: u64, bx: u64) -> KvmVcpu {
    let mut v: KvmVcpu = m.kvm.create_vcpu(index).unwrap();
    let mut sregs = v.fd().get_sregs().unwrap();
    for s in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        s.base = 0;
        s.selector = 0;
    }
    v.fd().set_sregs(&sregs).unwrap();
    let mut regs = v.fd().get_regs().unwrap();
    regs.rip = ip;
    regs.rbx = bx;
    regs.rsp = 0x7000;
    regs.rflags = 2;
    v.fd().set_regs(&regs).unwrap();
    // An application processor waits for INIT/SIPI under the in-kernel
    // LAPIC; these tests start every vCPU directly.
    let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
    v.fd().set_mp_state(runnable).unwrap();
    v
}

#[test]
fn a_debug_exit_write_stops_the_vm_with_qemus_status() {
    let Some(m) = machine() else { return };
    // mov al, 0x10; out 0xf4, al; hlt
    m.ram.ram().unwrap().write(0x1000, &[0xb0, 0x10, 0xe6, 0xf4, 0xf4]).unwrap();
    let vm = m.start(vec![vcpu_at(&m, 0, 0x1000, 0)]);
    let reason = wait_bounded(vm);
    assert_eq!(reason, StopReason::DebugExit(0x21));
    assert_eq!(reason.exit_status(), 0x21);
}

/// Waits (bounded) until the counter at `addr` moves past `from`.
fn wait_moves(m: &Machine, addr: u64, from: u32) {
    wait_until(&format!("the vCPU counting at {addr:#x} runs"), || m.read_u32(addr) != from);
}

#[test]
fn pausing_resuming_and_kicking_running_vcpus_never_loses_a_kick() {
    let Some(m) = machine() else { return };
    // inc dword [bx]; jmp $-3 : runs without exits, so only a kick gets the
    // vCPU out of KVM_RUN.
    m.ram.ram().unwrap().write(0x1000, &[0x66, 0xff, 0x07, 0xeb, 0xfb]).unwrap();
    let counters = [0x2000u64, 0x2040];
    let vcpus = counters.iter().enumerate().map(|(i, &c)| vcpu_at(&m, i as u32, 0x1000, c)).collect();
    let vm = m.start(vcpus);
    for &c in &counters {
        wait_moves(&m, c, 0);
    }
    for round in 0..100 {
        vm.pause();
        for v in vm.vcpus() {
            assert_eq!(v.activity(), Activity::Paused, "round {round}: vCPU {} not paused", v.index());
        }
        let frozen: Vec<u32> = counters.iter().map(|&c| m.read_u32(c)).collect();
        // Kicks to paused vCPUs are harmless.
        for v in vm.vcpus() {
            v.kick();
        }
        std::thread::yield_now();
        let again: Vec<u32> = counters.iter().map(|&c| m.read_u32(c)).collect();
        assert_eq!(frozen, again, "round {round}: a paused vCPU ran guest code");
        vm.resume();
        for (i, &c) in counters.iter().enumerate() {
            wait_moves(&m, c, frozen[i]);
        }
        // A bare kick: the vCPU leaves KVM_RUN and goes on.
        vm.vcpus()[round % 2].kick();
    }
    let reason = vm.stop();
    assert_eq!(reason, StopReason::Requested);
    drop(m.topo);
}

/// A device that counts the writes that reach it.
struct Counting(std::sync::atomic::AtomicU64);

impl topos_runtime::MemoryRegionOps for Counting {
    fn read(&self, _addr: u64, _size: u32) -> u64 {
        0
    }
    fn write(&self, _addr: u64, _value: u64, _size: u32) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Waits (bounded) until `e` has been signalled at least `n` times in all;
/// returns how many.
fn wait_signalled(e: &topos_runtime::EventNotifier, n: u64) -> u64 {
    let deadline = Instant::now() + WATCHDOG;
    let mut total = 0;
    while total < n {
        if let Ok(k) = e.read() {
            total += k;
        }
        assert!(Instant::now() < deadline, "the ioeventfd was signalled {total} times, not {n}");
        std::thread::yield_now();
    }
    total
}

#[test]
fn an_ioeventfd_is_signalled_by_kvm_without_an_exit_before_and_after_a_move() {
    let Some(m) = machine() else { return };
    let dev = Arc::new(Counting(Default::default()));
    let region = m.topo.new_io_arc("doorbell", dev.clone(), topos_runtime::OpsConfig::default(), 0x1000).unwrap();
    let e = topos_runtime::new_event_notifier().unwrap();
    region.add_eventfd(0, 4, true, 7, &e).unwrap();
    m.spaces.system.add_subregion_overlap(0x9000, &region, 1).unwrap();
    // The guest writes 7 at 0x9000 and at 0xa000, for ever. (In 32-bit
    // code: this machine's PVM emulates real-mode code and splits a
    // real-mode `mov dword` to MMIO into two 16-bit writes.)
    let code = [
        0xc7, 0x03, 0x07, 0x00, 0x00, 0x00, // mov dword [ebx], 7
        0xc7, 0x83, 0x00, 0x10, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, // mov dword [ebx+0x1000], 7
        0xeb, 0xee, // jmp $-16
    ];
    m.ram.ram().unwrap().write(0x1000, &code).unwrap();
    let v = m.vcpu_flat32(0, Flat32Entry { eip: 0x1000, eax: 0, ebx: 0x9000 });
    let vm = m.start(vec![v]);
    let before = wait_signalled(&e, 1000);
    wait_until("the other write reaches RAM", || m.read_u32(0xa000) == 7);

    // KVM signalled: not one write exited (the runtime would signal too,
    // so the exit count is what tells).
    assert_eq!(vm.vcpus()[0].io_counts().mmio, 0, "doorbell writes exited ({before} signals)");

    // Move the doorbell under the (paused) vCPU to 0xa000.
    vm.pause();
    region.set_address(0xa000).unwrap();
    m.ram.ram().unwrap().write(0x9000, &[0; 4]).unwrap();
    while e.read().is_ok() {}
    vm.resume();
    let after = wait_signalled(&e, 1000);
    wait_until("the write to the old address reaches RAM", || m.read_u32(0x9000) == 7);
    assert_eq!(vm.vcpus()[0].io_counts().mmio, 0, "doorbell writes exited after the move ({after} signals)");
    assert_eq!(dev.0.load(std::sync::atomic::Ordering::Relaxed), 0, "a doorbell write reached the device");
    assert_eq!(vm.stop(), StopReason::Requested);
}

/// A device that logs the values written to it.
struct Logging(std::sync::Mutex<Vec<u64>>);

impl topos_runtime::MemoryRegionOps for Logging {
    fn read(&self, _addr: u64, _size: u32) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn write(&self, _addr: u64, value: u64, _size: u32) {
        self.0.lock().unwrap().push(value);
    }
}

#[test]
fn coalesced_writes_do_not_exit_and_are_replayed_in_order_before_a_flushing_access() {
    let Some(m) = machine() else { return };
    let log = Arc::new(Logging(Default::default()));
    let cfg = topos_runtime::OpsConfig::default();
    let a = m.topo.new_io_arc("coalesced", log.clone(), cfg, 0x1000).unwrap();
    a.add_coalescing(0, 0x1000).unwrap();
    let b = m.topo.new_io_arc("flushing", log.clone(), cfg, 0x1000).unwrap();
    b.set_flush_coalesced().unwrap();
    m.topo
        .transaction(|| {
            m.spaces.system.add_subregion_overlap(0x9000, &a, 1).unwrap();
            m.spaces.system.add_subregion_overlap(0xa000, &b, 1).unwrap();
        })
        .unwrap();
    // mov dword [ebx], 1..3 (coalesced); mov dword [0x8000], 1 (RAM flag);
    // jmp $ (no exit: only the host's access can flush).
    let mut code = Vec::new();
    for v in 1u8..=3 {
        code.extend_from_slice(&[0xc7, 0x03, v, 0, 0, 0]);
    }
    code.extend_from_slice(&[0xc7, 0x05, 0x00, 0x80, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0xeb, 0xfe]);
    m.ram.ram().unwrap().write(0x1000, &code).unwrap();
    let v = m.vcpu_flat32(0, Flat32Entry { eip: 0x1000, eax: 0, ebx: 0x9000 });
    let vm = m.start(vec![v]);
    wait_until("the guest runs", || m.read_u32(0x8000) == 1);
    assert!(log.0.lock().unwrap().is_empty(), "coalesced writes reached the device before a flush");
    // The host reads the flushing register: the ring is drained first.
    assert_eq!(m.spaces.memory.read_u64(0xa000, 4), (3, topos_runtime::MemTxResult::Ok));
    assert_eq!(*log.0.lock().unwrap(), [1, 2, 3]);
    assert_eq!(vm.vcpus()[0].io_counts().mmio, 0, "coalesced writes exited");
    assert_eq!(vm.stop(), StopReason::Requested);
}
