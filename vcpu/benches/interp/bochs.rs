//! The guest on Bochs (Debian's `bochs`, 2.7): the bench's BIOS as its ROM
//! image, timed by the marker bytes the guest writes to port `0xe9`, which
//! Bochs prints on its standard output (`port_e9_hack`); the bench notes
//! when each arrives and ends Bochs after the last (the guest's exit port
//! does not exist there). One CPU, the `dec ecx; jnz` loop only (Bochs has
//! no `edu`).

use super::guest::{self, Kind};
use super::host::{self, Scratch};
use super::stats::Run;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Bochs {
    path: PathBuf,
    scratch: Scratch,
}

/// The configuration, with the image's path. Bochs insists on a VGA BIOS
/// file even though the guest never calls it: SeaBIOS's (installed with
/// QEMU) or the `vgabios` package's. Debian's build has no `nogui` display,
/// so it runs the `rfb` server (not waiting for a client: `timeout=0`).
fn bochsrc(image: &str, log: &str) -> String {
    let vga = ["/usr/share/seabios/vgabios-stdvga.bin", "/usr/share/vgabios/vgabios.bin"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("/usr/share/bochs/VGABIOS-lgpl-latest");
    format!(
        "megs: 128\n\
         romimage: file={image}, address=0xffff0000\n\
         vgaromimage: file={vga}\n\
         cpu: count=1, ips=50000000, reset_on_triple_fault=0\n\
         display_library: rfb, options=\"timeout=0\"\n\
         sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n\
         port_e9_hack: enabled=1\n\
         clock: sync=none\n\
         log: {log}\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=ignore\n\
         debug: action=ignore\n"
    )
}

/// Debian builds Bochs with its debugger, which stops before the first
/// instruction: its command file says `c` (continue).
const DEBUGGER_COMMANDS: &[u8] = b"c\n";

impl Bochs {
    pub fn new(path: PathBuf) -> Bochs {
        Bochs { path, scratch: Scratch::new("bochs") }
    }

    /// One run of `iterations` of the loop, and the CPU time the whole
    /// Bochs process used (start-up included), in seconds.
    pub fn run(&self, iterations: u32, timeout: Duration) -> Result<(Run, f64), String> {
        let image = self.scratch.file("bios.bin", &guest::bios(Kind::Loop, iterations, 1));
        let log = self.scratch.dir.join("bochs.log");
        let rc = self.scratch.file("bochsrc", bochsrc(&image.to_string_lossy(), &log.to_string_lossy()).as_bytes());
        let commands = self.scratch.file("commands", DEBUGGER_COMMANDS);
        let mut child = Command::new(&self.path)
            .arg("-q")
            .arg("-f")
            .arg(&rc)
            .arg("-rc")
            .arg(&commands)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.path.display()))?;
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            while let Ok(1) = stdout.read(&mut b) {
                if tx.send((b[0], Instant::now())).is_err() {
                    break;
                }
            }
        });
        let (start_byte, end_byte) = (guest::marker_char(0, false), guest::marker_char(0, true));
        let deadline = Instant::now() + timeout;
        let mut start = None;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((b, t)) if b == start_byte => start = Some(t),
                Ok((b, t)) if b == end_byte => match start {
                    Some(s) => break Ok((t - s).as_secs_f64()),
                    None => break Err("Bochs: end marker before the start marker".to_string()),
                },
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => break Err(format!("Bochs: no end marker within {timeout:?}")),
                Err(mpsc::RecvTimeoutError::Disconnected) => break Err("Bochs ended without the markers".to_string()),
            }
        };
        // Bochs sits in the guest's final `hlt`: end it.
        let ended = host::kill_ended(&mut child);
        let errors = errors.join().unwrap();
        let result = result.map_err(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            let tail =
                |t: &str| t.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            format!("{e}; its stderr ends:\n{}\nits log ends:\n{}", tail(&errors), tail(&log))
        });
        let elapsed = result?;
        Ok((Run { iterations: u64::from(iterations), elapsed, cpu: None }, ended.cpu))
    }
}
