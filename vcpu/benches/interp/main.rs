//! The x86 interpreter's benchmarks (issue 9), each beside its baselines in
//! the same sitting: the same guest image (see [`guest`]) on topos's
//! interpreter, QEMU TCG, KVM (PVM here) and Bochs. Not a criterion bench:
//! the variants are interleaved round by round (the order rotated between
//! rounds) and medians are taken over rounds, because this shared 2-core
//! machine drifts by more than some of the differences measured.
//!
//! Sections (all by default; name some as arguments to run only those):
//!
//! * `loop`: a ring-0 32-bit `dec ecx; jnz` loop, iterations per second:
//!   the interpreter on the `pc` board ([`Machine`](topos_vcpu::machine::Machine)
//!   with `Accel::Interp`) and through its library API (`Cpu::run`, no
//!   board), QEMU TCG, KVM (`Accel::Kvm`; PVM here, which emulates ring-0
//!   code in the kernel) and Bochs.
//! * `access`: PIO writes (port `0x80`), MMIO writes and MMIO reads (the
//!   `edu`'s liveness register) per second: the interpreter against QEMU
//!   TCG, one vCPU.
//! * `smp`: two vCPUs, each on its own `edu` (MMIO) or both on port `0x80`
//!   (PIO), aggregate accesses per second against one vCPU, on the
//!   interpreter and on QEMU TCG (`-accel tcg,thread=multi -smp 2`); each
//!   round is bracketed by a host control (2 threads of integer work ÷ 1).
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it does a
//! short smoke run of every variant that can run here, with no timing
//! worth reading, and installs nothing.
//!
//! Knobs: `TOPOS_BENCH_ROUNDS` (default 11), `TOPOS_BENCH_SCALE` (per cent
//! of the default iteration counts, 100), `TOPOS_BENCH_VARIANTS` (a comma
//! list of `interp,lib,tcg,kvm,bochs`; all by default — e.g. `interp` to
//! profile the interpreter alone), `TOPOS_BENCH_KINDS` (a comma list of
//! `pio-write,mmio-write,mmio-read` for the `access` and `smp` sections),
//! `TOPOS_BENCH_INSTALL` (`0`: do not
//! `apt-get install` a missing QEMU or Bochs), `TOPOS_BENCH_GAP_MS` (pause
//! before each run, 50). Run with `cargo bench -p topos-vcpu --bench interp`.

mod bochs;
#[path = "../common/mod.rs"]
mod common;
mod guest;
mod host;
mod qemu;
mod stats;
mod topos;

use common::{env_u32, max, median, min, settle, Control};
use guest::Kind;
use stats::{mega, spread, times, Run};
use std::time::Duration;
use topos_vcpu::machine::Accel;

/// The backends a guest runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// topos's interpreter on the `pc` board.
    Interp,
    /// The interpreter's library API, no board (the loop only).
    Library,
    /// QEMU TCG.
    Tcg,
    /// topos on KVM (PVM here; the loop only).
    Kvm,
    /// Bochs (the loop only).
    Bochs,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Interp => "topos interpreter (`pc` board, `Accel::Interp`)",
            Backend::Library => "topos interpreter, library API (`Cpu::run`, no board)",
            Backend::Tcg => "QEMU 7.2 TCG",
            Backend::Kvm => "topos on KVM (PVM here)",
            Backend::Bochs => "Bochs 2.7",
        }
    }

    fn knob(self) -> &'static str {
        match self {
            Backend::Interp => "interp",
            Backend::Library => "lib",
            Backend::Tcg => "tcg",
            Backend::Kvm => "kvm",
            Backend::Bochs => "bochs",
        }
    }
}

/// What can run here, and how.
struct Bench {
    smoke: bool,
    rounds: u32,
    scale: f64,
    qemu: Option<qemu::Qemu>,
    bochs: Option<bochs::Bochs>,
    kvm: bool,
    wanted: Vec<String>,
    kinds: Vec<String>,
}

const TIMEOUT: Duration = Duration::from_secs(120);

impl Bench {
    fn wants(&self, b: Backend) -> bool {
        self.wanted.is_empty() || self.wanted.iter().any(|w| w == b.knob())
    }

    /// The device accesses of `all` that `TOPOS_BENCH_KINDS` names.
    fn kinds(&self, all: &[Kind]) -> Vec<Kind> {
        all.iter().copied().filter(|k| self.kinds.is_empty() || self.kinds.iter().any(|w| w == k.knob())).collect()
    }

    fn available(&self, b: Backend) -> bool {
        self.wants(b)
            && match b {
                Backend::Interp | Backend::Library => true,
                Backend::Tcg => self.qemu.is_some(),
                Backend::Kvm => self.kvm,
                Backend::Bochs => self.bochs.is_some(),
            }
    }

    /// Iterations per run (per vCPU) of `kind` on `b`: about half a second
    /// of the backend's speed here.
    fn iterations(&self, b: Backend, kind: Kind) -> u32 {
        if self.smoke {
            return if b == Backend::Kvm { 1_000 } else { 10_000 };
        }
        let n: f64 = match (b, kind) {
            (Backend::Interp | Backend::Library, Kind::Loop) => 100e6,
            (Backend::Tcg, Kind::Loop) => 300e6,
            (Backend::Kvm, _) => 500e3,
            (Backend::Bochs, _) => 30e6,
            (_, _) => 10e6,
        };
        ((n * self.scale) as u32).max(1)
    }

    fn run(&self, b: Backend, kind: Kind, cpus: u32) -> Run {
        settle();
        let n = self.iterations(b, kind);
        let r = match b {
            Backend::Interp => topos::run(Accel::Interp, kind, n, cpus, TIMEOUT),
            Backend::Kvm => topos::run(Accel::Kvm, kind, n, cpus, TIMEOUT),
            Backend::Library => Ok(topos::library_loop(n)),
            Backend::Tcg => {
                let qemu = self.qemu.as_ref().unwrap();
                self.differential(cpus, || qemu.run(kind, 1, cpus, TIMEOUT), || qemu.run(kind, n, cpus, TIMEOUT))
            }
            Backend::Bochs => {
                let bochs = self.bochs.as_ref().unwrap();
                self.differential(cpus, || bochs.run(1, TIMEOUT), || bochs.run(n, TIMEOUT))
            }
        };
        r.unwrap_or_else(|e| panic!("{} {kind:?} ({cpus} vCPUs): {e}", b.name()))
    }

    /// An emulator process's run with its CPU time for the guest's loop:
    /// with one vCPU, the process's CPU time (all threads) minus that of
    /// the same command with a 1-iteration guest run just before it, so
    /// that start-up and teardown cancel out.
    fn differential(
        &self,
        cpus: u32,
        empty: impl FnOnce() -> Result<(Run, f64), String>,
        full: impl FnOnce() -> Result<(Run, f64), String>,
    ) -> Result<Run, String> {
        if cpus != 1 {
            return full().map(|(r, _)| r);
        }
        let (_, base) = empty()?;
        settle();
        let (mut run, cpu) = full()?;
        run.cpu = Some(cpu - base);
        Ok(run)
    }
}

/// Runs `variants` once each per round, the order rotated by one each
/// round, after one unrecorded warm-up round (none in a smoke run);
/// `between` runs after each recorded round. Returns the runs per variant.
fn interleave<V: Copy>(
    bench: &Bench,
    variants: &[V],
    mut run: impl FnMut(V) -> Run,
    mut between: impl FnMut(u32),
) -> Vec<Vec<Run>> {
    let mut runs = vec![Vec::new(); variants.len()];
    let first = if bench.smoke { 1 } else { 0 };
    for round in first..=bench.rounds {
        for j in 0..variants.len() {
            let v = (j + round as usize) % variants.len();
            let r = run(variants[v]);
            if round > 0 {
                runs[v].push(r);
            }
        }
        if round > 0 {
            between(round);
        }
    }
    runs
}

fn rates(runs: &[Run]) -> Vec<f64> {
    runs.iter().map(Run::rate).collect()
}

/// Per-round ratios `a ÷ b` of the rates.
fn ratios(a: &[Run], b: &[Run]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a.rate() / b.rate()).collect()
}

fn cpu(runs: &[Run]) -> Vec<f64> {
    runs.iter().filter_map(Run::cpu_ns).collect()
}

/// Per-round ratios of the CPU cost `b ÷ a` (how many times less CPU `a`
/// spends per iteration than `b`).
fn cpu_ratios(a: &[Run], b: &[Run]) -> Vec<f64> {
    a.iter().zip(b).filter_map(|(a, b)| Some(b.cpu_ns()? / a.cpu_ns()?)).collect()
}

fn cpu_ns(runs: &[Run]) -> String {
    let v = cpu(runs);
    if v.is_empty() {
        "–".into()
    } else {
        format!("{:.2}", median(&v))
    }
}

/// `a` against `b`: the ratio of the medians and the per-round ratios, by
/// wall clock (rates) and by CPU time (costs); "–" where there is none.
fn versus(a: &[Run], b: &[Run]) -> [String; 4] {
    let (ca, cb) = (cpu(a), cpu(b));
    let by_cpu = if ca.is_empty() || cb.is_empty() { "–".into() } else { times(median(&cb) / median(&ca)) };
    [
        times(median(&rates(a)) / median(&rates(b))),
        spread(&ratios(a, b), times),
        by_cpu,
        spread(&cpu_ratios(a, b), times),
    ]
}

fn loop_section(bench: &Bench) {
    let backends: Vec<Backend> = [Backend::Interp, Backend::Library, Backend::Tcg, Backend::Kvm, Backend::Bochs]
        .into_iter()
        .filter(|b| bench.available(*b))
        .collect();
    println!("## loop: ring-0 32-bit `dec ecx; jnz`, {} rounds, iterations/s", bench.rounds);
    println!();
    let runs = interleave(bench, &backends, |b| bench.run(b, Kind::Loop, 1), |r| eprintln!("loop round {r} done"));
    let reference = backends.iter().position(|b| *b == Backend::Interp);
    println!("| backend | iterations per run | iterations/s (wall): median [min, max] | CPU ns per iteration | interpreter ÷ it, wall (ratio of medians) | per round: median [min, max] | interpreter ÷ it, by CPU time | per round: median [min, max] |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (i, b) in backends.iter().enumerate() {
        let [wall, wall_rounds, by_cpu, cpu_rounds] = match reference {
            Some(r) if r != i => versus(&runs[r], &runs[i]),
            _ => ["–".into(), "–".into(), "–".into(), "–".into()],
        };
        println!(
            "| {} | {} | {} | {} | {wall} | {wall_rounds} | {by_cpu} | {cpu_rounds} |",
            b.name(),
            bench.iterations(*b, Kind::Loop),
            spread(&rates(&runs[i]), mega),
            cpu_ns(&runs[i])
        );
    }
    println!();
}

fn access_section(bench: &Bench) {
    let backends: Vec<Backend> = [Backend::Interp, Backend::Tcg].into_iter().filter(|b| bench.available(*b)).collect();
    let kinds = bench.kinds(&[Kind::PioWrite, Kind::MmioWrite, Kind::MmioRead]);
    println!("## device accesses, 1 vCPU: {} rounds, accesses/s", bench.rounds);
    println!();
    let variants: Vec<(Kind, Backend)> = kinds.iter().flat_map(|k| backends.iter().map(move |b| (*k, *b))).collect();
    let runs = interleave(bench, &variants, |(k, b)| bench.run(b, k, 1), |r| eprintln!("access round {r} done"));
    println!("| access | accesses per run | interpreter (wall): median [min, max] | QEMU TCG (wall): median [min, max] | interpreter / TCG CPU ns per access | interpreter ÷ TCG, wall (ratio of medians) | per round: median [min, max] | interpreter ÷ TCG, by CPU time | per round: median [min, max] |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for kind in kinds {
        let of = |b: Backend| variants.iter().position(|v| *v == (kind, b)).map(|i| &runs[i][..]);
        let (interp, tcg) = (of(Backend::Interp), of(Backend::Tcg));
        let [wall, wall_rounds, by_cpu, cpu_rounds] = match (interp, tcg) {
            (Some(i), Some(t)) => versus(i, t),
            _ => ["–".into(), "–".into(), "–".into(), "–".into()],
        };
        println!(
            "| {} | {} | {} | {} | {} / {} | {wall} | {wall_rounds} | {by_cpu} | {cpu_rounds} |",
            kind.name(),
            bench.iterations(Backend::Interp, kind),
            interp.map_or("–".into(), |r| spread(&rates(r), mega)),
            tcg.map_or("not measured".into(), |r| spread(&rates(r), mega)),
            interp.map_or("–".into(), cpu_ns),
            tcg.map_or("–".into(), cpu_ns),
        );
    }
    println!();
}

fn smp_section(bench: &Bench) {
    let backends: Vec<Backend> = [Backend::Interp, Backend::Tcg].into_iter().filter(|b| bench.available(*b)).collect();
    let kinds = bench.kinds(&[Kind::MmioWrite, Kind::MmioRead, Kind::PioWrite]);
    println!("## two vCPUs against one: {} rounds, aggregate accesses/s (each vCPU does the same count)", bench.rounds);
    println!();
    let control = Control::new(if bench.smoke { 0.01 } else { 0.3 }, false);
    let quiet_threshold = 1.8;
    let mut table = Vec::new();
    let mut all_controls = Vec::new();
    for kind in kinds {
        let variants: Vec<(Backend, u32)> = backends.iter().flat_map(|b| [(*b, 1), (*b, 2)]).collect();
        let mut controls = vec![control.measure()];
        let runs = interleave(
            bench,
            &variants,
            |(b, cpus)| bench.run(b, kind, cpus),
            |r| {
                controls.push(control.measure());
                eprintln!("smp {kind:?} round {r} done (host control {:.2}×)", controls.last().unwrap());
            },
        );
        // Round i (0-based) is bracketed by controls i and i + 1.
        let quiet: Vec<bool> =
            (0..runs[0].len()).map(|i| controls[i] >= quiet_threshold && controls[i + 1] >= quiet_threshold).collect();
        all_controls.extend(controls.windows(2).map(|w| w[0].min(w[1])));
        table.push((kind, variants, runs, quiet));
    }
    println!("Aggregate accesses/s (medians over all rounds), and the 2 ÷ 1 ratio per round: median [min, max] over all rounds, then over the quiet rounds only (the host control before and after the round both ≥ {quiet_threshold}×):");
    println!();
    println!("| access | interpreter 1 vCPU | interpreter 2 vCPUs | TCG 1 vCPU | TCG 2 vCPUs | interpreter 2 ÷ 1, all | TCG 2 ÷ 1, all | quiet rounds | interpreter 2 ÷ 1, quiet | TCG 2 ÷ 1, quiet | interpreter 2 ÷ TCG 2, all |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (kind, variants, runs, quiet) in &table {
        let of = |b: Backend, cpus: u32| variants.iter().position(|v| *v == (b, cpus)).map(|i| &runs[i][..]);
        let rate = |b, c| of(b, c).map_or("–".into(), |r| mega(median(&rates(r))));
        let scale = |b, keep: &dyn Fn(usize) -> bool| match (of(b, 1), of(b, 2)) {
            (Some(one), Some(two)) => {
                let v: Vec<f64> =
                    ratios(two, one).into_iter().enumerate().filter(|(i, _)| keep(*i)).map(|x| x.1).collect();
                spread(&v, times)
            }
            _ => "–".into(),
        };
        let all = |_: usize| true;
        let only_quiet = |i: usize| quiet[i];
        let versus = match (of(Backend::Interp, 2), of(Backend::Tcg, 2)) {
            (Some(i), Some(t)) => spread(&ratios(i, t), times),
            _ => "–".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} of {} | {} | {} | {versus} |",
            kind.name(),
            rate(Backend::Interp, 1),
            rate(Backend::Interp, 2),
            rate(Backend::Tcg, 1),
            rate(Backend::Tcg, 2),
            scale(Backend::Interp, &all),
            scale(Backend::Tcg, &all),
            quiet.iter().filter(|q| **q).count(),
            quiet.len(),
            scale(Backend::Interp, &only_quiet),
            scale(Backend::Tcg, &only_quiet),
        );
    }
    println!();
    println!(
        "Host control (2 threads of integer work ÷ 1, the lower of before/after each round): median {:.2}× [{:.2}, {:.2}].",
        median(&all_controls),
        min(&all_controls),
        max(&all_controls)
    );
    println!();
    println!(
        "Interpreter vCPU-thread CPU ns per access (medians; a contended lock that spins would raise it with 2 vCPUs):"
    );
    println!();
    println!("| access | 1 vCPU | 2 vCPUs |");
    println!("| --- | --- | --- |");
    for (kind, variants, runs, _) in &table {
        let of = |cpus: u32| {
            variants.iter().position(|v| *v == (Backend::Interp, cpus)).map_or("–".into(), |i| cpu_ns(&runs[i]))
        };
        println!("| {} | {} | {} |", kind.name(), of(1), of(2));
    }
    println!();
}

fn main() {
    // `cargo bench` passes `--bench`; other arguments name sections.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sections: Vec<String> = args.iter().filter(|a| !a.starts_with("--")).cloned().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let want = |s: &str| sections.is_empty() || sections.iter().any(|w| w == s);
    let install = !smoke && env_u32("TOPOS_BENCH_INSTALL", 1) != 0;
    let list = |name: &str| -> Vec<String> {
        std::env::var(name)
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    };
    let wanted = list("TOPOS_BENCH_VARIANTS");
    let kinds = list("TOPOS_BENCH_KINDS");
    let wants = |knob: &str| wanted.is_empty() || wanted.iter().any(|w| w == knob);

    println!("# The x86 interpreter against its baselines");
    println!();
    if smoke {
        println!("(smoke run without `--bench`: numbers not meaningful; use `cargo bench`)");
        println!();
    }
    let qemu = if wants("tcg") {
        match host::find_or_install("qemu-system-x86_64", "qemu-system-x86", install) {
            Ok(p) => Some(qemu::Qemu::new(p)),
            Err(why) => {
                println!("QEMU TCG: not measured: {why}.");
                None
            }
        }
    } else {
        None
    };
    let bochs = if wants("bochs") {
        match host::find_or_install("bochs", "bochs", install) {
            Ok(p) => Some(bochs::Bochs::new(p)),
            Err(why) => {
                println!("Bochs: not measured: {why}.");
                None
            }
        }
    } else {
        None
    };
    let kvm = wants("kvm") && std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if wants("kvm") && !kvm {
        println!("KVM: not measured: /dev/kvm cannot be opened.");
    }
    let bench = Bench {
        smoke,
        rounds: if smoke { 1 } else { env_u32("TOPOS_BENCH_ROUNDS", 11).max(1) },
        scale: if smoke { 1.0 } else { f64::from(env_u32("TOPOS_BENCH_SCALE", 100).max(1)) / 100.0 },
        qemu,
        bochs,
        kvm,
        wanted,
        kinds,
    };
    println!();
    if bench.qemu.is_some() {
        println!("QEMU: `{}`.", qemu::Qemu::describe(1));
        println!();
    }
    if want("loop") {
        loop_section(&bench);
    }
    if want("access") {
        access_section(&bench);
    }
    if want("smp") {
        smp_section(&bench);
    }
}
