//! The `topos` command.

use topos_vcpu::board;

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
        Command::Mtree { flatview, disabled } => match board::Board::new() {
            Ok(b) => {
                print!("{}", b.topo.mtree(MtreeOptions { flatview, disabled }));
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("topos: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}
