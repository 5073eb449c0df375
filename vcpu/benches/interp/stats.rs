//! What one run measured, the statistics over rounds, and the host control
//! (how much of a second core the machine gives at the moment).

use std::hint::black_box;
use std::time::{Duration, Instant};

/// One run: the guest's iterations (summed over its CPUs) between the first
/// start marker and the last end marker, and, where the backend's threads
/// are ours, the CPU time they used between their markers.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub iterations: u64,
    /// Seconds.
    pub elapsed: f64,
    /// Seconds of vCPU-thread CPU time (user + system), summed.
    pub cpu: Option<f64>,
}

impl Run {
    /// Iterations per second of wall clock.
    pub fn rate(&self) -> f64 {
        self.iterations as f64 / self.elapsed
    }

    /// Nanoseconds of vCPU-thread CPU time per iteration.
    pub fn cpu_ns(&self) -> Option<f64> {
        self.cpu.map(|c| c * 1e9 / self.iterations as f64)
    }

    /// From per-CPU (start, end) wall times in seconds on one clock, and
    /// optional per-CPU CPU seconds.
    pub fn from_marks(marks: &[(f64, f64)], per_cpu: u64, cpu: Option<f64>) -> Run {
        let start = marks.iter().map(|m| m.0).fold(f64::INFINITY, f64::min);
        let end = marks.iter().map(|m| m.1).fold(f64::NEG_INFINITY, f64::max);
        assert!(end > start, "markers out of order: {marks:?}");
        Run { iterations: per_cpu * marks.len() as u64, elapsed: end - start, cpu }
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// `median [min, max]` of `v`, each formatted by `f`.
pub fn spread(v: &[f64], f: impl Fn(f64) -> String) -> String {
    if v.is_empty() {
        "–".into()
    } else {
        format!("{} [{}, {}]", f(median(v)), f(min(v)), f(max(v)))
    }
}

/// Millions per second, 1 decimal.
pub fn mega(x: f64) -> String {
    format!("{:.1} M/s", x / 1e6)
}

/// A ratio with 2 decimals and a `×`.
pub fn times(x: f64) -> String {
    format!("{x:.2}×")
}

/// The CPU time of the calling thread (user + system).
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; the clock id is a constant.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Host CPU work (no guest): `iterations` steps of an integer hash.
fn spin(iterations: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..iterations {
        x = black_box(x.rotate_left(5) ^ i).wrapping_mul(0x0000_0100_0000_01b3);
    }
    x
}

/// How much host work `threads` threads get done per second.
fn spin_rate(threads: u32, iterations: u64) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| black_box(spin(iterations)));
        }
    });
    f64::from(threads) * iterations as f64 / t.elapsed().as_secs_f64()
}

/// The host control: two threads of integer work ÷ one, each about
/// `seconds` long — about 2 when the machine gives two cores.
pub struct Control {
    iterations: u64,
}

impl Control {
    pub fn new(seconds: f64) -> Control {
        let t = Instant::now();
        spin(10_000_000);
        let per_second = 1e7 / t.elapsed().as_secs_f64();
        Control { iterations: (per_second * seconds) as u64 }
    }

    pub fn measure(&self) -> f64 {
        let one = spin_rate(1, self.iterations);
        spin_rate(2, self.iterations) / one
    }
}

pub fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A pause before each run (`TOPOS_BENCH_GAP_MS`, default 50), so that the
/// previous run's process or VM is gone.
pub fn settle() {
    static GAP: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ms = *GAP.get_or_init(|| u64::from(env_u32("TOPOS_BENCH_GAP_MS", 50)));
    std::thread::sleep(Duration::from_millis(ms));
}
