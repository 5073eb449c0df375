//! Topos fixtures shared by the benches: maps laid out like the baselines'
//! buses, the machine build, the dirty-log harvest setup, and the writer
//! threads of the contended benches.

#![allow(dead_code)]

use crate::baselines::{base_of, DEV_VALUE, RANGE_LEN, STRIDE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use topos_runtime::{
    new_event_notifier, AddressSpace, DirtyClient, HwAddr, MemoryRegion, MemoryRegionOps, OpsConfig, Result,
    StandardSpaces, Topology, SIZE_MAX,
};

/// The trivial device: reads [`DEV_VALUE`], ignores writes.
pub struct ConstOps;

impl MemoryRegionOps for ConstOps {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        DEV_VALUE
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {}
}

/// A topology whose "memory" space has `n` trivial I/O regions laid out like
/// the baselines' buses (region `i` at `base_of(i)`, `RANGE_LEN` bytes),
/// added in one transaction.
pub struct IoMap {
    /// The topology.
    pub topo: Topology,
    /// Its standard spaces; `spaces.memory` is the one with the regions.
    pub spaces: StandardSpaces,
    /// The regions, in address order.
    pub regions: Vec<MemoryRegion>,
}

/// Builds an [`IoMap`] of `n` regions.
pub fn io_map(n: usize) -> Result<IoMap> {
    let topo = Topology::new();
    let spaces = topo.standard_spaces()?;
    let mut regions = Vec::with_capacity(n);
    topo.transaction(|| -> Result<()> {
        for i in 0..n {
            let r = topo.new_io(&format!("dev{i}"), ConstOps, OpsConfig::default(), RANGE_LEN as u128)?;
            spaces.system.add_subregion(base_of(i), &r)?;
            regions.push(r);
        }
        Ok(())
    })??;
    assert_eq!(spaces.memory.view().ranges().len(), n, "one flat range per region");
    Ok(IoMap { topo, spaces, regions })
}

/// A topology with `n` RAM regions of one page (region `i` at `base_of(i)`),
/// added in one transaction, for the commit-latency benches.
pub fn ram_map(n: usize) -> Result<(Topology, StandardSpaces, Vec<MemoryRegion>)> {
    let topo = Topology::new();
    let spaces = topo.standard_spaces()?;
    let mut regions = Vec::with_capacity(n);
    topo.transaction(|| -> Result<()> {
        for i in 0..n {
            let r = topo.new_ram(&format!("ram{i}"), RANGE_LEN as u128)?;
            spaces.system.add_subregion(base_of(i), &r)?;
            regions.push(r);
        }
        Ok(())
    })??;
    Ok((topo, spaces, regions))
}

/// `n` addresses, one inside each range, in a scrambled order (a fixed-seed
/// Fisher–Yates shuffle), so consecutive lookups land in unrelated ranges.
pub fn scrambled_addrs(n: usize) -> Vec<u64> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        idx.swap(i, (s % (i as u64 + 1)) as usize);
    }
    idx.into_iter().map(|i| base_of(i) + 0x10).collect()
}

/// Where the writer of the contended benches puts its spare range in a map of
/// `n` ranges: just above the ranges readers touch (it moves between this
/// base and the next stride), so the map stays as dense as without a writer.
pub fn spare_base(n: usize) -> u64 {
    base_of(n + 1)
}

/// Where the sparse lookup variant puts one extra range, far above the others
/// (as a 64-bit PCI window sits far above low RAM and MMIO).
pub const FAR_BASE: u64 = 1 << 40;

/// A thread that changes a map about once a millisecond until stopped.
pub struct Writer {
    stop: Arc<AtomicBool>,
    changes: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// Runs `change(k)` for k = 0, 1, 2, ... with a 1 ms sleep in between.
    pub fn start(mut change: impl FnMut(u64) + Send + 'static) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), changes.clone());
        let handle = std::thread::spawn(move || {
            let mut k = 0;
            while !s.load(Ordering::Relaxed) {
                change(k);
                k += 1;
                c.store(k, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Writer { stop, changes, handle: Some(handle) }
    }

    /// Stops the thread and returns how many changes it made.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("writer thread");
        }
        self.changes.load(Ordering::Relaxed)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The topos writer: adds a spare region above the readers' ranges and moves
/// it between two addresses, one commit per change.
pub fn topos_mover(map: &IoMap) -> Result<Writer> {
    let spare = map.topo.new_io("mover", ConstOps, OpsConfig::default(), RANGE_LEN as u128)?;
    let base = spare_base(map.regions.len());
    map.spaces.system.add_subregion(base, &spare)?;
    Ok(Writer::start(move |k| {
        spare.set_address(base + (k % 2) * STRIDE).expect("move");
    }))
}

/// Runs `per_thread(iters)` on `threads` threads started together, with
/// `writer` running, and returns the mean per-thread wall time (so criterion
/// reports the time of one access as a reader sees it).
pub fn run_readers(threads: usize, iters: u64, per_thread: impl Fn(u64) + Send + Sync + 'static) -> Duration {
    let per_thread = Arc::new(per_thread);
    let barrier = Arc::new(std::sync::Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (f, b) = (per_thread.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                let t = std::time::Instant::now();
                f(iters);
                t.elapsed()
            })
        })
        .collect();
    let total: Duration = handles.into_iter().map(|h| h.join().expect("reader thread")).sum();
    total / threads as u32
}

/// A PCI-like machine: the result of [`build_machine`].
pub struct Machine {
    /// The topology.
    pub topo: Topology,
    /// Its standard spaces.
    pub spaces: StandardSpaces,
    /// The PCI container (in `system`, at [`PCI_BASE`]).
    pub pci: MemoryRegion,
    /// Each device's BAR.
    pub bars: Vec<MemoryRegion>,
    /// Each device's bus-master address space.
    pub bus_master: Vec<AddressSpace>,
}

impl Machine {
    /// Destroys every address space of the machine in one transaction, then
    /// drops it, so that each build's eventfds are closed before the next
    /// build starts (runtimes before 3b8a957 also leaked a dropped topology
    /// that had address spaces, through a reference cycle).
    pub fn teardown(self) -> Result<()> {
        let topo = self.topo.clone();
        topo.transaction(|| -> Result<()> {
            for asp in topo.address_spaces() {
                topo.address_space_destroy(&asp)?;
            }
            Ok(())
        })??;
        drop(self);
        Ok(())
    }
}

/// Where the PCI container sits in `system`.
pub const PCI_BASE: u64 = 0xe000_0000;
/// Size of each device's BAR.
pub const BAR_SIZE: u64 = 0x1000;
/// ioeventfds per device (one per virtqueue notify register).
pub const QUEUES: u64 = 32;

/// Builds `devices` PCI-like devices, one transaction each: an I/O BAR in the
/// PCI container, a bus-master address space whose root is an alias of all
/// of `system`, and [`QUEUES`] ioeventfds on the BAR (4-byte writes at
/// `4 * q` matching data `q`).
///
/// One eventfd is made per device and shared by its queues (they differ by
/// address and data): 32 per device would need 32,000 descriptors, above this
/// machine's hard `RLIMIT_NOFILE` of 20,000.
pub fn build_machine(devices: usize) -> Result<Machine> {
    build_machine_within(devices, None)
}

/// Like [`build_machine`], but stops adding devices once `budget` has passed
/// (check `bars.len()` to see how many were built).
pub fn build_machine_within(devices: usize, budget: Option<Duration>) -> Result<Machine> {
    let start = std::time::Instant::now();
    let topo = Topology::new();
    let spaces = topo.standard_spaces()?;
    let pci = topo.new_container("pci", 1 << 28)?;
    spaces.system.add_subregion(PCI_BASE, &pci)?;
    let mut bars = Vec::with_capacity(devices);
    let mut bus_master = Vec::with_capacity(devices);
    for d in 0..devices {
        if budget.is_some_and(|b| start.elapsed() > b) {
            break;
        }
        topo.transaction(|| -> Result<()> {
            let bar = topo.new_io(&format!("dev{d}.bar0"), ConstOps, OpsConfig::default(), BAR_SIZE as u128)?;
            pci.add_subregion(d as u64 * BAR_SIZE, &bar)?;
            let alias = topo.new_alias(&format!("dev{d}.bm"), &spaces.system, 0, SIZE_MAX)?;
            bus_master.push(topo.address_space_init(&alias, &format!("dev{d}"))?);
            let notifier = new_event_notifier()?;
            for q in 0..QUEUES {
                bar.add_eventfd(q * 4, 4, true, q, &notifier)?;
            }
            bars.push(bar);
            Ok(())
        })??;
    }
    Ok(Machine { topo, spaces, pci, bars, bus_master })
}

/// Size of the harvested RAM region: 16 GiB.
pub const HARVEST_RAM: u64 = 16 << 30;

/// A 16 GiB RAM region (mapped with `MAP_NORESERVE`; only the bitmaps are
/// touched) with every Migration bit clear.
pub fn harvest_ram(topo: &Topology) -> Result<MemoryRegion> {
    let ram = topo.new_ram("ram", HARVEST_RAM as u128)?;
    ram.reset_dirty(0, HARVEST_RAM, DirtyClient::Migration)?;
    Ok(ram)
}

/// Marks 1 % of the pages dirty for Migration (every 100th page) and returns
/// how many.
pub fn dirty_one_percent(ram: &MemoryRegion) -> Result<u64> {
    let pages = HARVEST_RAM / topos_runtime::PAGE_SIZE;
    let mut n = 0;
    let mut p = 0;
    while p < pages {
        ram.set_dirty_for(p * topos_runtime::PAGE_SIZE, 1, DirtyClient::Migration.mask())?;
        n += 1;
        p += 100;
    }
    Ok(n)
}

/// A listener that does nothing, standing in for an accelerator's; it takes
/// `region_nop` for every unchanged range, as QEMU's listeners do.
pub struct NopListener;
impl topos_runtime::MemoryListener for NopListener {}

/// The same, but declining `region_nop`, so commits diff only what changed.
pub struct DiffListener;
impl topos_runtime::MemoryListener for DiffListener {
    fn wants_region_nop(&self) -> bool {
        false
    }
}
