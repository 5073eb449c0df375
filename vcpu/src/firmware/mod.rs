//! # The embedded firmware
//!
//! A 128 KiB BIOS image assembled at run time with iced-x86's `code_asm`
//! (no external toolchain). It boots on QEMU's `pc` machine exactly as
//! loaded by `-bios IMAGE` (mapped to end at 4 GiB, its last 128 KiB also at
//! `0xe0000`), and is meant to boot the same way on topos's `pc` board.
//! It prints a report on COM1 and ends with a write to `isa-debug-exit`
//! (see [`EXIT_PASS`] for the status mapping).
//!
//! The boot: the reset vector far-jumps to `f000:0000`; the real-mode entry
//! builds a flat GDT in RAM and enters 32-bit protected mode, where the rest
//! runs from ROM at its high address with data and stacks in low RAM.
//!
//! Nothing the CPU writes implicitly lives in ROM (a software hypervisor
//! may spin on such a write): the GDT is in RAM and its Accessed bits are
//! preset, no IDT or TSS is loaded, and stacks are in RAM. Waits are bounded
//! by the local APIC timer, with an iteration cap behind it.
//!
//! The layout of the image and of the RAM it uses is in [`layout`]; the
//! transcript it prints is in [`transcript`].

mod asm;
mod console;
mod counters;
mod edu;
mod error;
mod exit;
mod fw_cfg;
mod image;
pub mod layout;
mod pci;
mod real_mode;
mod remap;
mod rom;
mod smp;
mod timer;
pub mod transcript;

pub use error::{FirmwareError, Result};
pub use exit::{EXIT_FAIL, EXIT_PASS, QEMU_STATUS_FAIL, QEMU_STATUS_PASS};
pub use layout::IMAGE_SIZE;
pub use transcript::{expected_lines, ExpectedLine, Machine, PciFunction};

/// Assembles the firmware image ([`IMAGE_SIZE`] bytes).
pub fn bios_image() -> Result<Vec<u8>> {
    image::build()
}
