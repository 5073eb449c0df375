//! Conformance scenarios of `semantics.md` §12 for flattening (F1–F12),
//! `memory_region_find` (H1–H2 plus the modern §7.2 rules) and `info mtree`
//! (M1–M3, `-D`, `-f`), and two byte-exact comparisons of `Topology::mtree`
//! with real QEMU 7.2 output (`tests/data/qemu-7.2-info-mtree-*.txt`).
//!
//! Views are checked in the notation of §12, `[start,end) NAME off=OFFSET`
//! (with ` ro` appended for a read-only range), against
//! `AddressSpace::view().ranges()`, so every test pins the exact ranges.

use topos_runtime::{
    AddressSpace, HwAddr, MemoryRegion, MemoryRegionOps, MtreeOptions, OpsConfig, Topology, UnassignedIo, SIZE_MAX,
};

// ----- helpers ---------------------------------------------------------------

/// A device that does nothing; only its presence (terminating region) matters.
struct Dev;

impl MemoryRegionOps for Dev {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        0
    }
    fn write(&self, _addr: HwAddr, _value: u64, _size: u32) {}
}

fn io(topo: &Topology, name: &str, size: u128) -> MemoryRegion {
    topo.new_io(name, Dev, OpsConfig::default(), size).unwrap()
}

fn ram(topo: &Topology, name: &str, size: u128) -> MemoryRegion {
    topo.new_ram(name, size).unwrap()
}

fn container(topo: &Topology, name: &str, size: u128) -> MemoryRegion {
    topo.new_container(name, size).unwrap()
}

fn alias(topo: &Topology, name: &str, target: &MemoryRegion, offset: HwAddr, size: u128) -> MemoryRegion {
    topo.new_alias(name, target, offset, size).unwrap()
}

/// A topology with a root container of `size` bytes and the address space
/// "memory" over it.
fn setup(size: u128) -> (Topology, MemoryRegion, AddressSpace) {
    let topo = Topology::new();
    let root = container(&topo, "root", size);
    let asp = topo.address_space_init(&root, "memory").unwrap();
    (topo, root, asp)
}

/// §12 notation for numbers: `0` or `0x…`.
fn hex(v: u128) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// The current view of `asp` in §12 notation.
fn view(asp: &AddressSpace) -> Vec<String> {
    asp.view()
        .ranges()
        .iter()
        .map(|r| {
            format!(
                "[{},{}) {} off={}{}",
                hex(r.start() as u128),
                hex(r.end()),
                r.region().name(),
                hex(r.offset_in_region() as u128),
                if r.readonly() { " ro" } else { "" }
            )
        })
        .collect()
}

/// Turns a capture of QEMU's monitor into the text QEMU printed. The capture
/// came through a terminal, which sends every `\n` as `\r\n`, and the capture
/// tool appended one bare `\n` after the output. Both facts are checked, so
/// nothing else about the bytes is changed or tolerated.
fn monitor_text(raw: &str) -> String {
    let body = raw.strip_suffix('\n').expect("capture ends with the appended newline");
    assert!(body.ends_with("\r\n"), "capture body must end with a CRLF line");
    let lf = body.matches('\n').count();
    let crlf = body.matches("\r\n").count();
    assert_eq!(lf, crlf, "every line of the capture ends with CRLF");
    assert_eq!(body.matches('\r').count(), crlf, "no carriage return other than line ends");
    body.replace("\r\n", "\n")
}

/// Compares line by line first, for a readable failure, then as a whole.
fn assert_text(actual: &str, expected: &str) {
    let (a, e): (Vec<&str>, Vec<&str>) = (actual.split('\n').collect(), expected.split('\n').collect());
    for (i, (la, le)) in a.iter().zip(e.iter()).enumerate() {
        assert_eq!(la, le, "line {} differs\n--- actual ---\n{actual}", i + 1);
    }
    assert_eq!(a.len(), e.len(), "line count differs\n--- actual ---\n{actual}");
    assert_eq!(actual, expected);
}

fn mtree(topo: &Topology) -> String {
    topo.mtree(MtreeOptions::default()).unwrap()
}

fn mtree_disabled(topo: &Topology) -> String {
    topo.mtree(MtreeOptions { disabled: true, ..Default::default() }).unwrap()
}

fn mtree_flat(topo: &Topology) -> String {
    topo.mtree(MtreeOptions { flatview: true, ..Default::default() }).unwrap()
}

// ----- F1–F12: flattening ------------------------------------------------------

/// F1: the higher-priority I/O region hides A's tail.
#[test]
fn f1_priority_hides_lower_sibling() {
    let (topo, root, asp) = setup(0x10000);
    let a = ram(&topo, "A", 0x2000);
    let b = io(&topo, "B", 0x1000);
    root.add_subregion(0x1000, &a).unwrap();
    root.add_subregion_overlap(0x2000, &b, 1).unwrap();
    assert_eq!(view(&asp), ["[0x1000,0x2000) A off=0", "[0x2000,0x3000) B off=0"]);
    assert_eq!(asp.view().ranges()[0].region(), &a);
    assert_eq!(asp.view().ranges()[1].region(), &b);
}

/// F2: equal priorities, the later-added sibling is visible.
#[test]
fn f2_tie_later_added_wins() {
    let (topo, root, asp) = setup(0x10000);
    let a = ram(&topo, "A", 0x2000);
    let b = io(&topo, "B", 0x1000);
    root.add_subregion(0x1000, &a).unwrap();
    root.add_subregion(0x2000, &b).unwrap();
    assert_eq!(view(&asp), ["[0x1000,0x2000) A off=0", "[0x2000,0x3000) B off=0"]);
}

/// F3: equal priorities, the earlier-added sibling is completely hidden.
#[test]
fn f3_tie_earlier_added_loses() {
    let (topo, root, asp) = setup(0x10000);
    let a = ram(&topo, "A", 0x2000);
    let b = io(&topo, "B", 0x1000);
    root.add_subregion(0x2000, &b).unwrap();
    root.add_subregion(0x1000, &a).unwrap();
    assert_eq!(view(&asp), ["[0x1000,0x3000) A off=0"]);
    assert!(asp.view().ranges().iter().all(|r| r.region() != &b));
}

/// F4: a child sticking out of its container is clipped to it.
#[test]
fn f4_clip_to_container() {
    let (topo, root, asp) = setup(0x10000);
    let c = container(&topo, "C", 0x1000);
    let r = ram(&topo, "R", 0x3000);
    c.add_subregion(0x800, &r).unwrap();
    root.add_subregion(0x4000, &c).unwrap();
    assert_eq!(view(&asp), ["[0x4800,0x5000) R off=0"]);
}

/// F5: a child partly outside the root is clipped; wholly outside, nothing.
#[test]
fn f5_child_partly_or_wholly_outside_root() {
    let (topo, root, asp) = setup(0x3000);
    let r = ram(&topo, "R", 0x2000);
    root.add_subregion(0x2000, &r).unwrap();
    assert_eq!(view(&asp), ["[0x2000,0x3000) R off=0"]);

    let (topo, root, asp) = setup(0x1000);
    let r = ram(&topo, "R", 0x2000);
    root.add_subregion(0x2000, &r).unwrap();
    assert!(view(&asp).is_empty(), "{:?}", view(&asp));
}

/// F6: an alias renders its target through a window; no range names it.
#[test]
fn f6_alias_window() {
    let (topo, root, asp) = setup(0x10000);
    let m = ram(&topo, "M", 0x10000);
    let al = alias(&topo, "AL", &m, 0x3000, 0x2000);
    root.add_subregion(0x8000, &al).unwrap();
    assert_eq!(view(&asp), ["[0x8000,0xa000) M off=0x3000"]);
    let v = asp.view();
    assert_eq!(v.ranges()[0].region(), &m);
    assert!(v.ranges().iter().all(|r| r.region() != &al && r.region().name() != "AL"));
}

/// F7: the part of an alias beyond its target's end is a hole.
#[test]
fn f7_alias_beyond_target_end() {
    let (topo, root, asp) = setup(0x10000);
    let m = ram(&topo, "M", 0x4000);
    let al = alias(&topo, "AL", &m, 0x3000, 0x2000);
    root.add_subregion(0x8000, &al).unwrap();
    assert_eq!(view(&asp), ["[0x8000,0x9000) M off=0x3000"]);
    assert!(asp.view().lookup(0x9000).is_none());
}

/// F8: the target's own position in its own container is irrelevant.
#[test]
fn f8_alias_target_position_irrelevant() {
    let (topo, root, asp) = setup(0x10000);
    let other = container(&topo, "other", 0x100000);
    let m = ram(&topo, "M", 0x4000);
    other.add_subregion(0x40000, &m).unwrap();
    let al = alias(&topo, "AL", &m, 0x1000, 0x1000);
    root.add_subregion(0x3000, &al).unwrap();
    assert_eq!(view(&asp), ["[0x3000,0x4000) M off=0x1000"]);
}

/// F9: an alias of a container with a hole lets a lower-priority sibling
/// show through the hole.
#[test]
fn f9_alias_of_container_with_hole() {
    let (topo, root, asp) = setup(0x10000);
    let bg = ram(&topo, "BG", 0x10000);
    let p = container(&topo, "P", 0x10000);
    let d = io(&topo, "D", 0x100);
    p.add_subregion(0x2100, &d).unwrap();
    let al = alias(&topo, "AL", &p, 0x2000, 0x1000);
    root.add_subregion(0, &bg).unwrap();
    root.add_subregion_overlap(0x5000, &al, 1).unwrap();
    assert_eq!(view(&asp), ["[0,0x5100) BG off=0", "[0x5100,0x5200) D off=0", "[0x5200,0x10000) BG off=0x5200"]);
}

/// F10: a pure container is transparent where it has no children.
#[test]
fn f10_transparent_container() {
    let (topo, root, asp) = setup(0x10000);
    let bg = ram(&topo, "BG", 0x10000);
    let c = container(&topo, "C", 0x4000);
    let x = io(&topo, "X", 0x1000);
    c.add_subregion(0x1000, &x).unwrap();
    root.add_subregion(0, &bg).unwrap();
    root.add_subregion_overlap(0x2000, &c, 1).unwrap();
    assert_eq!(view(&asp), ["[0,0x3000) BG off=0", "[0x3000,0x4000) X off=0", "[0x4000,0x10000) BG off=0x4000"]);
}

/// F11: an I/O region with children answers wherever they do not.
#[test]
fn f11_io_container() {
    let (topo, root, asp) = setup(0x10000);
    let bg = ram(&topo, "BG", 0x10000);
    let c = io(&topo, "C", 0x4000);
    let x = io(&topo, "X", 0x1000);
    c.add_subregion(0x1000, &x).unwrap();
    root.add_subregion(0, &bg).unwrap();
    root.add_subregion_overlap(0x2000, &c, 1).unwrap();
    assert_eq!(
        view(&asp),
        [
            "[0,0x2000) BG off=0",
            "[0x2000,0x3000) C off=0",
            "[0x3000,0x4000) X off=0",
            "[0x4000,0x6000) C off=0x2000",
            "[0x6000,0x10000) BG off=0x6000",
        ]
    );
}

/// F12: the docs/devel/memory.rst example; priorities are local to siblings.
#[test]
fn f12_docs_example_local_priorities() {
    for b_has_ops in [false, true] {
        let (topo, root, asp) = setup(0x8000);
        let c = io(&topo, "C", 0x6000);
        let b = if b_has_ops { io(&topo, "B", 0x4000) } else { container(&topo, "B", 0x4000) };
        let d = io(&topo, "D", 0x1000);
        let e = io(&topo, "E", 0x1000);
        b.add_subregion(0, &d).unwrap();
        b.add_subregion(0x2000, &e).unwrap();
        root.add_subregion_overlap(0, &c, 1).unwrap();
        root.add_subregion_overlap(0x2000, &b, 2).unwrap();
        let expected = if b_has_ops {
            [
                "[0,0x2000) C off=0",
                "[0x2000,0x3000) D off=0",
                "[0x3000,0x4000) B off=0x1000",
                "[0x4000,0x5000) E off=0",
                "[0x5000,0x6000) B off=0x3000",
            ]
        } else {
            [
                "[0,0x2000) C off=0",
                "[0x2000,0x3000) D off=0",
                "[0x3000,0x4000) C off=0x3000",
                "[0x4000,0x5000) E off=0",
                "[0x5000,0x6000) C off=0x5000",
            ]
        };
        assert_eq!(view(&asp), expected, "B has ops: {b_has_ops}");
    }
}

// ----- H1–H2 and §7: find --------------------------------------------------------

/// The flat view of H1/H2: A at [0x1000,0x2000) off 0, B at [0x2000,0x3000).
fn h_setup() -> (Topology, MemoryRegion, AddressSpace, MemoryRegion, MemoryRegion) {
    let (topo, root, asp) = setup(0x10000);
    let a = ram(&topo, "A", 0x2000);
    let b = io(&topo, "B", 0x1000);
    root.add_subregion(0x1000, &a).unwrap();
    root.add_subregion_overlap(0x2000, &b, 1).unwrap();
    assert_eq!(view(&asp), ["[0x1000,0x2000) A off=0", "[0x2000,0x3000) B off=0"]);
    (topo, root, asp, a, b)
}

/// (mr name, offset_within_address_space, size, offset_within_region).
fn found(topo: &Topology, mr: &MemoryRegion, addr: HwAddr, size: u128) -> Option<(String, u64, u128, u64)> {
    topo.find(mr, addr, size).map(|s| {
        (
            s.mr.as_ref().expect("a found section names its region").name().to_string(),
            s.offset_within_address_space,
            s.size,
            s.offset_within_region,
        )
    })
}

fn sec(name: &str, oaas: u64, size: u128, owr: u64) -> Option<(String, u64, u128, u64)> {
    Some((name.to_string(), oaas, size, owr))
}

/// H1: the section is clipped to the range it hits.
#[test]
fn h1_find_clips_to_range() {
    let (topo, root, asp, a, _) = h_setup();
    assert_eq!(found(&topo, &root, 0x1800, 0x1000), sec("A", 0x1800, 0x800, 0x800));
    let s = topo.find(&root, 0x1800, 0x1000).unwrap();
    assert_eq!(s.mr.as_ref(), Some(&a));
    assert_eq!(s.address_space, asp);
    assert!(!s.readonly);
}

/// H2: only the first (lowest-addressed) overlapping range is returned.
#[test]
fn h2_find_returns_first_overlapping_range_only() {
    let (topo, root, _, _, _) = h_setup();
    assert_eq!(found(&topo, &root, 0x500, 0x2000), sec("A", 0x1000, 0x1000, 0));
}

/// Modern §7.2: `addr` is relative to the given region, the answer comes
/// from the address space's view (possibly a region outside the subtree).
#[test]
fn find_modern_addr_relative_to_non_root_region() {
    let (topo, root, _, a, _) = h_setup();
    // Relative to A (at 0x1000): 0x800 is 0x1800 in the address space.
    assert_eq!(found(&topo, &a, 0x800, 0x100), sec("A", 0x1800, 0x100, 0x800));
    // 0x1000 into A is 0x2000, where B (higher priority) is visible.
    assert_eq!(found(&topo, &a, 0x1000, 0x100), sec("B", 0x2000, 0x100, 0));
    // Every ancestor's address is added: R at 0x100 in C at 0x8000.
    let c = container(&topo, "C", 0x1000);
    let r = ram(&topo, "R", 0x100);
    c.add_subregion(0x100, &r).unwrap();
    root.add_subregion(0x8000, &c).unwrap();
    assert_eq!(found(&topo, &r, 0x10, 4), sec("R", 0x8110, 4, 0x10));
    assert_eq!(found(&topo, &c, 0x110, 4), sec("R", 0x8110, 4, 0x10));
    // The root is the address space itself.
    assert_eq!(found(&topo, &root, 0x8110, 4), sec("R", 0x8110, 4, 0x10));
}

/// Modern §7.2: a region whose topmost ancestor roots no address space
/// gives `None` (no abort), even if it is visible through an alias.
#[test]
fn find_modern_none_outside_any_address_space() {
    let (topo, root, _, _, _) = h_setup();
    let loose = ram(&topo, "loose", 0x1000);
    assert!(topo.find(&loose, 0, 1).is_none());
    let top = container(&topo, "top", 0x10000);
    let child = ram(&topo, "child", 0x1000);
    top.add_subregion(0x1000, &child).unwrap();
    assert!(topo.find(&child, 0, 0x10).is_none());
    assert!(topo.find(&top, 0x1000, 0x10).is_none());
    // Rendered through an alias, yet still in no address space itself.
    let m = ram(&topo, "M", 0x1000);
    let al = alias(&topo, "AL", &m, 0, 0x1000);
    root.add_subregion(0x9000, &al).unwrap();
    assert_eq!(found(&topo, &root, 0x9000, 4), sec("M", 0x9000, 4, 0));
    assert!(topo.find(&m, 0, 4).is_none());
}

/// No overlap gives `None`: holes, and a query ending at a range's start.
#[test]
fn find_no_overlap_is_none() {
    let (topo, root, _, _, _) = h_setup();
    assert!(topo.find(&root, 0x3000, 0x100).is_none());
    assert!(topo.find(&root, 0, 0x1000).is_none());
    assert_eq!(found(&topo, &root, 0, 0x1001), sec("A", 0x1000, 1, 0));
}

/// §7.1 edge (same comparison in modern code): a zero-size query strictly
/// inside a range matches it with size 0; at a range's first byte it does
/// not, even when the previous range ends there.
#[test]
fn find_zero_size_edges() {
    let (topo, root, _, _, _) = h_setup();
    assert_eq!(found(&topo, &root, 0x1800, 0), sec("A", 0x1800, 0, 0x800));
    assert_eq!(found(&topo, &root, 0x2fff, 0), sec("B", 0x2fff, 0, 0xfff));
    assert_eq!(found(&topo, &root, 0x1000, 0), None);
    assert_eq!(found(&topo, &root, 0x2000, 0), None);
    assert_eq!(found(&topo, &root, 0x3000, 0), None);
    assert_eq!(found(&topo, &root, 0x500, 0), None);
}

/// The section keeps its region alive after the region leaves the tree.
#[test]
fn find_result_keeps_region_alive() {
    let (topo, root, asp, a, _) = h_setup();
    let s = topo.find(&root, 0x1000, 0x10).unwrap();
    root.del_subregion(&a).unwrap();
    a.destroy().unwrap();
    drop(a);
    assert_eq!(view(&asp), ["[0x2000,0x3000) B off=0"]);
    let mr = s.mr.as_ref().unwrap();
    assert_eq!(mr.name(), "A");
    assert_eq!(mr.size(), 0x2000);
}

// ----- M1–M3: mtree --------------------------------------------------------------

/// The tree of §8.1 / M1. Returns the topology and `flash`.
fn m1_tree() -> (Topology, MemoryRegion) {
    let topo = Topology::new();
    let system = container(&topo, "system", 0x1_0000_0000);
    let ram_mr = ram(&topo, "ram", 0x100000);
    let ram_low = alias(&topo, "ram-low", &ram_mr, 0, 0xa0000);
    let vga = io(&topo, "vga", 0x20000);
    let rom = topo.new_rom("rom", 0x20000).unwrap();
    let lpc = container(&topo, "lpc", 0x1000);
    let hpet = io(&topo, "hpet", 0x400);
    let flash = topo.new_rom_device("flash", Dev, OpsConfig::default(), 0x10000).unwrap();
    system.add_subregion(0, &ram_low).unwrap();
    system.add_subregion_overlap(0xa0000, &vga, 1).unwrap();
    system.add_subregion(0xe0000, &rom).unwrap();
    lpc.add_subregion(0, &hpet).unwrap();
    system.add_subregion(0xfed00000, &lpc).unwrap();
    system.add_subregion(0xffff0000, &flash).unwrap();
    topo.address_space_init(&system, "memory").unwrap();
    (topo, flash)
}

const M1_MODERN: &str = "\
address-space: memory
  0000000000000000-00000000ffffffff (prio 0, i/o): system
    0000000000000000-000000000009ffff (prio 0, ram): alias ram-low @ram 0000000000000000-000000000009ffff
    00000000000a0000-00000000000bffff (prio 1, i/o): vga
    00000000000e0000-00000000000fffff (prio 0, rom): rom
    00000000fed00000-00000000fed00fff (prio 0, i/o): lpc
      00000000fed00000-00000000fed003ff (prio 0, i/o): hpet
    00000000ffff0000-00000000ffffffff (prio 0, romd): flash

memory-region: ram
  0000000000000000-00000000000fffff (prio 0, ram): ram

";

/// M1: the modern text of §8.2, exactly.
#[test]
fn m1_mtree_modern_text() {
    let (topo, _) = m1_tree();
    assert_text(&mtree(&topo), M1_MODERN);
    // Nothing is disabled, so -D prints the same.
    assert_text(&mtree_disabled(&topo), M1_MODERN);
}

/// M1 built with RAM + `set_readonly(true)` (1.4's way to make a ROM) prints
/// the same as with `new_rom`.
#[test]
fn m1_rom_from_ram_set_readonly() {
    let topo = Topology::new();
    let system = container(&topo, "system", 0x1_0000_0000);
    let ram_mr = ram(&topo, "ram", 0x100000);
    let rom = ram(&topo, "rom", 0x20000);
    rom.set_readonly(true).unwrap();
    let flash = topo.new_rom_device("flash", Dev, OpsConfig::default(), 0x10000).unwrap();
    let lpc = container(&topo, "lpc", 0x1000);
    lpc.add_subregion(0, &io(&topo, "hpet", 0x400)).unwrap();
    // Added in a different order: the printed order depends on addresses.
    system.add_subregion(0xffff0000, &flash).unwrap();
    system.add_subregion(0xfed00000, &lpc).unwrap();
    system.add_subregion(0xe0000, &rom).unwrap();
    system.add_subregion_overlap(0xa0000, &io(&topo, "vga", 0x20000), 1).unwrap();
    system.add_subregion(0, &alias(&topo, "ram-low", &ram_mr, 0, 0xa0000)).unwrap();
    topo.address_space_init(&system, "memory").unwrap();
    assert_text(&mtree(&topo), M1_MODERN);
}

/// M1's flat view, as `info mtree -f` prints it.
#[test]
fn m1_mtree_flatview_dump() {
    let (topo, _) = m1_tree();
    let expected = "\
FlatView #0
 AS \"memory\", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): ram
  00000000000a0000-00000000000bffff (prio 1, i/o): vga
  00000000000e0000-00000000000fffff (prio 0, rom): rom
  00000000fed00000-00000000fed003ff (prio 0, i/o): hpet
  00000000ffff0000-00000000ffffffff (prio 0, romd): flash

";
    assert_text(&mtree_flat(&topo), expected);
}

/// M2: a ROM device out of romd mode prints `i/o`, in the tree and in `-f`.
#[test]
fn m2_flash_romd_off_prints_io() {
    let (topo, flash) = m1_tree();
    flash.rom_device_set_readable(false).unwrap();
    let expected = M1_MODERN.replace(
        "00000000ffff0000-00000000ffffffff (prio 0, romd): flash",
        "00000000ffff0000-00000000ffffffff (prio 0, i/o): flash",
    );
    assert_ne!(expected, M1_MODERN);
    assert_text(&mtree(&topo), &expected);
    assert!(mtree_flat(&topo).contains("\n  00000000ffff0000-00000000ffffffff (prio 0, i/o): flash\n"));
    flash.rom_device_set_readable(true).unwrap();
    assert_text(&mtree(&topo), M1_MODERN);
}

/// M3: a zero-size region prints END = START and renders nothing.
#[test]
fn m3_zero_size_region() {
    let topo = Topology::new();
    let r = container(&topo, "r", 0x1000);
    let z = container(&topo, "z", 0);
    r.add_subregion(0x10, &z).unwrap();
    let asp = topo.address_space_init(&r, "memory").unwrap();
    let expected = "\
address-space: memory
  0000000000000000-0000000000000fff (prio 0, i/o): r
    0000000000000010-0000000000000010 (prio 0, i/o): z

";
    assert_text(&mtree(&topo), expected);
    assert!(view(&asp).is_empty());
    // A zero-size RAM region with a child renders nothing either (§2.2 step 3).
    let zr = ram(&topo, "zr", 0);
    let inner = ram(&topo, "inner", 0x100);
    zr.add_subregion(0, &inner).unwrap();
    r.add_subregion(0x800, &zr).unwrap();
    assert!(view(&asp).is_empty(), "{:?}", view(&asp));
    assert!(mtree(&topo).contains("\n    0000000000000800-0000000000000800 (prio 0, ram): zr\n"));
}

/// A tree with a disabled container (with a child), a disabled alias and a
/// disabled leaf.
fn disabled_tree() -> (Topology, AddressSpace) {
    let (topo, root, asp) = setup(0x10000);
    let r = ram(&topo, "ram", 0x1000);
    let dis = container(&topo, "dis", 0x1000);
    let kid = io(&topo, "kid", 0x10);
    dis.add_subregion(0x10, &kid).unwrap();
    dis.set_enabled(false).unwrap();
    let tgt = ram(&topo, "tgt", 0x1000);
    let dal = alias(&topo, "dal", &tgt, 0, 0x1000);
    dal.set_enabled(false).unwrap();
    let off = io(&topo, "off", 0x100);
    off.set_enabled(false).unwrap();
    root.add_subregion(0, &r).unwrap();
    root.add_subregion(0x2000, &dis).unwrap();
    root.add_subregion(0x4000, &dal).unwrap();
    root.add_subregion(0x5000, &off).unwrap();
    (topo, asp)
}

/// §8.2 [5.1]: without `-D` a disabled region's line is hidden, but its
/// children are still printed and a disabled alias's target still queued.
#[test]
fn mtree_hides_disabled_lines_but_walks_children_and_alias_targets() {
    let (topo, asp) = disabled_tree();
    let expected = "\
address-space: memory
  0000000000000000-000000000000ffff (prio 0, i/o): root
    0000000000000000-0000000000000fff (prio 0, ram): ram
      0000000000002010-000000000000201f (prio 0, i/o): kid

memory-region: tgt
  0000000000000000-0000000000000fff (prio 0, ram): tgt

";
    assert_text(&mtree(&topo), expected);
    // Disabled regions render nothing, children included.
    assert_eq!(view(&asp), ["[0,0x1000) ram off=0"]);
}

/// `-D` prints disabled regions with the suffix ` [disabled]`.
#[test]
fn mtree_dash_d_shows_disabled_regions() {
    let (topo, _) = disabled_tree();
    let expected = "\
address-space: memory
  0000000000000000-000000000000ffff (prio 0, i/o): root
    0000000000000000-0000000000000fff (prio 0, ram): ram
    0000000000002000-0000000000002fff (prio 0, i/o): dis [disabled]
      0000000000002010-000000000000201f (prio 0, i/o): kid
    0000000000004000-0000000000004fff (prio 0, ram): alias dal @tgt 0000000000000000-0000000000000fff [disabled]
    0000000000005000-00000000000050ff (prio 0, i/o): off [disabled]

memory-region: tgt
  0000000000000000-0000000000000fff (prio 0, ram): tgt

";
    assert_text(&mtree_disabled(&topo), expected);
}

/// `-f`: one block per FlatView, address spaces sharing a view listed
/// together (an alias root shows `, alias X`), offsets shown as `@…` only
/// when nonzero, `rom` for read-only ranges, and an empty view.
#[test]
fn mtree_flatview_dump_format() {
    let (topo, root, _) = setup(0x10000);
    let bg = ram(&topo, "BG", 0x10000);
    let c = io(&topo, "C", 0x4000);
    let x = io(&topo, "X", 0x1000);
    c.add_subregion(0x1000, &x).unwrap();
    root.add_subregion(0, &bg).unwrap();
    root.add_subregion_overlap(0x2000, &c, 1).unwrap();
    // The whole of root through an alias: the same view is shared.
    let whole = alias(&topo, "whole", &root, 0, 0x10000);
    let whole_as = topo.address_space_init(&whole, "whole").unwrap();
    // A window of root: a view of its own.
    let win = alias(&topo, "win", &root, 0x1000, 0x2000);
    topo.address_space_init(&win, "window").unwrap();
    // Read-only through the alias: `rom` although the region is RAM.
    let rammy = ram(&topo, "rammy", 0x1000);
    let ro = alias(&topo, "ro-alias", &rammy, 0, 0x1000);
    ro.set_readonly(true).unwrap();
    let ro_as = topo.address_space_init(&ro, "ro").unwrap();
    let nothing = container(&topo, "nothing", 0x1000);
    topo.address_space_init(&nothing, "empty").unwrap();

    assert!(whole_as.shares_view_with(&topo.address_spaces()[0]));
    assert_eq!(view(&ro_as), ["[0,0x1000) rammy off=0 ro"]);
    let expected = "\
FlatView #0
 AS \"memory\", root: root
 AS \"whole\", root: whole, alias root
 Root memory region: root
  0000000000000000-0000000000001fff (prio 0, ram): BG
  0000000000002000-0000000000002fff (prio 1, i/o): C
  0000000000003000-0000000000003fff (prio 0, i/o): X
  0000000000004000-0000000000005fff (prio 1, i/o): C @0000000000002000
  0000000000006000-000000000000ffff (prio 0, ram): BG @0000000000006000

FlatView #1
 AS \"window\", root: win, alias root
 Root memory region: win
  0000000000000000-0000000000000fff (prio 0, ram): BG @0000000000001000
  0000000000001000-0000000000001fff (prio 1, i/o): C

FlatView #2
 AS \"ro\", root: ro-alias, alias rammy
 Root memory region: ro-alias
  0000000000000000-0000000000000fff (prio 0, rom): rammy

FlatView #3
 AS \"empty\", root: nothing
 Root memory region: (none)
  No rendered FlatView

";
    assert_text(&mtree_flat(&topo), expected);
}

/// Address spaces sharing a root are printed once, names sorted, groups in
/// creation order; alias targets follow in the order they were queued.
#[test]
fn mtree_groups_address_spaces_by_root() {
    let topo = Topology::new();
    let sys = container(&topo, "sys", 0x10000);
    let other = container(&topo, "other", 0x100);
    let t1 = ram(&topo, "t1", 0x100);
    let t2 = ram(&topo, "t2", 0x100);
    sys.add_subregion(0x100, &alias(&topo, "a2", &t2, 0, 0x100)).unwrap();
    other.add_subregion(0, &alias(&topo, "a1", &t1, 0, 0x100)).unwrap();
    other.add_subregion(0x80, &alias(&topo, "a2b", &t2, 0x80, 0x80)).unwrap();
    topo.address_space_init(&sys, "zeta").unwrap();
    topo.address_space_init(&other, "beta").unwrap();
    topo.address_space_init(&sys, "alpha").unwrap();
    let expected = "\
address-space: alpha
address-space: zeta
  0000000000000000-000000000000ffff (prio 0, i/o): sys
    0000000000000100-00000000000001ff (prio 0, ram): alias a2 @t2 0000000000000000-00000000000000ff

address-space: beta
  0000000000000000-00000000000000ff (prio 0, i/o): other
    0000000000000000-00000000000000ff (prio 0, ram): alias a1 @t1 0000000000000000-00000000000000ff
    0000000000000080-00000000000000ff (prio 0, ram): alias a2b @t2 0000000000000080-00000000000000ff

memory-region: t2
  0000000000000000-00000000000000ff (prio 0, ram): t2

memory-region: t1
  0000000000000000-00000000000000ff (prio 0, ram): t1

";
    assert_text(&mtree(&topo), expected);
}

// ----- reference outputs of QEMU 7.2 ---------------------------------------------

/// Adds I/O regions `(name, offset, size)` to `parent` with priority 0.
fn add_ios(topo: &Topology, parent: &MemoryRegion, list: &[(&str, u64, u128)]) {
    for &(name, off, size) in list {
        parent.add_subregion(off, &io(topo, name, size)).unwrap();
    }
}

/// QEMU's `io` root region.
fn io_root(topo: &Topology) -> MemoryRegion {
    topo.new_io("io", UnassignedIo, OpsConfig::default(), 0x10000).unwrap()
}

/// The SMM CPU view: a container `memory` holding an alias `memory` of
/// `system` (x86 `cpu_address_space_init` with `cpu_as_root`/`cpu_as_mem`).
fn cpu_smm_root(topo: &Topology, system: &MemoryRegion) -> MemoryRegion {
    let root = container(topo, "memory", SIZE_MAX);
    root.add_subregion(0, &alias(topo, "memory", system, 0, SIZE_MAX)).unwrap();
    root
}

/// QEMU 7.2 `-M microvm` (`info mtree`).
#[test]
fn reference_qemu_7_2_microvm() {
    let topo = Topology::new();
    let system = container(&topo, "system", SIZE_MAX);
    let io_mr = io_root(&topo);
    // Address spaces in QEMU's creation order: memory_map_init, then the CPU.
    topo.address_space_init(&system, "memory").unwrap();
    topo.address_space_init(&io_mr, "I/O").unwrap();

    let ram_mr = ram(&topo, "microvm.ram", 0x8000000);
    system.add_subregion(0, &alias(&topo, "ram-below-4g", &ram_mr, 0, 0x8000000)).unwrap();
    let bios = ram(&topo, "pc.bios", 0x10000);
    system.add_subregion(0xffff0000, &bios).unwrap();
    system.add_subregion_overlap(0xf0000, &alias(&topo, "isa-bios", &bios, 0, 0x10000), 1).unwrap();
    add_ios(&topo, &system, &[("acpi-ged", 0xfea00000, 4), ("acpi-ged-regs", 0xfea00200, 3)]);
    for i in 0..24u64 {
        system.add_subregion(0xfeb00000 + i * 0x200, &io(&topo, "virtio-mmio", 0x200)).unwrap();
    }
    add_ios(&topo, &system, &[("ioapic", 0xfec00000, 0x1000), ("ioapic", 0xfec10000, 0x1000)]);
    system.add_subregion_overlap(0xfee00000, &io(&topo, "apic-msi", 0x100000), 4096).unwrap();

    add_ios(&topo, &io_mr, &[("pic", 0x20, 2), ("pit", 0x40, 4)]);
    let rtc = io(&topo, "rtc", 2);
    rtc.add_subregion(0, &io(&topo, "rtc-index", 1)).unwrap();
    io_mr.add_subregion(0x70, &rtc).unwrap();
    add_ios(
        &topo,
        &io_mr,
        &[
            ("kvmvapic", 0x7e, 2),
            ("pic", 0xa0, 2),
            ("elcr", 0x4d0, 1),
            ("elcr", 0x4d1, 1),
            ("fwcfg", 0x510, 2),
            ("fwcfg.dma", 0x514, 8),
        ],
    );

    topo.address_space_init(&system, "cpu-memory-0").unwrap();
    topo.address_space_init(&cpu_smm_root(&topo, &system), "cpu-smm-0").unwrap();

    let expected = monitor_text(include_str!("../data/qemu-7.2-info-mtree-microvm.txt"));
    assert_text(&mtree(&topo), &expected);
}

/// A PCI device's bus-master address space: a container holding the
/// disabled alias "bus master" of the DMA root (QEMU's `pci_init_bus_master`).
fn bus_master(topo: &Topology, system: &MemoryRegion, name: &str) -> AddressSpace {
    let c = container(topo, "bus master container", SIZE_MAX);
    let en = alias(topo, "bus master", system, 0, SIZE_MAX);
    en.set_enabled(false).unwrap();
    c.add_subregion(0, &en).unwrap();
    topo.address_space_init(&c, name).unwrap()
}

/// QEMU 7.2 `-M pc` (i440FX + PIIX3/PIIX4; `info mtree`).
#[test]
fn reference_qemu_7_2_pc() {
    let topo = Topology::new();
    let system = container(&topo, "system", SIZE_MAX);
    let io_mr = io_root(&topo);

    // Groups print in creation order of their first address space; QEMU's
    // hash-table order in the capture is reproduced by creating them so.
    bus_master(&topo, &system, "PIIX4_PM");
    bus_master(&topo, &system, "piix3-ide");
    let memory = topo.address_space_init(&system, "memory").unwrap();
    bus_master(&topo, &system, "i440FX");
    bus_master(&topo, &system, "PIIX3");
    topo.address_space_init(&io_mr, "I/O").unwrap();

    // i440FX: RAM, the PCI window, SMRAM and PAM.
    let pc_ram = ram(&topo, "pc.ram", 0x8000000);
    system.add_subregion(0, &alias(&topo, "ram-below-4g", &pc_ram, 0, 0x8000000)).unwrap();
    let pci = container(&topo, "pci", SIZE_MAX);
    system.add_subregion_overlap(0, &pci, -1).unwrap();
    let pc_rom = topo.new_rom("pc.rom", 0x20000).unwrap();
    pci.add_subregion_overlap(0xc0000, &pc_rom, 1).unwrap();
    let bios = topo.new_rom("pc.bios", 0x40000).unwrap();
    pci.add_subregion(0xfffc0000, &bios).unwrap();
    let isa_bios = alias(&topo, "isa-bios", &bios, 0x20000, 0x20000);
    isa_bios.set_readonly(true).unwrap();
    pci.add_subregion_overlap(0xe0000, &isa_bios, 1).unwrap();
    system.add_subregion_overlap(0xa0000, &alias(&topo, "smram-region", &pci, 0xa0000, 0x20000), 1).unwrap();
    let smram = container(&topo, "smram", 0x1_0000_0000);
    smram.add_subregion(0xa0000, &alias(&topo, "smram-low", &pc_ram, 0xa0000, 0x20000)).unwrap();
    smram.set_enabled(false).unwrap(); // SMRAM_G_SMRAME clear at reset
    let mut pam: Vec<(u64, u128)> = (0..12).map(|i| (0xc0000 + i * 0x4000, 0x4000)).collect();
    pam.push((0xf0000, 0x10000));
    for (start, size) in pam {
        // init_pam: four aliases at prio 1, only alias[0] ("pam-pci" onto
        // PCI) enabled.
        topo.transaction(|| {
            let a = [
                alias(&topo, "pam-pci", &pci, start, size),
                alias(&topo, "pam-rom", &pc_ram, start, size),
                alias(&topo, "pam-pci", &pc_ram, start, size),
                alias(&topo, "pam-ram", &pc_ram, start, size),
            ];
            a[1].set_readonly(true).unwrap();
            for r in &a {
                r.set_enabled(false).unwrap();
                system.add_subregion_overlap(start, r, 1).unwrap();
            }
            a[0].set_enabled(true).unwrap();
        })
        .unwrap();
    }
    add_ios(&topo, &system, &[("ioapic", 0xfec00000, 0x1000), ("hpet", 0xfed00000, 0x400)]);
    system.add_subregion_overlap(0xfee00000, &io(&topo, "apic-msi", 0x100000), 4096).unwrap();

    // ISA and PCI port I/O.
    add_ios(&topo, &io_mr, &[("dma-chan", 0, 8), ("dma-cont", 8, 8), ("pic", 0x20, 2), ("pit", 0x40, 4)]);
    add_ios(&topo, &io_mr, &[("i8042-data", 0x60, 1), ("pcspk", 0x61, 1), ("i8042-cmd", 0x64, 1)]);
    let rtc = io(&topo, "rtc", 2);
    rtc.add_subregion(0, &io(&topo, "rtc-index", 1)).unwrap();
    io_mr.add_subregion(0x70, &rtc).unwrap();
    add_ios(
        &topo,
        &io_mr,
        &[
            ("kvmvapic", 0x7e, 2),
            ("ioport80", 0x80, 1),
            ("dma-page", 0x81, 3),
            ("dma-page", 0x87, 1),
            ("dma-page", 0x89, 3),
            ("dma-page", 0x8f, 1),
            ("port92", 0x92, 1),
            ("pic", 0xa0, 2),
            ("apm-io", 0xb2, 2),
            ("dma-chan", 0xc0, 0x10),
            ("dma-cont", 0xd0, 0x10),
            ("ioportF0", 0xf0, 1),
            ("ide", 0x170, 8),
            ("ide", 0x1f0, 8),
            ("ide", 0x376, 1),
            ("fdc", 0x3f1, 5),
            ("ide", 0x3f6, 1),
            ("fdc", 0x3f7, 1),
            ("elcr", 0x4d0, 1),
            ("elcr", 0x4d1, 1),
            ("fwcfg", 0x510, 2),
            ("fwcfg.dma", 0x514, 8),
            ("pci-conf-idx", 0xcf8, 4),
            ("pci-conf-data", 0xcfc, 4),
            ("vmport", 0x5658, 1),
        ],
    );
    io_mr.add_subregion_overlap(0xcf9, &io(&topo, "piix3-reset-control", 1), 1).unwrap();
    // PIIX4 PM: its port window is a disabled container at 0 (added after
    // dma-chan, so it comes first among the regions at 0).
    let pm = container(&topo, "piix4-pm", 0x40);
    add_ios(&topo, &pm, &[("acpi-evt", 0, 4), ("acpi-cnt", 4, 2), ("acpi-tmr", 8, 4)]);
    pm.set_enabled(false).unwrap();
    io_mr.add_subregion(0, &pm).unwrap();
    add_ios(
        &topo,
        &io_mr,
        &[
            ("acpi-pci-hotplug", 0xae00, 0x18),
            ("acpi-cpu-hotplug", 0xaf00, 0x20),
            ("acpi-gpe0", 0xafe0, 4),
            ("pm-smbus", 0xb100, 0x40),
        ],
    );

    // The CPU: its normal view shares `system`; SMM adds SMRAM on top.
    topo.address_space_init(&system, "cpu-memory-0").unwrap();
    let smm = container(&topo, "memory", SIZE_MAX);
    smm.add_subregion_overlap(0, &alias(&topo, "smram", &smram, 0, 0x1_0000_0000), 1).unwrap();
    smm.add_subregion(0, &alias(&topo, "memory", &system, 0, SIZE_MAX)).unwrap();
    topo.address_space_init(&smm, "cpu-smm-0").unwrap();

    let expected = monitor_text(include_str!("../data/qemu-7.2-info-mtree-pc.txt"));
    assert_text(&mtree(&topo), &expected);

    // The hidden regions are really there: -D shows them, and disabled
    // PAM aliases do not reach the view (pam-pci onto PCI shows pc.rom).
    let all = mtree_disabled(&topo);
    assert!(all.contains(
        "address-space: PIIX4_PM\n  0000000000000000-ffffffffffffffff (prio 0, i/o): bus master container\n    \
         0000000000000000-ffffffffffffffff (prio 0, i/o): alias bus master @system \
         0000000000000000-ffffffffffffffff [disabled]\n"
    ));
    assert!(all.contains("\n    0000000000000000-000000000000003f (prio 0, i/o): piix4-pm [disabled]\n"));
    assert!(
        all.contains("\nmemory-region: smram\n  0000000000000000-00000000ffffffff (prio 0, i/o): smram [disabled]\n")
    );
    // 13 PAM segments, printed under "memory" and again as memory-region: system.
    assert_eq!(all.matches("(prio 1, ram): alias pam-ram @pc.ram").count(), 26);
    let v = memory.view();
    assert_eq!(v.lookup(0xc0000).map(|r| r.region().name()), Some("pc.rom"));
    assert_eq!(
        v.lookup(0xe0000).map(|r| (r.region().name(), r.offset_in_region(), r.readonly())),
        Some(("pc.bios", 0x20000, true))
    );
    // smram-region shows the (empty) PCI window, which is transparent: RAM
    // below shows through, one range with the RAM before it.
    let r = v.lookup(0xa0000).unwrap();
    assert_eq!((r.region().name(), r.start(), r.end(), r.offset_in_region()), ("pc.ram", 0, 0xc0000, 0));
}
