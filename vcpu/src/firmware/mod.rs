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
//! The report, in order (one file per part):
//!
//! 1. the banner (`image`, `console`);
//! 2. `fw_cfg`: the "QEMU" signature, the CPU count and the RAM size;
//! 3. `smp`: local APIC on, INIT-SIPI-SIPI to all but self, the APs come up
//!    through a trampoline copied to `0x8000` and check in with their APIC
//!    IDs;
//! 4. `counters`: every CPU bumps a `lock xadd` counter and an
//!    `xchg`-spinlock-protected counter [`COUNTER_ITERATIONS`] times;
//! 5. `pci`: bus 0 through `0xcf8`/`0xcfc`; `edu`: BAR0 sized and mapped,
//!    ident, liveness, factorial, DMA round trip;
//! 6. `remap`: the BSP moves edu's BAR0 [`REMAP_MOVES`] times (half of them
//!    with memory decoding toggled) while the APs read it;
//! 7. topos's fixed-address devices, each skipped where nothing answers at
//!    its address (as on QEMU's `pc`): `pflash`, the CFI query of the
//!    `--device pflash` flash; `framebuffer`, a mode set and scanlines drawn
//!    in video RAM (which ones are dirty is checked by the host); and
//!    `virtio_doorbell`, a virtio-mmio driver handshake and a QueueNotify
//!    whose effect the device shows after its ioeventfd fired;
//! 8. `rom`: the reset vector through both mappings, writes dropped;
//! 9. `exit`: `result: pass` or `result: fail` and the debug-exit write.
//!
//! A missing device is reported as `skip: <what> (not present)` and the
//! run goes on. Each failed check prints a line saying so and makes the
//! result `fail`.
//!
//! Nothing the CPU writes implicitly lives in ROM (a software hypervisor
//! may spin on such a write): the GDT is in RAM and its Accessed bits are
//! preset, no IDT or TSS is loaded, and stacks are in RAM. Waits are bounded
//! by the local APIC timer, with an iteration cap behind it.
//!
//! The layout of the image and of the RAM it uses is in [`layout`]; the
//! transcript it prints is in [`transcript`].
//!
//! The same routines (COM1 output, fw_cfg, the verdict) also make a
//! Multiboot test kernel, [`multiboot_kernel()`], for testing multiboot
//! loaders; it is described in [`multiboot_kernel`](mod@multiboot_kernel).

mod asm;
mod console;
mod counters;
mod edu;
mod error;
mod exit;
pub mod framebuffer;
mod fw_cfg;
mod image;
pub mod layout;
pub mod multiboot_kernel;
mod pci;
mod pflash;
mod real_mode;
mod remap;
mod rom;
mod smp;
mod timer;
pub mod transcript;
mod virtio_doorbell;

pub use counters::ITERATIONS as COUNTER_ITERATIONS;
pub use error::{FirmwareError, Result};
pub use exit::{EXIT_FAIL, EXIT_PASS, QEMU_STATUS_FAIL, QEMU_STATUS_PASS};
pub use layout::IMAGE_SIZE;
pub use multiboot_kernel::KernelFormat;
pub use remap::{MOVES as REMAP_MOVES, UNASSIGNED};
pub use transcript::{expected_lines, ExpectedLine, Machine, PciFunction};

/// Assembles the firmware image ([`IMAGE_SIZE`] bytes).
pub fn bios_image() -> Result<Vec<u8>> {
    image::build()
}

/// Assembles the multiboot test kernel in `format` (see
/// [`multiboot_kernel`](mod@multiboot_kernel)).
pub fn multiboot_kernel(format: KernelFormat) -> Result<Vec<u8>> {
    multiboot_kernel::build(format)
}
