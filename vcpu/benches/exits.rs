//! vCPU exits on KVM (issue 8): topos's exit path against a bare
//! `kvm-ioctls` loop, `topos run`'s start-up against a bare runner (and
//! QEMU where installed), and two vCPUs on two devices against one. Not a
//! criterion bench: the variants are interleaved round by round (the order
//! alternating between rounds) and medians are taken over rounds, because
//! this shared 2-core machine's speed drifts by more than the differences
//! being measured.
//!
//! Sections (all by default; name some as arguments to run only those):
//!
//! * `exits`: exits per second for port writes (`out dx, al`), MMIO writes
//!   (`mov [ebx], eax`) and MMIO reads (`mov eax, [ebx]`) to a trivial
//!   device. topos: a [`Vm`] with one [`KvmVcpu`], exits dispatched through
//!   its `VcpuIo` to a [`MemoryRegionOps`] that reads as a constant and
//!   drops writes. Bare: the same guest code in a VM made with
//!   `kvm-ioctls` alone (same in-kernel irqchip and PIT as `KvmVm`) and a
//!   plain `match vcpu.run()` loop. The guest marks the start and the end
//!   of its `N` accesses with writes to a marker port; the time between the
//!   two markers (taken in the exit handlers) covers exactly `N + 1` exits.
//!   Also: the user-space cost of one dispatch without KVM (`VcpuIo` calls
//!   against the bare loop's handler body).
//! * `smp`: two vCPUs, each on its own device at its own address, against
//!   one, both on topos and on the bare loop (the machine's own limit).
//! * `startup`: `topos run --bios IMAGE` with a BIOS whose reset vector
//!   writes to `isa-debug-exit` at once, as a whole process: from its spawn
//!   to the first exit handled (the time in its `info` log line of the
//!   debug-exit write) and to its end (which includes the VM's teardown).
//!   Against the same for a bare runner process (this binary re-executed:
//!   create a VM, one memslot, one vCPU, run to the first exit; minimal, or
//!   with `KvmVm`'s irqchip and PIT before or after the memslot), QEMU if
//!   `qemu-system-x86_64` is on the `PATH` (its first exit from its
//!   `kvm_run_exit` trace) and `/bin/true`; plus the in-process steps.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it does a
//! short smoke run of every variant instead.
//!
//! Knobs: `TOPOS_BENCH_EXITS` (accesses per run, default 20000),
//! `TOPOS_BENCH_ROUNDS` (default 21), `TOPOS_BENCH_STARTS` (starts per
//! variant, default 20), `TOPOS_BENCH_GAP_MS` (pause before each run,
//! default 50). Run with
//! `cargo bench -p topos-vcpu --bench exits`.

mod common;

use common::{env_u32, max, median, min, settle, thread_cpu, which, Control};
use kvm_bindings::{kvm_mp_state, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::hint::black_box;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use topos_devices::uart::SerialSink;
use topos_runtime::{HwAddr, MemoryRegionOps, OpsConfig, StandardSpaces, Topology};
use topos_vcpu::backend::{VcpuBackend, VcpuIo};
use topos_vcpu::board::{memory_map::DEFAULT_RAM_SIZE, BoardWiring, PcBoard, PcConfig, PciModel};
use topos_vcpu::kvm::{KvmVcpu, KvmVm};
use topos_vcpu::vm::{StopLatch, StopReason, Vm};

/// Guest RAM (at 0) of the exit benches.
const RAM_SIZE: usize = 1 << 20;
/// Where the guest code lives.
const CODE: u64 = 0x1000;
/// The marker port: a write of vCPU `i`'s index at `MARK` starts its
/// measurement, at `MARK + 1` ends it.
const MARK: u16 = 0x600;
/// vCPU `i`'s device port.
const fn dev_port(i: u32) -> u16 {
    0x700 + 0x10 * i as u16
}
/// vCPU `i`'s device address.
const fn dev_addr(i: u32) -> u64 {
    0xd000_0000 + 0x1000 * i as u64
}
/// What the devices read as.
const CONSTANT: u64 = 0x5a5a_5a5a;
/// Same as KvmVm: the real-mode TSS and identity map below the BIOS.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The three kinds of exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    PioWrite,
    MmioWrite,
    MmioRead,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::PioWrite, Kind::MmioWrite, Kind::MmioRead];

    fn name(self) -> &'static str {
        match self {
            Kind::PioWrite => "PIO write (`out dx, al`)",
            Kind::MmioWrite => "MMIO write (`mov [ebx], eax`)",
            Kind::MmioRead => "MMIO read (`mov eax, [ebx]`)",
        }
    }

    /// The access the loop repeats.
    fn op(self) -> &'static [u8] {
        match self {
            Kind::PioWrite => &[0xee],        // out dx, al
            Kind::MmioWrite => &[0x89, 0x03], // mov [ebx], eax
            Kind::MmioRead => &[0x8b, 0x03],  // mov eax, [ebx]
        }
    }
}

/// The guest, 32-bit code at [`CODE`]. In: `ecx` = accesses, `ebx` = the
/// device's address, `edx` = its port, `esi` = [`MARK`], `edi` = the vCPU's
/// index. Marks the start, does `ecx` accesses, marks the end, halts.
fn guest_code(kind: Kind) -> Vec<u8> {
    let mut c = vec![
        0x89, 0xf8, // mov eax, edi
        0x87, 0xf2, // xchg edx, esi
        0xee, // out dx, al          (start marker)
        0x87, 0xf2, // xchg edx, esi
    ];
    let op = kind.op();
    c.extend_from_slice(op); // loop: the access
    c.push(0x49); // dec ecx
    c.extend_from_slice(&[0x75, (-(op.len() as i8 + 3)) as u8]); // jnz loop
    c.extend_from_slice(&[
        0x89, 0xf8, // mov eax, edi
        0x87, 0xf2, // xchg edx, esi
        0x42, // inc edx
        0xee, // out dx, al          (end marker)
        0xf4, // hlt
        0xeb, 0xfd, // jmp $-1 (the hlt)
    ]);
    c
}

/// Loads flat 32-bit protected mode (no GDT in memory: the segment
/// registers are loaded directly, as in `tests/kvm_vm.rs`) and the guest's
/// registers for vCPU `index`, and makes it runnable (an AP would wait for
/// INIT/SIPI under the in-kernel LAPIC).
fn setup_vcpu(fd: &VcpuFd, index: u32, accesses: u32) {
    let mut sregs = fd.get_sregs().unwrap();
    let flat = topos_vcpu::kvm::flat_segment;
    sregs.cs = flat(0x08, 0xb);
    for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        *s = flat(0x10, 0x3);
    }
    sregs.cr0 |= 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    fd.set_sregs(&sregs).unwrap();
    let mut regs = fd.get_regs().unwrap();
    regs.rip = CODE;
    regs.rcx = u64::from(accesses);
    regs.rbx = dev_addr(index);
    regs.rdx = u64::from(dev_port(index));
    regs.rsi = u64::from(MARK);
    regs.rdi = u64::from(index);
    regs.rsp = 0x7000;
    regs.rflags = 2;
    fd.set_regs(&regs).unwrap();
    fd.set_mp_state(kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE }).unwrap();
}

/// One vCPU's marker times: wall clock, and its thread's CPU time (both
/// taken on the vCPU's thread, in the exit handler).
#[derive(Debug, Default, Clone, Copy)]
struct Span {
    start: Option<(Instant, Duration)>,
    end: Option<(Instant, Duration)>,
}

/// Now, for a [`Span`].
fn mark() -> Option<(Instant, Duration)> {
    Some((Instant::now(), thread_cpu()))
}

/// The result of one run: exits between the markers, the time from the
/// first start marker to the last end marker, and the CPU time the vCPU
/// threads used between their markers.
#[derive(Debug, Clone, Copy)]
struct Run {
    exits: u64,
    elapsed: Duration,
    cpu: Duration,
}

impl Run {
    fn from_spans(spans: &[Span], accesses: u32) -> Run {
        let start = spans.iter().map(|s| s.start.expect("no start marker").0).min().unwrap();
        let end = spans.iter().map(|s| s.end.expect("no end marker").0).max().unwrap();
        let cpu = spans.iter().map(|s| s.end.unwrap().1 - s.start.unwrap().1).sum();
        Run { exits: spans.len() as u64 * (u64::from(accesses) + 1), elapsed: end - start, cpu }
    }

    fn per_second(&self) -> f64 {
        self.exits as f64 / self.elapsed.as_secs_f64()
    }

    /// vCPU-thread CPU time per exit, in µs.
    fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.exits as f64
    }
}

// ---------------------------------------------------------------------------
// The bare kvm-ioctls loop.

/// Anonymous host memory for a memslot.
struct HostMem {
    ptr: *mut u8,
    len: usize,
}

impl HostMem {
    fn new(len: usize) -> HostMem {
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        HostMem { ptr: ptr.cast(), len }
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: in bounds (checked above) of a live mapping that no vCPU
        // runs on yet (it is written before the slot is registered).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) };
    }

    /// Registers the memory as `slot` at `gpa`.
    ///
    /// The caller keeps `self` alive until the VM is gone (a `BareVm`
    /// declares its memory after its descriptors, so it is dropped last).
    fn register(&self, vm: &VmFd, slot: u32, gpa: u64) {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: self.len as u64,
            userspace_addr: self.ptr as u64,
        };
        // SAFETY: `ptr..ptr+len` is a live anonymous mapping owned by
        // `self`, which outlives the VM (see above), and no other slot
        // overlaps `gpa..gpa+len`.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// SAFETY: the mapping is plain memory owned by `HostMem`; the host only
// writes it through `&mut self` before the guest runs.
unsafe impl Send for HostMem {}

/// A VM made with `kvm-ioctls` alone. Fields drop in order: vCPUs, VM, then
/// the memory.
struct BareVm {
    vcpus: Vec<VcpuFd>,
    _vm: VmFd,
    _ram: HostMem,
}

impl BareVm {
    /// The exit-bench VM: the kernel set-up of `KvmVm` (identity map, TSS,
    /// irqchip, PIT), 1 MiB of RAM at 0 with the guest code, `vcpus` vCPUs.
    fn new(kvm: &Kvm, kind: Kind, vcpus: u32, accesses: u32) -> BareVm {
        let vm = kvm.create_vm().unwrap();
        vm.set_identity_map_address(IDENTITY_MAP_ADDRESS).unwrap();
        vm.set_tss_address(TSS_ADDRESS).unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config { flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY, ..Default::default() }).unwrap();
        let mut ram = HostMem::new(RAM_SIZE);
        ram.write(CODE as usize, &guest_code(kind));
        ram.register(&vm, 0, 0);
        let vcpus = (0..vcpus)
            .map(|i| {
                let fd = vm.create_vcpu(u64::from(i)).unwrap();
                setup_vcpu(&fd, i, accesses);
                fd
            })
            .collect();
        BareVm { vcpus, _vm: vm, _ram: ram }
    }
}

/// The bare exit loop of one vCPU, up to its end marker. Returns its span
/// and the (port, MMIO) exits it saw besides the markers.
fn bare_loop(vcpu: &mut VcpuFd) -> (Span, u64, u64) {
    let mut span = Span::default();
    let (mut pio, mut mmio) = (0u64, 0u64);
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == MARK {
                    span.start = mark();
                } else if port == MARK + 1 {
                    span.end = mark();
                    return (span, pio, mmio);
                } else {
                    black_box(data);
                    pio += 1;
                }
            }
            Ok(VcpuExit::MmioWrite(_, data)) => {
                black_box(data);
                mmio += 1;
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(CONSTANT as u8);
                mmio += 1;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            other => panic!("bare loop: unexpected exit {other:?}"),
        }
    }
}

/// One bare run with `n` vCPUs (one thread each).
fn bare_run(kvm: &Kvm, kind: Kind, n: u32, accesses: u32) -> Run {
    settle();
    let mut vm = BareVm::new(kvm, kind, n, accesses);
    let results: Vec<(Span, u64, u64)> = std::thread::scope(|s| {
        // Named like topos's `vcpu<i>` threads, so that profiles tell them apart.
        let threads: Vec<_> = (vm.vcpus.iter_mut().enumerate())
            .map(|(i, v)| {
                std::thread::Builder::new().name(format!("bare{i}")).spawn_scoped(s, move || bare_loop(v)).unwrap()
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for &(_, pio, mmio) in &results {
        let (want_pio, want_mmio) = if kind == Kind::PioWrite { (accesses, 0) } else { (0, accesses) };
        assert_eq!((pio, mmio), (u64::from(want_pio), u64::from(want_mmio)), "bare {kind:?}: wrong exit count");
    }
    let spans: Vec<Span> = results.iter().map(|r| r.0).collect();
    Run::from_spans(&spans, accesses)
}

// ---------------------------------------------------------------------------
// topos.

/// The trivial device: reads as [`CONSTANT`], drops writes.
struct Constant;

impl MemoryRegionOps for Constant {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        CONSTANT
    }
    fn write(&self, _addr: HwAddr, value: u64, _size: u32) {
        black_box(value);
    }
}

/// The marker port's device: records each vCPU's span and stops the VM
/// once every vCPU has ended.
struct Markers {
    spans: Mutex<Vec<Span>>,
    latch: Arc<StopLatch>,
}

impl MemoryRegionOps for Markers {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        0
    }
    fn write(&self, addr: HwAddr, value: u64, _size: u32) {
        let now = mark();
        let all_ended = {
            let mut spans = self.spans.lock().unwrap();
            let Some(span) = spans.get_mut(value as usize) else { return };
            if addr == 0 {
                span.start = now;
            } else {
                span.end = now;
            }
            spans.iter().all(|s| s.end.is_some())
        };
        if all_ended {
            self.latch.stop(StopReason::Requested);
        }
    }
}

/// A topology with 1 MiB of RAM holding the guest code, one [`Constant`]
/// device per vCPU (at [`dev_port`] and [`dev_addr`]) and the markers.
struct ToposSetup {
    topo: Topology,
    spaces: StandardSpaces,
    latch: Arc<StopLatch>,
    markers: Arc<Markers>,
}

impl ToposSetup {
    fn new(kind: Kind, n: u32) -> ToposSetup {
        let topo = Topology::new();
        let spaces = topo.standard_spaces().unwrap();
        let ram = topo.new_ram("ram", RAM_SIZE as u128).unwrap();
        ram.ram().unwrap().write(CODE, &guest_code(kind)).unwrap();
        spaces.system.add_subregion(0, &ram).unwrap();
        for i in 0..n {
            let pio = topo.new_io(&format!("pio{i}"), Constant, OpsConfig::default(), 4).unwrap();
            spaces.io.add_subregion(u64::from(dev_port(i)), &pio).unwrap();
            let mmio = topo.new_io(&format!("mmio{i}"), Constant, OpsConfig::default(), 0x1000).unwrap();
            spaces.system.add_subregion(dev_addr(i), &mmio).unwrap();
        }
        let latch = Arc::new(StopLatch::default());
        let markers = Arc::new(Markers { spans: Mutex::new(vec![Span::default(); n as usize]), latch: latch.clone() });
        let region = topo.new_io_arc("markers", markers.clone(), OpsConfig::default(), 2).unwrap();
        spaces.io.add_subregion(u64::from(MARK), &region).unwrap();
        ToposSetup { topo, spaces, latch, markers }
    }
}

/// One topos run with `n` vCPUs: a `Vm` of `KvmVcpu`s.
fn topos_run(kind: Kind, n: u32, accesses: u32) -> Run {
    settle();
    let setup = ToposSetup::new(kind, n);
    let kvm = KvmVm::new(&setup.topo, &setup.spaces.memory, &setup.spaces.io_space).unwrap();
    let backends: Vec<Box<dyn VcpuBackend>> = (0..n)
        .map(|i| {
            let mut v: KvmVcpu = kvm.create_vcpu(i).unwrap();
            setup_vcpu(v.fd(), i, accesses);
            Box::new(v) as Box<dyn VcpuBackend>
        })
        .collect();
    let vm = Vm::start(backends, &setup.spaces.memory, &setup.spaces.io_space, setup.latch.clone()).unwrap();
    let handles = vm.vcpus().to_vec();
    let reason = vm.wait();
    assert_eq!(reason, StopReason::Requested, "topos {kind:?}: {}", reason.describe());
    for h in &handles {
        let c = h.io_counts();
        let (want_pio, want_mmio) = if kind == Kind::PioWrite { (accesses + 2, 0) } else { (2, accesses) };
        assert_eq!((c.pio, c.mmio), (u64::from(want_pio), u64::from(want_mmio)), "topos {kind:?}: wrong exit count");
    }
    let spans = setup.markers.spans.lock().unwrap().clone();
    drop(kvm);
    Run::from_spans(&spans, accesses)
}

// ---------------------------------------------------------------------------
// Sections.

fn exits_section(kvm: &Kvm, accesses: u32, rounds: u32) {
    println!(
        "## exits: {accesses} accesses per run, {rounds} rounds (bare and topos alternating, order flipped each round)"
    );
    println!();
    // [kind] -> runs per round.
    let mut bare: Vec<Vec<Run>> = vec![Vec::new(); Kind::ALL.len()];
    let mut topos: Vec<Vec<Run>> = vec![Vec::new(); Kind::ALL.len()];
    // Warm-up: one of each, not recorded.
    for kind in Kind::ALL {
        bare_run(kvm, kind, 1, accesses / 10);
        topos_run(kind, 1, accesses / 10);
    }
    for round in 0..rounds {
        for (k, &kind) in Kind::ALL.iter().enumerate() {
            let (b, t) = if round % 2 == 0 {
                let b = bare_run(kvm, kind, 1, accesses);
                (b, topos_run(kind, 1, accesses))
            } else {
                let t = topos_run(kind, 1, accesses);
                (bare_run(kvm, kind, 1, accesses), t)
            };
            bare[k].push(b);
            topos[k].push(t);
        }
        eprintln!(
            "round {round}: {}",
            Kind::ALL
                .iter()
                .enumerate()
                .map(|(k, kind)| {
                    let (b, t) = (bare[k][round as usize], topos[k][round as usize]);
                    format!("{kind:?} bare {:.0}/s topos {:.0}/s", b.per_second(), t.per_second())
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("Wall clock between the markers (what a guest sees):");
    println!();
    println!("| exit | bare exits/s (median) | topos exits/s (median) | topos ÷ bare (ratio of medians) | per-round ratio: median [min, max] | µs per exit, bare / topos |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (k, kind) in Kind::ALL.iter().enumerate() {
        let rate = |runs: &[Run]| runs.iter().map(Run::per_second).collect::<Vec<_>>();
        let (b, t) = (median(&rate(&bare[k])), median(&rate(&topos[k])));
        let ratio: Vec<f64> = bare[k].iter().zip(&topos[k]).map(|(b, t)| t.per_second() / b.per_second()).collect();
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} [{:.3}, {:.3}] | {:.2} / {:.2} |",
            kind.name(),
            b,
            t,
            t / b,
            median(&ratio),
            min(&ratio),
            max(&ratio),
            1e6 / b,
            1e6 / t
        );
    }
    println!();
    println!("CPU time of the vCPU thread between the markers (user + system; not inflated when another process takes the core):");
    println!();
    println!("| exit | bare CPU µs per exit (median) | topos CPU µs per exit (median) | topos ÷ bare (ratio of medians) | per-round ratio: median [min, max] | exits/s equivalent, topos ÷ bare |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (k, kind) in Kind::ALL.iter().enumerate() {
        let cpu = |runs: &[Run]| runs.iter().map(Run::cpu_us).collect::<Vec<_>>();
        let (b, t) = (median(&cpu(&bare[k])), median(&cpu(&topos[k])));
        let ratio: Vec<f64> = bare[k].iter().zip(&topos[k]).map(|(b, t)| t.cpu_us() / b.cpu_us()).collect();
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} [{:.3}, {:.3}] | {:.3} |",
            kind.name(),
            b,
            t,
            t / b,
            median(&ratio),
            min(&ratio),
            max(&ratio),
            b / t
        );
    }
    println!();
}

/// The user-space part of an exit alone, without KVM: topos's `VcpuIo`
/// calls against the bare loop's handler body, interleaved.
fn dispatch_section(rounds: u32, calls: u32) {
    println!("## dispatch without KVM: {calls} calls per round, {rounds} rounds, ns per call");
    println!();
    let setup = ToposSetup::new(Kind::MmioWrite, 1);
    let mut io = VcpuIo::new(&setup.spaces.memory, &setup.spaces.io_space);
    let addr = dev_addr(0);
    let port = dev_port(0);
    let names = ["PIO write", "MMIO write", "MMIO read"];
    let mut topos_ns = vec![Vec::new(); 3];
    let mut bare_ns = vec![Vec::new(); 3];
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..calls {
            f();
        }
        t.elapsed().as_nanos() as f64 / f64::from(calls)
    };
    for _ in 0..rounds {
        let data = [0x11u8; 4];
        let mut buf = [0u8; 4];
        topos_ns[0].push(time(&mut || {
            let _ = io.pio_write(port, black_box(&data[..1]));
        }));
        bare_ns[0].push(time(&mut || {
            black_box(&data[..1]);
        }));
        topos_ns[1].push(time(&mut || {
            let _ = io.mmio_write(black_box(addr), black_box(&data[..]));
        }));
        bare_ns[1].push(time(&mut || {
            black_box(&data[..]);
        }));
        topos_ns[2].push(time(&mut || {
            let _ = io.mmio_read(black_box(addr), black_box(&mut buf[..]));
        }));
        bare_ns[2].push(time(&mut || {
            black_box(&mut buf[..]).fill(CONSTANT as u8);
        }));
    }
    println!("| access | topos `VcpuIo` ns (median) | bare handler ns (median) |");
    println!("| --- | --- | --- |");
    for k in 0..3 {
        println!("| {} | {:.1} | {:.1} |", names[k], median(&topos_ns[k]), median(&bare_ns[k]));
    }
    println!();
}

fn smp_section(kvm: &Kvm, accesses: u32, rounds: u32) {
    println!("## two vCPUs on two devices: {accesses} accesses per vCPU per run, {rounds} rounds, aggregate exits/s");
    println!();
    // Host work of about one run's length, as a control of what the 2
    // cores give at the moment.
    let control = Control::new(f64::from(accesses) * 8.5e-6, true);
    let control = || control.measure();
    let kinds = [Kind::MmioWrite, Kind::PioWrite];
    // [kind][variant] with variants: bare 1, bare 2, topos 1, topos 2; one
    // entry per round, with the host control just before and just after.
    let mut runs: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); 4]; kinds.len()];
    let mut controls: Vec<Vec<(f64, f64)>> = vec![Vec::new(); kinds.len()];
    let mut last_control = control();
    for round in 0..rounds {
        for (k, &kind) in kinds.iter().enumerate() {
            let mut order = [0usize, 1, 2, 3];
            if round % 2 == 1 {
                order.reverse();
            }
            for v in order {
                let run = match v {
                    0 => bare_run(kvm, kind, 1, accesses),
                    1 => bare_run(kvm, kind, 2, accesses),
                    2 => topos_run(kind, 1, accesses),
                    _ => topos_run(kind, 2, accesses),
                };
                runs[k][v].push(run);
            }
            let after = control();
            controls[k].push((last_control, after));
            last_control = after;
        }
        eprintln!("smp round {round} done");
    }
    let quiet_threshold = 1.8;
    let scale = |r: &[Vec<Run>], two: usize, one: usize, keep: &dyn Fn(usize) -> bool| -> Vec<f64> {
        (0..r[one].len()).filter(|&i| keep(i)).map(|i| r[two][i].per_second() / r[one][i].per_second()).collect()
    };
    let fmt = |v: &[f64]| {
        if v.is_empty() {
            "–".to_string()
        } else {
            format!("{:.2}× [{:.2}, {:.2}]", median(v), min(v), max(v))
        }
    };
    println!("Wall clock, aggregate exits/s (medians over all rounds), and the 2 ÷ 1 ratio per round: median [min, max] over all rounds, then over the quiet rounds only (the host control before and after the round's four runs both ≥ {quiet_threshold}×):");
    println!();
    println!("| exit | bare 1 vCPU | bare 2 vCPUs | topos 1 vCPU | topos 2 vCPUs | bare 2 ÷ 1, all rounds | topos 2 ÷ 1, all rounds | quiet rounds | bare 2 ÷ 1, quiet | topos 2 ÷ 1, quiet |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (k, kind) in kinds.iter().enumerate() {
        let r = &runs[k];
        let rate = |v: usize| median(&r[v].iter().map(Run::per_second).collect::<Vec<_>>());
        let all = |_: usize| true;
        let quiet = |i: usize| controls[k][i].0 >= quiet_threshold && controls[k][i].1 >= quiet_threshold;
        let n_quiet = (0..r[0].len()).filter(|&i| quiet(i)).count();
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {n_quiet} of {} | {} | {} |",
            kind.name(),
            rate(0),
            rate(1),
            rate(2),
            rate(3),
            fmt(&scale(r, 1, 0, &all)),
            fmt(&scale(r, 3, 2, &all)),
            r[0].len(),
            fmt(&scale(r, 1, 0, &quiet)),
            fmt(&scale(r, 3, 2, &quiet)),
        );
    }
    println!();
    let all_controls: Vec<f64> = controls.iter().flatten().map(|c| c.0.min(c.1)).collect();
    println!(
        "Host control (2 threads of integer work ÷ 1 thread, the lower of before/after each round): median {:.2}× [{:.2}, {:.2}].",
        median(&all_controls),
        min(&all_controls),
        max(&all_controls)
    );
    println!();
    println!(
        "CPU time per exit of each vCPU thread (µs, medians; a contended lock that spins would raise it with 2 vCPUs):"
    );
    println!();
    println!("| exit | bare 1 vCPU | bare 2 vCPUs | topos 1 vCPU | topos 2 vCPUs |");
    println!("| --- | --- | --- | --- | --- |");
    for (k, kind) in kinds.iter().enumerate() {
        let cpu = |v: usize| median(&runs[k][v].iter().map(Run::cpu_us).collect::<Vec<_>>());
        println!("| {} | {:.3} | {:.3} | {:.3} | {:.3} |", kind.name(), cpu(0), cpu(1), cpu(2), cpu(3));
    }
    println!();
}

/// A 64 KiB BIOS whose reset vector writes 0 to `isa-debug-exit` (QEMU
/// status 1): `mov al, 0; out 0xf4, al; hlt`.
fn exit_bios() -> Vec<u8> {
    let mut image = vec![0xf4u8; 64 << 10];
    image[0xfff0..0xfff5].copy_from_slice(&[0xb0, 0x00, 0xe6, 0xf4, 0xf4]);
    image
}

/// The environment variable that turns this binary into the bare start-up
/// runner for the image it names.
const BARE_BOOT_ENV: &str = "TOPOS_BENCH_BARE_BOOT";
/// With [`BARE_BOOT_ENV`]: the [`BootMode`] (`minimal`, `irqchip-first`,
/// `irqchip-last`).
const BARE_BOOT_MODE_ENV: &str = "TOPOS_BENCH_BARE_BOOT_MODE";

/// What the bare start-up runner sets up besides the VM, the memslot and
/// the vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BootMode {
    /// Only the real-mode TSS.
    Minimal,
    /// `KvmVm`'s kernel set-up in `KvmVm`'s order: identity map, TSS,
    /// irqchip, PIT, then the memslot.
    IrqchipFirst,
    /// The same calls with the memslot before the irqchip and the PIT.
    IrqchipLast,
}

impl BootMode {
    const ALL: [BootMode; 3] = [BootMode::Minimal, BootMode::IrqchipFirst, BootMode::IrqchipLast];

    fn arg(self) -> &'static str {
        match self {
            BootMode::Minimal => "minimal",
            BootMode::IrqchipFirst => "irqchip-first",
            BootMode::IrqchipLast => "irqchip-last",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            BootMode::Minimal => "VM, TSS, 1 memslot, 1 vCPU, first exit",
            BootMode::IrqchipFirst => "as `KvmVm`: irqchip + PIT, then the memslot",
            BootMode::IrqchipLast => "memslot first, then irqchip + PIT",
        }
    }
}

/// Where the bare start-up runner's time went.
#[derive(Debug, Clone, Copy)]
struct BareBoot {
    /// QEMU's status for the debug-exit write.
    status: i32,
    /// From the start to the first exit handled.
    first_exit: Duration,
    /// When the first exit was handled.
    first_exit_at: std::time::SystemTime,
    /// Closing the vCPU and VM descriptors and unmapping the memory.
    teardown: Duration,
}

/// The bare runner: a VM, one memslot (the image just below 4 GiB), one
/// vCPU from reset, run to the first exit, which must be the debug-exit
/// write.
fn bare_boot(kvm: &Kvm, bios: &[u8], mode: BootMode) -> BareBoot {
    let t = Instant::now();
    let vm = kvm.create_vm().unwrap();
    let irqchip = |vm: &VmFd| {
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config { flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY, ..Default::default() }).unwrap();
    };
    if mode != BootMode::Minimal {
        vm.set_identity_map_address(IDENTITY_MAP_ADDRESS).unwrap();
    }
    vm.set_tss_address(TSS_ADDRESS).unwrap();
    if mode == BootMode::IrqchipFirst {
        irqchip(&vm);
    }
    let mut rom = HostMem::new(bios.len());
    rom.write(0, bios);
    rom.register(&vm, 0, (1u64 << 32) - bios.len() as u64);
    if mode == BootMode::IrqchipLast {
        irqchip(&vm);
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let status = match vcpu.run() {
        Ok(VcpuExit::IoOut(0xf4, data)) => (i32::from(data[0]) << 1) | 1,
        other => {
            eprintln!("bare boot: unexpected first exit {other:?}");
            3
        }
    };
    let first_exit_at = std::time::SystemTime::now();
    let first_exit = t.elapsed();
    let t = Instant::now();
    drop(vcpu);
    drop(vm);
    drop(rom);
    BareBoot { status, first_exit, first_exit_at, teardown: t.elapsed() }
}

/// Seconds since the epoch.
fn epoch_secs(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as
/// `tracing-subscriber` prints it (`2026-11-30T02:30:33.503943Z`).
fn parse_rfc3339(s: &str) -> Option<f64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = time.split(':');
    let (h, min, sec) =
        (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    Some(days as f64 * 86400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// Finds the epoch time of the first exit in a process's output.
type FirstExit<'a> = &'a dyn Fn(&str) -> Option<f64>;

/// One process run, in ms: wall time from its spawn to its end, from its
/// spawn to the first exit it reports (`first_exit` finds the epoch time
/// in its stdout and stderr; NaN without it), and the CPU time (user +
/// system) it used. Checks its status.
#[allow(clippy::zombie_processes)] // reaped by `wait4`, which also gives its rusage
fn time_process(cmd: &mut Command, status: i32, first_exit: Option<FirstExit>) -> [f64; 3] {
    use std::io::Read;
    let spawned = epoch_secs(std::time::SystemTime::now());
    let t = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut wstatus = 0;
    // SAFETY: `rusage` is plain data that `wait4` fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for (and reaps) our own child with valid out-pointers;
    // `child` is not waited for again (dropping it does not wait).
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut wstatus, 0, &mut usage) };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(pid, child.id() as libc::pid_t, "wait4: {}", std::io::Error::last_os_error());
    // The outputs are a few lines: they fit in the pipes until now.
    let mut text = String::new();
    child.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut text).unwrap();
    let code = libc::WIFEXITED(wstatus).then(|| libc::WEXITSTATUS(wstatus));
    assert_eq!(code, Some(status), "{cmd:?}: {text}");
    let first = first_exit.map_or(f64::NAN, |f| {
        let at = f(&text).unwrap_or_else(|| panic!("{cmd:?}: no first-exit time in {text:?}"));
        (at - spawned) * 1e3
    });
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    [ms, first, tv(usage.ru_utime) + tv(usage.ru_stime)]
}

/// The start-up variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// `topos run` (two rows: to the first exit, to the process's end).
    ToposProcess,
    /// The bare runner (two rows).
    BareProcess(BootMode),
    True,
    /// QEMU (two rows).
    Qemu,
    /// `Machine::new`'s steps by hand (four rows).
    ToposSteps,
    /// The bare runner in this process (two rows).
    BareInProcess(BootMode),
}

fn startup_section(starts: u32) {
    println!("## start-up: {starts} starts per variant, interleaved (order rotated each round), ms");
    println!();
    let dir = std::env::temp_dir().join(format!("topos-bench-exits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("exit-bios.bin");
    std::fs::write(&image, exit_bios()).unwrap();
    let topos_bin = PathBuf::from(env!("CARGO_BIN_EXE_topos"));
    let me = std::env::current_exe().unwrap();
    let qemu = which("qemu-system-x86_64");

    let mut variants = vec![Start::ToposProcess];
    variants.extend(BootMode::ALL.map(Start::BareProcess));
    variants.push(Start::True);
    if qemu.is_some() {
        variants.push(Start::Qemu);
    }
    variants.push(Start::ToposSteps);
    variants.extend(BootMode::ALL.map(Start::BareInProcess));
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let mut slots: Vec<Vec<usize>> = Vec::new();
    for v in &variants {
        let names: Vec<String> = match v {
            Start::ToposProcess => vec![
                "`topos run --bios IMAGE`: spawn → first exit handled".into(),
                "`topos run --bios IMAGE`: spawn → process end".into(),
                "`topos run --bios IMAGE`: CPU time (user + sys)".into(),
            ],
            Start::BareProcess(m) => vec![
                format!("bare runner process ({}): spawn → first exit handled", m.describe()),
                format!("bare runner process ({}): spawn → process end", m.describe()),
                format!("bare runner process ({}): CPU time (user + sys)", m.describe()),
            ],
            Start::True => vec!["`/bin/true`: spawn → process end".into(), "`/bin/true`: CPU time (user + sys)".into()],
            Start::Qemu => vec![
                "QEMU `-machine pc -accel kvm`: spawn → first exit handled".into(),
                "QEMU `-machine pc -accel kvm`: spawn → process end".into(),
                "QEMU `-machine pc -accel kvm`: CPU time (user + sys)".into(),
            ],
            Start::ToposSteps => vec![
                "in-process topos: `KvmVm::new` (VM, irqchip, PIT, listeners)".into(),
                "in-process topos: `PcBoard::build` (its commits set the memslots)".into(),
                "in-process topos: `create_vcpu` + `Vm::start` → first exit handled".into(),
                "in-process topos: stop and join the vCPU, drop board and VM".into(),
            ],
            Start::BareInProcess(m) => vec![
                format!("in-process bare ({}): → first exit handled", m.describe()),
                format!("in-process bare ({}): teardown", m.describe()),
            ],
        };
        let mut ids = Vec::new();
        for name in names {
            rows.push((name, Vec::new()));
            ids.push(rows.len() - 1);
        }
        slots.push(ids);
    }
    let config = || PcConfig {
        ram_size: DEFAULT_RAM_SIZE,
        cpus: 1,
        bios: exit_bios(),
        bios_in_flash: false,
        devices: vec![PciModel::Edu],
        serial: SerialSink::Null,
        kernel: None,
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    // topos logs the debug-exit write at `info`: "<RFC 3339> INFO topos_devices::debug_exit: guest requested exit".
    let topos_first = |text: &str| {
        let line = text.lines().find(|l| l.contains("guest requested exit"))?;
        parse_rfc3339(line.split_whitespace().next()?)
    };
    // The bare runner prints "first-exit <epoch seconds>".
    let bare_first = |text: &str| text.lines().find_map(|l| l.strip_prefix("first-exit ")?.trim().parse::<f64>().ok());
    // QEMU's log trace backend with `-msg timestamp=on`: "<pid>@<sec>.<usec>:kvm_run_exit ...".
    let qemu_first = |text: &str| {
        let line = text.lines().find(|l| l.contains(":kvm_run_exit"))?;
        line.split_once('@')?.1.split_once(':')?.0.parse::<f64>().ok()
    };
    let bios = exit_bios();
    let kvm = Kvm::new().unwrap();
    for round in 0..=starts {
        let n = variants.len();
        let mut round_times: Vec<(usize, f64)> = Vec::new();
        for j in 0..n {
            let v = (j + round as usize) % n;
            settle();
            let times: Vec<f64> = match variants[v] {
                Start::ToposProcess => {
                    let [end, first, cpu] = time_process(
                        Command::new(&topos_bin)
                            .arg("run")
                            .arg("--bios")
                            .arg(&image)
                            .env("RUST_LOG", "info")
                            .env("NO_COLOR", "1"),
                        1,
                        Some(&topos_first),
                    );
                    vec![first, end, cpu]
                }
                Start::BareProcess(m) => {
                    let [end, first, cpu] = time_process(
                        Command::new(&me).env(BARE_BOOT_ENV, &image).env(BARE_BOOT_MODE_ENV, m.arg()),
                        1,
                        Some(&bare_first),
                    );
                    vec![first, end, cpu]
                }
                Start::True => {
                    let [end, _, cpu] = time_process(&mut Command::new("/bin/true"), 0, None);
                    vec![end, cpu]
                }
                Start::Qemu => {
                    let [end, first, cpu] = time_process(
                        Command::new(qemu.as_ref().unwrap())
                            .args(["-machine", "pc", "-accel", "kvm", "-nodefaults", "-nographic", "-no-reboot"])
                            .arg("-bios")
                            .arg(&image)
                            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
                            .args(["-trace", "kvm_run_exit", "-msg", "timestamp=on"]),
                        1,
                        Some(&qemu_first),
                    );
                    vec![first, end, cpu]
                }
                Start::ToposSteps => {
                    let t = Instant::now();
                    let topo = Topology::new();
                    let spaces = topo.standard_spaces().unwrap();
                    let latch = Arc::new(StopLatch::default());
                    let kvm_vm = KvmVm::new(&topo, &spaces.memory, &spaces.io_space).unwrap();
                    let t1 = t.elapsed();
                    let first_exit = Arc::new(Mutex::new(None));
                    let (l, f) = (latch.clone(), first_exit.clone());
                    let wiring = BoardWiring {
                        interrupts: kvm_vm.interrupt_sink(),
                        irqchip: None,
                        exit: Box::new(move |status: i32| {
                            *f.lock().unwrap() = Some(t.elapsed());
                            l.stop(StopReason::DebugExit(status));
                        }),
                        memory_map: Default::default(),
                    };
                    let board = PcBoard::build(&topo, &spaces, config(), wiring).unwrap();
                    let t2 = t.elapsed();
                    let v: Box<dyn VcpuBackend> = Box::new(kvm_vm.create_vcpu(0).unwrap());
                    let vm = Vm::start(vec![v], &board.spaces.memory, &board.spaces.io_space, latch).unwrap();
                    assert_eq!(vm.wait(), StopReason::DebugExit(1));
                    let t3 = first_exit.lock().unwrap().expect("no debug-exit write");
                    drop(board);
                    drop(kvm_vm);
                    drop(topo);
                    vec![ms(t1), ms(t2 - t1), ms(t3 - t2), ms(t.elapsed() - t3)]
                }
                Start::BareInProcess(m) => {
                    let b = bare_boot(&kvm, &bios, m);
                    assert_eq!(b.status, 1);
                    vec![ms(b.first_exit), ms(b.teardown)]
                }
            };
            round_times.extend(slots[v].iter().copied().zip(times));
        }
        // Round 0 warms the caches and is not recorded.
        if round > 0 {
            for (r, t) in round_times {
                rows[r].1.push(t);
            }
        }
    }
    println!("| what | median ms | min ms | max ms |");
    println!("| --- | --- | --- | --- |");
    for (name, times) in &rows {
        println!("| {name} | {:.2} | {:.2} | {:.2} |", median(times), min(times), max(times));
    }
    println!();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn main() {
    if let Some(image) = std::env::var_os(BARE_BOOT_ENV) {
        let mode = std::env::var(BARE_BOOT_MODE_ENV).unwrap_or_default();
        let mode = BootMode::ALL.into_iter().find(|m| m.arg() == mode).unwrap_or(BootMode::Minimal);
        let kvm = Kvm::new().unwrap();
        let b = bare_boot(&kvm, &std::fs::read(image).unwrap(), mode);
        println!("first-exit {:.6}", epoch_secs(b.first_exit_at));
        std::process::exit(b.status);
    }
    // `cargo bench` passes `--bench`; other arguments name sections.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let wanted: Vec<String> = args.iter().filter(|a| !a.starts_with("--")).cloned().collect();
    // Without `--bench` (`cargo test --all-targets` runs benches that way):
    // a short smoke run that checks every variant works, with no timing
    // worth reading.
    let smoke = !args.iter().any(|a| a == "--bench");
    let want = |s: &str| wanted.is_empty() || wanted.iter().any(|w| w == s);
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            println!("skipped: /dev/kvm cannot be opened ({e})");
            return;
        }
    };
    let (accesses, rounds, starts, calls) = if smoke { (200, 1, 1, 1000) } else { (20_000, 21, 20, 2_000_000) };
    let accesses = env_u32("TOPOS_BENCH_EXITS", accesses).max(1);
    let rounds = env_u32("TOPOS_BENCH_ROUNDS", rounds).max(1);
    let starts = env_u32("TOPOS_BENCH_STARTS", starts).max(1);
    println!("# vCPU exits on KVM");
    println!();
    if smoke {
        println!("(smoke run without `--bench`: numbers not meaningful; use `cargo bench`)");
        println!();
    }
    if want("exits") {
        exits_section(&kvm, accesses, rounds);
        dispatch_section(rounds, calls);
    }
    if want("smp") {
        smp_section(&kvm, accesses, rounds);
    }
    if want("startup") {
        startup_section(starts);
    }
}
