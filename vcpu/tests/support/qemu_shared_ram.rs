//! What the QEMU runners of the differential tests (`interp_differential`,
//! `interp_paging_qemu`) share: guest RAM is a file shared with QEMU
//! (`memory-backend-file`, `share=on`) that the runner fills and reads
//! back, and QEMU boots a 64 KiB BIOS made by the test, which starts with
//! the [`Bios`] skeleton here.

use super::harness_asm::{asm, jmp_far};
use super::{find_qemu, run_with_watchdog, Run, Scratch};
use iced_x86::code_asm::*;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The BIOS's place: the last 64 KiB below 4 GiB (and its alias at
/// `f000:0000`).
pub const ROM: u32 = 0xffff_0000;
/// ROM offsets: the reset code (real mode, into protected mode), and the
/// GDTR it loads.
pub const INIT: u32 = 0x0;
pub const GDTR: u32 = 0x100;

/// A 64 KiB BIOS image, `hlt` wherever nothing is put, whose reset vector
/// goes to [`INIT`]: `cli`, `lgdt` from [`GDTR`], CR0.PE, and a far jump
/// into 32-bit code.
pub struct Bios(Vec<u8>);

impl Bios {
    /// With the GDT at `gdt` (`gdt_limit`), jumping to `code:ROM + main`.
    pub fn new(gdt: u32, gdt_limit: u16, code: u16, main: u32) -> Bios {
        let mut bios = Bios(vec![0xf4u8; 0x1_0000]);
        bios.put(
            INIT,
            &asm(16, INIT, |a| {
                a.cli()?;
                a.lgdt(ptr(GDTR).cs())?;
                a.mov(eax, cr0)?;
                a.or(eax, 1)?;
                a.mov(cr0, eax)?;
                jmp_far(a, code, ROM + main, true)
            }),
        );
        let mut gdtr = gdt_limit.to_le_bytes().to_vec();
        gdtr.extend(gdt.to_le_bytes());
        bios.put(GDTR, &gdtr);
        bios.put(0xfff0, &asm(16, 0xfff0, |a| jmp_far(a, 0xf000, INIT, false)));
        bios
    }

    /// Puts `bytes` at ROM offset `offset`.
    pub fn put(&mut self, offset: u32, bytes: &[u8]) {
        let o = offset as usize;
        self.0[o..o + bytes.len()].copy_from_slice(bytes);
    }

    /// The image.
    pub fn image(self) -> Vec<u8> {
        self.0
    }
}

/// What differs between the runners.
pub struct Config {
    /// The scratch directory's name (with the process id and a count).
    pub scratch: &'static str,
    /// QEMU's `-cpu`.
    pub cpu: &'static str,
    /// The variable that names a file for QEMU's log (`-D`), and what it
    /// logs (`-d`).
    pub log_env: &'static str,
    pub log: &'static str,
}

/// `qemu-system-x86_64` and a scratch directory holding the BIOS image and
/// the RAM file.
pub struct SharedRamQemu {
    config: Config,
    qemu: PathBuf,
    scratch: Scratch,
    bios: PathBuf,
}

impl SharedRamQemu {
    /// The runner with `bios` written to its scratch directory, if QEMU is
    /// installed (says why not otherwise).
    pub fn new(config: Config, bios: &[u8]) -> Option<SharedRamQemu> {
        let qemu = find_qemu()?;
        static RUNNERS: AtomicU32 = AtomicU32::new(0);
        let n = RUNNERS.fetch_add(1, Ordering::Relaxed);
        let scratch = Scratch::new(&format!("{}-{n}", config.scratch));
        let bios = scratch.file("harness.bin", bios);
        Some(SharedRamQemu { config, qemu, scratch, bios })
    }

    /// A new RAM file of `size` bytes (zeroed, open for reading and
    /// writing), and its path.
    pub fn ram_file(&self, size: u64) -> (PathBuf, File) {
        let path = self.scratch.dir.join("ram");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("the RAM file");
        file.set_len(size).expect("the RAM file's size");
        (path, file)
    }

    /// Boots the BIOS over the RAM file `ram` (`size` bytes, a multiple of
    /// 1 MiB) with `isa-debug-exit` at 0xf4, under the watchdog.
    pub fn boot(&self, ram: &Path, size: u64) -> Run {
        let mut debug = vec![];
        if let Ok(log) = std::env::var(self.config.log_env) {
            debug = vec!["-d".to_string(), self.config.log.into(), "-D".into(), log];
        }
        let backend = format!("memory-backend-file,id=ram,size={size},mem-path={},share=on", ram.display());
        run_with_watchdog(
            Command::new(&self.qemu)
                .args(["-machine", "pc,accel=tcg,memory-backend=ram", "-cpu", self.config.cpu])
                .args(["-m", &format!("{}M", size >> 20), "-object", &backend])
                .arg("-bios")
                .arg(&self.bios)
                .args(["-nodefaults", "-display", "none", "-no-reboot"])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
                .args(&debug),
        )
    }
}
