//! The `topos` command.

use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use topos_devices::uart::SerialSink;
use topos_runtime::{MtreeOptions, Topology};
use topos_vcpu::board::multiboot::Kernel;
use topos_vcpu::board::{memory_map::DEFAULT_RAM_SIZE, BoardWiring, NoInterrupts, PcBoard, PcConfig, PciModel};
use topos_vcpu::machine::{Accel, Machine};
use topos_vcpu::stress::{self, StressConfig};

/// topos: an emulator runtime built around QEMU's memory API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// What to do (default: `run` with the embedded firmware).
    #[command(subcommand)]
    command: Option<Command>,
}

/// The board's options, shared by `run` and `mtree`.
#[derive(Args, Debug)]
struct BoardArgs {
    /// A raw BIOS image (as QEMU's `-bios`); without it, the embedded
    /// firmware.
    #[arg(long, value_name = "FILE")]
    bios: Option<std::path::PathBuf>,
    /// A BIOS image to boot from a CFI flash ending at 4 GiB (as QEMU's
    /// `-drive if=pflash`), instead of a ROM.
    #[arg(long, value_name = "FILE", conflicts_with = "bios")]
    pflash: Option<std::path::PathBuf>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    smp: u16,
    /// Guest RAM: a number of bytes, or with a suffix K, M, G (MiB without one
    /// below 64 Ki, as QEMU's `-m`).
    #[arg(short = 'm', long = "memory", value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,
    /// A Multiboot kernel to boot (as QEMU's `-kernel`).
    #[arg(long, value_name = "FILE")]
    kernel: Option<std::path::PathBuf>,
    /// The kernel's command line (after its path, as QEMU's `-append`).
    #[arg(long, value_name = "CMDLINE", requires = "kernel", default_value = "")]
    append: String,
    /// Devices (repeatable): edu (PCI, slots from 00:02.0 in order),
    /// framebuffer, virtio-doorbell, pflash (fixed addresses); without any,
    /// all four, the devices the embedded firmware reports on.
    #[arg(long = "device", value_name = "MODEL")]
    devices: Vec<PciModel>,
}

/// `-m`'s sizes: `256`, `256M`, `1G`, `65536K`; a bare number is MiB as
/// in QEMU.
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "M"),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("unknown size unit in {s:?}")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("size {s:?} too large"))
}

impl Default for BoardArgs {
    /// What `topos run` without options builds.
    fn default() -> BoardArgs {
        BoardArgs {
            bios: None,
            pflash: None,
            smp: 1,
            memory: None,
            kernel: None,
            append: String::new(),
            devices: Vec::new(),
        }
    }
}

impl BoardArgs {
    fn config(&self, serial: SerialSink) -> Result<PcConfig, String> {
        let bios = match self.bios.as_ref().or(self.pflash.as_ref()) {
            Some(path) => std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?,
            None => topos_vcpu::firmware::bios_image().map_err(|e| format!("the embedded firmware: {e}"))?,
        };
        let devices = if self.devices.is_empty() {
            vec![PciModel::Edu, PciModel::Framebuffer, PciModel::VirtioDoorbell, PciModel::Pflash]
        } else {
            self.devices.clone()
        };
        let kernel = match &self.kernel {
            Some(path) => Some(Kernel {
                image: std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?,
                path: path.display().to_string(),
                append: self.append.clone(),
            }),
            None => None,
        };
        Ok(PcConfig {
            ram_size: self.memory.unwrap_or(DEFAULT_RAM_SIZE),
            cpus: self.smp,
            bios,
            bios_in_flash: self.pflash.is_some(),
            devices,
            serial,
            kernel,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Boot the `pc` board: the UART is on stdout, the exit status is the
    /// guest's (`isa-debug-exit`), 0 on a clean halt, non-zero with a reason
    /// on stderr otherwise.
    Run {
        #[command(flatten)]
        board: BoardArgs,
        /// The accelerator: auto, kvm, interp.
        #[arg(long, default_value = "auto")]
        accel: Accel,
        /// Log every exit, memslot change and device event on stderr (or set
        /// RUST_LOG, e.g. `topos_vcpu=debug`).
        #[arg(long)]
        trace: bool,
    },
    /// Concurrent map/unmap stress: reader threads access RAM and MMIO while
    /// a writer maps, unmaps, moves and overlays regions; reads are checked
    /// against the committed topologies (sampled in batches, memory bounded).
    Stress {
        /// Reader threads (default: the number of cores).
        #[arg(long)]
        readers: Option<usize>,
        /// Run for this many seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Stop after this many commits instead.
        #[arg(long)]
        commits: Option<u64>,
        /// BAR slots in the window.
        #[arg(long, default_value_t = 64)]
        slots: u64,
        /// Devices that get mapped.
        #[arg(long, default_value_t = 48)]
        devices: u64,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Write the embedded firmware image to a file (to boot it elsewhere,
    /// e.g. `qemu-system-x86_64 -bios FILE`).
    Firmware {
        /// Where to write it.
        #[arg(short, long, value_name = "FILE")]
        output: std::path::PathBuf,
    },
    /// Build the board `run` would build and print its memory map like
    /// QEMU's `info mtree`.
    Mtree {
        #[command(flatten)]
        board: BoardArgs,
        /// Print the flat views instead of the region trees (`-f`).
        #[arg(short = 'f', long)]
        flatview: bool,
        /// Also print disabled regions (`-D`).
        #[arg(short = 'D', long)]
        disabled: bool,
    },
}

fn mtree(args: &BoardArgs, flatview: bool, disabled: bool) -> Result<String, String> {
    let topo = Topology::new();
    let spaces = topo.standard_spaces().map_err(|e| e.to_string())?;
    let wiring = BoardWiring {
        interrupts: Arc::new(NoInterrupts),
        irqchip: None,
        exit: Box::new(|_status: i32| {}),
        memory_map: Default::default(),
    };
    let board = PcBoard::build(&topo, &spaces, args.config(SerialSink::Null)?, wiring).map_err(|e| e.to_string())?;
    board.topo.mtree(MtreeOptions { flatview, disabled }).map_err(|e| e.to_string())
}

fn run(args: &BoardArgs, accel: Accel, trace: bool) -> ExitCode {
    let filter = if trace {
        tracing_subscriber::EnvFilter::new("topos_vcpu=trace,topos_devices=debug,topos_runtime=debug")
    } else {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = args.config(SerialSink::Stdout).and_then(|c| Machine::new(c, accel).map_err(|e| e.to_string()));
    let machine = match result {
        Ok(m) => m,
        Err(e) => {
            eprintln!("topos: {e}");
            return ExitCode::FAILURE;
        }
    };
    match machine.run() {
        Ok(reason) => {
            let status = reason.exit_status();
            if status != 0 && !matches!(reason, topos_vcpu::vm::StopReason::DebugExit(_)) {
                eprintln!("topos: {}", reason.describe());
            }
            // The vCPU threads are joined and the UART's output flushed byte
            // by byte; tearing the VM down slot by slot would only delay the
            // exit (KVM frees the VM with the process).
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(i32::from(status as u8));
        }
        Err(e) => {
            eprintln!("topos: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `topos` alone boots the embedded firmware, as `topos run` does.
    let command = cli.command.unwrap_or(Command::Run { board: BoardArgs::default(), accel: Accel::Auto, trace: false });
    match command {
        Command::Stress { readers, seconds, commits, slots, devices, seed } => {
            let cfg = StressConfig {
                readers: readers.unwrap_or(StressConfig::default().readers),
                duration: if commits.is_some() { None } else { Some(Duration::from_secs(seconds)) },
                commits,
                slots,
                devices,
                seed,
                progress: true,
            };
            println!("stress: {} readers, {} slots, {} devices", cfg.readers, cfg.slots, cfg.devices);
            match stress::run(&cfg) {
                Ok(r) => {
                    print!("{}", r.table());
                    if r.inconsistencies() == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("topos: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Mtree { board, flatview, disabled } => match mtree(&board, flatview, disabled) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("topos: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { board, accel, trace } => run(&board, accel, trace),
        Command::Firmware { output } => {
            let written = topos_vcpu::firmware::bios_image()
                .map_err(|e| e.to_string())
                .and_then(|image| std::fs::write(&output, image).map_err(|e| format!("{}: {e}", output.display())));
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("topos: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
