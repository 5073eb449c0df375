//! The `topos` command.

use std::time::Duration;
use topos_vcpu::board;
use topos_vcpu::stress::{self, StressConfig};

use clap::{Parser, Subcommand};
use topos_runtime::MtreeOptions;

/// topos: an emulator runtime built around QEMU's memory API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Build the default board's memory map and print it like QEMU's
    /// `info mtree`.
    Mtree {
        /// Print the flat views instead of the region trees (`-f`).
        #[arg(short = 'f', long)]
        flatview: bool,
        /// Also print disabled regions (`-D`).
        #[arg(short = 'D', long)]
        disabled: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
                        std::process::ExitCode::SUCCESS
                    } else {
                        std::process::ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("topos: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Mtree { flatview, disabled } => {
            match board::Board::new().and_then(|b| b.topo.mtree(MtreeOptions { flatview, disabled })) {
                Ok(text) => {
                    print!("{text}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("topos: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
