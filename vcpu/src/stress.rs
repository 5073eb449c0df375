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
//!
//! Memory stays bounded however long the run: readers hand their reads to
//! the writer in batches, which it checks as it goes (a batch that finds
//! the writer's queue full is skipped, and counted), and the history keeps
//! only the generations that a read not yet checked may still be compared
//! against (see `History::prune`).

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
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
/// Reads per batch handed from a reader to the writer.
const BATCH: usize = 1024;
/// Batches waiting for the writer, at most; a reader skips a batch that
/// finds the queue full.
const QUEUE: usize = 4;
/// Commits between the writer's check rounds (check the queued batches,
/// prune the history and the list of published views).
const CHECK_EVERY: u64 = 64;

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
    /// Reads recorded but not checked: their batch found the writer's
    /// queue full.
    pub skipped_reads: u64,
    /// Most history entries kept at once (bounded by the window that
    /// unchecked reads may still look back to, not by the run's length).
    pub history_peak: usize,
    /// History entries recorded over the run.
    pub history_recorded: u64,
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
             | reads checked against history | {} |\n| reads skipped (checker busy) | {} |\n\
             | history entries kept (peak) / recorded | {} / {} |\n| inconsistent reads | {} |\n\
             | accesses after removal | {} |\n| RAM mismatches | {} |\n\
             | live views before / after | {} / {} |\n| inconsistencies | {} |\n",
            self.accesses as f64 / secs,
            self.commits as f64 / secs,
            self.commit_p50.as_secs_f64() * 1e6,
            self.commit_p99.as_secs_f64() * 1e6,
            self.checked_reads,
            self.skipped_reads,
            self.history_peak,
            self.history_recorded,
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

/// One read of a slot, with the generations current just before and just
/// after it.
struct Observation {
    slot: u64,
    g0: u64,
    g1: u64,
    seen: Option<Key>,
}

/// Per slot, the intervals `[from, to)` of generations with the mapping
/// visible there (`to == u64::MAX` for the current one).
struct History {
    slots: Vec<Vec<(u64, u64, Option<Key>)>>,
    /// Entries kept now.
    len: usize,
    /// Entries recorded since the start.
    recorded: u64,
}

impl History {
    fn new(slots: u64) -> History {
        History { slots: (0..slots).map(|_| vec![(0, u64::MAX, None)]).collect(), len: slots as usize, recorded: 0 }
    }

    /// From generation `gen` on, `slot` shows `now`.
    fn change(&mut self, slot: u64, gen: u64, now: Option<Key>) {
        let h = &mut self.slots[slot as usize];
        if let Some(last) = h.last_mut() {
            last.1 = gen;
        }
        h.push((gen, u64::MAX, now));
        self.len += 1;
        self.recorded += 1;
    }

    /// Whether a committed topology explains the read: what it saw was
    /// visible at the slot at some generation in `[g0, g1 + 1]`. The
    /// topology's generation moves only once a commit's views are all
    /// published, so a read that started at `g0` sees at least `g0`'s view,
    /// and a read that ended while the generation was `g1` may already see
    /// the commit in flight, `g1 + 1`.
    fn explains(&self, o: &Observation) -> bool {
        let (lo, hi) = (o.g0, o.g1 + 1);
        self.slots[o.slot as usize].iter().any(|&(from, to, key)| key == o.seen && from <= hi && to > lo)
    }

    /// Drops what no read with `g0 >= oldest` can match: [`explains`]
    /// needs `to > g0`, so intervals that ended before `oldest` go. The
    /// current interval of each slot always stays.
    ///
    /// [`explains`]: Self::explains
    fn prune(&mut self, oldest: u64) {
        for h in &mut self.slots {
            let dead = h.partition_point(|e| e.1 < oldest);
            h.drain(..dead);
            self.len -= dead;
        }
    }
}

/// How far back one reader's reads not yet handed to the writer may look:
/// the generation current when its batch was started, so no lower than the
/// `g0` of any read in it (`u64::MAX` once the reader has stopped).
struct Mark(AtomicU64);

/// The writer's side of the readers' batches.
struct Checker {
    rx: Receiver<Vec<Observation>>,
    marks: Vec<Arc<Mark>>,
    inconsistent: u64,
    checked: u64,
}

impl Checker {
    /// Checks every batch handed over so far and returns the oldest
    /// generation that a read not yet checked may look back to.
    ///
    /// The marks are read *before* the queue is drained. A batch still
    /// unsent then is covered by the mark read (its reader moves its mark
    /// only after sending it); a batch sent since was sent after its reader
    /// stored the mark read, which then covers it; and a batch sent before
    /// a mark that was read is in the queue, so it is checked here (the
    /// mark's Release store after the send, read with Acquire, orders the
    /// send before the drain).
    fn round(&mut self, history: &History) -> u64 {
        let oldest = self.marks.iter().map(|m| m.0.load(Ordering::Acquire)).min().unwrap_or(u64::MAX);
        while let Ok(batch) = self.rx.try_recv() {
            self.check(history, &batch);
        }
        oldest
    }

    fn check(&mut self, history: &History, batch: &[Observation]) {
        self.checked += batch.len() as u64;
        self.inconsistent += batch.iter().filter(|o| !history.explains(o)).count() as u64;
    }
}

/// Commit latencies in a fixed number of log-linear buckets (32 per power
/// of two, so a percentile is within about 3% of the exact value).
struct Latencies {
    buckets: Vec<u64>,
    count: u64,
}

impl Latencies {
    /// Values below this are exact; above, each power of two is cut into
    /// `OCTAVE / 2` buckets.
    const OCTAVE: u64 = 64;

    fn new() -> Latencies {
        Latencies { buckets: vec![0; Self::bucket(u64::MAX) + 1], count: 0 }
    }

    fn bucket(ns: u64) -> usize {
        if ns < Self::OCTAVE {
            return ns as usize;
        }
        // `ns >> shift` keeps the top 6 bits: 32..=63.
        let shift = 64 - ns.leading_zeros() - 6;
        ((shift as u64) * (Self::OCTAVE / 2) + (ns >> shift)) as usize
    }

    /// The smallest value in a bucket.
    fn floor(b: usize) -> u64 {
        let b = b as u64;
        if b < Self::OCTAVE {
            return b;
        }
        let half = Self::OCTAVE / 2;
        let shift = b / half - 1;
        (b % half + half) << shift
    }

    fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[Self::bucket(ns)] += 1;
        self.count += 1;
    }

    /// The `p` quantile (0..=1), as the lower end of its bucket.
    fn percentile(&self, p: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((self.count - 1) as f64 * p) as u64;
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen > rank {
                return Duration::from_nanos(Self::floor(b));
            }
        }
        Duration::ZERO
    }
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
    // Every view the run publishes that may still be alive, to check at the
    // end that the retired ones were freed (the process-wide `live_views`
    // counter would also see other tests' views). Freed ones are dropped
    // from the list as the run goes: a freed view never comes back.
    let mut published: Vec<std::sync::Weak<topos_runtime::FlatView>> = vec![Arc::downgrade(&s.memory.view())];

    let late = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let accesses = Arc::new(AtomicU64::new(0));
    let ram_mismatches = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let (tx, rx) = sync_channel::<Vec<Observation>>(QUEUE);
    let marks: Vec<Arc<Mark>> = (0..readers).map(|_| Arc::new(Mark(AtomicU64::new(0)))).collect();
    // The writer starts once every reader is in its loop, and every reader
    // makes at least one round of accesses, so even on a loaded machine a
    // short run has readers racing the writer.
    let started = Arc::new(std::sync::Barrier::new(readers + 1));

    let reader_handles: Vec<_> = (0..readers)
        .map(|i| {
            let mem = s.memory.clone();
            let topo = topo.clone();
            let stop = stop.clone();
            let accesses = accesses.clone();
            let ram_mismatches = ram_mismatches.clone();
            let skipped = skipped.clone();
            let tx = tx.clone();
            let mark = marks[i].clone();
            let started = started.clone();
            let slots = cfg.slots;
            let seed = cfg.seed.wrapping_add(1000 + i as u64);
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut acc = mem.accessor();
                // Every read of this batch happens at or after the mark.
                mark.0.store(topo.generation(), Ordering::Release);
                let mut obs = Vec::with_capacity(BATCH);
                let mut n = 0u64;
                let base = i as u64 * RAM_PER_READER;
                started.wait();
                loop {
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
                            obs.push(Observation { slot, g0, g1, seen });
                            if obs.len() == BATCH {
                                // Hand the batch over (or skip it if the
                                // writer is behind), then move the mark.
                                obs = match tx.try_send(std::mem::take(&mut obs)) {
                                    Ok(()) => Vec::with_capacity(BATCH),
                                    Err(TrySendError::Full(mut b) | TrySendError::Disconnected(mut b)) => {
                                        skipped.fetch_add(b.len() as u64, Ordering::Relaxed);
                                        b.clear();
                                        b
                                    }
                                };
                                mark.0.store(topo.generation(), Ordering::Release);
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
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                accesses.fetch_add(n, Ordering::Relaxed);
                // The last batch: the writer checks what is queued once every
                // reader has stopped.
                if let Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) = tx.try_send(obs) {
                    skipped.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                mark.0.store(u64::MAX, Ordering::Release);
            })
        })
        .collect();

    // The writer.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    drop(tx);
    started.wait();
    let mut checker = Checker { rx, marks, inconsistent: 0, checked: 0 };
    let mut placed: Vec<Placed> = Vec::new();
    let mut history = History::new(cfg.slots);
    let mut history_peak = history.len;
    let mut latencies = Latencies::new();
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
        latencies.record(t0.elapsed());
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
                    history.change(slot, gen, now);
                }
            }
            history_peak = history_peak.max(history.len);
            if commits % CHECK_EVERY == 0 {
                let oldest = checker.round(&history);
                history.prune(oldest);
                published.retain(|w| w.strong_count() > 0);
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
    for h in reader_handles {
        // A reader that panicked has recorded no accesses; its batches are
        // still checked.
        let _ = h.join();
    }
    // The batches still queued.
    checker.round(&history);

    let report_base = StressReport {
        accesses: accesses.load(Ordering::Relaxed),
        commits,
        elapsed,
        commit_p50: latencies.percentile(0.5),
        commit_p99: latencies.percentile(0.99),
        inconsistent_reads: checker.inconsistent,
        accesses_after_removal: late.load(Ordering::Relaxed),
        ram_mismatches: ram_mismatches.load(Ordering::Relaxed),
        checked_reads: checker.checked,
        skipped_reads: skipped.load(Ordering::Relaxed),
        history_peak,
        history_recorded: history.recorded,
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

    /// The writer, the readers' marks and the history, without threads: a
    /// long run of commits with reads handed over in batches. Every read
    /// that a committed topology explains is accepted (including reads that
    /// look back as far as their mark allows, so pruning never drops too
    /// much), every bogus one is counted, and the history kept stays
    /// within the window the marks allow while entries pile up.
    #[test]
    fn pruned_history_checks_the_same_and_stays_bounded() {
        const SLOTS: u64 = 8;
        const GENERATIONS: u64 = 20_000;
        let mut rng = StdRng::seed_from_u64(3);
        let (tx, rx) = sync_channel::<Vec<Observation>>(1 << 16);
        let marks: Vec<Arc<Mark>> = (0..2).map(|_| Arc::new(Mark(AtomicU64::new(0)))).collect();
        let mut checker = Checker { rx, marks: marks.clone(), inconsistent: 0, checked: 0 };
        let mut history = History::new(SLOTS);
        // What each slot showed at each generation (the unpruned truth).
        let mut shown: Vec<Vec<Option<Key>>> = vec![vec![None]; SLOTS as usize];
        let mut batches: Vec<Vec<Observation>> = vec![Vec::new(), Vec::new()];
        let (mut sent, mut bogus, mut peak) = (0u64, 0u64, 0usize);
        for gen in 1..=GENERATIONS {
            for (slot, col) in shown.iter_mut().enumerate() {
                let prev = *col.last().unwrap();
                let now = if rng.random_bool(0.2) { Some((slot as u64, gen)) } else { prev };
                if now != prev {
                    history.change(slot as u64, gen, now);
                }
                col.push(now);
            }
            for (r, batch) in batches.iter_mut().enumerate() {
                let mark = marks[r].0.load(Ordering::Acquire);
                // A read that started at the mark or later and ended now.
                let g0 = rng.random_range(mark..=gen);
                let slot = rng.random_range(0..SLOTS);
                let seen = if rng.random_bool(0.05) {
                    bogus += 1;
                    Some((99, gen))
                } else {
                    // Visible at some generation in [g0, g1].
                    let at = rng.random_range(g0..=gen);
                    shown[slot as usize][at as usize]
                };
                batch.push(Observation { slot, g0, g1: gen, seen });
                if batch.len() == 16 {
                    sent += 16;
                    tx.try_send(std::mem::take(batch)).unwrap();
                    marks[r].0.store(gen, Ordering::Release);
                }
            }
            peak = peak.max(history.len);
            if gen % CHECK_EVERY == 0 {
                let oldest = checker.round(&history);
                history.prune(oldest);
            }
        }
        checker.round(&history);
        assert_eq!(checker.checked, sent);
        let unsent_bogus = batches.iter().flatten().filter(|o| o.seen.is_some_and(|k| k.0 == 99)).count() as u64;
        assert_eq!(checker.inconsistent, bogus - unsent_bogus);
        assert!(history.recorded > 20_000, "only {} changes recorded", history.recorded);
        // A mark lags at most 16 generations (one batch), plus a check
        // round: about 8 slots x 0.2 x (16 + 64) live entries.
        assert!(peak <= 400, "the history kept up to {peak} of {} entries", history.recorded);
    }

    /// A real run of many commits keeps a history that is a small part of
    /// what it recorded.
    #[test]
    fn long_stress_run_keeps_history_bounded() {
        let cfg = StressConfig {
            readers: 2,
            duration: None,
            commits: Some(20_000),
            slots: 16,
            devices: 12,
            seed: 11,
            progress: false,
        };
        let r = run(&cfg).unwrap();
        assert_eq!(r.inconsistencies(), 0, "{}", r.table());
        assert!(r.checked_reads > 0, "{}", r.table());
        assert!(r.history_recorded >= 10_000, "{}", r.table());
        assert!(r.history_peak * 4 < r.history_recorded as usize, "{}", r.table());
    }

    #[test]
    fn latency_percentiles_are_within_their_bucket() {
        let mut l = Latencies::new();
        for ns in 1..=10_000u64 {
            l.record(Duration::from_nanos(ns * 100));
        }
        for (p, exact) in [(0.5, 500_000u64), (0.99, 990_000)] {
            let got = l.percentile(p).as_nanos() as u64;
            assert!(got <= exact && exact - got <= exact / 32, "p{p}: {got} ns for {exact} ns");
        }
        for ns in [0, 1, 63, 64, 65, 127, 128, 1000, u64::MAX / 3, u64::MAX] {
            let b = Latencies::bucket(ns);
            assert!(Latencies::floor(b) <= ns && (b + 1 == l.buckets.len() || Latencies::floor(b + 1) > ns), "{ns}");
        }
    }
}
