//! QEMU's old-style device tables (`old_portio`, `old_mmio`) as
//! [`MemoryRegionOps`], for device models ported from them.

use crate::ops::{mask_of, ImplConstraints, MemoryRegionOps, OpsConfig, ValidConstraints};
use crate::sync::Arc;
use crate::types::HwAddr;

/// A read handler of an old-style table ([`PortioTable`], [`MmioTable`]).
pub type OldRead = Arc<dyn Fn(HwAddr) -> u64 + Send + Sync>;
/// A write handler of an old-style table.
pub type OldWrite = Arc<dyn Fn(HwAddr, u64) + Send + Sync>;

/// One entry of an old-style port I/O table (QEMU's `MemoryRegionPortio`):
/// `len` ports from `offset`, accessed with width `size`.
#[derive(Clone)]
pub struct PortioEntry {
    /// First port offset within the region.
    pub offset: u32,
    /// Number of ports covered.
    pub len: u32,
    /// Access width in bytes (1, 2 or 4).
    pub size: u32,
    /// Read handler, called with the absolute region offset.
    pub read: Option<OldRead>,
    /// Write handler.
    pub write: Option<OldWrite>,
}

/// Adapter from an old-style port table (`old_portio`) to [`MemoryRegionOps`].
///
/// As QEMU does: an access is served by the entry that covers its offset with
/// its width; a 2-byte access with no entry becomes two 1-byte accesses; an
/// unmatched read returns all-ones of the width and an unmatched write is
/// dropped.
#[derive(Clone)]
pub struct PortioTable {
    entries: Vec<PortioEntry>,
}

impl PortioTable {
    /// A table from its entries (QEMU's list up to `PORTIO_END_OF_LIST`).
    pub fn new(entries: Vec<PortioEntry>) -> Self {
        PortioTable { entries }
    }

    /// The ops configuration that goes with the table: 1–4 byte accesses,
    /// implemented at the size the guest uses.
    pub fn config() -> OpsConfig {
        OpsConfig {
            valid: ValidConstraints { min_access_size: 1, max_access_size: 4, unaligned: true },
            impl_: ImplConstraints { min_access_size: 1, max_access_size: 4, unaligned: true },
            ..Default::default()
        }
    }

    fn find(&self, addr: HwAddr, size: u32, write: bool) -> Option<&PortioEntry> {
        self.entries.iter().find(|e| {
            e.size == size
                && addr >= e.offset as u64
                && addr < e.offset as u64 + e.len as u64
                && if write { e.write.is_some() } else { e.read.is_some() }
        })
    }
}

impl MemoryRegionOps for PortioTable {
    fn read(&self, addr: HwAddr, size: u32) -> u64 {
        if let Some(read) = self.find(addr, size, false).and_then(|e| e.read.as_ref()) {
            return read(addr) & mask_of(size);
        }
        if size == 2 {
            return (self.read(addr, 1) & 0xff) | ((self.read(addr + 1, 1) & 0xff) << 8);
        }
        mask_of(size)
    }

    fn write(&self, addr: HwAddr, value: u64, size: u32) {
        if let Some(write) = self.find(addr, size, true).and_then(|e| e.write.as_ref()) {
            write(addr, value & mask_of(size));
        } else if size == 2 {
            self.write(addr, value & 0xff, 1);
            self.write(addr + 1, (value >> 8) & 0xff, 1);
        }
    }
}

/// Adapter from an old-style MMIO table (`old_mmio`: one handler per width,
/// index 0 = byte, 1 = word, 2 = long) to [`MemoryRegionOps`]. Accesses are
/// split to the implemented widths like any other ops (QEMU 1.6+). A missing
/// handler reads 0 and drops writes.
#[derive(Clone, Default)]
pub struct MmioTable {
    /// Read handlers by width index.
    pub read: [Option<OldRead>; 3],
    /// Write handlers by width index.
    pub write: [Option<OldWrite>; 3],
}

fn width_index(size: u32) -> usize {
    match size {
        1 => 0,
        2 => 1,
        _ => 2,
    }
}

impl MemoryRegionOps for MmioTable {
    fn read(&self, addr: HwAddr, size: u32) -> u64 {
        self.read[width_index(size)].as_ref().map_or(0, |f| f(addr) & mask_of(size))
    }
    fn write(&self, addr: HwAddr, value: u64, size: u32) {
        if let Some(f) = &self.write[width_index(size)] {
            f(addr, value & mask_of(size));
        }
    }
}
