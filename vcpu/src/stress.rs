//! `topos stress`: concurrent map/unmap under readers.
//!
//! Reader threads read and write random addresses across RAM and a window of
//! PCI-BAR-like slots while one writer maps, unmaps, moves and overlays
//! device regions as fast as it can. Every device mapping answers reads with
//! its device number and the generation it was mapped in, so each read can be
//! checked against the history of committed topologies:
//!
//! * a read at a slot returns a mapping that was visible there at some
//!   generation between the one current just before the read and the one
//!   after the one current just after it (the generation moves once a
//!   commit's views are published, so the read may already see the commit
//!   in flight), or nothing if the slot was empty then;
//! * no access reaches a mapping once its removal has been committed and the
//!   reader started after that commit;
//! * RAM reads see what the same reader wrote;
//! * when everything stops, the number of live FlatViews is back to its
//!   baseline (retired views were freed).

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use topos_runtime::{
    ImplConstraints, MemTxResult, MemoryRegion, MemoryRegionOps, OpsConfig, Topology, ValidConstraints,
};

/// Base of the BAR window.
const WINDOW: u64 = 0xe000_0000;
/// Size of one slot.
const SLOT: u64 = 0x1000;
/// RAM per reader for its own write/read-back checks.
const RAM_PER_READER: u64 = 0x10_0000;

/// What to run.
#[derive(Debug, Clone)]
pub struct StressConfig {
    /// Reader threads.
    pub readers: usize,
    /// Stop after this long…
    pub duration: Option<Duration>,
    /// …or after this many commits.
    pub commits: Option<u64>,
    /// BAR slots in the window.
    pub slots: u64,
    /// Devices that get mapped and unmapped.
    pub devices: u64,
    /// Random seed.
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            readers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            duration: Some(Duration::from_secs(10)),
            commits: None,
            slots: 64,
            devices: 48,
            seed: 1,
            progress: false,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct StressReport {
    /// Reader accesses (MMIO and RAM).
    pub accesses: u64,
    /// Commits made by the writer.
    pub commits: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Commit latency percentiles.
    pub commit_p50: Duration,
    /// 99th percentile.
    pub commit_p99: Duration,
    /// Reads whose answer no committed topology explains.
    pub inconsistent_reads: u64,
    /// Accesses that reached a mapping after its removal was committed.
    pub accesses_after_removal: u64,
    /// RAM read-backs that did not return what was written.
    pub ram_mismatches: u64,
    /// Views of the run's address spaces that should be alive at the end
    /// (the current ones).
    pub views_before: usize,
    /// Views the run published that are still alive after everything
    /// stopped (must equal `views_before`: every retired view was freed).
    pub views_after: usize,
    /// Reads checked against the history.
    pub checked_reads: u64,
}

impl StressReport {
    /// Total of all inconsistencies (must be 0).
    pub fn inconsistencies(&self) -> u64 {
        self.inconsistent_reads
            + self.accesses_after_removal
            + self.ram_mismatches
            + (self.views_after != self.views_before) as u64
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "| metric | value |\n| --- | --- |\n\
             | reader accesses/s | {:.0} |\n| commits/s | {:.0} |\n\
             | commit latency p50 | {:.1} µs |\n| commit latency p99 | {:.1} µs |\n\
             | reads checked against history | {} |\n| inconsistent reads | {} |\n\
             | accesses after removal | {} |\n| RAM mismatches | {} |\n\
             | live views before / after | {} / {} |\n| inconsistencies | {} |\n",
            self.accesses as f64 / secs,
            self.commits as f64 / secs,
            self.commit_p50.as_secs_f64() * 1e6,
            self.commit_p99.as_secs_f64() * 1e6,
            self.checked_reads,
            self.inconsistent_reads,
            self.accesses_after_removal,
            self.ram_mismatches,
            self.views_before,
            self.views_after,
            self.inconsistencies()
        )
    }
}

thread_local! {
    /// The generation the current reader saw before its access.
    static READER_G0: Cell<u64> = const { Cell::new(0) };
}

/// One mapping of a device: answers `dev << 32 | mapped_gen`.
struct Mapping {
    dev: u64,
    mapped_gen: u64,
    removed_gen: AtomicU64,
    late: Arc<AtomicU64>,
}

impl Mapping {
    fn check_access(&self) {
        let removed = self.removed_gen.load(Ordering::Acquire);
        if removed != 0 && READER_G0.with(Cell::get) > removed {
            self.late.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl MemoryRegionOps for Mapping {
    fn read(&self, _addr: u64, _size: u32) -> u64 {
        self.check_access();
        (self.dev << 32) | self.mapped_gen
    }
    fn write(&self, _addr: u64, _value: u64, _size: u32) {
        self.check_access();
    }
}

/// Identity of a mapping: (device, generation mapped in).
type Key = (u64, u64);

struct Placed {
    region: MemoryRegion,
    ops: Arc<Mapping>,
    slot: u64,
    prio: i32,
    /// Order among equal priorities: newer wins.
    order: u64,
}

/// Per slot: intervals [from, to) of generations with the visible mapping.
type History = HashMap<u64, Vec<(u64, u64, Option<Key>)>>;

struct Observation {
    slot: u64,
    g0: u64,
    g1: u64,
    seen: Option<Key>,
}

fn visible(placed: &[Placed], slot: u64) -> Option<Key> {
    placed.iter().filter(|p| p.slot == slot).max_by_key(|p| (p.prio, p.order)).map(|p| (p.ops.dev, p.ops.mapped_gen))
}

/// Runs the stress test.
pub fn run(cfg: &StressConfig) -> topos_runtime::Result<StressReport> {
    let topo = Topology::new();
    let s = topo.standard_spaces()?;
    let readers = cfg.readers.max(1);
    let ram = topo.new_ram("ram", (RAM_PER_READER * readers as u64) as u128)?;
    s.system.add_subregion(0, &ram)?;
    let pci = topo.new_container("pci", (cfg.slots * SLOT) as u128)?;
    s.system.add_subregion_overlap(WINDOW, &pci, -1)?;
    // Every view the run publishes, to check at the end that the retired
    // ones were freed (the process-wide `live_views` counter would also see
    // other tests' views).
    let mut published: Vec<std::sync::Weak<topos_runtime::FlatView>> = vec![Arc::downgrade(&s.memory.view())];

    let late = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let accesses = Arc::new(AtomicU64::new(0));
    let ram_mismatches = Arc::new(AtomicU64::new(0));

    let reader_handles: Vec<_> = (0..readers)
        .map(|i| {
            let mem = s.memory.clone();
            let topo = topo.clone();
            let stop = stop.clone();
            let accesses = accesses.clone();
            let ram_mismatches = ram_mismatches.clone();
            let slots = cfg.slots;
            let seed = cfg.seed.wrapping_add(1000 + i as u64);
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut acc = mem.accessor();
                let mut obs = Vec::new();
                let mut n = 0u64;
                let base = i as u64 * RAM_PER_READER;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        if rng.random_bool(0.5) {
                            let slot = rng.random_range(0..slots);
                            let g0 = topo.generation();
                            READER_G0.with(|c| c.set(g0));
                            let addr = WINDOW + slot * SLOT + 8 * rng.random_range(0..4u64);
                            // Half through the plain path, half through the
                            // per-thread cached accessor.
                            let (v, r) =
                                if rng.random_bool(0.5) { mem.read_u64(addr, 8) } else { acc.read_u64(addr, 8) };
                            let g1 = topo.generation();
                            let seen = match r {
                                MemTxResult::Ok => Some((v >> 32, v & 0xffff_ffff)),
                                _ => None,
                            };
                            if obs.len() < 200_000 {
                                obs.push(Observation { slot, g0, g1, seen });
                            }
                            if rng.random_bool(0.1) {
                                let _ = mem.write_u64(WINDOW + slot * SLOT, v, 4);
                            }
                        } else {
                            let off = base + rng.random_range(0..RAM_PER_READER / 8) * 8;
                            let val: u64 = rng.random();
                            let _ = acc.write_u64(off, val, 8);
                            if mem.read_u64(off, 8).0 != val || acc.read_u64(off, 8).0 != val {
                                ram_mismatches.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        n += 1;
                    }
                }
                accesses.fetch_add(n, Ordering::Relaxed);
                obs
            })
        })
        .collect();

    // The writer.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut placed: Vec<Placed> = Vec::new();
    let mut history: History = HashMap::new();
    for slot in 0..cfg.slots {
        history.insert(slot, vec![(0, u64::MAX, None)]);
    }
    let mut latencies: Vec<Duration> = Vec::new();
    let mut order = 0u64;
    let start = Instant::now();
    let bar = if cfg.progress {
        let b = match (cfg.commits, cfg.duration) {
            (Some(c), _) => ProgressBar::new(c),
            (None, Some(d)) => ProgressBar::new(d.as_secs().max(1)),
            _ => ProgressBar::hidden(),
        };
        b.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut commits = 0u64;
    // 8-byte registers, so one read returns device and generation together.
    let config = OpsConfig {
        valid: ValidConstraints { min_access_size: 1, max_access_size: 8, unaligned: false },
        impl_: ImplConstraints { min_access_size: 8, max_access_size: 8, unaligned: false },
        ..OpsConfig::default()
    };
    loop {
        if cfg.commits.is_some_and(|c| commits >= c) || cfg.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let next_gen = topo.generation() + 1;
        let before: Vec<Option<Key>> = (0..cfg.slots).map(|sl| visible(&placed, sl)).collect();
        let batch = if rng.random_bool(0.2) { rng.random_range(2..6) } else { 1 };
        let mut removed: Vec<Arc<Mapping>> = Vec::new();
        let t0 = Instant::now();
        topo.begin()?;
        for _ in 0..batch {
            let op = rng.random_range(0..10);
            if op < 4 && (placed.len() as u64) < cfg.devices {
                // Map (or overlay) a device at a random slot.
                let dev = rng.random_range(0..cfg.devices);
                let ops =
                    Arc::new(Mapping { dev, mapped_gen: next_gen, removed_gen: AtomicU64::new(0), late: late.clone() });
                let region = topo.new_io_arc(&format!("dev{dev}"), ops.clone(), config, SLOT as u128)?;
                let slot = rng.random_range(0..cfg.slots);
                let prio = rng.random_range(0..2);
                pci.add_subregion_overlap(slot * SLOT, &region, prio)?;
                order += 1;
                placed.push(Placed { region, ops, slot, prio, order });
            } else if op < 7 && !placed.is_empty() {
                let i = rng.random_range(0..placed.len());
                let p = placed.swap_remove(i);
                pci.del_subregion(&p.region)?;
                removed.push(p.ops);
            } else if !placed.is_empty() {
                let i = rng.random_range(0..placed.len());
                let slot = rng.random_range(0..cfg.slots);
                let p = &mut placed[i];
                if slot != p.slot {
                    p.region.set_address(slot * SLOT)?;
                    p.slot = slot;
                    order += 1;
                    p.order = order;
                }
            }
        }
        topo.commit()?;
        latencies.push(t0.elapsed());
        let gen = topo.generation();
        let v = s.memory.view();
        if !published.last().is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&v))) {
            published.push(Arc::downgrade(&v));
        }
        drop(v);
        if gen >= next_gen {
            commits += 1;
            for r in &removed {
                r.removed_gen.store(gen, Ordering::Release);
            }
            for slot in 0..cfg.slots {
                let now = visible(&placed, slot);
                if now != before[slot as usize] {
                    let h = history.get_mut(&slot).expect("slot history");
                    if let Some(last) = h.last_mut() {
                        last.1 = gen;
                    }
                    h.push((gen, u64::MAX, now));
                }
            }
        }
        if cfg.commits.is_some() {
            bar.set_position(commits);
        } else {
            bar.set_position(start.elapsed().as_secs());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let mut observations = Vec::new();
    for h in reader_handles {
        observations.extend(h.join().unwrap_or_default());
    }

    // Check every observation against the history: the seen mapping must be
    // visible at the slot at some generation in [g0, g1 + 1]. The topology's
    // generation moves only once a commit's views are all published, so a
    // read after seeing g0 sees at least g0's view, and a read that ends
    // before the generation reaches g1 + 1 may already see that commit's.
    let mut inconsistent = 0u64;
    for o in &observations {
        let (lo, hi) = (o.g0, o.g1 + 1);
        let ok = history[&o.slot].iter().any(|&(from, to, key)| key == o.seen && from <= hi && to > lo);
        if !ok {
            inconsistent += 1;
        }
    }

    latencies.sort();
    let pct = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default();
    let report_base = StressReport {
        accesses: accesses.load(Ordering::Relaxed),
        commits,
        elapsed,
        commit_p50: pct(0.5),
        commit_p99: pct(0.99),
        inconsistent_reads: inconsistent,
        accesses_after_removal: late.load(Ordering::Relaxed),
        ram_mismatches: ram_mismatches.load(Ordering::Relaxed),
        checked_reads: observations.len() as u64,
        ..Default::default()
    };
    // Readers are gone: of everything published, only the current view of
    // "memory" may still be alive.
    drop(placed);
    let report = StressReport {
        views_before: 1,
        views_after: published.iter().filter(|w| w.strong_count() > 0).count(),
        ..report_base
    };
    drop((s, ram, pci, topo));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_stress_run_is_consistent() {
        let cfg = StressConfig {
            readers: 2,
            duration: None,
            commits: Some(400),
            slots: 16,
            devices: 12,
            seed: 7,
            progress: false,
        };
        let r = run(&cfg).unwrap();
        assert_eq!(r.commits, 400);
        assert!(r.accesses > 0);
        assert!(r.checked_reads > 0);
        assert_eq!(r.inconsistencies(), 0, "{}", r.table());
    }
}
