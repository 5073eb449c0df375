//! What the firmware prints, line by line, as a function of the machine it
//! runs on, and a checker for a captured transcript. Fixed lines are
//! compared exactly; lines whose numbers vary from run to run (the AP read
//! counts of the remap phase) are matched by their fixed prefix.
//!
//! On QEMU (`-machine pc -m 256M -smp 2 -nodefaults -device edu -device
//! isa-debug-exit,iobase=0xf4,iosize=0x04`) a run prints:
//!
//! ```text
//! topos firmware
//! fw_cfg: signature QEMU
//! cpus: 2
//! ram: 256 MiB
//! smp: 2 cpus up, apic ids 0 1
//! lock xadd: 2000 ok
//! spinlock: 2000 ok
//! pci 00:00.0 8086:1237 class 060000
//! pci 00:01.0 8086:7000 class 060100
//! pci 00:01.1 8086:7010 class 010180
//! pci 00:01.3 8086:7113 class 068000
//! pci 00:02.0 1234:11e8 class 00ff00
//! edu: bar0 size 00100000 at feb00000
//! edu: ident 010000ed
//! edu: liveness ok
//! edu: factorial 10! = 3628800
//! edu: dma ok
//! remap: 200 moves, reads ident=647495 unassigned=815859 other=0
//! remap: consistent
//! skip: pflash (not present)
//! skip: framebuffer (not present)
//! skip: virtio-doorbell (not present)
//! rom: alias ok
//! rom: writes dropped
//! result: pass
//! ```
//!
//! topos's board (`topos run`, whose default devices are edu, framebuffer,
//! virtio-doorbell and pflash) prints the same lines, PCI functions
//! included; where QEMU prints the three `skip:` lines it prints:
//!
//! ```text
//! pflash: cfi QRY, 1024 KiB, 16 blocks of 64 KiB
//! pflash: read array ok
//! framebuffer: vram 4096 KiB
//! framebuffer: mode 1024x768, 4 bytes per pixel, stride 4096
//! framebuffer: drew lines 10 20 30
//! virtio-doorbell: version 2, device 2
//! virtio-doorbell: notify seen
//! ```

use std::fmt;

/// The first line.
pub const BANNER: &str = "topos firmware";
/// fw_cfg's signature checked out.
pub const FW_CFG_SIGNATURE: &str = "fw_cfg: signature QEMU";
/// No fw_cfg device (its signature did not read as "QEMU").
pub const FW_CFG_ABSENT: &str = "skip: fw_cfg (not present)";
/// Prefix of the CPU-count line.
pub const CPUS: &str = "cpus: ";
/// Prefix of the RAM-size line.
pub const RAM: &str = "ram: ";
/// Unit at the end of the RAM-size line.
pub const RAM_UNIT: &str = " MiB";
/// Prefix of the SMP line.
pub const SMP: &str = "smp: ";
/// Between the CPU count and the APIC IDs of the SMP line.
pub const SMP_IDS: &str = " cpus up, apic ids";
/// Prefix of the `lock xadd` counter line.
pub const LOCK_XADD: &str = "lock xadd: ";
/// Prefix of the spinlock counter line.
pub const SPINLOCK: &str = "spinlock: ";
/// Prefix of a PCI function line.
pub const PCI: &str = "pci 00:";
/// Before the class code of a PCI function line.
pub const PCI_CLASS: &str = " class ";
/// No edu device on bus 0.
pub const EDU_ABSENT: &str = "skip: edu (not present)";
/// Prefix of the edu BAR0 line (size in hex).
pub const EDU_BAR: &str = "edu: bar0 size ";
/// Before the address of the edu BAR0 line.
pub const EDU_BAR_AT: &str = " at ";
/// Prefix of the edu ident line.
pub const EDU_IDENT: &str = "edu: ident ";
/// The edu liveness check passed.
pub const EDU_LIVENESS_OK: &str = "edu: liveness ok";
/// Prefix of the edu factorial line.
pub const EDU_FACTORIAL: &str = "edu: factorial ";
/// The edu DMA round trip passed.
pub const EDU_DMA_OK: &str = "edu: dma ok";
/// The remap phase did not run (no usable edu).
pub const REMAP_ABSENT: &str = "skip: remap (no edu)";
/// Prefix of the remap counts line.
pub const REMAP: &str = "remap: ";
/// After the move count of the remap counts line (the AP read counts
/// follow and vary).
pub const REMAP_READS: &str = " moves, reads ";
/// The remap verdict when every read matched.
pub const REMAP_CONSISTENT: &str = "remap: consistent";
/// No CFI flash answered at the `--device pflash` address.
pub const PFLASH_ABSENT: &str = "skip: pflash (not present)";
/// Prefix of the pflash query line (the size in KiB follows).
pub const PFLASH_CFI: &str = "pflash: cfi QRY, ";
/// After a size in KiB on the pflash query line.
pub const PFLASH_KIB: &str = " KiB";
/// Between the block count and the block size of the pflash query line.
pub const PFLASH_BLOCKS_OF: &str = " blocks of ";
/// The flash went back to read array mode.
pub const PFLASH_READ_ARRAY_OK: &str = "pflash: read array ok";
/// No framebuffer registers at the `--device framebuffer` address.
pub const FRAMEBUFFER_ABSENT: &str = "skip: framebuffer (not present)";
/// Prefix of the framebuffer video RAM line (the size in KiB follows).
pub const FRAMEBUFFER_VRAM: &str = "framebuffer: vram ";
/// After the size of the framebuffer video RAM line.
pub const FRAMEBUFFER_KIB: &str = " KiB";
/// Prefix of the framebuffer mode line.
pub const FRAMEBUFFER_MODE: &str = "framebuffer: mode ";
/// Prefix of the line naming the scanlines the firmware drew.
pub const FRAMEBUFFER_DREW: &str = "framebuffer: drew lines";
/// No virtio-mmio device at the `--device virtio-doorbell` address.
pub const VIRTIO_DOORBELL_ABSENT: &str = "skip: virtio-doorbell (not present)";
/// Prefix of the virtio doorbell identification line (the layout version
/// follows).
pub const VIRTIO_DOORBELL_VERSION: &str = "virtio-doorbell: version ";
/// Before the device id of the virtio doorbell identification line.
pub const VIRTIO_DOORBELL_DEVICE: &str = ", device ";
/// The doorbell's QueueNotify had its effect (InterruptStatus bit 0).
pub const VIRTIO_DOORBELL_NOTIFY_SEEN: &str = "virtio-doorbell: notify seen";
/// The reset vector reads the same through both mappings.
pub const ROM_ALIAS_OK: &str = "rom: alias ok";
/// Writes to the ROM did not change it.
pub const ROM_WRITES_DROPPED: &str = "rom: writes dropped";
/// Suffix of a line whose check passed.
pub const OK_SUFFIX: &str = " ok";
/// Suffix of a line whose check failed.
pub const FAIL_SUFFIX: &str = " FAIL";
/// The last line when every check passed.
pub const RESULT_PASS: &str = "result: pass";
/// The last line when a check failed.
pub const RESULT_FAIL: &str = "result: fail";

/// One line of an expected transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedLine {
    /// The line, exactly.
    Exact(String),
    /// A line starting with this (its tail varies from run to run).
    Prefix(String),
}

impl ExpectedLine {
    /// Whether `line` (without its newline) is this line.
    pub fn matches(&self, line: &str) -> bool {
        match self {
            ExpectedLine::Exact(s) => line == s,
            ExpectedLine::Prefix(p) => line.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for ExpectedLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedLine::Exact(s) => write!(f, "{s:?}"),
            ExpectedLine::Prefix(p) => write!(f, "{p:?}..."),
        }
    }
}

/// What the firmware should find on the machine it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// CPUs (fw_cfg's count, all of which must come up).
    pub ncpus: u32,
    /// Their APIC IDs, in any order.
    pub apic_ids: Vec<u32>,
    /// RAM size in MiB as fw_cfg reports it; `None` for a machine without
    /// fw_cfg.
    pub ram_mib: Option<u64>,
    /// The functions on PCI bus 0, in slot and function order.
    pub pci: Vec<PciFunction>,
    /// topos's `--device pflash` (a 1 MiB CFI flash of 16 blocks of
    /// 64 KiB at [`PFLASH`](super::layout::PFLASH)) is present.
    pub pflash: bool,
    /// topos's `--device framebuffer` (4 MiB of video RAM) is present.
    pub framebuffer: bool,
    /// topos's `--device virtio-doorbell` (a virtio-mmio block device, id
    /// 2) is present.
    pub virtio_doorbell: bool,
}

/// A function on PCI bus 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciFunction {
    /// Device number (0..32).
    pub slot: u8,
    /// Function number (0..8).
    pub function: u8,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
}

impl PciFunction {
    /// Whether this is QEMU's edu device.
    pub fn is_edu(&self) -> bool {
        u32::from(self.vendor) | (u32::from(self.device) << 16) == super::pci::EDU_ID
    }

    /// The line the firmware prints for it.
    pub fn line(&self) -> String {
        format!(
            "{PCI}{:02x}.{:x} {:04x}:{:04x}{PCI_CLASS}{:06x}",
            self.slot, self.function, self.vendor, self.device, self.class
        )
    }
}

impl Machine {
    /// QEMU's `pc` machine as the firmware tests start it (`-m 256M -smp
    /// ncpus -nodefaults -device edu -device isa-debug-exit`): none of
    /// topos's fixed-address devices.
    pub fn qemu_pc(ncpus: u32) -> Machine {
        let f = |slot, function, vendor, device, class| PciFunction { slot, function, vendor, device, class };
        Machine {
            ncpus,
            apic_ids: (0..ncpus).collect(),
            ram_mib: Some(QEMU_RAM_MIB),
            pci: vec![
                f(0, 0, 0x8086, 0x1237, 0x06_00_00), // i440FX host bridge
                f(1, 0, 0x8086, 0x7000, 0x06_01_00), // PIIX3 ISA bridge
                f(1, 1, 0x8086, 0x7010, 0x01_01_80), // PIIX3 IDE
                f(1, 3, 0x8086, 0x7113, 0x06_80_00), // PIIX4 ACPI
                f(2, 0, 0x1234, 0x11e8, 0x00_ff_00), // edu
            ],
            pflash: false,
            framebuffer: false,
            virtio_doorbell: false,
        }
    }

    /// topos's `pc` board with `ram_mib` of RAM and its default devices
    /// (`topos run` without `--device`: edu, framebuffer, virtio-doorbell,
    /// pflash): QEMU's PCI functions and the three fixed-address devices.
    pub fn topos_pc(ncpus: u32, ram_mib: u64) -> Machine {
        let mut m = Machine::qemu_pc(ncpus);
        m.ram_mib = Some(ram_mib);
        m.pflash = true;
        m.framebuffer = true;
        m.virtio_doorbell = true;
        m
    }
}

/// Size of topos's `--device pflash` in KiB.
pub const PFLASH_SIZE_KIB: u32 = (crate::board::PFLASH_DEVICE_SIZE >> 10) as u32;
/// Erase blocks of topos's `--device pflash`.
pub const PFLASH_BLOCKS: u32 = crate::board::PFLASH_DEVICE_BLOCKS;
/// Video RAM of topos's `--device framebuffer` in KiB.
pub const FRAMEBUFFER_VRAM_KIB: u64 = crate::board::FRAMEBUFFER_VRAM_SIZE >> 10;
/// Device id of topos's `--device virtio-doorbell` (a block device).
pub const VIRTIO_DOORBELL_DEVICE_ID: u32 = 2;

/// The pflash query line for a flash of `kib` KiB in `blocks` equal blocks.
pub fn pflash_cfi(kib: u32, blocks: u32) -> String {
    format!("{PFLASH_CFI}{kib}{PFLASH_KIB}, {blocks}{PFLASH_BLOCKS_OF}{}{PFLASH_KIB}", kib / blocks)
}

/// The framebuffer mode line for the mode the firmware sets.
pub fn framebuffer_mode() -> String {
    use super::framebuffer::{MODE_BYTES_PER_PIXEL, MODE_HEIGHT, MODE_STRIDE, MODE_WIDTH};
    format!(
        "{FRAMEBUFFER_MODE}{MODE_WIDTH}x{MODE_HEIGHT}, {MODE_BYTES_PER_PIXEL} bytes per pixel, stride {MODE_STRIDE}"
    )
}

/// The line naming the scanlines the firmware drew.
pub fn framebuffer_drew() -> String {
    let lines: String = super::framebuffer::DRAWN_LINES.iter().map(|y| format!(" {y}")).collect();
    format!("{FRAMEBUFFER_DREW}{lines}")
}

/// RAM the QEMU tests give the machine (`-m 256M`).
pub const QEMU_RAM_MIB: u64 = 256;

/// The transcript a passing run prints on `machine`.
pub fn expected_lines(machine: &Machine) -> Vec<ExpectedLine> {
    let exact = |s: String| ExpectedLine::Exact(s);
    let n = machine.ncpus;
    let mut lines = vec![exact(BANNER.to_owned())];
    match machine.ram_mib {
        Some(mib) => {
            lines.push(exact(FW_CFG_SIGNATURE.to_owned()));
            lines.push(exact(format!("{CPUS}{n}")));
            lines.push(exact(format!("{RAM}{mib}{RAM_UNIT}")));
        }
        None => lines.push(exact(FW_CFG_ABSENT.to_owned())),
    }
    let mut ids = machine.apic_ids.clone();
    ids.sort_unstable();
    let ids: String = ids.iter().map(|id| format!(" {id}")).collect();
    lines.push(exact(format!("{SMP}{n}{SMP_IDS}{ids}")));
    let total = n * super::counters::ITERATIONS;
    lines.push(exact(format!("{LOCK_XADD}{total}{OK_SUFFIX}")));
    lines.push(exact(format!("{SPINLOCK}{total}{OK_SUFFIX}")));
    lines.extend(machine.pci.iter().map(|f| exact(f.line())));
    if machine.pci.iter().any(PciFunction::is_edu) {
        use super::edu;
        let bar = super::layout::EDU_BAR_A;
        lines.push(exact(format!("{EDU_BAR}{:08x}{EDU_BAR_AT}{bar:08x}", edu::BAR_MAX)));
        lines.push(exact(format!("{EDU_IDENT}{:08x}", edu::IDENT)));
        lines.push(exact(EDU_LIVENESS_OK.to_owned()));
        lines.push(exact(format!("{EDU_FACTORIAL}{}! = {}", edu::FACTORIAL_N, edu::FACTORIAL_RESULT)));
        lines.push(exact(EDU_DMA_OK.to_owned()));
        lines.push(ExpectedLine::Prefix(format!("{REMAP}{}{REMAP_READS}ident=", super::remap::MOVES)));
        lines.push(exact(REMAP_CONSISTENT.to_owned()));
    } else {
        lines.push(exact(EDU_ABSENT.to_owned()));
        lines.push(exact(REMAP_ABSENT.to_owned()));
    }
    if machine.pflash {
        lines.push(exact(pflash_cfi(PFLASH_SIZE_KIB, PFLASH_BLOCKS)));
        lines.push(exact(PFLASH_READ_ARRAY_OK.to_owned()));
    } else {
        lines.push(exact(PFLASH_ABSENT.to_owned()));
    }
    if machine.framebuffer {
        lines.push(exact(format!("{FRAMEBUFFER_VRAM}{FRAMEBUFFER_VRAM_KIB}{FRAMEBUFFER_KIB}")));
        lines.push(exact(framebuffer_mode()));
        lines.push(exact(framebuffer_drew()));
    } else {
        lines.push(exact(FRAMEBUFFER_ABSENT.to_owned()));
    }
    if machine.virtio_doorbell {
        let version = super::virtio_doorbell::VERSION;
        lines.push(exact(format!(
            "{VIRTIO_DOORBELL_VERSION}{version}{VIRTIO_DOORBELL_DEVICE}{VIRTIO_DOORBELL_DEVICE_ID}"
        )));
        lines.push(exact(VIRTIO_DOORBELL_NOTIFY_SEEN.to_owned()));
    } else {
        lines.push(exact(VIRTIO_DOORBELL_ABSENT.to_owned()));
    }
    lines.push(exact(ROM_ALIAS_OK.to_owned()));
    lines.push(exact(ROM_WRITES_DROPPED.to_owned()));
    lines.push(exact(RESULT_PASS.to_owned()));
    lines
}

/// How a transcript differs from the expected one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranscriptMismatch {
    /// Line `line` (1-based) is not the expected one.
    #[error("line {line}: expected {expected}, found {found:?}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What should be there.
        expected: String,
        /// What is there.
        found: String,
    },
    /// The transcript ends before line `line`.
    #[error("transcript ends before line {line}: expected {expected}")]
    Missing {
        /// 1-based line number.
        line: usize,
        /// What should be there.
        expected: String,
    },
    /// The transcript goes on after the last expected line.
    #[error("line {line}: unexpected extra line {found:?}")]
    Extra {
        /// 1-based line number.
        line: usize,
        /// The extra line.
        found: String,
    },
}

/// Checks a captured transcript against `expected`, line for line (carriage
/// returns are ignored; a trailing newline is allowed).
pub fn check(output: &str, expected: &[ExpectedLine]) -> Result<(), TranscriptMismatch> {
    let mut lines = output.lines().map(|l| l.trim_end_matches('\r'));
    for (i, want) in expected.iter().enumerate() {
        match lines.next() {
            Some(found) if want.matches(found) => {}
            Some(found) => {
                return Err(TranscriptMismatch::Line {
                    line: i + 1,
                    expected: want.to_string(),
                    found: found.to_owned(),
                })
            }
            None => return Err(TranscriptMismatch::Missing { line: i + 1, expected: want.to_string() }),
        }
    }
    match lines.next() {
        Some(found) => Err(TranscriptMismatch::Extra { line: expected.len() + 1, found: found.to_owned() }),
        None => Ok(()),
    }
}
