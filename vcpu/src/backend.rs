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

use crate::control::Kick;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use topos_runtime::{Accessor, AddressSpace, HwAddr, MemTxResult};

/// Why a backend returned from [`VcpuBackend::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunExit {
    /// A kick (or a signal) made it leave guest code; nothing else to do.
    Kicked,
    /// The vCPU executed `hlt` and the backend does not wait for interrupts
    /// itself; `interrupts_enabled` is the guest's IF.
    Halted {
        /// Whether an interrupt could wake it.
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
}

/// A vCPU backend.
pub trait VcpuBackend: Send {
    /// Runs guest code until it must return; guest accesses that leave the
    /// backend go through `io`.
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

/// One vCPU's path to the machine: its own accessors.
#[derive(Debug)]
pub struct VcpuIo {
    memory: Accessor,
    io: Accessor,
    counts: Arc<IoCounters>,
}

impl VcpuIo {
    /// Accessors on `memory` and `io` for one vCPU thread.
    pub fn new(memory: &AddressSpace, io: &AddressSpace) -> VcpuIo {
        VcpuIo { memory: memory.accessor(), io: io.accessor(), counts: Arc::default() }
    }

    /// A guest read of `data.len()` bytes of memory at `addr`.
    #[inline]
    pub fn mmio_read(&mut self, addr: HwAddr, data: &mut [u8]) -> MemTxResult {
        IoCounters::bump(&self.counts.mmio);
        self.memory.read(addr, data)
    }

    /// A guest write of memory at `addr`.
    #[inline]
    pub fn mmio_write(&mut self, addr: HwAddr, data: &[u8]) -> MemTxResult {
        IoCounters::bump(&self.counts.mmio);
        self.memory.write(addr, data)
    }

    /// A guest `in` of `data.len()` bytes from `port`.
    #[inline]
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) -> MemTxResult {
        IoCounters::bump(&self.counts.pio);
        self.io.read(u64::from(port), data)
    }

    /// A guest `out` to `port`.
    #[inline]
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> MemTxResult {
        IoCounters::bump(&self.counts.pio);
        self.io.write(u64::from(port), data)
    }

    /// The memory accessor (the interpreter reads and writes RAM through it).
    pub fn memory(&mut self) -> &mut Accessor {
        &mut self.memory
    }

    /// What this vCPU dispatched so far, readable from other threads.
    pub fn counters(&self) -> Arc<IoCounters> {
        self.counts.clone()
    }
}
