//! QEMU's edu device, driven as a guest driver drives it: configuration
//! cycles to find and enable it, MMIO through system memory, DMA into RAM
//! through its bus-master address space, interrupts on its INTx line.
//!
//! The device runtime here is a current-thread tokio runtime that only runs
//! when a test drives it, so the asynchronous factorial and DMA complete
//! exactly when a test lets time pass: "computing" is observed set for sure,
//! and waiting is polling with a bound, never a timed assertion.
// Runs real threads and a tokio runtime: not a loom model.
#![cfg(not(topos_loom))]

mod support;

use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use support::{within, Board};
use topos_devices::edu::{self, reg, Edu, EduOptions};
use topos_devices::pci::{PciHost, PciPlacement};
use topos_devices::runtime::{AddressSpace, MemTxResult, MemoryRegion, StandardSpaces};
use topos_devices::{ActorHandle, DeviceRuntime, IrqLine, LevelRecorder};

const SLOT: u8 = 4;
const IRQ: u32 = 10;
const BAR: u64 = 0xfe80_0000;

struct EduBoard {
    rt: tokio::runtime::Runtime,
    _board: Board,
    spaces: StandardSpaces,
    ram: MemoryRegion,
    host: PciHost,
    edu: ActorHandle<Edu>,
    irqs: Arc<LevelRecorder>,
}

fn edu_board(ram_size: u64) -> EduBoard {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let board = Board::with_runtime(DeviceRuntime::from_handle(rt.handle().clone()));
    let ram = board.add_ram(ram_size);
    let host = board.pci_host();
    let irqs = LevelRecorder::new();
    let options = EduOptions {
        factorial_delay: Duration::from_micros(50),
        dma_delay: Duration::from_micros(50),
        ..EduOptions::default()
    };
    let at = PciPlacement::slot(SLOT).with_intx(IrqLine::new(irqs.clone(), IRQ));
    let edu = host.plug_model::<Edu>(at, options, board.ctx("edu")).unwrap();
    let spaces = board.spaces.clone();
    let b = EduBoard { rt, _board: board, spaces, ram, host, edu, irqs };
    // What a firmware does: find the device, size and place BAR0, enable
    // memory decoding and bus mastering.
    assert_eq!(b.cfg_read(0x00), 0x11e8_1234);
    b.cfg_write(0x10, 0xffff_ffff);
    assert_eq!(b.cfg_read(0x10), 0xfff0_0000);
    b.cfg_write(0x10, BAR as u32);
    b.set_command(0x6);
    b
}

impl EduBoard {
    fn io(&self) -> &AddressSpace {
        &self.spaces.io_space
    }
    fn mem(&self) -> &AddressSpace {
        &self.spaces.memory
    }
    fn cfg_read(&self, reg: u8) -> u32 {
        assert!(self.io().write_u64(0xcf8, 0x8000_0000 | u64::from(SLOT) << 11 | u64::from(reg), 4).is_ok());
        self.io().read_u64(0xcfc, 4).0 as u32
    }
    fn cfg_write(&self, reg: u8, value: u32) {
        assert!(self.io().write_u64(0xcf8, 0x8000_0000 | u64::from(SLOT) << 11 | u64::from(reg), 4).is_ok());
        assert!(self.io().write_u64(0xcfc, u64::from(value), 4).is_ok());
    }
    fn set_command(&self, cmd: u16) {
        assert!(self.io().write_u64(0xcf8, 0x8000_0000 | u64::from(SLOT) << 11 | 0x04, 4).is_ok());
        assert!(self.io().write_u64(0xcfc, u64::from(cmd), 2).is_ok());
    }
    fn read(&self, off: u64, size: u32) -> (u64, MemTxResult) {
        self.mem().read_u64(BAR + off, size)
    }
    fn r32(&self, off: u64) -> u32 {
        let (v, r) = self.read(off, 4);
        assert_eq!(r, MemTxResult::Ok, "read at {off:#x}");
        v as u32
    }
    fn write(&self, off: u64, value: u64, size: u32) -> MemTxResult {
        self.mem().write_u64(BAR + off, value, size)
    }
    fn w32(&self, off: u64, value: u32) {
        assert_eq!(self.write(off, u64::from(value), 4), MemTxResult::Ok, "write at {off:#x}");
    }
    fn w64(&self, off: u64, value: u64) {
        assert_eq!(self.write(off, value, 8), MemTxResult::Ok, "write at {off:#x}");
    }
    /// Lets the device runtime run for a moment (timers fire in it).
    fn let_time_pass(&self) {
        self.rt.block_on(async { tokio::time::sleep(Duration::from_millis(2)).await });
    }
    /// Polls `cond` (a guest-visible condition), letting time pass between
    /// polls, up to a generous bound.
    fn poll_until(&self, what: &str, cond: impl Fn(&Self) -> bool) {
        for _ in 0..5000 {
            if cond(self) {
                return;
            }
            self.let_time_pass();
        }
        panic!("timed out waiting for {what}");
    }
    fn factorial(&self, n: u32) -> u32 {
        self.w32(reg::FACTORIAL, n);
        self.poll_until("the factorial", |b| b.r32(reg::STATUS) & edu::STATUS_COMPUTING == 0);
        self.r32(reg::FACTORIAL)
    }
    fn dma(&self, src: u64, dst: u64, count: u64, cmd: u64) {
        self.w64(reg::DMA_SRC, src);
        self.w64(reg::DMA_DST, dst);
        self.w64(reg::DMA_COUNT, count);
        self.w64(reg::DMA_CMD, cmd);
        self.poll_until("the DMA", |b| b.read(reg::DMA_CMD, 8).0 & edu::DMA_CMD_RUN == 0);
    }
    fn ram_write(&self, addr: u64, data: &[u8]) {
        assert_eq!(self.mem().write(addr, data), MemTxResult::Ok);
    }
    fn ram_read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        assert_eq!(self.mem().read(addr, &mut v), MemTxResult::Ok);
        v
    }
    fn healthy(&self) -> bool {
        !self.edu.is_failed() && !self.host.bridge().is_failed()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn identification_liveness_and_access_rules() {
    let b = edu_board(1 << 20);
    assert_eq!(b.r32(reg::ID), 0x0100_00ed);
    assert_eq!(b.r32(reg::LIVENESS), 0);
    b.w32(reg::LIVENESS, 0x1234_5678);
    assert_eq!(b.r32(reg::LIVENESS), 0xedcb_a987);
    b.w32(reg::LIVENESS, 0);
    assert_eq!(b.r32(reg::LIVENESS), 0xffff_ffff);
    // 1- and 2-byte accesses are invalid (QEMU: valid.min_access_size 4).
    assert_eq!(b.read(reg::ID, 1), (0, MemTxResult::DecodeError));
    assert_eq!(b.read(reg::ID, 2), (0, MemTxResult::DecodeError));
    assert_eq!(b.write(reg::LIVENESS, 5, 2), MemTxResult::DecodeError);
    assert_eq!(b.r32(reg::LIVENESS), 0xffff_ffff);
    // A misaligned 4-byte access is cut into invalid 2-byte pieces.
    assert_eq!(b.read(0x02, 4).1, MemTxResult::DecodeError);
    // 8-byte accesses below 0x80 read all-ones and are ignored.
    assert_eq!(b.read(reg::ID, 8), (u64::MAX, MemTxResult::Ok));
    assert_eq!(b.write(reg::LIVENESS, 0, 8), MemTxResult::Ok);
    assert_eq!(b.r32(reg::LIVENESS), 0xffff_ffff);
    // Unknown offsets, write-only registers, the upper half of a DMA
    // register and the DMA buffer (not MMIO-visible) read all-ones.
    for off in [0x10, 0x60, 0x64, 0x84, 0xa0, edu::DMA_BUF_ADDR, 0xffffc] {
        assert_eq!(b.r32(off), 0xffff_ffff, "offset {off:#x}");
    }
    // The identification is read-only.
    b.w32(reg::ID, 0);
    assert_eq!(b.r32(reg::ID), 0x0100_00ed);
    assert!(b.healthy());
}

#[test]
fn factorial_is_asynchronous_and_reports_computing() {
    let b = edu_board(1 << 20);
    b.w32(reg::FACTORIAL, 10);
    // Nothing has let time pass: the computation is certainly running.
    assert_eq!(b.r32(reg::STATUS), edu::STATUS_COMPUTING);
    assert_eq!(b.r32(reg::FACTORIAL), 10);
    // Writes while computing are ignored; the computing bit is read-only.
    b.w32(reg::FACTORIAL, 5);
    b.w32(reg::STATUS, 0);
    assert_eq!(b.r32(reg::STATUS), edu::STATUS_COMPUTING);
    b.poll_until("the factorial", |b| b.r32(reg::STATUS) & edu::STATUS_COMPUTING == 0);
    assert_eq!(b.r32(reg::FACTORIAL), 3_628_800);
    assert_eq!(b.r32(reg::STATUS), 0);
    // Without status bit 0x80, no interrupt.
    assert_eq!(b.r32(reg::IRQ_STATUS), 0);
    assert!(!b.irqs.level(IRQ));
    assert_eq!(b.irqs.rising_edges(), 0);
    // 32-bit arithmetic as QEMU's: 13! wraps, 34! and beyond are 0.
    assert_eq!(b.factorial(0), 1);
    assert_eq!(b.factorial(12), 479_001_600);
    assert_eq!(b.factorial(13), 1_932_053_504);
    assert_eq!(b.factorial(34), 0);
    assert_eq!(b.factorial(u32::MAX), 0);
    // An 8-byte write does not start a computation.
    assert_eq!(b.write(reg::FACTORIAL, 3, 8), MemTxResult::Ok);
    assert_eq!(b.r32(reg::STATUS), 0);
    assert_eq!(b.r32(reg::FACTORIAL), 0);
    assert!(b.healthy());
}

#[test]
fn factorial_raises_the_interrupt_when_asked_and_ack_clears_it() {
    let b = edu_board(1 << 20);
    b.w32(reg::STATUS, edu::STATUS_IRQFACT);
    assert_eq!(b.r32(reg::STATUS), edu::STATUS_IRQFACT);
    b.w32(reg::FACTORIAL, 5);
    assert_eq!(b.r32(reg::STATUS), edu::STATUS_IRQFACT | edu::STATUS_COMPUTING);
    assert!(!b.irqs.level(IRQ));
    // Wait for the interrupt, as a driver's ISR would.
    b.poll_until("the interrupt", |b| b.irqs.level(IRQ));
    assert_eq!(b.r32(reg::STATUS), edu::STATUS_IRQFACT);
    assert_eq!(b.r32(reg::IRQ_STATUS), edu::FACT_IRQ);
    assert_eq!(b.r32(reg::FACTORIAL), 120);
    // The PCI status register shows the pending INTx.
    assert_eq!(b.cfg_read(0x04) >> 16 & 0x8, 0x8);
    b.w32(reg::IRQ_ACK, edu::FACT_IRQ);
    assert!(!b.irqs.level(IRQ));
    assert_eq!(b.r32(reg::IRQ_STATUS), 0);
    assert_eq!(b.cfg_read(0x04) >> 16 & 0x8, 0);
    // Clearing 0x80 stops the interrupts.
    b.w32(reg::STATUS, 0);
    assert_eq!(b.factorial(4), 24);
    assert!(!b.irqs.level(IRQ));
    assert_eq!(b.irqs.rising_edges(), 1);
    assert!(b.healthy());
}

#[test]
fn interrupt_raise_and_acknowledge_registers() {
    let b = edu_board(1 << 20);
    b.w32(reg::IRQ_RAISE, 0x5);
    assert_eq!(b.r32(reg::IRQ_STATUS), 0x5);
    assert!(b.irqs.level(IRQ));
    b.w32(reg::IRQ_RAISE, 0x100);
    assert_eq!(b.r32(reg::IRQ_STATUS), 0x105);
    b.w32(reg::IRQ_ACK, 0x1);
    assert_eq!(b.r32(reg::IRQ_STATUS), 0x104);
    assert!(b.irqs.level(IRQ), "still pending");
    // The interrupt status register itself is read-only.
    b.w32(reg::IRQ_STATUS, 0);
    assert_eq!(b.r32(reg::IRQ_STATUS), 0x104);
    b.w32(reg::IRQ_ACK, 0xffff_ffff);
    assert_eq!(b.r32(reg::IRQ_STATUS), 0);
    assert!(!b.irqs.level(IRQ));
    // Raising 0 raises nothing.
    b.w32(reg::IRQ_RAISE, 0);
    assert!(!b.irqs.level(IRQ));
    assert_eq!(b.irqs.rising_edges(), 1);
    assert!(b.healthy());
}

#[test]
fn dma_round_trip_through_the_bus_master_space() {
    let b = edu_board(1 << 20);
    let data = pattern(256, 7);
    b.ram_write(0x10000, &data);
    // RAM → EDU (the spec's example), registers read back while running
    // and cannot be changed then.
    b.w64(reg::DMA_SRC, 0x10000);
    b.w64(reg::DMA_DST, edu::DMA_BUF_ADDR);
    b.w32(reg::DMA_COUNT, 256);
    b.w32(reg::DMA_CMD, 1);
    assert_eq!(b.read(reg::DMA_CMD, 8).0, 1);
    b.w64(reg::DMA_SRC, 0xdead_0000);
    b.w32(reg::DMA_COUNT, 1);
    assert_eq!(b.read(reg::DMA_SRC, 8), (0x10000, MemTxResult::Ok));
    assert_eq!(b.r32(reg::DMA_DST), edu::DMA_BUF_ADDR as u32);
    assert_eq!(b.r32(reg::DMA_COUNT), 256);
    b.poll_until("the DMA", |b| b.r32(reg::DMA_CMD) & 1 == 0);
    assert!(!b.irqs.level(IRQ));
    // EDU → RAM elsewhere, with the completion interrupt.
    b.dma(edu::DMA_BUF_ADDR, 0x20000, 256, edu::DMA_CMD_RUN | edu::DMA_CMD_TO_RAM | edu::DMA_CMD_IRQ);
    assert_eq!(b.ram_read(0x20000, 256), data);
    assert_eq!(b.read(reg::DMA_CMD, 8).0, edu::DMA_CMD_TO_RAM | edu::DMA_CMD_IRQ);
    assert_eq!(b.r32(reg::IRQ_STATUS), edu::DMA_IRQ);
    assert!(b.irqs.level(IRQ));
    b.w32(reg::IRQ_ACK, edu::DMA_IRQ);
    assert!(!b.irqs.level(IRQ));
    // Into the middle of the buffer and out again, up to its last byte.
    let tail = pattern(0x100, 99);
    b.ram_write(0x30000, &tail);
    b.dma(0x30000, edu::DMA_BUF_ADDR + 0xf00, 0x100, 1);
    b.dma(edu::DMA_BUF_ADDR + 0xf00, 0x31000, 0x100, 3);
    assert_eq!(b.ram_read(0x31000, 0x100), tail);
    // The earlier data is still at the start of the buffer.
    b.dma(edu::DMA_BUF_ADDR, 0x32000, 256, 3);
    assert_eq!(b.ram_read(0x32000, 256), data);
    // The whole 4 KiB buffer in one go.
    let full = pattern(edu::DMA_BUF_SIZE, 1);
    b.ram_write(0x40000, &full);
    b.dma(0x40000, edu::DMA_BUF_ADDR, edu::DMA_BUF_SIZE as u64, 1);
    b.dma(edu::DMA_BUF_ADDR, 0x50000, edu::DMA_BUF_SIZE as u64, 3);
    assert_eq!(b.ram_read(0x50000, edu::DMA_BUF_SIZE), full);
    assert!(b.healthy());
}

#[test]
fn dma_without_bus_mastering_leaves_ram_alone() {
    let b = edu_board(1 << 20);
    let data = pattern(128, 3);
    b.ram_write(0x10000, &data);
    b.dma(0x10000, edu::DMA_BUF_ADDR, 128, 1);
    // Bus mastering off (memory decoding stays on).
    b.set_command(0x2);
    b.ram_write(0x20000, &[0xee; 128]);
    b.dma(edu::DMA_BUF_ADDR, 0x20000, 128, 3 | edu::DMA_CMD_IRQ);
    assert_eq!(b.ram_read(0x20000, 128), vec![0xee; 128], "EDU→RAM reached RAM without bus mastering");
    // The transfer still completes (and interrupts), as on QEMU.
    assert_eq!(b.r32(reg::IRQ_STATUS), edu::DMA_IRQ);
    b.w32(reg::IRQ_ACK, edu::DMA_IRQ);
    // Back on: the buffer was intact.
    b.set_command(0x6);
    b.dma(edu::DMA_BUF_ADDR, 0x20000, 128, 3);
    assert_eq!(b.ram_read(0x20000, 128), data);
    // RAM→EDU without bus mastering reads unassigned memory: zeros, as on
    // QEMU.
    b.set_command(0x2);
    b.dma(0x10000, edu::DMA_BUF_ADDR, 128, 1);
    b.set_command(0x6);
    b.dma(edu::DMA_BUF_ADDR, 0x20000, 128, 3);
    assert_eq!(b.ram_read(0x20000, 128), vec![0; 128]);
    assert_eq!(b.ram_read(0x10000, 128), data);
    assert!(b.healthy());
}

#[test]
fn dma_guest_errors_are_bounded() {
    let b = edu_board(1 << 20);
    let data = pattern(64, 5);
    b.ram_write(0x1000, &data);
    b.dma(0x1000, edu::DMA_BUF_ADDR, 64, 1);
    b.ram_write(0x2000, &[0x11; 64]);
    // Transfers that do not fit in the buffer are skipped but complete.
    for (src, count) in [
        (edu::DMA_BUF_ADDR + 4000, 200),
        (edu::DMA_BUF_ADDR - 1, 64),
        (edu::DMA_BUF_ADDR, u64::MAX),
        (edu::DMA_BUF_ADDR, edu::DMA_BUF_SIZE as u64 + 1),
        (u64::MAX, 2),
        (0, 64),
    ] {
        b.dma(src, 0x2000, count, 3 | edu::DMA_CMD_IRQ);
        assert_eq!(b.r32(reg::IRQ_STATUS), edu::DMA_IRQ);
        b.w32(reg::IRQ_ACK, edu::DMA_IRQ);
        b.dma(0x1000, src, count, 1);
    }
    assert_eq!(b.ram_read(0x2000, 64), vec![0x11; 64]);
    // The buffer still holds the data.
    b.dma(edu::DMA_BUF_ADDR, 0x2000, 64, 3);
    assert_eq!(b.ram_read(0x2000, 64), data);
    // A zero-length transfer moves nothing but completes.
    b.dma(edu::DMA_BUF_ADDR, 0x3000, 0, 3 | edu::DMA_CMD_IRQ);
    assert_eq!(b.r32(reg::IRQ_STATUS), edu::DMA_IRQ);
    b.w32(reg::IRQ_ACK, edu::DMA_IRQ);
    // A command without the start bit is ignored.
    assert_eq!(b.read(reg::DMA_CMD, 8).0, edu::DMA_CMD_TO_RAM | edu::DMA_CMD_IRQ);
    b.w64(reg::DMA_CMD, 0);
    assert_eq!(b.read(reg::DMA_CMD, 8).0, edu::DMA_CMD_TO_RAM | edu::DMA_CMD_IRQ);
    // Guest addresses are masked to 28 bits (QEMU's default dma_mask).
    b.dma(edu::DMA_BUF_ADDR, 0x1000_4000, 64, 3);
    assert_eq!(b.ram_read(0x4000, 64), data);
    // To and from unassigned memory: writes vanish, reads give zeros.
    b.dma(edu::DMA_BUF_ADDR, 0x0ff0_0000, 64, 3);
    b.dma(0x0ff0_0000, edu::DMA_BUF_ADDR, 64, 1);
    b.dma(edu::DMA_BUF_ADDR, 0x5000, 64, 3);
    assert_eq!(b.ram_read(0x5000, 64), vec![0; 64]);
    assert!(b.healthy());
}

#[test]
fn dma_into_its_own_bar_reaches_its_registers_without_deadlock() {
    let b = edu_board(1 << 20);
    // Place BAR0 below 256 MiB so that the device can address itself.
    b.cfg_write(0x10, 0x0800_0000);
    let bar = 0x0800_0000u64;
    let mmio = |off: u64| b.mem().read_u64(bar + off, 4);
    assert_eq!(mmio(reg::ID), (u64::from(edu::EDU_ID), MemTxResult::Ok));
    b.ram_write(0x1000, &0x1234_5678u32.to_le_bytes());
    assert!(b.mem().write_u64(bar + reg::DMA_SRC, 0x1000, 8).is_ok());
    assert!(b.mem().write_u64(bar + reg::DMA_DST, edu::DMA_BUF_ADDR, 8).is_ok());
    assert!(b.mem().write_u64(bar + reg::DMA_COUNT, 4, 8).is_ok());
    assert!(b.mem().write_u64(bar + reg::DMA_CMD, 1, 8).is_ok());
    b.poll_until("the DMA", |_| mmio(reg::DMA_CMD).0 & 1 == 0);
    // Now EDU → its own liveness register.
    assert!(b.mem().write_u64(bar + reg::DMA_SRC, edu::DMA_BUF_ADDR, 8).is_ok());
    assert!(b.mem().write_u64(bar + reg::DMA_DST, bar + reg::LIVENESS, 8).is_ok());
    assert!(b.mem().write_u64(bar + reg::DMA_CMD, 3, 8).is_ok());
    b.poll_until("the DMA", |_| mmio(reg::DMA_CMD).0 & 1 == 0);
    // The transfer runs outside the device's turn, so it reaches the
    // device's own register as on QEMU (whose re-entrancy guard only stops
    // DMA issued from inside an MMIO handler, not from the DMA timer).
    assert_eq!(mmio(reg::LIVENESS).0, u64::from(!0x1234_5678u32));
    assert!(b.healthy());
}

// ----- property test: the edu against a model of QEMU's register file -----

const PROP_RAM: u64 = 0x10000;

/// A model of the edu as QEMU's `edu.c` behaves, plus the RAM it DMAs into.
#[derive(Debug, Clone)]
struct Model {
    liveness: u32,
    fact: u32,
    status: u32,
    irq: u32,
    src: u64,
    dst: u64,
    count: u64,
    cmd: u64,
    buf: Vec<u8>,
    ram: Vec<u8>,
    master: bool,
    fact_pending: bool,
    dma_pending: bool,
}

fn model_factorial(n: u32) -> u32 {
    let mut acc = 1u32;
    for k in 1..=n {
        acc = acc.wrapping_mul(k);
        if acc == 0 {
            break;
        }
    }
    acc
}

impl Model {
    fn new(ram: Vec<u8>) -> Model {
        Model {
            liveness: 0,
            fact: 0,
            status: 0,
            irq: 0,
            src: 0,
            dst: 0,
            count: 0,
            cmd: 0,
            buf: vec![0; 4096],
            ram,
            master: true,
            fact_pending: false,
            dma_pending: false,
        }
    }

    fn read(&self, off: u64, size: u32) -> (u64, MemTxResult) {
        if size < 4 {
            return (0, MemTxResult::DecodeError);
        }
        let v = if off < 0x80 && size != 4 {
            u64::MAX
        } else {
            match off {
                0x00 => 0x0100_00ed,
                0x04 => u64::from(self.liveness),
                0x08 => u64::from(self.fact),
                0x20 => u64::from(self.status),
                0x24 => u64::from(self.irq),
                0x80 => self.src,
                0x88 => self.dst,
                0x90 => self.count,
                0x98 => self.cmd,
                _ => u64::MAX,
            }
        };
        (if size == 8 { v } else { v & 0xffff_ffff }, MemTxResult::Ok)
    }

    fn write(&mut self, off: u64, value: u64, size: u32) -> MemTxResult {
        if size < 4 {
            return MemTxResult::DecodeError;
        }
        if off < 0x80 && size != 4 {
            return MemTxResult::Ok;
        }
        let running = self.cmd & 1 != 0;
        match off {
            0x04 => self.liveness = !(value as u32),
            0x08 if self.status & 1 == 0 => {
                self.fact = value as u32;
                self.status |= 1;
                self.fact_pending = true;
            }
            0x20 => self.status = (self.status & !0x80) | (value as u32 & 0x80),
            0x60 => self.irq |= value as u32,
            0x64 => self.irq &= !(value as u32),
            0x80 if !running => self.src = value,
            0x88 if !running => self.dst = value,
            0x90 if !running => self.count = value,
            0x98 if !running && value & 1 != 0 => {
                self.cmd = value;
                self.dma_pending = true;
            }
            _ => {}
        }
        MemTxResult::Ok
    }

    fn in_buf(start: u64, count: u64) -> Option<usize> {
        let end = start.checked_add(count)?;
        (start >= 0x40000 && end <= 0x41000).then(|| (start - 0x40000) as usize)
    }

    fn time_passes(&mut self) {
        if std::mem::take(&mut self.fact_pending) {
            self.fact = model_factorial(self.fact);
            self.status &= !1;
            if self.status & 0x80 != 0 {
                self.irq |= 1;
            }
        }
        if std::mem::take(&mut self.dma_pending) {
            let n = self.count as usize;
            if self.cmd & 2 == 0 {
                if let Some(o) = Model::in_buf(self.dst, self.count) {
                    let a = self.src & 0x0fff_ffff;
                    for i in 0..n {
                        let g = a + i as u64;
                        self.buf[o + i] = if self.master && g < PROP_RAM { self.ram[g as usize] } else { 0 };
                    }
                }
            } else if let Some(o) = Model::in_buf(self.src, self.count) {
                let a = self.dst & 0x0fff_ffff;
                for i in 0..n {
                    let g = a + i as u64;
                    if self.master && g < PROP_RAM {
                        self.ram[g as usize] = self.buf[o + i];
                    }
                }
            }
            self.cmd &= !1;
            if self.cmd & 4 != 0 {
                self.irq |= 0x100;
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Any read, including sizes the device refuses.
    Read {
        off: u64,
        size: u32,
    },
    /// Any write, including sizes the device refuses.
    Write {
        off: u64,
        size: u32,
        value: u64,
    },
    /// A well-formed write to a register, with a value that suits it.
    Reg {
        off: u64,
        value: u64,
        wide: bool,
    },
    /// A driver's DMA: source, destination, count, command.
    Dma {
        to_ram: bool,
        ram: u64,
        buf: u64,
        count: u64,
        irq: bool,
    },
    TimePasses,
    BusMaster(bool),
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => prop::sample::select(vec![0x00u64, 0x04, 0x08, 0x20, 0x24, 0x60, 0x64, 0x80, 0x84, 0x88, 0x90, 0x98, 0x9c]),
        1 => Just(edu::DMA_BUF_ADDR),
        1 => 0..(1u64 << 20),
    ]
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0..40u64,
        1 => Just(0x80u64),
        2 => prop::sample::select(vec![1u64, 3, 5, 7]),
        2 => 0..PROP_RAM,
        2 => 0x40000..0x41100u64,
        1 => (0..0x1000u64).prop_map(|c| c + 0x1000_0000),
        1 => any::<u64>(),
    ]
}

fn register_write() -> impl Strategy<Value = Op> {
    let any32 = any::<u32>().prop_map(u64::from);
    prop_oneof![
        2 => any32.clone().prop_map(|value| Op::Reg { off: reg::LIVENESS, value, wide: false }),
        2 => prop_oneof![4 => 0..20u64, 1 => any32.clone()].prop_map(|value| Op::Reg { off: reg::FACTORIAL, value, wide: false }),
        2 => prop_oneof![Just(0u64), Just(0x80), Just(0x81), any32.clone()]
            .prop_map(|value| Op::Reg { off: reg::STATUS, value, wide: false }),
        1 => any32.clone().prop_map(|value| Op::Reg { off: reg::IRQ_STATUS, value, wide: false }),
        2 => prop_oneof![Just(1u64), Just(0x100), Just(0x5), any32.clone()]
            .prop_map(|value| Op::Reg { off: reg::IRQ_RAISE, value, wide: false }),
        2 => prop_oneof![Just(1u64), Just(0x100), Just(0xffff_ffff), any32]
            .prop_map(|value| Op::Reg { off: reg::IRQ_ACK, value, wide: false }),
        3 => (prop::sample::select(vec![reg::DMA_SRC, reg::DMA_DST, reg::DMA_COUNT, reg::DMA_CMD]), value(), any::<bool>())
            .prop_map(|(off, value, wide)| Op::Reg { off, value, wide }),
    ]
}

fn dma() -> impl Strategy<Value = Op> {
    let ram = prop_oneof![
        6 => 0..PROP_RAM,
        1 => (0..PROP_RAM).prop_map(|a| a + 0x1000_0000),
        1 => (PROP_RAM - 0x100)..(PROP_RAM + 0x100),
        1 => any::<u64>(),
    ];
    let buf = prop_oneof![
        8 => (0..0x1000u64).prop_map(|o| o + edu::DMA_BUF_ADDR),
        1 => 0x3ff00..0x41100u64,
        1 => any::<u64>(),
    ];
    let count = prop_oneof![8 => 0..0x200u64, 1 => Just(0x1000u64), 1 => Just(0x1001u64), 1 => any::<u64>()];
    (any::<bool>(), ram, buf, count, any::<bool>()).prop_map(|(to_ram, ram, buf, count, irq)| Op::Dma {
        to_ram,
        ram,
        buf,
        count,
        irq,
    })
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop::sample::select(vec![1u32, 2, 4, 4, 4, 8, 8]);
    prop_oneof![
        2 => (offset(), size.clone()).prop_map(|(off, size)| Op::Read { off: off & !(u64::from(size) - 1), size }),
        3 => (offset(), size, value())
            .prop_map(|(off, size, value)| Op::Write { off: off & !(u64::from(size) - 1), size, value }),
        6 => register_write(),
        4 => dma(),
        4 => Just(Op::TimePasses),
        1 => any::<bool>().prop_map(Op::BusMaster),
    ]
}

/// Every readable register, as a driver would dump them.
const DUMP: [(u64, u32); 9] = [
    (reg::ID, 4),
    (reg::LIVENESS, 4),
    (reg::FACTORIAL, 4),
    (reg::STATUS, 4),
    (reg::IRQ_STATUS, 4),
    (reg::DMA_SRC, 8),
    (reg::DMA_DST, 8),
    (reg::DMA_COUNT, 8),
    (reg::DMA_CMD, 8),
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random MMIO sequences (with time passing and bus mastering toggled)
    /// never fail the device, every read matches the model of QEMU's edu,
    /// RAM holds exactly what the modelled DMAs put there, and the INTx line
    /// is asserted exactly while the interrupt status is non-zero.
    #[test]
    fn mmio_sequences_match_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let b = edu_board(PROP_RAM);
        let init = pattern(PROP_RAM as usize, 77);
        b.ram.ram().unwrap().write(0, &init).unwrap();
        let mut m = Model::new(init);
        for op in ops {
            match op {
                Op::Read { off, size } => {
                    prop_assert_eq!(b.read(off, size), m.read(off, size), "read {:#x} size {}", off, size);
                }
                Op::Write { off, size, value } => {
                    let value = if size == 8 { value } else { value & ((1 << (8 * size)) - 1) };
                    prop_assert_eq!(b.write(off, value, size), m.write(off, value, size));
                }
                Op::Reg { off, value, wide } => {
                    let (size, value) = if wide { (8, value) } else { (4, value & 0xffff_ffff) };
                    prop_assert_eq!(b.write(off, value, size), MemTxResult::Ok);
                    prop_assert_eq!(m.write(off, value, size), MemTxResult::Ok);
                }
                Op::Dma { to_ram, ram, buf, count, irq } => {
                    let (src, dst) = if to_ram { (buf, ram) } else { (ram, buf) };
                    let cmd = 1 | if to_ram { 2 } else { 0 } | if irq { 4 } else { 0 };
                    for (off, v) in [(reg::DMA_SRC, src), (reg::DMA_DST, dst), (reg::DMA_COUNT, count), (reg::DMA_CMD, cmd)] {
                        prop_assert_eq!(b.write(off, v, 8), MemTxResult::Ok);
                        prop_assert_eq!(m.write(off, v, 8), MemTxResult::Ok);
                    }
                }
                Op::TimePasses => {
                    // Let the pending completions happen, waiting on what the
                    // guest sees (a loaded machine may need more than one go).
                    b.let_time_pass();
                    if m.fact_pending {
                        b.poll_until("the factorial", |b| b.r32(reg::STATUS) & edu::STATUS_COMPUTING == 0);
                    }
                    if m.dma_pending {
                        b.poll_until("the DMA", |b| b.read(reg::DMA_CMD, 8).0 & edu::DMA_CMD_RUN == 0);
                    }
                    m.time_passes();
                    prop_assert_eq!(b.ram_read(0, PROP_RAM as usize), m.ram.clone());
                }
                Op::BusMaster(on) => {
                    b.set_command(if on { 0x6 } else { 0x2 });
                    m.master = on;
                }
            }
            prop_assert!(b.healthy());
            for (off, size) in DUMP {
                prop_assert_eq!(b.read(off, size), m.read(off, size), "register {:#x}", off);
            }
            prop_assert_eq!(b.irqs.level(IRQ), m.irq != 0);
            prop_assert_eq!(b.cfg_read(0x04) >> 16 & 0x8 != 0, m.irq != 0);
        }
    }
}

// ----- DMA between devices -------------------------------------------------

/// Counts its timer's ticks and re-arms it: a device whose only life is
/// the device runtime's timers.
struct Ticker(Arc<std::sync::atomic::AtomicU64>);

impl topos_devices::Device for Ticker {
    fn read(&mut self, _: &mut topos_devices::DeviceCtx<'_>, _: usize, _: u64, _: u32) -> u64 {
        0
    }
    fn write(&mut self, _: &mut topos_devices::DeviceCtx<'_>, _: usize, _: u64, _: u64, _: u32) {}
    fn timer(&mut self, ctx: &mut topos_devices::DeviceCtx<'_>, token: u64) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ctx.set_timer(Duration::from_micros(500), token);
    }
}

#[test]
fn two_edus_dma_from_each_others_registers_without_deadlock_and_timers_keep_firing() {
    use std::sync::atomic::{AtomicU64, Ordering};
    const BARS: [u64; 2] = [0x0800_0000, 0x0810_0000];
    const ROUNDS: usize = 200;
    within("two edus DMA-ing from each other", || {
        let board = Board::with_runtime(DeviceRuntime::new().unwrap());
        let (rt, spaces) = (&board.rt, &board.spaces);
        board.add_ram(1 << 20);
        let host = board.pci_host();
        let options = EduOptions { dma_delay: Duration::from_micros(10), ..EduOptions::default() };
        let edus: Vec<_> = [4u8, 5]
            .iter()
            .map(|&slot| host.plug_model::<Edu>(PciPlacement::slot(slot), options, board.ctx("edu")).unwrap())
            .collect();
        // The guest places both BARs below 256 MiB, where the other device's
        // DMA (28-bit addresses) reaches them, and enables them.
        for (slot, bar) in [(4u64, BARS[0]), (5, BARS[1])] {
            let io = &spaces.io_space;
            for (reg, value, size) in [(0x10u64, bar, 4u32), (0x04, 0x6, 2)] {
                assert!(io.write_u64(0xcf8, 0x8000_0000 | slot << 11 | reg, 4).is_ok());
                assert!(io.write_u64(0xcfc, value, size).is_ok());
            }
        }
        // A third device lives on its timer alone.
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = topos_devices::Spawned::new("ticker", Ticker(ticks.clone()), vec![], rt);
        ticker.handle().with(|_, ctx| ctx.set_timer(Duration::from_micros(500), 1)).unwrap();

        // Two vCPUs: each has its edu copy the other's identification
        // register into its buffer, over and over (each round into a slot of
        // its own), polling for the end.
        let vcpus: Vec<_> = (0..2)
            .map(|i| {
                let mem = spaces.memory.clone();
                let (own, other) = (BARS[i], BARS[1 - i]);
                std::thread::spawn(move || {
                    let w = |off: u64, v: u64| assert!(mem.write_u64(own + off, v, 8).is_ok());
                    let poll = || while mem.read_u64(own + reg::DMA_CMD, 8).0 & edu::DMA_CMD_RUN != 0 {};
                    for round in 0..ROUNDS as u64 {
                        w(reg::DMA_SRC, other + reg::ID);
                        w(reg::DMA_DST, edu::DMA_BUF_ADDR + 4 * round);
                        w(reg::DMA_COUNT, 4);
                        w(reg::DMA_CMD, edu::DMA_CMD_RUN);
                        poll();
                    }
                    // Out to RAM, to look at what every transfer read.
                    let out = 0x1000 * (i as u64 + 1);
                    w(reg::DMA_SRC, edu::DMA_BUF_ADDR);
                    w(reg::DMA_DST, out);
                    w(reg::DMA_COUNT, 4 * ROUNDS as u64);
                    w(reg::DMA_CMD, edu::DMA_CMD_RUN | edu::DMA_CMD_TO_RAM);
                    poll();
                    let mut got = vec![0u8; 4 * ROUNDS];
                    assert!(mem.read(out, &mut got).is_ok());
                    got
                })
            })
            .collect();
        for v in vcpus {
            let got = v.join().unwrap();
            for (round, id) in got.chunks(4).enumerate() {
                assert_eq!(id, edu::EDU_ID.to_le_bytes(), "round {round}: the DMA did not read the other edu's ID");
            }
        }
        // The device runtime still delivers timers.
        let t0 = ticks.load(Ordering::SeqCst);
        while ticks.load(Ordering::SeqCst) < t0 + 3 {
            std::thread::yield_now();
        }
        assert!(edus.iter().all(|e| !e.is_failed()));
        drop(ticker);
    });
}

#[test]
fn a_dma_that_commands_a_flash_does_not_deadlock_with_a_transaction_reading_the_edu() {
    use topos_devices::pflash::{PflashCfi01, PflashConfig, PflashImage, PflashMode};
    const FLASH: u64 = 0xfff0_0000;
    const EDU_BAR: u64 = 0xfe00_0000;
    within("edu DMA into a flash against an open transaction", || {
        let board = Board::with_runtime(DeviceRuntime::new().unwrap());
        let (topo, spaces) = (&board.topo, &board.spaces);
        board.add_ram(1 << 20);
        let config = PflashConfig { width: 1, block_size: 0x1000, num_blocks: 8, ..PflashConfig::default() };
        let image = PflashImage { config, content: vec![0xaa; 16] };
        let plugged = board.plug_mem::<PflashCfi01>(image, board.ctx("flash"), topos_devices::pflash::FLASH, FLASH);
        let (flash, flash_region) = (&plugged.handle, plugged.region(topos_devices::pflash::FLASH).unwrap());
        let host = board.pci_host();
        // QEMU's `dma_mask` property widened: the edu reaches the flash.
        let options = EduOptions { dma_delay: Duration::from_micros(10), dma_mask: u64::MAX, ..EduOptions::default() };
        let edu = host.plug_model::<Edu>(PciPlacement::slot(SLOT), options, board.ctx("edu")).unwrap();
        let io = &spaces.io_space;
        for (reg, value, size) in [(0x10u64, EDU_BAR, 4u32), (0x04, 0x6, 2)] {
            assert!(io.write_u64(0xcf8, 0x8000_0000 | u64::from(SLOT) << 11 | reg, 4).is_ok());
            assert!(io.write_u64(0xcfc, value, size).is_ok());
        }
        let mem = &spaces.memory;
        let w = |off: u64, v: u64| assert!(mem.write_u64(EDU_BAR + off, v, 8).is_ok());
        let running = || mem.read_u64(EDU_BAR + reg::DMA_CMD, 8).0 & edu::DMA_CMD_RUN != 0;
        // The flash command "read status register" into the edu's buffer.
        assert!(mem.write(0x1000, &[0x70]).is_ok());
        w(reg::DMA_SRC, 0x1000);
        w(reg::DMA_DST, edu::DMA_BUF_ADDR);
        w(reg::DMA_COUNT, 1);
        w(reg::DMA_CMD, edu::DMA_CMD_RUN);
        while running() {}
        assert!(flash_region.is_romd());

        // A transaction is open when the DMA writes the command: the flash's
        // switch out of romd mode must wait for it...
        topo.begin().unwrap();
        w(reg::DMA_SRC, edu::DMA_BUF_ADDR);
        w(reg::DMA_DST, FLASH);
        w(reg::DMA_CMD, edu::DMA_CMD_RUN | edu::DMA_CMD_TO_RAM);
        while flash.with(|d, _| d.mode()).unwrap() != PflashMode::ReadStatus {
            std::thread::yield_now();
        }
        // ...while the transaction reads the edu. Had the switch waited
        // inside the edu's turn, this read would wait for it forever.
        assert_eq!(mem.read_u64(EDU_BAR + reg::ID, 4), (u64::from(edu::EDU_ID), MemTxResult::Ok));
        topo.commit().unwrap();
        while running() {}
        // The switch happened: reads reach the device and answer its status.
        assert!(!flash_region.is_romd());
        assert_eq!(mem.read_u64(FLASH, 1), (0x80, MemTxResult::Ok));
        assert!(!edu.is_failed() && !flash.is_failed());
    });
}
