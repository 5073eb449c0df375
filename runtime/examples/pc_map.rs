//! Builds a small PC-like memory map, prints it as `info mtree` would, then
//! moves a PCI BAR back and forth while a reader thread keeps reading through
//! it, and prints the flat view at the end.
//!
//! Run with `cargo run -p topos-runtime --example pc_map`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use topos_runtime::{MemoryRegionOps, MtreeOptions, OpsConfig, Topology};

/// A device that answers every read with a tag and counts writes.
struct Tagged {
    tag: u64,
    writes: AtomicU64,
}

impl MemoryRegionOps for Tagged {
    fn read(&self, _addr: u64, _size: u32) -> u64 {
        self.tag
    }
    fn write(&self, _addr: u64, _value: u64, _size: u32) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() -> Result<(), topos_runtime::Error> {
    let topo = Topology::new();
    let s = topo.standard_spaces()?;

    // RAM, seen below 4 GiB through an alias.
    let ram = topo.new_ram("pc.ram", 0x800_0000)?;
    let ram_below = topo.new_alias("ram-below-4g", &ram, 0, 0x800_0000)?;
    s.system.add_subregion(0, &ram_below)?;

    // PCI space under everything, the BIOS at the top of 4 GiB and its
    // last 128 KiB again below 1 MiB.
    let pci = topo.new_container("pci", topos_runtime::SIZE_MAX)?;
    s.system.add_subregion_overlap(0, &pci, -1)?;
    let bios = topo.new_rom("pc.bios", 0x40000)?;
    bios.ram()?.write(0x3fff0, &[0xea, 0x5b, 0xe0, 0x00, 0xf0])?;
    pci.add_subregion(0xfffc_0000, &bios)?;
    let isa_bios = topo.new_alias("isa-bios", &bios, 0x20000, 0x20000)?;
    pci.add_subregion_overlap(0xe0000, &isa_bios, 1)?;

    // A device BAR and a serial port.
    let bar =
        topo.new_io("edu-mmio", Tagged { tag: 0x010000ed, writes: AtomicU64::new(0) }, OpsConfig::default(), 0x1000)?;
    pci.add_subregion(0xfebf_0000, &bar)?;
    let serial =
        topo.new_io("serial", Tagged { tag: 0x60, writes: AtomicU64::new(0) }, OpsConfig::with_impl(1, 1), 8)?;
    s.io.add_subregion(0x3f8, &serial)?;

    print!("{}", topo.mtree(MtreeOptions::default())?);

    // A reader keeps reading the BAR's first register at both places it
    // alternates between; it must always see the device or nothing.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let mem = s.memory.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut hits, mut misses) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                for addr in [0xfebf_0000u64, 0xfeb0_0000] {
                    let (v, r) = mem.read_u64(addr, 4);
                    if r.is_ok() {
                        assert_eq!(v, 0x010000ed);
                        hits += 1;
                    } else {
                        assert_eq!(v, 0);
                        misses += 1;
                    }
                }
            }
            (hits, misses)
        })
    };
    for i in 0..1000u64 {
        bar.set_address(if i % 2 == 0 { 0xfeb0_0000 } else { 0xfebf_0000 })?;
    }
    stop.store(true, Ordering::Relaxed);
    let (hits, misses) = reader.join().expect("reader");
    println!("moved the BAR 1000 times (generation {}); reader: {hits} hits, {misses} misses", topo.generation());

    let mut reset_vector = [0u8; 5];
    let _ = s.memory.read(0xffff_fff0, &mut reset_vector);
    println!("reset vector bytes: {reset_vector:02x?}");
    print!("{}", topo.mtree(MtreeOptions { flatview: true, ..Default::default() })?);
    Ok(())
}
