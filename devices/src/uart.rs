//! A 16550A UART (`Serial16550`), the PC's COM port, with the register
//! behaviour of the National Semiconductor datasheet and of QEMU's
//! `hw/char/serial.c`, so that a driver written against either behaves the
//! same here.
//!
//! Eight byte-wide registers, relative to the base port (`OpsConfig::with_impl(1, 1)`:
//! wider accesses are split into byte accesses at consecutive ports by the
//! memory core):
//!
//! | offset | DLAB = 0, read | DLAB = 0, write | DLAB = 1 |
//! | --- | --- | --- | --- |
//! | 0 | RBR receiver buffer | THR transmitter holding | DLL divisor low |
//! | 1 | IER interrupt enable | IER | DLM divisor high |
//! | 2 | IIR interrupt identification | FCR FIFO control | (same as DLAB = 0) |
//! | 3 | LCR line control | LCR | |
//! | 4 | MCR modem control | MCR | |
//! | 5 | LSR line status | (ignored) | |
//! | 6 | MSR modem status | (ignored) | |
//! | 7 | SCR scratch | SCR | |
//!
//! # Model
//!
//! * **Transmitter.** Infinitely fast, as in QEMU: a byte written to THR
//!   goes to the [`SerialSink`] at once, so LSR.THRE and LSR.TEMT always read
//!   set and the transmit FIFO never holds data (FCR's transmit-FIFO reset
//!   only re-arms the THR-empty interrupt). Each THR write clears and then
//!   re-arms the THR-empty interrupt, so with IER.ETBEI the line drops and
//!   rises again around every byte (an edge per byte for edge-triggered
//!   controllers). Sink write errors drop the byte (counted by
//!   [`Serial16550::sink_errors`]).
//! * **Receiver.** A 16-byte RX FIFO when FCR.0 is set, a single holding
//!   register otherwise. A byte arriving at a full FIFO is lost and sets
//!   LSR.OE; in 16450 mode (FIFO off) it overwrites the unread byte and sets
//!   LSR.OE. The "data available" interrupt fires when the FIFO holds at least
//!   the trigger level (FCR bits 7:6: 1, 4, 8 or 14 bytes; any byte with the
//!   FIFO off). The character-timeout interrupt (IIR `0x0C`) fires when the
//!   FIFO holds data and nothing was received or read for four character
//!   times at the programmed baud rate and frame format (wall-clock device
//!   timers; it can be turned off with [`SerialOptions::char_timeout`]).
//!   As in QEMU (and observed hardware), IER.ERBFI masks it.
//! * **Input.** Bytes come from the embedder, through the actor handle:
//!   [`Serial16550::queue_input`] (or [`Serial16550::send_input`]) queues
//!   them behind the receiver with flow control, as a QEMU character backend
//!   does: they enter the RX FIFO as room frees up, so they are never lost
//!   to an overrun. [`Serial16550::receive`] puts bytes "on the wire" now,
//!   without flow control (overruns happen). [`Serial16550::receive_break`]
//!   receives a break (a NUL byte with LSR.BI).
//! * **Loopback** (MCR bit 4). THR bytes are received by the receiver
//!   instead of reaching the sink (without flow control, so sending more
//!   than the FIFO holds overruns), queued input waits until loopback ends,
//!   and the modem control outputs drive the modem status inputs:
//!   DTR → DSR, RTS → CTS, OUT1 → RI, OUT2 → DCD. Changes of these inputs
//!   set MSR's delta bits (DCTS, DDSR, DDCD, and TERI on a falling RI) and
//!   can raise the modem-status interrupt, as the datasheet describes.
//!   Outside loopback the inputs are the lines set by
//!   [`Serial16550::set_modem_inputs`] (initially DCD, DSR and CTS asserted,
//!   as QEMU reports for a backend without modem lines).
//! * **Interrupts.** IIR reports the highest-priority pending source:
//!   receiver line status (OE/PE/FE/BI, IER.ELSI) > character timeout and
//!   received data available (IER.ERBFI) > THR empty (IER.ETBEI) > modem
//!   status (IER.EDSSI). Reading LSR clears the line status, reading RBR
//!   the data and timeout sources, reading IIR while it reports THR empty
//!   clears that source (as does a THR write), reading MSR the modem
//!   status. Enabling IER.ETBEI while THR is empty raises THR empty at
//!   once (QEMU and Windows' expectation). IIR bits 7:6 read `11` while the
//!   FIFOs are enabled.
//! * **Interrupt line and OUT2.** On a PC the UART's interrupt output
//!   reaches the PIC only through a buffer enabled by the MCR OUT2 output,
//!   and drivers (Linux's 8250, DOS, BIOSes) set OUT2 to get interrupts.
//!   This model does the same: `ctx.irq(0)` is high iff an interrupt is
//!   pending (IIR bit 0 clear) **and** MCR.OUT2 is set, including in
//!   loopback mode (where a real chip forces its OUT2 pin inactive; keeping
//!   the gate on the register bit lets loopback self-tests see their
//!   interrupts, as they do on QEMU). QEMU does not gate at all; to stay
//!   compatible with guests written for it, reset leaves MCR at `0x08`
//!   (OUT2 set), QEMU's reset value, rather than the datasheet's `0x00`: a
//!   guest that never writes MCR gets its interrupts, and one that clears
//!   OUT2 loses them as it would on a PC.
//! * **Not modelled:** parity/framing errors (PE and FE never set), LSR
//!   bit 7 (error in RX FIFO), DMA mode signalling (FCR.3 is stored only),
//!   break transmission (LCR.6 is stored only), baud-rate pacing of output.
//!
//! Guest accesses never panic: every register accepts every value.

#![forbid(unsafe_code)]

use crate::actor::{ActorError, ActorHandle, Device, DeviceCtx, Spawned};
use crate::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use topos_runtime::{HwAddr, OpsConfig};

/// Number of I/O ports of the UART.
pub const SERIAL_IO_SIZE: u64 = 8;
/// The role of the UART's one region: its 8 ports (map it in the I/O
/// space, at [`COM1_BASE`] for COM1).
pub const PORTS: &str = "ports";
/// Depth of the receive and transmit FIFOs.
pub const FIFO_LEN: usize = 16;
/// The usual baud base of a PC UART (1.8432 MHz crystal / 16).
pub const PC_BAUD_BASE: u32 = 115_200;
/// Base port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// Base port of COM2.
pub const COM2_BASE: u64 = 0x2f8;
/// IRQ of COM2.
pub const COM2_IRQ: u32 = 3;

/// Register offsets from the base port.
pub mod reg {
    /// Receiver buffer (read) / transmitter holding (write); DLL with DLAB.
    pub const RBR_THR: u64 = 0;
    /// Interrupt enable; DLM with DLAB.
    pub const IER: u64 = 1;
    /// Interrupt identification (read) / FIFO control (write).
    pub const IIR_FCR: u64 = 2;
    /// Line control.
    pub const LCR: u64 = 3;
    /// Modem control.
    pub const MCR: u64 = 4;
    /// Line status.
    pub const LSR: u64 = 5;
    /// Modem status.
    pub const MSR: u64 = 6;
    /// Scratch.
    pub const SCR: u64 = 7;
}

/// IER: received data available (and character timeout).
pub const IER_ERBFI: u8 = 0x01;
/// IER: transmitter holding register empty.
pub const IER_ETBEI: u8 = 0x02;
/// IER: receiver line status.
pub const IER_ELSI: u8 = 0x04;
/// IER: modem status.
pub const IER_EDSSI: u8 = 0x08;

/// IIR: no interrupt pending.
pub const IIR_NO_INT: u8 = 0x01;
/// IIR identification: modem status.
pub const IIR_MSI: u8 = 0x00;
/// IIR identification: THR empty.
pub const IIR_THRI: u8 = 0x02;
/// IIR identification: received data available.
pub const IIR_RDI: u8 = 0x04;
/// IIR identification: receiver line status.
pub const IIR_RLSI: u8 = 0x06;
/// IIR identification: character timeout.
pub const IIR_CTI: u8 = 0x0c;
/// IIR bits 7:6 while the FIFOs are enabled.
pub const IIR_FIFO_ENABLED: u8 = 0xc0;

/// FCR: enable the FIFOs.
pub const FCR_ENABLE: u8 = 0x01;
/// FCR: reset the receive FIFO.
pub const FCR_RX_RESET: u8 = 0x02;
/// FCR: reset the transmit FIFO.
pub const FCR_TX_RESET: u8 = 0x04;
/// FCR: DMA mode select (stored only).
pub const FCR_DMA_MODE: u8 = 0x08;
/// FCR: receive trigger level field (bits 7:6).
pub const FCR_TRIGGER_MASK: u8 = 0xc0;

/// LCR: divisor latch access bit.
pub const LCR_DLAB: u8 = 0x80;
/// LCR: set break (stored only).
pub const LCR_BREAK: u8 = 0x40;

/// MCR: data terminal ready.
pub const MCR_DTR: u8 = 0x01;
/// MCR: request to send.
pub const MCR_RTS: u8 = 0x02;
/// MCR: OUT1.
pub const MCR_OUT1: u8 = 0x04;
/// MCR: OUT2 (gates the interrupt line on a PC).
pub const MCR_OUT2: u8 = 0x08;
/// MCR: loopback.
pub const MCR_LOOP: u8 = 0x10;

/// LSR: data ready.
pub const LSR_DR: u8 = 0x01;
/// LSR: overrun error.
pub const LSR_OE: u8 = 0x02;
/// LSR: parity error (never set by this model).
pub const LSR_PE: u8 = 0x04;
/// LSR: framing error (never set by this model).
pub const LSR_FE: u8 = 0x08;
/// LSR: break interrupt.
pub const LSR_BI: u8 = 0x10;
/// LSR: transmitter holding register empty.
pub const LSR_THRE: u8 = 0x20;
/// LSR: transmitter empty.
pub const LSR_TEMT: u8 = 0x40;
/// LSR bits that raise the receiver line status interrupt.
pub const LSR_INT_ANY: u8 = LSR_OE | LSR_PE | LSR_FE | LSR_BI;

/// MSR: delta CTS.
pub const MSR_DCTS: u8 = 0x01;
/// MSR: delta DSR.
pub const MSR_DDSR: u8 = 0x02;
/// MSR: trailing edge of RI.
pub const MSR_TERI: u8 = 0x04;
/// MSR: delta DCD.
pub const MSR_DDCD: u8 = 0x08;
/// MSR: all delta bits.
pub const MSR_ANY_DELTA: u8 = 0x0f;
/// MSR: clear to send.
pub const MSR_CTS: u8 = 0x10;
/// MSR: data set ready.
pub const MSR_DSR: u8 = 0x20;
/// MSR: ring indicator.
pub const MSR_RI: u8 = 0x40;
/// MSR: data carrier detect.
pub const MSR_DCD: u8 = 0x80;

/// A shared in-memory byte buffer receiving a UART's output; clone it,
/// give one clone to [`SerialSink::Buffer`] and read the other back.
#[derive(Debug, Clone, Default)]
pub struct SerialBuffer(Arc<Mutex<Vec<u8>>>);

impl SerialBuffer {
    /// An empty buffer.
    pub fn new() -> SerialBuffer {
        SerialBuffer::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Takes everything written so far, leaving the buffer empty.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.lock())
    }

    /// Number of bytes held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no byte is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The contents as text (invalid UTF-8 replaced).
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    fn push(&self, byte: u8) {
        self.lock().push(byte);
    }
}

/// Where transmitted bytes go.
pub enum SerialSink {
    /// Discarded.
    Null,
    /// The process's standard output, flushed after every byte so that
    /// prompts appear at once.
    Stdout,
    /// A file (unbuffered: every byte is a write, so nothing is lost if the
    /// process dies).
    File(std::fs::File),
    /// An in-memory buffer the embedder can read back.
    Buffer(SerialBuffer),
    /// Any writer, flushed when the device is unplugged.
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for SerialSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialSink::Null => f.write_str("Null"),
            SerialSink::Stdout => f.write_str("Stdout"),
            SerialSink::File(file) => f.debug_tuple("File").field(file).finish(),
            SerialSink::Buffer(b) => f.debug_tuple("Buffer").field(&b.len()).finish(),
            SerialSink::Writer(_) => f.write_str("Writer(..)"),
        }
    }
}

impl SerialSink {
    /// A sink writing to a new file at `path` (truncated if it exists).
    pub fn create_file(path: impl AsRef<std::path::Path>) -> std::io::Result<SerialSink> {
        Ok(SerialSink::File(std::fs::File::create(path)?))
    }

    /// A new in-memory sink and the buffer to read it back.
    pub fn buffer() -> (SerialSink, SerialBuffer) {
        let b = SerialBuffer::new();
        (SerialSink::Buffer(b.clone()), b)
    }

    fn write_byte(&mut self, byte: u8) -> std::io::Result<()> {
        match self {
            SerialSink::Null => Ok(()),
            SerialSink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&[byte])?;
                out.flush()
            }
            SerialSink::File(file) => file.write_all(&[byte]),
            SerialSink::Buffer(b) => {
                b.push(byte);
                Ok(())
            }
            SerialSink::Writer(w) => w.write_all(&[byte]),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SerialSink::Null | SerialSink::Buffer(_) => Ok(()),
            SerialSink::Stdout => std::io::stdout().flush(),
            SerialSink::File(file) => file.flush(),
            SerialSink::Writer(w) => w.flush(),
        }
    }
}

/// Tunables of a UART instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialOptions {
    /// Input clock divided by 16: the baud rate for a divisor of 1. Only
    /// used to time the character-timeout interrupt.
    pub baud_base: u32,
    /// Emulate the character-timeout interrupt with device timers (wall
    /// clock). Without it, bytes below the FIFO trigger level raise no
    /// interrupt until more arrive.
    pub char_timeout: bool,
}

impl Default for SerialOptions {
    fn default() -> Self {
        SerialOptions { baud_base: PC_BAUD_BASE, char_timeout: true }
    }
}

/// The guest-visible registers of a UART, read without side effects
/// (see [`Serial16550::registers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialRegisters {
    /// Divisor latch (DLM:DLL).
    pub divisor: u16,
    /// Interrupt enable register.
    pub ier: u8,
    /// What a read of IIR would return now.
    pub iir: u8,
    /// The stored FIFO control bits (enable, DMA mode, trigger level).
    pub fcr: u8,
    /// Line control register.
    pub lcr: u8,
    /// Modem control register.
    pub mcr: u8,
    /// Line status register.
    pub lsr: u8,
    /// Modem status register.
    pub msr: u8,
    /// Scratch register.
    pub scr: u8,
    /// Bytes in the receive FIFO (at most 1 with the FIFOs off).
    pub rx_len: usize,
    /// The THR-empty interrupt source is armed.
    pub thr_pending: bool,
    /// The character-timeout interrupt source is set.
    pub timeout_pending: bool,
    /// Level the interrupt line should have.
    pub irq_level: bool,
}

/// What makes a UART: where its output goes, and its tunables.
#[derive(Debug)]
pub struct SerialConfig {
    /// Where transmitted bytes go.
    pub sink: SerialSink,
    /// Tunables.
    pub options: SerialOptions,
}

impl SerialConfig {
    /// A UART writing to `sink`, with default options.
    pub fn new(sink: SerialSink) -> SerialConfig {
        SerialConfig { sink, options: SerialOptions::default() }
    }
}

/// Plugging a UART: one region, [`PORTS`] (8 ports, for the I/O space);
/// interrupt line 0 of the context is the UART's interrupt output.
impl DeviceModel for Serial16550 {
    type Config = SerialConfig;
    type Handle = ActorHandle<Serial16550>;

    fn plug(config: SerialConfig, ctx: PlugCtx) -> crate::Result<Plugged<ActorHandle<Serial16550>>> {
        let dev = Serial16550::with_options(config.sink, config.options);
        let spawned = Spawned::with_options(&ctx.name, dev, ctx.irqs, &ctx.runtime, ctx.actor);
        let region = ctx.topology.new_io_arc(
            &ctx.name,
            spawned.ops(0),
            Serial16550::ops_config(),
            u128::from(SERIAL_IO_SIZE),
        )?;
        Ok(Plugged::new(vec![DeviceRegion::io(PORTS, region)], spawned.handle()))
    }
}

/// Timer token of the character timeout.
const TIMER_CHAR_TIMEOUT: u64 = 1;

/// The 16550A state (an actor; see its [`DeviceModel`] implementation).
pub struct Serial16550 {
    divisor: u16,
    /// Last byte moved out of the holding register (16450 mode reads it
    /// again when nothing new arrived).
    rbr: u8,
    ier: u8,
    fcr: u8,
    lcr: u8,
    mcr: u8,
    /// LSR error bits (OE, PE, FE, BI); DR, THRE and TEMT are derived.
    lsr_errors: u8,
    /// MSR input bits 7:4 as currently seen by the chip.
    msr_inputs: u8,
    /// MSR delta bits 3:0.
    msr_delta: u8,
    /// External modem lines (MSR bits 7:4) used outside loopback.
    line_inputs: u8,
    scr: u8,
    rx: VecDeque<u8>,
    thr_pending: bool,
    timeout_pending: bool,
    /// When the character timeout expires, if armed.
    timeout_deadline: Option<Instant>,
    /// A device timer is outstanding (at most one at a time).
    timer_armed: bool,
    /// Embedder input waiting for room in the receiver.
    input: VecDeque<u8>,
    sink: SerialSink,
    options: SerialOptions,
    transmitted: u64,
    sink_errors: u64,
}

impl std::fmt::Debug for Serial16550 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial16550")
            .field("registers", &self.registers())
            .field("queued_input", &self.input.len())
            .field("sink", &self.sink)
            .finish_non_exhaustive()
    }
}

impl Serial16550 {
    /// A UART in its reset state writing to `sink`, with default options.
    pub fn new(sink: SerialSink) -> Serial16550 {
        Serial16550::with_options(sink, SerialOptions::default())
    }

    /// A UART in its reset state writing to `sink`.
    pub fn with_options(sink: SerialSink, options: SerialOptions) -> Serial16550 {
        let mut s = Serial16550 {
            divisor: 0,
            rbr: 0,
            ier: 0,
            fcr: 0,
            lcr: 0,
            mcr: 0,
            lsr_errors: 0,
            msr_inputs: 0,
            msr_delta: 0,
            line_inputs: MSR_DCD | MSR_DSR | MSR_CTS,
            scr: 0,
            rx: VecDeque::with_capacity(FIFO_LEN),
            thr_pending: false,
            timeout_pending: false,
            timeout_deadline: None,
            timer_armed: false,
            input: VecDeque::new(),
            sink,
            options,
            transmitted: 0,
            sink_errors: 0,
        };
        s.reset_registers();
        s
    }

    /// The access rules of the port range: byte-wide registers, wider
    /// accesses split into consecutive ports (QEMU's `serial_io_ops`).
    pub fn ops_config() -> OpsConfig {
        OpsConfig::with_impl(1, 1)
    }

    /// Queues `bytes` of input on `handle`'s UART (see
    /// [`queue_input`](Self::queue_input)).
    pub fn send_input(handle: &ActorHandle<Serial16550>, bytes: impl Into<Vec<u8>>) -> Result<(), ActorError> {
        let bytes = bytes.into();
        handle.with(move |dev, ctx| dev.queue_input(ctx, &bytes))
    }

    /// Back to the power-on state (QEMU's `serial_reset`): registers reset,
    /// FIFOs and queued input emptied, interrupt lowered. The sink and the
    /// external modem lines are kept.
    pub fn reset(&mut self, ctx: &mut DeviceCtx<'_>) {
        self.input.clear();
        self.reset_registers();
        self.update_irq(ctx);
    }

    fn reset_registers(&mut self) {
        self.divisor = 0x0c; // 9600 baud with the PC clock, as QEMU
        self.rbr = 0;
        self.ier = 0;
        self.fcr = 0;
        self.lcr = 0;
        self.mcr = MCR_OUT2; // QEMU's reset value; see the module docs
        self.lsr_errors = 0;
        self.msr_inputs = self.line_inputs & 0xf0;
        self.msr_delta = 0;
        self.scr = 0;
        self.rx.clear();
        self.thr_pending = false;
        self.timeout_pending = false;
        self.timeout_deadline = None;
    }

    // ----- embedder side ---------------------------------------------------

    /// Queues input bytes behind the receiver, with flow control: they move
    /// into the RX FIFO (or holding register) as room frees up, raising the
    /// data interrupt if enabled, and are never lost to an overrun. While
    /// loopback is on they wait.
    pub fn queue_input(&mut self, ctx: &mut DeviceCtx<'_>, bytes: &[u8]) {
        self.input.extend(bytes.iter().copied());
        self.pump_input(ctx);
        self.update_irq(ctx);
    }

    /// Receives `bytes` on the serial line now, without flow control: a
    /// byte finding the FIFO full is lost and sets LSR.OE. Ignored while
    /// loopback is on (the receiver is disconnected from the line).
    pub fn receive(&mut self, ctx: &mut DeviceCtx<'_>, bytes: &[u8]) {
        if self.loopback() {
            return;
        }
        for &b in bytes {
            self.receive_byte(ctx, b);
        }
        self.update_irq(ctx);
    }

    /// Receives a break condition: a NUL byte with LSR.BI set (QEMU's
    /// `serial_receive_break`). Ignored while loopback is on.
    pub fn receive_break(&mut self, ctx: &mut DeviceCtx<'_>) {
        if self.loopback() {
            return;
        }
        self.receive_byte(ctx, 0);
        self.lsr_errors |= LSR_BI;
        self.update_irq(ctx);
    }

    /// Sets the external modem status lines (MSR bits 7:4: [`MSR_CTS`],
    /// [`MSR_DSR`], [`MSR_RI`], [`MSR_DCD`]; other bits are ignored). Outside
    /// loopback a change sets MSR's delta bits and may raise the modem
    /// status interrupt.
    pub fn set_modem_inputs(&mut self, ctx: &mut DeviceCtx<'_>, lines: u8) {
        self.line_inputs = lines & 0xf0;
        self.refresh_modem_inputs();
        self.update_irq(ctx);
    }

    /// The registers as a guest would read them, without read side effects.
    pub fn registers(&self) -> SerialRegisters {
        let iir = self.iir_value();
        SerialRegisters {
            divisor: self.divisor,
            ier: self.ier,
            iir,
            fcr: self.fcr,
            lcr: self.lcr,
            mcr: self.mcr,
            lsr: self.lsr_value(),
            msr: self.msr_value(),
            scr: self.scr,
            rx_len: self.rx.len(),
            thr_pending: self.thr_pending,
            timeout_pending: self.timeout_pending,
            irq_level: iir & IIR_NO_INT == 0 && self.mcr & MCR_OUT2 != 0,
        }
    }

    /// Bytes queued by [`queue_input`](Self::queue_input) that have not
    /// entered the receiver yet.
    pub fn queued_input(&self) -> usize {
        self.input.len()
    }

    /// Bytes sent to the sink so far (loopback bytes not included).
    pub fn transmitted(&self) -> u64 {
        self.transmitted
    }

    /// Bytes the sink failed to take.
    pub fn sink_errors(&self) -> u64 {
        self.sink_errors
    }

    /// The options the device was made with.
    pub fn options(&self) -> SerialOptions {
        self.options
    }

    // ----- internals -------------------------------------------------------

    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_ENABLE != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn trigger_level(&self) -> usize {
        match self.fcr & FCR_TRIGGER_MASK {
            0x00 => 1,
            0x40 => 4,
            0x80 => 8,
            _ => 14,
        }
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled() {
            FIFO_LEN
        } else {
            1
        }
    }

    fn lsr_value(&self) -> u8 {
        // The transmitter is instantaneous: THR and the shift register are
        // always empty when the guest looks.
        let dr = if self.rx.is_empty() { 0 } else { LSR_DR };
        dr | self.lsr_errors | LSR_THRE | LSR_TEMT
    }

    fn msr_value(&self) -> u8 {
        self.msr_inputs | self.msr_delta
    }

    /// The interrupt identification (IIR bits 3:0) by priority.
    fn pending_id(&self) -> u8 {
        let data_ready = !self.rx.is_empty();
        if self.ier & IER_ELSI != 0 && self.lsr_errors & LSR_INT_ANY != 0 {
            IIR_RLSI
        } else if self.ier & IER_ERBFI != 0 && self.timeout_pending && data_ready {
            IIR_CTI
        } else if self.ier & IER_ERBFI != 0
            && data_ready
            && (!self.fifo_enabled() || self.rx.len() >= self.trigger_level())
        {
            IIR_RDI
        } else if self.ier & IER_ETBEI != 0 && self.thr_pending {
            IIR_THRI
        } else if self.ier & IER_EDSSI != 0 && self.msr_delta != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        }
    }

    fn iir_value(&self) -> u8 {
        let fifo = if self.fifo_enabled() { IIR_FIFO_ENABLED } else { 0 };
        self.pending_id() | fifo
    }

    fn update_irq(&self, ctx: &DeviceCtx<'_>) {
        if let Some(line) = ctx.irq(0) {
            line.set(self.pending_id() != IIR_NO_INT && self.mcr & MCR_OUT2 != 0);
        }
    }

    /// One byte arrives at the receiver (QEMU's `serial_receive1`).
    fn receive_byte(&mut self, ctx: &DeviceCtx<'_>, byte: u8) {
        if self.fifo_enabled() {
            if self.rx.len() < FIFO_LEN {
                self.rx.push_back(byte);
            } else {
                self.lsr_errors |= LSR_OE;
            }
            self.arm_char_timeout(ctx);
        } else {
            if !self.rx.is_empty() {
                self.lsr_errors |= LSR_OE;
                self.rx.clear();
            }
            self.rx.push_back(byte);
        }
    }

    /// Moves queued input into the receiver while there is room.
    fn pump_input(&mut self, ctx: &DeviceCtx<'_>) {
        if self.loopback() {
            return;
        }
        while self.rx.len() < self.rx_capacity() {
            let Some(b) = self.input.pop_front() else { break };
            self.receive_byte(ctx, b);
        }
    }

    /// Four character times at the current line settings.
    fn char_timeout(&self) -> Duration {
        let data = 5 + u64::from(self.lcr & 0x03);
        let parity = u64::from(self.lcr & 0x08 != 0);
        let stop = if self.lcr & 0x04 != 0 { 2 } else { 1 };
        let bits = 1 + data + parity + stop;
        let divisor = u64::from(self.divisor.max(1));
        let baud_base = u64::from(self.options.baud_base.max(1));
        Duration::from_nanos(4 * bits * divisor * 1_000_000_000 / baud_base)
    }

    /// (Re)starts the character timeout. At most one device timer is
    /// outstanding; when it fires early (the deadline moved) it re-arms.
    fn arm_char_timeout(&mut self, ctx: &DeviceCtx<'_>) {
        if !self.options.char_timeout {
            return;
        }
        let after = self.char_timeout();
        self.timeout_deadline = Some(Instant::now() + after);
        if !self.timer_armed {
            self.timer_armed = true;
            ctx.set_timer(after, TIMER_CHAR_TIMEOUT);
        }
    }

    fn transmit(&mut self, ctx: &mut DeviceCtx<'_>, byte: u8) {
        self.thr_pending = false;
        self.update_irq(ctx);
        if self.loopback() {
            self.receive_byte(ctx, byte);
        } else {
            match self.sink.write_byte(byte) {
                Ok(()) => self.transmitted += 1,
                Err(e) => {
                    if self.sink_errors == 0 {
                        tracing::warn!(device = ctx.name(), error = %e, "serial sink failed; output dropped");
                    }
                    self.sink_errors += 1;
                }
            }
        }
        self.thr_pending = true;
        self.update_irq(ctx);
    }

    /// Recomputes the modem status inputs (from MCR in loopback, from the
    /// external lines otherwise) and records changes in the delta bits.
    fn refresh_modem_inputs(&mut self) {
        let new = if self.loopback() {
            ((self.mcr & (MCR_OUT1 | MCR_OUT2)) << 4) | ((self.mcr & MCR_RTS) << 3) | ((self.mcr & MCR_DTR) << 5)
        } else {
            self.line_inputs & 0xf0
        };
        let old = self.msr_inputs;
        if new != old {
            let changed = (new ^ old) >> 4;
            let mut delta = changed & (MSR_DCTS | MSR_DDSR | MSR_DDCD);
            if old & MSR_RI != 0 && new & MSR_RI == 0 {
                delta |= MSR_TERI;
            }
            self.msr_delta |= delta;
            self.msr_inputs = new;
        }
    }

    fn write_fcr(&mut self, ctx: &mut DeviceCtx<'_>, value: u8) {
        let enable = value & FCR_ENABLE != 0;
        if enable != self.fifo_enabled() {
            // Switching between 16450 and FIFO mode empties both FIFOs.
            self.clear_rx();
            self.thr_pending = true;
        }
        if enable {
            if value & FCR_RX_RESET != 0 {
                self.clear_rx();
            }
            if value & FCR_TX_RESET != 0 {
                self.thr_pending = true;
            }
            self.fcr = value & (FCR_TRIGGER_MASK | FCR_DMA_MODE | FCR_ENABLE);
        } else {
            // The other bits are only programmed together with FCR.0.
            self.fcr = 0;
        }
        self.pump_input(ctx);
    }

    fn clear_rx(&mut self) {
        self.rx.clear();
        self.lsr_errors &= !LSR_BI;
        self.timeout_pending = false;
        self.timeout_deadline = None;
    }

    fn read_rbr(&mut self, ctx: &mut DeviceCtx<'_>) -> u8 {
        let value = if self.fifo_enabled() {
            let v = self.rx.pop_front().unwrap_or(0);
            self.timeout_pending = false;
            if self.rx.is_empty() {
                self.lsr_errors &= !LSR_BI;
                self.timeout_deadline = None;
            } else {
                self.arm_char_timeout(ctx);
            }
            v
        } else {
            if let Some(b) = self.rx.pop_front() {
                self.rbr = b;
            }
            self.lsr_errors &= !LSR_BI;
            self.rbr
        };
        self.pump_input(ctx);
        value
    }
}

impl Device for Serial16550 {
    fn read(&mut self, ctx: &mut DeviceCtx<'_>, region: usize, addr: HwAddr, _size: u32) -> u64 {
        if region != 0 {
            return 0;
        }
        let value = match addr & 7 {
            reg::RBR_THR if self.dlab() => self.divisor as u8,
            reg::RBR_THR => self.read_rbr(ctx),
            reg::IER if self.dlab() => (self.divisor >> 8) as u8,
            reg::IER => self.ier,
            reg::IIR_FCR => {
                let v = self.iir_value();
                if v & 0x0f == IIR_THRI {
                    self.thr_pending = false;
                }
                v
            }
            reg::LCR => self.lcr,
            reg::MCR => self.mcr,
            reg::LSR => {
                let v = self.lsr_value();
                self.lsr_errors = 0;
                v
            }
            reg::MSR => {
                let v = self.msr_value();
                self.msr_delta = 0;
                v
            }
            _ => self.scr,
        };
        self.update_irq(ctx);
        u64::from(value)
    }

    fn write(&mut self, ctx: &mut DeviceCtx<'_>, region: usize, addr: HwAddr, value: u64, _size: u32) {
        if region != 0 {
            return;
        }
        let value = value as u8;
        match addr & 7 {
            reg::RBR_THR if self.dlab() => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            reg::RBR_THR => self.transmit(ctx, value),
            reg::IER if self.dlab() => self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8),
            reg::IER => {
                let changed = (self.ier ^ value) & 0x0f;
                self.ier = value & 0x0f;
                if changed & IER_ETBEI != 0 {
                    // THR is always empty here: enabling the source raises it
                    // at once, disabling it forgets it.
                    self.thr_pending = self.ier & IER_ETBEI != 0;
                }
            }
            reg::IIR_FCR => self.write_fcr(ctx, value),
            reg::LCR => self.lcr = value,
            reg::MCR => {
                self.mcr = value & 0x1f;
                self.refresh_modem_inputs();
                self.pump_input(ctx);
            }
            reg::LSR | reg::MSR => {}
            _ => self.scr = value,
        }
        self.update_irq(ctx);
    }

    fn timer(&mut self, ctx: &mut DeviceCtx<'_>, token: u64) {
        if token != TIMER_CHAR_TIMEOUT {
            return;
        }
        self.timer_armed = false;
        let Some(deadline) = self.timeout_deadline else { return };
        let now = Instant::now();
        if now < deadline {
            self.timer_armed = true;
            ctx.set_timer(deadline - now, TIMER_CHAR_TIMEOUT);
            return;
        }
        self.timeout_deadline = None;
        if self.fifo_enabled() && !self.rx.is_empty() {
            self.timeout_pending = true;
            self.update_irq(ctx);
        }
    }

    fn unplugged(&mut self, ctx: &mut DeviceCtx<'_>) {
        if let Err(e) = self.sink.flush() {
            tracing::warn!(device = ctx.name(), error = %e, "serial sink flush failed");
        }
    }
}
