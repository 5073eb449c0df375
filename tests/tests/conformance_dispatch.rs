//! Conformance scenarios of `semantics.md` §12 for transactions and
//! listeners (B1–B9), dispatch (D1–D12), map/unmap (E1–E3) and dirty logging
//! (G1–G3), with the "modern" expectations the decision table picks, plus
//! the surrounding rules: listener registration and unregistration replay,
//! address-space filters, ioeventfd and coalesced-MMIO callbacks, the
//! coalesced flush hook, unassigned / ROM / reservation accesses, bounce
//! buffers and map clients, the old-style ops adapters and the diff
//! broadcast.
//!
//! Listener tests record every callback as one line
//! `"<listener> <callback> <region> <start>+<size> off=<offset>"` and compare
//! the exact sequence. Dispatch tests use a "memory-like" device whose
//! register byte `k` is `0x10 + k` and compare the device calls and the
//! bytes the guest sees.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use topos_runtime::{
    new_event_notifier, AddressSpace, DirtyClient, Endianness, EventNotifier, FlushHook, HwAddr, ImplConstraints,
    ListenerResult, MemTxResult, MemoryListener, MemoryRegion, MemoryRegionOps, MemoryRegionSection, MmioTable,
    Observed, OpsConfig, PortioEntry, PortioTable, Topology, ValidConstraints, DEFAULT_BOUNCE_BUDGET, PAGE_SIZE,
};

// ---------------------------------------------------------------------------
// Listener recording
// ---------------------------------------------------------------------------

type Log = Arc<Mutex<Vec<String>>>;

/// Records every callback, prefixed by the listener's name.
struct Rec {
    name: &'static str,
    log: Log,
}

fn fmt_sec(s: &MemoryRegionSection) -> String {
    let name = s.mr.as_ref().map_or_else(|| "-".to_string(), |m| m.name().to_string());
    format!(
        "{name} {:#x}+{:#x} off={:#x}{}",
        s.offset_within_address_space,
        s.size,
        s.offset_within_region,
        if s.readonly { " ro" } else { "" }
    )
}

impl Rec {
    fn push(&self, s: String) {
        self.log.lock().unwrap().push(format!("{} {s}", self.name));
    }
}

impl MemoryListener for Rec {
    fn begin(&self) -> ListenerResult {
        self.push("begin".into());
        Ok(())
    }
    fn commit(&self) -> ListenerResult {
        self.push("commit".into());
        Ok(())
    }
    fn region_add(&self, s: &MemoryRegionSection) -> ListenerResult {
        self.push(format!("region_add {}", fmt_sec(s)));
        Ok(())
    }
    fn region_del(&self, s: &MemoryRegionSection) -> ListenerResult {
        self.push(format!("region_del {}", fmt_sec(s)));
        Ok(())
    }
    fn region_nop(&self, s: &MemoryRegionSection) -> ListenerResult {
        self.push(format!("region_nop {}", fmt_sec(s)));
        Ok(())
    }
    fn log_start(&self, s: &MemoryRegionSection, old: u8, new: u8) -> ListenerResult {
        self.push(format!("log_start {} {old}->{new}", fmt_sec(s)));
        Ok(())
    }
    fn log_stop(&self, s: &MemoryRegionSection, old: u8, new: u8) -> ListenerResult {
        self.push(format!("log_stop {} {old}->{new}", fmt_sec(s)));
        Ok(())
    }
    fn log_sync(&self, s: &MemoryRegionSection) -> ListenerResult {
        self.push(format!("log_sync {}", fmt_sec(s)));
        Ok(())
    }
    fn log_global_start(&self) -> ListenerResult {
        self.push("log_global_start".into());
        Ok(())
    }
    fn log_global_stop(&self) -> ListenerResult {
        self.push("log_global_stop".into());
        Ok(())
    }
    fn eventfd_add(&self, s: &MemoryRegionSection, match_data: bool, data: u64, _e: &EventNotifier) -> ListenerResult {
        self.push(format!("eventfd_add {} match={match_data} data={data:#x}", fmt_sec(s)));
        Ok(())
    }
    fn eventfd_del(&self, s: &MemoryRegionSection, match_data: bool, data: u64, _e: &EventNotifier) -> ListenerResult {
        self.push(format!("eventfd_del {} match={match_data} data={data:#x}", fmt_sec(s)));
        Ok(())
    }
    fn coalesced_mmio_add(&self, s: &MemoryRegionSection, addr: HwAddr, len: u64) -> ListenerResult {
        self.push(format!("coalesced_add {} @{addr:#x}+{len:#x}", fmt_sec(s)));
        Ok(())
    }
    fn coalesced_mmio_del(&self, s: &MemoryRegionSection, addr: HwAddr, len: u64) -> ListenerResult {
        self.push(format!("coalesced_del {} @{addr:#x}+{len:#x}", fmt_sec(s)));
        Ok(())
    }
}

/// `"NAME START+SIZE off=OFF"`, as [`fmt_sec`] prints a section.
fn sect(name: &str, start: u64, size: u64, off: u64) -> String {
    format!("{name} {start:#x}+{size:#x} off={off:#x}")
}

/// The eventfd section: no region, offset 0.
fn efd_sect(addr: u64, size: u64) -> String {
    sect("-", addr, size, 0)
}

/// `what` delivered Forward: L0, then L10.
fn fwd(what: &str) -> Vec<String> {
    vec![format!("L0 {what}"), format!("L10 {what}")]
}

/// `what` delivered Reverse: L10, then L0.
fn rev(what: &str) -> Vec<String> {
    vec![format!("L10 {what}"), format!("L0 {what}")]
}

/// A trivial I/O device (reads 0, ignores writes).
struct Dummy;

impl MemoryRegionOps for Dummy {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        0
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {}
}

/// A topology with one address space "memory" over a 0x10000 container.
struct Fx {
    topo: Topology,
    root: MemoryRegion,
    asp: AddressSpace,
    log: Log,
}

impl Fx {
    fn new() -> Fx {
        let topo = Topology::new();
        let root = topo.new_container("root", 0x10000).unwrap();
        let asp = topo.address_space_init(&root, "memory").unwrap();
        Fx { topo, root, asp, log: Log::default() }
    }

    /// B1–B5's start: RAM A at [0x1000, 0x3000).
    fn with_a() -> (Fx, MemoryRegion) {
        let fx = Fx::new();
        let a = fx.topo.new_ram("A", 0x2000).unwrap();
        fx.root.add_subregion(0x1000, &a).unwrap();
        (fx, a)
    }

    fn io(&self, name: &str, size: u128) -> MemoryRegion {
        self.topo.new_io(name, Dummy, OpsConfig::default(), size).unwrap()
    }

    fn listener(&self, name: &'static str) -> Arc<Rec> {
        Arc::new(Rec { name, log: self.log.clone() })
    }

    /// Registers L10 and then L0 on the address space (the order of
    /// registration must not matter, only priorities), and forgets the
    /// registration replay.
    fn listen(&self) {
        self.topo.listener_register(self.listener("L10"), 10, Some(&self.asp)).unwrap();
        self.topo.listener_register(self.listener("L0"), 0, Some(&self.asp)).unwrap();
        self.take();
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// The view of an address space as `sect` strings.
fn ranges(asp: &AddressSpace) -> Vec<String> {
    asp.view()
        .ranges()
        .iter()
        .map(|r| sect(r.region().name(), r.start(), r.size() as u64, r.offset_in_region()))
        .collect()
}

// ---------------------------------------------------------------------------
// B1–B9: transactions and listeners
// ---------------------------------------------------------------------------

#[test]
fn b1_overlay_add() {
    let (fx, _a) = Fx::with_a();
    fx.listen();
    let b = fx.io("B", 0x1000);
    fx.root.add_subregion_overlap(0x2000, &b, 1).unwrap();
    let expected = [
        fwd("begin"),
        rev(&format!("region_del {}", sect("A", 0x1000, 0x2000, 0))),
        fwd(&format!("region_add {}", sect("A", 0x1000, 0x1000, 0))),
        fwd(&format!("region_add {}", sect("B", 0x2000, 0x1000, 0))),
        fwd("commit"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);
}

#[test]
fn b2_remove_overlay() {
    let (fx, _a) = Fx::with_a();
    let b = fx.io("B", 0x1000);
    fx.root.add_subregion_overlap(0x2000, &b, 1).unwrap();
    fx.listen();
    fx.root.del_subregion(&b).unwrap();
    let expected = [
        fwd("begin"),
        rev(&format!("region_del {}", sect("A", 0x1000, 0x1000, 0))),
        rev(&format!("region_del {}", sect("B", 0x2000, 0x1000, 0))),
        fwd(&format!("region_add {}", sect("A", 0x1000, 0x2000, 0))),
        fwd("commit"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);
}

#[test]
fn b3_b4_logging_on_then_off() {
    let (fx, a) = Fx::with_a();
    fx.listen();
    let sa = sect("A", 0x1000, 0x2000, 0);
    a.set_log(true, DirtyClient::Vga).unwrap();
    let expected =
        [fwd("begin"), fwd(&format!("region_nop {sa}")), fwd(&format!("log_start {sa} 0->1")), fwd("commit")].concat();
    assert_eq!(fx.take(), expected, "B3");

    a.set_log(false, DirtyClient::Vga).unwrap();
    let expected =
        [fwd("begin"), fwd(&format!("region_nop {sa}")), rev(&format!("log_stop {sa} 1->0")), fwd("commit")].concat();
    assert_eq!(fx.take(), expected, "B4");
}

#[test]
fn log_start_and_stop_fire_on_any_mask_bit_change() {
    let (fx, a) = Fx::with_a();
    a.set_log(true, DirtyClient::Vga).unwrap();
    fx.listen();
    let sa = sect("A", 0x1000, 0x2000, 0);
    // 1 -> 3: a bit appears while the mask was already non-zero.
    a.set_log(true, DirtyClient::Code).unwrap();
    let expected =
        [fwd("begin"), fwd(&format!("region_nop {sa}")), fwd(&format!("log_start {sa} 1->3")), fwd("commit")].concat();
    assert_eq!(fx.take(), expected);
    // 3 -> 2: a bit goes while the mask stays non-zero.
    a.set_log(false, DirtyClient::Vga).unwrap();
    let expected =
        [fwd("begin"), fwd(&format!("region_nop {sa}")), rev(&format!("log_stop {sa} 3->2")), fwd("commit")].concat();
    assert_eq!(fx.take(), expected);
}

#[test]
fn b5_readonly_toggle() {
    let (fx, a) = Fx::with_a();
    fx.listen();
    a.set_readonly(true).unwrap();
    let expected = [
        fwd("begin"),
        rev(&format!("region_del {}", sect("A", 0x1000, 0x2000, 0))),
        fwd(&format!("region_add {} ro", sect("A", 0x1000, 0x2000, 0))),
        fwd("commit"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);
}

#[test]
fn b6_unchanged_neighbours_get_nop_in_address_order() {
    let fx = Fx::new();
    let x = fx.topo.new_ram("X", 0x1000).unwrap();
    let y = fx.io("Y", 0x1000);
    let z = fx.io("Z", 0x1000);
    fx.root.add_subregion(0, &x).unwrap();
    fx.root.add_subregion(0x2000, &y).unwrap();
    fx.root.add_subregion(0x4000, &z).unwrap();
    fx.listen();
    y.set_readonly(true).unwrap();
    let expected = [
        fwd("begin"),
        rev(&format!("region_del {}", sect("Y", 0x2000, 0x1000, 0))),
        fwd(&format!("region_nop {}", sect("X", 0, 0x1000, 0))),
        fwd(&format!("region_add {} ro", sect("Y", 0x2000, 0x1000, 0))),
        fwd(&format!("region_nop {}", sect("Z", 0x4000, 0x1000, 0))),
        fwd("commit"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);
}

#[test]
fn b7_batched_transaction_is_one_commit() {
    let (fx, _a) = Fx::with_a();
    fx.listen();
    let b1 = fx.io("B1", 0x1000);
    let b2 = fx.io("B2", 0x1000);
    let gen0 = fx.topo.generation();
    let before = ranges(&fx.asp);
    fx.topo.begin().unwrap();
    fx.root.add_subregion(0x5000, &b1).unwrap();
    fx.root.add_subregion(0x6000, &b2).unwrap();
    // Nothing happens while the transaction is open.
    assert!(fx.take().is_empty());
    assert_eq!(fx.topo.generation(), gen0);
    assert_eq!(ranges(&fx.asp), before);
    fx.topo.commit().unwrap();
    assert_eq!(fx.topo.generation(), gen0 + 1, "exactly one re-render");
    let expected = [
        fwd("begin"),
        fwd(&format!("region_nop {}", sect("A", 0x1000, 0x2000, 0))),
        fwd(&format!("region_add {}", sect("B1", 0x5000, 0x1000, 0))),
        fwd(&format!("region_add {}", sect("B2", 0x6000, 0x1000, 0))),
        fwd("commit"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);
}

#[test]
fn b8_no_op_mutations_trigger_nothing() {
    let (fx, a) = Fx::with_a();
    fx.listen();
    let gen0 = fx.topo.generation();
    a.set_readonly(false).unwrap();
    a.set_log(false, DirtyClient::Vga).unwrap(); // modern: set_log returns early too
    a.set_enabled(true).unwrap();
    a.set_address(0x1000).unwrap();
    assert!(fx.take().is_empty());
    assert_eq!(fx.topo.generation(), gen0);
    // And once logging is on, turning it on again is a no-op as well.
    a.set_log(true, DirtyClient::Vga).unwrap();
    fx.take();
    let gen1 = fx.topo.generation();
    a.set_log(true, DirtyClient::Vga).unwrap();
    assert!(fx.take().is_empty());
    assert_eq!(fx.topo.generation(), gen1);
}

#[test]
fn b9_disabled_parent() {
    let (fx, _a) = Fx::with_a();
    let c = fx.topo.new_container("C", 0x2000).unwrap();
    c.set_enabled(false).unwrap();
    fx.listen();
    let gen0 = fx.topo.generation();
    fx.root.add_subregion(0x8000, &c).unwrap();
    let x = fx.io("X", 0x1000);
    c.add_subregion(0x1000, &x).unwrap();
    assert!(fx.take().is_empty(), "nothing is pending under a disabled container");
    assert_eq!(fx.topo.generation(), gen0);
    c.set_enabled(true).unwrap();
    let expected = [
        fwd("begin"),
        fwd(&format!("region_nop {}", sect("A", 0x1000, 0x2000, 0))),
        fwd(&format!("region_add {}", sect("X", 0x9000, 0x1000, 0))),
        fwd("commit"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);
}

// ---------------------------------------------------------------------------
// Registration and unregistration replay, filters, global logging
// ---------------------------------------------------------------------------

#[test]
fn registration_replays_begin_add_log_start_commit() {
    let (fx, a) = Fx::with_a();
    let b = fx.io("B", 0x1000);
    fx.root.add_subregion(0x4000, &b).unwrap();
    a.set_log(true, DirtyClient::Vga).unwrap();
    fx.topo.listener_register(fx.listener("L"), 0, Some(&fx.asp)).unwrap();
    let sa = sect("A", 0x1000, 0x2000, 0);
    let expected = vec![
        "L begin".to_string(),
        format!("L region_add {sa}"),
        format!("L log_start {sa} 0->1"),
        format!("L region_add {}", sect("B", 0x4000, 0x1000, 0)),
        "L commit".to_string(),
    ];
    assert_eq!(fx.take(), expected);
}

#[test]
fn registration_replay_with_global_dirty_logging() {
    let (fx, a) = Fx::with_a();
    let b = fx.io("B", 0x1000);
    fx.root.add_subregion(0x4000, &b).unwrap();
    a.set_log(true, DirtyClient::Vga).unwrap();
    fx.topo.global_dirty_log_start().unwrap();
    fx.topo.listener_register(fx.listener("L"), 0, Some(&fx.asp)).unwrap();
    let sa = sect("A", 0x1000, 0x2000, 0);
    let vga_mig = DirtyClient::Vga.mask() | DirtyClient::Migration.mask();
    let expected = vec![
        "L begin".to_string(),
        "L log_global_start".to_string(),
        format!("L region_add {sa}"),
        format!("L log_start {sa} 0->{vga_mig}"),
        // I/O ranges carry no MIGRATION bit.
        format!("L region_add {}", sect("B", 0x4000, 0x1000, 0)),
        "L commit".to_string(),
    ];
    assert_eq!(fx.take(), expected);
}

#[test]
fn unregistration_replays_log_stop_and_region_del() {
    let (fx, a) = Fx::with_a();
    let b = fx.io("B", 0x1000);
    fx.root.add_subregion(0x4000, &b).unwrap();
    a.set_log(true, DirtyClient::Vga).unwrap();
    let id = fx.topo.listener_register(fx.listener("L"), 0, Some(&fx.asp)).unwrap();
    fx.take();
    fx.topo.listener_unregister(id).unwrap();
    let sa = sect("A", 0x1000, 0x2000, 0);
    let expected = vec![
        "L begin".to_string(),
        format!("L log_stop {sa} 1->0"),
        format!("L region_del {sa}"),
        format!("L region_del {}", sect("B", 0x4000, 0x1000, 0)),
        "L commit".to_string(),
    ];
    assert_eq!(fx.take(), expected);
    // Gone: later commits do not reach it, and unregistering again is a no-op.
    b.set_readonly(true).unwrap();
    assert!(fx.take().is_empty());
    fx.topo.listener_unregister(id).unwrap();
    assert!(fx.take().is_empty());
}

#[test]
fn replay_includes_coalesced_ranges_and_ioeventfds() {
    // The runtime's documented replay: per range region_add, then its
    // coalesced ranges, then log_start; the address space's ioeventfds
    // after the ranges; unregistration mirrors it.
    let (fx, a) = Fx::with_a();
    let d = fx.io("D", 0x1000);
    d.add_coalescing(0x100, 0x20).unwrap();
    let n = new_event_notifier().unwrap();
    d.add_eventfd(0x8, 2, true, 7, &n).unwrap();
    fx.root.add_subregion(0x4000, &d).unwrap();
    a.set_log(true, DirtyClient::Vga).unwrap();
    let id = fx.topo.listener_register(fx.listener("L"), 0, Some(&fx.asp)).unwrap();
    let sa = sect("A", 0x1000, 0x2000, 0);
    let sd = sect("D", 0x4000, 0x1000, 0);
    let efd = format!("{} match=true data=0x7", efd_sect(0x4008, 2));
    let expected = vec![
        "L begin".to_string(),
        format!("L region_add {sa}"),
        format!("L log_start {sa} 0->1"),
        format!("L region_add {sd}"),
        format!("L coalesced_add {sd} @0x4100+0x20"),
        format!("L eventfd_add {efd}"),
        "L commit".to_string(),
    ];
    assert_eq!(fx.take(), expected);
    fx.topo.listener_unregister(id).unwrap();
    let expected = vec![
        "L begin".to_string(),
        format!("L log_stop {sa} 1->0"),
        format!("L region_del {sa}"),
        format!("L region_del {sd}"),
        // Mirrors the replayed piece (a commit's delete pass sends the whole
        // flat range instead, as QEMU does).
        format!("L coalesced_del {sd} @0x4100+0x20"),
        format!("L eventfd_del {efd}"),
        "L commit".to_string(),
    ];
    assert_eq!(fx.take(), expected);
}

#[test]
fn a_new_address_space_is_populated_at_init() {
    let topo = Topology::new();
    let log = Log::default();
    topo.listener_register(Arc::new(Rec { name: "L", log: log.clone() }), 0, None).unwrap();
    let root = topo.new_container("root", 0x10000).unwrap();
    let r = topo.new_ram("R", 0x1000).unwrap();
    root.add_subregion(0x2000, &r).unwrap();
    // Not in any address space yet: the change still commits (QEMU does not
    // check reachability), but there is no section to report.
    assert_eq!(std::mem::take(&mut *log.lock().unwrap()), vec!["L begin".to_string(), "L commit".to_string()]);
    let asp = topo.address_space_init(&root, "memory").unwrap();
    assert_eq!(ranges(&asp), vec![sect("R", 0x2000, 0x1000, 0)]);
    let mut b = [0u8; 1];
    assert!(asp.read(0x2000, &mut b).is_ok());
    let expected =
        vec!["L begin".to_string(), format!("L region_add {}", sect("R", 0x2000, 0x1000, 0)), "L commit".to_string()];
    assert_eq!(*log.lock().unwrap(), expected);
}

#[test]
fn listener_filter_limits_section_callbacks_to_its_address_space() {
    let topo = Topology::new();
    let log = Log::default();
    let root1 = topo.new_container("root1", 0x10000).unwrap();
    let root2 = topo.new_container("root2", 0x10000).unwrap();
    let r1 = topo.new_ram("R1", 0x1000).unwrap();
    root1.add_subregion(0, &r1).unwrap();
    let as1 = topo.address_space_init(&root1, "as1").unwrap();
    let as2 = topo.address_space_init(&root2, "as2").unwrap();
    topo.listener_register(Arc::new(Rec { name: "ALL", log: log.clone() }), 0, None).unwrap();
    topo.listener_register(Arc::new(Rec { name: "ONE", log: log.clone() }), 10, Some(&as1)).unwrap();
    let s1 = sect("R1", 0, 0x1000, 0);
    // Replay: ALL sees both address spaces (one begin/commit per space),
    // ONE sees as1 only.
    let expected = vec![
        "ALL begin".to_string(),
        format!("ALL region_add {s1}"),
        "ALL commit".to_string(),
        "ALL begin".to_string(),
        "ALL commit".to_string(),
        "ONE begin".to_string(),
        format!("ONE region_add {s1}"),
        "ONE commit".to_string(),
    ];
    assert_eq!(std::mem::take(&mut *log.lock().unwrap()), expected);

    // A change in as2: begin/commit reach everybody, as2's sections only ALL.
    let r2 = topo.new_ram("R2", 0x1000).unwrap();
    root2.add_subregion(0x3000, &r2).unwrap();
    let expected = vec![
        "ALL begin".to_string(),
        "ONE begin".to_string(),
        format!("ALL region_nop {s1}"),
        format!("ONE region_nop {s1}"),
        format!("ALL region_add {}", sect("R2", 0x3000, 0x1000, 0)),
        "ALL commit".to_string(),
        "ONE commit".to_string(),
    ];
    assert_eq!(std::mem::take(&mut *log.lock().unwrap()), expected);
    assert_eq!(ranges(&as2), vec![sect("R2", 0x3000, 0x1000, 0)]);
}

#[test]
fn global_dirty_log_start_and_stop_sequences() {
    let (fx, a) = Fx::with_a();
    let b = fx.io("B", 0x1000);
    fx.root.add_subregion(0x4000, &b).unwrap();
    fx.listen();
    let sa = sect("A", 0x1000, 0x2000, 0);
    let sb = sect("B", 0x4000, 0x1000, 0);
    let mig = DirtyClient::Migration.mask();
    fx.topo.global_dirty_log_start().unwrap();
    assert!(fx.topo.global_dirty_log());
    let expected = [
        fwd("log_global_start"),
        fwd("begin"),
        fwd(&format!("region_nop {sa}")),
        fwd(&format!("log_start {sa} 0->{mig}")),
        fwd(&format!("region_nop {sb}")),
        fwd("commit"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);
    // Starting again changes nothing.
    fx.topo.global_dirty_log_start().unwrap();
    assert!(fx.take().is_empty());

    fx.topo.global_dirty_log_stop().unwrap();
    let expected = [
        fwd("begin"),
        fwd(&format!("region_nop {sa}")),
        rev(&format!("log_stop {sa} {mig}->0")),
        fwd(&format!("region_nop {sb}")),
        fwd("commit"),
        rev("log_global_stop"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);
    assert_eq!(a.dirty_log_mask(), 0);
}

// ---------------------------------------------------------------------------
// ioeventfds (§3.6)
// ---------------------------------------------------------------------------

#[test]
fn mapping_a_region_with_an_ioeventfd_adds_region_then_eventfd() {
    let (fx, _a) = Fx::with_a();
    fx.listen();
    let d = fx.io("D", 0x1000);
    let n = new_event_notifier().unwrap();
    d.add_eventfd(0x10, 4, true, 0x1234, &n).unwrap();
    assert!(fx.take().is_empty(), "an unmapped region's eventfd is registered nowhere");

    let sa = sect("A", 0x1000, 0x2000, 0);
    let efd = format!("{} match=true data=0x1234", efd_sect(0x4010, 4));
    fx.root.add_subregion(0x4000, &d).unwrap();
    let expected = [
        fwd("begin"),
        fwd(&format!("region_nop {sa}")),
        fwd(&format!("region_add {}", sect("D", 0x4000, 0x1000, 0))),
        rev(&format!("eventfd_add {efd}")), // eventfd add goes Reverse
        fwd("commit"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);

    fx.root.del_subregion(&d).unwrap();
    let expected = [
        fwd("begin"),
        rev(&format!("region_del {}", sect("D", 0x4000, 0x1000, 0))),
        fwd(&format!("region_nop {sa}")),
        fwd(&format!("eventfd_del {efd}")), // eventfd del goes Forward
        fwd("commit"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);
}

#[test]
fn eventfd_changes_on_a_mapped_region_only_diff_eventfds() {
    let (fx, _a) = Fx::with_a();
    let d = fx.io("D", 0x1000);
    fx.root.add_subregion(0x4000, &d).unwrap();
    fx.listen();
    let n1 = new_event_notifier().unwrap();
    let n2 = new_event_notifier().unwrap();
    let e1 = format!("{} match=true data=0x1234", efd_sect(0x4010, 4));
    let e2 = format!("{} match=false data=0x0", efd_sect(0x4020, 2));
    d.add_eventfd(0x10, 4, true, 0x1234, &n1).unwrap();
    assert_eq!(fx.take(), rev(&format!("eventfd_add {e1}")), "no begin/commit, no re-render");
    d.add_eventfd(0x20, 2, false, 0, &n2).unwrap();
    assert_eq!(fx.take(), rev(&format!("eventfd_add {e2}")));
    // A partly hidden eventfd stays registered; a fully hidden one goes.
    let cover = fx.topo.new_ram("cover", 0x11).unwrap();
    fx.root.add_subregion_overlap(0x4000, &cover, 1).unwrap();
    let log = fx.take();
    assert!(!log.iter().any(|l| l.contains("eventfd")), "{log:?}");
    fx.root.del_subregion(&cover).unwrap();
    fx.take();
    let cover = fx.topo.new_ram("cover2", 0x14).unwrap();
    fx.root.add_subregion_overlap(0x4000, &cover, 1).unwrap();
    let log: Vec<String> = fx.take().into_iter().filter(|l| l.contains("eventfd")).collect();
    assert_eq!(log, fwd(&format!("eventfd_del {e1}")));
    fx.root.del_subregion(&cover).unwrap();
    let log: Vec<String> = fx.take().into_iter().filter(|l| l.contains("eventfd")).collect();
    assert_eq!(log, rev(&format!("eventfd_add {e1}")));

    d.del_eventfd(0x10, 4, true, 0x1234, &n1).unwrap();
    assert_eq!(fx.take(), fwd(&format!("eventfd_del {e1}")));
    // Size 0 on the deleting side matches any size.
    d.del_eventfd(0x20, 0, false, 0, &n2).unwrap();
    assert_eq!(fx.take(), fwd(&format!("eventfd_del {e2}")));
    assert!(d.ioeventfds().is_empty());
}

/// A memory-like device (byte `k` of its registers is `0x10 + k`) that
/// records every call.
struct MemLike {
    big: bool,
    accept: bool,
    calls: Mutex<Vec<Acc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acc {
    /// read(addr, size)
    R(u64, u32),
    /// write(addr, value, size)
    W(u64, u64, u32),
}

fn reg(k: u64) -> u64 {
    (0x10 + k) & 0xff
}

impl MemLike {
    fn new(big: bool) -> Arc<MemLike> {
        Arc::new(MemLike { big, accept: true, calls: Mutex::new(Vec::new()) })
    }
    fn take(&self) -> Vec<Acc> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl MemoryRegionOps for MemLike {
    fn read(&self, addr: HwAddr, size: u32) -> u64 {
        self.calls.lock().unwrap().push(Acc::R(addr, size));
        let n = size as u64;
        (0..n).fold(0, |v, i| v | reg(addr + i) << (8 * if self.big { n - 1 - i } else { i }))
    }
    fn write(&self, addr: HwAddr, value: u64, size: u32) {
        self.calls.lock().unwrap().push(Acc::W(addr, value, size));
    }
    fn accepts(&self, _addr: HwAddr, _size: u32, _is_write: bool) -> bool {
        self.accept
    }
}

/// A device region "dev" of 0x100 bytes at 0x1000 in an address space.
struct Dev {
    fx: Fx,
    region: MemoryRegion,
    ops: Arc<MemLike>,
}

const DEV: u64 = 0x1000;

fn dev_with(ops: Arc<MemLike>, config: OpsConfig) -> Dev {
    let fx = Fx::new();
    let region = fx.topo.new_io_arc("dev", ops.clone(), config, 0x100).unwrap();
    fx.root.add_subregion(DEV, &region).unwrap();
    Dev { fx, region, ops }
}

fn dev(big: bool, impl_min: u32, impl_max: u32, valid: ValidConstraints) -> Dev {
    let config = OpsConfig {
        endianness: if big { Endianness::Big } else { Endianness::Little },
        valid,
        impl_: ImplConstraints { min_access_size: impl_min, max_access_size: impl_max, unaligned: false },
    };
    dev_with(MemLike::new(big), config)
}

fn valid_max(max: u32) -> ValidConstraints {
    ValidConstraints { min_access_size: 0, max_access_size: max, unaligned: false }
}

impl Dev {
    fn read(&self, off: u64, n: usize) -> (Vec<u8>, MemTxResult) {
        let mut buf = vec![0xEEu8; n];
        let r = self.fx.asp.read(DEV + off, &mut buf);
        (buf, r)
    }
    fn write(&self, off: u64, data: &[u8]) -> MemTxResult {
        self.fx.asp.write(DEV + off, data)
    }
}

#[test]
fn ioeventfd_software_path_signals_and_skips_the_device() {
    for big in [false, true] {
        let d = dev(big, 0, 0, ValidConstraints::default());
        let n = new_event_notifier().unwrap();
        // Data is given as the guest writes it, whatever the device order.
        d.region.add_eventfd(0x10, 4, true, 0x1234, &n).unwrap();
        assert_eq!(d.write(0x10, &0x1234u32.to_le_bytes()), MemTxResult::Ok);
        assert_eq!(n.read().unwrap(), 1, "big={big}: the eventfd was signalled");
        assert!(d.ops.take().is_empty(), "big={big}: the device write was skipped");

        // Different data, or a different size: the device gets the write.
        assert!(d.write(0x10, &0x9999u32.to_le_bytes()).is_ok());
        let v = if big { 0x9999u32.swap_bytes() as u64 } else { 0x9999 };
        assert_eq!(d.ops.take(), vec![Acc::W(0x10, v, 4)]);
        assert!(d.write(0x10, &0x1234u16.to_le_bytes()).is_ok());
        let v = if big { 0x3412 } else { 0x1234 };
        assert_eq!(d.ops.take(), vec![Acc::W(0x10, v, 2)]);
        assert!(n.read().is_err(), "big={big}: not signalled by the non-matching writes");
    }
}

// ---------------------------------------------------------------------------
// Coalesced MMIO (§3.7 modern) and the flush hook
// ---------------------------------------------------------------------------

#[test]
fn coalesced_ranges_are_sent_on_every_mapping() {
    let (fx, _a) = Fx::with_a();
    fx.listen();
    let d = fx.io("D", 0x1000);
    d.add_coalescing(0x100, 0x200).unwrap();
    assert!(d.flush_coalesced());
    assert!(fx.take().is_empty(), "unmapped: nobody to tell");
    let sa = sect("A", 0x1000, 0x2000, 0);
    let sd = sect("D", 0x4000, 0x1000, 0);
    let map_seq = [
        fwd("begin"),
        fwd(&format!("region_nop {sa}")),
        fwd(&format!("region_add {sd}")),
        fwd(&format!("coalesced_add {sd} @0x4100+0x200")),
        fwd("commit"),
    ]
    .concat();
    let unmap_seq = [
        fwd("begin"),
        rev(&format!("coalesced_del {sd} @0x4000+0x1000")),
        rev(&format!("region_del {sd}")),
        fwd(&format!("region_nop {sa}")),
        fwd("commit"),
    ]
    .concat();
    fx.root.add_subregion(0x4000, &d).unwrap();
    assert_eq!(fx.take(), map_seq);
    fx.root.del_subregion(&d).unwrap();
    assert_eq!(fx.take(), unmap_seq);
    // Re-mapping re-sends the coalesced range (the 4.0 fix).
    fx.root.add_subregion(0x4000, &d).unwrap();
    assert_eq!(fx.take(), map_seq);

    // A partly hidden region: the coalesced range is clipped to what shows.
    let cover = fx.topo.new_ram("cover", 0x180).unwrap();
    fx.root.add_subregion_overlap(0x4000, &cover, 1).unwrap();
    let sd2 = sect("D", 0x4180, 0xe80, 0x180);
    let expected = [
        fwd("begin"),
        rev(&format!("coalesced_del {sd} @0x4000+0x1000")),
        rev(&format!("region_del {sd}")),
        fwd(&format!("region_nop {sa}")),
        fwd(&format!("region_add {}", sect("cover", 0x4000, 0x180, 0))),
        fwd(&format!("region_add {sd2}")),
        fwd(&format!("coalesced_add {sd2} @0x4180+0x180")),
        fwd("commit"),
    ]
    .concat();
    assert_eq!(fx.take(), expected);
}

#[test]
fn add_and_clear_coalescing_on_a_mapped_region_send_the_delta() {
    let (fx, _a) = Fx::with_a();
    let d = fx.io("D", 0x1000);
    fx.root.add_subregion(0x4000, &d).unwrap();
    fx.listen();
    let gen0 = fx.topo.generation();
    let sd = sect("D", 0x4000, 0x1000, 0);
    d.add_coalescing(0x100, 0x200).unwrap();
    assert_eq!(fx.take(), fwd(&format!("coalesced_add {sd} @0x4100+0x200")));
    d.add_coalescing(0x800, 0x10).unwrap();
    assert_eq!(fx.take(), fwd(&format!("coalesced_add {sd} @0x4800+0x10")));
    assert_eq!(d.coalesced_ranges(), vec![(0x100, 0x200), (0x800, 0x10)]);
    d.clear_coalescing().unwrap();
    let expected =
        [rev(&format!("coalesced_del {sd} @0x4100+0x200")), rev(&format!("coalesced_del {sd} @0x4800+0x10"))].concat();
    assert_eq!(fx.take(), expected);
    assert!(!d.flush_coalesced());
    assert!(d.coalesced_ranges().is_empty());
    assert_eq!(fx.topo.generation(), gen0, "coalescing never re-renders");
    // set_coalescing = clear + whole region.
    d.set_coalescing().unwrap();
    assert_eq!(fx.take(), fwd(&format!("coalesced_add {sd} @0x4000+0x1000")));
}

#[test]
fn flush_hook_runs_at_begin_and_before_flushing_regions() {
    let (fx, a) = Fx::with_a();
    let plain = fx.topo.new_io_arc("plain", MemLike::new(false), OpsConfig::default(), 0x100).unwrap();
    let flushing = fx.topo.new_io_arc("flushing", MemLike::new(false), OpsConfig::default(), 0x100).unwrap();
    fx.root.add_subregion(0x4000, &plain).unwrap();
    fx.root.add_subregion(0x5000, &flushing).unwrap();
    flushing.set_flush_coalesced().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let hook: FlushHook = Arc::new(move || {
        c.fetch_add(1, Ordering::SeqCst);
    });
    fx.topo.set_coalesced_flush_hook(Some(&hook));
    let n = || count.load(Ordering::SeqCst);

    // Every begin flushes (QEMU flushes in each begin, nested or not);
    // commits do not.
    fx.topo.begin().unwrap();
    assert_eq!(n(), 1);
    fx.topo.begin().unwrap();
    assert_eq!(n(), 2);
    fx.topo.commit().unwrap();
    fx.topo.commit().unwrap();
    assert_eq!(n(), 2);
    // A mutator is a transaction of its own.
    a.set_readonly(true).unwrap();
    assert_eq!(n(), 3);

    let mut buf = [0u8; 4];
    assert!(fx.asp.read(0x4000, &mut buf).is_ok());
    assert!(fx.asp.read(0x1000, &mut buf).is_ok());
    assert_eq!(n(), 3, "regions without the flag and RAM do not flush");
    assert!(fx.asp.read(0x5000, &mut buf).is_ok());
    assert_eq!(n(), 4, "one flush before the access");
    assert!(fx.asp.write(0x5000, &buf).is_ok());
    assert_eq!(n(), 5);

    flushing.clear_flush_coalesced().unwrap();
    assert_eq!(n(), 6, "clearing the flag flushes");
    assert!(fx.asp.read(0x5000, &mut buf).is_ok());
    assert_eq!(n(), 6);

    fx.topo.set_coalesced_flush_hook(None);
    fx.topo.begin().unwrap();
    fx.topo.commit().unwrap();
    assert_eq!(n(), 6);
}

// ---------------------------------------------------------------------------
// D1–D12: dispatch
// ---------------------------------------------------------------------------

use Acc::{R, W};

#[test]
fn d1_le_impl_max_1_read_splits_in_bytes() {
    let d = dev(false, 0, 1, ValidConstraints::default());
    let (buf, r) = d.read(0, 4);
    assert_eq!(r, MemTxResult::Ok);
    assert_eq!(d.ops.take(), vec![R(0, 1), R(1, 1), R(2, 1), R(3, 1)]);
    assert_eq!(buf, [0x10, 0x11, 0x12, 0x13]);
}

#[test]
fn d2_be_impl_max_1_read_is_in_register_order() {
    let d = dev(true, 0, 1, ValidConstraints::default());
    let (buf, r) = d.read(0, 4);
    assert_eq!(r, MemTxResult::Ok);
    assert_eq!(d.ops.take(), vec![R(0, 1), R(1, 1), R(2, 1), R(3, 1)]);
    assert_eq!(buf, [0x10, 0x11, 0x12, 0x13]);
}

#[test]
fn d3_be_no_split() {
    let d = dev(true, 0, 4, ValidConstraints::default());
    let (buf, r) = d.read(0, 4);
    assert_eq!(r, MemTxResult::Ok);
    assert_eq!(d.ops.take(), vec![R(0, 4)]);
    assert_eq!(buf, [0x10, 0x11, 0x12, 0x13]);
}

#[test]
fn d4_be_impl_max_2() {
    let d = dev(true, 0, 2, ValidConstraints::default());
    let (buf, r) = d.read(0, 4);
    assert_eq!(r, MemTxResult::Ok);
    assert_eq!(d.ops.take(), vec![R(0, 2), R(2, 2)]);
    assert_eq!(buf, [0x10, 0x11, 0x12, 0x13]);
}

#[test]
fn d5_split_write_bytes_in_ascending_order() {
    for big in [false, true] {
        let d = dev(big, 0, 1, ValidConstraints::default());
        assert_eq!(d.write(0, &[0xAA, 0xBB, 0xCC, 0xDD]), MemTxResult::Ok);
        assert_eq!(
            d.ops.take(),
            vec![W(0, 0xAA, 1), W(1, 0xBB, 1), W(2, 0xCC, 1), W(3, 0xDD, 1)],
            "big-endian = {big}"
        );
    }
}

#[test]
fn d6_unsplit_write_value_follows_device_order() {
    let d = dev(false, 0, 4, ValidConstraints::default());
    assert!(d.write(0, &[0xAA, 0xBB, 0xCC, 0xDD]).is_ok());
    assert_eq!(d.ops.take(), vec![W(0, 0xDDCCBBAA, 4)]);
    let d = dev(true, 0, 4, ValidConstraints::default());
    assert!(d.write(0, &[0xAA, 0xBB, 0xCC, 0xDD]).is_ok());
    assert_eq!(d.ops.take(), vec![W(0, 0xAABBCCDD, 4)]);
}

#[test]
fn d7_round_up_read_is_not_aligned_down() {
    for big in [false, true] {
        let d = dev(big, 4, 4, ValidConstraints::default());
        let (buf, r) = d.read(1, 1);
        assert_eq!(r, MemTxResult::Ok);
        assert_eq!(d.ops.take(), vec![R(1, 4)], "big-endian = {big}");
        assert_eq!(buf, [0x11], "big-endian = {big}");
    }
}

#[test]
fn d8_round_up_write() {
    let d = dev(false, 4, 4, ValidConstraints::default());
    assert!(d.write(1, &[0xAA]).is_ok());
    assert_eq!(d.ops.take(), vec![W(1, 0xAA, 4)]);
    let d = dev(true, 4, 4, ValidConstraints::default());
    assert!(d.write(1, &[0xAA]).is_ok());
    assert_eq!(d.ops.take(), vec![W(1, 0xAA00_0000, 4)]);
}

#[test]
fn d9_address_space_splits_by_alignment() {
    let d = dev(false, 0, 0, ValidConstraints::default());
    let (buf, r) = d.read(1, 7);
    assert_eq!(r, MemTxResult::Ok);
    assert_eq!(d.ops.take(), vec![R(1, 1), R(2, 2), R(4, 4)]);
    assert_eq!(buf, [0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]);
}

#[test]
fn d10_three_bytes_are_two_then_one() {
    let d = dev(false, 0, 0, ValidConstraints::default());
    let (buf, r) = d.read(0, 3);
    assert_eq!(r, MemTxResult::Ok);
    assert_eq!(d.ops.take(), vec![R(0, 2), R(2, 1)]);
    assert_eq!(buf, [0x10, 0x11, 0x12]);
}

#[test]
fn d11_eight_byte_access_needs_valid_max_8() {
    // Modern: valid.max = 8 lets one 8-byte access through (the device
    // implements 8 bytes, so nothing splits it further).
    let d = dev(false, 0, 8, valid_max(8));
    let (buf, r) = d.read(0, 8);
    assert_eq!(r, MemTxResult::Ok);
    assert_eq!(d.ops.take(), vec![R(0, 8)]);
    assert_eq!(buf, [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]);
    // valid.max = 0: the address space cuts at 4 bytes even though the
    // device could take 8.
    let d = dev(false, 0, 8, ValidConstraints::default());
    let (buf, r) = d.read(0, 8);
    assert_eq!(r, MemTxResult::Ok);
    assert_eq!(d.ops.take(), vec![R(0, 4), R(4, 4)]);
    assert_eq!(buf, [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]);
    // Big-endian 8-byte access: one call, bytes in register order.
    let d = dev(true, 0, 8, valid_max(8));
    let (buf, _) = d.read(0, 8);
    assert_eq!(d.ops.take(), vec![R(0, 8)]);
    assert_eq!(buf, [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]);
}

#[test]
fn d12_valid_max_smaller_than_request_splits() {
    let d = dev(false, 0, 0, valid_max(2));
    let (buf, r) = d.read(0, 4);
    assert_eq!(r, MemTxResult::Ok);
    assert_eq!(d.ops.take(), vec![R(0, 2), R(2, 2)]);
    assert_eq!(buf, [0x10, 0x11, 0x12, 0x13]);
}

#[test]
fn valid_accepts_false_reads_zero_with_decode_error() {
    let ops = Arc::new(MemLike { big: false, accept: false, calls: Mutex::new(Vec::new()) });
    let d = dev_with(ops, OpsConfig::default());
    let (buf, r) = d.read(0, 4);
    assert_eq!(r, MemTxResult::DecodeError);
    assert_eq!(buf, [0, 0, 0, 0]);
    assert_eq!(d.write(0, &[1, 2, 3, 4]), MemTxResult::DecodeError);
    assert!(d.ops.take().is_empty(), "the device is never called");
}

#[test]
fn valid_size_and_alignment_violations_are_decode_errors() {
    // valid.min = 4: a 1-byte access fails validation (5.1+).
    let d = dev(false, 0, 0, ValidConstraints { min_access_size: 4, max_access_size: 4, unaligned: false });
    let (buf, r) = d.read(0, 1);
    assert_eq!((buf, r), (vec![0], MemTxResult::DecodeError));
    assert!(d.ops.take().is_empty());
    // valid.unaligned = false and impl.unaligned = true: an unaligned 4-byte
    // access reaches validation whole and fails.
    let config = OpsConfig {
        valid: ValidConstraints { min_access_size: 0, max_access_size: 4, unaligned: false },
        impl_: ImplConstraints { min_access_size: 0, max_access_size: 4, unaligned: true },
        ..Default::default()
    };
    let d = dev_with(MemLike::new(false), config);
    let (buf, r) = d.read(1, 4);
    assert_eq!((buf, r), (vec![0, 0, 0, 0], MemTxResult::DecodeError));
    assert!(d.ops.take().is_empty());
}

// ---------------------------------------------------------------------------
// Unassigned, I/O ports, ROM, reservations
// ---------------------------------------------------------------------------

#[test]
fn unassigned_reads_zero_and_writes_are_dropped_with_decode_error() {
    let fx = Fx::new();
    let ram = fx.topo.new_ram("ram", 0x1000).unwrap();
    fx.root.add_subregion(0x1000, &ram).unwrap();
    ram.ram().unwrap().write(0, &[0xA1, 0xA2]).unwrap();
    let mut buf = [0xEEu8; 4];
    assert_eq!(fx.asp.read(0x100, &mut buf), MemTxResult::DecodeError);
    assert_eq!(buf, [0; 4]);
    // Half hole, half RAM: the RAM bytes are still read.
    let mut buf = [0xEEu8; 4];
    assert_eq!(fx.asp.read(0xffe, &mut buf), MemTxResult::DecodeError);
    assert_eq!(buf, [0, 0, 0xA1, 0xA2]);
    assert_eq!(fx.asp.write(0x100, &[1, 2, 3]), MemTxResult::DecodeError);
    // Beyond the root container.
    assert_eq!(fx.asp.read(0x10000, &mut buf), MemTxResult::DecodeError);
    assert_eq!(buf, [0; 4]);
    assert_eq!(fx.asp.read(u64::MAX - 1, &mut buf), MemTxResult::DecodeError);
}

#[test]
fn unclaimed_io_ports_read_all_ones_ok() {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    for (port, n) in [(0x80u64, 1usize), (0x80, 2), (0x80, 4), (0x81, 2), (0xfffe, 2)] {
        let mut buf = vec![0u8; n];
        assert_eq!(s.io_space.read(port, &mut buf), MemTxResult::Ok, "port {port:#x} width {n}");
        assert!(buf.iter().all(|&b| b == 0xff), "port {port:#x} width {n}: {buf:x?}");
    }
    assert_eq!(s.io_space.write(0x80, &[0x12]), MemTxResult::Ok);
    // A claimed port is served by its device.
    let ops = MemLike::new(false);
    let dev = topo.new_io_arc("dev", ops.clone(), OpsConfig::default(), 4).unwrap();
    s.io.add_subregion(0x60, &dev).unwrap();
    let mut b = [0u8; 1];
    assert!(s.io_space.read(0x61, &mut b).is_ok());
    assert_eq!(b, [0x11]);
    assert_eq!(ops.take(), vec![R(1, 1)]);
    // The memory space's holes are still unassigned.
    assert_eq!(s.memory.read(0x80, &mut b), MemTxResult::DecodeError);
    assert_eq!(b, [0]);
}

#[test]
fn rom_writes_are_dropped_with_decode_error_and_dirty_nothing() {
    let fx = Fx::new();
    let rom = fx.topo.new_rom("rom", 0x2000).unwrap();
    rom.ram().unwrap().write(0x10, &[1, 2, 3, 4]).unwrap();
    fx.root.add_subregion(0, &rom).unwrap();
    rom.set_log(true, DirtyClient::Vga).unwrap();
    fx.topo.global_dirty_log_start().unwrap();
    for c in DirtyClient::ALL {
        rom.reset_dirty(0, 0x2000, c).unwrap();
    }
    assert_eq!(fx.asp.write(0x10, &[9, 9, 9, 9]), MemTxResult::DecodeError);
    assert_eq!(fx.asp.write(0xffe, &[9; 4]), MemTxResult::DecodeError);
    let mut buf = [0u8; 4];
    assert_eq!(fx.asp.read(0x10, &mut buf), MemTxResult::Ok);
    assert_eq!(buf, [1, 2, 3, 4]);
    for c in DirtyClient::ALL {
        assert!(!rom.get_dirty(0, 0x2000, c).unwrap(), "{c:?}");
    }

    // RAM under a readonly container is read-only too.
    let roc = fx.topo.new_container("roc", 0x1000).unwrap();
    let ram = fx.topo.new_ram("ram", 0x1000).unwrap();
    ram.ram().unwrap().write(0, &[5, 6]).unwrap();
    roc.add_subregion(0, &ram).unwrap();
    roc.set_readonly(true).unwrap();
    fx.root.add_subregion(0x4000, &roc).unwrap();
    ram.set_log(true, DirtyClient::Vga).unwrap();
    for c in DirtyClient::ALL {
        ram.reset_dirty(0, 0x1000, c).unwrap();
    }
    assert_eq!(fx.asp.write(0x4000, &[7, 7]), MemTxResult::DecodeError);
    let mut b = [0u8; 2];
    assert!(fx.asp.read(0x4000, &mut b).is_ok());
    assert_eq!(b, [5, 6]);
    for c in DirtyClient::ALL {
        assert!(!ram.get_dirty(0, 0x1000, c).unwrap(), "{c:?}");
    }
}

#[test]
fn reservation_access_is_an_error_and_reads_zero() {
    let fx = Fx::new();
    let ram = fx.topo.new_ram("ram", 0x4000).unwrap();
    ram.ram().unwrap().write(0x1000, &[0xAB; 4]).unwrap();
    fx.root.add_subregion(0, &ram).unwrap();
    let resv = fx.topo.new_reservation("resv", 0x1000).unwrap();
    fx.root.add_subregion_overlap(0x1000, &resv, 1).unwrap();
    let mut buf = [0xEEu8; 4];
    assert_eq!(fx.asp.read(0x1000, &mut buf), MemTxResult::ReservationAccess);
    assert_eq!(buf, [0; 4]);
    assert_eq!(fx.asp.write(0x1000, &[1, 2, 3, 4]), MemTxResult::ReservationAccess);
    // The RAM it hides is untouched and the rest of the RAM works.
    let mut b = [0u8; 4];
    ram.ram().unwrap().read(0x1000, &mut b).unwrap();
    assert_eq!(b, [0xAB; 4]);
    assert_eq!(fx.asp.read(0x2000, &mut b), MemTxResult::Ok);
    // An access that straddles RAM and the reservation reports the worse.
    let mut b = [0xEEu8; 4];
    assert_eq!(fx.asp.read(0xffe, &mut b), MemTxResult::ReservationAccess);
    assert_eq!(&b[2..], &[0, 0]);
}

// ---------------------------------------------------------------------------
// E1–E3: map / unmap, bounce buffers and map clients
// ---------------------------------------------------------------------------

#[test]
fn e1_direct_map_of_ram() {
    let fx = Fx::new();
    let ram = fx.topo.new_ram("ram", 0x10000).unwrap();
    fx.root.add_subregion(0, &ram).unwrap();
    let m = fx.asp.map(0x800, 0x3000, true).unwrap();
    assert!(m.is_direct());
    assert_eq!(m.len(), 0x3000);
    assert_eq!(m.as_ptr(), ram.ram_ptr().unwrap().wrapping_add(0x800));
    assert_eq!(fx.asp.bounce_in_use(), 0);
    fx.asp.unmap(m, 0x3000).unwrap();
}

#[test]
fn e2_direct_map_stops_at_mmio() {
    let fx = Fx::new();
    let ram = fx.topo.new_ram("ram", 0x2000).unwrap();
    fx.root.add_subregion(0, &ram).unwrap();
    fx.root.add_subregion(0x2000, &fx.io("io", 0x1000)).unwrap();
    for is_write in [false, true] {
        let m = fx.asp.map(0x1000, 0x3000, is_write).unwrap();
        assert!(m.is_direct());
        assert_eq!(m.len(), 0x1000);
        assert_eq!(m.as_ptr(), ram.ram_ptr().unwrap().wrapping_add(0x1000));
        fx.asp.unmap(m, 0).unwrap();
    }
}

#[test]
fn direct_map_extends_only_while_region_and_offsets_are_contiguous() {
    let fx = Fx::new();
    let r = fx.topo.new_ram("R", 0x3000).unwrap();
    fx.root.add_subregion(0, &r).unwrap();
    // Two adjacent RAM regions: the mapping stops at the first one's end.
    let s = fx.topo.new_ram("S", 0x1000).unwrap();
    fx.root.add_subregion(0x3000, &s).unwrap();
    let m = fx.asp.map(0x2000, 0x2000, true).unwrap();
    assert_eq!(m.len(), 0x1000);
    fx.asp.unmap(m, 0).unwrap();
    // An alias showing R's page 2 at 0x1000: same region, but the offsets
    // jump, so the mapping stops there (1.4 bug Q6 fixed).
    let al = fx.topo.new_alias("al", &r, 0x2000, 0x1000).unwrap();
    fx.root.add_subregion_overlap(0x1000, &al, 1).unwrap();
    assert_eq!(
        ranges(&fx.asp),
        vec![
            sect("R", 0, 0x1000, 0),
            sect("R", 0x1000, 0x1000, 0x2000),
            sect("R", 0x2000, 0x1000, 0x2000),
            sect("S", 0x3000, 0x1000, 0)
        ]
    );
    let m = fx.asp.map(0, 0x3000, false).unwrap();
    assert_eq!(m.len(), 0x1000);
    fx.asp.unmap(m, 0).unwrap();
    let m = fx.asp.map(0x1800, 0x1000, false).unwrap();
    assert_eq!(m.len(), 0x800);
    assert_eq!(m.as_ptr(), r.ram_ptr().unwrap().wrapping_add(0x2800));
    fx.asp.unmap(m, 0).unwrap();
    // Pointing the alias at page 1 makes R contiguous again: one range.
    al.set_alias_offset(0x1000).unwrap();
    assert_eq!(ranges(&fx.asp), vec![sect("R", 0, 0x3000, 0), sect("S", 0x3000, 0x1000, 0)]);
    let m = fx.asp.map(0, 0x4000, false).unwrap();
    assert_eq!(m.len(), 0x3000);
    fx.asp.unmap(m, 0).unwrap();
}

#[test]
fn e3_mmio_map_bounces_and_budget_runs_out() {
    let fx = Fx::new();
    let ops = MemLike::new(false);
    let io = fx.topo.new_io_arc("io", ops.clone(), OpsConfig::default(), 0x1000).unwrap();
    fx.root.add_subregion(0x2000, &io).unwrap();
    let m = fx.asp.map(0x2000, 0x3000, false).unwrap();
    assert!(!m.is_direct());
    assert_eq!(m.len(), 0x1000);
    assert_eq!(fx.asp.bounce_in_use(), DEFAULT_BOUNCE_BUDGET);
    // Pre-filled by reading 0x1000 bytes through the device.
    let calls = ops.take();
    assert_eq!(calls.len(), 0x400);
    assert_eq!(calls.first(), Some(&R(0, 4)));
    assert_eq!(calls.last(), Some(&R(0xffc, 4)));
    let mut b = [0u8; 4];
    m.read(0, &mut b).unwrap();
    assert_eq!(b, [0x10, 0x11, 0x12, 0x13]);
    m.read(0xff0, &mut b).unwrap();
    assert_eq!(b, [reg(0xff0) as u8, reg(0xff1) as u8, reg(0xff2) as u8, reg(0xff3) as u8]);
    // A second MMIO map before unmap: nothing.
    assert!(fx.asp.map(0x2000, 0x10, false).is_none());
    fx.asp.unmap(m, 0x1000).unwrap();
    assert_eq!(fx.asp.bounce_in_use(), 0);
    assert!(ops.take().is_empty(), "a read mapping writes nothing back");
    let m = fx.asp.map(0x2000, 0x10, false).unwrap();
    assert_eq!(m.len(), 0x10);
    fx.asp.unmap(m, 0).unwrap();
}

#[test]
fn bounce_write_is_written_back_on_unmap() {
    let fx = Fx::new();
    let ops = MemLike::new(false);
    let io = fx.topo.new_io_arc("io", ops.clone(), OpsConfig::default(), 0x1000).unwrap();
    fx.root.add_subregion(0x2000, &io).unwrap();
    let mut m = fx.asp.map(0x2010, 8, true).unwrap();
    assert!(!m.is_direct());
    assert!(ops.take().is_empty(), "a write mapping is not pre-filled");
    m.write(0, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    // Only access_len bytes are written back.
    fx.asp.unmap(m, 6).unwrap();
    assert_eq!(ops.take(), vec![W(0x10, 0x04030201, 4), W(0x14, 0x0605, 2)]);
}

#[test]
fn rom_maps_directly_for_reads_and_bounces_for_writes() {
    let fx = Fx::new();
    let rom = fx.topo.new_rom("rom", 0x2000).unwrap();
    rom.ram().unwrap().write(0, &[1, 2, 3, 4]).unwrap();
    fx.root.add_subregion(0, &rom).unwrap();
    let m = fx.asp.map(0, 0x2000, false).unwrap();
    assert!(m.is_direct());
    assert_eq!(m.len(), 0x2000);
    fx.asp.unmap(m, 0).unwrap();
    let mut m = fx.asp.map(0, 4, true).unwrap();
    assert!(!m.is_direct());
    m.write(0, &[9, 9, 9, 9]).unwrap();
    fx.asp.unmap(m, 4).unwrap();
    let mut b = [0u8; 4];
    rom.ram().unwrap().read(0, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4], "the write-back to ROM is dropped");
}

#[test]
fn map_client_runs_at_once_when_budget_is_free() {
    let fx = Fx::new();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    fx.asp.register_map_client(move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

#[test]
fn map_client_is_woken_by_unmap_exactly_once() {
    let fx = Fx::new();
    fx.root.add_subregion(0x2000, &fx.io("io", 0x2000)).unwrap();
    let m = fx.asp.map(0x2000, 0x2000, false).unwrap();
    assert_eq!(m.len(), DEFAULT_BOUNCE_BUDGET as u64);
    // The budget is used up: map fails, and a client registered now waits.
    assert!(fx.asp.map(0x3000, 1, false).is_none());
    let ran = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    fx.asp.register_map_client(move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    let c = cancelled.clone();
    let id = fx.asp.register_map_client(move || {
        c.fetch_add(1, Ordering::SeqCst);
    });
    fx.asp.unregister_map_client(id);
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    fx.asp.unmap(m, 0).unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1, "woken by the release");
    assert_eq!(cancelled.load(Ordering::SeqCst), 0, "an unregistered client is not woken");
    // One-shot: another release does not run it again.
    let m = fx.asp.map(0x2000, 0x10, false).unwrap();
    fx.asp.unmap(m, 0).unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    // Dropping a bounce mapping releases the budget too.
    let m = fx.asp.map(0x2000, 0x2000, false).unwrap();
    let r = ran.clone();
    fx.asp.register_map_client(move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    drop(m);
    assert_eq!(ran.load(Ordering::SeqCst), 2);
    assert_eq!(fx.asp.bounce_in_use(), 0);
}

#[test]
fn unmap_of_a_direct_write_dirties_every_page_touched() {
    let fx = Fx::new();
    let ram = fx.topo.new_ram("ram", 0x4000).unwrap();
    fx.root.add_subregion(0, &ram).unwrap();
    ram.set_log(true, DirtyClient::Vga).unwrap();
    for c in DirtyClient::ALL {
        ram.reset_dirty(0, 0x4000, c).unwrap();
    }
    // [0x800, 0x2100) touches pages 0, 1 and 2; 1.4 would miss page 2.
    let mut m = fx.asp.map(0x800, 0x1900, true).unwrap();
    assert!(m.is_direct());
    m.write(0x18ff, &[0x5A]).unwrap();
    fx.asp.unmap(m, 0x1900).unwrap();
    for page in 0..3u64 {
        assert!(ram.get_dirty(page * PAGE_SIZE, 1, DirtyClient::Vga).unwrap(), "page {page}");
    }
    assert!(!ram.get_dirty(3 * PAGE_SIZE, 1, DirtyClient::Vga).unwrap());
    assert!(!ram.get_dirty(0, 0x4000, DirtyClient::Code).unwrap());
    assert!(!ram.get_dirty(0, 0x4000, DirtyClient::Migration).unwrap());
    let mut b = [0u8; 1];
    ram.ram().unwrap().read(0x20ff, &mut b).unwrap();
    assert_eq!(b, [0x5A]);
}

// ---------------------------------------------------------------------------
// G1–G3: dirty logging
// ---------------------------------------------------------------------------

#[test]
fn g1_new_ram_is_dirty_until_reset() {
    let topo = Topology::new();
    let mr = topo.new_ram("mr", 0x4000).unwrap();
    for c in DirtyClient::ALL {
        assert!(mr.get_dirty(0, 0x4000, c).unwrap(), "{c:?}");
    }
    mr.reset_dirty(0, 0x4000, DirtyClient::Vga).unwrap();
    assert!(!mr.get_dirty(0, 0x4000, DirtyClient::Vga).unwrap());
    assert!(mr.get_dirty(0, 0x4000, DirtyClient::Migration).unwrap(), "other clients keep their bits");
}

#[test]
fn g2_ranges_are_widened_to_pages() {
    let topo = Topology::new();
    let mr = topo.new_ram("mr", 0x4000).unwrap();
    mr.reset_dirty(0, 0x4000, DirtyClient::Vga).unwrap();
    mr.set_dirty_for(0x1000, 1, DirtyClient::Vga.mask()).unwrap();
    assert!(mr.get_dirty(0xFFF, 2, DirtyClient::Vga).unwrap(), "checks pages 0 and 1");
    assert!(!mr.get_dirty(0, 0x1000, DirtyClient::Vga).unwrap());
    assert!(!mr.get_dirty(0x2000, 0x2000, DirtyClient::Vga).unwrap());
    // Reset widens too: clearing one byte of page 1 clears the page.
    mr.reset_dirty(0x1FFF, 1, DirtyClient::Vga).unwrap();
    assert!(!mr.get_dirty(0, 0x4000, DirtyClient::Vga).unwrap());
    mr.set_dirty_for(0x2FFF, 2, DirtyClient::Vga.mask()).unwrap();
    assert!(mr.test_and_clear_dirty(0x3000, 1, DirtyClient::Vga).unwrap());
    assert!(!mr.test_and_clear_dirty(0x3000, 1, DirtyClient::Vga).unwrap());
    assert!(mr.get_dirty(0x2000, 1, DirtyClient::Vga).unwrap());
}

fn g3_setup(global: bool, mask: &[DirtyClient]) -> (Fx, MemoryRegion) {
    let fx = Fx::new();
    let mr = fx.topo.new_ram("mr", 0x4000).unwrap();
    fx.root.add_subregion(0x8000, &mr).unwrap();
    for &c in mask {
        mr.set_log(true, c).unwrap();
    }
    if global {
        fx.topo.global_dirty_log_start().unwrap();
    }
    for c in DirtyClient::ALL {
        mr.reset_dirty(0, 0x4000, c).unwrap();
    }
    (fx, mr)
}

fn dirty_pages(mr: &MemoryRegion, c: DirtyClient) -> Vec<u64> {
    (0..4).filter(|p| mr.get_dirty(p * PAGE_SIZE, 1, c).unwrap()).collect()
}

#[test]
fn g3_write_dirties_log_mask_plus_migration_never_code() {
    // VGA logging, global logging on: VGA and MIGRATION, not CODE.
    let (fx, mr) = g3_setup(true, &[DirtyClient::Vga]);
    assert_eq!(fx.asp.write(0x8000 + 0x1234, &[0x42]), MemTxResult::Ok);
    assert_eq!(dirty_pages(&mr, DirtyClient::Vga), vec![1]);
    assert_eq!(dirty_pages(&mr, DirtyClient::Migration), vec![1]);
    assert_eq!(dirty_pages(&mr, DirtyClient::Code), Vec::<u64>::new());

    // Without global logging: only the region's own clients.
    let (fx, mr) = g3_setup(false, &[DirtyClient::Vga]);
    assert!(fx.asp.write(0x8000 + 0x1234, &[0x42]).is_ok());
    assert_eq!(dirty_pages(&mr, DirtyClient::Vga), vec![1]);
    assert!(dirty_pages(&mr, DirtyClient::Migration).is_empty());

    // CODE in the mask is still never set by a write.
    let (fx, mr) = g3_setup(true, &[DirtyClient::Code]);
    assert!(fx.asp.write(0x8000 + 0x1ffe, &[1, 2, 3, 4]).is_ok());
    assert!(dirty_pages(&mr, DirtyClient::Code).is_empty());
    assert_eq!(dirty_pages(&mr, DirtyClient::Migration), vec![1, 2], "every page the write touches");
    assert!(dirty_pages(&mr, DirtyClient::Vga).is_empty());

    // No logging at all: nothing.
    let (fx, mr) = g3_setup(false, &[]);
    assert!(fx.asp.write(0x8000 + 0x1234, &[0x42]).is_ok());
    for c in DirtyClient::ALL {
        assert!(dirty_pages(&mr, c).is_empty(), "{c:?}");
    }
}

#[test]
fn set_dirty_uses_the_log_mask_plus_global_migration() {
    let (fx, mr) = g3_setup(false, &[DirtyClient::Vga]);
    mr.set_dirty(0x1000, 1).unwrap();
    assert_eq!(dirty_pages(&mr, DirtyClient::Vga), vec![1]);
    assert!(dirty_pages(&mr, DirtyClient::Migration).is_empty());
    fx.topo.global_dirty_log_start().unwrap();
    mr.set_dirty(0x2000, 1).unwrap();
    assert_eq!(dirty_pages(&mr, DirtyClient::Vga), vec![1, 2]);
    assert_eq!(dirty_pages(&mr, DirtyClient::Migration), vec![2]);
    assert!(dirty_pages(&mr, DirtyClient::Code).is_empty());
}

// ---------------------------------------------------------------------------
// Old-style ops adapters
// ---------------------------------------------------------------------------

type Hits = Arc<Mutex<Vec<(u64, u64)>>>;

#[test]
fn portio_table_adapter() {
    let hits: Hits = Arc::default();
    let h = hits.clone();
    let table = PortioTable::new(vec![
        PortioEntry {
            offset: 0,
            len: 4,
            size: 1,
            read: Some(Arc::new(|a| 0x40 + a)),
            write: Some(Arc::new(move |a, v| h.lock().unwrap().push((a, v)))),
        },
        PortioEntry { offset: 4, len: 2, size: 2, read: Some(Arc::new(|a| 0x1_2340 + a)), write: None },
    ]);
    // Direct calls on the adapter.
    assert_eq!(table.read(1, 1), 0x41);
    assert_eq!(table.read(0, 2), 0x4140, "no 2-byte entry: two 1-byte reads");
    assert_eq!(table.read(4, 2), 0x2344, "masked to the width");
    assert_eq!(table.read(4, 1), 0xff, "no 1-byte entry at 4: all-ones");
    assert_eq!(table.read(8, 4), 0xffff_ffff);
    assert_eq!(table.read(0, 4), 0xffff_ffff, "4-byte accesses are not split");

    // Through the I/O address space.
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let ports = topo.new_io("ports", table, PortioTable::config(), 0x10).unwrap();
    s.io.add_subregion(0x100, &ports).unwrap();
    let rd = |port: u64, n: usize| {
        let mut b = vec![0u8; n];
        let r = s.io_space.read(port, &mut b);
        (b, r)
    };
    assert_eq!(rd(0x101, 1), (vec![0x41], MemTxResult::Ok));
    assert_eq!(rd(0x101, 2), (vec![0x41, 0x42], MemTxResult::Ok));
    assert_eq!(rd(0x104, 2), (vec![0x44, 0x23], MemTxResult::Ok));
    assert_eq!(rd(0x108, 2), (vec![0xff, 0xff], MemTxResult::Ok));
    assert_eq!(rd(0x108, 4), (vec![0xff; 4], MemTxResult::Ok));

    assert!(s.io_space.write(0x102, &[0x55]).is_ok());
    assert!(s.io_space.write(0x100, &[0xBB, 0xAA]).is_ok());
    assert!(s.io_space.write(0x100, &[1, 2, 3, 4]).is_ok()); // no 4-byte entry: dropped
    assert!(s.io_space.write(0x104, &[1, 2]).is_ok()); // read-only entry: dropped
    assert_eq!(*hits.lock().unwrap(), vec![(2, 0x55), (0, 0xBB), (1, 0xAA)]);
}

#[test]
fn mmio_table_adapter() {
    let hits: Hits = Arc::default();
    let (h0, h1) = (hits.clone(), hits.clone());
    let make = || MmioTable {
        read: [Some(Arc::new(|a| 0x80 + a)), None, Some(Arc::new(|a| 0x1_CAFE_0000 | a))],
        write: [
            Some(Arc::new({
                let h = h0.clone();
                move |a, v| h.lock().unwrap().push((a, v))
            })),
            Some(Arc::new({
                let h = h1.clone();
                move |a, v| h.lock().unwrap().push((a | 0x1000, v))
            })),
            None,
        ],
    };
    let table = make();
    assert_eq!(table.read(1, 1), 0x81);
    assert_eq!(table.read(4, 4), 0xCAFE_0004, "masked to the width");
    assert_eq!(table.read(2, 2), 0, "a missing handler reads 0");

    let fx = Fx::new();
    let mmio = fx.topo.new_io("mmio", make(), OpsConfig::default(), 0x100).unwrap();
    fx.root.add_subregion(0x3000, &mmio).unwrap();
    let mut b = [0u8; 4];
    assert!(fx.asp.read(0x3004, &mut b).is_ok());
    assert_eq!(b, [0x04, 0x00, 0xFE, 0xCA]);
    let mut b2 = [0xEEu8; 2];
    assert!(fx.asp.read(0x3002, &mut b2).is_ok());
    assert_eq!(b2, [0, 0]);
    assert!(fx.asp.write(0x3003, &[0x77]).is_ok());
    assert!(fx.asp.write(0x3002, &[0x34, 0x12]).is_ok());
    assert!(fx.asp.write(0x3000, &[1, 2, 3, 4]).is_ok()); // no 4-byte handler: dropped
    assert_eq!(*hits.lock().unwrap(), vec![(3, 0x77), (0x1002, 0x1234)]);

    // Split to the implemented width like any other ops.
    let narrow = fx.topo.new_io("narrow", make(), OpsConfig::with_impl(1, 1), 0x100).unwrap();
    fx.root.add_subregion(0x4000, &narrow).unwrap();
    assert!(fx.asp.read(0x4000, &mut b).is_ok());
    assert_eq!(b, [0x80, 0x81, 0x82, 0x83]);
}

// ---------------------------------------------------------------------------
// The diff broadcast
// ---------------------------------------------------------------------------

#[test]
fn subscribers_get_every_diff_in_generation_order() {
    let fx = Fx::new();
    let mut sub = fx.topo.subscribe().unwrap();
    let g0 = fx.topo.generation();
    assert_eq!(sub.generation(), g0);
    assert!(sub.try_recv().is_none());
    let a = fx.topo.new_ram("A", 0x2000).unwrap();
    let b = fx.io("B", 0x1000);
    fx.root.add_subregion(0x1000, &a).unwrap();
    fx.root.add_subregion_overlap(0x2000, &b, 1).unwrap();
    a.set_log(true, DirtyClient::Vga).unwrap();

    let Some(Observed::Diff(d)) = sub.try_recv() else { panic!("expected a diff") };
    assert_eq!(d.generation, g0 + 1);
    assert_eq!(d.spaces.len(), 1);
    let sd = &d.spaces[0];
    assert_eq!(sd.address_space, fx.asp.id());
    assert!(sd.removed.is_empty());
    assert_eq!(sd.added.len(), 1);
    assert_eq!((sd.added[0].start, sd.added[0].size, &*sd.added[0].region_name), (0x1000, 0x2000, "A"));
    assert_eq!(sd.added[0].region, a.id());

    let Some(Observed::Diff(d)) = sub.try_recv() else { panic!("expected a diff") };
    assert_eq!(d.generation, g0 + 2);
    let sd = &d.spaces[0];
    let rec = |r: &topos_runtime::RangeRecord| (r.start, r.size, r.region_name.to_string(), r.offset_in_region);
    assert_eq!(sd.removed.iter().map(rec).collect::<Vec<_>>(), vec![(0x1000, 0x2000, "A".into(), 0)]);
    assert_eq!(
        sd.added.iter().map(rec).collect::<Vec<_>>(),
        vec![(0x1000, 0x1000, "A".into(), 0), (0x2000, 0x1000, "B".into(), 0)]
    );

    let Some(Observed::Diff(d)) = sub.try_recv() else { panic!("expected a diff") };
    assert_eq!(d.generation, g0 + 3);
    let sd = &d.spaces[0];
    assert!(sd.added.is_empty() && sd.removed.is_empty());
    assert_eq!(sd.log_changed.len(), 1);
    assert_eq!((sd.log_changed[0].0.start, sd.log_changed[0].0.dirty_log_mask, sd.log_changed[0].1), (0x1000, 1, 0));

    assert!(sub.try_recv().is_none());
    assert_eq!(sub.generation(), fx.topo.generation());
}

#[test]
fn a_lagging_subscriber_gets_a_resync_snapshot() {
    let topo = Topology::with_diff_capacity(2);
    let root = topo.new_container("root", 0x100000).unwrap();
    let asp = topo.address_space_init(&root, "memory").unwrap();
    let io_root = topo.new_container("io", 0x10000).unwrap();
    let io_space = topo.address_space_init(&io_root, "io").unwrap();
    let mut sub = topo.subscribe().unwrap();
    let g0 = topo.generation();
    let mut keep = Vec::new();
    for i in 0..5u64 {
        let r = topo.new_ram(&format!("r{i}"), 0x1000).unwrap();
        root.add_subregion(i * 0x2000, &r).unwrap();
        keep.push(r);
    }
    io_root.add_subregion(0x60, &topo.new_ram("port", 0x10).unwrap()).unwrap();
    assert_eq!(topo.generation(), g0 + 6);
    match sub.try_recv() {
        Some(Observed::Resync { missed, snapshot }) => {
            assert_eq!(missed, 4, "six commits, two kept");
            assert_eq!(snapshot.generation, topo.generation());
            let snap: Vec<(u64, Vec<String>)> = snapshot
                .spaces
                .iter()
                .map(|(a, v)| {
                    let rs = v
                        .ranges()
                        .iter()
                        .map(|r| sect(r.region().name(), r.start(), r.size() as u64, r.offset_in_region()))
                        .collect();
                    (a.id(), rs)
                })
                .collect();
            let now: Vec<(u64, Vec<String>)> = topo.address_spaces().iter().map(|a| (a.id(), ranges(a))).collect();
            assert_eq!(snap, now);
            assert_eq!(now.len(), 2);
            assert_eq!(now[0].1.len(), 5);
            assert_eq!(now[1], (io_space.id(), vec![sect("port", 0x60, 0x10, 0)]));
            assert_eq!(now[0].0, asp.id());
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    // The diffs still buffered are covered by the snapshot: nothing more.
    assert!(sub.try_recv().is_none());
    assert_eq!(sub.generation(), topo.generation());
    keep[0].set_enabled(false).unwrap();
    match sub.try_recv() {
        Some(Observed::Diff(d)) => {
            assert_eq!(d.generation, g0 + 7);
            assert_eq!(d.spaces[0].removed.len(), 1);
        }
        other => panic!("expected the next diff, got {other:?}"),
    }
}
