//! Criterion benchmarks of the topos runtime against the Rust VMM peers
//! (Cloud Hypervisor's and crosvm's bus designs, rust-vmm `vm-device` and
//! `vm-memory`), measured in the same process. Each group holds the topos
//! variants and the baselines of one operation side by side.
//!
//! Run with `cargo bench -p topos-runtime --bench memory`; see BENCHMARKS.md
//! at the workspace root for the results and the targets they are held to.

mod baselines;
mod support;

use baselines::{
    base_of, ch_bus, crosvm_bus, vm_memory, vmd_lookup, vmd_manager, vmd_register, DEV_VALUE, RANGE_LEN, STRIDE,
};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{
    build_machine, build_machine_within, dirty_one_percent, harvest_ram, io_map, ram_map, run_readers, scrambled_addrs,
    spare_base, topos_mover, DiffListener, NopListener, Writer, FAR_BASE, HARVEST_RAM,
};
use topos_runtime::{AtomicRmw, DirtyClient, FlatRange, MemTxResult, MemoryListener, Topology};
use vm_device::bus::MmioAddress;
use vm_device::device_manager::MmioManager;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

/// Range counts of the lookup benches.
const LOOKUP_SIZES: [usize; 2] = [256, 4096];
/// Devices on the bus in the MMIO and contended benches.
const MMIO_DEVICES: usize = 256;
/// The device the MMIO benches access, and the offset in it.
const MMIO_ADDR: u64 = 100 * STRIDE + 0x10;
/// RAM size of the RAM benches.
const RAM_SIZE: u64 = 64 << 20;
/// Reader threads of the contended benches.
const READERS: usize = 2;

fn lookup(c: &mut Criterion) {
    // The dense maps, then a sparse one: the same 4,096 ranges plus one range
    // at `FAR_BASE` (the readers never touch it).
    let cases = LOOKUP_SIZES.iter().map(|&n| (n, false)).chain([(4096, true)]);
    for (n, sparse) in cases {
        let map = io_map(n).expect("topos map");
        let (ch, mut ch_devs) = ch_bus(n);
        let cv = crosvm_bus(n);
        let mut vmd = vmd_manager(n);
        if sparse {
            let far = map.topo.new_io("far", support::ConstOps, Default::default(), RANGE_LEN as u128).expect("far");
            map.spaces.system.add_subregion(FAR_BASE, &far).expect("map far");
            let dev: Arc<dyn baselines::ChBusDeviceSync> = Arc::new(Mutex::new(baselines::ConstDevice::default()));
            ch.insert(dev.clone(), FAR_BASE, RANGE_LEN).expect("far");
            ch_devs.push(dev);
            cv.insert(Arc::new(Mutex::new(baselines::ConstDevice::default())), FAR_BASE, RANGE_LEN).expect("far");
            vmd_register(&mut vmd, FAR_BASE, RANGE_LEN);
        }
        let view = map.spaces.memory.view();
        let asp = map.spaces.memory.clone();
        let addrs = scrambled_addrs(n);
        let mask = n - 1;
        assert!(n.is_power_of_two());
        let hit = addrs[0];
        // Every structure resolves every address to the same range.
        let mut acc = asp.accessor();
        for &a in addrs.iter() {
            let base = view.lookup(a).map(FlatRange::start);
            assert!(base.is_some());
            assert_eq!(acc.lookup(a).map(FlatRange::start), base);
            assert_eq!(ch.resolve(a).map(|r| r.0), base);
            assert_eq!(cv.get_device(a).map(|r| a - r.0), base);
            assert_eq!(vmd_lookup(&vmd, a), base);
        }

        let mut g = c.benchmark_group(format!("lookup_{n}{}", if sparse { "_sparse" } else { "" }));
        for pattern in ["hit", "miss"] {
            // `next` yields the address of each access: always the same one
            // (hit), or cycling over every range in a scrambled order (miss).
            let next = |i: &mut usize| -> u64 {
                if pattern == "hit" {
                    hit
                } else {
                    *i = i.wrapping_add(1);
                    addrs[*i & mask]
                }
            };
            g.bench_function(BenchmarkId::new("topos_flatview", pattern), |b| {
                let mut i = 0;
                b.iter(|| view.lookup(black_box(next(&mut i))).map(FlatRange::start))
            });
            g.bench_function(BenchmarkId::new("topos_load_view", pattern), |b| {
                let mut i = 0;
                b.iter(|| asp.load_view().lookup(black_box(next(&mut i))).map(FlatRange::start))
            });
            g.bench_function(BenchmarkId::new("topos_accessor", pattern), |b| {
                let mut acc = asp.accessor();
                let mut i = 0;
                b.iter(|| acc.lookup(black_box(next(&mut i))).map(FlatRange::start))
            });
            g.bench_function(BenchmarkId::new("ch_bus", pattern), |b| {
                let mut i = 0;
                b.iter(|| ch.resolve(black_box(next(&mut i))).map(|r| r.0))
            });
            g.bench_function(BenchmarkId::new("crosvm_bus", pattern), |b| {
                let mut i = 0;
                b.iter(|| cv.get_device(black_box(next(&mut i))).map(|r| r.0))
            });
            g.bench_function(BenchmarkId::new("vm_device", pattern), |b| {
                let mut i = 0;
                b.iter(|| vmd_lookup(&vmd, black_box(next(&mut i))))
            });
        }
        g.finish();
    }
}

fn ram(c: &mut Criterion) {
    let topo = Topology::new();
    let spaces = topo.standard_spaces().expect("spaces");
    let region = topo.new_ram("ram", RAM_SIZE as u128).expect("ram");
    spaces.system.add_subregion(0, &region).expect("map ram");
    let asp = spaces.memory.clone();
    let vmm = vm_memory(RAM_SIZE as usize);
    let addr = 0x10_0008;
    let ga = GuestAddress(addr);
    // Both sides store and load the same bytes.
    assert!(asp.write(addr, &7u64.to_le_bytes()).is_ok());
    assert!(asp.accessor().read_u64(addr, 8) == (7, MemTxResult::Ok));
    vmm.memory().write_obj(7u64, ga).expect("write");
    assert_eq!(vmm.memory().read_obj::<u64>(ga).expect("read"), 7);
    // The region's own accessors, and a direct mapping of the whole region.
    let slice = region.ram().expect("ram slice");
    let mut mapping = asp.map(0, RAM_SIZE, true).expect("map");
    assert!(mapping.is_direct() && mapping.len() == RAM_SIZE);
    let mut b8 = [0u8; 8];
    slice.read(addr, &mut b8).expect("slice read");
    assert_eq!(u64::from_le_bytes(b8), 7);
    mapping.read(addr, &mut b8).expect("mapping read");
    assert_eq!(u64::from_le_bytes(b8), 7);
    // The old RAM copy (`copy_nonoverlapping`, i.e. `memcpy`) between host
    // buffers, without the dispatch around it.
    let host = vec![1u8; 64 << 10];
    let mut host_w = vec![0u8; 64 << 10];

    let mut g = c.benchmark_group("ram_read8");
    g.bench_function("topos_asp", |b| {
        b.iter(|| {
            let mut buf = [0u8; 8];
            let _ = asp.read(black_box(addr), &mut buf);
            u64::from_le_bytes(buf)
        })
    });
    g.bench_function("topos_accessor", |b| {
        let mut acc = asp.accessor();
        b.iter(|| {
            let mut buf = [0u8; 8];
            let _ = acc.read(black_box(addr), &mut buf);
            u64::from_le_bytes(buf)
        })
    });
    g.bench_function("topos_ramslice", |b| {
        b.iter(|| {
            let mut buf = [0u8; 8];
            let _ = slice.read(black_box(addr), &mut buf);
            u64::from_le_bytes(buf)
        })
    });
    g.bench_function("topos_mapping", |b| {
        b.iter(|| {
            let mut buf = [0u8; 8];
            let _ = mapping.read(black_box(addr), &mut buf);
            u64::from_le_bytes(buf)
        })
    });
    g.bench_function("vm_memory", |b| b.iter(|| vmm.memory().read_obj::<u64>(black_box(ga)).expect("read")));
    g.finish();

    let mut g = c.benchmark_group("ram_write8");
    g.bench_function("topos_asp", |b| {
        let mut v = 0u64;
        b.iter(|| {
            v = v.wrapping_add(1);
            asp.write(black_box(addr), &v.to_le_bytes())
        })
    });
    g.bench_function("topos_accessor", |b| {
        let mut acc = asp.accessor();
        let mut v = 0u64;
        b.iter(|| {
            v = v.wrapping_add(1);
            acc.write(black_box(addr), &v.to_le_bytes())
        })
    });
    g.bench_function("topos_ramslice", |b| {
        let mut v = 0u64;
        b.iter(|| {
            v = v.wrapping_add(1);
            slice.write(black_box(addr), &v.to_le_bytes())
        })
    });
    g.bench_function("topos_mapping", |b| {
        let mut v = 0u64;
        b.iter(|| {
            v = v.wrapping_add(1);
            mapping.write(black_box(addr), &v.to_le_bytes())
        })
    });
    g.bench_function("vm_memory", |b| {
        let mut v = 0u64;
        b.iter(|| {
            v = v.wrapping_add(1);
            vmm.memory().write_obj(v, black_box(ga)).expect("write")
        })
    });
    g.finish();

    let mut buf = vec![0u8; 64 << 10];
    let mut g = c.benchmark_group("ram_read64k");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("topos_asp", |b| b.iter(|| asp.read(black_box(0x20_0000), &mut buf)));
    g.bench_function("topos_accessor", |b| {
        let mut acc = asp.accessor();
        b.iter(|| acc.read(black_box(0x20_0000), &mut buf))
    });
    g.bench_function("topos_ramslice", |b| b.iter(|| slice.read(black_box(0x20_0000), &mut buf)));
    g.bench_function("topos_mapping", |b| b.iter(|| mapping.read(black_box(0x20_0000), &mut buf)));
    g.bench_function("memcpy", |b| b.iter(|| buf.copy_from_slice(black_box(&host))));
    g.bench_function("vm_memory", |b| {
        b.iter(|| vmm.memory().read_slice(&mut buf, black_box(GuestAddress(0x20_0000))).expect("read"))
    });
    g.finish();

    let mut g = c.benchmark_group("ram_write64k");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("topos_asp", |b| b.iter(|| asp.write(black_box(0x20_0000), &buf)));
    g.bench_function("topos_accessor", |b| {
        let mut acc = asp.accessor();
        b.iter(|| acc.write(black_box(0x20_0000), &buf))
    });
    g.bench_function("topos_ramslice", |b| b.iter(|| slice.write(black_box(0x20_0000), &buf)));
    g.bench_function("topos_mapping", |b| b.iter(|| mapping.write(black_box(0x20_0000), &buf)));
    g.bench_function("memcpy", |b| b.iter(|| black_box(&mut host_w).copy_from_slice(&buf)));
    g.bench_function("vm_memory", |b| {
        b.iter(|| vmm.memory().write_slice(&buf, black_box(GuestAddress(0x20_0000))).expect("write"))
    });
    g.finish();
    drop(mapping);
}

/// Guest atomics on RAM: lock-free (naturally aligned, or misaligned inside
/// one 8-byte word) and serialised (crossing a word), against a host atomic.
fn ram_atomic(c: &mut Criterion) {
    let topo = Topology::new();
    let spaces = topo.standard_spaces().expect("spaces");
    let region = topo.new_ram("ram", 0x10000).expect("ram");
    spaces.system.add_subregion(0, &region).expect("map ram");
    let asp = spaces.memory.clone();
    // (name, address, size): aligned, inside one word, crossing a word.
    let cases = [("aligned4", 0x100u64, 4u32), ("aligned8", 0x108, 8), ("in_word4", 0x111, 4), ("split8", 0x11c, 8)];
    for (_, a, size) in cases {
        assert!(asp.atomic_rmw(a, size, AtomicRmw::Add(1)) == (0, MemTxResult::Ok));
        assert!(asp.accessor().atomic_rmw(a, size, AtomicRmw::Add(1)) == (1, MemTxResult::Ok));
    }
    let mut g = c.benchmark_group("ram_atomic_add");
    for (name, a, size) in cases {
        g.bench_function(BenchmarkId::new("topos_asp", name), |b| {
            b.iter(|| asp.atomic_rmw(black_box(a), size, AtomicRmw::Add(1)))
        });
        g.bench_function(BenchmarkId::new("topos_accessor", name), |b| {
            let mut acc = asp.accessor();
            b.iter(|| acc.atomic_rmw(black_box(a), size, AtomicRmw::Add(1)))
        });
    }
    let host = std::sync::atomic::AtomicU64::new(0);
    g.bench_function("host_atomic_u64", |b| b.iter(|| black_box(&host).fetch_add(1, Ordering::SeqCst)));
    g.finish();

    let mut g = c.benchmark_group("ram_atomic_cmpxchg8");
    g.bench_function("topos_accessor", |b| {
        let mut acc = asp.accessor();
        let mut v = 0u64;
        b.iter(|| {
            let (r, _) = acc.atomic_compare_exchange(black_box(0x200), 8, v, v.wrapping_add(1));
            v = r.map_or_else(|actual| actual, |old| old.wrapping_add(1));
        })
    });
    g.finish();
}

fn mmio(c: &mut Criterion) {
    let map = io_map(MMIO_DEVICES).expect("topos map");
    let asp = map.spaces.memory.clone();
    let (ch, _ch_devs) = ch_bus(MMIO_DEVICES);
    let cv = crosvm_bus(MMIO_DEVICES);
    let vmd = vmd_manager(MMIO_DEVICES);
    let a = MMIO_ADDR;
    // Every path reaches the trivial device.
    assert!(asp.read_u64(a, 4) == (DEV_VALUE, MemTxResult::Ok));
    assert!(asp.accessor().read_u64(a, 4) == (DEV_VALUE, MemTxResult::Ok));
    let mut d = [0u8; 4];
    assert!(ch.read(a, &mut d) && u32::from_le_bytes(d) as u64 == DEV_VALUE);
    assert!(cv.read(a, &mut d) && u32::from_le_bytes(d) as u64 == DEV_VALUE);
    assert!(vmd.mmio_read(MmioAddress(a), &mut d).is_ok() && u32::from_le_bytes(d) as u64 == DEV_VALUE);

    let mut g = c.benchmark_group("mmio_read4");
    g.bench_function("topos_asp", |b| b.iter(|| asp.read_u64(black_box(a), 4)));
    g.bench_function("topos_accessor", |b| {
        let mut acc = asp.accessor();
        b.iter(|| acc.read_u64(black_box(a), 4))
    });
    g.bench_function("ch_bus", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            ch.read(black_box(a), &mut d);
            d
        })
    });
    g.bench_function("crosvm_bus", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            cv.read(black_box(a), &mut d);
            d
        })
    });
    g.bench_function("vm_device", |b| {
        b.iter(|| {
            let mut d = [0u8; 4];
            let _ = vmd.mmio_read(MmioAddress(black_box(a)), &mut d);
            d
        })
    });
    g.finish();

    let mut g = c.benchmark_group("mmio_write4");
    g.bench_function("topos_asp", |b| b.iter(|| asp.write_u64(black_box(a), 0xabcd, 4)));
    g.bench_function("topos_accessor", |b| {
        let mut acc = asp.accessor();
        b.iter(|| acc.write_u64(black_box(a), 0xabcd, 4))
    });
    let data = 0xabcd_u32.to_le_bytes();
    g.bench_function("ch_bus", |b| b.iter(|| ch.write(black_box(a), &data)));
    g.bench_function("crosvm_bus", |b| b.iter(|| cv.write(black_box(a), &data)));
    g.bench_function("vm_device", |b| b.iter(|| vmd.mmio_write(MmioAddress(black_box(a)), &data)));
    g.finish();
}

/// The contended benches: `READERS` threads access the 256-device map in a
/// scrambled order while a writer changes it about once a millisecond. The
/// time reported is per access, as each reader sees it.
fn contended(c: &mut Criterion) {
    let map = io_map(MMIO_DEVICES).expect("topos map");
    let asp = map.spaces.memory.clone();
    let (ch, _ch_devs) = ch_bus(MMIO_DEVICES);
    let ch = Arc::new(ch);
    let cv = Arc::new(crosvm_bus(MMIO_DEVICES));
    let vmd = Arc::new(Mutex::new(vmd_manager(MMIO_DEVICES)));
    let addrs: Arc<[u64]> = scrambled_addrs(MMIO_DEVICES).into();
    let mask = MMIO_DEVICES - 1;
    let spare_at = spare_base(MMIO_DEVICES);

    // Writers: topos moves a spare region (one commit per change); the buses
    // remove and re-insert a spare entry.
    let ch_writer = |ch: Arc<baselines::ChBus>| {
        let spare: Arc<dyn baselines::ChBusDeviceSync> = Arc::new(Mutex::new(baselines::ConstDevice::default()));
        Writer::start(move |k| {
            if k % 2 == 0 {
                ch.insert(spare.clone(), spare_at, RANGE_LEN).expect("insert");
            } else {
                ch.remove(spare_at);
            }
        })
    };
    let cv_writer = |cv: Arc<baselines::CrosvmBus>| {
        Writer::start(move |k| {
            if k % 2 == 0 {
                cv.insert(Arc::new(Mutex::new(baselines::ConstDevice::default())), spare_at, RANGE_LEN)
                    .expect("insert");
            } else {
                cv.remove(spare_at);
            }
        })
    };
    let vmd_writer = |vmd: Arc<Mutex<vm_device::device_manager::IoManager>>| {
        Writer::start(move |k| {
            let mut m = vmd.lock().expect("manager lock");
            if k % 2 == 0 {
                vmd_register(&mut m, spare_at, RANGE_LEN);
            } else {
                m.deregister_mmio(MmioAddress(spare_at));
            }
        })
    };

    for op in ["lookup", "mmio_read4"] {
        let mut g = c.benchmark_group(format!("contended_{op}"));
        g.measurement_time(Duration::from_secs(3)).sample_size(20);
        let is_lookup = op == "lookup";

        let w = topos_mover(&map).expect("topos writer");
        {
            let (asp, addrs) = (asp.clone(), addrs.clone());
            g.bench_function("topos_asp", move |b| {
                let (asp, addrs) = (asp.clone(), addrs.clone());
                b.iter_custom(move |iters| {
                    let (asp, addrs) = (asp.clone(), addrs.clone());
                    run_readers(READERS, iters, move |iters| {
                        for i in 0..iters as usize {
                            let a = addrs[i & mask];
                            if is_lookup {
                                black_box(asp.load_view().lookup(black_box(a)).map(FlatRange::start));
                            } else {
                                let _ = black_box(asp.read_u64(black_box(a), 4));
                            }
                        }
                    })
                })
            });
        }
        {
            let (asp, addrs) = (asp.clone(), addrs.clone());
            g.bench_function("topos_accessor", move |b| {
                let (asp, addrs) = (asp.clone(), addrs.clone());
                b.iter_custom(move |iters| {
                    let (asp, addrs) = (asp.clone(), addrs.clone());
                    run_readers(READERS, iters, move |iters| {
                        let mut acc = asp.accessor();
                        for i in 0..iters as usize {
                            let a = addrs[i & mask];
                            if is_lookup {
                                black_box(acc.lookup(black_box(a)).map(FlatRange::start));
                            } else {
                                let _ = black_box(acc.read_u64(black_box(a), 4));
                            }
                        }
                    })
                })
            });
        }
        let topos_changes = w.stop();
        // The topos writer left its spare region mapped; take it out again.
        if let Some(spare) = map.spaces.system.subregions().into_iter().find(|r| r.name() == "mover") {
            map.spaces.system.del_subregion(&spare).expect("unmap spare");
        }

        let w = ch_writer(ch.clone());
        {
            let (ch, addrs) = (ch.clone(), addrs.clone());
            g.bench_function("ch_bus", move |b| {
                b.iter_custom(|iters| {
                    let (ch, addrs) = (ch.clone(), addrs.clone());
                    run_readers(READERS, iters, move |iters| {
                        for i in 0..iters as usize {
                            let a = addrs[i & mask];
                            if is_lookup {
                                black_box(ch.resolve(black_box(a)).map(|r| r.0));
                            } else {
                                let mut d = [0u8; 4];
                                black_box(ch.read(black_box(a), &mut d));
                                black_box(d);
                            }
                        }
                    })
                })
            });
        }
        let ch_changes = w.stop();
        ch.remove(spare_at);

        let w = cv_writer(cv.clone());
        {
            let (cv, addrs) = (cv.clone(), addrs.clone());
            g.bench_function("crosvm_bus", move |b| {
                b.iter_custom(|iters| {
                    let (cv, addrs) = (cv.clone(), addrs.clone());
                    run_readers(READERS, iters, move |iters| {
                        for i in 0..iters as usize {
                            let a = addrs[i & mask];
                            if is_lookup {
                                black_box(cv.get_device(black_box(a)).map(|r| r.0));
                            } else {
                                let mut d = [0u8; 4];
                                black_box(cv.read(black_box(a), &mut d));
                                black_box(d);
                            }
                        }
                    })
                })
            });
        }
        let cv_changes = w.stop();
        cv.remove(spare_at);

        let w = vmd_writer(vmd.clone());
        {
            let (vmd, addrs) = (vmd.clone(), addrs.clone());
            g.bench_function("vm_device_mutex", move |b| {
                b.iter_custom(|iters| {
                    let (vmd, addrs) = (vmd.clone(), addrs.clone());
                    run_readers(READERS, iters, move |iters| {
                        for i in 0..iters as usize {
                            let a = addrs[i & mask];
                            let m = vmd.lock().expect("manager lock");
                            if is_lookup {
                                black_box(vmd_lookup(&m, black_box(a)));
                            } else {
                                let mut d = [0u8; 4];
                                let _ = black_box(m.mmio_read(MmioAddress(black_box(a)), &mut d));
                                black_box(d);
                            }
                        }
                    })
                })
            });
        }
        let vmd_changes = w.stop();
        vmd.lock().expect("manager lock").deregister_mmio(MmioAddress(spare_at));
        g.finish();
        eprintln!(
            "contended_{op}: writer changes made: topos {topos_changes}, ch {ch_changes}, crosvm {cv_changes}, \
             vm-device {vmd_changes}"
        );
    }
}

fn commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("commit_move");
    g.measurement_time(Duration::from_secs(3)).sample_size(30);
    for n in [100usize, 1000, 10_000] {
        let (topo, spaces, regions) = ram_map(n).expect("map");
        let r = regions[n / 2].clone();
        let base = base_of(n / 2);
        for name in ["no_listener", "with_listener", "listener_without_nop"] {
            let listener: Option<Arc<dyn MemoryListener>> = match name {
                "with_listener" => Some(Arc::new(NopListener)),
                "listener_without_nop" => Some(Arc::new(DiffListener)),
                _ => None,
            };
            let _id = listener.map(|l| topo.listener_register(l, 0, Some(&spaces.memory)));
            g.bench_function(BenchmarkId::new(name, n), |b| {
                let mut k = 0u64;
                b.iter(|| {
                    k += 1;
                    r.set_address(base + (k % 2) * RANGE_LEN).expect("move")
                })
            });
            if let Some(Ok(id)) = _id {
                topo.listener_unregister(id).expect("unregister");
            }
        }
    }
    g.finish();
}

/// Devices of the machine-build benches.
const MACHINE_SIZES: [usize; 2] = [100, 1000];
/// A machine size whose trial build takes longer than this is not benched
/// (ten samples of it would not fit the suite's time).
const MACHINE_TRIAL_BUDGET: Duration = Duration::from_secs(10);

fn machine(c: &mut Criterion) {
    let mut g = c.benchmark_group("machine_build");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(5));
    for n in MACHINE_SIZES {
        let id = BenchmarkId::new("topos_devices", n);
        if !filter_selects(&format!("machine_build/topos_devices/{n}")) {
            continue;
        }
        let t = Instant::now();
        let trial = build_machine_within(n, Some(MACHINE_TRIAL_BUDGET)).expect("trial build");
        let (built, took) = (trial.bars.len(), t.elapsed());
        trial.teardown().expect("teardown");
        if built < n {
            eprintln!(
                "machine_build/topos_devices/{n}: SKIPPED: the trial build reached only {built} devices in {took:.1?} \
                 (budget {MACHINE_TRIAL_BUDGET:?}); see the scaling bench for one-shot build times"
            );
            continue;
        }
        eprintln!("machine_build/topos_devices/{n}: trial build {took:.1?}");
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let m = build_machine(n).expect("build");
                    total += t.elapsed();
                    black_box(m).teardown().expect("teardown");
                }
                total
            })
        });
    }
    g.finish();
}

fn harvest(c: &mut Criterion) {
    let topo = Topology::new();
    let ram = harvest_ram(&topo).expect("16 GiB RAM");
    let dirty = dirty_one_percent(&ram).expect("dirty");
    let (_, bits) = ram.snapshot_and_clear_dirty(0, HARVEST_RAM, DirtyClient::Migration).expect("harvest");
    assert_eq!(bits.iter().map(|w| w.count_ones() as u64).sum::<u64>(), dirty);

    let mut g = c.benchmark_group("dirty_harvest");
    g.measurement_time(Duration::from_secs(3)).sample_size(20);
    g.bench_function("topos_16GiB_1pct", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                dirty_one_percent(&ram).expect("dirty");
                let t = Instant::now();
                let r = ram.snapshot_and_clear_dirty(0, HARVEST_RAM, DirtyClient::Migration).expect("harvest");
                total += t.elapsed();
                drop(black_box(r));
            }
            total
        })
    });
    g.finish();
}

/// Whether criterion's command-line filter (if any) selects `id`: the machine
/// trial builds are costly, so they run only for benches that will run.
/// Understands the filters criterion takes that are used with this suite.
fn filter_selects(id: &str) -> bool {
    const TAKES_VALUE: [&str; 16] = [
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--color",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--profile-time",
        "--format",
        "--output-format",
        "--plotting-backend",
    ];
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if TAKES_VALUE.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            filters.push(a);
        }
    }
    // Criterion's filter is a regular expression; plain substrings, a leading
    // `^` and `|` alternatives cover how it is used here.
    let matches = |f: &str| match f.strip_prefix('^') {
        Some(prefix) => id.starts_with(prefix),
        None => id.contains(f),
    };
    filters.is_empty() || filters.iter().any(|f| f.split('|').any(matches))
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .without_plots()
}

fn main() {
    let mut c = config().configure_from_args();
    lookup(&mut c);
    ram(&mut c);
    ram_atomic(&mut c);
    mmio(&mut c);
    contended(&mut c);
    commit(&mut c);
    machine(&mut c);
    harvest(&mut c);
    c.final_summary();
}
