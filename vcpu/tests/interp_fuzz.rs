//! Random bytes as guest code (issue 9, acceptance 4): the interpreter
//! must never panic, never hang and never touch host memory outside guest
//! RAM, whatever the guest executes.
//!
//! Three guests, each over pages of random bytes:
//! - **real mode** and **ring-0 protected mode** (sometimes with 32-bit or
//!   PAE paging on identity tables, sometimes dropped to ring 3): the
//!   guest can do anything — reload its IDT, leave protected mode, halt,
//!   triple-fault — so the host drives it: every handler of the IVT/IDT
//!   halts, and after a halt, a shutdown or a long run the host puts the
//!   CPU back at a random place in the random pages with random registers
//!   (and rebuilds the tables after a shutdown).
//! - **ring 3 under a supervisor in ROM**: the GDT, IDT, TSSs and one
//!   handler for every vector live in ROM, which ring-3 code cannot
//!   change, and ring 3's segments end with RAM; every fault, `int n` or privileged instruction enters the
//!   handler, which mutates a random dword of the code pages and `iret`s to
//!   a random place with random registers. Nothing the guest does can stop
//!   it, so it runs on a bare [`Cpu`] (every run must end on its
//!   instruction limit) and in a [`Vm`] of one and of two
//!   [`InterpVcpu`]s racing on the same RAM, which [`Vm::stop`] must stop
//!   promptly.
//!
//! **Host memory.** Every guest memory access of the interpreter goes
//! through its software TLB, whose RAM entries are [`RamPage`]s handed out
//! by the runtime's translation for one page of one RAM block (loads and
//! stores are bounds-checked against the page: an out-of-page access reads
//! 0 and stores nothing), or through the vCPU's accessor, which dispatches
//! through the published FlatView (RAM copies are bounds-checked against
//! the block, ROM writes dropped, nothing-there answered). Code is decoded
//! from the same pages. So guest addresses can only reach memory the
//! address space maps; the tests check what can be checked from outside:
//! a RAM block that is never mapped (a canary) and the ROM keep their
//! bytes, after millions of random instructions.
//!
//! Each test prints its seed (fixed by default, so CI is reproducible);
//! `TOPOS_FUZZ_SEED=n` replays one, `TOPOS_FUZZ_SEED=random` draws one
//! from the clock, and `TOPOS_FUZZ_SCALE=k` runs k times as many
//! instructions (scale 1, the default: about 10 s of a debug build on two
//! cores; e.g. `TOPOS_FUZZ_SEED=random TOPOS_FUZZ_SCALE=50 cargo test
//! --release --test interp_fuzz` for a longer hunt).
//!
//! [`Cpu`]: topos_vcpu::interp::Cpu
//! [`Vm`]: topos_vcpu::vm::Vm
//! [`Vm::stop`]: topos_vcpu::vm::Vm::stop
//! [`InterpVcpu`]: topos_vcpu::interp::InterpVcpu
//! [`RamPage`]: topos_runtime::RamPage

#[path = "interp_exceptions/guest.rs"]
mod guest;

use guest::{assemble, descriptor, gate, sel, Guest, Mode, RAM, USER_VECTORS};
use iced_x86::code_asm::*;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use topos_runtime::MemoryRegion;
use topos_vcpu::backend::VcpuBackend;
use topos_vcpu::interp::state::{cr0, cr4, flag};
use topos_vcpu::interp::{CpuState, DescriptorTable, Exit, InterpVcpu, SegReg, Segment};
use topos_vcpu::vm::{StopLatch, StopReason, Vm};

/// The random pages: from here to the end of RAM.
const RANDOM: u32 = 0x10000;
/// Instructions per `run` call of the host-driven guests.
const CHUNK: u64 = 10_000;
/// A run that has not halted after this many chunks is restarted anyway.
const CHUNKS_PER_START: u32 = 2;
/// Where the supervisor's ROM is mapped.
const ROM_BASE: u32 = 0xffff_0000;
/// The ROM's size.
const ROM_SIZE: u32 = 0x1_0000;
/// Per-CPU counters of supervisor entries (ring-3 guest), one dword each.
const COUNT: u32 = 0x100;
/// Per-CPU LCG states of the supervisor.
const SEED: u32 = 0x200;
/// A run that takes longer than this fails (a hang).
const WATCHDOG: Duration = Duration::from_secs(120);

/// The seed: `TOPOS_FUZZ_SEED` (a number, or `random` for one from the
/// clock), else a fixed one per test, so that CI runs are reproducible;
/// printed.
fn seed(test: &str) -> u64 {
    let fixed =
        test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    let s = match std::env::var("TOPOS_FUZZ_SEED").as_deref() {
        Ok("random") => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        }
        Ok(v) => v.parse().expect("TOPOS_FUZZ_SEED is a u64 or `random`"),
        Err(_) => fixed,
    };
    println!("{test}: seed {s} (replay with TOPOS_FUZZ_SEED={s})");
    s
}

/// `TOPOS_FUZZ_SCALE`, 1 by default.
fn scale() -> u64 {
    std::env::var("TOPOS_FUZZ_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1)
}

/// Runs `f` on a thread and fails if it takes longer than [`WATCHDOG`]
/// (the interpreter hung) or panics.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(WATCHDOG) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no answer in {WATCHDOG:?} (a hang)"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked (see above)"),
    }
}

/// Memory the guest must not change: a RAM block never mapped anywhere,
/// and the ROM (mapped, read-only).
struct Canaries {
    unmapped: MemoryRegion,
    unmapped_bytes: Vec<u8>,
    rom: MemoryRegion,
    rom_bytes: Vec<u8>,
}

impl Canaries {
    /// A 64 KiB unmapped block of random bytes, and `rom` as it is now.
    fn new(g: &Guest, rom: &MemoryRegion, rng: &mut StdRng) -> Canaries {
        let unmapped = g.topo.new_ram("canary", 0x1_0000).expect("a RAM block");
        let mut unmapped_bytes = vec![0u8; 0x1_0000];
        rng.fill_bytes(&mut unmapped_bytes);
        unmapped.ram().expect("RAM").write(0, &unmapped_bytes).expect("in the block");
        let mut rom_bytes = vec![0u8; ROM_SIZE as usize];
        rom.ram().expect("ROM").read(0, &mut rom_bytes).expect("in the block");
        Canaries { unmapped, unmapped_bytes, rom: rom.clone(), rom_bytes }
    }

    fn check(&self) {
        let mut b = vec![0u8; self.unmapped_bytes.len()];
        self.unmapped.ram().expect("RAM").read(0, &mut b).expect("in the block");
        assert!(b == self.unmapped_bytes, "the unmapped RAM block changed");
        let mut b = vec![0u8; self.rom_bytes.len()];
        self.rom.ram().expect("ROM").read(0, &mut b).expect("in the block");
        assert!(b == self.rom_bytes, "the ROM changed");
    }
}

/// A guest with random bytes from [`RANDOM`] to the end of RAM.
fn random_guest(mode: Mode, rng: &mut StdRng) -> Guest {
    let code = assemble(if mode == Mode::Real { 16 } else { 32 }, guest::CODE, |a| a.nop());
    let g = Guest::new(mode, &code);
    let mut bytes = vec![0u8; (RAM as u32 - RANDOM) as usize];
    rng.fill_bytes(&mut bytes);
    g.write(RANDOM, &bytes);
    g
}

/// Random bytes in one random page of the random area.
fn rerandomize_page(g: &Guest, rng: &mut StdRng) {
    let page = rng.random_range(RANDOM / 0x1000..RAM as u32 / 0x1000) * 0x1000;
    let mut bytes = [0u8; 0x1000];
    rng.fill_bytes(&mut bytes);
    g.write(page, &bytes);
}

/// A ROM of random bytes at [`ROM_BASE`] (the host-driven guests read and
/// write it at random too).
fn random_rom(g: &Guest, rng: &mut StdRng) -> MemoryRegion {
    let rom = g.topo.new_rom("rom", u128::from(ROM_SIZE)).expect("ROM");
    let mut bytes = vec![0u8; ROM_SIZE as usize];
    rng.fill_bytes(&mut bytes);
    rom.ram().expect("ROM").write(0, &bytes).expect("in the block");
    g.spaces.system.add_subregion(u64::from(ROM_BASE), &rom).expect("ROM mapped");
    rom
}

/// Identity tables for the first 4 MiB (32-bit or PAE) at [`guest::PAGING`],
/// and paging on.
fn enable_paging(g: &mut Guest, pae: bool) {
    let base = guest::PAGING;
    // Built on the host and written at once.
    let mut t = vec![0u8; 0x4000];
    let mut put = |at: u32, v: u64, n: usize| t[at as usize..at as usize + n].copy_from_slice(&v.to_le_bytes()[..n]);
    if pae {
        put(0, u64::from(base + 0x1000) | 1, 8);
        for d in 0..2u32 {
            put(0x1000 + 8 * d, u64::from(base + 0x2000 + 0x1000 * d) | 7, 8);
            for i in 0..512 {
                put(0x2000 + 0x1000 * d + 8 * i, u64::from((d * 512 + i) << 12) | 7, 8);
            }
        }
    } else {
        put(0, u64::from(base + 0x1000) | 7, 4);
        for i in 0..1024 {
            put(0x1000 + 4 * i, u64::from(i << 12) | 7, 4);
        }
    }
    g.write(base, &t);
    let s = g.cpu.state_mut();
    s.cr3 = base;
    s.cr4 = if pae { cr4::PAE } else { cr4::PSE };
    s.cr0 |= cr0::PG;
}

/// Puts the CPU at a random place in the random pages with random
/// registers (and, in protected mode, sometimes paging or ring 3).
fn restart(g: &mut Guest, rng: &mut StdRng) {
    match g.mode {
        Mode::Real => {
            g.reset_state(0);
            let s = g.cpu.state_mut();
            let code_seg = rng.random_range(RANDOM >> 4..0xf000) as u16;
            s.seg[SegReg::Cs as usize] = Segment::real_mode(code_seg, true);
            for seg in [SegReg::Ds, SegReg::Es, SegReg::Ss] {
                s.seg[seg as usize] = Segment::real_mode(rng.random_range(0..0x10000) as u16, false);
            }
            s.eip = rng.random_range(0..0x10000);
        }
        Mode::Prot => {
            let eip = rng.random_range(RANDOM..RAM as u32);
            g.reset_state(eip);
            match rng.random_range(0..6) {
                0 => enable_paging(g, false),
                1 => enable_paging(g, true),
                2 => g.enter_ring3(eip),
                _ => {}
            }
            // CS ends with RAM (until the guest reloads it): code that runs
            // off into empty space faults instead of spending the chunk
            // decoding nothing, one slow instruction at a time.
            g.cpu.state_mut().seg[SegReg::Cs as usize].limit = RAM as u32 - 1;
        }
    }
    let s = g.cpu.state_mut();
    for (i, r) in s.gpr.iter_mut().enumerate() {
        if i != 4 {
            *r = rng.random();
        }
    }
    let flags = rng.random::<u32>() & (flag::ARITH | flag::DF);
    s.set_eflags(flags | flag::FIXED);
}

/// What a host-driven run met.
#[derive(Debug, Default)]
struct Tally {
    instructions: u64,
    halts: u64,
    shutdowns: u64,
    restarts: u64,
    preempted: u64,
}

/// Random code in `mode`, driven by the host, for at least `instructions`
/// retired instructions.
fn host_driven(mode: Mode, seed: u64, instructions: u64) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut g = random_guest(mode, &mut rng);
    let rom = random_rom(&g, &mut rng);
    let canaries = Canaries::new(&g, &rom, &mut rng);
    let mut t = Tally::default();
    restart(&mut g, &mut rng);
    // A preemption timer, as an embedder would have: a `rep` with a huge
    // count is one instruction per burst of iterations, so an instruction
    // budget alone does not bound a run's time; a kick does (it is polled
    // between bursts).
    let kick = g.cpu.kick_flag();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (kick, done) = (kick.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                kick.store(true, Ordering::Release);
            }
        })
    };
    let mut chunks = 0;
    while g.cpu.instructions() < instructions {
        let exit = g.run(CHUNK);
        chunks += 1;
        let again = match exit {
            Exit::Limit => chunks >= CHUNKS_PER_START,
            Exit::Kicked => {
                kick.store(false, Ordering::Release);
                t.preempted += 1;
                chunks >= CHUNKS_PER_START
            }
            Exit::Halted => {
                t.halts += 1;
                true
            }
            Exit::Shutdown => {
                t.shutdowns += 1;
                g.build_tables();
                true
            }
            other => panic!("unexpected exit {other:?} (seed {seed})"),
        };
        if again {
            chunks = 0;
            t.restarts += 1;
            if t.restarts % 32 == 0 {
                rerandomize_page(&g, &mut rng);
            }
            if t.restarts % 256 == 0 {
                g.build_tables();
            }
            restart(&mut g, &mut rng);
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    t.instructions = g.cpu.instructions();
    canaries.check();
    t
}

fn host_driven_test(mode: Mode, name: &str) {
    let seed = seed(name);
    let n = 1_000_000 * scale();
    let start = Instant::now();
    let t = bounded(name, move || host_driven(mode, seed, n));
    println!("{name}: {t:?} in {:?}", start.elapsed());
    assert!(t.instructions >= n);
    assert!(t.restarts > 0, "the random code ran into something");
}

#[test]
fn random_code_in_real_mode() {
    host_driven_test(Mode::Real, "random_code_in_real_mode");
}

#[test]
fn random_code_in_protected_mode() {
    host_driven_test(Mode::Prot, "random_code_in_protected_mode");
}

// ----- ring 3 under a supervisor in ROM ------------------------------------------------------

/// ROM offsets of the supervisor's tables and code.
const ROM_GDT: u32 = 0;
const ROM_IDT: u32 = 0x1000;
const ROM_TSS: u32 = 0x2000;
const ROM_HANDLER: u32 = 0x3000;
/// The second CPU's TSS selector (after the layout's descriptors).
const TSS1: u16 = sel::END;
/// The ring-0 stack tops, one per CPU.
const STACK0: [u32; 2] = [0x8000, 0x9000];

/// The supervisor's handler: every vector enters it at ring 0 on the CPU's
/// TSS stack. It counts the entry, steps the CPU's LCG, writes a random
/// dword into the random pages, and `iret`s to ring 3 at a random EIP with
/// a random ESP and random registers.
fn supervisor_code() -> Vec<u8> {
    assemble(32, ROM_BASE + ROM_HANDLER, |a| {
        a.mov(eax, u32::from(sel::DATA0))?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        // ebx = 4 * CPU index, from the task register (0x28 or 0x68).
        a.str(ebx)?;
        a.sub(ebx, u32::from(sel::TSS))?;
        a.shr(ebx, 4)?;
        a.lock().inc(dword_ptr(ebx + COUNT))?;
        a.mov(eax, dword_ptr(ebx + SEED))?;
        a.imul_3(eax, eax, 1_103_515_245)?;
        a.add(eax, 12345)?;
        a.mov(dword_ptr(ebx + SEED), eax)?;
        // A random dword somewhere in the random pages.
        a.mov(ecx, eax)?;
        a.ror(ecx, 7)?;
        a.and(ecx, (RAM as u32 - 4) & !3)?;
        a.or(ecx, RANDOM)?;
        a.mov(edx, eax)?;
        a.xor(edx, ecx)?;
        a.mov(dword_ptr(ecx), edx)?;
        // The new EIP (edi) and ESP (esi).
        a.mov(edi, eax)?;
        a.rol(edi, 13)?;
        a.and(edi, RAM as u32 - 1)?;
        a.or(edi, RANDOM)?;
        a.mov(esi, eax)?;
        a.rol(esi, 21)?;
        a.and(esi, (RAM as u32 - 4) & !3)?;
        a.or(esi, RANDOM)?;
        // This CPU's ring-0 stack top: 0x8000 + 0x400 * ebx.
        a.mov(esp, ebx)?;
        a.shl(esp, 10)?;
        a.add(esp, STACK0[0])?;
        a.push(u32::from(sel::DATA3))?;
        a.push(esi)?;
        a.push(flag::FIXED)?;
        a.push(u32::from(sel::CODE3))?;
        a.push(edi)?;
        a.mov(ecx, u32::from(sel::DATA3))?;
        a.mov(ds, cx)?;
        a.mov(es, cx)?;
        a.mov(fs, cx)?;
        a.mov(gs, cx)?;
        a.mov(ecx, eax)?;
        a.rol(ecx, 3)?;
        a.and(ecx, 0xffff)?; // counts for `rep` and `loop`
        a.mov(edx, eax)?;
        a.rol(edx, 11)?;
        a.mov(ebp, eax)?;
        a.rol(ebp, 17)?;
        a.mov(ebx, eax)?;
        a.rol(ebx, 27)?;
        a.iretd()
    })
    .bytes
}

/// The supervisor's ROM: a GDT (the layout's descriptors and a second
/// TSS), an IDT with every gate to the handler, the TSSs, the handler.
fn supervisor_rom(g: &Guest) -> MemoryRegion {
    let rom = g.topo.new_rom("supervisor", u128::from(ROM_SIZE)).expect("ROM");
    let mut image = vec![0u8; ROM_SIZE as usize];
    let gdt = g.read(guest::GDT, usize::from(sel::END));
    image[..gdt.len()].copy_from_slice(&gdt);
    // Ring 3's code and data end with RAM: code that runs off into
    // nothing, or a `rep` with a huge count, faults instead of running
    // for ever through empty address space.
    let limit = (RAM as u32 >> 12) - 1;
    for (s, access) in [(sel::CODE3, 0xfb), (sel::DATA3, 0xf3)] {
        let at = usize::from(s & !7);
        image[at..at + 8].copy_from_slice(&descriptor(0, limit, access, 0xc).to_le_bytes());
    }
    for (i, sel) in [sel::TSS, TSS1].into_iter().enumerate() {
        let tss = ROM_BASE + ROM_TSS + 0x100 * i as u32;
        let d = descriptor(tss, 0x67, 0x8b, 0).to_le_bytes();
        image[usize::from(sel)..usize::from(sel) + 8].copy_from_slice(&d);
        let t = (ROM_TSS + 0x100 * i as u32) as usize;
        image[t + 4..t + 8].copy_from_slice(&STACK0[i].to_le_bytes());
        image[t + 8..t + 12].copy_from_slice(&u32::from(sel::DATA0).to_le_bytes());
        image[t + 0x66..t + 0x68].copy_from_slice(&0xffffu16.to_le_bytes());
    }
    for v in 0..=255u8 {
        let dpl = if USER_VECTORS.contains(&v) { 3 } else { 0 };
        let gd = gate(sel::CODE0, ROM_BASE + ROM_HANDLER, 0xe, dpl, true).to_le_bytes();
        let at = (ROM_IDT + 8 * u32::from(v)) as usize;
        image[at..at + 8].copy_from_slice(&gd);
    }
    let code = supervisor_code();
    image[ROM_HANDLER as usize..ROM_HANDLER as usize + code.len()].copy_from_slice(&code);
    rom.ram().expect("ROM").write(0, &image).expect("in the block");
    g.spaces.system.add_subregion(u64::from(ROM_BASE), &rom).expect("ROM mapped");
    rom
}

/// CPU `i`'s state: ring 3 at a random place, the supervisor's tables.
fn ring3_state(i: usize, rng: &mut StdRng) -> CpuState {
    let mut s = CpuState::reset();
    s.enter_flat32(0);
    s.cr0 &= !(cr0::CD | cr0::NW);
    s.gdtr = DescriptorTable { base: ROM_BASE + ROM_GDT, limit: TSS1 + 7 };
    s.idtr = DescriptorTable { base: ROM_BASE + ROM_IDT, limit: 256 * 8 - 1 };
    let tss = ROM_BASE + ROM_TSS + 0x100 * i as u32;
    s.tr = Segment { selector: [sel::TSS, TSS1][i], base: tss, limit: 0x67, attrs: 0x8b };
    let data = Segment { selector: sel::DATA3, base: 0, limit: RAM as u32 - 1, attrs: 0xc0f3 };
    let code = Segment { selector: sel::CODE3, base: 0, limit: RAM as u32 - 1, attrs: 0xc0fb };
    s.seg = [data, code, data, data, data, data];
    s.eip = rng.random_range(RANDOM..RAM as u32);
    for r in s.gpr.iter_mut() {
        *r = rng.random();
    }
    s.gpr[4] = STACK0[1] + 0x1000;
    s
}

/// A random guest with the supervisor, its canaries, and `cpus` states.
fn ring3_guest(seed: u64, cpus: usize) -> (Guest, Canaries, Vec<CpuState>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let g = random_guest(Mode::Prot, &mut rng);
    let rom = supervisor_rom(&g);
    for i in 0..cpus {
        g.write_u32(SEED + 4 * i as u32, rng.random());
    }
    let canaries = Canaries::new(&g, &rom, &mut rng);
    let states = (0..cpus).map(|i| ring3_state(i, &mut rng)).collect();
    (g, canaries, states)
}

#[test]
fn random_code_at_ring3_never_escapes_the_supervisor() {
    let seed = seed("random_code_at_ring3");
    let n = 1_000_000 * scale();
    let start = Instant::now();
    let (instructions, entries) = bounded("random code at ring 3", move || {
        let (mut g, canaries, states) = ring3_guest(seed, 1);
        *g.cpu.state_mut() = states[0].clone();
        let mut rng = StdRng::seed_from_u64(seed ^ 1);
        let mut rescues = 0u64;
        let mut last = g.read_u32(COUNT);
        while g.cpu.instructions() < n {
            // Random code can loop for ever without a fault (nothing
            // preempts ring 3 here): the host restarts it then.
            let count = g.read_u32(COUNT);
            if count == last && g.state().cpl() == 3 {
                *g.cpu.state_mut() = ring3_state(0, &mut rng);
                rescues += 1;
            }
            last = count;
            let exit = g.run(CHUNK);
            assert_eq!(exit, Exit::Limit, "ring-3 code stopped the CPU (seed {seed}): {:x?}", g.state());
            // At ring 3, or in the supervisor's handler.
            let s = g.state();
            let in_handler = (ROM_BASE + ROM_HANDLER..ROM_BASE + ROM_HANDLER + 0x100).contains(&s.eip);
            assert!(s.cpl() == 3 || in_handler, "escaped the supervisor (seed {seed}): {s:x?}");
        }
        canaries.check();
        println!("random_code_at_ring3: {rescues} restarts of code looping without a fault");
        (g.cpu.instructions(), g.read_u32(COUNT))
    });
    println!(
        "random_code_at_ring3: {instructions} instructions, {entries} supervisor entries in {:?}",
        start.elapsed()
    );
    assert!(entries > 1000, "the supervisor ran ({entries} entries)");
}

/// Starts a [`Vm`] of `cpus` interpreted vCPUs on a ring-3 guest, waits
/// until they have entered the supervisor `entries` times (each at least
/// once), and stops it.
fn vm_ring3(name: &str, cpus: usize, entries: u32) {
    let seed = seed(name);
    let (g, canaries, states) = ring3_guest(seed, cpus);
    let latch = Arc::new(StopLatch::default());
    let backends: Vec<Box<dyn VcpuBackend>> = states
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v = InterpVcpu::new(&g.spaces.memory, &g.spaces.io_space, i as u32, cpus as u32, None);
            *v.cpu().state_mut() = s;
            Box::new(v) as Box<dyn VcpuBackend>
        })
        .collect();
    let vm = Vm::start(backends, &g.spaces.memory, &g.spaces.io_space, latch.clone()).expect("the VM starts");
    let deadline = Instant::now() + WATCHDOG;
    let counts = |g: &Guest| (0..cpus).map(|i| g.read_u32(COUNT + 4 * i as u32)).collect::<Vec<_>>();
    // Each vCPU entered the supervisor, and together `entries` times (one
    // may loop without faulting for ever: it is still running random code).
    let progressed =
        |c: &[u32]| c.iter().all(|&n| n > 0) && c.iter().map(|&n| u64::from(n)).sum::<u64>() >= u64::from(entries);
    while !progressed(&counts(&g)) {
        assert!(latch.reason().is_none(), "the VM stopped by itself: {:?} (seed {seed})", latch.reason());
        assert!(Instant::now() < deadline, "the vCPUs made no progress: {:?} (seed {seed})", counts(&g));
        std::thread::yield_now();
    }
    let begin = Instant::now();
    let reason = bounded("Vm::stop", move || vm.stop());
    let took = begin.elapsed();
    println!("{name}: supervisor entries {:?}; stopped in {took:?}", counts(&g));
    assert_eq!(reason, StopReason::Requested, "seed {seed}");
    assert!(took < Duration::from_secs(5), "Vm::stop took {took:?}");
    canaries.check();
}

#[test]
fn a_vm_running_random_code_stops_promptly() {
    vm_ring3("vm_random_code_1_vcpu", 1, 2_000);
}

#[test]
fn two_vcpus_race_random_code_on_shared_ram() {
    vm_ring3("vm_random_code_2_vcpus", 2, 4_000);
}
