//! The memory map of topos's `pc`-like board (the part that exists before
//! the vCPU and device work lands): RAM, the BIOS ROM at the top of 4 GiB
//! with its low alias, the PCI hole, and the I/O port space.

use std::sync::atomic::{AtomicU64, Ordering};
use topos_runtime::{MemoryRegion, MemoryRegionOps, OpsConfig, Result, StandardSpaces, Topology};

/// Guest RAM size of the default board.
pub const RAM_SIZE: u64 = 128 << 20;
/// Size of the BIOS ROM.
pub const BIOS_SIZE: u64 = 256 << 10;

/// A placeholder device that reads as a fixed value and counts writes;
/// device models replace it when they land.
pub struct Placeholder {
    value: u64,
    writes: AtomicU64,
}

impl Placeholder {
    /// A placeholder reading `value`.
    pub fn new(value: u64) -> Self {
        Placeholder { value, writes: AtomicU64::new(0) }
    }
}

impl MemoryRegionOps for Placeholder {
    fn read(&self, _addr: u64, _size: u32) -> u64 {
        self.value
    }
    fn write(&self, _addr: u64, _value: u64, _size: u32) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The board's memory map.
pub struct Board {
    /// The topology.
    pub topo: Topology,
    /// `system`, `io` and their address spaces.
    pub spaces: StandardSpaces,
    /// Guest RAM.
    pub ram: MemoryRegion,
    /// The BIOS ROM.
    pub bios: MemoryRegion,
    /// The PCI memory space (below RAM, priority -1).
    pub pci: MemoryRegion,
}

impl Board {
    /// Builds the default map in one transaction.
    pub fn new() -> Result<Board> {
        let topo = Topology::new();
        let spaces = topo.standard_spaces()?;
        let ram = topo.new_ram("pc.ram", RAM_SIZE as u128)?;
        let bios = topo.new_rom("pc.bios", BIOS_SIZE as u128)?;
        let pci = topo.new_container("pci", topos_runtime::SIZE_MAX)?;
        topo.transaction(|| -> Result<()> {
            let below = topo.new_alias("ram-below-4g", &ram, 0, RAM_SIZE as u128)?;
            spaces.system.add_subregion(0, &below)?;
            spaces.system.add_subregion_overlap(0, &pci, -1)?;
            pci.add_subregion(0x1_0000_0000 - BIOS_SIZE, &bios)?;
            let isa_bios = topo.new_alias("isa-bios", &bios, BIOS_SIZE - 0x20000, 0x20000)?;
            pci.add_subregion_overlap(0xe0000, &isa_bios, 1)?;
            let ioapic = topo.new_io("ioapic", Placeholder::new(0), OpsConfig::default(), 0x1000)?;
            spaces.system.add_subregion(0xfec0_0000, &ioapic)?;
            let serial = topo.new_io("serial", Placeholder::new(0x60), OpsConfig::with_impl(1, 1), 8)?;
            spaces.io.add_subregion(0x3f8, &serial)?;
            let exit = topo.new_io("isa-debug-exit", Placeholder::new(0), OpsConfig::default(), 4)?;
            spaces.io.add_subregion(0xf4, &exit)?;
            Ok(())
        })??;
        Ok(Board { topo, spaces, ram, bios, pci })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_board_map_serves_ram_bios_and_ports() {
        let b = Board::new().unwrap();
        let mem = &b.spaces.memory;
        assert!(mem.write(0x1000, &[1, 2, 3]).is_ok());
        let mut buf = [0u8; 3];
        b.ram.ram().unwrap().read(0x1000, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3]);

        b.bios.ram().unwrap().write(BIOS_SIZE - 16, &[0xea]).unwrap();
        let (v, r) = mem.read_u64(0xffff_fff0, 1);
        assert!(r.is_ok());
        assert_eq!(v, 0xea);
        // ROM: writes are dropped.
        assert!(!mem.write(0xffff_fff0, &[0]).is_ok());
        assert_eq!(mem.read_u64(0xffff_fff0, 1).0, 0xea);
        assert_eq!(b.bios.container().as_ref(), Some(&b.pci));

        // The serial placeholder answers; an unclaimed port reads all-ones.
        assert_eq!(b.spaces.io_space.read_u64(0x3fd, 1), (0x60, topos_runtime::MemTxResult::Ok));
        assert_eq!(b.spaces.io_space.read_u64(0x500, 2), (0xffff, topos_runtime::MemTxResult::Ok));
    }
}
