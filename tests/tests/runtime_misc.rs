//! Behaviour that the conformance scenarios do not pin down: what topos
//! decides where QEMU would leave a stale view, and view lifetime.

use topos_runtime::{live_views, Topology};

#[test]
fn moving_an_address_space_root_re_renders_its_view() {
    let topo = Topology::new();
    let root = topo.new_container("root", 0x10000).unwrap();
    let asp = topo.address_space_init(&root, "m").unwrap();
    let ram = topo.new_ram("ram", 0x1000).unwrap();
    root.add_subregion(0x1000, &ram).unwrap();
    assert_eq!(asp.view().ranges()[0].start(), 0x1000);
    let g = topo.generation();
    // A root renders at its own address (as in QEMU); moving it must not
    // leave the published view stale.
    root.set_address(0x4000).unwrap();
    assert!(topo.generation() > g);
    assert_eq!(asp.view().ranges()[0].start(), 0x5000);
    // Moving it to where it is changes nothing.
    let g = topo.generation();
    root.set_address(0x4000).unwrap();
    assert_eq!(topo.generation(), g);
    // A parentless region that roots no address space only stores it.
    let lone = topo.new_container("lone", 0x1000).unwrap();
    lone.set_address(0x8000).unwrap();
    assert_eq!(lone.addr(), 0x8000);
    assert_eq!(topo.generation(), g);
}

#[test]
fn retired_views_are_freed_once_no_reader_holds_them() {
    let topo = Topology::new();
    let root = topo.new_container("root", 0x10000).unwrap();
    let asp = topo.address_space_init(&root, "m").unwrap();
    let ram = topo.new_ram("ram", 0x1000).unwrap();
    root.add_subregion(0, &ram).unwrap();
    let held = asp.view();
    let weak = std::sync::Arc::downgrade(&held);
    for i in 1..50u64 {
        ram.set_address(i * 0x100).unwrap();
    }
    // The held view is still the old one, intact.
    assert_eq!(held.ranges()[0].start(), 0);
    assert!(weak.upgrade().is_some());
    drop(held);
    assert!(weak.upgrade().is_none(), "the retired view outlived its last reader");
    // The counter of live views covers at least the current one.
    assert!(live_views() >= 1);
}

#[test]
fn accessor_caches_but_always_follows_commits() {
    use topos_runtime::{MemTxResult, MemoryRegionOps, OpsConfig};
    struct Tag(u64);
    impl MemoryRegionOps for Tag {
        fn read(&self, _a: u64, _s: u32) -> u64 {
            self.0
        }
        fn write(&self, _a: u64, _v: u64, _s: u32) {}
    }
    let topo = Topology::new();
    let root = topo.new_container("root", 0x10000).unwrap();
    let asp = topo.address_space_init(&root, "m").unwrap();
    let ram = topo.new_ram("ram", 0x2000).unwrap();
    root.add_subregion(0, &ram).unwrap();
    let dev = topo.new_io("dev", Tag(0xabcd), OpsConfig::default(), 0x1000).unwrap();
    root.add_subregion(0x4000, &dev).unwrap();
    let mut acc = asp.accessor();
    assert!(acc.write(0x10, &[1, 2, 3, 4]).is_ok());
    assert_eq!(acc.read_u64(0x10, 4), (0x0403_0201, MemTxResult::Ok));
    // A write straddling the end of RAM goes through the general path.
    assert_eq!(acc.write(0x1ffe, &[9, 9, 9, 9]), MemTxResult::DecodeError);
    assert_eq!(acc.read_u64(0x4000, 2), (0xabcd, MemTxResult::Ok));
    assert_eq!(acc.lookup(0x4000).map(|r| r.region().name().to_string()), Some("dev".into()));
    // Move the device: the very next access through the same accessor sees it.
    dev.set_address(0x8000).unwrap();
    assert_eq!(acc.read_u64(0x4000, 2), (0, MemTxResult::DecodeError));
    assert_eq!(acc.read_u64(0x8000, 2), (0xabcd, MemTxResult::Ok));
    // RAM writes through the accessor dirty pages like any other write.
    ram.reset_dirty(0, 0x2000, topos_runtime::DirtyClient::Vga).unwrap();
    ram.set_log(true, topos_runtime::DirtyClient::Vga).unwrap();
    assert!(acc.write(0x1008, &[7]).is_ok());
    assert!(ram.get_dirty(0x1000, 1, topos_runtime::DirtyClient::Vga).unwrap());
    assert!(!ram.get_dirty(0, 1, topos_runtime::DirtyClient::Vga).unwrap());
    // Releasing drops the cached view; the next access reloads it.
    let weak = std::sync::Arc::downgrade(&asp.view());
    acc.release();
    root.del_subregion(&dev).unwrap();
    assert!(weak.upgrade().is_none());
    assert_eq!(acc.read_u64(0x8000, 2).1, MemTxResult::DecodeError);
}

#[test]
fn a_flat_range_fits_in_64_bytes() {
    assert!(
        std::mem::size_of::<topos_runtime::FlatRange>() <= 64,
        "{}",
        std::mem::size_of::<topos_runtime::FlatRange>()
    );
}

#[test]
fn address_spaces_with_the_same_physical_root_share_one_view() {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let ram = topo.new_ram("ram", 0x10000).unwrap();
    s.system.add_subregion(0, &ram).unwrap();
    // Two spaces over the same root, and bus-master spaces whose root is an
    // alias of all of system memory (as for every PCI device).
    let cpu = topo.address_space_init(&s.system, "cpu-memory-0").unwrap();
    let masters: Vec<_> = (0..8)
        .map(|i| {
            let alias = topo.new_alias(&format!("bus master {i}"), &s.system, 0, topos_runtime::SIZE_MAX).unwrap();
            let root = topo.new_container(&format!("bus master container {i}"), topos_runtime::SIZE_MAX).unwrap();
            root.add_subregion(0, &alias).unwrap();
            topo.address_space_init(&root, &format!("dev{i}")).unwrap()
        })
        .collect();
    assert!(cpu.shares_view_with(&s.memory));
    for m in &masters {
        assert!(m.shares_view_with(&s.memory), "{} has its own view", m.name());
    }
    assert!(!s.io_space.shares_view_with(&s.memory));
    // A change to system memory re-renders once and stays shared.
    let dev = topo.new_ram("bar", 0x1000).unwrap();
    s.system.add_subregion(0x8000_0000, &dev).unwrap();
    for m in &masters {
        assert!(m.shares_view_with(&s.memory));
        assert_eq!(m.view().lookup(0x8000_0000).map(|r| r.region().name().to_string()), Some("bar".into()));
    }
    // Disabling one device's bus mastering (its alias) gives it the empty
    // view; the others keep sharing.
    let alias0 = masters[0].root().subregions()[0].clone();
    alias0.set_enabled(false).unwrap();
    assert!(masters[0].view().ranges().is_empty());
    assert!(masters[1].shares_view_with(&s.memory));
    // A window that does not show all of system memory renders its own view.
    let part = topo.new_alias("low", &s.system, 0, 0x1000).unwrap();
    let low = topo.address_space_init(&part, "low").unwrap();
    assert!(!low.shares_view_with(&s.memory));
    assert_eq!(low.view().ranges().len(), 1);
}

#[test]
fn dropping_the_topology_frees_everything() {
    let (ram_weak, view_weak) = {
        let topo = Topology::new();
        let s = topo.standard_spaces().unwrap();
        let ram = topo.new_ram("ram", 0x1000).unwrap();
        s.system.add_subregion(0, &ram).unwrap();
        let alias = topo.new_alias("alias", &ram, 0, 0x1000).unwrap();
        s.system.add_subregion_overlap(0x2000, &alias, 1).unwrap();
        let _sub = topo.subscribe().unwrap();
        ram.set_address(0x4000).unwrap();
        let _ = topo.snapshot();
        (ram.downgrade(), std::sync::Arc::downgrade(&s.memory.view()))
    };
    assert!(ram_weak.upgrade().is_none(), "the region outlived its topology");
    assert!(view_weak.upgrade().is_none(), "the view outlived its topology");
}
