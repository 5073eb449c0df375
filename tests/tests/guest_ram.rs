//! Guest RAM shared by vCPU threads: aligned accesses of 2, 4 and 8 bytes
//! never tear through any access path, bulk copies never tear the aligned
//! units inside them, and guest atomics (read-modify-write,
//! compare-exchange, fetch_update) lose nothing, follow their documented
//! rules on RAM, MMIO, ROM and holes, and mark dirty pages.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use topos_runtime::{
    AddressSpace, AtomicRmw, DirtyClient, HwAddr, MemTxResult, MemoryRegion, MemoryRegionOps, OpsConfig,
    StandardSpaces, Topology,
};

const RAM_SIZE: u64 = 0x10000;
/// A second RAM region right after the first (for atomics that cross from
/// one RAM range into another).
const RAM2_BASE: u64 = RAM_SIZE;
const RAM2_SIZE: u64 = 0x1000;
const ROM_BASE: u64 = 0x20000;
const MMIO_BASE: u64 = 0x30000;
const HOLE: u64 = 0x40000;
const RESERVED: u64 = 0x50000;
const ROMD_BASE: u64 = 0x60000;

struct Rig {
    _topo: Topology,
    spaces: StandardSpaces,
    ram: MemoryRegion,
    ram2: MemoryRegion,
    rom: MemoryRegion,
    dev: Arc<LogDevice>,
    romd: MemoryRegion,
    romd_dev: Arc<LogDevice>,
}

fn rig() -> Rig {
    let topo = Topology::new();
    let spaces = topo.standard_spaces().unwrap();
    let ram = topo.new_ram("ram", RAM_SIZE as u128).unwrap();
    let ram2 = topo.new_ram("ram2", RAM2_SIZE as u128).unwrap();
    let rom = topo.new_rom("rom", 0x1000).unwrap();
    let dev = Arc::new(LogDevice::default());
    let mmio = topo.new_io_arc("dev", dev.clone(), OpsConfig::default(), 0x1000).unwrap();
    spaces.system.add_subregion(0, &ram).unwrap();
    spaces.system.add_subregion(RAM2_BASE, &ram2).unwrap();
    spaces.system.add_subregion(ROM_BASE, &rom).unwrap();
    spaces.system.add_subregion(MMIO_BASE, &mmio).unwrap();
    let reserved = topo.new_reservation("reserved", 0x1000).unwrap();
    spaces.system.add_subregion(RESERVED, &reserved).unwrap();
    let romd_dev = Arc::new(LogDevice::default());
    let romd = topo.new_rom_device_arc("romd", romd_dev.clone(), OpsConfig::default(), 0x1000).unwrap();
    spaces.system.add_subregion(ROMD_BASE, &romd).unwrap();
    Rig { _topo: topo, spaces, ram, ram2, rom, dev, romd, romd_dev }
}

impl Rig {
    fn mem(&self) -> &AddressSpace {
        &self.spaces.memory
    }
    fn peek(&self, addr: HwAddr, size: u32) -> u64 {
        let (v, r) = self.mem().read_u64(addr, size);
        assert_eq!(r, MemTxResult::Ok);
        v
    }
    fn poke(&self, addr: HwAddr, value: u64, size: u32) {
        assert_eq!(self.mem().write_u64(addr, value, size), MemTxResult::Ok);
    }
}

/// A device register file that logs every access it receives.
#[derive(Default)]
struct LogDevice {
    reg: Mutex<u64>,
    log: Mutex<Vec<(char, HwAddr, u64, u32)>>,
}

impl LogDevice {
    fn take_log(&self) -> Vec<(char, HwAddr, u64, u32)> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl MemoryRegionOps for LogDevice {
    fn read(&self, addr: HwAddr, size: u32) -> u64 {
        let v = *self.reg.lock().unwrap();
        self.log.lock().unwrap().push(('r', addr, v, size));
        v
    }
    fn write(&self, addr: HwAddr, value: u64, size: u32) {
        *self.reg.lock().unwrap() = value;
        self.log.lock().unwrap().push(('w', addr, value, size));
    }
}

fn mask(size: u32) -> u64 {
    if size == 8 {
        u64::MAX
    } else {
        (1 << (size * 8)) - 1
    }
}

// ----- torn values --------------------------------------------------------

/// The four ways to reach guest RAM.
#[derive(Debug, Clone, Copy)]
enum Via {
    Space,
    Accessor,
    Mapping,
    Slice,
}

const VIAS: [Via; 4] = [Via::Space, Via::Accessor, Via::Mapping, Via::Slice];

type ReadFn = Box<dyn FnMut(HwAddr, &mut [u8]) + Send>;
type WriteFn = Box<dyn FnMut(HwAddr, &[u8]) + Send>;

/// A reader through `via` (RAM is at 0, so region offsets are addresses).
fn reader(rig: &Rig, via: Via) -> ReadFn {
    match via {
        Via::Space => {
            let m = rig.mem().clone();
            Box::new(move |a, b| assert_eq!(m.read(a, b), MemTxResult::Ok))
        }
        Via::Accessor => {
            let mut acc = rig.mem().accessor();
            Box::new(move |a, b| assert_eq!(acc.read(a, b), MemTxResult::Ok))
        }
        Via::Mapping => {
            let map = rig.mem().map(0, RAM_SIZE, false).unwrap();
            assert!(map.is_direct());
            Box::new(move |a, b| map.read(a, b).unwrap())
        }
        Via::Slice => {
            let s = rig.ram.ram().unwrap();
            Box::new(move |a, b| s.read(a, b).unwrap())
        }
    }
}

fn writer(rig: &Rig, via: Via) -> WriteFn {
    match via {
        Via::Space => {
            let m = rig.mem().clone();
            Box::new(move |a, b| assert_eq!(m.write(a, b), MemTxResult::Ok))
        }
        Via::Accessor => {
            let mut acc = rig.mem().accessor();
            Box::new(move |a, b| assert_eq!(acc.write(a, b), MemTxResult::Ok))
        }
        Via::Mapping => {
            let mut map = rig.mem().map(0, RAM_SIZE, true).unwrap();
            assert!(map.is_direct());
            Box::new(move |a, b| map.write(a, b).unwrap())
        }
        Via::Slice => {
            let s = rig.ram.ram().unwrap();
            Box::new(move |a, b| s.write(a, b).unwrap())
        }
    }
}

/// Uniform byte values: a value built from one of them is torn exactly when
/// its bytes differ.
const FILL: [u8; 4] = [0x00, 0xff, 0x01, 0x02];
const WRITES: usize = 20000;
const MIN_READS: usize = 2000;

/// Runs `writers` (each called with its iteration number) and `readers`
/// (called until every writer is done and each has run `MIN_READS` times)
/// at once. Returns how many reads ran.
fn race(writers: Vec<Box<dyn FnMut(usize) + Send>>, readers: Vec<Box<dyn FnMut() + Send>>) -> usize {
    let running = Arc::new(AtomicUsize::new(writers.len()));
    let start = Arc::new(Barrier::new(writers.len() + readers.len()));
    let mut handles = Vec::new();
    for mut w in writers {
        let (running, start) = (running.clone(), start.clone());
        handles.push(thread::spawn(move || {
            start.wait();
            for i in 0..WRITES {
                w(i);
            }
            running.fetch_sub(1, Ordering::AcqRel);
            0
        }));
    }
    for mut r in readers {
        let (running, start) = (running.clone(), start.clone());
        handles.push(thread::spawn(move || {
            start.wait();
            let mut n = 0;
            while n < MIN_READS || running.load(Ordering::Acquire) > 0 {
                r();
                n += 1;
            }
            n
        }));
    }
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

/// Asserts that every `size`-aligned unit of `buf` (which starts at guest
/// address `at`) inside `[lo, hi)` has uniform bytes that are one of `FILL`.
fn check_units(buf: &[u8], at: HwAddr, size: usize, lo: HwAddr, hi: HwAddr, what: &str) {
    let mut u = lo.next_multiple_of(size as u64);
    while u + size as u64 <= hi {
        let i = (u - at) as usize;
        let unit = &buf[i..i + size];
        assert!(
            FILL.contains(&unit[0]) && unit.iter().all(|&b| b == unit[0]),
            "{what}: torn {size}-byte value at {u:#x}: {unit:02x?}"
        );
        u += size as u64;
    }
}

#[test]
fn aligned_2_4_8_byte_values_never_tear_on_any_path() {
    let rig = rig();
    for (k, via) in VIAS.into_iter().enumerate() {
        let other = VIAS[(k + 1) % 4];
        let third = VIAS[(k + 2) % 4];
        for (size, unit) in [(2usize, 0x1006u64), (4, 0x1014), (8, 0x1028)] {
            let mut writers: Vec<Box<dyn FnMut(usize) + Send>> = Vec::new();
            for (w, v) in [via, other].into_iter().enumerate() {
                let mut write = writer(&rig, v);
                writers.push(Box::new(move |i| write(unit, &[FILL[(i + 2 * w) % 4]; 8][..size])));
            }
            let mut readers: Vec<Box<dyn FnMut() + Send>> = Vec::new();
            for v in [via, third] {
                let mut read = reader(&rig, v);
                let what = format!("write {via:?}/{other:?}, read {v:?}");
                readers.push(Box::new(move || {
                    // The value alone, then inside a longer misaligned copy.
                    let mut b = [0u8; 8];
                    read(unit, &mut b[..size]);
                    check_units(&b, unit, size, unit, unit + size as u64, &what);
                    let mut long = [0u8; 21];
                    read(unit - 3, &mut long);
                    check_units(&long, unit - 3, size, unit, unit + size as u64, &what);
                }));
            }
            assert!(race(writers, readers) >= 2 * MIN_READS);
        }
    }
}

#[test]
fn bulk_copies_never_tear_the_aligned_units_inside_them() {
    let rig = rig();
    // Writers fill [LO, HI) (misaligned ends) with a uniform byte; readers
    // copy a wider misaligned window and check every aligned 2/4/8-byte unit
    // of [LO, HI).
    const LO: u64 = 0x2003;
    const HI: u64 = 0x2035;
    for (k, via) in VIAS.into_iter().enumerate() {
        let other = VIAS[(k + 1) % 4];
        let mut writers: Vec<Box<dyn FnMut(usize) + Send>> = Vec::new();
        for (w, v) in [via, other].into_iter().enumerate() {
            let mut write = writer(&rig, v);
            writers.push(Box::new(move |i| write(LO, &[FILL[(i + 2 * w) % 4]; (HI - LO) as usize])));
        }
        let mut readers: Vec<Box<dyn FnMut() + Send>> = Vec::new();
        for v in [via, VIAS[(k + 2) % 4]] {
            let mut read = reader(&rig, v);
            let what = format!("bulk write {via:?}/{other:?}, read {v:?}");
            readers.push(Box::new(move || {
                let mut b = [0u8; 0x40];
                read(0x2001, &mut b);
                for size in [2, 4, 8] {
                    check_units(&b, 0x2001, size, LO, HI, &what);
                }
            }));
        }
        assert!(race(writers, readers) >= 2 * MIN_READS);
    }
}

#[test]
fn long_copies_never_show_a_byte_nobody_wrote() {
    // Copies of 256 bytes or more promise only byte atomicity (x86-64's
    // string copy): every byte read is one some writer stored.
    let rig = rig();
    const LO: u64 = 0x3001;
    const LEN: usize = 0x233;
    for (k, via) in VIAS.into_iter().enumerate() {
        let other = VIAS[(k + 1) % 4];
        let mut writers: Vec<Box<dyn FnMut(usize) + Send>> = Vec::new();
        for (w, v) in [via, other].into_iter().enumerate() {
            let mut write = writer(&rig, v);
            writers.push(Box::new(move |i| write(LO, &[FILL[(i + 2 * w) % 4]; LEN])));
        }
        let mut readers: Vec<Box<dyn FnMut() + Send>> = Vec::new();
        for v in [via, VIAS[(k + 2) % 4]] {
            let mut read = reader(&rig, v);
            readers.push(Box::new(move || {
                let mut b = [0u8; LEN + 6];
                read(LO - 3, &mut b);
                assert!(b[3..3 + LEN].iter().all(|x| FILL.contains(x)), "long copy via {v:?}: {b:02x?}");
            }));
        }
        assert!(race(writers, readers) >= 2 * MIN_READS);
    }
}

// ----- atomics that lose nothing ------------------------------------------

const THREADS: usize = 4;
/// Per thread; `THREADS * INCREMENTS` fits in 16 bits, so 2-byte counters
/// do not wrap.
const INCREMENTS: u64 = 16000;

/// `THREADS` threads each add 1 `INCREMENTS` times to the `size`-byte value
/// at `addr` (even threads through the address space, odd ones through an
/// accessor), while another thread keeps storing to the bytes around it.
/// No increment is lost, every fetched old value is distinct, and the
/// neighbouring stores are not undone.
fn increments_lose_nothing(rig: &Rig, addr: HwAddr, size: u32) {
    let (lo, hi) = (addr & !7, (addr + size as u64).next_multiple_of(8));
    let neighbours: Vec<HwAddr> = (lo..hi).filter(|a| !(addr..addr + size as u64).contains(a)).collect();
    for a in lo..hi {
        rig.poke(a, 0, 1);
    }
    let start = Arc::new(Barrier::new(THREADS + 1));
    let done = Arc::new(AtomicBool::new(false));
    let poker = {
        let (m, start, done, neighbours) = (rig.mem().clone(), start.clone(), done.clone(), neighbours.clone());
        thread::spawn(move || {
            start.wait();
            let mut k = 0u8;
            while !done.load(Ordering::Acquire) || k < 100 {
                k = k.wrapping_add(1);
                for &a in &neighbours {
                    assert_eq!(m.write(a, &[k]), MemTxResult::Ok);
                }
            }
            k
        })
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (m, start) = (rig.mem().clone(), start.clone());
            thread::spawn(move || {
                let mut acc = m.accessor();
                start.wait();
                (0..INCREMENTS)
                    .map(|_| {
                        let (old, r) = if t % 2 == 0 {
                            m.atomic_rmw(addr, size, AtomicRmw::Add(1))
                        } else {
                            acc.atomic_rmw(addr, size, AtomicRmw::Add(1))
                        };
                        assert_eq!(r, MemTxResult::Ok);
                        old
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut olds: Vec<u64> = workers.into_iter().flat_map(|h| h.join().unwrap()).collect();
    done.store(true, Ordering::Release);
    let last = poker.join().unwrap();
    let total = THREADS as u64 * INCREMENTS;
    assert_eq!(rig.peek(addr, size), total, "{size} bytes at {addr:#x}: increments lost");
    olds.sort_unstable();
    assert!(olds.iter().copied().eq(0..total), "{size} bytes at {addr:#x}: each increment saw its own old value");
    for &a in &neighbours {
        assert_eq!(rig.peek(a, 1), last as u64, "neighbour {a:#x} of {addr:#x} keeps its last store");
    }
}

#[test]
fn concurrent_increments_aligned_lose_nothing() {
    let rig = rig();
    increments_lose_nothing(&rig, 0x3000, 2);
    increments_lose_nothing(&rig, 0x3104, 4);
    increments_lose_nothing(&rig, 0x3208, 8);
}

#[test]
fn concurrent_increments_misaligned_inside_a_word_lose_nothing() {
    let rig = rig();
    increments_lose_nothing(&rig, 0x3001, 2);
    increments_lose_nothing(&rig, 0x3103, 4);
    increments_lose_nothing(&rig, 0x3202, 4);
}

#[test]
fn concurrent_increments_crossing_a_word_page_or_range_lose_nothing() {
    let rig = rig();
    // Across an 8-byte word.
    increments_lose_nothing(&rig, 0x3007, 2);
    increments_lose_nothing(&rig, 0x310e, 4);
    increments_lose_nothing(&rig, 0x3204, 8);
    // Across a page boundary.
    increments_lose_nothing(&rig, 0x4ffd, 8);
    // From one RAM region into the next.
    increments_lose_nothing(&rig, RAM2_BASE - 2, 4);
}

#[test]
fn compare_exchange_counters_lose_nothing() {
    let rig = rig();
    for (addr, size) in [(0x5000u64, 8u32), (0x5103, 4), (0x5206, 8)] {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let m = rig.mem().clone();
                thread::spawn(move || {
                    let mut acc = m.accessor();
                    for _ in 0..INCREMENTS / 2 {
                        let (mut seen, _) = m.read_u64(addr, size);
                        loop {
                            let (r, tx) = if t % 2 == 0 {
                                m.atomic_compare_exchange(addr, size, seen, seen + 1)
                            } else {
                                acc.atomic_compare_exchange(addr, size, seen, seen + 1)
                            };
                            assert_eq!(tx, MemTxResult::Ok);
                            match r {
                                Ok(_) => break,
                                Err(actual) => seen = actual,
                            }
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(rig.peek(addr, size), THREADS as u64 * (INCREMENTS / 2), "cmpxchg counter at {addr:#x}");
    }
}

// ----- semantics ------------------------------------------------------------

/// Aligned, misaligned inside a word, crossing a word, crossing into the
/// second RAM region.
fn ram_sites(size: u32) -> [HwAddr; 4] {
    [0x6000 + 8, 0x6101 + (8 - size as u64) / 2, 0x6206 - size as u64 / 2 + 1, RAM2_BASE - size as u64 / 2]
}

#[test]
fn rmw_ops_compute_on_truncated_little_endian_values() {
    let rig = rig();
    let mut acc = rig.mem().accessor();
    let ops = [
        AtomicRmw::Xchg(0x1122_3344_5566_7788),
        AtomicRmw::Add(0xffff_ffff_ffff_ff01),
        AtomicRmw::Sub(0x8000_0000_0000_0203),
        AtomicRmw::And(0x0f0f_f0f0_0ff0_f00f),
        AtomicRmw::Or(0x8421_8421_8421_8421),
        AtomicRmw::Xor(0xdead_beef_cafe_f00d),
    ];
    for size in [1u32, 2, 4, 8] {
        for addr in ram_sites(size) {
            for (i, op) in ops.into_iter().enumerate() {
                // Sentinels around the value must survive.
                rig.poke(addr - 1, 0x5a, 1);
                rig.poke(addr + size as u64, 0xa5, 1);
                let start = 0x0123_4567_89ab_cdef_u64.rotate_left(i as u32 * 8) & mask(size);
                rig.poke(addr, start, size);
                let (old, r) =
                    if i % 2 == 0 { rig.mem().atomic_rmw(addr, size, op) } else { acc.atomic_rmw(addr, size, op) };
                assert_eq!((old, r), (start, MemTxResult::Ok), "{op:?} size {size} at {addr:#x}");
                assert_eq!(rig.peek(addr, size), op.apply(start) & mask(size), "{op:?} size {size} at {addr:#x}");
                assert_eq!(rig.peek(addr - 1, 1), 0x5a);
                assert_eq!(rig.peek(addr + size as u64, 1), 0xa5);
            }
        }
    }
}

#[test]
fn compare_exchange_stores_only_on_a_match_of_the_truncated_value() {
    let rig = rig();
    let mut acc = rig.mem().accessor();
    for size in [1u32, 2, 4, 8] {
        for addr in ram_sites(size) {
            let v = 0x8877_6655_4433_2211 & mask(size);
            let w = 0x0102_0304_0506_0708 & mask(size);
            rig.poke(addr, v, size);
            // A mismatch: nothing stored, the actual value returned.
            assert_eq!(rig.mem().atomic_compare_exchange(addr, size, v ^ 1, w), (Err(v), MemTxResult::Ok));
            assert_eq!(acc.atomic_compare_exchange(addr, size, v ^ 1, w), (Err(v), MemTxResult::Ok));
            assert_eq!(rig.peek(addr, size), v);
            // A match; bits above the size are ignored in `current` and `new`.
            let high = !mask(size);
            assert_eq!(rig.mem().atomic_compare_exchange(addr, size, v | high, w | high), (Ok(v), MemTxResult::Ok));
            assert_eq!(rig.peek(addr, size), w, "size {size} at {addr:#x}");
            assert_eq!(acc.atomic_compare_exchange(addr, size, w, v), (Ok(w), MemTxResult::Ok));
            assert_eq!(rig.peek(addr, size), v);
        }
    }
}

#[test]
fn fetch_update_stores_what_the_closure_returns_or_nothing() {
    let rig = rig();
    let mut acc = rig.mem().accessor();
    for size in [1u32, 2, 4, 8] {
        for addr in ram_sites(size) {
            rig.poke(addr, 0x40, size);
            // `lock bts` of the top bit: the closure sees the truncated value.
            let top = 1u64 << (size * 8 - 1);
            let (r, tx) = rig.mem().atomic_fetch_update(addr, size, |v| {
                assert_eq!(v, 0x40);
                Some(v | top | (1 << 63))
            });
            assert_eq!((r, tx), (Ok(0x40), MemTxResult::Ok));
            assert_eq!(rig.peek(addr, size), 0x40 | top);
            let (r, tx) = acc.atomic_fetch_update(addr, size, |_| None);
            assert_eq!((r, tx), (Err(0x40 | top), MemTxResult::Ok));
            assert_eq!(rig.peek(addr, size), 0x40 | top);
        }
    }
}

#[test]
fn mmio_atomics_read_then_write_through_the_device() {
    let rig = rig();
    let mut acc = rig.mem().accessor();
    *rig.dev.reg.lock().unwrap() = 41;
    assert_eq!(rig.mem().atomic_rmw(MMIO_BASE + 8, 4, AtomicRmw::Add(1)), (41, MemTxResult::Ok));
    assert_eq!(rig.dev.take_log(), [('r', 8, 41, 4), ('w', 8, 42, 4)]);
    // A failed compare-exchange writes the old value back (x86, QEMU).
    assert_eq!(acc.atomic_compare_exchange(MMIO_BASE + 8, 4, 7, 9), (Err(42), MemTxResult::Ok));
    assert_eq!(rig.dev.take_log(), [('r', 8, 42, 4), ('w', 8, 42, 4)]);
    assert_eq!(rig.mem().atomic_compare_exchange(MMIO_BASE + 8, 4, 42, 9), (Ok(42), MemTxResult::Ok));
    assert_eq!(rig.dev.take_log(), [('r', 8, 42, 4), ('w', 8, 9, 4)]);
    // A declined fetch_update only reads.
    assert_eq!(acc.atomic_fetch_update(MMIO_BASE + 8, 4, |_| None), (Err(9), MemTxResult::Ok));
    assert_eq!(rig.dev.take_log(), [('r', 8, 9, 4)]);
    // An 8-byte atomic is cut like any 8-byte access to a 4-byte device.
    assert_eq!(rig.mem().atomic_rmw(MMIO_BASE, 8, AtomicRmw::Xchg(0x1_0000_0002)), (9 | 9 << 32, MemTxResult::Ok));
    assert_eq!(rig.dev.take_log(), [('r', 0, 9, 4), ('r', 4, 9, 4), ('w', 0, 2, 4), ('w', 4, 1, 4)]);
}

#[test]
fn rom_atomics_read_the_old_value_and_drop_the_write() {
    let rig = rig();
    let rom = rig.rom.ram().unwrap();
    rom.write(0x10, &0x1234_5678u32.to_le_bytes()).unwrap();
    rig.rom.set_log(true, DirtyClient::Vga).unwrap();
    rig.rom.reset_dirty(0, 0x1000, DirtyClient::Vga).unwrap();
    let mut acc = rig.mem().accessor();
    let a = ROM_BASE + 0x10;
    assert_eq!(rig.mem().atomic_rmw(a, 4, AtomicRmw::Add(1)), (0x1234_5678, MemTxResult::DecodeError));
    assert_eq!(acc.atomic_rmw(a + 1, 2, AtomicRmw::Xchg(0)), (0x3456, MemTxResult::DecodeError));
    assert_eq!(acc.atomic_compare_exchange(a, 4, 0x1234_5678, 0), (Ok(0x1234_5678), MemTxResult::DecodeError));
    assert_eq!(rig.mem().atomic_compare_exchange(a, 4, 1, 0), (Err(0x1234_5678), MemTxResult::DecodeError));
    // Declined: no write was attempted.
    assert_eq!(acc.atomic_fetch_update(a, 4, |_| None), (Err(0x1234_5678), MemTxResult::Ok));
    assert_eq!(rig.peek(a, 4), 0x1234_5678);
    assert!(!rig.rom.get_dirty(0, 0x1000, DirtyClient::Vga).unwrap());
}

#[test]
fn unassigned_atomics_read_zero_and_drop_the_write() {
    let rig = rig();
    let mut acc = rig.mem().accessor();
    assert_eq!(rig.mem().atomic_rmw(HOLE, 4, AtomicRmw::Or(1)), (0, MemTxResult::DecodeError));
    assert_eq!(acc.atomic_compare_exchange(HOLE + 3, 8, 0, 5), (Ok(0), MemTxResult::DecodeError));
    assert_eq!(acc.atomic_fetch_update(HOLE, 2, Some), (Ok(0), MemTxResult::DecodeError));
    assert_eq!(rig.mem().read_u64(HOLE, 8), (0, MemTxResult::DecodeError));
    // Off the top of the 64-bit space.
    assert_eq!(rig.mem().atomic_rmw(u64::MAX - 2, 8, AtomicRmw::Add(1)), (0, MemTxResult::DecodeError));
    assert_eq!(acc.atomic_rmw(u64::MAX, 1, AtomicRmw::Add(1)), (0, MemTxResult::DecodeError));
}

#[test]
fn reservation_atomics_are_answered_not_served() {
    let rig = rig();
    let mut acc = rig.mem().accessor();
    assert_eq!(rig.mem().atomic_rmw(RESERVED + 4, 4, AtomicRmw::Add(1)), (0, MemTxResult::ReservationAccess));
    assert_eq!(acc.atomic_compare_exchange(RESERVED, 8, 0, 1), (Ok(0), MemTxResult::ReservationAccess));
}

#[test]
fn rom_device_atomics_read_its_ram_in_romd_mode_and_write_through_its_ops() {
    let rig = rig();
    let mut acc = rig.mem().accessor();
    rig.romd.ram().unwrap().write(0x10, &7u32.to_le_bytes()).unwrap();
    *rig.romd_dev.reg.lock().unwrap() = 100;
    // romd mode: the old value comes from the RAM, the new one goes to the
    // device (which decides what the RAM becomes).
    assert_eq!(rig.mem().atomic_rmw(ROMD_BASE + 0x10, 4, AtomicRmw::Add(1)), (7, MemTxResult::Ok));
    assert_eq!(rig.romd_dev.take_log(), [('w', 0x10, 8, 4)]);
    assert_eq!(rig.peek(ROMD_BASE + 0x10, 4), 7);
    // Out of romd mode, both go to the device.
    rig.romd.rom_device_set_readable(false).unwrap();
    assert_eq!(acc.atomic_rmw(ROMD_BASE + 0x10, 4, AtomicRmw::Or(1)), (8, MemTxResult::Ok));
    assert_eq!(rig.romd_dev.take_log(), [('r', 0x10, 8, 4), ('w', 0x10, 9, 4)]);
}

#[test]
fn atomics_straddling_ram_and_something_else_read_and_write_each_part() {
    let rig = rig();
    // The last 2 bytes of RAM2, then 2 bytes of nothing.
    let a = RAM2_BASE + RAM2_SIZE - 2;
    rig.poke(a, 0xbeef, 2);
    assert_eq!(rig.mem().atomic_rmw(a, 4, AtomicRmw::Add(1)), (0xbeef, MemTxResult::DecodeError));
    assert_eq!(rig.peek(a, 2), 0xbef0);
}

#[test]
fn illegal_sizes_touch_nothing() {
    let rig = rig();
    let mut acc = rig.mem().accessor();
    rig.poke(0x7000, u64::MAX, 8);
    for size in [0u32, 3, 5, 6, 7, 16, u32::MAX] {
        assert_eq!(rig.mem().atomic_rmw(0x7000, size, AtomicRmw::Xchg(0)), (0, MemTxResult::DecodeError));
        assert_eq!(acc.atomic_compare_exchange(0x7000, size, u64::MAX, 0), (Err(0), MemTxResult::DecodeError));
        assert_eq!(acc.atomic_fetch_update(0x7000, size, |_| Some(0)), (Err(0), MemTxResult::DecodeError));
    }
    assert_eq!(rig.peek(0x7000, 8), u64::MAX);
    assert_eq!(rig.dev.take_log(), []);
}

#[test]
fn atomic_stores_mark_pages_dirty() {
    let rig = rig();
    rig.ram.set_log(true, DirtyClient::Vga).unwrap();
    rig.ram2.set_log(true, DirtyClient::Vga).unwrap();
    let clean = |r: &MemoryRegion| r.reset_dirty(0, r.size() as u64, DirtyClient::Vga).unwrap();
    let dirty = |r: &MemoryRegion, off: u64| r.get_dirty(off, 1, DirtyClient::Vga).unwrap();
    let mut acc = rig.mem().accessor();
    clean(&rig.ram);
    // Aligned, in-word and crossing (a page) atomics dirty their pages ...
    assert_eq!(rig.mem().atomic_rmw(0x8000, 4, AtomicRmw::Add(1)).1, MemTxResult::Ok);
    assert_eq!(acc.atomic_rmw(0x9003, 2, AtomicRmw::Or(0)).1, MemTxResult::Ok);
    assert_eq!(acc.atomic_compare_exchange(0xaffe, 4, 0, 1).1, MemTxResult::Ok);
    for (page, expect) in
        [(0x7000, false), (0x8000, true), (0x9000, true), (0xa000, true), (0xb000, true), (0xc000, false)]
    {
        assert_eq!(dirty(&rig.ram, page), expect, "page {page:#x}");
    }
    // ... across two regions, both ...
    clean(&rig.ram);
    clean(&rig.ram2);
    assert_eq!(rig.mem().atomic_fetch_update(RAM2_BASE - 4, 8, |v| Some(v + 1)).1, MemTxResult::Ok);
    assert!(dirty(&rig.ram, RAM_SIZE - 1) && dirty(&rig.ram2, 0));
    // ... and atomics that store nothing dirty nothing.
    clean(&rig.ram);
    rig.ram.ram().unwrap().write(0xd000, &[9; 16]).unwrap();
    assert_eq!(acc.atomic_compare_exchange(0xd000, 8, 0, 1), (Err(0x0909_0909_0909_0909), MemTxResult::Ok));
    assert_eq!(rig.mem().atomic_compare_exchange(0xd007, 4, 0, 1).0, Err(0x0909_0909));
    assert_eq!(acc.atomic_fetch_update(0xd001, 2, |_| None).0, Err(0x0909));
    assert!(!dirty(&rig.ram, 0xd000));
}
