//! The host side of the external baselines: finding (or installing) an
//! emulator, a scratch directory for images and configurations.

use crate::common::which;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `program`, installing the Debian `package` that holds it when it is
/// missing and `install` is true (says so on stderr). `Err` says why it is
/// not there.
pub fn find_or_install(program: &str, package: &str, install: bool) -> Result<PathBuf, String> {
    if let Some(p) = which(program) {
        return Ok(p);
    }
    if !install {
        return Err(format!("`{program}` is not installed (Debian package `{package}`)"));
    }
    if which("apt-get").is_none() {
        return Err(format!("`{program}` is not installed and there is no apt-get to install `{package}`"));
    }
    eprintln!("`{program}` is missing: running `apt-get install -y {package}`");
    let status = Command::new("apt-get")
        .args(["install", "-y", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("apt-get: {e}"))?;
    if !status.success() {
        return Err(format!("`{program}` is not installed and `apt-get install -y {package}` failed ({status})"));
    }
    which(program).ok_or_else(|| format!("`apt-get install -y {package}` did not provide `{program}`"))
}

/// A scratch directory, removed when dropped (kept with
/// `TOPOS_BENCH_KEEP_SCRATCH=1`, to rerun a baseline by hand).
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("topos-bench-interp-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    /// Writes `bytes` to `name` in the directory; returns its path.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("TOPOS_BENCH_KEEP_SCRATCH").is_some() {
            eprintln!("kept {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How a child process ended: its exit code (`None` if a signal ended it)
/// and the CPU time (user + system, all its threads) it used, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    pub code: Option<i32>,
    pub cpu: f64,
}

/// Reaps `child` if it has ended (`block`: waits for it).
fn reap(child: &Child, block: bool) -> Option<Ended> {
    let mut status = 0;
    // SAFETY: `rusage` is plain data that `wait4` fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: waits for (and reaps) our own child with valid out-pointers;
    // the caller does not wait for it again.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, flags, &mut usage) };
    if pid != child.id() as libc::pid_t {
        return None;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Some(Ended { code, cpu: tv(usage.ru_utime) + tv(usage.ru_stime) })
}

/// Waits for `child` to end, at most `timeout` (then kills it: `Err`).
pub fn wait_ended(child: &mut Child, timeout: Duration) -> Result<Ended, Ended> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = reap(child, false) {
            return Ok(e);
        }
        if Instant::now() > deadline {
            return Err(kill_ended(child));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Kills `child` (which this bench started) and reaps it.
pub fn kill_ended(child: &mut Child) -> Ended {
    let _ = child.kill();
    reap(child, true).unwrap_or(Ended { code: None, cpu: f64::NAN })
}
