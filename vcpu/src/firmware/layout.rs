//! Where everything lives: the slots of the ROM image, the fixed RAM
//! addresses the firmware uses, and the addresses of the devices it drives.
//!
//! The image is mapped twice, as on QEMU's `pc` machine with `-bios`:
//!
//! | image offset | at 4 GiB − 128 KiB | low alias | what |
//! | --- | --- | --- | --- |
//! | `0x00000` | `0xfffe_0000` | `0xe_0000` | AP trampoline (copied to RAM before use) |
//! | `0x00100` | `0xfffe_0100` | `0xe_0100` | data pool: strings and tables |
//! | `0x10000` | `0xffff_0000` | `0xf_0000` | real-mode entry, run as `f000:0000` |
//! | `0x11000` | `0xffff_1000` | `0xf_1000` | 32-bit code, linked at its high address |
//! | `0x1ff00` | `0xffff_ff00` | `0xf_ff00` | ROM marker dword (the ROM checks write to it) |
//! | `0x1fff0` | `0xffff_fff0` | `0xf_fff0` | reset vector: a far jump to `f000:0000` |
//!
//! RAM use stays below 1 MiB and clear of the two aliases:
//!
//! | address | what |
//! | --- | --- |
//! | `0x04f0` | GDTR pseudo-descriptor |
//! | `0x0500` | the GDT, written here so the CPU never sets an Accessed bit in ROM |
//! | `0x0600` | shared variables ([`var`]) and the AP APIC-ID table |
//! | `0x7000` | top of the BSP stack |
//! | `0x8000` | AP trampoline (SIPI vector 8) |
//! | `0x1_0000` | AP stacks, 1 KiB each |
//! | `0x3_0000` | DMA source buffer; `0x3_1000`: DMA destination buffer |
//! | `0x3_2000` | the virtio doorbell's queue areas (descriptors, driver, device) |

/// Size of the firmware image.
pub const IMAGE_SIZE: usize = 128 << 10;
/// Where the image starts in the top mapping (it ends at 4 GiB).
pub const ROM_BASE: u32 = 0xfffe_0000;
/// Where the image starts in the low (ISA BIOS) alias.
pub const ROM_LOW_BASE: u32 = 0x000e_0000;

/// Image offset of the AP trampoline slot.
pub const TRAMPOLINE_OFFSET: usize = 0;
/// Size of the AP trampoline slot (the whole slot is copied to RAM).
pub const TRAMPOLINE_MAX: usize = 0x100;
/// Image offset of the data pool.
pub const POOL_OFFSET: usize = 0x100;
/// End of the data pool.
pub const POOL_END: usize = 0x1_0000;
/// Image offset of the real-mode entry (`f000:0000`).
pub const REAL_MODE_OFFSET: usize = 0x1_0000;
/// Real-mode segment the reset vector jumps to.
pub const REAL_MODE_SEGMENT: u16 = 0xf000;
/// End of the real-mode slot.
pub const REAL_MODE_END: usize = 0x1_1000;
/// Image offset of the 32-bit code.
pub const PM_OFFSET: usize = 0x1_1000;
/// End of the 32-bit code slot.
pub const PM_END: usize = 0x1_ff00;
/// Image offset of the ROM marker dword.
pub const ROM_MARKER_OFFSET: usize = 0x1_ff00;
/// The value of the ROM marker dword.
pub const ROM_MARKER: u32 = 0x5a3c_a5c3;
/// Image offset of the reset vector.
pub const RESET_VECTOR_OFFSET: usize = 0x1_fff0;

/// The address at which an image offset appears in the top mapping.
pub const fn rom_addr(offset: usize) -> u32 {
    ROM_BASE + offset as u32
}

/// The address at which an image offset appears in the low alias.
pub const fn rom_low_addr(offset: usize) -> u32 {
    ROM_LOW_BASE + offset as u32
}

/// Flat 32-bit code segment selector.
pub const CODE32: u16 = 0x08;
/// Flat 32-bit data segment selector.
pub const DATA32: u16 = 0x10;
/// The GDT: null, flat code, flat data. The Accessed bits (type 0xb, 0x3)
/// are set already, so loading a selector never makes the CPU write the
/// descriptor, wherever the table is.
pub const GDT_ENTRIES: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
/// RAM address of the GDTR pseudo-descriptor (limit:16, base:32).
pub const GDTR: u32 = 0x04f0;
/// RAM address of the GDT.
pub const GDT: u32 = 0x0500;

/// Shared variables in RAM, one dword each, cleared by the BSP first thing
/// in protected mode.
pub mod var {
    /// Start of the variable area.
    pub const START: u32 = 0x0600;
    /// Tickets handed to APs as they arrive (the index of their stack and
    /// APIC-ID slot).
    pub const AP_TICKET: u32 = 0x0600;
    /// APs that have checked in.
    pub const AP_COUNT: u32 = 0x0604;
    /// Phase the BSP releases the APs into: 1 counters, 2 remap readers,
    /// 3 park.
    pub const PHASE: u32 = 0x0608;
    /// The `lock xadd` counter.
    pub const XADD_COUNTER: u32 = 0x060c;
    /// The spinlock (0 free, 1 held).
    pub const SPIN_LOCK: u32 = 0x0610;
    /// The counter the spinlock protects.
    pub const SPIN_COUNTER: u32 = 0x0614;
    /// CPUs that finished the counter work.
    pub const WORK_DONE: u32 = 0x0618;
    /// APs that entered the remap read loop.
    pub const READERS: u32 = 0x061c;
    /// APs that left phase 2.
    pub const READERS_DONE: u32 = 0x0620;
    /// AP reads of the edu BARs that returned the ident value.
    pub const READ_IDENT: u32 = 0x0624;
    /// AP reads that returned the unassigned value.
    pub const READ_UNASSIGNED: u32 = 0x0628;
    /// AP reads that returned anything else.
    pub const READ_OTHER: u32 = 0x062c;
    /// Failed checks so far.
    pub const FAILURES: u32 = 0x0630;
    /// CPU count from fw_cfg (0: unknown).
    pub const NCPUS: u32 = 0x0634;
    /// CPUs up (BSP + APs checked in) when the BSP stopped waiting.
    pub const CPUS_UP: u32 = 0x0638;
    /// PCI config address (enable bit, device, function) of edu; 0 if none.
    pub const EDU_CFG: u32 = 0x063c;
    /// 1 when edu's BAR0 is programmed and the remap phase runs.
    pub const REMAP_ACTIVE: u32 = 0x0640;
    /// BSP reads during the remap phase that did not match the mapping.
    pub const REMAP_BAD: u32 = 0x0644;
    /// The BSP's APIC ID.
    pub const BSP_APIC_ID: u32 = 0x0648;
    /// APIC IDs of the APs, indexed by ticket ([`super::MAX_APS`] dwords,
    /// 0xffff_ffff when empty).
    pub const AP_IDS: u32 = 0x0700;
    /// End of the variable area.
    pub const END: u32 = 0x0800;
}

/// Top of the BSP stack.
pub const BSP_STACK_TOP: u32 = 0x7000;
/// RAM address of the AP trampoline.
pub const TRAMPOLINE: u32 = 0x8000;
/// SIPI vector: the page number of [`TRAMPOLINE`].
pub const SIPI_VECTOR: u32 = TRAMPOLINE >> 12;
/// Base of the AP stacks.
pub const AP_STACKS: u32 = 0x1_0000;
/// Size of one AP stack.
pub const AP_STACK_SIZE: u32 = 0x400;
/// log2 of [`AP_STACK_SIZE`].
pub const AP_STACK_SHIFT: u32 = 10;
/// APs beyond this many park without checking in.
pub const MAX_APS: u32 = 64;
/// DMA source buffer (RAM).
pub const DMA_SRC: u32 = 0x3_0000;
/// DMA destination buffer (RAM).
pub const DMA_DST: u32 = 0x3_1000;
/// Bytes moved each way by the edu DMA test.
pub const DMA_LEN: u32 = 256;

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// `isa-debug-exit` port.
pub const DEBUG_EXIT: u16 = 0xf4;
/// fw_cfg selector port (16-bit).
pub const FW_CFG_SELECTOR: u16 = 0x510;
/// fw_cfg data port (8-bit).
pub const FW_CFG_DATA: u16 = 0x511;
/// PCI configuration address port.
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
/// PCI configuration data port.
pub const PCI_CONFIG_DATA: u16 = 0xcfc;
/// Local APIC base.
pub const LAPIC: u32 = 0xfee0_0000;
/// Where edu's BAR0 is programmed first (1 MiB, in the PCI hole).
pub const EDU_BAR_A: u32 = 0xfeb0_0000;
/// The other address the remap phase moves edu's BAR0 to.
pub const EDU_BAR_B: u32 = 0xfea0_0000;
/// The virtio doorbell's descriptor area (RAM; the device never reads it).
pub const VIRTQ_DESC: u32 = 0x3_2000;
/// The virtio doorbell's driver (available) area.
pub const VIRTQ_DRIVER: u32 = 0x3_3000;
/// The virtio doorbell's device (used) area.
pub const VIRTQ_DEVICE: u32 = 0x3_4000;

/// Where topos's board puts the `--device pflash` CFI flash (1 MiB ending
/// at [`PFLASH_DEVICE_END`](crate::board::PFLASH_DEVICE_END)). Nothing
/// decodes it on QEMU's `pc`.
pub const PFLASH: u32 = (crate::board::PFLASH_DEVICE_END
    - crate::board::PFLASH_DEVICE_BLOCKS as u64 * crate::board::PFLASH_DEVICE_BLOCK_SIZE)
    as u32;
/// The framebuffer's video RAM on topos's board.
pub const FRAMEBUFFER_VRAM: u32 = crate::board::FRAMEBUFFER_VRAM_BASE as u32;
/// The framebuffer's registers on topos's board.
pub const FRAMEBUFFER_REGS: u32 = crate::board::FRAMEBUFFER_REGS_BASE as u32;
/// The virtio-mmio doorbell's registers on topos's board.
pub const VIRTIO_DOORBELL: u32 = crate::board::VIRTIO_DOORBELL_BASE as u32;
