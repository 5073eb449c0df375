//! A KVM vCPU as a [`VcpuBackend`], and its kick: `immediate_exit` in the
//! vCPU's `kvm_run` page, then a real-time signal to its thread.

use super::coalesced::CoalescedRing;
use crate::backend::{RunExit, VcpuBackend, VcpuIo};
use crate::control::Kick;
use crate::error::{Error, Result};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// The signal that interrupts a vCPU thread inside `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only makes `KVM_RUN` return with EINTR;
    // `immediate_exit`, armed before it was sent, covers a signal that
    // arrives just before the entry.
}

/// Installs the (empty) kick handler, once per process.
fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick_signal)
            .map_err(|e| Error::Config(format!("cannot install the vCPU kick signal handler: {e}")));
    });
    result
}

/// Where the kick goes: the vCPU's `immediate_exit` byte and its thread.
#[derive(Debug)]
struct Target {
    /// `kvm_run.immediate_exit`, in the vCPU's mapped run page.
    immediate_exit: *const AtomicU8,
    /// The vCPU thread, while it runs.
    thread: Option<libc::pthread_t>,
    /// False once the vCPU (and its run page) may be gone.
    alive: bool,
}

/// Kicks one KVM vCPU (see [`crate::control`] for the protocol).
#[derive(Debug)]
pub struct KvmKicker {
    target: Mutex<Target>,
}

// SAFETY: the raw pointer is only dereferenced under the mutex while
// `alive` is true, i.e. while the `VcpuFd` that maps the page exists (the
// backend clears `alive` before it is dropped).
unsafe impl Send for KvmKicker {}
// SAFETY: as above; all access goes through the mutex.
unsafe impl Sync for KvmKicker {}

impl KvmKicker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Target> {
        self.target.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn store(t: &Target, value: u8) {
        if t.alive {
            // SAFETY: `alive` says the run page is still mapped (see the
            // `Send` impl); `AtomicU8` has the layout of `u8`, and every
            // user-space access to the byte goes through this atomic.
            unsafe { (*t.immediate_exit).store(value, Ordering::SeqCst) };
        }
    }
}

impl Kick for KvmKicker {
    fn kick(&self) {
        let t = self.lock();
        Self::store(&t, 1);
        if let Some(thread) = t.thread {
            // SAFETY: `thread` is a live thread: it is cleared under this
            // lock before the thread leaves. A failure (the thread is
            // exiting) needs no handling: it will not enter the guest again.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    fn clear(&self) {
        Self::store(&self.lock(), 0);
    }
}

/// One KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
    index: u32,
    kicker: Arc<KvmKicker>,
    /// The VM's coalesced-MMIO ring, drained at every exit.
    coalesced: Option<Arc<CoalescedRing>>,
}

impl std::fmt::Debug for KvmVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVcpu").field("index", &self.index).finish_non_exhaustive()
    }
}

impl KvmVcpu {
    /// Wraps vCPU `index`'s descriptor; `coalesced` is the VM's
    /// coalesced-MMIO ring, if it has one.
    pub fn new(mut fd: VcpuFd, index: u32, coalesced: Option<Arc<CoalescedRing>>) -> Result<KvmVcpu> {
        install_kick_handler()?;
        let run = fd.get_kvm_run();
        let immediate_exit = std::ptr::addr_of_mut!(run.immediate_exit).cast::<AtomicU8>();
        let kicker = Arc::new(KvmKicker { target: Mutex::new(Target { immediate_exit, thread: None, alive: true }) });
        Ok(KvmVcpu { fd, index, kicker, coalesced })
    }

    /// The vCPU's descriptor (register setup before it runs).
    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    fn interrupts_enabled(&self) -> bool {
        self.fd.get_regs().map(|r| r.rflags & (1 << 9) != 0).unwrap_or(false)
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        let mut t = self.kicker.lock();
        t.alive = false;
        t.thread = None;
    }
}

impl VcpuBackend for KvmVcpu {
    fn run(&mut self, io: &mut VcpuIo) -> Result<RunExit> {
        loop {
            let result = self.fd.run();
            // Writes the guest queued before this exit happened before it.
            if let Some(ring) = &self.coalesced {
                ring.drain(|addr, data| {
                    let _ = io.memory().write(addr, data);
                });
            }
            let exit = match result {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(RunExit::Kicked),
                Err(source) => return Err(Error::Kvm { what: "KVM_RUN", source }),
            };
            // As in QEMU's KVM loop, an access's result is not the guest's
            // business: an unassigned or failed read has already been given
            // the runtime's answer (0, or all-ones for ports), and a dropped
            // write is dropped.
            let vcpu = self.index;
            match exit {
                VcpuExit::IoOut(port, data) => {
                    let r = io.pio_write(port, data);
                    tracing::trace!(vcpu, port, ?data, ?r, "exit: out");
                }
                VcpuExit::IoIn(port, data) => {
                    let r = io.pio_read(port, data);
                    tracing::trace!(vcpu, port, ?data, ?r, "exit: in");
                }
                VcpuExit::MmioRead(addr, data) => {
                    let r = io.mmio_read(addr, data);
                    tracing::trace!(vcpu, addr, ?data, ?r, "exit: mmio read");
                }
                VcpuExit::MmioWrite(addr, data) => {
                    let r = io.mmio_write(addr, data);
                    tracing::trace!(vcpu, addr, ?data, ?r, "exit: mmio write");
                }
                VcpuExit::Intr => return Ok(RunExit::Kicked),
                VcpuExit::Hlt => return Ok(RunExit::Halted { interrupts_enabled: self.interrupts_enabled() }),
                VcpuExit::Shutdown => return Ok(RunExit::Shutdown),
                VcpuExit::FailEntry(reason, cpu) => {
                    return Ok(RunExit::Failed {
                        why: format!("KVM entry failed: hardware reason {reason:#x} on cpu {cpu}"),
                    })
                }
                VcpuExit::InternalError => {
                    return Ok(RunExit::Failed { why: "KVM internal error (emulation failure)".into() })
                }
                other => return Ok(RunExit::Failed { why: format!("unhandled KVM exit {other:?}") }),
            }
        }
    }

    fn kicker(&self) -> Arc<dyn Kick> {
        self.kicker.clone()
    }

    fn dump(&mut self) -> String {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        match (regs, sregs) {
            (Ok(r), Ok(s)) => format!(
                "vcpu {}: rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
                 cs={:#x}(base {:#x}) ds={:#x} ss={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                self.index,
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                s.cs.selector,
                s.cs.base,
                s.ds.selector,
                s.ss.selector,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer
            ),
            (Err(e), _) | (_, Err(e)) => format!("vcpu {}: registers unavailable ({e})", self.index),
        }
    }

    fn on_thread_start(&mut self) {
        // SAFETY: `pthread_self` has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.kicker.lock().thread = Some(me);
    }

    fn on_thread_exit(&mut self) {
        self.kicker.lock().thread = None;
    }
}
