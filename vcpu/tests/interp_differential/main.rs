//! Differential test of the x86 interpreter (issue 9, acceptance 2):
//! random instruction sequences run on the interpreter and on KVM (and on
//! QEMU's TCG where KVM cannot judge), their registers, flags and memory
//! compared afterwards.
//!
//! # What runs natively under PVM
//!
//! `/dev/kvm` here is PVM. Measured with the ignored test `pvm_loop_rates`
//! (a `mov ecx, n; dec ecx; jnz` loop; wall time of one `KVM_RUN` after
//! `KVM_SET_SREGS` put the vCPU in the mode; AMD EPYC host):
//!
//! | where the loop runs | iterations/s | |
//! | --- | --- | --- |
//! | ring 3, 64-bit code, long mode | 4,200 M (10^9 in 0.236 s) | native |
//! | ring 3, 32-bit compatibility mode (CS `0x23` = Linux's `__USER32_CS`, SS/DS `0x2b`, or CS `0x1b`; entered with `KVM_SET_SREGS` or by a far return from 64-bit ring 3) | 0.8–1.0 M | emulated |
//! | ring 0, 32-bit protected mode, no paging | 1.0–1.1 M | emulated |
//! | real mode | 1.0 M | emulated |
//! | 32-bit protected mode with PAE paging (no long mode), ring 0 or 3 | — | set up by `KVM_SET_SREGS`: triple fault at the first instruction; enabled by the guest (`mov cr0` with PG after CR4.PAE): #GP(0) |
//!
//! So only 64-bit code at CPL 3 runs on the host CPU; 32-bit code at any
//! privilege is emulated by the host kernel. In native ring 3 the
//! underlying RFLAGS has IOPL 0 and IF 1 whatever the guest set: `out`
//! raises #GP(0), delivered through the guest's 64-bit IDT (with RF set in
//! the frame), which is how a native case ends.
//!
//! # The comparisons
//!
//! | test | cases (default) | oracle | what is compared |
//! | --- | --- | --- | --- |
//! | `interpreter_matches_the_native_cpu` | 3000 | KVM, native ring 3 | everything, undefined flags included |
//! | `interpreter_matches_kvm_in_protected_mode` | 3000 | KVM (PVM's emulation), ring 0 | defined behaviour |
//! | `interpreter_matches_kvm_in_real_mode` | 3000 | KVM (PVM's emulation), real mode | defined behaviour |
//! | `interpreter_matches_qemu_in_protected_mode` | 1000 | QEMU TCG, ring 0 | defined behaviour |
//! | `interpreter_matches_qemu_in_real_mode` | 1000 | QEMU TCG, real mode | defined behaviour |
//! | `pvm_ring0_matches_native` | 500 | KVM ring 3 vs KVM ring 0 (the harness's self-check) | everything |
//! | `generated_cases_run_to_their_end_on_kvm` | 3 × 300 | KVM | each case reaches its `out` or its deliberate exception |
//!
//! * **Native** sequences hold 8-, 16- and 32-bit operations that mean the
//!   same in 32-bit and 64-bit mode (ALU, shifts, rotates, multiply,
//!   divide, bit operations, `setcc`/`cmovcc`, exchanges, moves, `lea`,
//!   conversions, `lahf`/`sahf`, flag operations, string operations with
//!   32-bit addresses, `xlat`; no stack, no BCD), assembled once for 32-bit
//!   protected mode (the interpreter) and once for 64-bit mode (KVM; 32-bit
//!   registers in memory operands get an address-size prefix). The host CPU
//!   runs them: the exact oracle for undefined flags (all of EFLAGS but RF
//!   is compared).
//! * **Ring-0** and **real-mode** sequences use the whole generated ISA:
//!   also the stack (`push`/`pop` of registers, memory and immediates,
//!   `pusha`/`popa`, `enter`/`leave`, `push esp`, `pop esp`), `pushf`/
//!   `popf`, BCD, 16-bit addressing in real mode, and (3 %) an exception to
//!   end with (#DE, #UD, `int3`, `into`, `int n`), compared through the
//!   frame it pushed. The generator defines flags again before anything
//!   reads them (`cmp r32, imm32`) and the flags undefined at the end are
//!   not compared, so only defined behaviour counts.
//! * Against KVM the generator leaves out what PVM's emulation cannot run
//!   or gets wrong (see [`gen`]); against QEMU what QEMU 7.2 gets wrong
//!   (the `f6 /1`, `f7 /1` `test` aliases, the `idiv` overflow, which kills
//!   QEMU with SIGFPE, `cmpxchg8b`'s flags, RF in a protected-mode fault's
//!   frame).
//! * PVM's ring 0 agreed exactly with the native CPU (undefined flags
//!   included) on every native sequence tried (5000): its emulation
//!   computes flags as the host does.
//!
//! # Running
//!
//! A mismatch prints the seed, the command that reproduces it, the listing
//! (and the 64-bit one), the start and both end states, the first
//! differing field, and the first instruction after which the runners
//! disagree (found by running ever longer prefixes of the case); a failing
//! test ends with the count of mismatches by that instruction.
//! `TOPOS_DIFF_CASES=n` runs `n` cases per comparison (seeds `0..n`, or
//! from `TOPOS_DIFF_FIRST`); `TOPOS_DIFF_SEED=s` runs case `s` only and
//! prints it; `TOPOS_DIFF_LOCATE=n` traces the first `n` mismatches (200
//! against KVM, 10 against QEMU); `TOPOS_DIFF_QEMU_LOG=file` has QEMU log
//! what it runs. The KVM comparisons skip, saying why, without `/dev/kvm`,
//! the QEMU ones without `qemu-system-x86_64`.

#[path = "../support/mod.rs"]
mod support;

mod addressing;
mod case;
mod flags;
mod frame;
mod gen;
mod interp;
mod kvm;
mod layout;
mod outcome;
mod qemu;
mod registry;

use case::Case;
use gen::Options;
use interp::InterpRunner;
use kvm::{Env, KvmRunner};
use outcome::{first_difference, flag_names, End, Outcome};
use registry::Profile;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;
use support::{env_u64, Seeds};

/// The KVM runner, or `None` with the reason printed.
fn kvm() -> Option<KvmRunner> {
    if !support::kvm_present() {
        return None;
    }
    match KvmRunner::new() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// The full report of one case.
fn report(test: &str, case: &Case, names: (&str, &str), outs: (&Outcome, &Outcome), mask: u32) -> String {
    let diff = first_difference(outs.0, outs.1, mask).unwrap_or_else(|| "none".into());
    format!(
        "--- {test}: seed {seed} ({profile:?}, {options:?}): {diff}\n\
         reproduce: TOPOS_DIFF_SEED={seed} cargo test -p topos-vcpu --test interp_differential {test} -- --nocapture\n\
         {listing}start:  {start}\n\
         {a:<7} {ea:?} {sa}\n\
         {b:<7} {eb:?} {sb}\n\
         flags compared: [{compared}]; undefined at the end: [{undefined}]\n",
        seed = case.seed,
        profile = case.profile,
        options = case.options,
        listing = case.listing(),
        start = case.start,
        a = format!("{}:", names.0),
        ea = outs.0.end,
        sa = outs.0.state,
        b = format!("{}:", names.1),
        eb = outs.1.end,
        sb = outs.1.state,
        compared = flag_names(mask),
        undefined = flag_names(case.undefined),
    )
}

/// Finds the first instruction after which the runners disagree (running
/// ever longer prefixes of `case`) and says what each made of it.
fn locate(
    case: &Case,
    names: (&str, &str),
    with_undefined: bool,
    a: &mut impl FnMut(&[Case]) -> Vec<Outcome>,
    b: &mut impl FnMut(&[Case]) -> Vec<Outcome>,
) -> (String, String) {
    let prefixes: Vec<Case> = (0..=case.len()).map(|n| case.prefix(n)).collect();
    let (outs_a, outs_b) = (a(&prefixes), b(&prefixes));
    let mut before: Option<(&Outcome, &Case)> = None;
    for (n, ((p, oa), ob)) in prefixes.iter().zip(&outs_a).zip(&outs_b).enumerate() {
        let mask = p.flags_mask(with_undefined);
        if let Some(diff) = first_difference(oa, ob, mask) {
            let (culprit, prior) = match (n, before) {
                (0, _) | (_, None) => ("(the start state)".to_string(), String::new()),
                (_, Some((o, c))) => (
                    case.instruction(n - 1),
                    format!("before it: {} (undefined [{}])\n", o.state, flag_names(c.undefined)),
                ),
            };
            let text = format!(
                "first divergence: after instruction {n}: {culprit}: {diff}\n{prior}\
                 {:<7} {:?} {}\n{:<7} {:?} {}\n",
                format!("{}:", names.0),
                oa.end,
                oa.state,
                format!("{}:", names.1),
                ob.end,
                ob.state
            );
            let mut field = diff.split(':').next().unwrap_or_default().to_string();
            if field == "eflags" {
                let differ = (oa.state.eflags ^ ob.state.eflags) & mask;
                let undefined = if differ & !p.undefined == 0 { " (undefined)" } else { "" };
                field = format!("eflags [{}]{undefined}", flag_names(differ));
            }
            let key = if n == 0 { "(start)".to_string() } else { case.instruction_kind(n - 1) };
            return (text, format!("{key} → {field}"));
        }
        before = Some((oa, p));
    }
    ("first divergence: none of the prefixes differs\n".into(), "(no prefix differs)".into())
}

/// What [`Comparison::run`] found.
#[derive(Default)]
struct Tally {
    cases: u64,
    mismatches: Vec<String>,
    /// Cases that agree on the compared bits but not on the undefined
    /// flags, and in which flags.
    undefined_only: u64,
    undefined_flags: BTreeMap<&'static str, u64>,
    /// The first diverging instruction (mnemonic and operand form) and
    /// field of the first mismatches, with their seeds.
    culprits: BTreeMap<String, Vec<u64>>,
}

/// One comparison: cases of `profile` generated with `options`, run on two
/// runners named `names`, compared on every EFLAGS bit or
/// (`with_undefined` false) without the flags undefined at the end.
struct Comparison {
    test: &'static str,
    profile: Profile,
    options: Options,
    default_count: u64,
    names: (&'static str, &'static str),
    with_undefined: bool,
    /// How many mismatches are traced to their first diverging instruction.
    locate: usize,
}

impl Comparison {
    /// Runs the cases on `a` and `b` (each runs a batch) and compares them.
    fn run(&self, mut a: impl FnMut(&[Case]) -> Vec<Outcome>, mut b: impl FnMut(&[Case]) -> Vec<Outcome>) -> Tally {
        let s = Seeds::from_env("TOPOS_DIFF", self.default_count);
        let started = Instant::now();
        let mut t = Tally::default();
        let mut seed = s.first;
        while seed < s.first + s.count {
            let chunk: Vec<Case> = (seed..(seed + CHUNK).min(s.first + s.count))
                .map(|n| Case::new(self.profile, n, self.options))
                .collect();
            seed += chunk.len() as u64;
            let (outs_a, outs_b) = (a(&chunk), b(&chunk));
            for ((case, oa), ob) in chunk.iter().zip(&outs_a).zip(&outs_b) {
                self.tally(&mut t, case, (oa, ob), &mut a, &mut b);
                if s.verbose {
                    println!("{}", report(self.test, case, self.names, (oa, ob), case.flags_mask(self.with_undefined)));
                }
            }
        }
        println!(
            "{}: {} cases (seeds {}..{}) in {:.1?}: {} mismatches",
            self.test,
            t.cases,
            s.first,
            s.first + s.count,
            started.elapsed(),
            t.mismatches.len()
        );
        t
    }

    /// Counts one case's comparison in `t`.
    fn tally(
        &self,
        t: &mut Tally,
        case: &Case,
        (oa, ob): (&Outcome, &Outcome),
        a: &mut impl FnMut(&[Case]) -> Vec<Outcome>,
        b: &mut impl FnMut(&[Case]) -> Vec<Outcome>,
    ) {
        let mask = case.flags_mask(self.with_undefined);
        t.cases += 1;
        if first_difference(oa, ob, mask).is_some() {
            let mut r = report(self.test, case, self.names, (oa, ob), mask);
            let traced = env_u64("TOPOS_DIFF_LOCATE").map_or(self.locate, |n| n as usize);
            if t.mismatches.len() < traced {
                let (text, key) = locate(case, self.names, self.with_undefined, a, b);
                r.push_str(&text);
                t.culprits.entry(key).or_default().push(case.seed);
            }
            t.mismatches.push(r);
        } else if (oa.state.eflags ^ ob.state.eflags) & case.undefined != 0 {
            t.undefined_only += 1;
            let differ = (oa.state.eflags ^ ob.state.eflags) & case.undefined;
            for (bit, name) in [(0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (11, "OF")] {
                if differ & (1 << bit) != 0 {
                    *t.undefined_flags.entry(name).or_default() += 1;
                }
            }
        }
    }
}

/// How many cases are generated and run at a time (one QEMU process each).
const CHUNK: u64 = 250;

/// Runs each case of a batch with `run`.
fn each(mut run: impl FnMut(&Case) -> Outcome) -> impl FnMut(&[Case]) -> Vec<Outcome> {
    move |cases| cases.iter().map(&mut run).collect()
}

/// Fails with the first few mismatches of `t`, and a summary of where
/// they start.
fn assert_none(t: &Tally) {
    for m in t.mismatches.iter().take(5) {
        println!("{m}");
    }
    if !t.culprits.is_empty() {
        println!("first diverging instruction → field: cases (seeds)");
        let mut rows: Vec<_> = t.culprits.iter().collect();
        rows.sort_by_key(|(_, seeds)| std::cmp::Reverse(seeds.len()));
        for (key, seeds) in rows {
            let shown: Vec<String> = seeds.iter().take(8).map(u64::to_string).collect();
            println!("  {key}: {} ({})", seeds.len(), shown.join(", "));
        }
    }
    assert!(
        t.mismatches.is_empty(),
        "{} of {} cases differ (the first are printed above)",
        t.mismatches.len(),
        t.cases
    );
}

/// The interpreter against the host CPU: 64-bit-compatible sequences run
/// natively in ring 3 under PVM, and in 32-bit protected mode on the
/// interpreter; every flag is compared, undefined ones included.
#[test]
fn interpreter_matches_the_native_cpu() {
    let Some(mut k) = kvm() else { return };
    let mut i = InterpRunner::new();
    let t = Comparison {
        test: "interpreter_matches_the_native_cpu",
        profile: Profile::Native,
        options: Options { strict: false, pvm: true, qemu: false },
        default_count: 3000,
        names: ("kvm", "interp"),
        with_undefined: true,
        locate: 200,
    }
    .run(each(|c| k.run_case(c, Env::Long3)), each(|c| i.run_case(c)));
    assert_none(&t);
}

/// The interpreter against PVM's ring 0: the whole generated ISA in 32-bit
/// protected mode, defined behaviour only.
#[test]
fn interpreter_matches_kvm_in_protected_mode() {
    let Some(mut k) = kvm() else { return };
    let mut i = InterpRunner::new();
    let t = Comparison {
        test: "interpreter_matches_kvm_in_protected_mode",
        profile: Profile::Prot32,
        options: Options { strict: true, pvm: true, qemu: false },
        default_count: 3000,
        names: ("kvm", "interp"),
        with_undefined: false,
        locate: 200,
    }
    .run(each(|c| k.run_case(c, Env::Prot32)), each(|c| i.run_case(c)));
    assert_none(&t);
}

/// The interpreter against PVM's real mode, defined behaviour only.
#[test]
fn interpreter_matches_kvm_in_real_mode() {
    let Some(mut k) = kvm() else { return };
    let mut i = InterpRunner::new();
    let t = Comparison {
        test: "interpreter_matches_kvm_in_real_mode",
        profile: Profile::Real,
        options: Options { strict: true, pvm: true, qemu: false },
        default_count: 3000,
        names: ("kvm", "interp"),
        with_undefined: false,
        locate: 200,
    }
    .run(each(|c| k.run_case(c, Env::Real)), each(|c| i.run_case(c)));
    assert_none(&t);
}

/// The interpreter against QEMU's TCG where PVM cannot judge: the whole
/// generated ISA (`daa`, `aaa`, `aas`, `enter` with nesting levels and
/// operand-size prefixes, `aam`/`aad` flags, `int n` and `into` in
/// protected mode, `ud2` in real mode), defined behaviour only.
fn against_qemu(test: &'static str, profile: Profile) {
    let Some(mut q) = qemu::QemuRunner::new() else { return };
    let mut i = InterpRunner::new();
    let t = Comparison {
        test,
        profile,
        options: Options { strict: true, pvm: false, qemu: true },
        default_count: 1000,
        names: ("qemu", "interp"),
        with_undefined: false,
        locate: 10,
    }
    .run(|cases| q.run(cases), each(|c| i.run_case(c)));
    assert_none(&t);
}

#[test]
fn interpreter_matches_qemu_in_protected_mode() {
    against_qemu("interpreter_matches_qemu_in_protected_mode", Profile::Prot32);
}

#[test]
fn interpreter_matches_qemu_in_real_mode() {
    against_qemu("interpreter_matches_qemu_in_real_mode", Profile::Real);
}

/// The harness checks itself against PVM: 64-bit-compatible sequences on
/// KVM's native ring 3 and on its emulated ring 0 agree exactly, undefined
/// flags included (PVM's emulation computes flags as the host CPU does).
#[test]
fn pvm_ring0_matches_native() {
    let Some(mut k) = kvm() else { return };
    let k = RefCell::new(&mut k);
    let t = Comparison {
        test: "pvm_ring0_matches_native",
        profile: Profile::Native,
        options: Options { strict: false, pvm: true, qemu: false },
        default_count: 500,
        names: ("ring3", "ring0"),
        with_undefined: true,
        locate: 200,
    }
    .run(each(|c| k.borrow_mut().run_case(c, Env::Long3)), each(|c| k.borrow_mut().run_case(c, Env::Prot32)));
    assert_none(&t);
}

/// Every generated case runs on KVM to its final `out`, or to the
/// exception it ends with: its memory operands, strings and stack stay in
/// RAM, divisions do not fault, and nothing PVM cannot emulate is emitted.
#[test]
fn generated_cases_run_to_their_end_on_kvm() {
    let Some(mut k) = kvm() else { return };
    let s = Seeds::from_env("TOPOS_DIFF", 300);
    for (profile, env) in [(Profile::Native, Env::Long3), (Profile::Prot32, Env::Prot32), (Profile::Real, Env::Real)] {
        for seed in s.first..s.first + s.count {
            let case = Case::new(profile, seed, Options { strict: true, pvm: true, qemu: false });
            let out = k.run_case(&case, env);
            let ok = match out.end {
                End::Terminated => !case.faults,
                End::Fault { .. } => case.faults,
                _ => false,
            };
            assert!(ok, "{profile:?} seed {seed} ended {:?} at {:#x}\n{}", out.end, out.state.eip, case.listing());
        }
    }
}

/// The rates that tell native from emulated code (see the module docs).
#[test]
#[ignore = "a measurement: cargo test -p topos-vcpu --test interp_differential pvm_loop_rates -- --ignored --nocapture"]
fn pvm_loop_rates() {
    use iced_x86::code_asm::*;
    use layout::{CODE, WINDOW, WINDOW_SIZE};
    let Some(mut k) = kvm() else { return };
    let window = vec![0u8; WINDOW_SIZE];
    for env in [Env::Long3, Env::Compat3, Env::Pae3, Env::Pae0, Env::Prot32, Env::Real] {
        for n in [1000u32, 100_000, 10_000_000, 1_000_000_000] {
            let (bits, ip) = match env {
                Env::Real => (16, 0),
                Env::Long3 => (64, CODE),
                _ => (32, CODE),
            };
            let mut a = CodeAssembler::new(bits).unwrap();
            let mut top = a.create_label();
            a.mov(ecx, n).unwrap();
            a.set_label(&mut top).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(top).unwrap();
            a.out(0xe0, al).unwrap();
            let code = a.assemble(ip).unwrap();
            let mut start = outcome::State { gpr: [0; 8], eip: ip as u32, eflags: 0x202 };
            start.gpr[4] = if env == Env::Real { 0x8000 } else { WINDOW as u32 + 0x8000 };
            if !env.ring3() {
                start.eflags = 2;
            }
            let t = Instant::now();
            let out = k.run(env, &code, &start, &window);
            let dt = t.elapsed();
            println!(
                "{env:?}: {n} iterations: {:?} in {dt:.3?} ({:.1} M iterations/s)",
                out.end,
                f64::from(n) / dt.as_secs_f64() / 1e6
            );
            if dt.as_secs_f64() > 0.5 || out.end == outcome::End::Shutdown {
                break;
            }
        }
    }
}
