//! Scaling tables and plots (not a criterion bench): commit latency of one
//! region move against topology size, and lookup time against the number of
//! reader threads while a writer changes the map at about 1 kHz, topos
//! against Cloud Hypervisor's `RwLock` bus design.
//!
//! It also times one-shot builds of PCI-like machines of growing size, and
//! measures the headline single-thread ratios (RAM 8-byte access against
//! vm-memory, lookup and MMIO dispatch against the buses) with the variants
//! interleaved round by round, which this shared machine's drifting speed
//! makes steadier than criterion's one-bench-after-another runs.
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
use support::{
    io_map, ram_map, run_readers, scrambled_addrs, spare_base, topos_mover, DiffListener, NopListener, Writer,
};
use topos_runtime::FlatRange;

/// Topology sizes of the commit-latency table.
const COMMIT_SIZES: [usize; 3] = [100, 1000, 10_000];
/// Timed moves per size.
const MOVES: usize = 400;
/// Ranges in the map of the lookup table.
const LOOKUP_RANGES: usize = 4096;
/// Lookups per reader thread per run.
const LOOKUPS: u64 = 10_000_000;
/// Runs per cell of the lookup table in each round.
const RUNS: usize = 3;
/// Rounds over the whole lookup table; each cell reports its fastest run over
/// all rounds, so a burst of other work on this shared 2-core machine does
/// not decide a cell.
const ROUNDS: usize = 3;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One row of the commit table: (regions, p50, p90, p99, p50 with a listener,
/// p50 with a listener that declines `region_nop`), in microseconds.
type CommitRow = (usize, f64, f64, f64, f64, f64);

fn commit_table() -> topos_runtime::Result<Vec<CommitRow>> {
    println!("# commit latency: one set_address (one commit) in a topology of N one-page RAM regions");
    println!("regions,p50_us,p90_us,p99_us,p50_us_with_listener,p50_us_listener_without_nop");
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
        let id = topo.listener_register(Arc::new(DiffListener), 0, Some(&spaces.memory))?;
        run(MOVES / 10)?;
        let diffed = run(MOVES)?;
        topo.listener_unregister(id)?;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let row = (
            n,
            us(percentile(&plain, 0.5)),
            us(percentile(&plain, 0.9)),
            us(percentile(&plain, 0.99)),
            us(percentile(&listened, 0.5)),
            us(percentile(&diffed, 0.5)),
        );
        println!("{},{:.1},{:.1},{:.1},{:.1},{:.1}", row.0, row.1, row.2, row.3, row.4, row.5);
        rows.push(row);
    }
    Ok(rows)
}

/// One row of the lookup table: ns per lookup as each reader sees it.
#[derive(Clone, Copy)]
struct LookupRow {
    threads: usize,
    writer: bool,
    load_view: f64,
    accessor: f64,
    ch: f64,
}

/// Fastest of `RUNS` runs of the per-access time each of `threads` readers
/// sees (the mean over the readers of one run).
fn ns_per_op(threads: usize, f: impl Fn(u64) + Send + Sync + Clone + 'static) -> f64 {
    let runs = (0..RUNS).map(|_| run_readers(threads, LOOKUPS, f.clone()).as_secs_f64() * 1e9 / LOOKUPS as f64);
    runs.fold(f64::INFINITY, f64::min)
}

fn lookup_table() -> topos_runtime::Result<Vec<LookupRow>> {
    println!();
    println!(
        "# lookup ns/op per reader thread, {LOOKUP_RANGES} ranges, scrambled addresses, with and without a writer \
         changing the map at ~1 kHz (topos: a region move, one commit; CH bus: insert/remove of an entry); \
         fastest of {RUNS} runs x {ROUNDS} rounds"
    );
    println!("threads,writer,topos_load_view_ns,topos_accessor_ns,ch_rwlock_bus_ns,ch_over_topos_accessor");
    let map = io_map(LOOKUP_RANGES)?;
    let (ch, _devs) = ch_bus(LOOKUP_RANGES);
    let ch = Arc::new(ch);
    let addrs: Arc<[u64]> = scrambled_addrs(LOOKUP_RANGES).into();
    let mask = LOOKUP_RANGES - 1;
    let spare_at = spare_base(LOOKUP_RANGES);
    let mut rows: Vec<LookupRow> = Vec::new();
    for round in 0..ROUNDS {
        for threads in [1usize, 2] {
            for writer in [false, true] {
                let w = if writer { Some(topos_mover(&map)?) } else { None };
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
                if let Some(w) = w {
                    w.stop();
                    if let Some(spare) = map.spaces.system.subregions().into_iter().find(|r| r.name() == "mover") {
                        map.spaces.system.del_subregion(&spare)?;
                    }
                }

                let w = writer.then(|| {
                    let spare: Arc<dyn baselines::ChBusDeviceSync> =
                        Arc::new(Mutex::new(baselines::ConstDevice::default()));
                    let wch = ch.clone();
                    Writer::start(move |k| {
                        if k % 2 == 0 {
                            wch.insert(spare.clone(), spare_at, RANGE_LEN).expect("insert");
                        } else {
                            wch.remove(spare_at);
                        }
                    })
                });
                let (b, a) = (ch.clone(), addrs.clone());
                let chbus = ns_per_op(threads, move |iters| {
                    for i in 0..iters as usize {
                        black_box(b.resolve(black_box(a[i & mask])).map(|r| r.0));
                    }
                });
                if let Some(w) = w {
                    w.stop();
                    ch.remove(spare_at);
                }
                let row = LookupRow { threads, writer, load_view, accessor, ch: chbus };
                match rows.iter_mut().find(|r| r.threads == threads && r.writer == writer) {
                    Some(r) => {
                        r.load_view = r.load_view.min(row.load_view);
                        r.accessor = r.accessor.min(row.accessor);
                        r.ch = r.ch.min(row.ch);
                    }
                    None => rows.push(row),
                }
                if round + 1 == ROUNDS {
                    let r = rows.iter().find(|r| r.threads == threads && r.writer == writer).expect("row");
                    let on = if writer { "1kHz" } else { "none" };
                    println!(
                        "{threads},{on},{:.2},{:.2},{:.2},{:.2}",
                        r.load_view,
                        r.accessor,
                        r.ch,
                        r.ch / r.accessor
                    );
                }
            }
        }
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
    let series: [Series; 3] = [
        ("no listener", BLUE, rows.iter().map(|r| (r.0 as f64, r.1)).collect()),
        ("listener (region_nop)", RED, rows.iter().map(|r| (r.0 as f64, r.4)).collect()),
        ("listener (no region_nop)", GREEN, rows.iter().map(|r| (r.0 as f64, r.5)).collect()),
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
    let ymax = rows.iter().map(|r| r.load_view.max(r.accessor).max(r.ch)).fold(1.0, f64::max) * 1.6;
    let mut chart = ChartBuilder::on(&root);
    chart.margin(12);
    if text {
        chart.caption(format!("Lookup, {LOOKUP_RANGES} ranges, scrambled addresses"), ("sans-serif", 20));
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
    let pts = |writer: bool, f: fn(&LookupRow) -> f64| -> Vec<(f64, f64)> {
        rows.iter().filter(|r| r.writer == writer).map(|r| (r.threads as f64, f(r))).collect()
    };
    let series: [Series; 5] = [
        ("topos load_view + lookup, 1 kHz writer", BLUE, pts(true, |r| r.load_view)),
        ("topos Accessor, 1 kHz writer", GREEN, pts(true, |r| r.accessor)),
        ("CH RwLock bus, 1 kHz writer", RED, pts(true, |r| r.ch)),
        ("topos Accessor, no writer", RGBColor(150, 210, 150), pts(false, |r| r.accessor)),
        ("CH RwLock bus, no writer", RGBColor(240, 160, 160), pts(false, |r| r.ch)),
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

/// Operations per variant per round of the interleaved tables.
const BATCH: u64 = 2_000_000;
/// Rounds of the interleaved tables.
const INTERLEAVED_ROUNDS: usize = 9;

/// A variant of an interleaved table: its name and a batch of `n` operations.
type Variant<'a> = (&'a str, Box<dyn FnMut(u64) + 'a>);

/// Runs every variant for `BATCH` operations, round after round, so that the
/// variants share whatever the machine is doing; prints each variant's median
/// and fastest ns/op and its median relative to `reference`'s.
fn interleaved(title: &str, reference: &str, mut variants: Vec<Variant<'_>>) {
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..INTERLEAVED_ROUNDS {
        for (i, (_, f)) in variants.iter_mut().enumerate() {
            let t = Instant::now();
            f(BATCH);
            times[i].push(t.elapsed().as_secs_f64() * 1e9 / BATCH as f64);
        }
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let r = variants.iter().position(|(n, _)| *n == reference).map(|i| med(&times[i])).unwrap_or(f64::NAN);
    println!();
    println!("# {title}: {INTERLEAVED_ROUNDS} interleaved rounds of {BATCH} operations per variant");
    println!("variant,median_ns,min_ns,median_over_{reference}");
    for ((name, _), t) in variants.iter().zip(&times) {
        let m = med(t);
        println!("{name},{m:.2},{:.2},{:.2}", t.iter().copied().fold(f64::INFINITY, f64::min), m / r);
    }
}

/// The headline ratios measured interleaved (criterion runs each bench
/// alone, and this shared machine's speed drifts between benches).
fn interleaved_tables() -> topos_runtime::Result<()> {
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    // RAM: 8-byte accesses at one address.
    let topo = topos_runtime::Topology::new();
    let spaces = topo.standard_spaces()?;
    let ram = topo.new_ram("ram", 64 << 20)?;
    spaces.system.add_subregion(0, &ram)?;
    let asp = spaces.memory.clone();
    let vmm = baselines::vm_memory(64 << 20);
    let addr = 0x10_0008;
    let ga = GuestAddress(addr);
    let mut acc = asp.accessor();
    let mut acc2 = asp.accessor();
    interleaved(
        "RAM 8-byte read",
        "vm_memory",
        vec![
            (
                "topos_asp",
                Box::new(|n| {
                    (0..n).for_each(|_| {
                        let mut b = [0u8; 8];
                        let _ = asp.read(black_box(addr), &mut b);
                        black_box(b);
                    })
                }),
            ),
            (
                "topos_accessor",
                Box::new(|n| {
                    (0..n).for_each(|_| {
                        let mut b = [0u8; 8];
                        let _ = acc.read(black_box(addr), &mut b);
                        black_box(b);
                    })
                }),
            ),
            (
                "vm_memory",
                Box::new(|n| {
                    (0..n).for_each(|_| {
                        black_box(vmm.memory().read_obj::<u64>(black_box(ga)).expect("read"));
                    })
                }),
            ),
        ],
    );
    interleaved(
        "RAM 8-byte write",
        "vm_memory",
        vec![
            (
                "topos_asp",
                Box::new(|n| {
                    (0..n).for_each(|v| {
                        let _ = black_box(asp.write(black_box(addr), &v.to_le_bytes()));
                    })
                }),
            ),
            (
                "topos_accessor",
                Box::new(|n| {
                    (0..n).for_each(|v| {
                        let _ = black_box(acc2.write(black_box(addr), &v.to_le_bytes()));
                    })
                }),
            ),
            (
                "vm_memory",
                Box::new(|n| {
                    (0..n).for_each(|v| {
                        vmm.memory().write_obj(v, black_box(ga)).expect("write");
                    })
                }),
            ),
        ],
    );

    // Lookup in 4,096 ranges, scrambled addresses, and MMIO dispatch.
    let n = LOOKUP_RANGES;
    let map = io_map(n)?;
    let view = map.spaces.memory.view();
    let asp = map.spaces.memory.clone();
    let (ch, _devs) = ch_bus(n);
    let cv = baselines::crosvm_bus(n);
    let vmd = baselines::vmd_manager(n);
    let addrs = scrambled_addrs(n);
    let mask = n - 1;
    let mut acc = asp.accessor();
    interleaved(
        "lookup, 4,096 ranges, scrambled addresses",
        "ch_bus",
        vec![
            (
                "topos_flatview",
                Box::new(|k| {
                    (0..k as usize).for_each(|i| {
                        black_box(view.lookup(black_box(addrs[i & mask])).map(FlatRange::start));
                    })
                }),
            ),
            (
                "topos_accessor",
                Box::new(|k| {
                    (0..k as usize).for_each(|i| {
                        black_box(acc.lookup(black_box(addrs[i & mask])).map(FlatRange::start));
                    })
                }),
            ),
            (
                "ch_bus",
                Box::new(|k| {
                    (0..k as usize).for_each(|i| {
                        black_box(ch.resolve(black_box(addrs[i & mask])).map(|r| r.0));
                    })
                }),
            ),
            (
                "crosvm_bus",
                Box::new(|k| {
                    (0..k as usize).for_each(|i| {
                        black_box(cv.get_device(black_box(addrs[i & mask])).map(|r| r.0));
                    })
                }),
            ),
            (
                "vm_device",
                Box::new(|k| {
                    (0..k as usize).for_each(|i| {
                        black_box(baselines::vmd_lookup(&vmd, black_box(addrs[i & mask])));
                    })
                }),
            ),
        ],
    );
    let a = base_of(100) + 0x10;
    let mut acc = asp.accessor();
    interleaved(
        "MMIO 4-byte read of a trivial device, 4,096 devices",
        "ch_bus",
        vec![
            (
                "topos_asp",
                Box::new(|k| {
                    (0..k).for_each(|_| {
                        let _ = black_box(asp.read_u64(black_box(a), 4));
                    })
                }),
            ),
            (
                "topos_accessor",
                Box::new(|k| {
                    (0..k).for_each(|_| {
                        let _ = black_box(acc.read_u64(black_box(a), 4));
                    })
                }),
            ),
            (
                "ch_bus",
                Box::new(|k| {
                    (0..k).for_each(|_| {
                        let mut d = [0u8; 4];
                        black_box(ch.read(black_box(a), &mut d));
                        black_box(d);
                    })
                }),
            ),
            (
                "crosvm_bus",
                Box::new(|k| {
                    (0..k).for_each(|_| {
                        let mut d = [0u8; 4];
                        black_box(cv.read(black_box(a), &mut d));
                        black_box(d);
                    })
                }),
            ),
            (
                "vm_device",
                Box::new(|k| {
                    (0..k).for_each(|_| {
                        use vm_device::device_manager::MmioManager;
                        let mut d = [0u8; 4];
                        let _ = black_box(vmd.mmio_read(vm_device::bus::MmioAddress(black_box(a)), &mut d));
                        black_box(d);
                    })
                }),
            ),
        ],
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let commit = commit_table()?;
    let lookup = lookup_table()?;
    machine_table()?;
    interleaved_tables()?;
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
