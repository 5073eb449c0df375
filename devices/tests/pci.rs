//! The PCI host bridge, driven as a guest drives it: configuration cycles
//! through ports 0xcf8/0xcfc, BAR accesses through system memory and the I/O
//! space, DMA through a function's bus-master address space.
// Runs real threads and a tokio runtime: not a loom model.
#![cfg(not(topos_loom))]

mod support;

use proptest::prelude::*;
use std::sync::Arc;
use support::{cfg_read_at, cfg_write_at, within};
use topos_devices::edu::{self, Edu, EduOptions};
use topos_devices::pci::{BarKind, BarSpec, BusMaster, PciConfig, PciHost, PciPlacement};
use topos_devices::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged};
use topos_devices::runtime::{AddressSpace, MemTxResult, OpsConfig, StandardSpaces, Topology};
use topos_devices::{ActorHandle, Device, DeviceCtx, DeviceRuntime, Error, IrqLine, LevelRecorder, Spawned};

const EDU_SLOT: u8 = 3;
const PROBE_SLOT: u8 = 7;
const EDU_IRQ: u32 = 11;
const RAM_SIZE: u64 = 16 << 20;

/// A function with an I/O BAR, a 32-bit and a 64-bit memory BAR; reads
/// return `0x1000 * (region + 1) + offset`.
struct Probe;

impl Device for Probe {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, region: usize, addr: u64, _size: u32) -> u64 {
        0x1000 * (region as u64 + 1) + addr
    }
    fn write(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: u64, _value: u64, _size: u32) {}
}

const PROBE_IO_SIZE: u64 = 0x20;
const PROBE_MEM32_SIZE: u64 = 0x1000;
const PROBE_MEM64_SIZE: u64 = 0x4000;

fn probe_config() -> PciConfig {
    let mut c = PciConfig::new(0x1b36, 0x00ee, 0x0580);
    c.revision = 2;
    c.bars = vec![
        BarSpec { index: 0, size: PROBE_IO_SIZE, kind: BarKind::Io },
        BarSpec { index: 1, size: PROBE_MEM32_SIZE, kind: BarKind::Memory32 { prefetchable: false } },
        BarSpec { index: 2, size: PROBE_MEM64_SIZE, kind: BarKind::Memory64 { prefetchable: true } },
    ];
    c
}

/// Plugging a probe: one region per `(size, is I/O)`, served by the
/// probe's region numbers in order.
impl DeviceModel for Probe {
    type Config = Vec<(u64, bool)>;
    type Handle = ActorHandle<Probe>;

    fn plug(regions: Vec<(u64, bool)>, ctx: PlugCtx) -> topos_devices::Result<Plugged<ActorHandle<Probe>>> {
        let s = Spawned::new(&ctx.name, Probe, ctx.irqs, &ctx.runtime);
        let regions = regions
            .iter()
            .enumerate()
            .map(|(i, &(size, io))| {
                let r = ctx.topology.new_io_arc(&ctx.name, s.ops(i), OpsConfig::default(), u128::from(size))?;
                Ok(if io { DeviceRegion::io("bar", r) } else { DeviceRegion::memory("bar", r) })
            })
            .collect::<topos_devices::Result<_>>()?;
        Ok(Plugged::new(regions, s.handle()))
    }
}

/// The probe's BAR regions: I/O, 32-bit memory, 64-bit memory.
fn probe_regions() -> Vec<(u64, bool)> {
    vec![(PROBE_IO_SIZE, true), (PROBE_MEM32_SIZE, false), (PROBE_MEM64_SIZE, false)]
}

struct Board {
    topo: Topology,
    spaces: StandardSpaces,
    host: PciHost,
    edu: ActorHandle<Edu>,
    probe: ActorHandle<Probe>,
    probe_bm: BusMaster,
    irqs: Arc<LevelRecorder>,
    board: support::Board,
}

/// RAM, a PCI host, an edu (INTA wired) and a probe, as a `pc` board plugs
/// them.
fn board() -> Board {
    let board = support::Board::with_runtime(DeviceRuntime::new().unwrap());
    board.add_ram(RAM_SIZE);
    let host = board.pci_host();
    let irqs = LevelRecorder::new();
    let at = PciPlacement::slot(EDU_SLOT).with_intx(IrqLine::new(irqs.clone(), EDU_IRQ));
    let edu = host.plug_model::<Edu>(at, EduOptions::default(), board.ctx("edu")).unwrap();
    let at = PciPlacement::slot(PROBE_SLOT).with_identity(probe_config());
    let probe = host.plug_model::<Probe>(at, probe_regions(), board.ctx("probe")).unwrap();
    let probe_bm = host.bus_master(PROBE_SLOT).unwrap();
    let (topo, spaces) = (board.topo.clone(), board.spaces.clone());
    Board { topo, spaces, host, edu, probe, probe_bm, irqs, board }
}

impl Board {
    fn io(&self) -> &AddressSpace {
        &self.spaces.io_space
    }
    fn mem(&self) -> &AddressSpace {
        &self.spaces.memory
    }
    fn cfg_read(&self, slot: u8, reg: u8, size: u32) -> u32 {
        cfg_read_at(self.io(), 0, slot, 0, reg, size)
    }
    fn cfg_write(&self, slot: u8, reg: u8, value: u32, size: u32) {
        cfg_write_at(self.io(), 0, slot, 0, reg, value, size)
    }
    fn edu_id_at(&self, a: u64) -> (u64, MemTxResult) {
        self.mem().read_u64(a, 4)
    }
    fn healthy(&self) -> bool {
        !self.edu.is_failed() && !self.probe.is_failed() && !self.host.bridge().is_failed()
    }
}

#[test]
fn enumeration_finds_the_functions_and_all_ones_elsewhere() {
    let b = board();
    for slot in 0..32u8 {
        let id = b.cfg_read(slot, 0, 4);
        match slot {
            EDU_SLOT => assert_eq!(id, 0x11e8_1234),
            PROBE_SLOT => assert_eq!(id, 0x00ee_1b36),
            _ => assert_eq!(id, 0xffff_ffff, "slot {slot}"),
        }
    }
    // The edu's class word, revision, header type, subsystem and pin.
    assert_eq!(b.cfg_read(EDU_SLOT, 0x08, 4), 0x00ff_0010);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x0a, 2), u32::from(edu::EDU_CLASS));
    assert_eq!(b.cfg_read(EDU_SLOT, 0x0e, 1), 0);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x2c, 4), 0x1100_1af4);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x3d, 1), 1);
    assert_eq!(b.cfg_read(PROBE_SLOT, 0x3d, 1), 0);
    // Other functions of the slot, other buses: all-ones at every size.
    for func in 1..8 {
        assert_eq!(cfg_read_at(b.io(), 0, EDU_SLOT, func, 0, 4), 0xffff_ffff);
    }
    assert_eq!(cfg_read_at(b.io(), 1, EDU_SLOT, 0, 0, 4), 0xffff_ffff);
    assert_eq!(cfg_read_at(b.io(), 0, 9, 0, 0x3d, 1), 0xff);
    assert_eq!(cfg_read_at(b.io(), 0, 9, 0, 0x02, 2), 0xffff);
    // Writes to an absent function go nowhere.
    cfg_write_at(b.io(), 0, 9, 0, 0x04, 0x7, 2);
    assert_eq!(cfg_read_at(b.io(), 0, 9, 0, 0x04, 2), 0xffff);
    assert!(b.healthy());
}

#[test]
fn config_address_and_data_follow_qemu() {
    let b = board();
    let io = b.io();
    // CONFIG_ADDRESS latches 4-byte writes and reads back.
    assert_eq!(io.write_u64(0xcf8, u64::from(support::cfg_addr(0, EDU_SLOT, 0, 0)), 4), MemTxResult::Ok);
    assert_eq!(io.read_u64(0xcf8, 4), (u64::from(support::cfg_addr(0, EDU_SLOT, 0, 0)), MemTxResult::Ok));
    // Narrow writes are ignored.
    assert_eq!(io.write_u64(0xcf8, 0, 2), MemTxResult::Ok);
    assert_eq!(io.write_u64(0xcfa, 0, 1), MemTxResult::Ok);
    assert_eq!(io.read_u64(0xcf8, 4).0, u64::from(support::cfg_addr(0, EDU_SLOT, 0, 0)));
    // Byte and word accesses at the data port offsets.
    assert_eq!(io.read_u64(0xcfc, 2).0, 0x1234);
    assert_eq!(io.read_u64(0xcfe, 2).0, 0x11e8);
    assert_eq!(io.read_u64(0xcfd, 1).0, 0x12);
    assert_eq!(io.read_u64(0xcff, 1).0, 0x11);
    // With the enable bit clear, data reads all-ones and writes are dropped.
    assert_eq!(
        io.write_u64(0xcf8, u64::from(support::cfg_addr(0, EDU_SLOT, 0, 0x3c) & 0x7fff_ffff), 4),
        MemTxResult::Ok
    );
    assert_eq!(io.read_u64(0xcfc, 4).0, 0xffff_ffff);
    assert_eq!(io.write_u64(0xcfc, 0x55, 1), MemTxResult::Ok);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x3c, 1), 0);

    // Read-only identification.
    b.cfg_write(EDU_SLOT, 0x00, 0, 4);
    b.cfg_write(EDU_SLOT, 0x08, 0, 4);
    b.cfg_write(EDU_SLOT, 0x2c, 0, 4);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x00, 4), 0x11e8_1234);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x08, 4), 0x00ff_0010);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x2c, 4), 0x1100_1af4);
    // Interrupt line and cache line size are read-write; pin, latency timer,
    // header type are not.
    b.cfg_write(EDU_SLOT, 0x3c, 0xffff_ff0b, 4);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x3c, 4), 0x0000_010b);
    b.cfg_write(EDU_SLOT, 0x0c, 0xffff_ffff, 4);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x0c, 4), 0x0000_00ff);
    // Command: only I/O, memory, bus master and INTx disable stick; the
    // status bits are clear.
    b.cfg_write(EDU_SLOT, 0x04, 0xffff_ffff, 4);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x04, 4), 0x0000_0407);
    b.cfg_write(EDU_SLOT, 0x04, 0, 2);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x04, 4), 0);
    // The device-specific area is plain read-write space, as in QEMU.
    b.cfg_write(EDU_SLOT, 0x80, 0xdead_beef, 4);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x80, 4), 0xdead_beef);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x82, 2), 0xdead);
    assert!(b.healthy());
}

#[test]
fn bar_sizing_reads_the_size_mask_with_the_type_bits() {
    let b = board();
    // edu: BAR0 is 1 MiB of 32-bit non-prefetchable memory; BARs 1-5 are
    // not implemented.
    assert_eq!(b.cfg_read(EDU_SLOT, 0x10, 4), 0);
    for bar in 0..6u8 {
        b.cfg_write(EDU_SLOT, 0x10 + 4 * bar, 0xffff_ffff, 4);
    }
    assert_eq!(b.cfg_read(EDU_SLOT, 0x10, 4), 0xfff0_0000);
    for bar in 1..6u8 {
        assert_eq!(b.cfg_read(EDU_SLOT, 0x10 + 4 * bar, 4), 0, "BAR {bar}");
    }
    // probe: I/O BAR (bit 0), 32-bit memory, 64-bit prefetchable (0xc).
    assert_eq!(b.cfg_read(PROBE_SLOT, 0x10, 4), 0x1);
    assert_eq!(b.cfg_read(PROBE_SLOT, 0x18, 4), 0xc);
    for bar in 0..6u8 {
        b.cfg_write(PROBE_SLOT, 0x10 + 4 * bar, 0xffff_ffff, 4);
    }
    assert_eq!(b.cfg_read(PROBE_SLOT, 0x10, 4), 0xffff_ffe1);
    assert_eq!(b.cfg_read(PROBE_SLOT, 0x14, 4), 0xffff_f000);
    assert_eq!(b.cfg_read(PROBE_SLOT, 0x18, 4), 0xffff_c00c);
    assert_eq!(b.cfg_read(PROBE_SLOT, 0x1c, 4), 0xffff_ffff);
    assert_eq!(b.cfg_read(PROBE_SLOT, 0x20, 4), 0);
    // Restoring 0 (as firmware does) leaves just the type bits.
    b.cfg_write(EDU_SLOT, 0x10, 0, 4);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x10, 4), 0);
    assert!(b.healthy());
}

const BAR_A: u64 = 0xfe00_0000;
const BAR_B: u64 = 0xfd10_0000;

#[test]
fn bar0_maps_the_edu_where_programmed_while_memory_is_enabled() {
    let b = board();
    b.cfg_write(EDU_SLOT, 0x10, BAR_A as u32, 4);
    // Programmed but memory decoding off: nothing there.
    assert_eq!(b.edu_id_at(BAR_A).1, MemTxResult::DecodeError);
    b.cfg_write(EDU_SLOT, 0x04, 0x2, 2);
    assert_eq!(b.edu_id_at(BAR_A), (u64::from(edu::EDU_ID), MemTxResult::Ok));
    assert_eq!(b.host.bridge().with(|d, _| d.bar_mapping(EDU_SLOT, 0)).unwrap(), Some(BAR_A));

    // Move: answers at the new address only.
    b.cfg_write(EDU_SLOT, 0x10, BAR_B as u32, 4);
    assert_eq!(b.edu_id_at(BAR_B), (u64::from(edu::EDU_ID), MemTxResult::Ok));
    assert_eq!(b.edu_id_at(BAR_A).1, MemTxResult::DecodeError);

    // Memory decoding off: unmapped.
    b.cfg_write(EDU_SLOT, 0x04, 0x0, 2);
    assert_eq!(b.edu_id_at(BAR_B).1, MemTxResult::DecodeError);
    b.cfg_write(EDU_SLOT, 0x04, 0x2, 2);
    assert_eq!(b.edu_id_at(BAR_B).0, u64::from(edu::EDU_ID));

    // The sizing pattern unmaps even with decoding on (QEMU treats it as
    // "not programmed"), and so does address 0.
    b.cfg_write(EDU_SLOT, 0x10, 0xffff_ffff, 4);
    assert_eq!(b.edu_id_at(BAR_B).1, MemTxResult::DecodeError);
    assert_eq!(b.edu_id_at(0xfff0_0000).1, MemTxResult::DecodeError);
    b.cfg_write(EDU_SLOT, 0x10, 0, 4);
    assert_eq!(b.host.bridge().with(|d, _| d.bar_mapping(EDU_SLOT, 0)).unwrap(), None);
    // RAM at 0 is untouched and still RAM.
    assert_eq!(b.mem().write_u64(0, 0x1234_5678, 4), MemTxResult::Ok);
    assert_eq!(b.mem().read_u64(0, 4), (0x1234_5678, MemTxResult::Ok));

    // Low bits of the address are ignored: they are below the size.
    b.cfg_write(EDU_SLOT, 0x10, (BAR_A | 0x1234) as u32, 4);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x10, 4), BAR_A as u32);
    assert_eq!(b.edu_id_at(BAR_A).0, u64::from(edu::EDU_ID));
    // Byte-wise programming (one byte per write) ends in the same place.
    b.cfg_write(EDU_SLOT, 0x13, (BAR_B >> 24) as u32, 1);
    b.cfg_write(EDU_SLOT, 0x12, ((BAR_B >> 16) & 0xff) as u32, 1);
    assert_eq!(b.edu_id_at(BAR_B).0, u64::from(edu::EDU_ID));
    assert_eq!(b.edu_id_at(BAR_A).1, MemTxResult::DecodeError);
    assert!(b.healthy());
}

#[test]
fn io_and_64_bit_bars_map_in_their_spaces_in_one_transaction() {
    let b = board();
    b.cfg_write(PROBE_SLOT, 0x10, 0xc000, 4);
    b.cfg_write(PROBE_SLOT, 0x14, 0xfebf_0000, 4);
    b.cfg_write(PROBE_SLOT, 0x18, 0x0000_0000, 4);
    b.cfg_write(PROBE_SLOT, 0x1c, 0x0000_0001, 4);
    assert_eq!(b.io().read_u64(0xc004, 2).0, 0xffff, "I/O decoding is off");
    let before = b.topo.generation();
    b.cfg_write(PROBE_SLOT, 0x04, 0x7, 2);
    assert_eq!(b.topo.generation(), before + 1, "three BARs and bus master in one commit");
    assert_eq!(b.io().read_u64(0xc004, 2), (0x1004, MemTxResult::Ok));
    assert_eq!(b.mem().read_u64(0xfebf_0010, 4), (0x2010, MemTxResult::Ok));
    assert_eq!(b.mem().read_u64(0x1_0000_0020, 4), (0x3020, MemTxResult::Ok));
    // I/O off, memory on.
    b.cfg_write(PROBE_SLOT, 0x04, 0x2, 2);
    assert_eq!(b.io().read_u64(0xc004, 2), (0xffff, MemTxResult::Ok));
    assert_eq!(b.mem().read_u64(0x1_0000_0020, 4).0, 0x3020);
    // Move the 64-bit BAR by its high dword only.
    b.cfg_write(PROBE_SLOT, 0x1c, 0x0000_0002, 4);
    assert_eq!(b.mem().read_u64(0x2_0000_0020, 4).0, 0x3020);
    assert_eq!(b.mem().read_u64(0x1_0000_0020, 4).1, MemTxResult::DecodeError);
    // Memory off: both memory BARs go.
    b.cfg_write(PROBE_SLOT, 0x04, 0x0, 2);
    assert_eq!(b.mem().read_u64(0x2_0000_0020, 4).1, MemTxResult::DecodeError);
    assert_eq!(b.mem().read_u64(0xfebf_0010, 4).1, MemTxResult::DecodeError);
    // A BAR placed over RAM stays hidden: the PCI container sits below RAM
    // in system memory.
    b.cfg_write(PROBE_SLOT, 0x14, 0x0010_0000, 4);
    b.cfg_write(PROBE_SLOT, 0x04, 0x2, 2);
    assert_eq!(b.mem().write_u64(0x10_0000, 0xabcd, 4), MemTxResult::Ok);
    assert_eq!(b.mem().read_u64(0x10_0000, 4).0, 0xabcd);
    assert!(b.healthy());
}

#[test]
fn bus_master_bit_gates_the_bus_master_space() {
    let b = board();
    assert_eq!(b.mem().write_u64(0x8000, 0x1122_3344_5566_7788, 8), MemTxResult::Ok);
    let mut buf = [0u8; 8];
    assert_eq!(b.probe_bm.read(0x8000, &mut buf), MemTxResult::DecodeError);
    assert_eq!(buf, [0; 8]);
    b.cfg_write(PROBE_SLOT, 0x04, 0x4, 2);
    assert_eq!(b.probe_bm.read(0x8000, &mut buf), MemTxResult::Ok);
    assert_eq!(u64::from_le_bytes(buf), 0x1122_3344_5566_7788);
    assert_eq!(b.probe_bm.write(0x8000, &[0xaa; 4]), MemTxResult::Ok);
    assert_eq!(b.mem().read_u64(0x8000, 4).0, 0xaaaa_aaaa);
    // Off again: writes go nowhere.
    b.cfg_write(PROBE_SLOT, 0x04, 0x0, 2);
    assert_eq!(b.probe_bm.write(0x8000, &[0x55; 4]), MemTxResult::DecodeError);
    assert_eq!(b.mem().read_u64(0x8000, 4).0, 0xaaaa_aaaa);
    // The bus-master space sees PCI memory too (peer-to-peer), as in QEMU.
    b.cfg_write(EDU_SLOT, 0x10, BAR_A as u32, 4);
    b.cfg_write(EDU_SLOT, 0x04, 0x2, 2);
    b.cfg_write(PROBE_SLOT, 0x04, 0x4, 2);
    let bm = b.probe_bm.address_space().unwrap();
    assert_eq!(bm.read_u64(BAR_A, 4), (u64::from(edu::EDU_ID), MemTxResult::Ok));
    assert!(b.healthy());
}

#[test]
fn intx_shows_in_status_and_is_masked_by_intx_disable() {
    let b = board();
    b.cfg_write(EDU_SLOT, 0x10, BAR_A as u32, 4);
    b.cfg_write(EDU_SLOT, 0x04, 0x2, 2);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x06, 2), 0);
    assert_eq!(b.mem().write_u64(BAR_A + edu::reg::IRQ_RAISE, 0x40, 4), MemTxResult::Ok);
    assert!(b.irqs.level(EDU_IRQ));
    assert_eq!(b.cfg_read(EDU_SLOT, 0x06, 2), 0x8);
    // INTx disable masks the line; the status bit still shows the request.
    b.cfg_write(EDU_SLOT, 0x04, 0x402, 2);
    assert!(!b.irqs.level(EDU_IRQ));
    assert_eq!(b.cfg_read(EDU_SLOT, 0x06, 2), 0x8);
    // Status bit 3 is read-only.
    b.cfg_write(EDU_SLOT, 0x06, 0xffff, 2);
    assert_eq!(b.cfg_read(EDU_SLOT, 0x06, 2), 0x8);
    b.cfg_write(EDU_SLOT, 0x04, 0x002, 2);
    assert!(b.irqs.level(EDU_IRQ));
    assert_eq!(b.irqs.rising_edges(), 2);
    assert_eq!(b.mem().write_u64(BAR_A + edu::reg::IRQ_ACK, 0x40, 4), MemTxResult::Ok);
    assert!(!b.irqs.level(EDU_IRQ));
    assert_eq!(b.cfg_read(EDU_SLOT, 0x06, 2), 0);
    assert!(b.healthy());
}

#[test]
fn detach_unmaps_stops_the_device_and_frees_the_slot() {
    let b = board();
    b.cfg_write(PROBE_SLOT, 0x14, 0xfebf_0000, 4);
    b.cfg_write(PROBE_SLOT, 0x04, 0x6, 2);
    assert_eq!(b.mem().read_u64(0xfebf_0000, 4).0, 0x2000);
    let spaces_before = b.topo.address_spaces().len();
    b.host.detach(PROBE_SLOT).unwrap();
    assert_eq!(b.mem().read_u64(0xfebf_0000, 4).1, MemTxResult::DecodeError);
    assert_eq!(b.cfg_read(PROBE_SLOT, 0, 4), 0xffff_ffff);
    assert_eq!(b.topo.address_spaces().len(), spaces_before - 1);
    assert!(!b.probe.is_alive());
    assert!(b.probe_bm.address_space().is_none());
    let mut buf = [1u8; 4];
    assert_eq!(b.probe_bm.read(0, &mut buf), MemTxResult::DecodeError);
    assert_eq!(buf, [0; 4]);
    assert!(matches!(b.host.detach(PROBE_SLOT), Err(Error::SlotEmpty(PROBE_SLOT))));
    // The edu too, mapped and bus-mastering (its bus-master space reaches
    // its own BAR through system memory: no cycle keeps it alive).
    b.cfg_write(EDU_SLOT, 0x10, BAR_A as u32, 4);
    b.cfg_write(EDU_SLOT, 0x04, 0x6, 2);
    assert_eq!(b.edu_id_at(BAR_A).0, u64::from(edu::EDU_ID));
    b.host.detach(EDU_SLOT).unwrap();
    assert_eq!(b.edu_id_at(BAR_A).1, MemTxResult::DecodeError);
    assert!(!b.edu.is_alive());
    // The slot can be reused.
    let at = PciPlacement::slot(PROBE_SLOT);
    b.host.plug_model::<Edu>(at, EduOptions::default(), b.board.ctx("edu2")).unwrap();
    assert_eq!(b.cfg_read(PROBE_SLOT, 0, 4), 0x11e8_1234);
}

#[test]
fn attach_rejects_what_cannot_be_a_function() {
    let b = board();
    let plug = |slot: u8| {
        let at = PciPlacement::slot(slot);
        b.host.plug_model::<Edu>(at, EduOptions::default(), b.board.ctx("x"))
    };
    assert!(matches!(plug(EDU_SLOT), Err(Error::SlotInUse(EDU_SLOT))));
    assert!(matches!(plug(32), Err(Error::NoSuchSlot(32))));
    // A model without a PCI identity needs one from the board.
    let at = PciPlacement::slot(12);
    let r = b.host.plug_model::<Probe>(at, probe_regions(), b.board.ctx("anonymous"));
    assert!(matches!(r, Err(Error::InvalidFunction(_))), "{r:?}");
    let spaces = b.topo.address_spaces().len();
    let bad = |bars: Vec<BarSpec>, sizes: &[u64]| {
        let mut config = PciConfig::new(1, 2, 3);
        config.bars = bars;
        let at = PciPlacement::slot(12).with_identity(config);
        let regions = sizes.iter().map(|&size| (size, false)).collect();
        b.host.plug_model::<Probe>(at, regions, b.board.ctx("bad"))
    };
    let mem = BarKind::Memory32 { prefetchable: false };
    let m64 = BarKind::Memory64 { prefetchable: false };
    for (bars, sizes) in [
        (vec![BarSpec { index: 0, size: 0x1800, kind: mem }], vec![0x1800]),
        (vec![BarSpec { index: 0, size: 8, kind: mem }], vec![8]),
        (vec![BarSpec { index: 0, size: 0x1000, kind: mem }], vec![0x2000]),
        (vec![BarSpec { index: 6, size: 0x1000, kind: mem }], vec![0x1000]),
        (vec![BarSpec { index: 5, size: 0x1000, kind: m64 }], vec![0x1000]),
        (
            vec![BarSpec { index: 0, size: 0x1000, kind: m64 }, BarSpec { index: 1, size: 0x1000, kind: mem }],
            vec![0x1000, 0x1000],
        ),
        (vec![BarSpec { index: 0, size: 0x1000, kind: mem }], vec![]),
    ] {
        assert!(matches!(bad(bars, &sizes), Err(Error::InvalidFunction(_))));
    }
    // Failed attaches released their bus-master spaces and the slot.
    assert_eq!(b.topo.address_spaces().len(), spaces);
    assert_eq!(b.cfg_read(12, 0, 4), 0xffff_ffff);
    assert!(bad(vec![], &[]).is_ok());
    assert_eq!(b.cfg_read(12, 0, 4), 0x0002_0001);
}

/// A reference model of the edu's configuration space, written from the PCI
/// specification and QEMU's masks, independent of the bridge.
#[derive(Debug, Clone)]
struct ConfigModel {
    bytes: [u8; 256],
    wmask: [u8; 256],
    config_reg: u32,
    irq_status: u32,
}

impl ConfigModel {
    fn edu() -> ConfigModel {
        let mut bytes = [0u8; 256];
        bytes[..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
        bytes[8..12].copy_from_slice(&0x00ff_0010u32.to_le_bytes());
        bytes[0x2c..0x30].copy_from_slice(&0x1100_1af4u32.to_le_bytes());
        bytes[0x3d] = 1;
        let mut wmask = [0u8; 256];
        wmask[4] = 0x07;
        wmask[5] = 0x04;
        wmask[0x0c] = 0xff;
        wmask[0x12] = 0xf0;
        wmask[0x13] = 0xff;
        wmask[0x3c] = 0xff;
        wmask[0x40..].fill(0xff);
        ConfigModel { bytes, wmask, config_reg: 0, irq_status: 0 }
    }

    fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[4], self.bytes[5]])
    }

    /// Where BAR0 should be mapped.
    fn bar0(&self) -> Option<u64> {
        let a = u64::from(u32::from_le_bytes(self.bytes[0x10..0x14].try_into().unwrap()) & 0xfff0_0000);
        let last = a + (1 << 20) - 1;
        (self.command() & 2 != 0 && a != 0 && last < 0xffff_ffff).then_some(a)
    }

    /// The function a data access selects, and the register.
    fn target(&self, off: u32) -> Option<(bool, usize)> {
        let a = self.config_reg | off;
        if self.config_reg & 0x8000_0000 == 0 {
            return None;
        }
        let present = (a >> 16) & 0xff == 0 && (a >> 8) & 0xff == u32::from(EDU_SLOT) << 3;
        Some((present, (a & 0xff) as usize))
    }

    fn byte(&self, i: usize) -> u8 {
        if i == 6 && self.irq_status != 0 {
            self.bytes[6] | 0x8
        } else {
            self.bytes[i]
        }
    }

    fn data_read(&self, off: u32, size: u32) -> u32 {
        let all_ones = (u64::from(u32::MAX) & ((1u64 << (8 * size)) - 1)) as u32;
        match self.target(off) {
            Some((true, r)) => {
                (0..(size as usize).min(256 - r)).fold(0, |v, i| v | u32::from(self.byte(r + i)) << (8 * i))
            }
            _ => all_ones,
        }
    }

    fn data_write(&mut self, off: u32, value: u32, size: u32) {
        if let Some((true, r)) = self.target(off) {
            for i in 0..(size as usize).min(256 - r) {
                let m = self.wmask[r + i];
                self.bytes[r + i] = (self.bytes[r + i] & !m) | ((value >> (8 * i)) as u8 & m);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A 4-byte write to CONFIG_ADDRESS (mostly well-formed).
    SetAddress(u32),
    /// A write of another size or offset to the CONFIG_ADDRESS port.
    OddAddressWrite {
        off: u64,
        size: u32,
        value: u32,
    },
    ReadAddress {
        off: u64,
        size: u32,
    },
    ReadData {
        off: u32,
        size: u32,
    },
    WriteData {
        off: u32,
        size: u32,
        value: u32,
    },
    /// Raise or acknowledge edu interrupts through BAR0 (if mapped).
    EduIrq {
        raise: bool,
        value: u32,
    },
}

fn sized() -> impl Strategy<Value = (u32, u32)> {
    prop_oneof![Just(1u32), Just(2), Just(4)].prop_flat_map(|size| (0..(4 / size)).prop_map(move |k| (k * size, size)))
}

fn op() -> impl Strategy<Value = Op> {
    let slot = prop_oneof![4 => Just(u32::from(EDU_SLOT)), 1 => 0..32u32];
    let reg = prop_oneof![
        3 => Just(0x04u32),
        3 => Just(0x10u32),
        1 => Just(0x3cu32),
        1 => Just(0x06u32),
        1 => Just(0x0cu32),
        2 => (0..64u32).prop_map(|r| r * 4),
    ];
    // Mostly function 0 of bus 0 with the enable bit; sometimes the low two
    // bits set (QEMU ORs the data port offset into them).
    let address = (
        slot,
        reg,
        prop_oneof![6 => Just(0u32), 1 => 1..8u32],
        prop_oneof![8 => Just(0u32), 1 => 0..4u32],
        prop_oneof![6 => Just(0u32), 1 => 1..4u32],
        prop::bool::weighted(0.9),
    )
        .prop_map(|(slot, reg, func, bus, low, enable)| {
            (if enable { 0x8000_0000 } else { 0 }) | bus << 16 | slot << 11 | func << 8 | reg | low
        });
    let value = prop_oneof![
        Just(0u32),
        Just(u32::MAX),
        Just(0x2u32),
        Just(0x6u32),
        Just(0x407u32),
        Just(0xfe00_0000u32),
        Just(0xfd10_0000u32),
        Just(0xfff0_0000u32),
        Just(0x0010_0000u32),
        any::<u32>(),
    ];
    prop_oneof![
        3 => address.prop_map(Op::SetAddress),
        1 => (0..4u64, prop_oneof![Just(1u32), Just(2)], any::<u32>())
            .prop_map(|(off, size, value)| Op::OddAddressWrite { off: off & !(u64::from(size) - 1), size, value }),
        1 => sized().prop_map(|(off, size)| Op::ReadAddress { off: u64::from(off), size }),
        3 => sized().prop_map(|(off, size)| Op::ReadData { off, size }),
        5 => (sized(), value).prop_map(|((off, size), value)| Op::WriteData { off, size, value }),
        1 => (any::<bool>(), prop_oneof![Just(1u32), Just(0x100), any::<u32>()])
            .prop_map(|(raise, value)| Op::EduIrq { raise, value }),
    ]
}

fn mask(size: u32) -> u64 {
    (1u64 << (8 * size)) - 1
}

/// Small boards: RAM, the bridge, the edu (no probe). Timers never fire: the
/// runtime is never driven.
struct SmallBoard {
    spaces: StandardSpaces,
    host: PciHost,
    edu: ActorHandle<Edu>,
    irqs: Arc<LevelRecorder>,
    bm: BusMaster,
    _board: support::Board,
    _rt: tokio::runtime::Runtime,
}

fn small_board() -> SmallBoard {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let board = support::Board::with_runtime(DeviceRuntime::from_handle(rt.handle().clone()));
    board.add_ram(0x10000);
    let host = board.pci_host();
    let irqs = LevelRecorder::new();
    let at = PciPlacement::slot(EDU_SLOT).with_intx(IrqLine::new(irqs.clone(), EDU_IRQ));
    let edu = host.plug_model::<Edu>(at, EduOptions::default(), board.ctx("edu")).unwrap();
    let bm = host.bus_master(EDU_SLOT).unwrap();
    SmallBoard { spaces: board.spaces.clone(), host, edu, irqs, bm, _board: board, _rt: rt }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random configuration cycles (and interrupt traffic) never fail a
    /// device; every read matches the model; BAR0 is mapped exactly where
    /// the model says (enable bit and a valid programmed address), and
    /// nowhere else it has been; the bus-master space is open exactly while
    /// the bus-master bit is set; INTx follows status and INTx disable.
    #[test]
    fn config_cycles_match_the_model(ops in prop::collection::vec(op(), 1..48)) {
        let b = small_board();
        let io = &b.spaces.io_space;
        let mem = &b.spaces.memory;
        let mut m = ConfigModel::edu();
        let mut seen: Vec<u64> = Vec::new();
        assert_eq!(mem.write_u64(0x100, 0x5a5a_5a5a, 4), MemTxResult::Ok);
        for op in ops {
            match op {
                Op::SetAddress(v) => {
                    prop_assert_eq!(io.write_u64(0xcf8, u64::from(v), 4), MemTxResult::Ok);
                    m.config_reg = v;
                }
                Op::OddAddressWrite { off, size, value } => {
                    prop_assert_eq!(io.write_u64(0xcf8 + off, u64::from(value), size), MemTxResult::Ok);
                }
                Op::ReadAddress { off, size } => {
                    prop_assert_eq!(io.read_u64(0xcf8 + off, size), (u64::from(m.config_reg) & mask(size), MemTxResult::Ok));
                }
                Op::ReadData { off, size } => {
                    let (v, r) = io.read_u64(0xcfc + u64::from(off), size);
                    prop_assert_eq!(r, MemTxResult::Ok);
                    prop_assert_eq!(v as u32, m.data_read(off, size), "read {:#x}+{} size {}", m.config_reg, off, size);
                }
                Op::WriteData { off, size, value } => {
                    let value = (u64::from(value) & mask(size)) as u32;
                    prop_assert_eq!(io.write_u64(0xcfc + u64::from(off), u64::from(value), size), MemTxResult::Ok);
                    m.data_write(off, value, size);
                }
                Op::EduIrq { raise, value } => {
                    if let Some(a) = m.bar0() {
                        let reg = if raise { edu::reg::IRQ_RAISE } else { edu::reg::IRQ_ACK };
                        prop_assert_eq!(mem.write_u64(a + reg, u64::from(value), 4), MemTxResult::Ok);
                        if raise { m.irq_status |= value } else { m.irq_status &= !value }
                    }
                }
            }
            prop_assert!(!b.edu.is_failed() && !b.host.bridge().is_failed());
            // BAR0 mapped iff memory enable && programmed address.
            let expected = m.bar0();
            if let Some(a) = expected {
                prop_assert_eq!(mem.read_u64(a, 4), (u64::from(edu::EDU_ID), MemTxResult::Ok));
                if !seen.contains(&a) {
                    seen.push(a);
                }
            }
            for &old in seen.iter().filter(|&&o| Some(o) != expected) {
                prop_assert_eq!(mem.read_u64(old, 4).1, MemTxResult::DecodeError, "stale mapping at {:#x}", old);
            }
            let mapping = b.host.bridge().with(|d, _| d.bar_mapping(EDU_SLOT, 0)).unwrap();
            prop_assert_eq!(mapping, expected);
            // Bus master.
            let mut buf = [0u8; 4];
            let r = b.bm.read(0x100, &mut buf);
            if m.command() & 4 != 0 {
                prop_assert_eq!((r, u32::from_le_bytes(buf)), (MemTxResult::Ok, 0x5a5a_5a5a));
            } else {
                prop_assert_eq!((r, buf), (MemTxResult::DecodeError, [0; 4]));
            }
            // INTx.
            prop_assert_eq!(b.irqs.level(EDU_IRQ), m.irq_status != 0 && m.command() & 0x400 == 0);
            // The whole configuration space, as an OS would dump it; then
            // CONFIG_ADDRESS as the sequence left it.
            for dw in 0..64u32 {
                prop_assert_eq!(io.write_u64(0xcf8, u64::from(0x8000_0000 | u32::from(EDU_SLOT) << 11 | (dw * 4)), 4), MemTxResult::Ok);
                let expected = (0..4).fold(0u32, |v, i| v | u32::from(m.byte(dw as usize * 4 + i)) << (8 * i));
                prop_assert_eq!(io.read_u64(0xcfc, 4), (u64::from(expected), MemTxResult::Ok), "dword {:#x}", dw * 4);
            }
            prop_assert_eq!(io.write_u64(0xcf8, u64::from(m.config_reg), 4), MemTxResult::Ok);
        }
    }
}

// ----- remaps outside the bridge's turn ------------------------------------

#[test]
fn a_bar_write_does_not_deadlock_with_a_transaction_that_reads_configuration() {
    let b = Arc::new(board());
    b.cfg_write(EDU_SLOT, 0x04, 0x2, 2);
    within("BAR write against an open transaction", move || {
        // A opens a transaction; B programs the BAR (memory decoding is on,
        // so the write remaps); A then reads configuration space until it
        // sees B's write, and only then commits.
        b.topo.begin().unwrap();
        let writer = {
            let io = b.io().clone();
            std::thread::spawn(move || cfg_write_at(&io, 0, EDU_SLOT, 0, 0x10, BAR_A as u32, 4))
        };
        while b.cfg_read(EDU_SLOT, 0x10, 4) != BAR_A as u32 {
            std::thread::yield_now();
        }
        b.topo.commit().unwrap();
        writer.join().unwrap();
        // The writer's write returned once its remap was done.
        assert_eq!(b.edu_id_at(BAR_A), (u64::from(edu::EDU_ID), MemTxResult::Ok));
        assert_eq!(b.host.bridge().with(|d, _| d.bar_mapping(EDU_SLOT, 0)).unwrap(), Some(BAR_A));
        assert!(b.healthy());
    });
}

#[test]
fn detach_does_not_deadlock_with_a_transaction_that_reads_configuration() {
    let b = Arc::new(board());
    b.cfg_write(PROBE_SLOT, 0x14, 0xfebf_0000, 4);
    b.cfg_write(PROBE_SLOT, 0x04, 0x6, 2);
    assert_eq!(b.mem().read_u64(0xfebf_0000, 4).0, 0x2000);
    within("detach against an open transaction", move || {
        b.topo.begin().unwrap();
        let detacher = {
            let b = b.clone();
            std::thread::spawn(move || b.host.detach(PROBE_SLOT))
        };
        // Configuration cycles stop reaching the function as soon as it is
        // off the bus, while its unmapping waits for this transaction.
        while b.cfg_read(PROBE_SLOT, 0, 4) != 0xffff_ffff {
            std::thread::yield_now();
        }
        b.topo.commit().unwrap();
        detacher.join().unwrap().unwrap();
        assert_eq!(b.mem().read_u64(0xfebf_0000, 4).1, MemTxResult::DecodeError);
        assert!(!b.probe.is_alive());
        assert!(b.probe_bm.address_space().is_none());
    });
}

#[test]
fn a_bar_write_that_finds_the_bridge_busy_has_taken_effect_when_it_returns() {
    let b = Arc::new(board());
    b.cfg_write(EDU_SLOT, 0x04, 0x2, 2);
    within("BAR write to a busy bridge", move || {
        // Another thread holds the bridge's turn until the gate opens.
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let bridge = b.host.bridge().clone();
            std::thread::spawn(move || {
                bridge.with(move |_, _| {
                    entered_tx.send(()).unwrap();
                    let _ = gate_rx.recv();
                })
            })
        };
        entered_rx.recv().unwrap();
        // A vCPU programs the BAR, then uses it at once.
        let (res_tx, res_rx) = std::sync::mpsc::channel();
        {
            let b = b.clone();
            std::thread::spawn(move || {
                b.cfg_write(EDU_SLOT, 0x10, BAR_A as u32, 4);
                res_tx.send(b.edu_id_at(BAR_A)).unwrap();
            });
        }
        // Let the bridge go once both of the vCPU's accesses (CONFIG_ADDRESS
        // and CONFIG_DATA) wait in its mailbox.
        loop {
            if let Ok(r) = res_rx.try_recv() {
                panic!("the configuration write returned before the bridge handled it; the BAR then read {r:?}");
            }
            if b.host.bridge().stats().unwrap().queued >= 2 {
                break;
            }
            std::thread::yield_now();
        }
        gate_tx.send(()).unwrap();
        assert_eq!(res_rx.recv().unwrap(), (u64::from(edu::EDU_ID), MemTxResult::Ok));
        holder.join().unwrap().unwrap();
        assert_eq!(b.host.bridge().with(|d, _| d.bar_mapping(EDU_SLOT, 0)).unwrap(), Some(BAR_A));
        assert!(b.healthy());
    });
}

// ----- any model as a PCI function -----------------------------------------

#[test]
fn the_framebuffer_and_the_doorbell_plug_as_pci_functions_with_a_board_given_identity() {
    use topos_devices::framebuffer::{FbConfig, FbMode, FbRegs, REG_VRAM_SIZE};
    use topos_devices::virtio_doorbell::{reg, DoorbellConfig, VirtioDoorbell, MAGIC};
    let b = board();
    // The framebuffer: BAR 0 is its video RAM (prefetchable), BAR 1 its
    // registers, in the model's order.
    let mode = FbMode { width: 64, height: 16, bytes_per_pixel: 4, stride: 256 };
    let at = PciPlacement::slot(9).with_identity(PciConfig::new(0x1234, 0x1111, 0x0380));
    let mut fb = b.host.plug_model::<FbRegs>(at, FbConfig { vram_size: 0x10000, mode }, b.board.ctx("fb")).unwrap();
    b.cfg_write(9, 0x10, 0xffff_ffff, 4);
    assert_eq!(b.cfg_read(9, 0x10, 4), 0xffff_0008, "64 KiB, prefetchable");
    b.cfg_write(9, 0x14, 0xffff_ffff, 4);
    assert_eq!(b.cfg_read(9, 0x14, 4), 0xffff_ffe0, "32 bytes of registers");
    b.cfg_write(9, 0x10, 0xe000_0000, 4);
    b.cfg_write(9, 0x14, 0xfebf_2000, 4);
    b.cfg_write(9, 0x04, 0x2, 2);
    assert_eq!(b.mem().read_u64(0xfebf_2000 + REG_VRAM_SIZE, 4), (0x10000, MemTxResult::Ok));
    fb.update().unwrap();
    assert_eq!(b.mem().write_u64(0xe000_0000 + 3 * 256, 0xffff_ffff, 4), MemTxResult::Ok);
    assert_eq!(fb.update().unwrap().dirty, vec![0..16], "one page of video RAM holds every scanline");
    // The doorbell: BAR 0 is its registers; its ioeventfds move with it.
    let at = PciPlacement::slot(10).with_identity(PciConfig::new(0x1b36, 0x00f0, 0x0880));
    let bell = b.host.plug_model::<VirtioDoorbell>(at, DoorbellConfig::default(), b.board.ctx("bell")).unwrap();
    b.cfg_write(10, 0x10, 0xfebf_3000, 4);
    b.cfg_write(10, 0x04, 0x2, 2);
    assert_eq!(b.mem().read_u64(0xfebf_3000 + reg::MAGIC_VALUE, 4), (u64::from(MAGIC), MemTxResult::Ok));
    assert_eq!(bell.notifiers().len(), 1);
    assert!(b.healthy() && !bell.handle().is_failed());
}

#[test]
fn a_multifunction_slot_shows_its_functions_and_header_type_bit_7() {
    let b = board();
    // A two-function device in slot 9, like the PIIX3 (ISA bridge + IDE).
    let mut f0 = PciConfig::new(0x8086, 0x7000, 0x0601);
    f0.multifunction = true;
    let f1 = PciConfig::new(0x8086, 0x7010, 0x0101);
    b.host.plug_model::<Probe>(PciPlacement::slot(9).with_identity(f0), vec![], b.board.ctx("f0")).unwrap();
    b.host.plug_model::<Probe>(PciPlacement::function(9, 1).with_identity(f1), vec![], b.board.ctx("f1")).unwrap();
    let io = b.io();
    assert_eq!(cfg_read_at(io, 0, 9, 0, 0, 4), 0x7000_8086);
    assert_eq!(cfg_read_at(io, 0, 9, 0, 0x0e, 1), 0x80, "function 0 says multi-function");
    assert_eq!(cfg_read_at(io, 0, 9, 1, 0, 4), 0x7010_8086);
    assert_eq!(cfg_read_at(io, 0, 9, 1, 0x0e, 1), 0x00);
    assert_eq!(cfg_read_at(io, 0, 9, 2, 0, 4), 0xffff_ffff, "an absent function");
    // Single-function slots keep bit 7 clear; a taken function is refused.
    assert_eq!(cfg_read_at(io, 0, EDU_SLOT, 0, 0x0e, 1), 0x00);
    let again = PciPlacement::function(9, 1).with_identity(PciConfig::new(1, 2, 3));
    assert!(b.host.plug_model::<Probe>(again, vec![], b.board.ctx("dup")).is_err());
}
