//! Quick probe (not a benchmark): cost of building PCI-like devices.
use std::time::Instant;
use topos_runtime::*;
struct C;
impl MemoryRegionOps for C {
    fn read(&self, _a: u64, _s: u32) -> u64 {
        0
    }
    fn write(&self, _a: u64, _v: u64, _s: u32) {}
}
fn main() -> Result<()> {
    let topo = Topology::new();
    let spaces = topo.standard_spaces()?;
    let pci = topo.new_container("pci", 1 << 28)?;
    spaces.system.add_subregion(0xe000_0000, &pci)?;
    let mut keep = Vec::new();
    let t0 = Instant::now();
    for d in 0..400u64 {
        let t = Instant::now();
        let (mut a, mut b, mut c) = (0u128, 0u128, 0u128);
        topo.transaction(|| -> Result<()> {
            let bar = topo.new_io(&format!("dev{d}.bar0"), C, OpsConfig::default(), 0x1000)?;
            pci.add_subregion(d * 0x1000, &bar)?;
            a = t.elapsed().as_nanos();
            let alias = topo.new_alias(&format!("dev{d}.bm"), &spaces.system, 0, SIZE_MAX)?;
            keep.push(topo.address_space_init(&alias, &format!("dev{d}"))?);
            b = t.elapsed().as_nanos();
            let n = new_event_notifier()?;
            for q in 0..32 {
                bar.add_eventfd(q * 4, 4, true, q, &n)?;
            }
            c = t.elapsed().as_nanos();
            keep.push(spaces.memory.clone());
            Ok(())
        })??;
        if d % 100 == 99 {
            println!(
                "dev {d}: add {a} ns, as_init {} ns, eventfds {} ns, commit {} ns",
                b - a,
                c - b,
                t.elapsed().as_nanos() - c
            );
        }
    }
    println!("total {:?}", t0.elapsed());
    Ok(())
}
