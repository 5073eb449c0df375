//! The value path of a vCPU's accesses (`Accessor::read_value` /
//! `write_value`, with its remembered plain accesses) against the byte path
//! (`AddressSpace::read` / `write`): the same device calls, results, flushes
//! and ioeventfd signals, whatever the ops' constraints and byte order and
//! whatever changes between accesses.

use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use topos_runtime::{
    new_event_notifier, Endianness, EventNotifier, FlushHook, HwAddr, ImplConstraints, MemoryRegion, MemoryRegionOps,
    OpsConfig, Topology, ValidConstraints,
};

/// One device call: (device, write, addr, value, size).
type Call = (u8, bool, u64, u64, u32);

/// Every device call, in order.
#[derive(Default)]
struct Calls(Mutex<Vec<Call>>);

impl Calls {
    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A device that records its calls, answers reads from the address, and
/// refuses (`accepts`) the accesses whose end falls on `refuse` modulo 5.
struct Recorder {
    id: u8,
    calls: Arc<Calls>,
    refuse: Option<u64>,
}

impl MemoryRegionOps for Recorder {
    fn read(&self, addr: u64, size: u32) -> u64 {
        self.calls.0.lock().unwrap().push((self.id, false, addr, 0, size));
        0x1122_3344_5566_7788u64.rotate_right((addr * 8 % 64) as u32) ^ u64::from(self.id)
    }
    fn write(&self, addr: u64, value: u64, size: u32) {
        self.calls.0.lock().unwrap().push((self.id, true, addr, value, size));
    }
    fn accepts(&self, addr: HwAddr, size: u32, _is_write: bool) -> bool {
        self.refuse != Some((addr + u64::from(size)) % 5)
    }
}

#[test]
fn value_accesses_reach_devices_as_byte_accesses_do() {
    // A device that takes 1..4-byte accesses and one that takes only
    // bytes (which splits wider accesses): the value path (the
    // interpreter's) must make exactly the calls the byte-buffer path
    // makes, with the same results.
    for config in [OpsConfig::default(), OpsConfig::with_impl(1, 1)] {
        let topo = Topology::new();
        let s = topo.standard_spaces().unwrap();
        let calls = Arc::new(Calls::default());
        let dev = topo.new_io("dev", Recorder { id: 0, calls: calls.clone(), refuse: None }, config, 0x100).unwrap();
        s.system.add_subregion(0x1000, &dev).unwrap();
        let mut acc = s.memory.accessor();
        for size in [1u32, 2, 4, 8] {
            for addr in [0x1000u64, 0x1003, 0x10fe] {
                calls.take();
                let bytes = acc.write_u64(addr, 0x0102_0304_0506_0708, size);
                let r = acc.read_u64(addr, size);
                let by_bytes = calls.take();
                // Three times: the second time the range is cached, the
                // third a plain access is remembered.
                for _ in 0..3 {
                    let value = acc.write_value(addr, 0x0102_0304_0506_0708, size);
                    let v = acc.read_value(addr, size);
                    let by_value = calls.take();
                    assert_eq!((value, v), (bytes, r), "size {size} at {addr:#x}");
                    assert_eq!(by_value, by_bytes, "size {size} at {addr:#x}");
                }
            }
        }
    }
}

/// A step of the property test.
#[derive(Debug, Clone)]
enum Step {
    /// `count` accesses of `size` bytes, one after the other from `addr`
    /// (as a driver walks a device's registers).
    Access { write: bool, addr: u64, size: u32, count: u64, value: u64 },
    /// Moves device B (a ROM device) to 0x1020, 0x1028 or 0x1040.
    MoveB(usize),
    /// Accesses to device A flush coalesced MMIO first, or stop doing so.
    FlushA(bool),
    /// An ioeventfd on A: (offset, size, match data, data).
    EventfdA(u64, u64, bool, u64),
    /// B's reads go to its RAM (romd mode) or to its ops.
    RomdB(bool),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let size = prop::sample::select(vec![1u32, 2, 4, 8, 3]);
    prop_oneof![
        12 => (any::<bool>(), addr_strategy(), size, 1u64..=4, value_strategy())
            .prop_map(|(write, addr, size, count, value)| Step::Access { write, addr, size, count, value }),
        1 => (0usize..3).prop_map(Step::MoveB),
        1 => any::<bool>().prop_map(Step::FlushA),
        1 => (prop::sample::select(vec![0u64, 4, 8, 0x10]), prop::sample::select(vec![0u64, 1, 2, 4, 8]), any::<bool>(), 0u64..4)
            .prop_map(|(o, s, m, d)| Step::EventfdA(o, s, m, d)),
        1 => any::<bool>().prop_map(Step::RomdB),
    ]
}

/// Anywhere from the end of RAM to past B's last place, with the places
/// where A's ioeventfds sit and the ranges' edges drawn more often.
fn addr_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        0x0ff8u64..0x1068,
        prop::sample::select(vec![0x1000u64, 0x1004, 0x1008, 0x1010, 0x1018, 0x101c, 0x1020, 0x1024, 0x1028, 0x1040]),
    ]
}

/// Values an ioeventfd matches, now and then.
fn value_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..4, any::<u64>()]
}

fn config_strategy() -> impl Strategy<Value = OpsConfig> {
    let size = || prop::sample::select(vec![0u32, 1, 2, 4, 8]);
    let endianness = prop::sample::select(vec![Endianness::Native, Endianness::Little, Endianness::Big]);
    (endianness, size(), size(), any::<bool>(), size(), size(), any::<bool>())
        .prop_map(|(endianness, vmin, vmax, vu, imin, imax, iu)| OpsConfig {
            endianness,
            valid: ValidConstraints { min_access_size: vmin, max_access_size: vmax, unaligned: vu },
            impl_: ImplConstraints { min_access_size: imin, max_access_size: imax, unaligned: iu },
        })
        .prop_filter("valid constraints", |c| c.validate().is_ok())
}

/// RAM below 0x1000, I/O device A at 0x1000 (0x20 bytes), ROM device B
/// (0x20 bytes) after it, partly under 3 bytes of RAM; everything
/// recorded.
struct Rig {
    /// Keeps the regions' topology alive.
    _topo: Topology,
    system: MemoryRegion,
    memory: topos_runtime::AddressSpace,
    a: MemoryRegion,
    b: MemoryRegion,
    calls: Arc<Calls>,
    flushes: Arc<AtomicUsize>,
    _hook: FlushHook,
    eventfds: Vec<EventNotifier>,
}

impl Rig {
    fn new(ca: OpsConfig, cb: OpsConfig, refuse: Option<u64>) -> Rig {
        let topo = Topology::new();
        let s = topo.standard_spaces().unwrap();
        let calls = Arc::new(Calls::default());
        let ram = topo.new_ram("ram", 0x1000).unwrap();
        s.system.add_subregion(0, &ram).unwrap();
        let a = topo.new_io("a", Recorder { id: 1, calls: calls.clone(), refuse }, ca, 0x20).unwrap();
        s.system.add_subregion(0x1000, &a).unwrap();
        let b = topo.new_rom_device("b", Recorder { id: 2, calls: calls.clone(), refuse }, cb, 0x20).unwrap();
        s.system.add_subregion(0x1020, &b).unwrap();
        // Over B at its first place: B's first range there ends at 0x1025,
        // where an aligned access may not fit.
        let patch = topo.new_ram("patch", 3).unwrap();
        s.system.add_subregion_overlap(0x1025, &patch, 1).unwrap();
        let flushes = Arc::new(AtomicUsize::new(0));
        let f = flushes.clone();
        let hook: FlushHook = Arc::new(move || {
            f.fetch_add(1, Ordering::SeqCst);
        });
        topo.set_coalesced_flush_hook(Some(&hook));
        Rig { _topo: topo, system: s.system, memory: s.memory, a, b, calls, flushes, _hook: hook, eventfds: Vec::new() }
    }

    /// Signals of each ioeventfd since the last call.
    fn signals(&self) -> Vec<u64> {
        self.eventfds.iter().map(|e| e.read().unwrap_or(0)).collect()
    }

    /// What an access did: its result, the device calls, the flushes and
    /// the ioeventfd signals.
    fn observe<R>(&self, access: impl FnOnce() -> R) -> (R, Vec<Call>, usize, Vec<u64>) {
        let before = self.flushes.load(Ordering::SeqCst);
        let r = access();
        (r, self.calls.take(), self.flushes.load(Ordering::SeqCst) - before, self.signals())
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Access { .. } => unreachable!("accesses are compared, not applied"),
            Step::MoveB(i) => {
                self.system.del_subregion(&self.b).unwrap();
                self.system.add_subregion([0x1020, 0x1028, 0x1040][i], &self.b).unwrap();
            }
            Step::FlushA(on) => {
                if on {
                    self.a.set_flush_coalesced().unwrap();
                } else {
                    self.a.clear_flush_coalesced().unwrap();
                }
            }
            Step::EventfdA(off, size, match_data, data) => {
                let n = new_event_notifier().unwrap();
                if self.a.add_eventfd(off, size, match_data, data, &n).is_ok() {
                    self.eventfds.push(n);
                }
            }
            Step::RomdB(on) => self.b.rom_device_set_readable(on).unwrap(),
        }
        // Flushes of the topology's own transactions are not the accesses'.
        self.flushes.store(0, Ordering::SeqCst);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(topos_tests::proptest_cases(300)))]

    #[test]
    fn the_value_path_matches_the_byte_path(
        ca in config_strategy(),
        cb in config_strategy(),
        refuse in prop::option::weighted(0.3, 0u64..5),
        steps in prop::collection::vec(step_strategy(), 1..120),
    ) {
        let mut rig = Rig::new(ca, cb, refuse);
        let mut acc = rig.memory.accessor();
        for (i, step) in steps.iter().enumerate() {
            let Step::Access { write, addr, size, count, value } = *step else {
                rig.apply(step);
                continue;
            };
            let n = (size as usize).min(8);
            for addr in (0..count).map(|k| addr + k * u64::from(size)) {
                let (by_value, by_bytes) = if write {
                    let v = rig.observe(|| (acc.write_value(addr, value, size), 0));
                    let b = rig.observe(|| (rig.memory.write(addr, &value.to_le_bytes()[..n]), 0));
                    (v, b)
                } else {
                    let v = rig.observe(|| {
                        let (x, r) = acc.read_value(addr, size);
                        (r, x)
                    });
                    let b = rig.observe(|| {
                        let mut buf = [0u8; 8];
                        let r = rig.memory.read(addr, &mut buf[..n]);
                        (r, u64::from_le_bytes(buf))
                    });
                    (v, b)
                };
                prop_assert_eq!(&by_value, &by_bytes, "step {} at {:#x}: {:?}", i, addr, step);
            }
        }
    }
}
