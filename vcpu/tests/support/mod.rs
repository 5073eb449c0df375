//! What the vCPU layer's integration tests share: finding `/dev/kvm` and
//! QEMU (and saying so when they are absent), and running a program under a
//! watchdog.
#![allow(dead_code)] // each test file uses a part

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A run taking longer than this is killed and fails its test.
pub const WATCHDOG: Duration = Duration::from_secs(60);

/// Whether `/dev/kvm` can be opened; prints why a test skips if not.
pub fn kvm_present() -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}

/// `qemu-system-x86_64` on PATH; prints why a test skips if not.
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path).map(|dir| dir.join("qemu-system-x86_64")).find(|p| p.is_file());
    if found.is_none() {
        println!("skipped: qemu-system-x86_64 not found");
    }
    found
}

/// What one run produced.
#[derive(Debug)]
pub struct Run {
    /// The exit status (`None` if killed by the watchdog or a signal).
    pub status: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `cmd` (stdin closed, output captured), killing it after
/// [`WATCHDOG`].
pub fn run_with_watchdog(cmd: &mut Command) -> Run {
    let start = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the program starts");
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the program") {
            break status.code();
        }
        if start.elapsed() > WATCHDOG {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// `topos run` with `args`, under the watchdog.
pub fn topos_run(args: &[&str]) -> Run {
    run_with_watchdog(Command::new(env!("CARGO_BIN_EXE_topos")).arg("run").args(args))
}
