//! Baselines from the Rust VMM peers, measured in the same process as topos.
//!
//! Each baseline is written here from its project's published design, not
//! copied from its code:
//!
//! * [`ChBus`]: Cloud Hypervisor's bus. `RwLock<BTreeMap<range, Weak<dyn
//!   device>>>`; an access takes the read lock, finds the range below the
//!   address, upgrades the `Weak` and calls the device, which serialises
//!   itself through an internal `Mutex` (CH's `BusDeviceSync` for
//!   `Mutex<impl BusDevice>`).
//! * [`CrosvmBus`]: crosvm's bus. `Mutex<BTreeMap<range, Arc<Mutex<dyn
//!   device>>>>`; an access locks the map, clones the device's `Arc`, unlocks,
//!   then locks the device.
//! * rust-vmm `vm-device`'s [`IoManager`] with `Arc<Mutex<impl
//!   MutDeviceMmio>>` devices, as its documentation shows (helpers
//!   [`vmd_manager`], [`VmdDevice`]). The manager itself is not synchronised;
//!   under a concurrent writer it sits behind a `Mutex`, as rust-vmm's
//!   `vmm-reference` keeps it ([`VmdShared`]).
//! * rust-vmm `vm-memory`'s `GuestMemoryAtomic<GuestMemoryMmap>` for RAM
//!   ([`vm_memory`]).
//!
//! Every bus uses the same layout as the topos fixtures: range `i` covers
//! `[i * STRIDE, i * STRIDE + RANGE_LEN)`, and each device reads as the
//! constant [`DEV_VALUE`].
//!
//! This file is shared as a module by the other benches (`mod baselines;`).
//! Cargo also builds it as a bench of its own, whose `main` checks that every
//! baseline resolves and dispatches correctly.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use vm_device::bus::{MmioAddress, MmioAddressOffset, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vm_device::MutDeviceMmio;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Distance between the bases of consecutive ranges.
pub const STRIDE: u64 = 0x2000;
/// Length of each range (the rest of the stride is a hole).
pub const RANGE_LEN: u64 = 0x1000;
/// What every trivial device reads as.
pub const DEV_VALUE: u64 = 0x1234_5678;

/// Base of range `i`.
pub fn base_of(i: usize) -> u64 {
    i as u64 * STRIDE
}

/// A bus range, ordered by its base only (ranges never overlap), so a
/// `BTreeMap` finds the candidate for an address with `range(..=addr)`.
#[derive(Debug, Clone, Copy)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl BusRange {
    fn key(addr: u64) -> BusRange {
        BusRange { base: addr, len: 1 }
    }
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }
    fn overlaps(&self, base: u64, len: u64) -> bool {
        self.base < base.saturating_add(len) && base < self.base.saturating_add(self.len)
    }
}

impl PartialEq for BusRange {
    fn eq(&self, o: &Self) -> bool {
        self.base == o.base
    }
}
impl Eq for BusRange {}
impl PartialOrd for BusRange {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for BusRange {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.base.cmp(&o.base)
    }
}

/// Finds the entry of `map` whose range contains `addr`.
fn find<V>(map: &BTreeMap<BusRange, V>, addr: u64) -> Option<(&BusRange, &V)> {
    map.range(..=BusRange::key(addr)).next_back().filter(|(r, _)| r.contains(addr))
}

/// Whether `[base, base + len)` overlaps an entry of `map` (checks the two
/// neighbours only, since entries never overlap each other).
fn overlaps_any<V>(map: &BTreeMap<BusRange, V>, base: u64, len: u64) -> bool {
    let below = map.range(..=BusRange::key(base)).next_back();
    let above = map.range(BusRange::key(base)..).next();
    below.is_some_and(|(r, _)| r.overlaps(base, len)) || above.is_some_and(|(r, _)| r.overlaps(base, len))
}

/// Fills `data` with the little-endian bytes of `v`.
fn fill(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

// ----- Cloud Hypervisor ----------------------------------------------------

/// A device as CH's device models implement it (`&mut self`).
pub trait ChBusDevice: Send {
    /// A read of `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// A write.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// What CH's bus stores and calls: a `Send + Sync` device (`&self`).
pub trait ChBusDeviceSync: Send + Sync {
    /// A read.
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);
    /// A write.
    fn write(&self, base: u64, offset: u64, data: &[u8]);
}

/// CH's adapter: a `Mutex` around a `&mut self` device.
impl<T: ChBusDevice> ChBusDeviceSync for Mutex<T> {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        self.lock().expect("device lock").read(base, offset, data)
    }
    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        self.lock().expect("device lock").write(base, offset, data)
    }
}

/// The trivial device of every baseline: reads [`DEV_VALUE`], remembers the
/// last value written.
#[derive(Debug, Default)]
pub struct ConstDevice {
    last: u64,
}

impl ChBusDevice for ConstDevice {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        fill(data, DEV_VALUE);
    }
    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        self.last = u64::from_le_bytes(b);
    }
}

/// Cloud Hypervisor's bus design.
#[derive(Default)]
pub struct ChBus {
    devices: RwLock<BTreeMap<BusRange, Weak<dyn ChBusDeviceSync>>>,
}

impl ChBus {
    /// Maps `dev` at `[base, base + len)`; fails on overlap.
    pub fn insert(&self, dev: Arc<dyn ChBusDeviceSync>, base: u64, len: u64) -> Result<(), &'static str> {
        if len == 0 {
            return Err("zero-sized range");
        }
        let mut map = self.devices.write().expect("bus lock");
        if overlaps_any(&map, base, len) {
            return Err("overlap");
        }
        map.insert(BusRange { base, len }, Arc::downgrade(&dev));
        Ok(())
    }

    /// Unmaps the range that starts at `base`.
    pub fn remove(&self, base: u64) -> bool {
        self.devices.write().expect("bus lock").remove(&BusRange::key(base)).is_some()
    }

    /// CH's `resolve`: the range's base, the offset in it, and the device.
    #[inline]
    pub fn resolve(&self, addr: u64) -> Option<(u64, u64, Arc<dyn ChBusDeviceSync>)> {
        let map = self.devices.read().expect("bus lock");
        let (r, w) = find(&map, addr)?;
        w.upgrade().map(|d| (r.base, addr - r.base, d))
    }

    /// A read dispatched to the device at `addr`; false if none.
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((base, off, dev)) => {
                dev.read(base, off, data);
                true
            }
            None => false,
        }
    }

    /// A write dispatched to the device at `addr`; false if none.
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((base, off, dev)) => {
                dev.write(base, off, data);
                true
            }
            None => false,
        }
    }
}

/// A CH bus with `n` trivial devices; the devices must outlive the bus
/// entries (CH's device manager owns them), so they are returned too.
pub fn ch_bus(n: usize) -> (ChBus, Vec<Arc<dyn ChBusDeviceSync>>) {
    let bus = ChBus::default();
    let devs: Vec<Arc<dyn ChBusDeviceSync>> =
        (0..n).map(|_| Arc::new(Mutex::new(ConstDevice::default())) as Arc<dyn ChBusDeviceSync>).collect();
    for (i, d) in devs.iter().enumerate() {
        bus.insert(d.clone(), base_of(i), RANGE_LEN).expect("no overlap");
    }
    (bus, devs)
}

// ----- crosvm ----------------------------------------------------------------

/// A device as crosvm's device models implement it.
pub trait CrosvmDevice: Send {
    /// A read at `offset` within the device's range.
    fn read(&mut self, offset: u64, address: u64, data: &mut [u8]);
    /// A write.
    fn write(&mut self, offset: u64, address: u64, data: &[u8]);
}

impl CrosvmDevice for ConstDevice {
    fn read(&mut self, _offset: u64, _address: u64, data: &mut [u8]) {
        fill(data, DEV_VALUE);
    }
    fn write(&mut self, offset: u64, address: u64, data: &[u8]) {
        ChBusDevice::write(self, address, offset, data);
    }
}

/// crosvm's bus design.
#[derive(Default)]
pub struct CrosvmBus {
    devices: Mutex<BTreeMap<BusRange, Arc<Mutex<dyn CrosvmDevice>>>>,
}

impl CrosvmBus {
    /// Maps `dev` at `[base, base + len)`; fails on overlap.
    pub fn insert(&self, dev: Arc<Mutex<dyn CrosvmDevice>>, base: u64, len: u64) -> Result<(), &'static str> {
        if len == 0 {
            return Err("zero-sized range");
        }
        let mut map = self.devices.lock().expect("bus lock");
        if overlaps_any(&map, base, len) {
            return Err("overlap");
        }
        map.insert(BusRange { base, len }, dev);
        Ok(())
    }

    /// Unmaps the range that starts at `base`.
    pub fn remove(&self, base: u64) -> bool {
        self.devices.lock().expect("bus lock").remove(&BusRange::key(base)).is_some()
    }

    /// crosvm's `get_device`: the offset in the range and the device.
    #[inline]
    pub fn get_device(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn CrosvmDevice>>)> {
        let map = self.devices.lock().expect("bus lock");
        let (r, d) = find(&map, addr)?;
        Some((addr - r.base, d.clone()))
    }

    /// A read dispatched to the device at `addr`; false if none.
    #[inline]
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.get_device(addr) {
            Some((off, dev)) => {
                dev.lock().expect("device lock").read(off, addr, data);
                true
            }
            None => false,
        }
    }

    /// A write dispatched to the device at `addr`; false if none.
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.get_device(addr) {
            Some((off, dev)) => {
                dev.lock().expect("device lock").write(off, addr, data);
                true
            }
            None => false,
        }
    }
}

/// A crosvm bus with `n` trivial devices.
pub fn crosvm_bus(n: usize) -> CrosvmBus {
    let bus = CrosvmBus::default();
    for i in 0..n {
        bus.insert(Arc::new(Mutex::new(ConstDevice::default())), base_of(i), RANGE_LEN).expect("no overlap");
    }
    bus
}

// ----- rust-vmm vm-device ---------------------------------------------------

/// The trivial device for `vm-device`, registered as `Arc<Mutex<VmdDevice>>`
/// (the crate's blanket `DeviceMmio for Mutex<impl MutDeviceMmio>`).
#[derive(Debug, Default)]
pub struct VmdDevice {
    last: u64,
}

impl MutDeviceMmio for VmdDevice {
    fn mmio_read(&mut self, _base: MmioAddress, _offset: MmioAddressOffset, data: &mut [u8]) {
        fill(data, DEV_VALUE);
    }
    fn mmio_write(&mut self, _base: MmioAddress, _offset: MmioAddressOffset, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        self.last = u64::from_le_bytes(b);
    }
}

/// Registers a trivial device at `[base, base + len)`.
pub fn vmd_register(m: &mut IoManager, base: u64, len: u64) {
    let range = MmioRange::new(MmioAddress(base), len).expect("valid range");
    m.register_mmio(range, Arc::new(Mutex::new(VmdDevice::default()))).expect("no overlap");
}

/// An `IoManager` with `n` trivial MMIO devices.
pub fn vmd_manager(n: usize) -> IoManager {
    let mut m = IoManager::new();
    for i in 0..n {
        vmd_register(&mut m, base_of(i), RANGE_LEN);
    }
    m
}

/// `IoManager` shared between vCPU threads and a writer, as `vmm-reference`
/// keeps it.
pub type VmdShared = Mutex<IoManager>;

/// The range base `vm-device` resolves `addr` to (its lookup).
#[inline]
pub fn vmd_lookup(m: &IoManager, addr: u64) -> Option<u64> {
    m.mmio_device(MmioAddress(addr)).map(|(r, _)| r.base().0)
}

// ----- rust-vmm vm-memory ---------------------------------------------------

/// Guest RAM of `size` bytes at guest address 0.
pub fn vm_memory(size: usize) -> GuestMemoryAtomic<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).expect("mmap guest memory");
    GuestMemoryAtomic::new(mem)
}

// ----- self-check (run when Cargo builds this file as its own bench) ---------

/// Checks that every baseline finds and dispatches to the right device.
fn self_check() {
    use vm_memory::{Bytes, GuestAddressSpace};
    let n = 64;
    let (ch, _devs) = ch_bus(n);
    let cv = crosvm_bus(n);
    let vmd = vmd_manager(n);
    for i in 0..n {
        let a = base_of(i) + 8;
        let mut d = [0u8; 4];
        assert!(ch.read(a, &mut d) && u32::from_le_bytes(d) as u64 == DEV_VALUE);
        assert!(cv.read(a, &mut d) && u32::from_le_bytes(d) as u64 == DEV_VALUE);
        assert!(vmd.mmio_read(MmioAddress(a), &mut d).is_ok() && u32::from_le_bytes(d) as u64 == DEV_VALUE);
        assert_eq!(ch.resolve(a).map(|r| r.0), Some(base_of(i)));
        assert_eq!(vmd_lookup(&vmd, a), Some(base_of(i)));
        // The hole after each range decodes to nothing.
        assert!(ch.resolve(base_of(i) + RANGE_LEN).is_none());
        assert!(cv.get_device(base_of(i) + RANGE_LEN).is_none());
        assert!(vmd_lookup(&vmd, base_of(i) + RANGE_LEN).is_none());
    }
    assert!(ch.insert(Arc::new(Mutex::new(ConstDevice::default())), 0x800, 0x10).is_err());
    assert!(ch.remove(0) && ch.resolve(8).is_none());
    let mem = vm_memory(1 << 20);
    mem.memory().write_obj(0xdead_beef_u64, GuestAddress(0x100)).expect("write");
    assert_eq!(mem.memory().read_obj::<u64>(GuestAddress(0x100)).expect("read"), 0xdead_beef);
    println!("baselines: self-check passed");
}

fn main() {
    self_check();
}
