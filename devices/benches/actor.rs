//! Cost of the actor harness against a device behind a plain `Mutex`, in the
//! same run: an MMIO read and a posted write, uncontended (inline path) and
//! contended (two threads on one device), and the parallelism of two threads
//! on two devices against one thread on one device.
//!
//! `cargo bench -p topos-devices --bench actor`
#![allow(missing_docs)] // criterion's macros generate undocumented items

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use topos_devices::runtime::{HwAddr, MemoryRegionOps};
use topos_devices::{Device, DeviceCtx, DeviceRuntime, Spawned};

/// A register file: the kind of work a simple device does per access.
#[derive(Default)]
struct Regs {
    r: [u64; 16],
}

impl Regs {
    fn rd(&mut self, addr: HwAddr) -> u64 {
        self.r[(addr as usize / 8) & 15]
    }
    fn wr(&mut self, addr: HwAddr, v: u64) {
        self.r[(addr as usize / 8) & 15] = v;
    }
}

impl Device for Regs {
    fn read(&mut self, _c: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, _s: u32) -> u64 {
        self.rd(addr)
    }
    fn write(&mut self, _c: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, v: u64, _s: u32) {
        self.wr(addr, v)
    }
}

/// The baseline: the same device behind a mutex, called directly.
struct Locked(Mutex<Regs>);

impl MemoryRegionOps for Locked {
    fn read(&self, addr: HwAddr, _s: u32) -> u64 {
        self.0.lock().unwrap().rd(addr)
    }
    fn write(&self, addr: HwAddr, v: u64, _s: u32) {
        self.0.lock().unwrap().wr(addr, v)
    }
}

fn contenders() -> (Arc<dyn MemoryRegionOps>, Arc<dyn MemoryRegionOps>, DeviceRuntime) {
    let rt = DeviceRuntime::new().unwrap();
    let actor = Spawned::new("regs", Regs::default(), vec![], &rt).ops(0);
    let locked: Arc<dyn MemoryRegionOps> = Arc::new(Locked(Mutex::new(Regs::default())));
    (actor, locked, rt)
}

fn uncontended(c: &mut Criterion) {
    let (actor, locked, _rt) = contenders();
    let mut g = c.benchmark_group("device_access_uncontended");
    g.bench_function("read/mutex", |b| b.iter(|| locked.read_with_result(black_box(8), 4)));
    g.bench_function("read/actor", |b| b.iter(|| actor.read_with_result(black_box(8), 4)));
    g.bench_function("write/mutex", |b| b.iter(|| locked.write_with_result(black_box(8), 1, 4)));
    g.bench_function("write/actor", |b| b.iter(|| actor.write_with_result(black_box(8), 1, 4)));
    g.finish();
}

/// Time per access with `threads` threads each doing `iters` accesses on
/// the device their index picks.
fn run_threads(devs: &[Arc<dyn MemoryRegionOps>], threads: usize, iters: u64, write: bool) -> Duration {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let d = devs[t % devs.len()].clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..iters {
                    if write {
                        let _ = d.write_with_result(black_box(i & 0x78), i, 4);
                    } else {
                        let _ = black_box(d.read_with_result(black_box(i & 0x78), 4));
                    }
                }
            })
        })
        .collect();
    barrier.wait();
    let t = Instant::now();
    for h in hs {
        h.join().unwrap();
    }
    t.elapsed()
}

fn contended(c: &mut Criterion) {
    let (actor, locked, _rt) = contenders();
    let mut g = c.benchmark_group("device_access_contended_2_threads");
    for (name, dev, write) in [
        ("read/mutex", &locked, false),
        ("read/actor", &actor, false),
        ("write/mutex", &locked, true),
        ("write/actor", &actor, true),
    ] {
        let devs = vec![dev.clone()];
        // Per access: total wall time / (2 threads × iters).
        g.bench_function(name, |b| b.iter_custom(|iters| run_threads(&devs, 2, iters, write) / 2));
    }
    g.finish();
}

fn parallelism(c: &mut Criterion) {
    let rt = DeviceRuntime::new().unwrap();
    let a = Spawned::new("a", Regs::default(), vec![], &rt).ops(0);
    let b2 = Spawned::new("b", Regs::default(), vec![], &rt).ops(0);
    let mut g = c.benchmark_group("device_parallelism");
    let one = vec![a.clone()];
    let two = vec![a, b2];
    // Time per access of the whole system (lower is more throughput).
    g.bench_function("1_thread_1_device", |b| b.iter_custom(|iters| run_threads(&one, 1, iters, false)));
    g.bench_function("2_threads_2_devices", |b| b.iter_custom(|iters| run_threads(&two, 2, iters, false) / 2));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(30);
    targets = uncontended, contended, parallelism
}
criterion_main!(benches);
