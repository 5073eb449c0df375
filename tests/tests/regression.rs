//! Regression tests, named `r<issue>_<what>`: each failed before its fix.

use topos_runtime::{FlatView, Topology};

fn spans(view: &FlatView) -> Vec<(u64, u128, String)> {
    view.ranges().iter().map(|r| (r.start(), r.end(), r.region().name().to_string())).collect()
}

/// Issue 7: an address-space root that is also a subregion renders at its
/// own address; giving it a container (or moving it within one) must move
/// its view at once, not at some later commit.
#[test]
fn r7_root_that_is_a_subregion_moves_its_view() {
    let topo = Topology::new();
    let s = topo.standard_spaces().unwrap();
    let sub = topo.new_container("sub", 0x10_0000).unwrap();
    let ram = topo.new_ram("ram", 0x1000).unwrap();
    sub.add_subregion(0x100, &ram).unwrap();
    let a = topo.address_space_init(&sub, "a").unwrap();
    assert_eq!(spans(&a.view()), vec![(0x100, 0x1100, "ram".to_string())]);

    // Adding a parent places the root at 0x10000.
    s.system.add_subregion(0x10000, &sub).unwrap();
    assert_eq!(spans(&a.view()), vec![(0x10100, 0x11100, "ram".to_string())]);
    // Moving it within the parent moves the view.
    sub.set_address(0x20000).unwrap();
    assert_eq!(spans(&a.view()), vec![(0x20100, 0x21100, "ram".to_string())]);
    // And system memory sees the same.
    assert_eq!(s.memory.view().lookup(0x20100).map(|r| r.region().name().to_string()), Some("ram".into()));

    // A disabled parent does not hide the root's own move.
    let parked = topo.new_container("parked", 0x100_0000).unwrap();
    parked.set_enabled(false).unwrap();
    s.system.del_subregion(&sub).unwrap();
    parked.add_subregion(0x30000, &sub).unwrap();
    assert_eq!(spans(&a.view()), vec![(0x30100, 0x31100, "ram".to_string())]);
}
