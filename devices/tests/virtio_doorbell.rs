//! The virtio-mmio doorbell, driven through address-space accesses as a
//! guest would.
// Runs real threads and a tokio runtime: not a loom model.
#![cfg(not(topos_loom))]

mod support;

use proptest::prelude::*;
use std::sync::{mpsc, Arc, Mutex};
use support::WAIT;
use topos_devices::runtime::{
    AddressSpace, EventNotifier, ListenerResult, MemTxResult, MemoryListener, MemoryRegion, MemoryRegionSection,
    Topology,
};
use topos_devices::virtio_doorbell::{
    reg, Doorbell, DoorbellConfig, Kick, KickPath, NotifyMatch, VirtioDoorbell, F_VERSION_1, INT_VRING, MAGIC, REGS,
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VENDOR_QEMU, VERSION,
};
use topos_devices::{DeviceModel, Error, IrqLine, LevelRecorder};

const BASE: u64 = 0x1000_0000;
const MOVED: u64 = 0x2000_0000;
const IRQ: u32 = 7;

struct Board {
    /// Keeps the topology alive.
    _board: support::Board,
    topo: Topology,
    system: MemoryRegion,
    mem: AddressSpace,
    dev: Doorbell,
    region: MemoryRegion,
    irqs: Arc<LevelRecorder>,
    kicks: mpsc::Receiver<Kick>,
}

/// A doorbell of `config` at [`BASE`], its kicks sent to `kicks`.
fn board(config: DoorbellConfig) -> Board {
    let board = support::Board::new();
    let irqs = LevelRecorder::new();
    let (tx, kicks) = mpsc::channel();
    let config = DoorbellConfig { backend: Some(tx), ..config };
    let ctx = board.ctx("virtio-mmio").with_irq(IrqLine::new(irqs.clone(), IRQ));
    let plugged = board.plug_mem::<VirtioDoorbell>(config, ctx, REGS, BASE);
    let region = plugged.region(REGS).unwrap().clone();
    let (topo, system, mem) = (board.topo.clone(), board.spaces.system.clone(), board.spaces.memory.clone());
    Board { _board: board, topo, system, mem, dev: plugged.handle, region, irqs, kicks }
}

impl Board {
    fn read(&self, r: u64) -> u64 {
        let (v, res) = self.mem.read_u64(BASE + r, 4);
        assert_eq!(res, MemTxResult::Ok);
        v
    }
    fn write(&self, r: u64, v: u64) {
        assert_eq!(self.mem.write_u64(BASE + r, v, 4), MemTxResult::Ok);
    }
    fn writes(&self) -> u64 {
        self.dev.handle().with(|d, _| d.writes()).unwrap()
    }
    /// The driver's side of the handshake, with queue 0 set up.
    fn bring_up(&self) {
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, STATUS_ACKNOWLEDGE as u64);
        self.write(reg::STATUS, (STATUS_ACKNOWLEDGE | STATUS_DRIVER) as u64);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, 1);
        self.write(reg::STATUS, (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK) as u64);
        assert_ne!(self.read(reg::STATUS) as u32 & STATUS_FEATURES_OK, 0);
        self.write(reg::QUEUE_SEL, 0);
        assert_eq!(self.read(reg::QUEUE_NUM_MAX), 256);
        self.write(reg::QUEUE_NUM, 128);
        self.write(reg::QUEUE_DESC_LOW, 0x1000);
        self.write(reg::QUEUE_DRIVER_LOW, 0x2000);
        self.write(reg::QUEUE_DEVICE_LOW, 0x3000);
        self.write(reg::QUEUE_READY, 1);
        self.write(reg::STATUS, (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK) as u64);
    }
}

#[test]
fn identification_registers_read_back() {
    let b = board(DoorbellConfig { device_id: 4, ..DoorbellConfig::default() });
    assert_eq!(b.read(reg::MAGIC_VALUE), MAGIC as u64);
    assert_eq!(b.read(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(b.read(reg::VERSION), VERSION as u64);
    assert_eq!(b.read(reg::VERSION), 2);
    assert_eq!(b.read(reg::DEVICE_ID), 4);
    assert_eq!(b.read(reg::VENDOR_ID), VENDOR_QEMU as u64);
    b.write(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(b.read(reg::DEVICE_FEATURES), F_VERSION_1 >> 32);
    // Registers take 32-bit accesses only.
    assert_eq!(b.mem.read_u64(BASE + reg::MAGIC_VALUE, 2), (0, MemTxResult::Ok));
}

#[test]
fn queue_registers_read_back() {
    let b = board(DoorbellConfig::default());
    b.bring_up();
    assert_eq!(b.read(reg::QUEUE_NUM), 128);
    assert_eq!(b.read(reg::QUEUE_READY), 1);
    assert_eq!(b.read(reg::QUEUE_DESC_LOW), 0x1000);
    b.write(reg::QUEUE_DESC_HIGH, 0x12);
    assert_eq!(b.read(reg::QUEUE_DESC_HIGH), 0x12);
    assert_eq!(b.read(reg::QUEUE_DRIVER_LOW), 0x2000);
    assert_eq!(b.read(reg::QUEUE_DEVICE_LOW), 0x3000);
    // A queue that does not exist reads 0 and ignores writes.
    b.write(reg::QUEUE_SEL, 5);
    assert_eq!(b.read(reg::QUEUE_NUM_MAX), 0);
    b.write(reg::QUEUE_NUM, 16);
    assert_eq!(b.read(reg::QUEUE_NUM), 0);
    // Reset clears everything.
    b.write(reg::STATUS, 0);
    b.write(reg::QUEUE_SEL, 0);
    assert_eq!([b.read(reg::STATUS), b.read(reg::QUEUE_READY), b.read(reg::QUEUE_NUM)], [0, 0, 0]);
}

#[test]
fn unoffered_features_refuse_features_ok() {
    let b = board(DoorbellConfig::default());
    b.write(reg::STATUS, (STATUS_ACKNOWLEDGE | STATUS_DRIVER) as u64);
    b.write(reg::DRIVER_FEATURES_SEL, 0);
    b.write(reg::DRIVER_FEATURES, 1 << 5);
    b.write(reg::STATUS, (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK) as u64);
    assert_eq!(b.read(reg::STATUS) as u32 & STATUS_FEATURES_OK, 0);
}

#[test]
fn queue_notify_wakes_the_actor_through_the_eventfd_not_the_write_handler() {
    let b = board(DoorbellConfig::default());
    b.bring_up();
    let writes = b.writes();
    assert!(!b.irqs.level(IRQ));

    b.write(reg::QUEUE_NOTIFY, 0);
    assert_eq!(b.kicks.recv_timeout(WAIT).unwrap(), Kick { queue: Some(0), path: KickPath::Ioeventfd });
    assert_eq!(b.writes(), writes, "the doorbell write skipped the device's write handler");
    let h = b.dev.handle();
    assert_eq!(h.with(|d, _| (d.kicks(0), d.trapped_kicks())).unwrap(), (1, 0));

    // The kick is answered with a used-buffer interrupt until acknowledged.
    assert!(b.irqs.level(IRQ));
    assert_eq!(b.read(reg::INTERRUPT_STATUS), INT_VRING as u64);
    b.write(reg::INTERRUPT_ACK, INT_VRING as u64);
    assert_eq!(b.read(reg::INTERRUPT_STATUS), 0);
    assert!(!b.irqs.level(IRQ));
    assert_eq!(b.irqs.rising_edges(), 1);
}

#[test]
fn writes_no_eventfd_matches_reach_the_write_handler() {
    let b = board(DoorbellConfig { num_queues: 2, ..DoorbellConfig::default() });
    b.bring_up();
    let writes = b.writes();
    // A queue that does not exist: no eventfd matches its index.
    b.write(reg::QUEUE_NOTIFY, 9);
    // Another size: the 4-byte eventfd does not match; the handler ignores it.
    assert_eq!(b.mem.write_u64(BASE + reg::QUEUE_NOTIFY, 1, 2), MemTxResult::Ok);
    assert_eq!(b.writes(), writes + 2);
    // Queue 1's doorbell is its own eventfd.
    b.write(reg::QUEUE_NOTIFY, 1);
    assert_eq!(b.kicks.recv_timeout(WAIT).unwrap(), Kick { queue: Some(1), path: KickPath::Ioeventfd });
    let h = b.dev.handle();
    assert_eq!(h.with(|d, _| (d.kicks(0), d.kicks(1), d.trapped_kicks())).unwrap(), (0, 1, 0));
    // Queue 1 is not ready: no interrupt.
    assert!(!b.irqs.level(IRQ));
    assert!(b.kicks.try_recv().is_err());
}

#[test]
fn a_doorbell_without_data_match_takes_any_value() {
    let b = board(DoorbellConfig { notify: NotifyMatch::Any, num_queues: 2, ..DoorbellConfig::default() });
    assert_eq!(b.dev.notifiers().len(), 1);
    let writes = b.writes();
    b.write(reg::QUEUE_NOTIFY, 0x1234);
    assert_eq!(b.kicks.recv_timeout(WAIT).unwrap(), Kick { queue: None, path: KickPath::Ioeventfd });
    assert_eq!(b.writes(), writes);
    assert_eq!(b.dev.handle().with(|d, _| d.anonymous_kicks()).unwrap(), 1);
}

/// Records the ioeventfd callbacks: (what, address, match_data, data).
#[derive(Default)]
struct EventfdLog(Mutex<Vec<(&'static str, u64, bool, u64)>>);

impl MemoryListener for EventfdLog {
    fn wants_region_nop(&self) -> bool {
        false
    }
    fn eventfd_add(&self, s: &MemoryRegionSection, match_data: bool, data: u64, _e: &EventNotifier) -> ListenerResult {
        self.0.lock().unwrap().push(("add", s.offset_within_address_space, match_data, data));
        Ok(())
    }
    fn eventfd_del(&self, s: &MemoryRegionSection, match_data: bool, data: u64, _e: &EventNotifier) -> ListenerResult {
        self.0.lock().unwrap().push(("del", s.offset_within_address_space, match_data, data));
        Ok(())
    }
}

impl EventfdLog {
    fn take(&self) -> Vec<(&'static str, u64, bool, u64)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[test]
fn moving_the_device_moves_its_doorbell() {
    let b = board(DoorbellConfig::default());
    let log = Arc::new(EventfdLog::default());
    b.topo.listener_register(log.clone(), 0, Some(&b.mem)).unwrap();
    assert_eq!(log.take(), vec![("add", BASE + reg::QUEUE_NOTIFY, true, 0)], "replayed on registration");
    b.bring_up();

    b.region.set_address(MOVED).unwrap();
    assert_eq!(b.region.container().as_ref(), Some(&b.system));
    let mut seen = log.take();
    seen.sort();
    assert_eq!(seen, vec![("add", MOVED + reg::QUEUE_NOTIFY, true, 0), ("del", BASE + reg::QUEUE_NOTIFY, true, 0)]);

    // The old address no longer reaches the device at all.
    assert_eq!(b.mem.write_u64(BASE + reg::QUEUE_NOTIFY, 0, 4), MemTxResult::DecodeError);
    assert_eq!(b.mem.read_u64(BASE + reg::MAGIC_VALUE, 4).1, MemTxResult::DecodeError);
    let h = b.dev.handle();
    assert_eq!(h.with(|d, _| d.kicks(0)).unwrap(), 0);

    // The new one rings the same doorbell.
    assert_eq!(b.mem.read_u64(MOVED + reg::MAGIC_VALUE, 4), (MAGIC as u64, MemTxResult::Ok));
    let writes = b.writes();
    assert_eq!(b.mem.write_u64(MOVED + reg::QUEUE_NOTIFY, 0, 4), MemTxResult::Ok);
    assert_eq!(b.kicks.recv_timeout(WAIT).unwrap(), Kick { queue: Some(0), path: KickPath::Ioeventfd });
    assert_eq!(h.with(|d, _| d.kicks(0)).unwrap(), 1);
    assert_eq!(b.writes(), writes);
    assert!(b.kicks.try_recv().is_err(), "the write to the old address did not ring");
}

#[test]
fn a_doorbell_without_queues_or_with_too_many_is_a_configuration_error() {
    let board = support::Board::new();
    for num_queues in [0, 1025] {
        let r = VirtioDoorbell::plug(DoorbellConfig { num_queues, ..DoorbellConfig::default() }, board.ctx("bad"));
        assert!(matches!(r, Err(Error::InvalidConfig { device: "virtio-mmio", .. })), "{num_queues}: {r:?}");
    }
}

#[test]
fn the_actor_stops_when_its_region_goes() {
    let b = board(DoorbellConfig::default());
    let h = b.dev.handle().clone();
    b.system.del_subregion(&b.region).unwrap();
    drop(b.region);
    assert!(!h.is_alive());
}

#[derive(Debug, Clone)]
struct Access {
    off: u64,
    size: u32,
    value: Option<u32>,
}

fn access() -> impl Strategy<Value = Access> {
    let regs = vec![
        reg::DEVICE_FEATURES_SEL,
        reg::DRIVER_FEATURES,
        reg::DRIVER_FEATURES_SEL,
        reg::QUEUE_SEL,
        reg::QUEUE_NUM,
        reg::QUEUE_READY,
        reg::QUEUE_NOTIFY,
        reg::INTERRUPT_STATUS,
        reg::INTERRUPT_ACK,
        reg::STATUS,
        reg::QUEUE_DESC_HIGH,
    ];
    let off = prop_oneof![3 => proptest::sample::select(regs), 1 => 0u64..0x200];
    let size = prop_oneof![4 => Just(4u32), 1 => Just(1u32), 1 => Just(2u32)];
    let value = prop_oneof![3 => 0u32..4, 1 => 0u32..0x10, 1 => any::<u32>()];
    (off, size, proptest::option::of(value)).prop_map(|(off, size, value)| Access {
        off: off.min(0x200 - size as u64) & !(size as u64 - 1),
        size,
        value,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random register accesses (doorbell included): the device never
    /// fails, its identity never changes, and its interrupt line is high
    /// exactly while the interrupt status is non-zero.
    #[test]
    fn random_accesses(accesses in proptest::collection::vec(access(), 1..64),
                       per_queue in any::<bool>()) {
        let notify = if per_queue { NotifyMatch::PerQueue } else { NotifyMatch::Any };
        let b = board(DoorbellConfig { num_queues: 2, notify, ..DoorbellConfig::default() });
        let h = b.dev.handle();
        for a in &accesses {
            match a.value {
                Some(v) => prop_assert_eq!(b.mem.write_u64(BASE + a.off, v as u64, a.size), MemTxResult::Ok),
                None => prop_assert_eq!(b.mem.read_u64(BASE + a.off, a.size).1, MemTxResult::Ok),
            }
            let (isr, level) = h
                .with(|d, ctx| (d.interrupt_status(), ctx.irq(0).map(|l| l.level())))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(level, Some(isr != 0), "irq line follows the interrupt status after {:?}", a);
        }
        prop_assert_eq!(b.read(reg::MAGIC_VALUE), MAGIC as u64);
        prop_assert_eq!(b.read(reg::VERSION), 2);
        prop_assert!(!h.is_failed());
    }
}
