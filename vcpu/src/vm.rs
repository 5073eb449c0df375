//! A running VM: one thread per vCPU, the handles that pause, resume, kick
//! and stop them, and why the VM stopped.
//!
//! Each vCPU thread owns its backend and its [`VcpuIo`], and loops: ask the
//! [`Control`] whether it may enter guest code, run the backend, act on why
//! it returned. The first reason to stop the VM (the guest's debug-exit
//! write, a shutdown, a failure, a failed memory listener, the embedder)
//! is latched; every vCPU is then asked to stop and kicked.
//!
//! ## Guest input is data
//!
//! No guest action panics, hangs or aborts the host; each ends in one of
//! the [`StopReason`]s, once, with every vCPU thread joined:
//!
//! | the guest... | the VM |
//! | --- | --- |
//! | writes `isa-debug-exit` (any number of times, from any vCPU) | stops with the first status: [`StopReason::DebugExit`] |
//! | triple-faults | [`StopReason::Shutdown`] (PVM may report an emulation failure instead: [`StopReason::Failed`]) |
//! | runs what KVM cannot (an emulation failure, an exit the backend does not serve, a failed entry) | [`StopReason::Failed`], with the exit named and the registers |
//! | reaches a reservation region | [`StopReason::Failed`] naming the access, unless [`VmOptions::reservations`] says to go on (see [`ReservationPolicy`]) |
//! | makes a device model panic | an actor device is marked failed and answers as unassigned, the VM goes on; a panic that reaches the vCPU thread (plain `MemoryRegionOps`, a backend bug) is caught: [`StopReason::Failed`] |
//! | halts every vCPU with interrupts off | [`StopReason::AllHalted`]: at once when the backend reports halts ([`RunExit::Halted`]); on KVM's in-kernel irqchip, which reports nothing, when [`Vm::check_halted`] is asked |
//! | halts with interrupts on, or loops for ever | nothing: it may be woken; [`Vm::stop`] and dropping the [`Vm`] still end it promptly (the kick interrupts `KVM_RUN`, in a halt too) |
//!
//! ## Every vCPU halted
//!
//! A backend that returns on `hlt` lets the vCPU layer count halts: a vCPU
//! halted with interrupts off can only be woken by another vCPU (INIT,
//! SIPI, an NMI IPI), so once every vCPU is, nothing ever runs again and
//! the VM stops with [`StopReason::AllHalted`] (see [`crate::control`] for
//! why a wake-up racing the last halt cannot be missed).
//!
//! KVM with the in-kernel irqchip handles `hlt` in the kernel: the vCPU
//! thread blocks inside `KVM_RUN` and user space hears nothing, so no
//! event says "every vCPU is halted" (QEMU, Firecracker and
//! cloud-hypervisor leave such a guest sitting; cloud-hypervisor issue
//! 6835). The check is made when asked ([`Vm::check_halted`]; `topos run`'s
//! [`Machine::run`](crate::machine::Machine::run) asks once a second, and
//! the answer is exact whenever it is asked, not a guess from a timeout):
//! every vCPU is paused, reports from
//! the kernel's state whether it could still run
//! ([`VcpuBackend::liveness`]), and the VM stops only if none can; if any
//! can, the check resumes the vCPUs it paused and the guest does not
//! notice (KVM keeps a vCPU halted across the `KVM_RUN` that a pause
//! interrupts).

use crate::backend::{IoCounters, IoCounts, Liveness, ReservationPolicy, RunExit, VcpuBackend, VcpuIo};
use crate::control::{Control, HaltGroup};
use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use topos_runtime::AddressSpace;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote to `isa-debug-exit`; the status is QEMU's
    /// `(value << 1) | 1`.
    DebugExit(i32),
    /// Every vCPU halted and none can be woken.
    AllHalted,
    /// The guest shut the machine down (triple fault) on `vcpu`.
    Shutdown {
        /// The vCPU that shut down.
        vcpu: u32,
    },
    /// `vcpu` met something it cannot run.
    Failed {
        /// The vCPU.
        vcpu: u32,
        /// One line.
        why: String,
        /// Its registers.
        registers: String,
    },
    /// A memory listener (the KVM memslot mirror) failed: guest memory no
    /// longer matches the topology.
    ListenerFailed(String),
    /// The embedder stopped it.
    Requested,
}

impl StopReason {
    /// The process exit status `topos run` gives for it: the guest's status
    /// for a debug exit, 0 for a clean halt or an embedder's stop, 2 for a
    /// shutdown, 3 for a failure.
    pub fn exit_status(&self) -> i32 {
        match self {
            StopReason::DebugExit(status) => *status,
            StopReason::AllHalted | StopReason::Requested => 0,
            StopReason::Shutdown { .. } => 2,
            StopReason::Failed { .. } | StopReason::ListenerFailed(_) => 3,
        }
    }

    /// One line for stderr.
    pub fn describe(&self) -> String {
        match self {
            StopReason::DebugExit(status) => format!("the guest exited through isa-debug-exit with status {status}"),
            StopReason::AllHalted => "every vCPU halted".to_string(),
            StopReason::Shutdown { vcpu } => format!("vCPU {vcpu} shut the machine down (triple fault)"),
            StopReason::Failed { vcpu, why, .. } => format!("vCPU {vcpu} failed: {why}"),
            StopReason::ListenerFailed(why) => format!("a memory listener failed: {why}"),
            StopReason::Requested => "stopped".to_string(),
        }
    }
}

/// The latch of the first stop reason, shared by the vCPU threads, the
/// devices and the embedder.
#[derive(Debug, Default)]
pub struct StopLatch {
    reason: Mutex<Option<StopReason>>,
    latched: Condvar,
    controls: Mutex<Vec<Arc<Control>>>,
}

impl StopLatch {
    /// Records `reason` if it is the first, and asks every vCPU to stop.
    /// Never blocks on a vCPU (a device handler may call it).
    pub fn stop(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if r.is_some() {
                return;
            }
            tracing::info!(reason = %reason.describe(), "VM stopping");
            *r = Some(reason);
            self.latched.notify_all();
        }
        for c in self.controls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            c.stop();
        }
    }

    /// The reason, if the VM stopped.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Waits for a reason.
    pub fn wait(&self) -> StopReason {
        let mut r = self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(reason) = r.as_ref() {
                return reason.clone();
            }
            r = self.latched.wait(r).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Waits for a reason at most `timeout`; `None` if there is none yet.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<StopReason> {
        let r = self.reason.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (r, _) = self
            .latched
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.clone()
    }
}

/// How a VM treats what its guest does, beyond what the backend decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmOptions {
    /// What a guest access to a reservation region does (stop, by
    /// default).
    pub reservations: ReservationPolicy,
}

/// A request from [`Vm::check_halted`] and its vCPU's answer, given as the
/// vCPU parks for the check's pause and withdrawn before it runs again.
#[derive(Debug, Default)]
struct Probe {
    requested: crate::sync::AtomicBool,
    answer: crate::sync::Mutex<Option<Liveness>>,
}

/// A handle on one vCPU.
#[derive(Debug, Clone)]
pub struct VcpuHandle {
    index: u32,
    control: Arc<Control>,
    counters: Arc<IoCounters>,
    probe: Arc<Probe>,
    /// The Linux thread ID of its thread while it runs, else 0.
    tid: Arc<std::sync::atomic::AtomicI32>,
}

impl VcpuHandle {
    /// The vCPU's index (its APIC ID).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Makes it leave guest code once and re-enter.
    pub fn kick(&self) {
        self.control.kick();
    }

    /// Pauses it; returns once it is out of guest code.
    pub fn pause(&self) {
        self.control.pause();
    }

    /// Lets it run again.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// The MMIO and port accesses it dispatched through the runtime (exits,
    /// on KVM).
    pub fn io_counts(&self) -> IoCounts {
        self.counters.get()
    }

    /// The Linux thread ID of its thread, from when the thread starts until
    /// it leaves (for pinning, or for watching it in `/proc`).
    pub fn thread_id(&self) -> Option<i32> {
        match self.tid.load(std::sync::atomic::Ordering::Acquire) {
            0 => None,
            tid => Some(tid),
        }
    }

    /// What it is doing.
    pub fn activity(&self) -> crate::control::Activity {
        self.control.activity()
    }
}

/// A running VM's vCPU threads.
///
/// Dropping it stops the VM (if nothing has) and joins every thread.
#[derive(Debug)]
pub struct Vm {
    vcpus: Vec<VcpuHandle>,
    threads: Vec<JoinHandle<()>>,
    latch: Arc<StopLatch>,
    /// Serializes [`pause`](Vm::pause), [`resume`](Vm::resume) and
    /// [`check_halted`](Vm::check_halted); true while paused by
    /// [`pause`](Vm::pause).
    ops: Mutex<bool>,
}

impl Vm {
    /// Starts one thread per backend (in index order), each dispatching
    /// through its own accessors on `memory` and `io`; stop reasons go to
    /// `latch`. With the default [`VmOptions`].
    pub fn start(
        backends: Vec<Box<dyn VcpuBackend>>,
        memory: &AddressSpace,
        io: &AddressSpace,
        latch: Arc<StopLatch>,
    ) -> Result<Vm> {
        Vm::start_with(backends, memory, io, latch, VmOptions::default())
    }

    /// [`start`](Vm::start) with `options`.
    pub fn start_with(
        backends: Vec<Box<dyn VcpuBackend>>,
        memory: &AddressSpace,
        io: &AddressSpace,
        latch: Arc<StopLatch>,
        options: VmOptions,
    ) -> Result<Vm> {
        let n = backends.len();
        let group = HaltGroup::new(n);
        let mut vcpus = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for (index, backend) in backends.into_iter().enumerate() {
            let index = index as u32;
            let control = Arc::new(Control::in_group(backend.kicker(), group.clone()));
            latch.controls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(control.clone());
            let mut io = VcpuIo::new(memory, io);
            io.set_reservation_policy(options.reservations);
            let counters = io.counters();
            let probe = Arc::new(Probe::default());
            let tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
            let (c, l, p, id) = (control.clone(), latch.clone(), probe.clone(), tid.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // SAFETY: `gettid` has no preconditions.
                    id.store(unsafe { libc::gettid() }, std::sync::atomic::Ordering::Release);
                    vcpu_thread(index, backend, io, &c, &l, &p);
                    id.store(0, std::sync::atomic::Ordering::Release);
                })
                .map_err(Error::Thread);
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    latch.stop(StopReason::Requested);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
            vcpus.push(VcpuHandle { index, control, counters, probe, tid });
        }
        // A stop latched before every control was registered reaches them now.
        if latch.reason().is_some() {
            for v in &vcpus {
                v.control.stop();
            }
        }
        Ok(Vm { vcpus, threads, latch, ops: Mutex::new(false) })
    }

    fn ops(&self) -> std::sync::MutexGuard<'_, bool> {
        self.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// Pauses every vCPU; returns once all are out of guest code.
    pub fn pause(&self) {
        let mut paused = self.ops();
        *paused = true;
        for v in &self.vcpus {
            v.control.request_pause();
        }
        for v in &self.vcpus {
            v.control.wait_paused();
        }
    }

    /// Resumes every vCPU.
    pub fn resume(&self) {
        let mut paused = self.ops();
        *paused = false;
        for v in &self.vcpus {
            v.resume();
        }
    }

    /// Checks whether every vCPU is halted for good (each halted with
    /// interrupts off and nothing but another vCPU able to wake it, or
    /// waiting for INIT/SIPI); if so stops the VM with
    /// [`StopReason::AllHalted`] and returns `true`. Otherwise the vCPUs
    /// go on and it returns `false`.
    ///
    /// The backends that report halts themselves stop the VM without it;
    /// this is for those that do not (KVM with the in-kernel irqchip: see
    /// the [module documentation](self)). It pauses every vCPU, asks each
    /// for its [`Liveness`] as it parks, decides, and resumes those it
    /// paused. While the VM is paused ([`pause`](Vm::pause)) nothing is
    /// asked and the answer is `false`; a vCPU paused through its
    /// [`VcpuHandle`] cannot answer, which makes it `false` too.
    pub fn check_halted(&self) -> bool {
        all_dead(&self.probe(true))
    }

    /// Each vCPU's [`Liveness`], asked as in
    /// [`check_halted`](Self::check_halted) (but never stopping the VM);
    /// `None` for a vCPU that could not answer (paused, or gone).
    pub fn liveness(&self) -> Vec<Option<Liveness>> {
        self.probe(false)
    }

    fn probe(&self, stop_if_dead: bool) -> Vec<Option<Liveness>> {
        use crate::sync::Ordering;
        let paused = self.ops();
        if *paused || self.latch.reason().is_some() {
            return vec![None; self.vcpus.len()];
        }
        // An answer left from an earlier check stays valid while its vCPU
        // has not run since (it clears it before it runs): a vCPU that a
        // resume has not yet let go parks again without a new answer.
        for v in &self.vcpus {
            v.probe.requested.store(true, Ordering::SeqCst);
        }
        for v in &self.vcpus {
            v.control.request_pause();
        }
        for v in &self.vcpus {
            v.control.wait_paused();
        }
        let answers: Vec<Option<Liveness>> = self
            .vcpus
            .iter()
            .map(|v| {
                v.probe.requested.store(false, Ordering::SeqCst);
                *v.probe.answer.lock()
            })
            .collect();
        tracing::debug!(?answers, "vCPU liveness");
        if stop_if_dead && all_dead(&answers) {
            self.latch.stop(StopReason::AllHalted);
        } else {
            for (v, a) in self.vcpus.iter().zip(&answers) {
                if a.is_some() {
                    v.control.resume();
                }
            }
        }
        answers
    }

    /// Stops the VM (if nothing else has) and waits for its threads.
    pub fn stop(self) -> StopReason {
        self.latch.stop(StopReason::Requested);
        self.join()
    }

    /// Waits until the VM stops by itself (or by the latch), then for its
    /// threads; returns why it stopped.
    pub fn wait(self) -> StopReason {
        let reason = self.latch.wait();
        let _ = self.join();
        reason
    }

    fn join(mut self) -> StopReason {
        self.join_threads();
        self.latch.reason().unwrap_or(StopReason::Requested)
    }

    fn join_threads(&mut self) {
        for t in std::mem::take(&mut self.threads) {
            // The thread contains its panics (see `vcpu_thread`); this is
            // for one that escaped anyway.
            if t.join().is_err() {
                self.latch.stop(StopReason::Failed {
                    vcpu: u32::MAX,
                    why: "a vCPU thread panicked".into(),
                    registers: String::new(),
                });
            }
        }
    }
}

impl Drop for Vm {
    /// A VM dropped while running is stopped and its threads joined.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.latch.stop(StopReason::Requested);
            self.join_threads();
        }
    }
}

/// Marks the vCPU exited however its thread leaves (a panic included), so
/// that no pause or stop waits for it for ever.
struct ExitGuard<'a>(&'a Control);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        self.0.exited();
    }
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn vcpu_thread(
    index: u32,
    mut backend: Box<dyn VcpuBackend>,
    mut io: VcpuIo,
    control: &Control,
    latch: &StopLatch,
    probe: &Probe,
) {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let _exit = ExitGuard(control);
    // A panic on this thread (device code reached through plain
    // `MemoryRegionOps`, a backend bug) stops the VM with a reason instead
    // of leaving the other vCPUs running and every waiter waiting.
    let ran = catch_unwind(AssertUnwindSafe(|| {
        backend.on_thread_start();
        run_vcpu(index, &mut *backend, &mut io, control, latch, probe);
    }));
    if let Err(payload) = ran {
        let why = format!("the vCPU thread panicked: {}", panic_message(&*payload));
        let registers = catch_unwind(AssertUnwindSafe(|| backend.dump()))
            .unwrap_or_else(|_| format!("vcpu {index}: registers unavailable"));
        eprintln!("{registers}");
        latch.stop(StopReason::Failed { vcpu: index, why, registers });
    }
    let _ = catch_unwind(AssertUnwindSafe(|| backend.on_thread_exit()));
}

fn run_vcpu(
    index: u32,
    backend: &mut dyn VcpuBackend,
    io: &mut VcpuIo,
    control: &Control,
    latch: &StopLatch,
    probe: &Probe,
) {
    use crate::sync::Ordering;
    // Whether the last run ended in a halt (and with which IF): that is
    // the vCPU's liveness until it runs again.
    let mut last_halt: Option<bool> = None;
    // Whether `probe` holds an answer of this thread's, to clear before it
    // runs again.
    let mut answered = false;
    let fail = |backend: &mut dyn VcpuBackend, why: String| {
        let registers = backend.dump();
        eprintln!("{registers}");
        latch.stop(StopReason::Failed { vcpu: index, why, registers });
    };
    loop {
        let may_enter = control.may_enter_with(|| {
            if probe.requested.load(Ordering::SeqCst) {
                let liveness = match last_halt {
                    Some(true) => Liveness::Waiting,
                    Some(false) => Liveness::Dead,
                    None => backend.liveness(),
                };
                *probe.answer.lock() = Some(liveness);
                answered = true;
            }
        });
        if !may_enter {
            break;
        }
        if answered {
            *probe.answer.lock() = None;
            answered = false;
        }
        let seen = control.kicks();
        let exit = backend.run(io);
        last_halt = None;
        // An access the policy stops on wins over whatever the backend
        // returned with it.
        let exit = match io.take_fault() {
            Some(fault) => Ok(RunExit::AccessFault(fault)),
            None => exit,
        };
        match exit {
            Ok(RunExit::Kicked) => {}
            Ok(RunExit::Halted { interrupts_enabled }) => {
                last_halt = Some(interrupts_enabled);
                if control.halt(seen, !interrupts_enabled) {
                    latch.stop(StopReason::AllHalted);
                }
            }
            Ok(RunExit::Shutdown) => {
                latch.stop(StopReason::Shutdown { vcpu: index });
                break;
            }
            Ok(RunExit::Failed { why }) => {
                fail(backend, why);
                break;
            }
            Ok(RunExit::AccessFault(fault)) => {
                fail(backend, fault.to_string());
                break;
            }
            Err(e) => {
                fail(backend, e.to_string());
                break;
            }
        }
    }
}

/// Whether every vCPU answered, and answered that it is halted for good.
fn all_dead(answers: &[Option<Liveness>]) -> bool {
    !answers.is_empty() && answers.iter().all(|a| *a == Some(Liveness::Dead))
}
