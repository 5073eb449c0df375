//! The memory map of QEMU's `pc` machine (i440FX), as topos builds it:
//!
//! * `pc.ram`, shown through `ram-below-4g` at 0 and, beyond what fits
//!   below the PCI hole, `ram-above-4g` at 4 GiB. As QEMU's `pc` does, RAM
//!   of 3.5 GiB or more keeps only 3 GiB below 4 GiB (the hole starts on a
//!   gigabyte boundary).
//! * `pci`, a 2^64-byte container at priority -1 under everything: what
//!   PCI memory BARs and the BIOS live in, and what every unclaimed address
//!   reads (nothing: 0 on reads, writes dropped).
//! * `pc.bios`, the firmware image as ROM (or the flash holding it, with
//!   `--pflash`), ending at 4 GiB inside `pci`,
//!   and `isa-bios`, an alias of its last `min(size, 128 KiB)` ending at
//!   1 MiB (priority 1 in `pci`).
//! * The legacy holes below 1 MiB as QEMU leaves them after reset: the VGA
//!   window `0xa0000..0xc0000` (`smram-region`) and the expansion/BIOS area
//!   `0xc0000..0x100000` (`pam-pci`, the i440FX's PAM registers in their
//!   reset state) are aliases of `pci` at priority 1 over RAM, so the BIOS
//!   alias shows there and ROM writes are dropped.

use topos_runtime::{MemoryRegion, Result, StandardSpaces, Topology, SIZE_MAX};

/// topos's default RAM size (`-m` not given; QEMU's `pc` defaults to
/// 128 MiB).
pub const DEFAULT_RAM_SIZE: u64 = 256 << 20;
/// RAM at or beyond this size is split at [`LOW_RAM_SPLIT`].
pub const LOW_RAM_LIMIT: u64 = 0xe000_0000;
/// Where RAM stops below 4 GiB when it is split.
pub const LOW_RAM_SPLIT: u64 = 0xc000_0000;
/// Largest BIOS alias below 1 MiB.
pub const ISA_BIOS_MAX: u64 = 128 << 10;

/// The regions of the map the board keeps handles to.
#[derive(Debug, Clone)]
pub struct MemoryMap {
    /// All guest RAM.
    pub ram: MemoryRegion,
    /// RAM below 4 GiB (bytes).
    pub below_4g: u64,
    /// RAM above 4 GiB (bytes).
    pub above_4g: u64,
    /// The PCI memory container.
    pub pci: MemoryRegion,
    /// The firmware ROM.
    pub bios: MemoryRegion,
}

/// How `ram_size` bytes of RAM split around the PCI hole: (below, above).
pub fn split_ram(ram_size: u64) -> (u64, u64) {
    if ram_size >= LOW_RAM_LIMIT {
        (LOW_RAM_SPLIT, ram_size - LOW_RAM_SPLIT)
    } else {
        (ram_size, 0)
    }
}

/// Builds the map (in one transaction) with `bios` as the firmware image:
/// in a ROM, or, if `flash` is given (a flash device already holding it),
/// in that flash.
pub fn build(
    topo: &Topology,
    spaces: &StandardSpaces,
    ram_size: u64,
    bios: &[u8],
    flash: Option<MemoryRegion>,
) -> Result<MemoryMap> {
    let (below_4g, above_4g) = split_ram(ram_size);
    let ram = topo.new_ram("pc.ram", u128::from(ram_size))?;
    let bios_size = bios.len() as u64;
    let rom = match flash {
        Some(f) => f,
        None => {
            let rom = topo.new_rom("pc.bios", u128::from(bios_size))?;
            rom.ram()?.write(0, bios)?;
            rom
        }
    };
    let pci = topo.new_container("pci", SIZE_MAX)?;
    topo.transaction(|| -> Result<()> {
        let low = topo.new_alias("ram-below-4g", &ram, 0, u128::from(below_4g))?;
        spaces.system.add_subregion(0, &low)?;
        if above_4g > 0 {
            let high = topo.new_alias("ram-above-4g", &ram, below_4g, u128::from(above_4g))?;
            spaces.system.add_subregion(1 << 32, &high)?;
        }
        spaces.system.add_subregion_overlap(0, &pci, -1)?;
        pci.add_subregion((1 << 32) - bios_size, &rom)?;
        let isa_size = bios_size.min(ISA_BIOS_MAX);
        let isa_bios = topo.new_alias("isa-bios", &rom, bios_size - isa_size, u128::from(isa_size))?;
        pci.add_subregion_overlap(0x10_0000 - isa_size, &isa_bios, 1)?;
        let smram = topo.new_alias("smram-region", &pci, 0xa0000, 0x20000)?;
        spaces.system.add_subregion_overlap(0xa0000, &smram, 1)?;
        // The PAM windows: 16 KiB each up to 0xf0000, then one of 64 KiB.
        let mut at = 0xc0000u64;
        while at < 0x10_0000 {
            let size = if at < 0xf0000 { 0x4000 } else { 0x10000 };
            let pam = topo.new_alias("pam-pci", &pci, at, size)?;
            spaces.system.add_subregion_overlap(at, &pam, 1)?;
            at += size as u64;
        }
        Ok(())
    })??;
    Ok(MemoryMap { ram, below_4g, above_4g, pci, bios: rom })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_like_qemus_pc() {
        assert_eq!(split_ram(256 << 20), (256 << 20, 0));
        assert_eq!(split_ram(LOW_RAM_LIMIT - 1), (LOW_RAM_LIMIT - 1, 0));
        assert_eq!(split_ram(LOW_RAM_LIMIT), (LOW_RAM_SPLIT, LOW_RAM_LIMIT - LOW_RAM_SPLIT));
        assert_eq!(split_ram(8 << 30), (LOW_RAM_SPLIT, (8 << 30) - LOW_RAM_SPLIT));
    }

    #[test]
    fn the_bios_shows_at_4g_and_below_1m_and_rom_writes_are_dropped() {
        let topo = Topology::new();
        let spaces = topo.standard_spaces().unwrap();
        let mut image = vec![0u8; 256 << 10];
        image[(256 << 10) - 16] = 0xea;
        image[(256 << 10) - (128 << 10)] = 0x5a;
        let map = build(&topo, &spaces, 64 << 20, &image, None).unwrap();
        let mem = &spaces.memory;
        assert_eq!(mem.read_u64(0xffff_fff0, 1).0, 0xea);
        assert_eq!(mem.read_u64(0xffff0, 1).0, 0xea, "the reset vector's low alias");
        assert_eq!(mem.read_u64(0xe0000, 1).0, 0x5a, "the alias holds the last 128 KiB");
        assert!(!mem.write(0xffff0, &[0]).is_ok());
        assert_eq!(mem.read_u64(0xffff0, 1).0, 0xea);
        // RAM around the holes; the VGA window and the PCI hole read 0.
        assert!(mem.write(0x9f000, &[7]).is_ok());
        assert_eq!(mem.read_u64(0x9f000, 1).0, 7);
        assert_eq!(mem.read_u64(0xa0000, 4).0, 0);
        assert_eq!(mem.read_u64(0xd000_0000, 4).0, 0);
        assert_eq!((map.below_4g, map.above_4g), (64 << 20, 0));
    }
}
