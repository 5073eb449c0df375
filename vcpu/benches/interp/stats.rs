//! What one run measured and how it is shown (the statistics are in
//! [`common`](crate::common), shared with the `exits` bench).

use crate::common::{max, median, min};

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
