//! Scaling tables and plots (not a criterion bench): commit latency of one
//! region move against topology size, and lookup time against the number of
//! reader threads while a writer changes the map at about 1 kHz, topos
//! against Cloud Hypervisor's `RwLock` bus design.
//!
//! It also times one-shot builds of PCI-like machines of growing size.
//!
//! Prints CSV-like tables and writes `docs/commit_latency.png` and
//! `docs/lookup_threads.png` at the workspace root. Run with
//! `cargo bench -p topos-runtime --bench scaling`.

mod baselines;
mod support;

use baselines::{base_of, ch_bus, RANGE_LEN};
use plotters::prelude::*;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{io_map, ram_map, run_readers, scrambled_addrs, topos_mover, Writer, MOVER_BASE};
use topos_runtime::{FlatRange, MemoryListener};

/// Topology sizes of the commit-latency table.
const COMMIT_SIZES: [usize; 3] = [100, 1000, 10_000];
/// Timed moves per size.
const MOVES: usize = 400;
/// Ranges in the map of the lookup table.
const LOOKUP_RANGES: usize = 4096;
/// Lookups per reader thread per run.
const LOOKUPS: u64 = 10_000_000;
/// Runs per cell of the lookup table (the median is reported).
const RUNS: usize = 5;

/// A listener that does nothing, standing in for an accelerator's.
struct NopListener;
impl MemoryListener for NopListener {}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One row of the commit table: (regions, p50, p90, p99, p50 with listener),
/// in microseconds.
type CommitRow = (usize, f64, f64, f64, f64);

fn commit_table() -> topos_runtime::Result<Vec<CommitRow>> {
    println!("# commit latency: one set_address (one commit) in a topology of N one-page RAM regions");
    println!("regions,p50_us,p90_us,p99_us,p50_us_with_listener");
    let mut rows = Vec::new();
    for n in COMMIT_SIZES {
        let (topo, spaces, regions) = ram_map(n)?;
        let r = &regions[n / 2];
        let base = base_of(n / 2);
        let mut k = 0u64;
        let mut run = |moves: usize| -> topos_runtime::Result<Vec<Duration>> {
            let mut lat = Vec::with_capacity(moves);
            for _ in 0..moves {
                k += 1;
                let t = Instant::now();
                r.set_address(base + (k % 2) * RANGE_LEN)?;
                lat.push(t.elapsed());
            }
            lat.sort();
            Ok(lat)
        };
        run(MOVES / 10)?;
        let plain = run(MOVES)?;
        let id = topo.listener_register(Arc::new(NopListener), 0, Some(&spaces.memory))?;
        run(MOVES / 10)?;
        let listened = run(MOVES)?;
        topo.listener_unregister(id)?;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let row = (
            n,
            us(percentile(&plain, 0.5)),
            us(percentile(&plain, 0.9)),
            us(percentile(&plain, 0.99)),
            us(percentile(&listened, 0.5)),
        );
        println!("{},{:.1},{:.1},{:.1},{:.1}", row.0, row.1, row.2, row.3, row.4);
        rows.push(row);
    }
    Ok(rows)
}

/// One row of the lookup table: (threads, topos load_view ns, topos accessor
/// ns, CH bus ns).
type LookupRow = (usize, f64, f64, f64);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median over `RUNS` of the per-access time each of `threads` readers sees.
fn ns_per_op(threads: usize, f: impl Fn(u64) + Send + Sync + Clone + 'static) -> f64 {
    let runs = (0..RUNS).map(|_| run_readers(threads, LOOKUPS, f.clone()).as_secs_f64() * 1e9 / LOOKUPS as f64);
    median(runs.collect())
}

fn lookup_table() -> topos_runtime::Result<Vec<LookupRow>> {
    println!();
    println!(
        "# lookup ns/op per reader thread, {LOOKUP_RANGES} ranges, scrambled addresses, writer changing the map at ~1 kHz"
    );
    println!("threads,topos_load_view_ns,topos_accessor_ns,ch_rwlock_bus_ns");
    let map = io_map(LOOKUP_RANGES)?;
    let (ch, _devs) = ch_bus(LOOKUP_RANGES);
    let ch = Arc::new(ch);
    let addrs: Arc<[u64]> = scrambled_addrs(LOOKUP_RANGES).into();
    let mask = LOOKUP_RANGES - 1;
    let mut rows = Vec::new();
    for threads in [1usize, 2] {
        let w = topos_mover(&map)?;
        let (asp, a) = (map.spaces.memory.clone(), addrs.clone());
        let load_view = ns_per_op(threads, move |iters| {
            for i in 0..iters as usize {
                black_box(asp.load_view().lookup(black_box(a[i & mask])).map(FlatRange::start));
            }
        });
        let (asp, a) = (map.spaces.memory.clone(), addrs.clone());
        let accessor = ns_per_op(threads, move |iters| {
            let mut acc = asp.accessor();
            for i in 0..iters as usize {
                black_box(acc.lookup(black_box(a[i & mask])).map(FlatRange::start));
            }
        });
        w.stop();
        if let Some(spare) = map.spaces.system.subregions().into_iter().find(|r| r.name() == "mover") {
            map.spaces.system.del_subregion(&spare)?;
        }

        let spare: Arc<dyn baselines::ChBusDeviceSync> = Arc::new(Mutex::new(baselines::ConstDevice::default()));
        let wch = ch.clone();
        let w = Writer::start(move |k| {
            if k % 2 == 0 {
                wch.insert(spare.clone(), MOVER_BASE, RANGE_LEN).expect("insert");
            } else {
                wch.remove(MOVER_BASE);
            }
        });
        let (b, a) = (ch.clone(), addrs.clone());
        let chbus = ns_per_op(threads, move |iters| {
            for i in 0..iters as usize {
                black_box(b.resolve(black_box(a[i & mask])).map(|r| r.0));
            }
        });
        w.stop();
        ch.remove(MOVER_BASE);
        println!("{threads},{load_view:.2},{accessor:.2},{chbus:.2}");
        rows.push((threads, load_view, accessor, chbus));
    }
    Ok(rows)
}

/// Registers DejaVu Sans for the plots' text if the system has it; without
/// it the plots are drawn without text.
fn load_font() -> bool {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ];
    for p in candidates {
        if let Ok(bytes) = std::fs::read(p) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    eprintln!("scaling: no DejaVu Sans font found; plots are drawn without text");
    false
}

/// A plotted line: its legend, colour and points.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn plot_commit(path: &Path, rows: &[CommitRow], text: bool) -> PlotResult {
    let root = BitMapBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = rows.iter().map(|r| r.4.max(r.1)).fold(1.0, f64::max) * 1.3;
    let mut chart = ChartBuilder::on(&root);
    chart.margin(12);
    if text {
        chart.caption("Commit latency of one region move (p50)", ("sans-serif", 20));
        chart.x_label_area_size(40).y_label_area_size(60);
    }
    let mut chart = chart.build_cartesian_2d((80f64..13_000f64).log_scale(), (0.5f64..ymax).log_scale())?;
    let mut mesh = chart.configure_mesh();
    mesh.x_label_formatter(&|x| format!("{x:.0}")).y_label_formatter(&|y| format!("{y}"));
    if text {
        mesh.x_desc("regions in the topology").y_desc("p50 latency (µs)");
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw()?;
    let series: [Series; 2] = [
        ("no listener", BLUE, rows.iter().map(|r| (r.0 as f64, r.1)).collect()),
        ("one no-op listener", RED, rows.iter().map(|r| (r.0 as f64, r.4)).collect()),
    ];
    for (name, color, pts) in series {
        let s = chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
        if text {
            s.label(name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    let target: Vec<(f64, f64)> = vec![(80.0, 100.0), (13_000.0, 100.0)];
    let s = chart.draw_series(LineSeries::new(target, BLACK.stroke_width(1)))?;
    if text {
        s.label("target: 100 µs at 10,000").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

fn plot_lookup(path: &Path, rows: &[LookupRow], text: bool) -> PlotResult {
    let root = BitMapBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = rows.iter().map(|r| r.1.max(r.2).max(r.3)).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root);
    chart.margin(12);
    if text {
        chart.caption(format!("Lookup, {LOOKUP_RANGES} ranges, writer at ~1 kHz"), ("sans-serif", 20));
        chart.x_label_area_size(40).y_label_area_size(60);
    }
    let mut chart = chart.build_cartesian_2d(0.8f64..2.2f64, 0f64..ymax)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(2).x_label_formatter(&|x| format!("{x:.0}"));
    if text {
        mesh.x_desc("reader threads").y_desc("ns per lookup, per thread");
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw()?;
    let series: [Series; 3] = [
        ("topos load_view + lookup", BLUE, rows.iter().map(|r| (r.0 as f64, r.1)).collect()),
        ("topos Accessor", GREEN, rows.iter().map(|r| (r.0 as f64, r.2)).collect()),
        ("CH RwLock bus", RED, rows.iter().map(|r| (r.0 as f64, r.3)).collect()),
    ];
    for (name, color, pts) in series {
        let s = chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
        if text {
            s.label(name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    if text {
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

/// Device counts of the machine-build table.
const MACHINE_SIZES: [usize; 4] = [100, 200, 400, 1000];

/// Per-build time budget of the machine-build table, in seconds
/// (`TOPOS_SCALING_BUILD_BUDGET` overrides it).
fn build_budget() -> Duration {
    let secs = std::env::var("TOPOS_SCALING_BUILD_BUDGET").ok().and_then(|v| v.parse().ok()).unwrap_or(30.0);
    Duration::from_secs_f64(secs)
}

/// One-shot build times of PCI-like machines (see `support::build_machine`).
/// A build that passes the budget is stopped and reported with the number of
/// devices it reached.
fn machine_table() -> topos_runtime::Result<()> {
    let budget = build_budget();
    println!();
    println!("# machine build, one shot: devices (BAR + bus-master address space + 32 ioeventfds each), one transaction per device; budget {budget:?} per build");
    println!("devices,build_ms,devices_built,per_device_us");
    for n in MACHINE_SIZES {
        let t = Instant::now();
        let m = support::build_machine_within(n, Some(budget))?;
        let took = t.elapsed();
        let built = m.bars.len();
        m.teardown()?;
        let per = took.as_secs_f64() * 1e6 / built.max(1) as f64;
        let ms = took.as_secs_f64() * 1e3;
        if built < n {
            println!("{n},>{ms:.0} (stopped),{built},{per:.0}");
            break;
        }
        println!("{n},{ms:.1},{built},{per:.0}");
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let commit = commit_table()?;
    let lookup = lookup_table()?;
    machine_table()?;
    let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs");
    std::fs::create_dir_all(&docs)?;
    let text = load_font();
    let (c, l) = (docs.join("commit_latency.png"), docs.join("lookup_threads.png"));
    plot_commit(&c, &commit, text)?;
    plot_lookup(&l, &lookup, text)?;
    println!();
    println!("# plots: {} {}", c.display(), l.display());
    Ok(())
}
