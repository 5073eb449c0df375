//! What both benches (`exits` and `interp`) share: statistics over rounds,
//! the calling thread's CPU time, the host control (how much of a second
//! core the machine gives at the moment), the knobs and finding a program.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The median of `v` (NaN if `v` is empty).
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

/// The CPU time of the calling thread (user + system: under PVM the
/// guest's emulated ring-0 code runs as the vCPU thread's system time).
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

/// How much host work `threads` threads get done per second, each doing
/// `iterations` steps: the machine's own parallelism at that moment.
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
    /// Whether to [`settle`] before each of the two measurements.
    settle: bool,
}

impl Control {
    pub fn new(seconds: f64, settle: bool) -> Control {
        let t = Instant::now();
        spin(10_000_000);
        let per_second = 1e7 / t.elapsed().as_secs_f64();
        Control { iterations: (per_second * seconds) as u64, settle }
    }

    pub fn measure(&self) -> f64 {
        let rate = |threads| {
            if self.settle {
                settle();
            }
            spin_rate(threads, self.iterations)
        };
        let one = rate(1);
        rate(2) / one
    }
}

pub fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A pause before each run (`TOPOS_BENCH_GAP_MS`, default 50), so that the
/// previous run's process or VM is gone (part of a VM's teardown runs in
/// kernel workers after its last descriptor is closed, and topos closes its
/// descriptors from the runtime's threads).
pub fn settle() {
    static GAP: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ms = *GAP.get_or_init(|| u64::from(env_u32("TOPOS_BENCH_GAP_MS", 50)));
    std::thread::sleep(Duration::from_millis(ms));
}

/// `program` on the `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}
