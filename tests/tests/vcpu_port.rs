//! The runtime's port for vCPU backends (issue 7 §4): generations, page
//! translation for software TLBs, the self-modifying-code watch, and the
//! rule that a thread holding a device's turn never waits for the topology.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use topos_runtime::turns::{defer_until_no_turn, holds_device_turn, DeviceTurn};
use topos_runtime::{
    DirtyClient, Error, HwAddr, MemTxResult, MemoryRegionOps, OpsConfig, PageTarget, StandardSpaces, Topology,
    PAGE_SIZE,
};

struct Answer(u64);
impl MemoryRegionOps for Answer {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        self.0
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {}
}

/// RAM at 0 (64 KiB), a ROM at 0x10000, MMIO at 0x20000, and a page shared
/// by RAM and MMIO at 0x30000.
fn board() -> (Topology, StandardSpaces, topos_runtime::MemoryRegion) {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let ram = topo.new_ram("ram", 0x10000).unwrap();
    s.system.add_subregion(0, &ram).unwrap();
    let rom = topo.new_rom("rom", 0x1000).unwrap();
    s.system.add_subregion(0x10000, &rom).unwrap();
    let mmio = topo.new_io("mmio", Answer(7), OpsConfig::default(), 0x1000).unwrap();
    s.system.add_subregion(0x20000, &mmio).unwrap();
    let half = topo.new_ram("half", 0x800).unwrap();
    s.system.add_subregion(0x30000, &half).unwrap();
    let regs = topo.new_io("regs", Answer(9), OpsConfig::default(), 0x800).unwrap();
    s.system.add_subregion(0x30800, &regs).unwrap();
    (topo, s, ram)
}

#[test]
fn translate_classifies_pages_and_gives_host_pointers_into_ram() {
    let (_topo, s, ram) = board();
    let mut acc = s.memory.accessor();

    let t = acc.translate(0x2345);
    assert_eq!((t.page(), t.generation()), (0x2000, s.memory.generation()));
    let PageTarget::Ram(page) = t.target() else { panic!("{t:?}") };
    assert!(page.is_writable());
    assert_eq!((page.region(), page.offset_in_region()), (&ram, 0x2000));
    // The pointer is the page's memory.
    ram.ram().unwrap().write(0x2010, &[0xab]).unwrap();
    // SAFETY: the page is 4 KiB of live guest RAM (the RamPage keeps it
    // alive); a one-byte volatile read races with nothing here.
    let b = unsafe { page.host_ptr().add(0x10).read_volatile() };
    assert_eq!(b, 0xab);

    let PageTarget::Ram(rom) = acc.translate(0x10000).target().clone() else { panic!("ROM reads are direct") };
    assert!(!rom.is_writable(), "ROM writes go through the accessor (and are dropped)");

    let t = acc.translate(0x20004);
    let PageTarget::Mmio(sec) = t.target() else { panic!("{t:?}") };
    assert_eq!((sec.offset_within_address_space, sec.size), (0x20000, PAGE_SIZE as u128));
    assert_eq!(sec.mr.as_ref().map(|m| m.name()), Some("mmio"));

    assert!(matches!(acc.translate(0x30000).target(), PageTarget::Mixed));
    assert!(matches!(acc.translate(0x40000).target(), PageTarget::Unassigned));
}

#[test]
fn a_cached_translation_is_valid_exactly_while_its_view_is_published() {
    let (topo, s, ram) = board();
    let mut acc = s.memory.accessor();
    let t = acc.translate(0x1000);
    assert!(acc.is_current());
    assert!(acc.is_at(t.generation()));
    // An unrelated commit that does not change "memory" keeps it valid.
    s.io.add_subregion(0x80, &topo.new_ram("p80", 1).unwrap()).unwrap();
    assert!(acc.is_current());
    assert!(acc.is_at(t.generation()));
    // Moving the RAM invalidates it; the page survives as long as the
    // translation holds the region, wherever it is mapped now.
    s.system.del_subregion(&ram).unwrap();
    assert!(!acc.is_current());
    assert!(!acc.is_at(t.generation()));
    let PageTarget::Ram(page) = t.target() else { panic!() };
    page.note_write(0, 1);
    assert!(matches!(acc.translate(0x1000).target(), PageTarget::Unassigned));
    assert!(acc.is_current(), "translate refreshed the accessor");
    assert_ne!(acc.generation(), t.generation());
    assert!(!acc.is_at(t.generation()), "the old translation stays stale");
}

#[test]
fn an_mmio_pages_section_gives_the_coalesced_ranges_it_shows() {
    // A 12 KiB device at 0x40000 whose bytes 0x800..0x1800 and 0x2ffc..
    // 0x3000 are coalesced: each page's section shows its own part.
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let dev = topo.new_io("dev", Answer(0), OpsConfig::default(), 0x3000).unwrap();
    dev.add_coalescing(0x800, 0x1000).unwrap();
    dev.add_coalescing(0x2ffc, 4).unwrap();
    s.system.add_subregion(0x40000, &dev).unwrap();
    let mut acc = s.memory.accessor();
    let ranges = |acc: &mut topos_runtime::Accessor, page: u64| match acc.translate(page).target() {
        PageTarget::Mmio(section) => section.coalesced_ranges(),
        _ => panic!("MMIO expected at {page:#x}"),
    };
    assert_eq!(ranges(&mut acc, 0x40000), vec![(0x40800, 0x800)]);
    assert_eq!(ranges(&mut acc, 0x41000), vec![(0x41000, 0x800)]);
    assert_eq!(ranges(&mut acc, 0x42000), vec![(0x42ffc, 4)]);
    let plain = topo.new_io("plain", Answer(0), OpsConfig::default(), 0x1000).unwrap();
    s.system.add_subregion(0x50000, &plain).unwrap();
    assert!(ranges(&mut acc, 0x50000).is_empty());
}

#[test]
fn writes_through_a_translation_are_dirty_logged() {
    let (_topo, s, ram) = board();
    ram.set_log(true, DirtyClient::Vga).unwrap();
    for c in DirtyClient::ALL {
        ram.reset_dirty(0, 0x10000, c).unwrap();
    }
    let mut acc = s.memory.accessor();
    let PageTarget::Ram(page) = acc.translate(0x3000).target().clone() else { panic!() };
    // SAFETY: a byte inside the live page; nothing else accesses it.
    unsafe { page.host_ptr().add(5).write_volatile(1) };
    page.note_write(5, 1);
    assert!(ram.get_dirty(0x3000, 1, DirtyClient::Vga).unwrap());
    assert!(!ram.get_dirty(0x2000, 1, DirtyClient::Vga).unwrap());
    assert!(!ram.get_dirty(0x3000, 1, DirtyClient::Code).unwrap(), "CODE is never set by writes");
}

#[test]
fn a_watched_code_page_learns_of_writes_from_every_path() {
    let (topo, s, ram) = board();
    let watch = s.memory.watch_code(0x5123).expect("RAM");
    assert_eq!(watch.page(), 0x5000);
    let quiet = s.memory.watch_code(0x6000).expect("RAM");
    assert!(s.memory.watch_code(0x20000).is_none(), "no code watch on MMIO");
    let epoch = topo.code_write_epoch();

    // Another vCPU's write through the address space.
    assert!(s.memory.write(0x5fff, &[1]).is_ok());
    assert!(watch.is_written());
    assert!(!quiet.is_written());
    assert_eq!(topo.code_write_epoch(), epoch + 1);
    // A second write to an already-invalidated page does not count again.
    assert!(s.memory.write(0x5000, &[1]).is_ok());
    assert_eq!(topo.code_write_epoch(), epoch + 1);

    // Through an accessor.
    watch.rewatch();
    assert!(!watch.is_written());
    let mut acc = s.memory.accessor();
    assert!(acc.write_u64(0x5008, 3, 8).is_ok());
    assert!(watch.is_written());

    // Through a DMA mapping (at unmap, as QEMU).
    watch.rewatch();
    let mut m = s.memory.map(0x4ff0, 0x20, true).unwrap();
    m.write(0x18, &[9]).unwrap();
    assert!(!watch.is_written(), "nothing is known before unmap");
    s.memory.unmap(m, 0x20).unwrap();
    assert!(watch.is_written());

    // Through a translated page (an interpreter's cached pointer).
    watch.rewatch();
    let PageTarget::Ram(page) = acc.translate(0x5000).target().clone() else { panic!() };
    page.note_write(0x100, 4);
    assert!(watch.is_written());
    assert!(!quiet.is_written());

    // A write that spans two pages hits both.
    watch.rewatch();
    assert!(s.memory.write(0x5ffe, &[1, 2, 3, 4]).is_ok());
    assert!(watch.is_written() && quiet.is_written());
    // The embedder's own writes (loading code, say) count too.
    watch.rewatch();
    ram.ram().unwrap().write(0x5400, &[0x90]).unwrap();
    assert!(watch.is_written());
}

#[test]
fn a_thread_holding_a_device_turn_is_refused_by_the_topology_and_defers() {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let ram = topo.new_ram("ram", 0x1000).unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    {
        let _turn = DeviceTurn::enter();
        assert!(holds_device_turn());
        assert_eq!(s.system.add_subregion(0, &ram), Err(Error::InsideDeviceTurn));
        assert_eq!(topo.begin(), Err(Error::InsideDeviceTurn));
        assert!(matches!(topo.subscribe(), Err(Error::InsideDeviceTurn)));
        // Guest accesses never take the turn: they go on.
        assert_eq!(s.memory.read_u64(0, 1).1, MemTxResult::DecodeError);
        let (sys, r, n) = (s.system.clone(), ram.clone(), ran.clone());
        defer_until_no_turn(move || {
            sys.add_subregion(0, &r).unwrap();
            n.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }
    // The deferred work ran when the turn was given back.
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert!(s.memory.write(0, &[1]).is_ok());
}

#[test]
fn deferred_work_waits_for_the_topology_turn_too() {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let ram = topo.new_ram("ram", 0x1000).unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    topo.begin().unwrap();
    {
        let _turn = DeviceTurn::enter();
        let (sys, r, n) = (s.system.clone(), ram.clone(), ran.clone());
        defer_until_no_turn(move || {
            sys.add_subregion(0x1000, &r).unwrap();
            n.fetch_add(1, Ordering::SeqCst);
        });
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the thread is still inside a transaction");
    topo.commit().unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert!(s.memory.view().lookup(0x1000).is_some());
}
