//! The KVM memslot mirror under a running vCPU (issue 8, acceptance 2, in
//! part): RAM added, moved and removed, ROM as a read-only slot whose guest
//! writes exit and are dropped, a ROM device's romd mode switched on and
//! off, and the dirty log of guest writes made through KVM reaching
//! `get_dirty`.
//!
//! The guest is a few real-mode instructions in a RAM slot at 0x1000 that
//! loop forever: read (or write) a byte at 0x8000 and report it on port
//! 0x10. A test thread runs the vCPU and dispatches its MMIO exits through
//! an `Accessor` of the same address space, as the vCPU layer will; the test
//! changes the topology while the guest runs and waits (bounded by a
//! watchdog, not by sleeps) until the guest reports what the new map must
//! give. Skipped with a printed reason where `/dev/kvm` cannot be opened.

#![cfg(target_arch = "x86_64")]

mod support;

use kvm_ioctls::{Kvm, VcpuExit};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use topos_runtime::{DirtyClient, HwAddr, MemoryRegion, MemoryRegionOps, OpsConfig, StandardSpaces, Topology};
use topos_vcpu::kvm::memslots::enable_manual_dirty_log_protect;
use topos_vcpu::kvm::MemslotMirror;

/// Where the guest's code is.
const CODE: u64 = 0x1000;
/// The byte the guest reads or writes.
const DATA: u64 = 0x8000;
/// How long a change may take to show in the guest before the test fails.
const WATCHDOG: Duration = Duration::from_secs(20);

/// `mov al, [0x8000]; out 0x10, al; jmp $-7`
const READ_LOOP: &[u8] = &[0xa0, 0x00, 0x80, 0xe6, 0x10, 0xeb, 0xf9];
/// `inc byte [0x8000]; mov al, [0x8000]; out 0x10, al; jmp $-11`
const WRITE_LOOP: &[u8] = &[0xfe, 0x06, 0x00, 0x80, 0xa0, 0x00, 0x80, 0xe6, 0x10, 0xeb, 0xf5];

/// `/dev/kvm`, or `None` after saying why the test skips.
fn kvm() -> Option<Kvm> {
    support::kvm_present().then(|| Kvm::new().expect("/dev/kvm opened a moment ago"))
}

/// A device that reads as a constant and counts writes.
struct Device {
    value: u8,
    writes: AtomicU64,
}

impl MemoryRegionOps for Device {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        self.value as u64
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

struct Guest {
    topo: Topology,
    spaces: StandardSpaces,
    mirror: Arc<MemslotMirror>,
    reports: mpsc::Receiver<u8>,
    stop: Arc<AtomicBool>,
    mmio_exits: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    _code: MemoryRegion,
}

impl Guest {
    /// A VM whose memory mirrors `system`, with `code` at [`CODE`], running.
    fn start(kvm: &Kvm, code: &[u8], setup: impl FnOnce(&Topology, &StandardSpaces)) -> Guest {
        let topo = Topology::new();
        let spaces = topo.standard_spaces().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        // As `KvmVm` does: manual dirty-log protection where the kernel has it.
        let manual = enable_manual_dirty_log_protect(kvm, &vm);
        let mirror = Arc::new(MemslotMirror::new(vm.clone(), kvm.get_nr_memslots() as u32).with_manual_protect(manual));
        topo.listener_register(mirror.clone(), 0, Some(&spaces.memory)).unwrap();

        let code_ram = topo.new_ram("code", 0x1000).unwrap();
        code_ram.ram().unwrap().write(0, code).unwrap();
        spaces.system.add_subregion(CODE, &code_ram).unwrap();
        setup(&topo, &spaces);

        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        sregs.ds.base = 0;
        sregs.ds.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = CODE;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();

        let (tx, reports) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mmio_exits = Arc::new(AtomicU64::new(0));
        let mut acc = spaces.memory.accessor();
        let (stop2, exits2) = (stop.clone(), mmio_exits.clone());
        let thread = std::thread::spawn(move || {
            let _vm = vm;
            while !stop2.load(Ordering::Relaxed) {
                match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
                    VcpuExit::IoOut(0x10, data) => {
                        if tx.send(data[0]).is_err() {
                            return Ok(());
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        exits2.fetch_add(1, Ordering::Relaxed);
                        let _ = acc.read(addr, data);
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        exits2.fetch_add(1, Ordering::Relaxed);
                        let _ = acc.write(addr, data);
                    }
                    other => return Err(format!("unexpected exit {other:?}")),
                }
            }
            Ok(())
        });
        Guest { topo, spaces, mirror, reports, stop, mmio_exits, thread: Some(thread), _code: code_ram }
    }

    /// Waits until the guest reports a value `ok` accepts; returns it.
    fn wait_for(&self, what: &str, ok: impl Fn(u8) -> bool) -> u8 {
        let deadline = Instant::now() + WATCHDOG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(v) if ok(v) => return v,
                Ok(_) => {}
                Err(e) => panic!("the guest never reported {what} ({e})"),
            }
        }
    }

    /// Drops the reports made so far (made under the previous map).
    fn drain(&self) {
        while self.reports.try_recv().is_ok() {}
    }

    fn slot_at(&self, gpa: u64) -> Option<topos_vcpu::kvm::Slot> {
        self.mirror.slots().into_iter().find(|s| s.gpa == gpa)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The guest exits on every loop iteration; dropping the receiver
        // ends the thread at its next report.
        let (_tx, rx) = mpsc::channel();
        drop(std::mem::replace(&mut self.reports, rx));
        if let Some(t) = self.thread.take() {
            let r = t.join().expect("the vCPU thread panicked");
            if !std::thread::panicking() {
                r.expect("the vCPU thread failed");
            }
        }
    }
}

fn ram_filled(topo: &Topology, name: &str, byte: u8) -> MemoryRegion {
    let r = topo.new_ram(name, 0x1000).unwrap();
    r.ram().unwrap().write(0, &[byte; 0x1000]).unwrap();
    r
}

#[test]
fn ram_added_moved_and_removed_under_a_running_vcpu() {
    let Some(kvm) = kvm() else { return };
    let g = Guest::start(&kvm, READ_LOOP, |_, _| {});
    let a = ram_filled(&g.topo, "a", 0xaa);
    let b = ram_filled(&g.topo, "b", 0xbb);

    // Nothing at DATA yet: the read exits and the runtime answers 0.
    g.wait_for("0 from an unassigned address", |v| v == 0);
    assert!(g.mmio_exits.load(Ordering::Relaxed) > 0);

    g.spaces.system.add_subregion(DATA, &a).unwrap();
    let slot = g.slot_at(DATA).expect("a slot for `a`");
    assert!(!slot.readonly && slot.size == 0x1000);
    g.drain();
    g.wait_for("0xaa from `a`", |v| v == 0xaa);
    // Served by the slot now: reads no longer exit.
    let exits = g.mmio_exits.load(Ordering::Relaxed);
    g.drain();
    for _ in 0..100 {
        assert_eq!(g.wait_for("a report", |_| true), 0xaa);
    }
    assert_eq!(g.mmio_exits.load(Ordering::Relaxed), exits, "reads of a RAM slot exited");

    // Replace `a` by `b` in one transaction, then move `b` away and back.
    g.topo
        .transaction(|| {
            g.spaces.system.del_subregion(&a).unwrap();
            g.spaces.system.add_subregion(DATA, &b).unwrap();
        })
        .unwrap();
    g.drain();
    g.wait_for("0xbb from `b`", |v| v == 0xbb);
    assert_eq!(g.mirror.slots().len(), 2, "code and `b`: {:?}", g.mirror.slots());

    b.set_address(0x20000).unwrap();
    assert!(g.slot_at(DATA).is_none() && g.slot_at(0x20000).is_some());
    g.drain();
    g.wait_for("0 once `b` moved away", |v| v == 0);
    b.set_address(DATA).unwrap();
    g.drain();
    g.wait_for("0xbb once `b` is back", |v| v == 0xbb);

    g.spaces.system.del_subregion(&b).unwrap();
    assert_eq!(g.mirror.slots().len(), 1, "only the code's slot is left");
    g.drain();
    g.wait_for("0 once `b` is gone", |v| v == 0);
}

#[test]
fn rom_is_a_read_only_slot_whose_guest_writes_exit_and_are_dropped() {
    let Some(kvm) = kvm() else { return };
    let rom = Arc::new(std::sync::Mutex::new(None));
    let rom2 = rom.clone();
    let g = Guest::start(&kvm, WRITE_LOOP, move |topo, spaces| {
        let r = topo.new_rom("rom", 0x1000).unwrap();
        r.ram().unwrap().write(0, &[0x42; 0x1000]).unwrap();
        spaces.system.add_subregion(DATA, &r).unwrap();
        *rom2.lock().unwrap() = Some(r);
    });
    let slot = g.slot_at(DATA).expect("a slot for the ROM");
    assert!(slot.readonly);
    // The guest increments the byte and reads it back: the write exits, is
    // dropped, and the read (from the slot) still gives the ROM's content.
    for _ in 0..50 {
        assert_eq!(g.wait_for("a report", |_| true), 0x42);
    }
    assert!(g.mmio_exits.load(Ordering::Relaxed) >= 50, "each write to ROM exits");
    let mut byte = [0];
    rom.lock().unwrap().as_ref().unwrap().ram().unwrap().read(0, &mut byte).unwrap();
    assert_eq!(byte, [0x42]);
}

#[test]
fn a_rom_device_is_a_slot_in_romd_mode_only() {
    let Some(kvm) = kvm() else { return };
    let dev = Arc::new(Device { value: 0x5a, writes: AtomicU64::new(0) });
    let holder = Arc::new(std::sync::Mutex::new(None));
    let (dev2, holder2) = (dev.clone(), holder.clone());
    let g = Guest::start(&kvm, READ_LOOP, move |topo, spaces| {
        let r = topo.new_rom_device_arc("flash", dev2, OpsConfig::default(), 0x1000).unwrap();
        r.ram().unwrap().write(0, &[0xdd; 0x1000]).unwrap();
        spaces.system.add_subregion(DATA, &r).unwrap();
        *holder2.lock().unwrap() = Some(r);
    });
    let flash = holder.lock().unwrap().clone().unwrap();
    assert!(g.slot_at(DATA).is_some_and(|s| s.readonly), "romd mode: a read-only slot");
    g.wait_for("0xdd from the array", |v| v == 0xdd);

    flash.rom_device_set_readable(false).unwrap();
    assert!(g.slot_at(DATA).is_none(), "outside romd mode: no slot");
    g.drain();
    g.wait_for("0x5a from the device", |v| v == 0x5a);
    assert!(g.mmio_exits.load(Ordering::Relaxed) > 0);

    flash.rom_device_set_readable(true).unwrap();
    assert!(g.slot_at(DATA).is_some_and(|s| s.readonly));
    g.drain();
    g.wait_for("0xdd from the array again", |v| v == 0xdd);
    assert_eq!(dev.writes.load(Ordering::Relaxed), 0);
}

#[test]
fn guest_writes_through_kvm_reach_the_dirty_log() {
    let Some(kvm) = kvm() else { return };
    let holder = Arc::new(std::sync::Mutex::new(None));
    let holder2 = holder.clone();
    let g = Guest::start(&kvm, WRITE_LOOP, move |topo, spaces| {
        let r = topo.new_ram("vram", 0x4000).unwrap();
        spaces.system.add_subregion(DATA, &r).unwrap();
        *holder2.lock().unwrap() = Some(r);
    });
    let vram = holder.lock().unwrap().clone().unwrap();
    assert!(g.slot_at(DATA).is_some_and(|s| !s.log_dirty));

    vram.set_log(true, DirtyClient::Vga).unwrap();
    assert!(g.slot_at(DATA).is_some_and(|s| s.log_dirty), "log_start sets KVM_MEM_LOG_DIRTY_PAGES");
    // Harvest whatever is pending, then see that fresh guest writes arrive.
    g.topo.sync_dirty_bitmap(&vram).unwrap();
    vram.reset_dirty(0, 0x4000, DirtyClient::Vga).unwrap();
    g.drain();
    let seen = g.wait_for("a write", |_| true);
    g.wait_for("the next write", |v| v != seen);
    g.topo.sync_dirty_bitmap(&vram).unwrap();
    assert!(vram.get_dirty(0, 1, DirtyClient::Vga).unwrap(), "the guest's page is dirty after log_sync");
    assert!(!vram.get_dirty(0x1000, 0x3000, DirtyClient::Vga).unwrap(), "pages it did not write are clean");
    assert_eq!(g.mmio_exits.load(Ordering::Relaxed), 0, "the writes went through the slot");

    vram.set_log(false, DirtyClient::Vga).unwrap();
    assert!(g.slot_at(DATA).is_some_and(|s| !s.log_dirty), "log_stop clears the flag");
}

/// `mov byte [0x8000], 1`, then `out 0x10, al; jmp $-2` for ever: one
/// write, then reports (exits) that let the harness stop the vCPU.
const WRITE_ONCE: &[u8] = &[0xc6, 0x06, 0x00, 0x80, 0x01, 0xe6, 0x10, 0xeb, 0xfc];

#[test]
fn a_harvest_clears_kvms_log_so_a_page_written_once_is_reported_once() {
    let Some(kvm) = kvm() else { return };
    let holder = Arc::new(std::sync::Mutex::new(None));
    let holder2 = holder.clone();
    let g = Guest::start(&kvm, WRITE_ONCE, move |topo, spaces| {
        let r = topo.new_ram("vram", 0x4000).unwrap();
        r.set_log(true, DirtyClient::Vga).unwrap();
        spaces.system.add_subregion(DATA, &r).unwrap();
        *holder2.lock().unwrap() = Some(r);
    });
    let vram = holder.lock().unwrap().clone().unwrap();
    assert!(g.slot_at(DATA).is_some_and(|s| s.log_dirty));
    // The first report comes after the write.
    g.wait_for("a report after the write", |_| true);
    g.topo.sync_dirty_bitmap(&vram).unwrap();
    assert!(vram.get_dirty(0, 1, DirtyClient::Vga).unwrap(), "the written page is reported");
    vram.reset_dirty(0, 0x4000, DirtyClient::Vga).unwrap();
    // No write since: KVM's log was cleared by the harvest (with manual
    // protection, by KVM_CLEAR_DIRTY_LOG), so nothing is reported again.
    g.topo.sync_dirty_bitmap(&vram).unwrap();
    assert!(!vram.get_dirty(0, 0x4000, DirtyClient::Vga).unwrap(), "a page reported twice for one write");
}
