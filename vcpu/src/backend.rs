//! What a vCPU backend is (KVM now, the x86 interpreter next) and what it
//! gets to reach the machine.
//!
//! A backend runs guest code on the calling thread until something only the
//! vCPU layer can handle happens, and returns why ([`RunExit`]). Guest
//! accesses it cannot complete itself (KVM's MMIO and port exits; for the
//! interpreter, every access) go through the thread's own [`VcpuIo`]: two
//! `Accessor`s, one on the memory address space and one on the I/O space,
//! each caching the last range it hit and revalidating it with one load.
//! No lock and no shared mutable state is on that path.
//!
//! ## Guest input is data
//!
//! Nothing a guest does may panic, hang or abort the host: a backend turns
//! whatever the guest did into a [`RunExit`], and the vCPU layer turns that
//! into a stop reason or carries on. Accesses are answered by the runtime
//! (an unassigned read gives 0, or all-ones for ports; a dropped write is
//! dropped) and the guest goes on, as in QEMU, with one exception decided
//! by the VM: an access that reaches a *reservation* (a region claimed for
//! something that should have handled it before the runtime, such as a
//! kernel-side device) means the machine is wired wrong, and by default
//! ([`ReservationPolicy::Stop`]) stops the VM with the access named
//! ([`AccessFault`]); [`ReservationPolicy::Continue`] answers it like QEMU
//! (read 0, write dropped, traced) instead.

use crate::control::Kick;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use topos_runtime::{Accessor, AddressSpace, HwAddr, MemTxResult};

/// What a vCPU does when a guest access reaches a reservation region
/// (`Topology::new_reservation`).
///
/// QEMU's reservation is an I/O region with no ops, so under KVM an access
/// that reaches it ends in unassigned-access handling: reads give 0,
/// writes are dropped, the guest goes on (the seed header documents an
/// `abort()`, which QEMU never did). topos's rule (`semantics.md`,
/// "reservations") is to stop the VM with a clear message unless the
/// embedder chose to continue: a reservation stands for something that
/// should have served the access before the runtime did, so reaching it
/// is a bug of the machine, not of the guest, and going on would hide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReservationPolicy {
    /// Stop the VM: [`StopReason::Failed`](crate::vm::StopReason::Failed)
    /// naming the access (the default).
    #[default]
    Stop,
    /// Answer as QEMU does (read 0, write dropped, traced by the runtime)
    /// and let the guest go on.
    Continue,
}

/// The space a guest access went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// The memory address space (MMIO).
    Memory,
    /// The I/O port space.
    Io,
}

/// A guest access the VM's policy does not let the guest go on after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessFault {
    /// Where it went.
    pub space: Space,
    /// The guest physical address or port.
    pub addr: HwAddr,
    /// Its size in bytes.
    pub size: usize,
    /// A write (else a read).
    pub write: bool,
    /// The runtime's answer.
    pub result: MemTxResult,
}

impl std::fmt::Display for AccessFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.space {
            Space::Memory => "memory",
            Space::Io => "port",
        };
        let dir = if self.write { "write to" } else { "read from" };
        let why = match self.result {
            MemTxResult::ReservationAccess => "reached a reservation region (nothing serves it)",
            MemTxResult::DecodeError => "was not decoded",
            MemTxResult::AccessError => "was refused by its device",
            MemTxResult::Ok => "completed",
        };
        write!(f, "a {}-byte guest {dir} {what} {:#x} {why}", self.size, self.addr)
    }
}

/// Whether a vCPU that is out of guest code (paused) would run guest code
/// again by itself: what [`Vm::check_halted`](crate::vm::Vm::check_halted)
/// asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// It runs guest code when entered.
    Running,
    /// It is halted, and an interrupt (a device, a timer) may wake it.
    Waiting,
    /// It is halted, and only another vCPU can wake it: `hlt` with
    /// interrupts off and no NMI, SMI or INIT source armed, or an
    /// application processor waiting for INIT/SIPI.
    Dead,
    /// The backend cannot tell.
    Unknown,
}

/// Why a backend returned from [`VcpuBackend::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunExit {
    /// A kick (or a signal) made it leave guest code; nothing else to do.
    Kicked,
    /// The vCPU executed `hlt` and the backend does not wait for interrupts
    /// itself. The vCPU thread then waits for a kick (a backend that posts
    /// an interrupt for it kicks it); a halt with `interrupts_enabled`
    /// false counts as one only another vCPU can end, and when every vCPU
    /// is in one the VM stops ([`crate::control`]).
    Halted {
        /// Whether an interrupt could wake it: the guest's IF, or true if
        /// the backend has a non-maskable wake-up (an NMI source) armed.
        interrupts_enabled: bool,
    },
    /// The guest shut the machine down (triple fault, or a shutdown the
    /// backend reports).
    Shutdown,
    /// The guest did something the backend cannot run (an unknown exit, an
    /// emulation failure, a failed entry); `why` says what.
    Failed {
        /// One line.
        why: String,
    },
    /// A guest access the VM's policy stops on (see [`VcpuIo::take_fault`]).
    AccessFault(AccessFault),
}

/// A vCPU backend.
///
/// Whatever the guest does, a backend returns (it never panics on guest
/// input; the vCPU layer still contains a panic, and stops the VM with it).
pub trait VcpuBackend: Send {
    /// Runs guest code until it must return; guest accesses that leave the
    /// backend go through `io`. After each access, a backend returns
    /// [`RunExit::AccessFault`] if [`VcpuIo::take_fault`] has one.
    fn run(&mut self, io: &mut VcpuIo) -> Result<RunExit, crate::Error>;
    /// What other threads call to make it leave guest code.
    fn kicker(&self) -> Arc<dyn Kick>;
    /// The registers, for a failure report.
    fn dump(&mut self) -> String;
    /// Called on the vCPU's own thread before its first run (KVM records
    /// the thread to signal).
    fn on_thread_start(&mut self) {}
    /// Called on the vCPU's own thread as it leaves.
    fn on_thread_exit(&mut self) {}
    /// Whether the vCPU, out of guest code between two runs, would run
    /// again by itself. Called on the vCPU's thread while it is paused.
    fn liveness(&mut self) -> Liveness {
        Liveness::Unknown
    }
}

/// Counters of the accesses a vCPU dispatched through the runtime.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoCounts {
    /// Memory reads and writes (MMIO exits).
    pub mmio: u64,
    /// Port reads and writes.
    pub pio: u64,
}

/// The counters behind [`IoCounts`], written by the vCPU thread only and
/// readable from any thread.
#[derive(Debug, Default)]
pub struct IoCounters {
    mmio: AtomicU64,
    pio: AtomicU64,
}

impl IoCounters {
    /// What was dispatched so far.
    pub fn get(&self) -> IoCounts {
        IoCounts { mmio: self.mmio.load(Ordering::Relaxed), pio: self.pio.load(Ordering::Relaxed) }
    }

    #[inline]
    fn bump(counter: &AtomicU64) {
        // Only the vCPU thread writes: no read-modify-write needed.
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// One vCPU's path to the machine: its own accessors, and the first access
/// the VM's policy stops on.
#[derive(Debug)]
pub struct VcpuIo {
    memory: Accessor,
    io: Accessor,
    counts: Arc<IoCounters>,
    reservations: ReservationPolicy,
    fault: Option<AccessFault>,
}

impl VcpuIo {
    /// Accessors on `memory` and `io` for one vCPU thread, stopping on
    /// reservation accesses.
    pub fn new(memory: &AddressSpace, io: &AddressSpace) -> VcpuIo {
        VcpuIo {
            memory: memory.accessor(),
            io: io.accessor(),
            counts: Arc::default(),
            reservations: ReservationPolicy::Stop,
            fault: None,
        }
    }

    /// Sets what an access to a reservation does.
    pub fn set_reservation_policy(&mut self, policy: ReservationPolicy) {
        self.reservations = policy;
    }

    /// Keeps the first access the policy stops on; returns `result`. The
    /// methods below call it; a backend that reaches memory through
    /// [`memory`](Self::memory) calls it with each result.
    #[inline]
    pub fn record(&mut self, result: MemTxResult, space: Space, addr: HwAddr, size: usize, write: bool) -> MemTxResult {
        if result == MemTxResult::ReservationAccess
            && self.reservations == ReservationPolicy::Stop
            && self.fault.is_none()
        {
            self.fault = Some(AccessFault { space, addr, size, write, result });
        }
        result
    }

    /// Whether an access the VM's policy stops on is waiting for
    /// [`take_fault`](Self::take_fault).
    #[inline]
    pub fn has_fault(&self) -> bool {
        self.fault.is_some()
    }

    /// The first access since the last call that the VM's policy stops on
    /// (an access to a reservation, by default). The access itself was
    /// answered as unassigned: the guest may be let go on, or not.
    pub fn take_fault(&mut self) -> Option<AccessFault> {
        self.fault.take()
    }

    /// A guest read of `data.len()` bytes of memory at `addr`.
    #[inline]
    pub fn mmio_read(&mut self, addr: HwAddr, data: &mut [u8]) -> MemTxResult {
        IoCounters::bump(&self.counts.mmio);
        let r = self.memory.read(addr, data);
        self.record(r, Space::Memory, addr, data.len(), false)
    }

    /// A guest write of memory at `addr`.
    #[inline]
    pub fn mmio_write(&mut self, addr: HwAddr, data: &[u8]) -> MemTxResult {
        IoCounters::bump(&self.counts.mmio);
        let r = self.memory.write(addr, data);
        self.record(r, Space::Memory, addr, data.len(), true)
    }

    /// A guest `in` of `data.len()` bytes from `port`.
    #[inline]
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) -> MemTxResult {
        IoCounters::bump(&self.counts.pio);
        let r = self.io.read(u64::from(port), data);
        self.record(r, Space::Io, u64::from(port), data.len(), false)
    }

    /// A guest `out` to `port`.
    #[inline]
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> MemTxResult {
        IoCounters::bump(&self.counts.pio);
        let r = self.io.write(u64::from(port), data);
        self.record(r, Space::Io, u64::from(port), data.len(), true)
    }

    /// A guest read of a `size`-byte value of memory at `addr` (the
    /// interpreter's MMIO path: no byte buffer when one device range takes
    /// the access whole).
    #[inline]
    pub fn mmio_read_value(&mut self, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        IoCounters::bump(&self.counts.mmio);
        let (v, r) = self.memory.read_value(addr, size);
        (v, self.record(r, Space::Memory, addr, size as usize, false))
    }

    /// A guest write of a `size`-byte value of memory at `addr`.
    #[inline]
    pub fn mmio_write_value(&mut self, addr: HwAddr, value: u64, size: u32) -> MemTxResult {
        IoCounters::bump(&self.counts.mmio);
        let r = self.memory.write_value(addr, value, size);
        self.record(r, Space::Memory, addr, size as usize, true)
    }

    /// A guest `in` of a `size`-byte value from `port`.
    #[inline]
    pub fn pio_read_value(&mut self, port: u16, size: u32) -> (u64, MemTxResult) {
        IoCounters::bump(&self.counts.pio);
        let (v, r) = self.io.read_value(u64::from(port), size);
        (v, self.record(r, Space::Io, u64::from(port), size as usize, false))
    }

    /// A guest `out` of a `size`-byte value to `port`.
    #[inline]
    pub fn pio_write_value(&mut self, port: u16, value: u64, size: u32) -> MemTxResult {
        IoCounters::bump(&self.counts.pio);
        let r = self.io.write_value(u64::from(port), value, size);
        self.record(r, Space::Io, u64::from(port), size as usize, true)
    }

    /// The memory accessor (the interpreter reads and writes RAM through it).
    pub fn memory(&mut self) -> &mut Accessor {
        &mut self.memory
    }

    /// The memory accessor, shared.
    pub fn memory_ref(&self) -> &Accessor {
        &self.memory
    }

    /// What this vCPU dispatched so far, readable from other threads.
    pub fn counters(&self) -> Arc<IoCounters> {
        self.counts.clone()
    }
}
