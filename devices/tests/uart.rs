//! The 16550A UART, register by register, driven through the I/O-port
//! address space as a guest would, with a `LevelRecorder` on its interrupt.
// Runs real threads and a tokio runtime: not a loom model.
#![cfg(not(topos_loom))]

mod support;

use proptest::prelude::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Board, WAIT};
use topos_devices::runtime::{AddressSpace, MemTxResult};
use topos_devices::uart::*;
use topos_devices::{ActorHandle, IrqLine, LevelRecorder, Plugged};

const BASE: u64 = COM1_BASE;
const IRQ: u32 = COM1_IRQ;

struct Rig {
    board: Board,
    irqs: Arc<LevelRecorder>,
    out: SerialBuffer,
    h: ActorHandle<Serial16550>,
    uart: Plugged<ActorHandle<Serial16550>>,
}

/// A UART at COM1 with deterministic interrupts (no character timeout).
fn rig() -> Rig {
    rig_with(SerialOptions { char_timeout: false, ..SerialOptions::default() })
}

/// A UART at COM1, plugged as the `pc` board does, writing to a buffer.
fn rig_with(options: SerialOptions) -> Rig {
    let board = Board::new();
    let irqs = LevelRecorder::new();
    let (sink, out) = SerialSink::buffer();
    let ctx = board.ctx("com1").with_irq(IrqLine::new(irqs.clone(), IRQ));
    let uart = board.plug_io::<Serial16550>(SerialConfig { sink, options }, ctx, PORTS, BASE);
    let h = uart.handle.clone();
    Rig { board, irqs, out, h, uart }
}

impl Rig {
    fn io(&self) -> &AddressSpace {
        self.board.io()
    }

    fn rd(&self, off: u64) -> u8 {
        let (v, r) = self.io().read_u64(BASE + off, 1);
        assert_eq!(r, MemTxResult::Ok);
        v as u8
    }

    fn wr(&self, off: u64, v: u8) {
        assert_eq!(self.io().write_u64(BASE + off, v as u64, 1), MemTxResult::Ok);
    }

    fn irq(&self) -> bool {
        self.irqs.level(IRQ)
    }

    fn input(&self, bytes: &[u8]) {
        Serial16550::send_input(&self.h, bytes).unwrap();
    }

    fn wire(&self, bytes: &[u8]) {
        let bytes = bytes.to_vec();
        self.h.with(move |d, ctx| d.receive(ctx, &bytes)).unwrap();
    }
}

#[test]
fn reset_state_matches_qemu() {
    let r = rig();
    assert_eq!(r.rd(reg::IER), 0);
    assert_eq!(r.rd(reg::IIR_FCR), IIR_NO_INT);
    assert_eq!(r.rd(reg::LCR), 0);
    assert_eq!(r.rd(reg::MCR), MCR_OUT2);
    assert_eq!(r.rd(reg::LSR), LSR_THRE | LSR_TEMT);
    assert_eq!(r.rd(reg::MSR), MSR_DCD | MSR_DSR | MSR_CTS);
    assert_eq!(r.rd(reg::SCR), 0);
    r.wr(reg::LCR, LCR_DLAB);
    assert_eq!((r.rd(0), r.rd(1)), (0x0c, 0x00), "9600 baud");
    assert!(!r.irq());
    // Ports past the UART are unassigned I/O (all-ones).
    assert_eq!(r.io().read_u64(BASE + 8, 1), (0xff, MemTxResult::Ok));
}

#[test]
fn divisor_latch_round_trip_behind_dlab() {
    let r = rig();
    r.wr(reg::IER, IER_ERBFI | IER_ELSI);
    r.wr(reg::LCR, LCR_DLAB | 0x03);
    r.wr(0, 0x34);
    r.wr(1, 0x12);
    assert_eq!((r.rd(0), r.rd(1)), (0x34, 0x12));
    assert_eq!(r.h.with(|d, _| d.registers().divisor).unwrap(), 0x1234);
    // DLAB hides RBR/THR and IER: nothing was transmitted, IER kept.
    assert!(r.out.is_empty());
    r.wr(reg::LCR, 0x03);
    assert_eq!(r.rd(reg::IER), IER_ERBFI | IER_ELSI);
    r.wr(reg::IER, 0);
    r.wr(reg::LCR, LCR_DLAB | 0x03);
    assert_eq!((r.rd(0), r.rd(1)), (0x34, 0x12), "IER writes without DLAB leave DLM alone");
    // A 2-byte access covers DLL and DLM (split into byte accesses).
    assert_eq!(r.io().write_u64(BASE, 0xbeef, 2), MemTxResult::Ok);
    assert_eq!(r.io().read_u64(BASE, 2), (0xbeef, MemTxResult::Ok));
    assert_eq!(r.rd(reg::LCR), LCR_DLAB | 0x03);
}

#[test]
fn lcr_scr_mcr_read_back() {
    let r = rig();
    for v in [0x00u8, 0x1b, 0x5a, 0x7f, 0xff] {
        r.wr(reg::LCR, v);
        assert_eq!(r.rd(reg::LCR), v);
        r.wr(reg::SCR, v ^ 0xa5);
        assert_eq!(r.rd(reg::SCR), v ^ 0xa5);
    }
    r.wr(reg::LCR, 0);
    r.wr(reg::MCR, 0xff);
    assert_eq!(r.rd(reg::MCR), 0x1f, "MCR keeps bits 4:0");
    r.wr(reg::MCR, MCR_OUT2 | MCR_RTS | MCR_DTR);
    assert_eq!(r.rd(reg::MCR), 0x0b);
    // LSR and MSR writes are ignored.
    r.wr(reg::LSR, 0xff);
    r.wr(reg::MSR, 0xff);
    assert_eq!(r.rd(reg::LSR), LSR_THRE | LSR_TEMT);
    // Leaving loopback with OUT1 set dropped the looped RI: TERI.
    assert_eq!(r.rd(reg::MSR), 0xb0 | MSR_TERI);
    // A 4-byte read from MCR covers MCR, LSR, MSR and SCR.
    r.wr(reg::SCR, 0x42);
    assert_eq!(r.io().read_u64(BASE + 4, 4), (0x42b0_600b, MemTxResult::Ok));
}

#[test]
fn thr_bytes_reach_the_sink_in_order_and_thre_temt_stay_set() {
    let r = rig();
    let text = b"Hello, 16550A!\r\n";
    for &b in text {
        r.wr(reg::RBR_THR, b);
        assert_eq!(r.rd(reg::LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
    }
    r.wr(reg::IIR_FCR, FCR_ENABLE | FCR_RX_RESET | FCR_TX_RESET);
    for &b in b"fifo" {
        r.wr(reg::RBR_THR, b);
    }
    assert_eq!(r.rd(reg::LSR), LSR_THRE | LSR_TEMT);
    assert_eq!(r.out.take(), b"Hello, 16550A!\r\nfifo");
    assert_eq!(r.h.with(|d, _| d.transmitted()).unwrap(), 20);
}

#[test]
fn injected_bytes_appear_in_rbr_with_dr_in_order() {
    let r = rig();
    // 16450 mode: one holding register, input waits behind it.
    r.input(b"hi");
    assert_eq!(r.rd(reg::LSR) & LSR_DR, LSR_DR);
    assert_eq!(r.rd(reg::RBR_THR), b'h');
    assert_eq!(r.rd(reg::LSR) & LSR_DR, LSR_DR);
    assert_eq!(r.rd(reg::RBR_THR), b'i');
    assert_eq!(r.rd(reg::LSR), LSR_THRE | LSR_TEMT);
    // FIFO mode: 16 bytes at a time, the rest queued; nothing lost.
    r.wr(reg::IIR_FCR, FCR_ENABLE);
    let data: Vec<u8> = (0..40u8).map(|i| b'A' + i).collect();
    r.input(&data);
    assert_eq!(r.h.with(|d, _| (d.registers().rx_len, d.queued_input())).unwrap(), (16, 24));
    let mut got = Vec::new();
    while r.rd(reg::LSR) & LSR_DR != 0 {
        got.push(r.rd(reg::RBR_THR));
    }
    assert_eq!(got, data);
    assert_eq!(r.rd(reg::LSR), LSR_THRE | LSR_TEMT, "flow-controlled input never overruns");
    // An empty FIFO reads 0.
    assert_eq!(r.rd(reg::RBR_THR), 0);
}

#[test]
fn overrun_when_the_rx_fifo_is_full() {
    let r = rig();
    r.wr(reg::IIR_FCR, FCR_ENABLE);
    let data: Vec<u8> = (1..=17u8).collect();
    r.wire(&data);
    assert_eq!(r.rd(reg::LSR), LSR_OE | LSR_DR | LSR_THRE | LSR_TEMT);
    assert_eq!(r.rd(reg::LSR), LSR_DR | LSR_THRE | LSR_TEMT, "reading LSR clears OE");
    let got: Vec<u8> = (0..16).map(|_| r.rd(reg::RBR_THR)).collect();
    assert_eq!(got, data[..16], "the 17th byte is lost, the FIFO kept");
    assert_eq!(r.rd(reg::LSR) & LSR_DR, 0);

    // 16450 mode: the new byte overwrites the unread one.
    r.wr(reg::IIR_FCR, 0);
    r.wire(b"xy");
    assert_eq!(r.rd(reg::LSR), LSR_OE | LSR_DR | LSR_THRE | LSR_TEMT);
    assert_eq!(r.rd(reg::RBR_THR), b'y');

    // Through loopback, from the guest alone.
    r.wr(reg::IIR_FCR, FCR_ENABLE);
    r.wr(reg::MCR, MCR_LOOP);
    for b in 0..17u8 {
        r.wr(reg::RBR_THR, b);
    }
    assert_eq!(r.rd(reg::LSR) & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
}

#[test]
fn rx_interrupt_raised_when_enabled_and_lowered_when_read() {
    let r = rig();
    r.input(b"a");
    assert!(!r.irq(), "IER.ERBFI clear");
    assert_eq!(r.rd(reg::IIR_FCR), IIR_NO_INT);
    r.wr(reg::IER, IER_ERBFI);
    assert!(r.irq(), "pending data raises the line once enabled");
    assert_eq!(r.rd(reg::IIR_FCR), IIR_RDI);
    assert_eq!(r.rd(reg::RBR_THR), b'a');
    assert!(!r.irq());
    assert_eq!(r.rd(reg::IIR_FCR), IIR_NO_INT);
    // Injecting input raises it.
    let edges = r.irqs.rising_edges();
    r.input(b"b");
    assert!(r.irq());
    assert_eq!(r.irqs.rising_edges(), edges + 1);
    assert_eq!(r.rd(reg::RBR_THR), b'b');
    assert!(!r.irq());
}

#[test]
fn out2_gates_the_interrupt_line() {
    let r = rig();
    r.wr(reg::MCR, MCR_DTR | MCR_RTS);
    r.wr(reg::IER, IER_ERBFI);
    r.input(b"q");
    assert_eq!(r.rd(reg::IIR_FCR), IIR_RDI, "pending in IIR");
    assert!(!r.irq(), "but OUT2 is clear");
    r.wr(reg::MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
    assert!(r.irq());
    r.wr(reg::MCR, 0);
    assert!(!r.irq());
}

#[test]
fn line_status_interrupt_has_priority_and_clears_on_lsr_read() {
    let r = rig();
    r.wr(reg::IER, IER_ERBFI | IER_ETBEI | IER_ELSI | IER_EDSSI);
    r.wire(b"12");
    assert_eq!(r.rd(reg::IIR_FCR), IIR_RLSI);
    assert!(r.irq());
    assert_eq!(r.rd(reg::LSR) & LSR_OE, LSR_OE);
    assert_eq!(r.rd(reg::IIR_FCR), IIR_RDI, "then the data");
    r.rd(reg::RBR_THR);
    assert_eq!(r.rd(reg::IIR_FCR), IIR_THRI, "then THR empty");
    assert_eq!(r.rd(reg::IIR_FCR), IIR_NO_INT, "cleared by the IIR read");
    assert!(!r.irq());
    // A break: NUL with BI.
    r.h.with(|d, ctx| d.receive_break(ctx)).unwrap();
    assert_eq!(r.rd(reg::IIR_FCR), IIR_RLSI);
    assert_eq!(r.rd(reg::LSR), LSR_BI | LSR_DR | LSR_THRE | LSR_TEMT);
    assert_eq!(r.rd(reg::RBR_THR), 0);
    // Modem status last.
    r.h.with(|d, ctx| d.set_modem_inputs(ctx, MSR_DSR | MSR_CTS)).unwrap();
    assert_eq!(r.rd(reg::IIR_FCR), IIR_MSI);
    assert_eq!(r.rd(reg::MSR), MSR_DSR | MSR_CTS | MSR_DDCD);
    assert_eq!(r.rd(reg::IIR_FCR), IIR_NO_INT);
    assert!(!r.irq());
}

#[test]
fn thre_interrupt_on_etbei_cleared_by_reading_iir() {
    let r = rig();
    r.wr(reg::IER, IER_ETBEI);
    assert!(r.irq(), "THR is empty: enabling ETBEI raises at once");
    assert_eq!(r.rd(reg::IIR_FCR), IIR_THRI);
    assert!(!r.irq(), "reading IIR while it reports THRE clears it");
    assert_eq!(r.rd(reg::IIR_FCR), IIR_NO_INT);
    let edges = r.irqs.rising_edges();
    r.wr(reg::RBR_THR, b'x');
    assert!(r.irq(), "the next byte leaves THR empty again");
    assert_eq!(r.irqs.rising_edges(), edges + 1);
    r.wr(reg::RBR_THR, b'y');
    assert_eq!(r.irqs.rising_edges(), edges + 2, "one edge per byte");
    r.wr(reg::IER, 0);
    assert!(!r.irq());
    r.wr(reg::IER, IER_ETBEI);
    assert!(r.irq(), "re-enabling resamples THRE");
    assert_eq!(r.out.take(), b"xy");
}

#[test]
fn fifo_enable_sets_iir_bits_and_trigger_levels_gate_rx_interrupts() {
    let r = rig();
    r.wr(reg::IIR_FCR, FCR_ENABLE);
    assert_eq!(r.rd(reg::IIR_FCR), IIR_FIFO_ENABLED | IIR_NO_INT);
    r.wr(reg::IER, IER_ERBFI);
    for (fcr, level) in [(0x00u8, 1usize), (0x40, 4), (0x80, 8), (0xc0, 14)] {
        r.wr(reg::IIR_FCR, fcr | FCR_ENABLE | FCR_RX_RESET);
        r.input(&vec![b'.'; level - 1]);
        assert!(!r.irq(), "below trigger level {level}");
        assert_eq!(r.rd(reg::IIR_FCR), 0xc1);
        r.input(b"!");
        assert!(r.irq(), "at trigger level {level}");
        assert_eq!(r.rd(reg::IIR_FCR), IIR_FIFO_ENABLED | IIR_RDI);
        r.rd(reg::RBR_THR);
        assert!(!r.irq(), "below the level again after one read");
        // The receive-FIFO reset empties it.
        r.wr(reg::IIR_FCR, fcr | FCR_ENABLE | FCR_RX_RESET);
        assert_eq!(r.rd(reg::LSR) & LSR_DR, 0);
    }
    // Disabling the FIFOs clears the bits and empties the FIFO.
    r.input(b"zz");
    r.wr(reg::IIR_FCR, 0);
    assert_eq!(r.rd(reg::IIR_FCR), IIR_NO_INT);
    assert_eq!(r.rd(reg::LSR) & LSR_DR, 0);
}

#[test]
fn loopback_returns_thr_bytes_and_loops_modem_lines() {
    let r = rig();
    assert_eq!(r.rd(reg::MSR), 0xb0);
    r.wr(reg::MCR, MCR_LOOP);
    // All outputs off: every input dropped.
    assert_eq!(r.rd(reg::MSR), MSR_DCTS | MSR_DDSR | MSR_DDCD);
    assert_eq!(r.rd(reg::MSR), 0x00, "deltas clear on read");
    r.wr(reg::IIR_FCR, FCR_ENABLE);
    for &b in b"loop" {
        r.wr(reg::RBR_THR, b);
    }
    let got: Vec<u8> = (0..4).map(|_| r.rd(reg::RBR_THR)).collect();
    assert_eq!(got, b"loop");
    assert!(r.out.is_empty(), "loopback output does not reach the line");
    // DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
    r.wr(reg::MCR, MCR_LOOP | MCR_DTR);
    assert_eq!(r.rd(reg::MSR), MSR_DSR | MSR_DDSR);
    r.wr(reg::MCR, MCR_LOOP | MCR_DTR | MCR_RTS);
    assert_eq!(r.rd(reg::MSR), MSR_DSR | MSR_CTS | MSR_DCTS);
    r.wr(reg::MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT1);
    assert_eq!(r.rd(reg::MSR), MSR_DSR | MSR_CTS | MSR_RI, "no TERI on a rising RI");
    r.wr(reg::MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT2);
    assert_eq!(r.rd(reg::MSR), MSR_DSR | MSR_CTS | MSR_DCD | MSR_TERI | MSR_DDCD);
    // The modem-status interrupt works in loopback (OUT2 is set).
    r.wr(reg::IER, IER_EDSSI);
    assert!(!r.irq());
    r.wr(reg::MCR, MCR_LOOP | MCR_OUT2);
    assert!(r.irq());
    assert_eq!(r.rd(reg::IIR_FCR), 0xc0 | IIR_MSI);
    assert_eq!(r.rd(reg::MSR), MSR_DCD | MSR_DCTS | MSR_DDSR);
    assert!(!r.irq());
    // Queued input waits while the receiver is disconnected.
    r.input(b"w");
    assert_eq!(r.rd(reg::LSR) & LSR_DR, 0);
    r.wr(reg::MCR, MCR_OUT2);
    assert_eq!(r.rd(reg::RBR_THR), b'w');
    assert_eq!(r.rd(reg::MSR), 0xb0 | MSR_DCTS | MSR_DDSR, "back to the external lines");
}

#[test]
fn character_timeout_interrupt_below_the_trigger_level() {
    let r = rig_with(SerialOptions::default());
    r.wr(reg::LCR, LCR_DLAB);
    r.wr(0, 1); // 115200 baud: four characters are ~350 µs
    r.wr(1, 0);
    r.wr(reg::LCR, 0x03);
    r.wr(reg::IIR_FCR, 0xc0 | FCR_ENABLE);
    r.wr(reg::IER, IER_ERBFI);
    r.input(b"ab");
    let start = Instant::now();
    while !r.irq() {
        assert!(start.elapsed() < WAIT, "no character timeout");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(r.rd(reg::IIR_FCR), IIR_FIFO_ENABLED | IIR_CTI);
    assert_eq!(r.rd(reg::RBR_THR), b'a');
    assert!(!r.irq(), "reading RBR clears the timeout");
    // One byte is left: it times out again.
    let start = Instant::now();
    while !r.irq() {
        assert!(start.elapsed() < WAIT, "no second character timeout");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(r.rd(reg::RBR_THR), b'b');
    assert!(!r.irq());
    assert_eq!(r.rd(reg::IIR_FCR), IIR_FIFO_ENABLED | IIR_NO_INT);
}

#[test]
fn unplugging_stops_the_actor() {
    let r = rig();
    r.board.spaces.io.del_subregion(r.uart.region(PORTS).unwrap()).unwrap();
    let Rig { h, uart, .. } = r;
    drop(uart);
    assert!(!h.is_alive());
}

// ----- property test ---------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Read { off: u64, size: u32 },
    Write { off: u64, size: u32, value: u64 },
    Input(Vec<u8>),
    Wire(Vec<u8>),
    Break,
    Modem(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![Just(1u32), Just(2), Just(4)];
    let value = prop_oneof![any::<u64>(), (0u64..0x20), Just(0x80u64), Just(0xffu64)];
    prop_oneof![
        6 => (0u64..10, size.clone()).prop_map(|(off, size)| Op::Read { off, size }),
        6 => (0u64..10, size, value).prop_map(|(off, size, value)| Op::Write { off, size, value }),
        1 => proptest::collection::vec(any::<u8>(), 0..24).prop_map(Op::Input),
        1 => proptest::collection::vec(any::<u8>(), 0..24).prop_map(Op::Wire),
        1 => Just(Op::Break),
        1 => any::<u8>().prop_map(Op::Modem),
    ]
}

/// What the registers without read side effects must hold, tracked byte by
/// byte from the guest's writes.
#[derive(Debug, Default)]
struct Shadow {
    lcr: u8,
    scr: u8,
    ier: u8,
    mcr: u8,
    divisor: u16,
}

/// The interrupt identification the datasheet's priorities give.
fn expected_id(s: &SerialRegisters) -> u8 {
    let fifo = s.fcr & FCR_ENABLE != 0;
    let level = [1, 4, 8, 14][(s.fcr >> 6) as usize];
    if s.ier & IER_ELSI != 0 && s.lsr & LSR_INT_ANY != 0 {
        IIR_RLSI
    } else if s.ier & IER_ERBFI != 0 && s.timeout_pending && s.rx_len > 0 {
        IIR_CTI
    } else if s.ier & IER_ERBFI != 0 && s.rx_len > 0 && (!fifo || s.rx_len >= level) {
        IIR_RDI
    } else if s.ier & IER_ETBEI != 0 && s.thr_pending {
        IIR_THRI
    } else if s.ier & IER_EDSSI != 0 && s.msr & MSR_ANY_DELTA != 0 {
        IIR_MSI
    } else {
        IIR_NO_INT
    }
}

fn check_invariants(r: &Rig, shadow: &Shadow) -> Result<(), TestCaseError> {
    prop_assert!(!r.h.is_failed());
    let (s, line) = r.h.with(|d, ctx| (d.registers(), ctx.irq(0).map(|l| l.level()))).unwrap();
    prop_assert_eq!(s.lsr & LSR_DR != 0, s.rx_len > 0, "DR iff the RX FIFO holds data: {:?}", s);
    prop_assert_eq!(s.lsr & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
    prop_assert_eq!(s.lsr & (0x80 | LSR_PE | LSR_FE), 0);
    prop_assert!(s.rx_len <= FIFO_LEN);
    if s.fcr & FCR_ENABLE == 0 {
        prop_assert!(s.rx_len <= 1, "one holding register in 16450 mode");
        prop_assert_eq!(s.fcr, 0);
    }
    prop_assert_eq!(s.iir & 0xc0, if s.fcr & FCR_ENABLE != 0 { 0xc0 } else { 0 });
    prop_assert_eq!(s.iir & 0x30, 0);
    let id = expected_id(&s);
    prop_assert_eq!(s.iir & 0x0f, id, "IIR priorities: {:?}", s);
    prop_assert_eq!(s.iir & 1 != 0, id == IIR_NO_INT, "IIR bit 0 set iff nothing is pending");
    let want = id != IIR_NO_INT && s.mcr & MCR_OUT2 != 0;
    prop_assert_eq!(line, Some(want), "line = pending && OUT2: {:?}", s);
    prop_assert_eq!(r.irq(), want, "the sink saw the same level");
    prop_assert_eq!(s.irq_level, want);
    if s.mcr & MCR_LOOP != 0 {
        let m = s.mcr;
        let looped = ((m & 0x0c) << 4) | ((m & 0x02) << 3) | ((m & 0x01) << 5);
        prop_assert_eq!(s.msr & 0xf0, looped, "MCR outputs loop to MSR inputs");
    }
    prop_assert_eq!(
        (s.lcr, s.scr, s.ier, s.mcr, s.divisor),
        (shadow.lcr, shadow.scr, shadow.ier, shadow.mcr, shadow.divisor)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_guest_accesses_never_break_the_uart(ops in proptest::collection::vec(op(), 1..64)) {
        let r = rig();
        let mut shadow = Shadow { mcr: MCR_OUT2, divisor: 0x0c, ..Shadow::default() };
        check_invariants(&r, &shadow)?;
        for op in ops {
            match op {
                Op::Read { off, size } => {
                    let (v, res) = r.io().read_u64(BASE + off, size);
                    prop_assert_eq!(res, MemTxResult::Ok);
                    // Byte k came from port BASE + off + k.
                    for k in 0..size as u64 {
                        let b = (v >> (8 * k)) as u8;
                        let dlab = shadow.lcr & LCR_DLAB != 0;
                        match off + k {
                            0 if dlab => prop_assert_eq!(b, shadow.divisor as u8),
                            1 if dlab => prop_assert_eq!(b, (shadow.divisor >> 8) as u8),
                            1 => prop_assert_eq!(b, shadow.ier),
                            3 => prop_assert_eq!(b, shadow.lcr),
                            4 => prop_assert_eq!(b, shadow.mcr),
                            7 => prop_assert_eq!(b, shadow.scr),
                            p if p >= 8 => prop_assert_eq!(b, 0xff, "unassigned port"),
                            _ => {}
                        }
                    }
                }
                Op::Write { off, size, value } => {
                    prop_assert_eq!(r.io().write_u64(BASE + off, value, size), MemTxResult::Ok);
                    for k in 0..size as u64 {
                        let b = (value >> (8 * k)) as u8;
                        let dlab = shadow.lcr & LCR_DLAB != 0;
                        match off + k {
                            0 if dlab => shadow.divisor = (shadow.divisor & 0xff00) | b as u16,
                            1 if dlab => shadow.divisor = (shadow.divisor & 0x00ff) | (b as u16) << 8,
                            1 => shadow.ier = b & 0x0f,
                            3 => shadow.lcr = b,
                            4 => shadow.mcr = b & 0x1f,
                            7 => shadow.scr = b,
                            _ => {}
                        }
                    }
                }
                Op::Input(bytes) => Serial16550::send_input(&r.h, bytes).unwrap(),
                Op::Wire(bytes) => r.wire(&bytes),
                Op::Break => r.h.with(|d, ctx| d.receive_break(ctx)).unwrap(),
                Op::Modem(lines) => r.h.with(move |d, ctx| d.set_modem_inputs(ctx, lines)).unwrap(),
            }
            check_invariants(&r, &shadow)?;
        }
    }
}

// ----- a guest flooding a slow sink ----------------------------------------

/// A sink that spends about 5 µs of work on each byte (a slow terminal),
/// keeping what it received.
struct SlowSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SlowSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(5) {
                std::hint::spin_loop();
            }
            self.0.lock().unwrap().push(b);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_guest_flooding_a_slow_uart_is_held_to_the_mailbox_bound_and_nobody_drains_for_it_beyond_the_budget() {
    use std::num::NonZeroUsize;
    use topos_devices::ActorOptions;
    const FLOOD: usize = 20_000;
    const OTHER: u8 = 0xff;
    let capacity = NonZeroUsize::new(32).unwrap();
    let budget = NonZeroUsize::new(8).unwrap();
    let board = Board::new();
    let spaces = &board.spaces;
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let config = SerialConfig {
        sink: SerialSink::Writer(Box::new(SlowSink(received.clone()))),
        options: SerialOptions { char_timeout: false, ..SerialOptions::default() },
    };
    let ctx = board.ctx("com1").with_actor_options(ActorOptions { capacity, budget });
    let h = board.plug_io::<Serial16550>(config, ctx, PORTS, BASE).handle;

    // Another thread holds the UART's turn (an embedder call, parked until
    // the gate opens) when a vCPU starts printing in a loop (bytes 0..=250
    // over and over): its writes back up behind the turn.
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let h = h.clone();
        std::thread::spawn(move || {
            h.with(move |_, _| {
                entered_tx.send(()).unwrap();
                let _ = gate_rx.recv();
            })
        })
    };
    entered_rx.recv_timeout(WAIT).unwrap();
    let flood = {
        let io = spaces.io_space.clone();
        std::thread::spawn(move || {
            for i in 0..FLOOD {
                assert_eq!(io.write_u64(BASE, (i % 251) as u64, 1), MemTxResult::Ok);
            }
        })
    };
    // Let the holder go once the mailbox is full: the flood must then wait
    // for room, and the holder must not drain the flood for it.
    let deadline = Instant::now() + WAIT;
    while h.stats().unwrap().queued < capacity.get() {
        assert!(Instant::now() < deadline, "the flood never filled the mailbox");
        std::thread::yield_now();
    }
    gate_tx.send(()).unwrap();
    holder.join().unwrap().unwrap();
    // Another vCPU writes one byte while the flood is under way.
    assert_eq!(spaces.io_space.write_u64(BASE, u64::from(OTHER), 1), MemTxResult::Ok);
    flood.join().unwrap();
    // Posted bytes still in the mailbox reach the sink too (bounded wait).
    let deadline = Instant::now() + WAIT;
    while received.lock().unwrap().len() < FLOOD + 1 {
        assert!(Instant::now() < deadline, "bytes were stranded in the mailbox");
        std::thread::yield_now();
    }

    let stats = h.stats().unwrap();
    assert!(stats.max_queued <= capacity.get(), "the mailbox grew to {} messages", stats.max_queued);
    assert!(
        stats.max_caller_drain <= budget.get(),
        "a vCPU handled {} messages for others in one turn",
        stats.max_caller_drain
    );
    assert!(stats.handoffs > 0, "the backlog never went to a drainer: the test did not flood");
    // Every byte, each vCPU's in its order.
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), FLOOD + 1);
    assert_eq!(got.iter().filter(|&&b| b == OTHER).count(), 1);
    let flood_bytes: Vec<u8> = got.into_iter().filter(|&b| b != OTHER).collect();
    assert!(flood_bytes.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "the flood's bytes are out of order");
    assert_eq!(h.with(|d, _| d.transmitted()).unwrap(), (FLOOD + 1) as u64);
}
