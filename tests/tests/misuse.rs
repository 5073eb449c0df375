//! Misuse of the memory API by the embedding program: every variant of
//! [`topos_runtime::Error`] that a program can trigger, and after each error
//! the proof that nothing changed: the same FlatViews, the same generation,
//! the same parents, subregions and attributes, and not a single listener
//! callback.
//!
//! (QEMU asserts or aborts in these places; topos returns a typed error and
//! changes nothing.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use topos_runtime::{
    new_event_notifier, AddressSpace, DirtyClient, Error, EventNotifier, HwAddr, ImplConstraints, ListenerResult,
    MemoryListener, MemoryRegion, MemoryRegionOps, MemoryRegionSection, OpsConfig, Result, Topology, ValidConstraints,
    SIZE_MAX,
};

/// A device that does nothing.
struct Dummy;

impl MemoryRegionOps for Dummy {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        0
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {}
}

/// Counts every callback it receives.
#[derive(Default)]
struct Counter(AtomicUsize);

impl Counter {
    fn hit(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn take(&self) -> usize {
        self.0.swap(0, Ordering::SeqCst)
    }
}

impl MemoryListener for Counter {
    fn begin(&self) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn commit(&self) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn region_add(&self, _: &MemoryRegionSection) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn region_del(&self, _: &MemoryRegionSection) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn region_nop(&self, _: &MemoryRegionSection) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn log_start(&self, _: &MemoryRegionSection, _: u8, _: u8) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn log_stop(&self, _: &MemoryRegionSection, _: u8, _: u8) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn log_sync(&self, _: &MemoryRegionSection) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn log_global_start(&self) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn log_global_stop(&self) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn eventfd_add(&self, _: &MemoryRegionSection, _: bool, _: u64, _: &EventNotifier) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn eventfd_del(&self, _: &MemoryRegionSection, _: bool, _: u64, _: &EventNotifier) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn coalesced_mmio_add(&self, _: &MemoryRegionSection, _: HwAddr, _: u64) -> ListenerResult {
        self.hit();
        Ok(())
    }
    fn coalesced_mmio_del(&self, _: &MemoryRegionSection, _: HwAddr, _: u64) -> ListenerResult {
        self.hit();
        Ok(())
    }
}

/// Everything observable about a topology and the regions a test tracks.
#[derive(Debug, PartialEq)]
struct State {
    generation: u64,
    global_dirty: bool,
    /// Per live address space: name and ranges.
    views: Vec<(String, Vec<String>)>,
    /// Per tracked region: everything the handle shows.
    regions: Vec<String>,
}

fn view_of(asp: &AddressSpace) -> Vec<String> {
    asp.view()
        .ranges()
        .iter()
        .map(|r| {
            format!(
                "[{:#x},+{:#x}) {} off={:#x} ro={} romd={} mask={}",
                r.start(),
                r.size(),
                r.region().name(),
                r.offset_in_region(),
                r.readonly(),
                r.romd(),
                r.dirty_log_mask()
            )
        })
        .collect()
}

fn describe(r: &MemoryRegion) -> String {
    let names = |v: Vec<MemoryRegion>| v.iter().map(|c| c.name().to_string()).collect::<Vec<_>>();
    format!(
        "{} kind={} size={:#x} parent={:?} subs={:?} addr={:#x} prio={} enabled={} ro={} romd={} alias_off={:#x} \
         log={} coalesced={:?} flush={} eventfds={:?} destroyed={}",
        r.name(),
        r.kind_name(),
        r.size(),
        r.container().map(|c| c.name().to_string()),
        names(r.subregions()),
        r.addr(),
        r.priority(),
        r.is_enabled(),
        r.is_readonly(),
        r.is_romd(),
        r.alias_offset(),
        r.dirty_log_mask(),
        r.coalesced_ranges(),
        r.flush_coalesced(),
        r.ioeventfds(),
        r.is_destroyed(),
    )
}

/// A topology with an address space over `root` (0x10000):
/// RAM `ram` (0x2000) at 0x1000, I/O `dev` (0x1000) at 0x4000, alias `al`
/// (ram+0x800, 0x800) at 0x8000, and, unattached, container `c` (0x1000)
/// holding RAM `inner` at 0, and RAM `loose` (0x1000). A listener counts
/// callbacks.
struct World {
    topo: Topology,
    root: MemoryRegion,
    asp: AddressSpace,
    ram: MemoryRegion,
    dev: MemoryRegion,
    al: MemoryRegion,
    c: MemoryRegion,
    inner: MemoryRegion,
    loose: MemoryRegion,
    tracked: Mutex<Vec<MemoryRegion>>,
    calls: Arc<Counter>,
}

impl World {
    fn new() -> World {
        let topo = Topology::new();
        let root = topo.new_container("root", 0x10000).unwrap();
        let asp = topo.address_space_init(&root, "memory").unwrap();
        let ram = topo.new_ram("ram", 0x2000).unwrap();
        let dev = topo.new_io("dev", Dummy, OpsConfig::default(), 0x1000).unwrap();
        let al = topo.new_alias("al", &ram, 0x800, 0x800).unwrap();
        let c = topo.new_container("c", 0x1000).unwrap();
        let inner = topo.new_ram("inner", 0x1000).unwrap();
        let loose = topo.new_ram("loose", 0x1000).unwrap();
        root.add_subregion(0x1000, &ram).unwrap();
        root.add_subregion(0x4000, &dev).unwrap();
        root.add_subregion_overlap(0x8000, &al, 2).unwrap();
        c.add_subregion(0, &inner).unwrap();
        let calls = Arc::new(Counter::default());
        topo.listener_register(calls.clone(), 0, None).unwrap();
        let tracked = vec![root.clone(), ram.clone(), dev.clone(), al.clone(), c.clone(), inner.clone(), loose.clone()];
        World { topo, root, asp, ram, dev, al, c, inner, loose, tracked: Mutex::new(tracked), calls }
    }

    fn track(&self, r: &MemoryRegion) {
        self.tracked.lock().unwrap().push(r.clone());
    }

    fn state(&self) -> State {
        State {
            generation: self.topo.generation(),
            global_dirty: self.topo.global_dirty_log(),
            views: self.topo.address_spaces().iter().map(|a| (a.name().to_string(), view_of(a))).collect(),
            regions: self.tracked.lock().unwrap().iter().map(describe).collect(),
        }
    }

    /// Runs a misuse: it must fail, change nothing and call no listener.
    #[track_caller]
    fn fails<T: std::fmt::Debug>(&self, op: impl FnOnce() -> Result<T>) -> Error {
        self.calls.take();
        let before = self.state();
        let err = op().expect_err("the misuse must fail");
        assert_eq!(self.state(), before, "`{err}` changed the topology");
        assert_eq!(self.calls.take(), 0, "`{err}` reached a listener");
        err
    }
}

#[test]
fn world_is_as_described() {
    let w = World::new();
    assert_eq!(
        view_of(&w.asp),
        vec![
            "[0x1000,+0x2000) ram off=0x0 ro=false romd=true mask=0",
            "[0x4000,+0x1000) dev off=0x0 ro=false romd=true mask=0",
            "[0x8000,+0x800) ram off=0x800 ro=false romd=true mask=0",
        ]
    );
}

#[test]
fn adding_a_region_twice_is_already_has_parent() {
    let w = World::new();
    let e = w.fails(|| w.root.add_subregion(0x9000, &w.ram));
    assert_eq!(e, Error::AlreadyHasParent { region: "ram".into(), parent: "root".into() });
    let e = w.fails(|| w.c.add_subregion(0x100, &w.ram));
    assert_eq!(e, Error::AlreadyHasParent { region: "ram".into(), parent: "root".into() });
    let e = w.fails(|| w.root.add_subregion_overlap(0xa000, &w.inner, 5));
    assert_eq!(e, Error::AlreadyHasParent { region: "inner".into(), parent: "c".into() });
    // Inside a transaction: the error leaves the transaction usable.
    let g = w.topo.generation();
    w.topo.begin().unwrap();
    assert!(matches!(w.root.add_subregion(0, &w.ram), Err(Error::AlreadyHasParent { .. })));
    w.root.add_subregion(0xa000, &w.loose).unwrap();
    w.topo.commit().unwrap();
    assert_eq!(w.topo.generation(), g + 1);
    assert_eq!(w.loose.container(), Some(w.root.clone()));
}

#[test]
fn deleting_a_non_child_is_not_a_child() {
    let w = World::new();
    let e = w.fails(|| w.root.del_subregion(&w.loose));
    assert_eq!(e, Error::NotAChild { region: "loose".into(), container: "root".into() });
    let e = w.fails(|| w.c.del_subregion(&w.ram));
    assert_eq!(e, Error::NotAChild { region: "ram".into(), container: "c".into() });
    // A grandchild is not a child.
    w.root.add_subregion(0xc000, &w.c).unwrap();
    let e = w.fails(|| w.root.del_subregion(&w.inner));
    assert_eq!(e, Error::NotAChild { region: "inner".into(), container: "root".into() });
    // Deleting twice.
    w.root.del_subregion(&w.dev).unwrap();
    let e = w.fails(|| w.root.del_subregion(&w.dev));
    assert_eq!(e, Error::NotAChild { region: "dev".into(), container: "root".into() });
}

#[test]
fn cycles_are_alias_cycle() {
    let w = World::new();
    // Alias A -> container C, then C.add_subregion(A).
    let a = w.topo.new_alias("A", &w.c, 0, 0x1000).unwrap();
    w.track(&a);
    let e = w.fails(|| w.c.add_subregion(0x800, &a));
    assert_eq!(e, Error::AliasCycle { region: "A".into(), container: "c".into() });
    // Through a container that holds the alias.
    let d = w.topo.new_container("D", 0x1000).unwrap();
    d.add_subregion(0, &a).unwrap();
    w.track(&d);
    let e = w.fails(|| w.c.add_subregion(0x800, &d));
    assert_eq!(e, Error::AliasCycle { region: "D".into(), container: "c".into() });
    // A container into itself, and into its own descendant.
    let e = w.fails(|| w.c.add_subregion(0, &w.c));
    assert_eq!(e, Error::AliasCycle { region: "c".into(), container: "c".into() });
    let e = w.fails(|| w.inner.add_subregion(0, &w.c));
    assert_eq!(e, Error::AliasCycle { region: "c".into(), container: "inner".into() });
    // Through the address space's root: an alias of root added under root.
    let ar = w.topo.new_alias("AR", &w.root, 0, 0x1000).unwrap();
    w.track(&ar);
    let e = w.fails(|| w.root.add_subregion_overlap(0xf000, &ar, 9));
    assert_eq!(e, Error::AliasCycle { region: "AR".into(), container: "root".into() });
}

#[test]
fn aliases_cannot_hold_subregions() {
    let w = World::new();
    let e = w.fails(|| w.al.add_subregion(0, &w.loose));
    assert_eq!(e, Error::AliasCannotContain("al".into()));
    let e = w.fails(|| w.al.add_subregion_overlap(0x10, &w.loose, 3));
    assert_eq!(e, Error::AliasCannotContain("al".into()));
}

#[test]
fn destroying_a_mapped_region_is_still_mapped() {
    let w = World::new();
    let e = w.fails(|| w.ram.destroy());
    // `ram` is both mapped and aliased; being mapped is reported first.
    assert_eq!(e, Error::StillMapped("ram".into()));
    let e = w.fails(|| w.inner.destroy());
    assert_eq!(e, Error::StillMapped("inner".into()));
    let e = w.fails(|| w.dev.destroy());
    assert_eq!(e, Error::StillMapped("dev".into()));
    // Once unmapped it can go.
    w.root.del_subregion(&w.dev).unwrap();
    w.dev.destroy().unwrap();
    assert!(w.dev.is_destroyed());
}

#[test]
fn destroying_an_aliased_region_is_still_aliased() {
    let w = World::new();
    let t = w.topo.new_ram("t", 0x1000).unwrap();
    let a1 = w.topo.new_alias("a1", &t, 0, 0x100).unwrap();
    w.track(&t);
    w.track(&a1);
    let e = w.fails(|| t.destroy());
    assert_eq!(e, Error::StillAliased { region: "t".into(), aliases: 1 });
    let a2 = w.topo.new_alias("a2", &t, 0x100, 0x100).unwrap();
    w.track(&a2);
    let e = w.fails(|| t.destroy());
    assert_eq!(e, Error::StillAliased { region: "t".into(), aliases: 2 });
    a1.destroy().unwrap();
    let e = w.fails(|| t.destroy());
    assert_eq!(e, Error::StillAliased { region: "t".into(), aliases: 1 });
    // Dropping the last handle of an alias releases its target too.
    drop(a2);
    w.tracked.lock().unwrap().retain(|r| r.name() != "a2");
    t.destroy().unwrap();
    // `ram` is aliased by `al`: once unmapped, the alias still holds it.
    w.root.del_subregion(&w.ram).unwrap();
    let e = w.fails(|| w.ram.destroy());
    assert_eq!(e, Error::StillAliased { region: "ram".into(), aliases: 1 });
}

#[test]
fn destroying_an_address_space_root_is_refused() {
    let w = World::new();
    let e = w.fails(|| w.root.destroy());
    assert_eq!(e, Error::IsAddressSpaceRoot("root".into()));
    // Two address spaces on one root: still refused after one goes.
    let as2 = w.topo.address_space_init(&w.root, "memory2").unwrap();
    w.topo.address_space_destroy(&as2).unwrap();
    let e = w.fails(|| w.root.destroy());
    assert_eq!(e, Error::IsAddressSpaceRoot("root".into()));
    w.topo.address_space_destroy(&w.asp).unwrap();
    w.root.destroy().unwrap();
    assert!(w.topo.address_spaces().is_empty());
    assert_eq!(w.ram.container(), None, "destroy detached the children");
}

#[test]
fn using_a_destroyed_region_is_destroyed() {
    let w = World::new();
    w.loose.destroy().unwrap();
    let dead = || Error::Destroyed("loose".into());
    assert_eq!(w.fails(|| w.loose.destroy()), dead());
    assert_eq!(w.fails(|| w.root.add_subregion(0xa000, &w.loose)), dead());
    assert_eq!(w.fails(|| w.loose.add_subregion(0, &w.topo.new_ram("x", 0x10).unwrap())), dead());
    assert_eq!(w.fails(|| w.loose.set_enabled(false)), dead());
    assert_eq!(w.fails(|| w.loose.set_readonly(true)), dead());
    assert_eq!(w.fails(|| w.loose.set_address(0x10)), dead());
    assert_eq!(w.fails(|| w.loose.set_log(true, DirtyClient::Vga)), dead());
    assert_eq!(w.fails(|| w.loose.add_coalescing(0, 0x10)), dead());
    assert_eq!(w.fails(|| w.loose.set_coalescing()), dead());
    assert_eq!(w.fails(|| w.loose.set_flush_coalesced()), dead());
    assert_eq!(w.fails(|| w.loose.clear_flush_coalesced()), dead());
    let n = new_event_notifier().unwrap();
    assert_eq!(w.fails(|| w.loose.add_eventfd(0, 4, false, 0, &n)), dead());
    assert_eq!(w.fails(|| w.topo.new_alias("x", &w.loose, 0, 0x10)), dead());
    assert_eq!(w.fails(|| w.topo.address_space_init(&w.loose, "x")), dead());
    // A destroyed alias and ROM device.
    let a = w.topo.new_alias("deadalias", &w.ram, 0, 0x10).unwrap();
    a.destroy().unwrap();
    w.track(&a);
    assert_eq!(w.fails(|| a.set_alias_offset(0x8)), Error::Destroyed("deadalias".into()));
    let rd = w.topo.new_rom_device("deadrd", Dummy, OpsConfig::default(), 0x1000).unwrap();
    rd.destroy().unwrap();
    w.track(&rd);
    assert_eq!(w.fails(|| rd.rom_device_set_readable(false)), Error::Destroyed("deadrd".into()));
}

#[test]
fn sizes_over_2_pow_64_overflow() {
    let w = World::new();
    let big = SIZE_MAX + 1;
    let is_overflow = |e: Error| assert!(matches!(e, Error::Overflow(_)), "{e:?}");
    is_overflow(w.fails(|| w.topo.new_container("huge", big)));
    is_overflow(w.fails(|| w.topo.new_container("huge", u128::MAX)));
    is_overflow(w.fails(|| w.topo.new_io("huge", Dummy, OpsConfig::default(), big)));
    is_overflow(w.fails(|| w.topo.new_ram("huge", big)));
    is_overflow(w.fails(|| w.topo.new_rom("huge", big)));
    is_overflow(w.fails(|| w.topo.new_rom_device("huge", Dummy, OpsConfig::default(), big)));
    is_overflow(w.fails(|| w.topo.new_alias("huge", &w.ram, 0, big)));
    is_overflow(w.fails(|| w.topo.new_reservation("huge", big)));
    // Exactly 2^64 is a valid size.
    let full = w.topo.new_container("full", SIZE_MAX).unwrap();
    assert_eq!(full.size(), SIZE_MAX);
}

#[test]
fn unrepresentable_ram_is_ram_allocation() {
    let w = World::new();
    let e = w.fails(|| w.topo.new_ram("vast", SIZE_MAX));
    assert!(
        matches!(e, Error::RamAllocation { ref region, size, .. } if region == "vast" && size == SIZE_MAX),
        "{e:?}"
    );
    let e = w.fails(|| w.topo.new_rom_device("vast", Dummy, OpsConfig::default(), SIZE_MAX));
    assert!(matches!(e, Error::RamAllocation { .. }), "{e:?}");
}

#[test]
fn wrong_kinds_are_wrong_kind() {
    let w = World::new();
    let wk = |region: &str, expected: &'static str| Error::WrongKind { region: region.into(), expected };
    assert_eq!(w.fails(|| w.ram.set_alias_offset(0)), wk("ram", "an alias"));
    assert_eq!(w.fails(|| w.c.set_alias_offset(0)), wk("c", "an alias"));
    assert_eq!(w.fails(|| w.ram.rom_device_set_readable(false)), wk("ram", "a ROM device"));
    assert_eq!(w.fails(|| w.dev.rom_device_set_readable(false)), wk("dev", "a ROM device"));
    for r in [&w.dev, &w.c, &w.al] {
        let name = r.name();
        assert_eq!(w.fails(|| r.ram()), wk(name, "RAM"));
        assert_eq!(w.fails(|| r.ram_ptr()), wk(name, "RAM"));
        assert_eq!(w.fails(|| r.ram_addr()), wk(name, "RAM"));
        assert_eq!(w.fails(|| r.get_dirty(0, 1, DirtyClient::Vga)), wk(name, "RAM"));
        assert_eq!(w.fails(|| r.set_dirty(0, 1)), wk(name, "RAM"));
        assert_eq!(w.fails(|| r.set_dirty_for(0, 1, 7)), wk(name, "RAM"));
        assert_eq!(w.fails(|| r.reset_dirty(0, 1, DirtyClient::Vga)), wk(name, "RAM"));
        assert_eq!(w.fails(|| r.test_and_clear_dirty(0, 1, DirtyClient::Vga)), wk(name, "RAM"));
        assert_eq!(w.fails(|| r.snapshot_and_clear_dirty(0, 1, DirtyClient::Vga)), wk(name, "RAM"));
    }
    let resv = w.topo.new_reservation("resv", 0x1000).unwrap();
    assert_eq!(w.fails(|| resv.ram()), wk("resv", "RAM"));
}

#[test]
fn out_of_range_dirty_ram_and_mapping_access() {
    let w = World::new();
    let oor = |region: &str, offset: u64, size: u128| Error::OutOfRange { region: region.into(), offset, size };
    // `ram` is 0x2000 bytes.
    assert_eq!(w.fails(|| w.ram.get_dirty(0x2000, 1, DirtyClient::Vga)), oor("ram", 0x2000, 1));
    assert_eq!(w.fails(|| w.ram.get_dirty(0x1fff, 2, DirtyClient::Vga)), oor("ram", 0x1fff, 2));
    assert_eq!(w.fails(|| w.ram.set_dirty(u64::MAX, 2)), oor("ram", u64::MAX, 2));
    assert_eq!(w.fails(|| w.ram.reset_dirty(0, 0x2001, DirtyClient::Code)), oor("ram", 0, 0x2001));
    assert_eq!(w.fails(|| w.ram.test_and_clear_dirty(0x3000, 0, DirtyClient::Vga)), oor("ram", 0x3000, 0));
    assert_eq!(w.fails(|| w.ram.set_dirty_for(0x1000, 0x1001, 1)), oor("ram", 0x1000, 0x1001));
    // The dirty bits did not move: new RAM is all dirty, and still is.
    assert!(w.ram.get_dirty(0, 0x2000, DirtyClient::Code).unwrap());
    let slice = w.ram.ram().unwrap();
    let mut two = [0u8; 2];
    assert_eq!(w.fails(|| slice.read(0x1fff, &mut two)), oor("ram", 0x1fff, 2));
    assert_eq!(w.fails(|| slice.write(0x2000, &[1])), oor("ram", 0x2000, 1));
    let mut b = [0u8; 1];
    slice.read(0x1fff, &mut b).unwrap();
    assert_eq!(b, [0], "nothing was written");
    // Coalescing and ioeventfds outside `dev` (0x1000 bytes).
    assert_eq!(w.fails(|| w.dev.add_coalescing(0xf00, 0x200)), oor("dev", 0xf00, 0x200));
    let n = new_event_notifier().unwrap();
    assert_eq!(w.fails(|| w.dev.add_eventfd(0xffe, 4, true, 1, &n)), oor("dev", 0xffe, 4));
    // A mapping's bytes.
    let mut m = w.asp.map(0x1000, 0x10, true).unwrap();
    assert_eq!(w.fails(|| m.read(0x10, &mut b)), oor("mapping", 0x10, 1));
    assert_eq!(w.fails(|| m.write(0xf, &[1, 2])), oor("mapping", 0xf, 2));
    w.asp.unmap(m, 0).unwrap();
}

#[test]
fn objects_of_another_topology_are_foreign() {
    let w = World::new();
    let other = Topology::new();
    let root2 = other.new_container("root2", 0x10000).unwrap();
    let r2 = other.new_ram("r2", 0x1000).unwrap();
    root2.add_subregion(0, &r2).unwrap();
    let as2 = other.address_space_init(&root2, "as2").unwrap();
    let other_state = || (other.generation(), view_of(&as2), describe(&root2), describe(&r2));
    let before2 = other_state();
    let foreign = |name: &str| Error::ForeignObject(name.into());

    let loose2 = other.new_ram("loose2", 0x1000).unwrap();
    assert_eq!(w.fails(|| w.root.add_subregion(0xa000, &loose2)), foreign("loose2"));
    assert_eq!(w.fails(|| w.c.add_subregion_overlap(0, &loose2, 1)), foreign("loose2"));
    assert_eq!(w.fails(|| root2.add_subregion(0x8000, &w.loose)), foreign("loose"));
    assert_eq!(w.fails(|| w.root.del_subregion(&r2)), foreign("r2"));
    assert_eq!(w.fails(|| w.topo.new_alias("x", &r2, 0, 0x10)), foreign("r2"));
    assert_eq!(w.fails(|| w.topo.address_space_init(&r2, "x")), foreign("r2"));
    assert_eq!(w.fails(|| w.topo.address_space_destroy(&as2)), foreign("as2"));
    let spy = Arc::new(Counter::default());
    assert_eq!(w.fails(|| w.topo.listener_register(spy.clone(), 0, Some(&as2))), foreign("as2"));
    assert_eq!(spy.take(), 0, "a refused listener gets no replay");
    let m2 = as2.map(0, 0x100, true).unwrap();
    assert_eq!(w.fails(|| w.asp.unmap(m2, 0x100)), foreign("mapping of another address space"));

    assert_eq!(other_state(), before2, "the other topology is unchanged too");
    assert_eq!(loose2.container(), None);
    // Later commits of either topology do not reach the refused listener.
    w.ram.set_readonly(true).unwrap();
    r2.set_readonly(true).unwrap();
    assert_eq!(spy.take(), 0);
}

#[test]
fn a_dropped_topology_is_gone() {
    let topo = Topology::new();
    let root = topo.new_container("root", 0x1000).unwrap();
    let r = topo.new_ram("r", 0x100).unwrap();
    root.add_subregion(0, &r).unwrap();
    let asp = topo.address_space_init(&root, "memory").unwrap();
    let g = topo.generation();
    drop(topo);
    assert_eq!(r.set_enabled(false), Err(Error::TopologyGone));
    assert_eq!(root.del_subregion(&r), Err(Error::TopologyGone));
    assert_eq!(r.destroy(), Err(Error::TopologyGone));
    assert_eq!(r.set_coalescing(), Err(Error::TopologyGone));
    assert_eq!(asp.topology().unwrap_err(), Error::TopologyGone);
    // Nothing changed: handles and the published view still work.
    assert!(r.is_enabled());
    assert_eq!(r.container(), Some(root.clone()));
    assert_eq!(view_of(&asp), vec!["[0x0,+0x100) r off=0x0 ro=false romd=true mask=0"]);
    let mut b = [0u8; 1];
    assert!(asp.read(0, &mut b).is_ok());
    assert!(g > 0);
}

#[test]
fn commit_without_begin_is_not_in_transaction() {
    let w = World::new();
    assert_eq!(w.fails(|| w.topo.commit()), Error::NotInTransaction);
    w.topo.begin().unwrap();
    w.topo.commit().unwrap();
    assert_eq!(w.fails(|| w.topo.commit()), Error::NotInTransaction);
    // Another thread cannot end this thread's transaction.
    let g = w.topo.generation();
    w.topo.begin().unwrap();
    w.loose.set_enabled(false).unwrap();
    let topo = w.topo.clone();
    let r = std::thread::scope(|s| s.spawn(move || topo.commit()).join().unwrap());
    assert_eq!(r, Err(Error::NotInTransaction));
    assert_eq!(w.topo.generation(), g, "still open");
    w.topo.commit().unwrap();
    assert_eq!(w.topo.generation(), g + 1);
    assert_eq!(w.fails(|| w.topo.commit()), Error::NotInTransaction);
}

/// A listener that tries to change the topology from `region_add`.
struct Meddler {
    topo: Topology,
    root: MemoryRegion,
    victim: MemoryRegion,
    spare: MemoryRegion,
    results: Mutex<Vec<(&'static str, Result<()>)>>,
    commits: AtomicUsize,
}

impl MemoryListener for Meddler {
    fn region_add(&self, s: &MemoryRegionSection) -> ListenerResult {
        if s.mr.as_ref().map(MemoryRegion::name) != Some("trigger") {
            return Ok(());
        }
        let n = new_event_notifier().unwrap();
        let tries: Vec<(&'static str, Result<()>)> = vec![
            ("set_enabled", self.victim.set_enabled(false)),
            ("set_readonly", self.victim.set_readonly(true)),
            ("set_log", self.victim.set_log(true, DirtyClient::Vga)),
            ("add_subregion", self.root.add_subregion(0xa000, &self.spare)),
            ("del_subregion", self.root.del_subregion(&self.victim)),
            ("set_address", self.victim.set_address(0xb000)),
            ("destroy", self.spare.destroy()),
            ("add_coalescing", self.victim.add_coalescing(0, 0x10)),
            ("add_eventfd", self.victim.add_eventfd(0, 4, false, 0, &n)),
            ("begin", self.topo.begin()),
            ("address_space_init", self.topo.address_space_init(&self.spare, "x").map(drop)),
            ("global_dirty_log_start", self.topo.global_dirty_log_start()),
            ("listener_register", self.topo.listener_register(Arc::new(Counter::default()), 0, None).map(drop)),
            // Queries are allowed from a callback.
            ("sync_dirty_bitmap", self.topo.sync_dirty_bitmap(&self.victim)),
        ];
        self.results.lock().unwrap().extend(tries);
        Ok(())
    }
    fn commit(&self) -> ListenerResult {
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn a_listener_that_mutates_gets_mutation_during_commit() {
    let topo = Topology::new();
    let root = topo.new_container("root", 0x10000).unwrap();
    let asp = topo.address_space_init(&root, "memory").unwrap();
    let victim = topo.new_ram("victim", 0x1000).unwrap();
    root.add_subregion(0, &victim).unwrap();
    let spare = topo.new_ram("spare", 0x1000).unwrap();
    let m = Arc::new(Meddler {
        topo: topo.clone(),
        root: root.clone(),
        victim: victim.clone(),
        spare: spare.clone(),
        results: Mutex::new(Vec::new()),
        commits: AtomicUsize::new(0),
    });
    topo.listener_register(m.clone(), 0, Some(&asp)).unwrap();
    m.commits.store(0, Ordering::SeqCst);
    let g = topo.generation();
    let (victim_before, spare_before) = (describe(&victim), describe(&spare));

    let trigger = topo.new_ram("trigger", 0x1000).unwrap();
    root.add_subregion(0x2000, &trigger).unwrap();

    let results = std::mem::take(&mut *m.results.lock().unwrap());
    assert_eq!(results.len(), 14);
    for (what, r) in &results {
        if *what == "sync_dirty_bitmap" {
            assert_eq!(r, &Ok(()), "{what}");
        } else {
            assert_eq!(r, &Err(Error::MutationDuringCommit), "{what}");
        }
    }
    // The commit completed, with only the trigger's change.
    assert_eq!(m.commits.load(Ordering::SeqCst), 1);
    assert_eq!(topo.generation(), g + 1);
    assert_eq!(
        view_of(&asp),
        vec![
            "[0x0,+0x1000) victim off=0x0 ro=false romd=true mask=0",
            "[0x2000,+0x1000) trigger off=0x0 ro=false romd=true mask=0",
        ]
    );
    assert_eq!(describe(&victim), victim_before);
    assert_eq!(describe(&spare), spare_before);
    assert!(!topo.global_dirty_log());
    assert_eq!(topo.address_spaces().len(), 1);
    // The turn was given back: the next mutation works and commits.
    victim.set_readonly(true).unwrap();
    assert_eq!(topo.generation(), g + 2);
    assert!(victim.is_readonly());
}

#[test]
fn deleting_an_unknown_eventfd_is_no_such_eventfd() {
    let w = World::new();
    let n = new_event_notifier().unwrap();
    let other = new_event_notifier().unwrap();
    let none = || Error::NoSuchEventfd("dev".into());
    assert_eq!(w.fails(|| w.dev.del_eventfd(0x10, 4, true, 0x1234, &n)), none());
    w.dev.add_eventfd(0x10, 4, true, 0x1234, &n).unwrap();
    assert_eq!(w.fails(|| w.dev.del_eventfd(0x10, 4, true, 0x1235, &n)), none(), "other data");
    assert_eq!(w.fails(|| w.dev.del_eventfd(0x14, 4, true, 0x1234, &n)), none(), "other address");
    assert_eq!(w.fails(|| w.dev.del_eventfd(0x10, 2, true, 0x1234, &n)), none(), "other size");
    assert_eq!(w.fails(|| w.dev.del_eventfd(0x10, 4, false, 0x1234, &n)), none(), "match_data differs");
    assert_eq!(w.fails(|| w.dev.del_eventfd(0x10, 4, true, 0x1234, &other)), none(), "other notifier");
    assert_eq!(w.fails(|| w.ram.del_eventfd(0x10, 4, true, 0x1234, &n)), Error::NoSuchEventfd("ram".into()));
    w.dev.del_eventfd(0x10, 4, true, 0x1234, &n).unwrap();
    assert_eq!(w.fails(|| w.dev.del_eventfd(0x10, 4, true, 0x1234, &n)), none(), "deleted twice");
}

#[test]
fn invalid_ops_constraints_are_invalid_constraints() {
    let w = World::new();
    let invalid = |e: Error| assert!(matches!(e, Error::InvalidConstraints(_)), "{e:?}");
    let valid = |min, max| OpsConfig {
        valid: ValidConstraints { min_access_size: min, max_access_size: max, unaligned: false },
        ..Default::default()
    };
    let imp = |min, max| OpsConfig {
        impl_: ImplConstraints { min_access_size: min, max_access_size: max, unaligned: false },
        ..Default::default()
    };
    for config in [valid(3, 0), valid(0, 16), valid(8, 4), imp(0, 6), imp(16, 0), imp(4, 2)] {
        assert!(config.validate().is_err(), "{config:?}");
        invalid(w.fails(|| w.topo.new_io("bad", Dummy, config, 0x100)));
        invalid(w.fails(|| w.topo.new_rom_device("bad", Dummy, config, 0x100)));
    }
    for config in [valid(1, 8), imp(1, 8), imp(4, 4), OpsConfig::default(), OpsConfig::with_impl(2, 2)] {
        assert_eq!(config.validate(), Ok(()), "{config:?}");
    }
    // ioeventfd sizes are 0, 1, 2, 4 or 8.
    let n = new_event_notifier().unwrap();
    invalid(w.fails(|| w.dev.add_eventfd(0, 3, false, 0, &n)));
    invalid(w.fails(|| w.dev.add_eventfd(0, 16, false, 0, &n)));
}

#[test]
fn destroying_an_address_space_twice_is_address_space_destroyed() {
    let w = World::new();
    let as2 = w.topo.address_space_init(&w.c, "as2").unwrap();
    assert_eq!(w.topo.address_spaces().len(), 2);
    w.topo.address_space_destroy(&as2).unwrap();
    assert_eq!(w.topo.address_spaces().len(), 1);
    assert!(as2.view().ranges().is_empty(), "a destroyed address space shows nothing");
    let e = w.fails(|| w.topo.address_space_destroy(&as2));
    assert_eq!(e, Error::AddressSpaceDestroyed("as2".into()));
    // A listener cannot be registered for it any more.
    let e = w.fails(|| w.topo.listener_register(Arc::new(Nothing), 0, Some(&as2)).map(|_| ()));
    assert_eq!(e, Error::AddressSpaceDestroyed("as2".into()));
    // Its root is free again.
    w.c.destroy().unwrap();
}

/// Creating an eventfd can fail (here: no file descriptor left). Runs itself
/// again in a child process whose descriptor limit is 64, so that the rest
/// of the test binary is unaffected.
#[test]
fn eventfd_creation_failure_is_eventfd_error() {
    const CHILD: &str = "TOPOS_MISUSE_EVENTFD_CHILD";
    if std::env::var_os(CHILD).is_some() {
        // Use up the (small) descriptor budget; the first failure must be a
        // typed error, not a panic.
        let mut held = Vec::new();
        let e = loop {
            match new_event_notifier() {
                Ok(n) => held.push(n),
                Err(e) => break e,
            }
            assert!(held.len() < 64, "the descriptor limit was not applied");
        };
        assert!(matches!(e, Error::Eventfd(_)), "{e:?}");
        // Once descriptors are free again, creation works.
        held.clear();
        assert!(new_event_notifier().is_ok());
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 64 && exec "$0" --exact eventfd_creation_failure_is_eventfd_error --test-threads=1"#)
        .arg(exe)
        .env(CHILD, "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 passed"), "the child did not run the test: {stdout}");
}

/// A listener that ignores everything.
struct Nothing;
impl MemoryListener for Nothing {}
