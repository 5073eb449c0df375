//! Small value types shared by the whole API.

/// A guest physical address, or an offset within a region (QEMU's `hwaddr`).
pub type HwAddr = u64;

/// The largest region size: 2^64 bytes, the size of a full 64-bit address
/// space (QEMU's `UINT64_MAX` passed to `memory_region_init`).
pub const SIZE_MAX: u128 = 1u128 << 64;

/// Target page size used for dirty logging and `map`.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// The outcome of one guest access, QEMU's `MemTxResult`.
///
/// Several steps of one access combine to the most severe outcome.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum MemTxResult {
    /// The access completed.
    #[default]
    Ok,
    /// Nothing decodes the address, the region rejected the access
    /// (`valid` constraints), or a write hit ROM.
    DecodeError,
    /// The device refused the access (e.g. it failed).
    AccessError,
    /// The access reached a reservation region; QEMU documents an abort here,
    /// topos returns this instead.
    ReservationAccess,
}

impl MemTxResult {
    /// True for [`MemTxResult::Ok`].
    pub fn is_ok(self) -> bool {
        self == MemTxResult::Ok
    }

    /// Combines the results of two steps of one access.
    pub fn combine(self, other: MemTxResult) -> MemTxResult {
        self.max(other)
    }
}

/// A dirty-logging client (QEMU's `DIRTY_MEMORY_*`, modern numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DirtyClient {
    /// Display adapters (QEMU's `DIRTY_MEMORY_VGA`, 0).
    Vga = 0,
    /// Translated-code invalidation (`DIRTY_MEMORY_CODE`, 1).
    Code = 1,
    /// Live migration (`DIRTY_MEMORY_MIGRATION`, 2 in modern QEMU).
    Migration = 2,
}

impl DirtyClient {
    /// All clients, in index order.
    pub const ALL: [DirtyClient; 3] = [DirtyClient::Vga, DirtyClient::Code, DirtyClient::Migration];

    /// The client's bit in a dirty-log mask.
    pub const fn mask(self) -> u8 {
        1 << self as u8
    }
}

/// Byte order of a device's registers (QEMU's `enum device_endian`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Endianness {
    /// The target's order; x86 is little-endian.
    #[default]
    Native,
    /// Big-endian registers.
    Big,
    /// Little-endian registers.
    Little,
}

impl Endianness {
    /// True if values must be byte-swapped between the (little-endian)
    /// target and this device.
    pub(crate) fn is_big(self) -> bool {
        matches!(self, Endianness::Big)
    }
}
