//! Differential test of the interpreter's paging against QEMU's TCG (issue
//! 9, acceptance 2: PVM cannot run 32-bit paging, so QEMU is the oracle).
//!
//! Each seed is a scenario ([`gen`]): page tables in guest RAM — 32-bit
//! paging with 4 KiB pages and, with CR4.PSE, 4 MiB pages (without it, PS
//! set and ignored now and then); or PAE with 4 KiB and 2 MiB pages, with
//! or without EFER.NXE (QEMU's default CPU, `qemu64`, has NX: its harness
//! sets EFER.NXE with `wrmsr` and checks it took; the interpreter's runner
//! sets it in the CPU state, as the interpreter's `wrmsr` does not model
//! EFER) — with random present, writable, user, accessed, dirty,
//! no-execute, global and cache bits, reserved bits now and then (bit 21
//! of a 4 MiB PDE, bits 13-20 of a 2 MiB PDE, bits 40-63 of PAE entries),
//! pages aliased to the same frame, entries pointing at page tables (pool
//! frames are page tables and data at once; a recursive PDE maps its own
//! directory), and directories switched by CR3 (PAE: PDPTEs edited, then
//! CR3 reloaded). A guest program ([`guest`]) runs a sequence of steps:
//! loads, stores, `or`/`and`/`xor`/`add` on memory, `xchg`, `movs` between
//! two linear addresses, `call`s into code frames (instruction fetches,
//! against NX, and through remapped pages), some of them split across two
//! pages, at CPL 0 and CPL 3; `invlpg`, CR3 loads, CR0.WP changes and
//! page-table edits between them, and patterns aimed at the TLB (use a
//! page, flip P, RW or US on its walk, `invlpg` it, another piece of the
//! same large page, or nothing, use it again). Its #PF handler records
//! vector, error code, CR2, EIP, CS, the step and CR3, then either skips
//! the instruction or sets bits in an entry of the walk, `invlpg`s and
//! retries.
//!
//! # What is compared
//!
//! After the scenario on QEMU TCG and on the interpreter: the general
//! registers, EFLAGS, CR0, CR2, CR3, CR4; every exception record; the
//! fix-up table (which fixes were used); every byte of the page tables and
//! the pool — data, entries, and the Accessed and Dirty bits the CPUs set.
//! Not compared: the ring-0 stack (fault frames: QEMU does not set
//! EFLAGS.RF in them), QEMU's departures from the architecture
//! ([`quirks`]), and the bits the architecture leaves to the
//! implementation, which the generator notes as it goes ([`gen`]): the
//! Accessed bits of entries read by a walk that faulted (QEMU sets them
//! in the upper levels, KVM and the interpreter do not), those of the
//! first page of an access whose second page faults, and those of a
//! read-modify-write whose write faults. The generator keeps everything
//! else defined: it never uses a translation that may be stale in a TLB or
//! paging-structure cache (after an entry on a page's walk changes, the
//! page is invalidated before its next use), so that what a TLB caches,
//! and when a CPU walks again, cannot show. A CPU may also set Accessed
//! bits speculatively; neither emulator does, and the comparison holds
//! both to "set by the accesses that complete".
//!
//! The generator's walk ([`model`]) also expects each #PF; QEMU's records
//! must match it (else the harness, not the interpreter, is at fault: a
//! generator bug or a QEMU departure not in [`quirks`]), and every scenario
//! must end on QEMU without another exception.
//!
//! # Not covered
//!
//! Global pages (CR4.PGE stays clear), CR4 changes within a scenario,
//! SMEP/SMAP/PKE (not modelled), PDPTE reserved bits (a real CPU raises
//! #GP on the CR3 load; neither emulator does), PSE-36 and physical
//! addresses above 4 GiB (beyond RAM; the interpreter's MAXPHYADDR is 36,
//! QEMU's 40, so bits 36-39 are not generated), page walks through MMIO,
//! `rep` string instructions, the stack, descriptor tables and the #PF
//! handler in test pages (nested faults), an access that rewrites an
//! entry of its own walk with a read-modify-write, and what the generator's
//! walk and QEMU could both get wrong alike (the walk follows the SDM;
//! where QEMU departs from it, the host CPU decided, see [`quirks`]).
//!
//! # Running
//!
//! `TOPOS_PAGING_CASES=n` runs `n` scenarios (seeds `0..n`, or from
//! `TOPOS_PAGING_FIRST`); `TOPOS_PAGING_SEED=s` runs scenario `s` alone and
//! prints it; `TOPOS_PAGING_QEMU_LOG=file` has QEMU log exceptions. A
//! mismatch prints its seed and the command that reproduces it, the steps
//! with what the generator's walk expected of each, both runners' records
//! and the differing places. Skipped, saying why, without
//! `qemu-system-x86_64`.

#[path = "../support/mod.rs"]
mod support;

mod gen;
mod guest;
mod interp;
mod layout;
mod model;
mod outcome;
mod qemu;
mod quirks;

use gen::{describe, generate, Op, Scenario};
use guest::Image;
use interp::InterpRunner;
use outcome::{differences, model_difference, records_table, End, Outcome};
use std::time::Instant;

/// Scenarios per run by default (about 17 s in a debug build here, 2 s in
/// release; every mutation of the walk tried was caught within 500).
const DEFAULT_CASES: u64 = 800;
/// Scenarios per QEMU process.
const CHUNK: u64 = 200;

/// One scenario's full report.
fn report(s: &Scenario, img: &Image, (q, i): (&Outcome, &Outcome), diffs: &[String]) -> String {
    let mut r = format!(
        "--- seed {seed} ({:?}, CR0.WP {} at the start, {} steps): {} differences\n\
         reproduce: TOPOS_PAGING_SEED={seed} cargo test -p topos-vcpu --test interp_paging_qemu -- --nocapture\n",
        s.paging,
        u8::from(s.wp),
        s.ops.len(),
        diffs.len(),
        seed = s.seed,
    );
    for d in diffs {
        r.push_str(&format!("  {d}\n"));
    }
    r.push_str("steps (with what the generator's walk expects):\n");
    for (n, (op, note)) in s.ops.iter().zip(&s.notes).enumerate() {
        let eip = img.access_eip[n].map(|e| format!(" @{e:#x}")).unwrap_or_default();
        let note = if note.is_empty() { String::new() } else { format!(" — {note}") };
        r.push_str(&format!("  {n:>3}{eip}: {}{note}\n", describe(op)));
    }
    r.push_str(&format!("qemu records ({:?}):\n{}", q.end, records_table(q)));
    r.push_str(&format!("interp records ({:?}):\n{}", i.end, records_table(i)));
    if let Some(m) = model_difference(&s.expect, &img.access_eip, q) {
        r.push_str(&format!("the generator's walk disagrees with QEMU: {m}\n"));
    }
    r
}

/// The interpreter's paging against QEMU TCG's, scenario by scenario.
#[test]
fn interpreter_pages_as_qemu_tcg() {
    let Some(mut q) = qemu::QemuRunner::new() else { return };
    let mut interp = InterpRunner::new();
    let support::Seeds { first, count, verbose } = support::Seeds::from_env("TOPOS_PAGING", DEFAULT_CASES);
    let started = Instant::now();
    let (mut mismatches, mut harness, mut faults, mut steps) = (vec![], vec![], 0usize, 0usize);
    let mut modes = std::collections::BTreeMap::<String, u64>::new();
    let mut seed = first;
    while seed < first + count {
        let seeds = seed..(seed + CHUNK).min(first + count);
        seed = seeds.end;
        let scenarios: Vec<Scenario> = seeds
            .map(|seed| {
                let mut s = generate(seed);
                for (at, bits) in quirks::undefined(&s) {
                    *s.undefined.entry(at).or_default() |= bits;
                }
                s
            })
            .collect();
        let images: Vec<Image> = scenarios.iter().map(guest::build).collect();
        let batch: Vec<(bool, &Image)> = scenarios.iter().zip(&images).map(|(s, i)| (s.paging.nx(), i)).collect();
        let mut qemu_outs = q.run(&batch);
        for ((s, img), qo) in scenarios.iter().zip(&images).zip(&mut qemu_outs) {
            quirks::normalize(s, qo);
            let qo = &*qo;
            let io = interp.run(s, img);
            let diffs = differences(s, (qo, &io), ("qemu", "interp"), 20);
            steps += s.ops.len();
            faults += qo.records().len();
            *modes.entry(format!("{:?}", s.paging)).or_default() += 1;
            // The harness checks itself on QEMU: every scenario ends, with
            // no exception but the #PFs the generator's walk expects.
            let model = model_difference(&s.expect, &img.access_eip, qo);
            if qo.end != End::Finished || qo.aborted() || model.is_some() {
                harness
                    .push((s.seed, format!("{:?}, aborted {}, {}", qo.end, qo.aborted(), model.unwrap_or_default())));
            }
            if !diffs.is_empty() {
                mismatches.push((s.seed, report(s, img, (qo, &io), &diffs)));
            } else if verbose {
                println!("{}", report(s, img, (qo, &io), &diffs));
            }
        }
    }
    println!(
        "interpreter_pages_as_qemu_tcg: {count} scenarios (seeds {first}..{}; {modes:?}), {steps} steps, {faults} exceptions, in {:.1?}: {} mismatches",
        first + count,
        started.elapsed(),
        mismatches.len(),
    );
    for (_, r) in mismatches.iter().take(3) {
        println!("{r}");
    }
    for (seed, why) in harness.iter().take(5) {
        println!("seed {seed}: QEMU did not run as the generator expects: {why}");
    }
    let seeds: Vec<u64> = mismatches.iter().map(|(s, _)| *s).collect();
    assert!(seeds.is_empty(), "{} of {count} scenarios differ; seeds {:?}", seeds.len(), &seeds[..seeds.len().min(30)]);
    // Not the interpreter's fault: a generator bug, or a QEMU departure from
    // the architecture that `quirks` does not know yet.
    let bad: Vec<u64> = harness.iter().map(|h| h.0).collect();
    assert!(bad.is_empty(), "the harness's check of itself on QEMU failed for seeds {bad:?}");
}

/// Every step kind is generated (a guard against a generator that quietly
/// stops producing some).
#[test]
fn the_generator_produces_every_kind_of_step() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..100 {
        let s = generate(seed);
        for op in &s.ops {
            // The description up to its first operand names the kind.
            let d = describe(op);
            let kind = match op {
                Op::Access { .. } => d.split(' ').take(3).collect::<Vec<_>>().join(" "),
                _ => d.split(' ').next().unwrap_or_default().to_string(),
            };
            seen.insert(kind.trim_end_matches(|c: char| c.is_ascii_digit()).to_string());
        }
    }
    assert!(seen.len() >= 2 * 8 + 6, "only {} kinds of step: {seen:?}", seen.len());
}
