//! The guest on QEMU TCG: `qemu-system-x86_64 -machine pc -accel
//! tcg,thread=multi` with the bench's BIOS, two `edu`s in slots 2 and 3
//! and `isa-debug-exit`, timed by the `fw_cfg_select` trace event of the
//! guest's marker writes (`-trace fw_cfg_select -msg timestamp=on`: each
//! line carries the host's wall-clock time in µs and the vCPU's thread).

use super::guest::{self, Kind};
use super::host::{self, Scratch};
use super::stats::Run;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

pub struct Qemu {
    path: PathBuf,
    scratch: Scratch,
}

impl Qemu {
    pub fn new(path: PathBuf) -> Qemu {
        Qemu { path, scratch: Scratch::new("qemu") }
    }

    /// The command line (without the BIOS), for the report.
    pub fn describe(cpus: u32) -> String {
        format!(
            "qemu-system-x86_64 -machine pc -accel tcg,thread=multi -smp {cpus} -m 128 -nodefaults -display none \
             -no-reboot -device edu,addr=02.0 -device edu,addr=03.0 -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
             -trace fw_cfg_select -msg timestamp=on -bios IMAGE"
        )
    }

    /// One run of `iterations` of `kind` on `cpus` vCPUs, and the CPU time
    /// the whole QEMU process used (start-up included), in seconds.
    pub fn run(&self, kind: Kind, iterations: u32, cpus: u32, timeout: Duration) -> Result<(Run, f64), String> {
        let image = self.scratch.file("bios.bin", &guest::bios(kind, iterations, cpus));
        let mut child = Command::new(&self.path)
            .args(["-machine", "pc", "-accel", "tcg,thread=multi", "-smp", &cpus.to_string(), "-m", "128"])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .args(["-device", "edu,addr=02.0", "-device", "edu,addr=03.0"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .args(["-trace", "fw_cfg_select", "-msg", "timestamp=on"])
            .arg("-bios")
            .arg(&image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.path.display()))?;
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let ended = host::wait_ended(&mut child, timeout)
            .map_err(|_| format!("QEMU {kind:?} with {cpus} vCPUs: no exit within {timeout:?}"))?;
        let text = reader.join().unwrap();
        if ended.code != Some(guest::STATUS_OK) {
            let what = ended.code.map_or("killed", guest::describe_status);
            return Err(format!("QEMU {kind:?}: exit status {:?} ({what}): {}", ended.code, text.trim()));
        }
        let mut marks = vec![(None, None); cpus as usize];
        for line in text.lines().filter(|l| l.contains(":fw_cfg_select ")) {
            let (Some(t), Some(key)) = (timestamp(line), key(line)) else { continue };
            let Some((i, end)) = guest::parse_marker_key(key) else { continue };
            let m: &mut (Option<f64>, Option<f64>) =
                marks.get_mut(i).ok_or_else(|| format!("QEMU: a marker of vCPU {i}"))?;
            if end {
                m.1 = Some(t);
            } else {
                m.0 = Some(t);
            }
        }
        let wall = marks
            .iter()
            .map(|m| match m {
                (Some(s), Some(e)) => Ok((*s, *e)),
                _ => Err(format!("QEMU {kind:?}: markers missing in its trace: {}", text.trim())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((Run::from_marks(&wall, u64::from(iterations), None), ended.cpu))
    }
}

/// The time of a `-msg timestamp=on` trace line: `<tid>@<sec>.<usec>:event ...`.
fn timestamp(line: &str) -> Option<f64> {
    line.split_once('@')?.1.split_once(':')?.0.parse().ok()
}

/// The key of a `fw_cfg_select` line: `... key 0x3f00 'name', ret: 0`.
fn key(line: &str) -> Option<u64> {
    let hex = line.split_once(" key 0x")?.1.split(|c: char| !c.is_ascii_hexdigit()).next()?;
    u64::from_str_radix(hex, 16).ok()
}
