//! Quick probe (not a benchmark): commit latency for one move vs topology size.
use std::time::Instant;
use topos_runtime::*;
fn main() -> Result<()> {
    for n in [100u64, 1000, 10000] {
        let topo = Topology::new();
        let s = topo.standard_spaces()?;
        let mut regs = Vec::new();
        topo.transaction(|| -> Result<()> {
            for i in 0..n {
                let r = topo.new_ram(&format!("r{i}"), 0x1000)?;
                s.system.add_subregion(i * 0x2000, &r)?;
                regs.push(r);
            }
            Ok(())
        })??;
        let mut lat = Vec::new();
        for k in 0..200u64 {
            let t = Instant::now();
            regs[(n / 2) as usize].set_address((n / 2) * 0x2000 + (k % 2) * 0x1000)?;
            lat.push(t.elapsed());
        }
        lat.sort();
        println!("n={n} p50={:?} p99={:?}", lat[lat.len() / 2], lat[lat.len() * 99 / 100]);
        let v = s.memory.view();
        let addrs: Vec<u64> = (0..4096u64).map(|k| (k.wrapping_mul(0x9E3779B97F4A7C15) % n) * 0x2000 + 8).collect();
        let t = Instant::now();
        let mut hits = 0u64;
        for _ in 0..2500 {
            for &a in &addrs {
                hits += v.lookup(std::hint::black_box(a)).is_some() as u64;
            }
        }
        println!("   lookup miss-pattern {:.1} ns ({hits})", t.elapsed().as_nanos() as f64 / (2500.0 * 4096.0));
        let mut acc = s.memory.accessor();
        let t = Instant::now();
        for _ in 0..2500 {
            for &a in &addrs {
                hits += acc.lookup(std::hint::black_box(a)).is_some() as u64;
            }
        }
        println!("   accessor miss-pattern {:.1} ns ({hits})", t.elapsed().as_nanos() as f64 / (2500.0 * 4096.0));
        let t = Instant::now();
        for _ in 0..10_000_000u64 {
            hits += acc.lookup(std::hint::black_box(0x2008)).is_some() as u64;
        }
        println!("   accessor hit {:.1} ns ({hits})", t.elapsed().as_nanos() as f64 / 1e7);
    }
    struct K;
    impl MemoryRegionOps for K {
        fn read(&self, _a: u64, _s: u32) -> u64 {
            7
        }
        fn write(&self, _a: u64, _v: u64, _s: u32) {}
    }
    let topo = Topology::new();
    let s = topo.standard_spaces()?;
    s.system.add_subregion(0x1000_0000, &topo.new_io("k", K, OpsConfig::default(), 0x1000)?)?;
    let mut acc = s.memory.accessor();
    let n = 10_000_000u64;
    let t = Instant::now();
    for _ in 0..n {
        let _ = std::hint::black_box(s.memory.read_u64(std::hint::black_box(0x1000_0010), 4));
    }
    println!("mmio read4 asp {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let t = Instant::now();
    for _ in 0..n {
        let _ = std::hint::black_box(acc.read_u64(std::hint::black_box(0x1000_0010), 4));
    }
    println!("mmio read4 accessor {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
    let t = Instant::now();
    for _ in 0..n {
        let _ = std::hint::black_box(acc.write_u64(std::hint::black_box(0x1000_0010), 1, 4));
    }
    println!("mmio write4 accessor {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
    Ok(())
}
