//! Device callbacks (`MemoryRegionOps`) and the rules that legalise an access
//! before it reaches them.
//!
//! The legalisation follows modern QEMU: the validity check of 5.1+
//! (`accepts`, alignment, `valid` sizes), then `access_with_adjusted_size`
//! (split to `impl.max`, round up to `impl.min` without aligning down,
//! big-endian aware placement), then the device's byte order. Accesses that
//! come from an address space were already cut to naturally aligned pieces
//! when `impl.unaligned` is false (see `AddressSpace::read`).

use crate::error::{Error, Result};
use crate::sync::Arc;
use crate::types::{Endianness, HwAddr, MemTxResult};

/// The callbacks of an I/O region, QEMU's `MemoryRegionOps` read/write/accepts.
///
/// `addr` is relative to the region; `size` is 1, 2, 4 or 8 bytes, already
/// legalised by the region's [`OpsConfig`]. Values are in the device's own
/// byte order ([`OpsConfig::endianness`]). Implementations are called from any
/// vCPU thread at once and must synchronise their own state (the device actor
/// harness in `topos-devices` does that for device models).
pub trait MemoryRegionOps: Send + Sync + 'static {
    /// A read of `size` bytes at `addr`.
    fn read(&self, addr: HwAddr, size: u32) -> u64;

    /// A write of the low `size` bytes of `value` at `addr`.
    fn write(&self, addr: HwAddr, value: u64, size: u32);

    /// Like [`read`](Self::read), but able to fail (modern QEMU's
    /// `read_with_attrs`). The default calls `read` and succeeds.
    fn read_with_result(&self, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        (self.read(addr, size), MemTxResult::Ok)
    }

    /// Like [`write`](Self::write), but able to fail. The default calls
    /// `write` and succeeds.
    fn write_with_result(&self, addr: HwAddr, value: u64, size: u32) -> MemTxResult {
        self.write(addr, value, size);
        MemTxResult::Ok
    }

    /// QEMU's `valid.accepts`: return false to refuse the access, which then
    /// reads 0 and returns [`MemTxResult::DecodeError`].
    fn accepts(&self, _addr: HwAddr, _size: u32, _is_write: bool) -> bool {
        true
    }
}

/// Guest-visible access constraints (`ops->valid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ValidConstraints {
    /// Smallest valid access size; 0 means 1.
    pub min_access_size: u32,
    /// Largest valid access size; 0 means "any size is valid" for the
    /// validity check and 4 for how address spaces cut accesses.
    pub max_access_size: u32,
    /// Unaligned accesses are valid.
    pub unaligned: bool,
}

/// Implementation constraints (`ops->impl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImplConstraints {
    /// Smallest size the callbacks implement (0 = 1); smaller accesses are
    /// rounded up.
    pub min_access_size: u32,
    /// Largest size the callbacks implement (0 = 4); larger accesses are split.
    pub max_access_size: u32,
    /// The callbacks handle unaligned accesses; otherwise accesses from an
    /// address space are cut into naturally aligned pieces first.
    pub unaligned: bool,
}

/// The static part of `MemoryRegionOps`: byte order and constraints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpsConfig {
    /// Byte order of the device's registers.
    pub endianness: Endianness,
    /// Guest-visible constraints.
    pub valid: ValidConstraints,
    /// Implementation constraints.
    pub impl_: ImplConstraints,
}

impl OpsConfig {
    /// Little-endian/native device with the given implemented size range.
    pub fn with_impl(min: u32, max: u32) -> Self {
        OpsConfig {
            impl_: ImplConstraints { min_access_size: min, max_access_size: max, unaligned: false },
            ..Default::default()
        }
    }

    /// Checks that sizes are 0 or powers of two up to 8 and that min ≤ max.
    pub fn validate(&self) -> Result<()> {
        fn ok(s: u32) -> bool {
            s == 0 || (s <= 8 && s.is_power_of_two())
        }
        let pairs = [
            ("valid", self.valid.min_access_size, self.valid.max_access_size),
            ("impl", self.impl_.min_access_size, self.impl_.max_access_size),
        ];
        for (what, min, max) in pairs {
            if !ok(min) || !ok(max) {
                return Err(Error::InvalidConstraints(format!(
                    "{what} sizes must be 0 or a power of two up to 8 (min {min}, max {max})"
                )));
            }
            if min != 0 && max != 0 && min > max {
                return Err(Error::InvalidConstraints(format!("{what}.min {min} > {what}.max {max}")));
            }
        }
        Ok(())
    }
}

/// The ops of a region together with their configuration.
#[derive(Clone)]
pub(crate) struct RegionOps {
    pub(crate) ops: Arc<dyn MemoryRegionOps>,
    pub(crate) config: OpsConfig,
}

pub(crate) fn mask_of(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// Reverses the low `size` bytes of `value` (QEMU's `adjust_endianness`
/// for a big-endian device on a little-endian target).
pub(crate) fn swap(value: u64, size: u32) -> u64 {
    match size {
        2 => (value as u16).swap_bytes() as u64,
        4 => (value as u32).swap_bytes() as u64,
        8 => value.swap_bytes(),
        _ => value,
    }
}

impl RegionOps {
    /// A value as the guest wrote it, in the device's byte order.
    pub(crate) fn to_device_order(&self, value: u64, size: u32) -> u64 {
        if self.config.endianness.is_big() {
            swap(value, size)
        } else {
            value
        }
    }

    /// The device's `accepts`, traced when it refuses.
    #[inline]
    pub(crate) fn accepts(&self, addr: HwAddr, size: u32, is_write: bool) -> bool {
        let ok = self.ops.accepts(addr, size, is_write);
        if !ok {
            tracing::debug!(addr, size, is_write, "invalid access: rejected");
        }
        ok
    }

    /// Whether a naturally aligned `size`-byte access (1, 2, 4 or 8) reaches
    /// the callbacks as it is: valid at that size (all but `accepts`, which
    /// depends on the address), one call of exactly that size, no byte swap.
    /// Such an access is [`access_valid`](Self::access_valid) iff `accepts`
    /// takes it, and [`dispatch_read`](Self::dispatch_read) /
    /// [`dispatch_write`](Self::dispatch_write) then make exactly one call of
    /// `size` bytes with the value masked to it.
    pub(crate) fn is_plain(&self, size: u32) -> bool {
        let v = &self.config.valid;
        let valid = v.max_access_size == 0 || (size <= v.max_access_size && size >= v.min_access_size);
        // The piece `memory_access_size` allows an aligned access.
        let piece_max = match v.max_access_size {
            0 => 4,
            m => m,
        };
        valid && size <= piece_max && self.adjusted_sizes(size).0 == size && !self.config.endianness.is_big()
    }

    /// `memory_region_access_valid` of QEMU 5.1+.
    #[inline]
    pub(crate) fn access_valid(&self, addr: HwAddr, size: u32, is_write: bool) -> bool {
        let v = &self.config.valid;
        // Callers pass 1, 2, 4 or 8 (`MemoryRegion::dispatch_*` refuse
        // anything else before getting here).
        debug_assert!(matches!(size, 1 | 2 | 4 | 8), "access size {size}");
        if !self.accepts(addr, size, is_write) {
            return false;
        }
        if !v.unaligned && addr & (size as u64 - 1) != 0 {
            tracing::debug!(addr, size, is_write, "invalid access: unaligned");
            return false;
        }
        if v.max_access_size == 0 {
            return true;
        }
        if size > v.max_access_size || size < v.min_access_size {
            tracing::debug!(addr, size, is_write, "invalid access: size");
            return false;
        }
        true
    }

    /// How wide a piece of an `l`-byte access at region offset `addr` may be
    /// (QEMU's `memory_access_size`).
    #[inline]
    pub(crate) fn access_size(&self, l: u64, addr: HwAddr) -> u32 {
        let mut max = match self.config.valid.max_access_size {
            0 => 4,
            m => m as u64,
        };
        if !self.config.impl_.unaligned {
            let align = addr & addr.wrapping_neg();
            if align != 0 && align < max {
                max = align;
            }
        }
        let l = l.min(max).max(1);
        // pow2floor
        (1u64 << (63 - l.leading_zeros())) as u32
    }

    fn adjusted_sizes(&self, size: u32) -> (u32, u64) {
        let imin = self.config.impl_.min_access_size.max(1);
        let imax = match self.config.impl_.max_access_size {
            0 => 4,
            m => m,
        };
        let access = size.min(imax).max(imin);
        (access, mask_of(access))
    }

    /// `memory_region_dispatch_read` minus the alias step: validity, split or
    /// round-up, then byte order. Returns the value in target (little-endian)
    /// register layout.
    pub(crate) fn dispatch_read(&self, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        if !self.access_valid(addr, size, false) {
            return (0, MemTxResult::DecodeError);
        }
        let (access, mask) = self.adjusted_sizes(size);
        let big = self.config.endianness.is_big();
        if access == size && !big {
            // The common case: one call of exactly the requested size.
            let (v, r) = self.ops.read_with_result(addr, size);
            return (v & mask, r);
        }
        let mut value = 0u64;
        let mut result = MemTxResult::Ok;
        let mut i = 0u32;
        while i < size {
            let (tmp, r) = self.ops.read_with_result(addr.wrapping_add(i as u64), access);
            result = result.combine(r);
            let shift: i64 = if big { (size as i64 - access as i64 - i as i64) * 8 } else { i as i64 * 8 };
            let piece = tmp & mask;
            value |= if shift >= 0 {
                piece.checked_shl(shift as u32).unwrap_or(0)
            } else {
                piece.checked_shr((-shift) as u32).unwrap_or(0)
            };
            i += access;
        }
        if big {
            value = swap(value, size);
        }
        (value, result)
    }

    /// `memory_region_dispatch_write` minus the alias and eventfd steps.
    /// `value` is in target (little-endian) register layout.
    pub(crate) fn dispatch_write(&self, addr: HwAddr, value: u64, size: u32) -> MemTxResult {
        if !self.access_valid(addr, size, true) {
            return MemTxResult::DecodeError;
        }
        let big = self.config.endianness.is_big();
        let value = if big { swap(value, size) } else { value };
        let (access, mask) = self.adjusted_sizes(size);
        if access == size && !big {
            return self.ops.write_with_result(addr, value & mask, size);
        }
        let mut result = MemTxResult::Ok;
        let mut i = 0u32;
        while i < size {
            let shift: i64 = if big { (size as i64 - access as i64 - i as i64) * 8 } else { i as i64 * 8 };
            let piece = if shift >= 0 {
                value.checked_shr(shift as u32).unwrap_or(0)
            } else {
                value.checked_shl((-shift) as u32).unwrap_or(0)
            } & mask;
            result = result.combine(self.ops.write_with_result(addr.wrapping_add(i as u64), piece, access));
            i += access;
        }
        result
    }
}

/// The ops of QEMU's `io` root region (`unassigned_io_ops`): reads return
/// all-ones, writes are ignored, and both succeed. Give it to the root of an
/// I/O-port address space so that unclaimed ports read all-ones.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnassignedIo;

impl MemoryRegionOps for UnassignedIo {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        u64::MAX
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {}
}
