//! A KVM vCPU as a [`VcpuBackend`], and its kick: `immediate_exit` in the
//! vCPU's `kvm_run` page, then a real-time signal to its thread.
//!
//! Exits are handled by a free function (`handle_exit`): port and MMIO
//! exits go through the vCPU's [`VcpuIo`]; a halt, a shutdown, a failed
//! entry, an internal error (an instruction KVM cannot emulate; a triple
//! fault on PVM) and any exit this backend does not serve end the run
//! with a [`RunExit`] that names them. Nothing a guest does panics here.
//!
//! With the in-kernel irqchip, KVM handles `hlt` itself: the vCPU thread
//! blocks inside `KVM_RUN` and nothing reaches user space, so a guest that
//! halts every vCPU with interrupts off makes no exit at all.
//! [`KvmVcpu::liveness`](VcpuBackend::liveness) reads, while the vCPU is
//! paused, whether it could still be woken (see
//! [`Vm::check_halted`](crate::vm::Vm::check_halted)).

use super::coalesced::CoalescedRing;
use crate::backend::{Liveness, RunExit, VcpuBackend, VcpuIo};
use crate::control::Kick;
use crate::error::{Error, Result};
use kvm_bindings::{
    kvm_irqchip, kvm_run, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_IRQCHIP_IOAPIC, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
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
    /// Its VM, to read the in-kernel IOAPIC's routes for
    /// [`liveness`](VcpuBackend::liveness).
    vm: Option<Arc<VmFd>>,
}

impl std::fmt::Debug for KvmVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVcpu").field("index", &self.index).finish_non_exhaustive()
    }
}

impl KvmVcpu {
    /// Wraps vCPU `index`'s descriptor; `coalesced` is the VM's
    /// coalesced-MMIO ring, if it has one. Without its VM's descriptor (see
    /// [`with_vm`](Self::with_vm)) it cannot tell whether the in-kernel
    /// IOAPIC could send it an NMI, so it never reports itself
    /// [`Liveness::Dead`] from a halt.
    pub fn new(mut fd: VcpuFd, index: u32, coalesced: Option<Arc<CoalescedRing>>) -> Result<KvmVcpu> {
        install_kick_handler()?;
        let run = fd.get_kvm_run();
        let immediate_exit = std::ptr::addr_of_mut!(run.immediate_exit).cast::<AtomicU8>();
        let kicker = Arc::new(KvmKicker { target: Mutex::new(Target { immediate_exit, thread: None, alive: true }) });
        Ok(KvmVcpu { fd, index, kicker, coalesced, vm: None })
    }

    /// The vCPU, knowing its VM `vm` (which has the in-kernel irqchip).
    pub fn with_vm(mut self, vm: Arc<VmFd>) -> KvmVcpu {
        self.vm = Some(vm);
        self
    }

    /// The vCPU's descriptor (register setup before it runs).
    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    fn interrupts_enabled(&self) -> bool {
        self.fd.get_regs().map(|r| r.rflags & (1 << 9) != 0).unwrap_or(false)
    }

    /// The in-kernel state behind [`VcpuBackend::liveness`].
    fn read_liveness(&self) -> std::result::Result<Liveness, kvm_ioctls::Error> {
        let mp_state = self.fd.get_mp_state()?.mp_state;
        let events = self.fd.get_vcpu_events()?;
        // An event already on its way (or SMM, which this VM does not
        // model) wakes it or keeps it going.
        if events.nmi.pending != 0
            || events.nmi.injected != 0
            || events.smi.pending != 0
            || events.smi.smm != 0
            || events.smi.latched_init != 0
            || events.exception.injected != 0
            || events.exception.pending != 0
        {
            return Ok(Liveness::Running);
        }
        Ok(match mp_state {
            // Waiting for INIT/SIPI: only another vCPU's IPI starts it.
            KVM_MP_STATE_INIT_RECEIVED | KVM_MP_STATE_UNINITIALIZED => Liveness::Dead,
            KVM_MP_STATE_HALTED => {
                let regs = self.fd.get_regs()?;
                // Interrupts on: any interrupt wakes it. Off: only an NMI,
                // SMI or INIT.
                if regs.rflags & (1 << 9) != 0 || self.nmi_sources()? {
                    Liveness::Waiting
                } else {
                    Liveness::Dead
                }
            }
            _ => Liveness::Running,
        })
    }

    /// Whether anything but another vCPU could send this vCPU an NMI, SMI
    /// or INIT (the events that end a `hlt` with interrupts off): its
    /// local APIC's LINT0 (the PIT's NMI watchdog in KVM), performance
    /// counter, thermal and CMCI entries, and the in-kernel IOAPIC's routes
    /// (device lines). LINT1 is left out: KVM never delivers through it
    /// (`KVM_NMI`, which topos does not issue, injects directly). Unknown
    /// (no VM descriptor) counts as yes.
    fn nmi_sources(&self) -> std::result::Result<bool, kvm_ioctls::Error> {
        let lapic = self.fd.get_lapic()?;
        let reg = |offset: usize| {
            let b = |i: usize| lapic.regs[offset + i] as u8;
            u32::from_le_bytes([b(0), b(1), b(2), b(3)])
        };
        // LVT CMCI, thermal, performance counter, LINT0.
        if [0x2f0, 0x330, 0x340, 0x350].into_iter().any(|o| wakes_halted(u64::from(reg(o)))) {
            return Ok(true);
        }
        let Some(vm) = &self.vm else { return Ok(true) };
        let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
        vm.get_irqchip(&mut chip)?;
        // SAFETY: KVM_GET_IRQCHIP with KVM_IRQCHIP_IOAPIC fills the
        // `ioapic` member of the union; every bit pattern is a valid
        // `kvm_ioapic_state` (integers only).
        let ioapic = unsafe { chip.chip.ioapic };
        Ok(ioapic.redirtbl.iter().any(|e| {
            // SAFETY: `bits` views the entry as the u64 it is; any bit
            // pattern is valid.
            wakes_halted(unsafe { e.bits })
        }))
    }
}

/// Whether an unmasked LVT or IOAPIC entry delivers an SMI (2), NMI (4)
/// or INIT (5): the deliveries that wake a `hlt` with interrupts off.
fn wakes_halted(entry: u64) -> bool {
    let masked = entry & (1 << 16) != 0;
    let mode = (entry >> 8) & 7;
    !masked && matches!(mode, 2 | 4 | 5)
}

/// What one exit asks of [`KvmVcpu`]'s run loop.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Served: enter the guest again.
    Enter,
    /// End the run with this.
    Return(RunExit),
    /// `KVM_EXIT_HLT` (no in-kernel LAPIC): the caller reads IF.
    Halt,
    /// `KVM_EXIT_INTERNAL_ERROR`: the caller reads its details.
    InternalError,
}

/// Serves one exit of vCPU `vcpu`: port and MMIO accesses through `io`
/// (then the access fault the VM's policy stops on, if any); everything
/// else ends the run.
fn handle_exit(vcpu: u32, exit: VcpuExit<'_>, io: &mut VcpuIo) -> Next {
    // As in QEMU's KVM loop, an access's result is not the guest's
    // business: an unassigned or failed read has already been given the
    // runtime's answer (0, or all-ones for ports), and a dropped write is
    // dropped. Only the VM's policy (reservations) may stop it.
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
        VcpuExit::Intr => return Next::Return(RunExit::Kicked),
        VcpuExit::Hlt => return Next::Halt,
        VcpuExit::Shutdown => return Next::Return(RunExit::Shutdown),
        VcpuExit::FailEntry(reason, cpu) => {
            return Next::Return(RunExit::Failed {
                why: format!("KVM entry failed: hardware reason {reason:#x} on cpu {cpu}"),
            })
        }
        VcpuExit::InternalError => return Next::InternalError,
        other => return Next::Return(RunExit::Failed { why: format!("unhandled KVM exit: {other:?}") }),
    }
    match io.take_fault() {
        Some(fault) => Next::Return(RunExit::AccessFault(fault)),
        None => Next::Enter,
    }
}

/// One line for a `KVM_EXIT_INTERNAL_ERROR` in `run`.
fn describe_internal_error(run: &kvm_run) -> String {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which the
    // kernel fills the `internal` member; it holds integers only.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let what = match internal.suberror {
        KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "failure while delivering an event",
        KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown kind",
    };
    let n = (internal.ndata as usize).min(internal.data.len());
    let mut line = format!("KVM internal error {} ({what})", internal.suberror);
    if internal.suberror == KVM_INTERNAL_ERROR_EMULATION
        && n >= 1
        && internal.data[0] & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
    {
        // SAFETY: for an emulation failure with the instruction-bytes flag
        // the kernel fills `emulation_failure`, which overlays `internal`;
        // it holds integers only.
        let insn = unsafe { run.__bindgen_anon_1.emulation_failure.__bindgen_anon_1.__bindgen_anon_1 };
        let len = usize::from(insn.insn_size).min(insn.insn_bytes.len());
        let bytes: Vec<String> = insn.insn_bytes[..len].iter().map(|b| format!("{b:02x}")).collect();
        line.push_str(&format!(", instruction bytes [{}]", bytes.join(" ")));
    } else if n > 0 {
        let data: Vec<String> = internal.data[..n].iter().map(|d| format!("{d:#x}")).collect();
        line.push_str(&format!(", data [{}]", data.join(", ")));
    }
    line
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
            let next = match result {
                Ok(exit) => handle_exit(self.index, exit, io),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(RunExit::Kicked),
                Err(source) => return Err(Error::Kvm { what: "KVM_RUN", source }),
            };
            match next {
                Next::Enter => {}
                Next::Return(exit) => return Ok(exit),
                Next::Halt => return Ok(RunExit::Halted { interrupts_enabled: self.interrupts_enabled() }),
                Next::InternalError => {
                    return Ok(RunExit::Failed { why: describe_internal_error(self.fd.get_kvm_run()) })
                }
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

    /// From the in-kernel state: `Running` unless the vCPU is halted or
    /// waiting for INIT/SIPI; a halt with interrupts off is `Dead` when no
    /// NMI, SMI or INIT is pending and none can come from anything but
    /// another vCPU (see `nmi_sources`); `Unknown` if KVM does not answer.
    fn liveness(&mut self) -> Liveness {
        self.read_liveness().unwrap_or(Liveness::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{AccessFault, Space};
    use topos_runtime::{MemTxResult, Topology};

    fn io() -> (Topology, VcpuIo) {
        let topo = Topology::new();
        let spaces = topo.standard_spaces().unwrap();
        let hole = topo.new_reservation("kernel-device", 0x1000).unwrap();
        spaces.system.add_subregion(0xfee0_0000, &hole).unwrap();
        let io = VcpuIo::new(&spaces.memory, &spaces.io_space);
        (topo, io)
    }

    #[test]
    fn exits_this_backend_does_not_serve_end_the_run_with_their_name() {
        let (_topo, mut io) = io();
        let mut ret = 0u64;
        let hypercall =
            VcpuExit::Hypercall(kvm_ioctls::HypercallExit { nr: 12, args: [0; 6], ret: &mut ret, longmode: 0 });
        for (exit, name) in [
            (hypercall, "Hypercall"),
            (VcpuExit::Unsupported(1234), "Unsupported(1234)"),
            (VcpuExit::SystemEvent(1, &[]), "SystemEvent"),
            (VcpuExit::Unknown, "Unknown"),
            (VcpuExit::MemoryFault { flags: 0, gpa: 0x1000, size: 4096 }, "MemoryFault"),
        ] {
            match handle_exit(0, exit, &mut io) {
                Next::Return(RunExit::Failed { why }) => {
                    assert!(why.starts_with("unhandled KVM exit: ") && why.contains(name), "{why}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn accesses_are_served_and_a_reservation_access_ends_the_run_by_default() {
        let (_topo, mut io) = io();
        assert_eq!(handle_exit(0, VcpuExit::IoOut(0x80, &[1]), &mut io), Next::Enter);
        let mut data = [0xffu8; 4];
        assert_eq!(handle_exit(0, VcpuExit::MmioRead(0xd000_0000, &mut data), &mut io), Next::Enter);
        assert_eq!(data, [0; 4], "unassigned memory reads 0");
        let mut data = [0xffu8; 4];
        let fault = AccessFault {
            space: Space::Memory,
            addr: 0xfee0_0030,
            size: 4,
            write: false,
            result: MemTxResult::ReservationAccess,
        };
        assert_eq!(
            handle_exit(0, VcpuExit::MmioRead(0xfee0_0030, &mut data), &mut io),
            Next::Return(RunExit::AccessFault(fault.clone()))
        );
        assert_eq!(data, [0; 4]);
        assert_eq!(
            fault.to_string(),
            "a 4-byte guest read from memory 0xfee00030 reached a reservation region (nothing serves it)"
        );

        io.set_reservation_policy(crate::backend::ReservationPolicy::Continue);
        assert_eq!(handle_exit(0, VcpuExit::MmioWrite(0xfee0_0030, &[1, 2]), &mut io), Next::Enter);
        assert_eq!(io.take_fault(), None);
    }

    #[test]
    fn the_run_ending_exits_map_to_their_run_exits() {
        let (_topo, mut io) = io();
        assert_eq!(handle_exit(0, VcpuExit::Shutdown, &mut io), Next::Return(RunExit::Shutdown));
        assert_eq!(handle_exit(0, VcpuExit::Intr, &mut io), Next::Return(RunExit::Kicked));
        assert_eq!(handle_exit(0, VcpuExit::Hlt, &mut io), Next::Halt);
        assert_eq!(handle_exit(0, VcpuExit::InternalError, &mut io), Next::InternalError);
        match handle_exit(0, VcpuExit::FailEntry(0x80000021, 3), &mut io) {
            Next::Return(RunExit::Failed { why }) => assert!(why.contains("0x80000021") && why.contains("cpu 3")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn internal_errors_are_described_with_their_kind_and_data() {
        let mut run = kvm_run { exit_reason: kvm_bindings::KVM_EXIT_INTERNAL_ERROR, ..Default::default() };
        // SAFETY: writing integers into the union member being described.
        unsafe {
            run.__bindgen_anon_1.internal.suberror = KVM_INTERNAL_ERROR_SIMUL_EX;
            run.__bindgen_anon_1.internal.ndata = 2;
            run.__bindgen_anon_1.internal.data[0] = 0x80000b0e;
            run.__bindgen_anon_1.internal.data[1] = 0x1000;
        }
        assert_eq!(
            describe_internal_error(&run),
            "KVM internal error 2 (exception while delivering an exception), data [0x80000b0e, 0x1000]"
        );
        // SAFETY: as above, through the emulation-failure view.
        unsafe {
            let e = &mut run.__bindgen_anon_1.emulation_failure;
            e.suberror = KVM_INTERNAL_ERROR_EMULATION;
            e.ndata = 3;
            e.flags = u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES);
            e.__bindgen_anon_1.__bindgen_anon_1.insn_size = 3;
            e.__bindgen_anon_1.__bindgen_anon_1.insn_bytes[..3].copy_from_slice(&[0x0f, 0x01, 0xc8]);
        }
        assert_eq!(
            describe_internal_error(&run),
            "KVM internal error 1 (emulation failure), instruction bytes [0f 01 c8]"
        );
    }

    #[test]
    fn only_unmasked_nmi_smi_and_init_deliveries_wake_a_halt_with_interrupts_off() {
        assert!(wakes_halted(0x400)); // NMI
        assert!(wakes_halted(0x200)); // SMI
        assert!(wakes_halted(0x500)); // INIT
        assert!(!wakes_halted(0x1_0400)); // masked NMI
        assert!(!wakes_halted(0x700)); // ExtINT
        assert!(!wakes_halted(0x30)); // fixed, vector 0x30
        assert!(!wakes_halted(0x1_0000)); // reset value
    }
}
