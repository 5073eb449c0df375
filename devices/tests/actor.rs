//! The actor harness: ordering, posting, unplug, failure containment,
//! ioeventfd and timer wake-ups, re-entrancy.
// Runs real threads and a tokio runtime: not a loom model.
#![cfg(not(topos_loom))]

mod support;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::WAIT;
use topos_devices::runtime::{new_event_notifier, AddressSpace, MemTxResult, OpsConfig, Topology};
use topos_devices::{ActorError, Device, DeviceCtx, DeviceRuntime, IrqLine, LevelRecorder, Spawned};

/// Sums what is written; reads return the sum. A write of `BLOCK` parks
/// the writer (holding the actor's turn) until `gate` is released; a write
/// of `PANIC` panics.
struct Summer {
    sum: u64,
    writes: u64,
    gate: Option<mpsc::Receiver<()>>,
    entered: Option<mpsc::Sender<()>>,
    events: Option<mpsc::Sender<String>>,
    on_unplug: Arc<Mutex<Option<(u64, u64)>>>,
}

const BLOCK: u64 = 0xb10c;
const PANIC: u64 = 0x666;

impl Device for Summer {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, region: usize, addr: u64, _size: u32) -> u64 {
        if region == 1 && addr == 0 {
            return self.writes;
        }
        self.sum
    }
    fn write(&mut self, ctx: &mut DeviceCtx<'_>, _region: usize, addr: u64, value: u64, _size: u32) {
        match value {
            BLOCK => {
                if let Some(e) = &self.entered {
                    let _ = e.send(());
                }
                if let Some(g) = &self.gate {
                    let _ = g.recv();
                }
            }
            PANIC => panic!("device bug"),
            _ if addr == 8 => ctx.set_timer(Duration::from_millis(1), value),
            _ => {
                self.sum += value;
                self.writes += 1;
            }
        }
    }
    fn eventfd(&mut self, _ctx: &mut DeviceCtx<'_>, index: usize) {
        if let Some(e) = &self.events {
            let _ = e.send(format!("eventfd {index}"));
        }
    }
    fn timer(&mut self, ctx: &mut DeviceCtx<'_>, token: u64) {
        if let Some(irq) = ctx.irq(0) {
            irq.raise();
        }
        if let Some(e) = &self.events {
            let _ = e.send(format!("timer {token}"));
        }
    }
    fn unplugged(&mut self, _ctx: &mut DeviceCtx<'_>) {
        *self.on_unplug.lock().unwrap() = Some((self.sum, self.writes));
    }
}

fn summer() -> Summer {
    Summer { sum: 0, writes: 0, gate: None, entered: None, events: None, on_unplug: Arc::new(Mutex::new(None)) }
}

/// The harness is tested on its own actors (`Spawned`), mapped in system
/// memory.
struct Board {
    topo: Topology,
    mem: AddressSpace,
    root: topos_devices::runtime::MemoryRegion,
    _board: support::Board,
}

fn board() -> Board {
    let board = support::Board::new();
    let (topo, mem, root) = (board.topo.clone(), board.spaces.memory.clone(), board.spaces.system.clone());
    Board { topo, mem, root, _board: board }
}

fn map(b: &Board, name: &str, s: &Spawned<Summer>, region: usize, at: u64) -> topos_devices::runtime::MemoryRegion {
    let r = b.topo.new_io_arc(name, s.ops(region), OpsConfig::default(), 0x100).unwrap();
    b.root.add_subregion(at, &r).unwrap();
    r
}

#[test]
fn posted_writes_then_a_read_from_another_thread_sees_them_all() {
    let rt = DeviceRuntime::new().unwrap();
    let b = board();
    let (gate_tx, gate_rx) = mpsc::channel();
    let (entered_tx, entered_rx) = mpsc::channel();
    let dev = Summer { gate: Some(gate_rx), entered: Some(entered_tx), ..summer() };
    let s = Spawned::new("summer", dev, vec![], &rt);
    let _r = map(&b, "summer", &s, 0, 0x1000);
    let _r1 = map(&b, "summer-stats", &s, 1, 0x2000);
    drop(s);

    // A vCPU holds the device's turn (its write is parked inside the device).
    let blocker = {
        let mem = b.mem.clone();
        std::thread::spawn(move || mem.write_u64(0x1000, BLOCK, 4))
    };
    entered_rx.recv_timeout(WAIT).unwrap();
    // Writes from here are posted: they return at once although the device
    // is busy.
    for v in 1..=100u64 {
        assert_eq!(b.mem.write_u64(0x1000, v, 4), MemTxResult::Ok);
    }
    // A read from a third thread waits for its reply, behind the writes.
    let reader = {
        let mem = b.mem.clone();
        std::thread::spawn(move || (mem.read_u64(0x1000, 4), mem.read_u64(0x2000, 4)))
    };
    gate_tx.send(()).unwrap();
    assert_eq!(blocker.join().unwrap(), MemTxResult::Ok);
    let ((sum, r1), (writes, r2)) = reader.join().unwrap();
    assert_eq!((r1, r2), (MemTxResult::Ok, MemTxResult::Ok));
    assert_eq!(sum, 5050);
    assert_eq!(writes, 100);
}

#[test]
fn unplug_while_busy_loses_no_posted_write_and_later_accesses_miss() {
    let rt = DeviceRuntime::new().unwrap();
    let b = board();
    let (gate_tx, gate_rx) = mpsc::channel();
    let (entered_tx, entered_rx) = mpsc::channel();
    let dev = Summer { gate: Some(gate_rx), entered: Some(entered_tx), ..summer() };
    let unplugged = dev.on_unplug.clone();
    let s = Spawned::new("summer", dev, vec![], &rt);
    let handle = s.handle();
    let r = map(&b, "summer", &s, 0, 0x1000);
    drop(s);
    let blocker = {
        let mem = b.mem.clone();
        std::thread::spawn(move || mem.write_u64(0x1000, BLOCK, 4))
    };
    entered_rx.recv_timeout(WAIT).unwrap();
    for v in 1..=10u64 {
        assert_eq!(b.mem.write_u64(0x1000, v, 4), MemTxResult::Ok);
    }
    // Unplug while the device is busy and writes are queued.
    b.root.del_subregion(&r).unwrap();
    r.destroy().unwrap();
    drop(r);
    // Accesses after the removal never reach the device.
    assert_eq!(b.mem.write_u64(0x1000, 1000, 4), MemTxResult::DecodeError);
    assert!(handle.is_alive(), "the busy vCPU's view still holds the device");
    gate_tx.send(()).unwrap();
    assert_eq!(blocker.join().unwrap(), MemTxResult::Ok);
    // The vCPU's view is gone: the actor drained its mailbox and stopped.
    assert!(!handle.is_alive());
    assert_eq!(*unplugged.lock().unwrap(), Some((55, 10)));
    assert_eq!(handle.with(|d, _| d.sum), Err(ActorError::Gone));
}

#[test]
fn a_panicking_device_is_contained() {
    let rt = DeviceRuntime::new().unwrap();
    let b = board();
    let bad = Spawned::new("bad", summer(), vec![], &rt);
    let good = Spawned::new("good", summer(), vec![], &rt);
    let (bh, gh) = (bad.handle(), good.handle());
    let _rb = map(&b, "bad", &bad, 0, 0x1000);
    let _rg = map(&b, "good", &good, 0, 0x2000);
    drop((bad, good));
    assert_eq!(b.mem.write_u64(0x1000, 5, 4), MemTxResult::Ok);
    assert_eq!(b.mem.write_u64(0x1000, PANIC, 4), MemTxResult::AccessError);
    assert!(bh.is_failed());
    // Answers like an unassigned address, with an error result.
    assert_eq!(b.mem.read_u64(0x1000, 4), (0, MemTxResult::AccessError));
    assert_eq!(b.mem.write_u64(0x1000, 5, 4), MemTxResult::AccessError);
    assert_eq!(bh.with(|d, _| d.sum), Err(ActorError::Failed));
    // The other device and the topology are unaffected.
    assert_eq!(b.mem.write_u64(0x2000, 7, 4), MemTxResult::Ok);
    assert_eq!(b.mem.read_u64(0x2000, 4), (7, MemTxResult::Ok));
    assert_eq!(gh.with(|d, _| d.writes), Ok(1));
    let extra = b.topo.new_ram("ram", 0x100).unwrap();
    b.root.add_subregion(0x3000, &extra).unwrap();
}

#[test]
fn ioeventfd_and_timer_wake_the_actor() {
    let rt = DeviceRuntime::new().unwrap();
    let b = board();
    let (ev_tx, ev_rx) = mpsc::channel();
    let irqs = LevelRecorder::new();
    let dev = Summer { events: Some(ev_tx), ..summer() };
    let s = Spawned::new("summer", dev, vec![IrqLine::new(irqs.clone(), 5)], &rt);
    let h = s.handle();
    let r = map(&b, "summer", &s, 0, 0x1000);
    drop(s);
    let e = new_event_notifier().unwrap();
    r.add_eventfd(0x10, 4, false, 0, &e).unwrap();
    h.watch_eventfd(e, 3).unwrap();
    // A guest write to the doorbell signals the eventfd instead of reaching
    // the device's write handler; the actor is woken through its mailbox.
    assert_eq!(b.mem.write_u64(0x1010, 42, 4), MemTxResult::Ok);
    assert_eq!(ev_rx.recv_timeout(WAIT).unwrap(), "eventfd 3");
    assert_eq!(h.with(|d, _| d.writes), Ok(0));
    // A timer raises the interrupt line.
    assert_eq!(b.mem.write_u64(0x1008, 77, 4), MemTxResult::Ok);
    assert_eq!(ev_rx.recv_timeout(WAIT).unwrap(), "timer 77");
    assert!(irqs.level(5));
    assert_eq!(irqs.rising_edges(), 1);
}

/// Reads its own region through the address space from inside a handler.
struct Loopy {
    mem: Option<AddressSpace>,
    seen: Option<MemTxResult>,
}

impl Device for Loopy {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: u64, _size: u32) -> u64 {
        1
    }
    fn write(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: u64, _value: u64, _size: u32) {
        if let Some(m) = &self.mem {
            self.seen = Some(m.read_u64(0x1000, 4).1);
        }
    }
}

#[test]
fn re_entrant_access_is_refused_instead_of_deadlocking() {
    let rt = DeviceRuntime::new().unwrap();
    let b = board();
    let s = Spawned::new("loopy", Loopy { mem: Some(b.mem.clone()), seen: None }, vec![], &rt);
    let h = s.handle();
    let r = b.topo.new_io_arc("loopy", s.ops(0), OpsConfig::default(), 0x100).unwrap();
    b.root.add_subregion(0x1000, &r).unwrap();
    drop(s);
    assert_eq!(b.mem.write_u64(0x1000, 1, 4), MemTxResult::Ok);
    assert_eq!(h.with(|d, _| d.seen), Ok(Some(MemTxResult::AccessError)));
    // Break the cycle device → address space → region → device.
    h.with(|d, _| d.mem = None).unwrap();
}

/// Defers a topology change from its write handler.
struct Mover {
    target: Option<topos_devices::runtime::WeakRegion>,
    entered: Option<mpsc::Sender<()>>,
    gate: Option<mpsc::Receiver<()>>,
}

impl Device for Mover {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: u64, _size: u32) -> u64 {
        0
    }
    fn write(&mut self, ctx: &mut DeviceCtx<'_>, _region: usize, _addr: u64, value: u64, _size: u32) {
        if let Some(e) = &self.entered {
            let _ = e.send(());
        }
        if let Some(g) = &self.gate {
            let _ = g.recv();
        }
        let target = self.target.clone();
        ctx.defer(move || {
            if let Some(t) = target.and_then(|w| w.upgrade()) {
                let _ = t.set_address(value);
            }
        });
    }
}

#[test]
fn deferred_topology_changes_do_not_deadlock_with_a_transaction() {
    let rt = DeviceRuntime::new().unwrap();
    let b = board();
    let ram = b.topo.new_ram("ram", 0x100).unwrap();
    b.root.add_subregion(0x4000, &ram).unwrap();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (gate_tx, gate_rx) = mpsc::channel();
    let dev = Mover { target: Some(ram.downgrade()), entered: Some(entered_tx), gate: Some(gate_rx) };
    let s = Spawned::new("mover", dev, vec![], &rt);
    let h = s.handle();
    let r = b.topo.new_io_arc("mover", s.ops(0), OpsConfig::default(), 0x100).unwrap();
    b.root.add_subregion(0x1000, &r).unwrap();
    drop(s);
    // A vCPU writes to the device; its handler will move `ram`.
    let vcpu = {
        let mem = b.mem.clone();
        std::thread::spawn(move || mem.write_u64(0x1000, 0x8000, 4))
    };
    entered_rx.recv_timeout(WAIT).unwrap();
    // Meanwhile this thread opens a transaction and then needs the device.
    let (done_tx, done_rx) = mpsc::channel();
    let (in_txn_tx, in_txn_rx) = mpsc::channel();
    let topo = b.topo.clone();
    let embedder = std::thread::spawn(move || {
        topo.begin().unwrap();
        in_txn_tx.send(()).unwrap();
        let seen = h.with(|_, _| ()).is_ok();
        topo.commit().unwrap();
        done_tx.send(seen).unwrap();
    });
    // Only now let the handler finish: had it changed the topology while
    // holding the device's turn, it and the embedder would wait for each
    // other forever.
    in_txn_rx.recv_timeout(WAIT).unwrap();
    gate_tx.send(()).unwrap();
    assert!(done_rx.recv_timeout(WAIT).expect("no deadlock"));
    assert_eq!(vcpu.join().unwrap(), MemTxResult::Ok);
    embedder.join().unwrap();
    // The deferred move happened once the vCPU had given the turn back.
    assert_eq!(ram.addr(), 0x8000);
}

/// A device whose write handler runs a script (the value written is passed
/// on); reads return 0.
#[allow(clippy::type_complexity)]
struct Scripted(Box<dyn FnMut(&mut DeviceCtx<'_>, u64) + Send>);

impl Device for Scripted {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: u64, _size: u32) -> u64 {
        0
    }
    fn write(&mut self, ctx: &mut DeviceCtx<'_>, _region: usize, _addr: u64, value: u64, _size: u32) {
        (self.0)(ctx, value)
    }
}

fn scripted(
    b: &Board,
    rt: &DeviceRuntime,
    name: &str,
    at: u64,
    script: impl FnMut(&mut DeviceCtx<'_>, u64) + Send + 'static,
) -> (topos_devices::ActorHandle<Scripted>, topos_devices::runtime::MemoryRegion) {
    let s = Spawned::new(name, Scripted(Box::new(script)), vec![], rt);
    let r = b.topo.new_io_arc(name, s.ops(0), OpsConfig::default(), 0x100).unwrap();
    b.root.add_subregion(at, &r).unwrap();
    (s.handle(), r)
}

#[test]
fn handlers_run_marked_as_holding_a_device_turn() {
    use topos_devices::runtime::turns;
    let rt = DeviceRuntime::new().unwrap();
    let b = board();
    let ram = b.topo.new_ram("ram", 0x100).unwrap();
    b.root.add_subregion(0x4000, &ram).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s2, ram2) = (seen.clone(), ram.clone());
    let (_h, _r) = scripted(&b, &rt, "marked", 0x1000, move |_ctx, _| {
        s2.lock().unwrap().push((turns::holds_device_turn(), ram2.set_enabled(false)));
    });
    assert!(!turns::holds_device_turn());
    assert_eq!(b.mem.write_u64(0x1000, 1, 4), MemTxResult::Ok);
    // A topology change from inside a handler is refused, not waited for.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].0, "the handler's thread was not marked");
    assert!(matches!(seen[0].1, Err(topos_devices::runtime::Error::InsideDeviceTurn)), "{:?}", seen[0].1);
    assert!(ram.is_enabled());
    assert!(!turns::holds_device_turn(), "the mark outlived the turn");
}

#[test]
fn work_deferred_inside_another_devices_turn_waits_for_that_turn_too() {
    let rt = DeviceRuntime::new().unwrap();
    let b = board();
    type Outer = topos_devices::ActorHandle<Scripted>;
    let outer_slot: Arc<Mutex<Option<Outer>>> = Arc::new(Mutex::new(None));
    let result = Arc::new(Mutex::new(None));
    // The inner device defers work that needs the outer device.
    let (slot, res) = (outer_slot.clone(), result.clone());
    let (_inner, _ri) = scripted(&b, &rt, "inner", 0x2000, move |ctx, _| {
        let (slot, res) = (slot.clone(), res.clone());
        ctx.defer(move || {
            let outer = slot.lock().unwrap().clone().unwrap();
            *res.lock().unwrap() = Some(outer.with(|_, _| ()));
        });
    });
    // The outer device writes the inner one from its handler.
    let mem = b.mem.clone();
    let (outer, _ro) = scripted(&b, &rt, "outer", 0x1000, move |_ctx, _| {
        let _ = mem.write_u64(0x2000, 1, 4);
    });
    *outer_slot.lock().unwrap() = Some(outer);
    assert_eq!(b.mem.write_u64(0x1000, 1, 4), MemTxResult::Ok);
    // The deferred work ran once the thread held no turn at all: the outer
    // device was free by then.
    assert_eq!(*result.lock().unwrap(), Some(Ok(())));
    *outer_slot.lock().unwrap() = None;
}

#[test]
fn a_busy_device_is_not_waited_for_from_inside_a_device_turn() {
    let rt = DeviceRuntime::new().unwrap();
    let b = board();
    // `busy` parks its holder until the gate opens.
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let (entered_tx, entered_rx) = mpsc::channel();
    let gate = Mutex::new(gate_rx);
    let (busy, _rb) = scripted(&b, &rt, "busy", 0x2000, move |_ctx, _| {
        entered_tx.send(()).unwrap();
        let _ = gate.lock().unwrap().recv();
    });
    // `caller` reads `busy` and calls into it from its handler.
    let seen = Arc::new(Mutex::new(None));
    let (mem, s2, busy2) = (b.mem.clone(), seen.clone(), busy.clone());
    let (_caller, _rc) = scripted(&b, &rt, "caller", 0x1000, move |_ctx, _| {
        let read = mem.read_u64(0x2000, 4);
        let call = busy2.with(|_, _| ());
        *s2.lock().unwrap() = Some((read, call));
    });
    let holder = {
        let mem = b.mem.clone();
        std::thread::spawn(move || mem.write_u64(0x2000, 1, 4))
    };
    entered_rx.recv_timeout(WAIT).unwrap();
    // The busy device's holder only goes on once this write returns: had the
    // caller's handler waited for it, this would never end.
    let (done_tx, done_rx) = mpsc::channel();
    let mem = b.mem.clone();
    std::thread::spawn(move || done_tx.send(mem.write_u64(0x1000, 1, 4)).unwrap());
    assert_eq!(done_rx.recv_timeout(WAIT).expect("the handler waited for a busy device"), MemTxResult::Ok);
    assert_eq!(
        *seen.lock().unwrap(),
        Some(((0, MemTxResult::AccessError), Err(ActorError::WouldBlock))),
        "refused like a re-entrant access"
    );
    gate_tx.send(()).unwrap();
    assert_eq!(holder.join().unwrap(), MemTxResult::Ok);
    assert_eq!(busy.with(|_, _| ()), Ok(()));
}

/// Its timer and ioeventfd handlers park until the gate opens (a device
/// whose wake-up work is slow); it reports each entry.
struct Slow {
    gate: Mutex<mpsc::Receiver<()>>,
    entered: mpsc::Sender<&'static str>,
}

impl Device for Slow {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: u64, _size: u32) -> u64 {
        0
    }
    fn write(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: u64, _value: u64, _size: u32) {}
    fn timer(&mut self, _ctx: &mut DeviceCtx<'_>, _token: u64) {
        self.entered.send("timer").unwrap();
        let _ = self.gate.lock().unwrap().recv();
    }
    fn eventfd(&mut self, _ctx: &mut DeviceCtx<'_>, _index: usize) {
        self.entered.send("eventfd").unwrap();
        let _ = self.gate.lock().unwrap().recv();
    }
}

#[test]
fn slow_wake_up_handlers_do_not_hold_up_other_devices_wake_ups() {
    // One async worker, as the default runtime has.
    let rt = DeviceRuntime::new().unwrap();
    let b = board();
    let (gate_tx, gate_rx) = mpsc::channel();
    let (entered_tx, entered_rx) = mpsc::channel();
    let slow = Spawned::new("slow", Slow { gate: Mutex::new(gate_rx), entered: entered_tx }, vec![], &rt);
    let r = b.topo.new_io_arc("slow", slow.ops(0), OpsConfig::default(), 0x100).unwrap();
    b.root.add_subregion(0x1000, &r).unwrap();
    let e = new_event_notifier().unwrap();
    r.add_eventfd(0x10, 4, false, 0, &e).unwrap();
    slow.handle().watch_eventfd(e, 0).unwrap();
    let (ev_tx, ev_rx) = mpsc::channel();
    let other = Spawned::new("other", Summer { events: Some(ev_tx), ..summer() }, vec![], &rt);
    let _ro = map(&b, "other", &other, 0, 0x2000);

    // The slow device's timer handler is stuck...
    slow.handle().with(|_, ctx| ctx.set_timer(Duration::from_micros(1), 0)).unwrap();
    assert_eq!(entered_rx.recv_timeout(WAIT).unwrap(), "timer");
    // ...and so is its ioeventfd handler (a second wake-up of the same
    // device only queues behind the first).
    assert_eq!(b.mem.write_u64(0x1010, 1, 4), MemTxResult::Ok);
    // Another device's timer still fires.
    assert_eq!(b.mem.write_u64(0x2008, 7, 4), MemTxResult::Ok);
    assert_eq!(ev_rx.recv_timeout(WAIT).expect("the async worker was held up"), "timer 7");
    gate_tx.send(()).unwrap();
    assert_eq!(entered_rx.recv_timeout(WAIT).unwrap(), "eventfd");
    gate_tx.send(()).unwrap();
    assert!(!slow.handle().is_failed());
}
