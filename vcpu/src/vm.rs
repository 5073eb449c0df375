//! A running VM: one thread per vCPU, the handles that pause, resume, kick
//! and stop them, and why the VM stopped.
//!
//! Each vCPU thread owns its backend and its [`VcpuIo`], and loops: ask the
//! [`Control`] whether it may enter guest code, run the backend, act on why
//! it returned. The first reason to stop the VM (the guest's debug-exit
//! write, a shutdown, a failure, a failed memory listener, the embedder)
//! is latched; every vCPU is then asked to stop and kicked.

use crate::backend::{IoCounters, IoCounts, RunExit, VcpuBackend, VcpuIo};
use crate::control::Control;
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
    halted: Mutex<Vec<bool>>,
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

    fn vcpu_halted(&self, vcpu: u32) {
        let all = {
            let mut h = self.halted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(slot) = h.get_mut(vcpu as usize) {
                *slot = true;
            }
            h.iter().all(|&x| x)
        };
        if all {
            self.stop(StopReason::AllHalted);
        }
    }
}

/// A handle on one vCPU.
#[derive(Debug, Clone)]
pub struct VcpuHandle {
    index: u32,
    control: Arc<Control>,
    counters: Arc<IoCounters>,
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

    /// What it is doing.
    pub fn activity(&self) -> crate::control::Activity {
        self.control.activity()
    }
}

/// A running VM's vCPU threads.
#[derive(Debug)]
pub struct Vm {
    vcpus: Vec<VcpuHandle>,
    threads: Vec<JoinHandle<()>>,
    latch: Arc<StopLatch>,
}

impl Vm {
    /// Starts one thread per backend (in index order), each dispatching
    /// through its own accessors on `memory` and `io`; stop reasons go to
    /// `latch`.
    pub fn start(
        backends: Vec<Box<dyn VcpuBackend>>,
        memory: &AddressSpace,
        io: &AddressSpace,
        latch: Arc<StopLatch>,
    ) -> Result<Vm> {
        let n = backends.len();
        *latch.halted.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = vec![false; n];
        let mut vcpus = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for (index, backend) in backends.into_iter().enumerate() {
            let index = index as u32;
            let control = Arc::new(Control::new(backend.kicker()));
            latch.controls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(control.clone());
            let io = VcpuIo::new(memory, io);
            let counters = io.counters();
            let (c, l) = (control.clone(), latch.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_thread(index, backend, io, &c, &l))
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
            vcpus.push(VcpuHandle { index, control, counters });
        }
        // A stop latched before every control was registered reaches them now.
        if latch.reason().is_some() {
            for v in &vcpus {
                v.control.stop();
            }
        }
        Ok(Vm { vcpus, threads, latch })
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// Pauses every vCPU; returns once all are out of guest code.
    pub fn pause(&self) {
        for v in &self.vcpus {
            v.control.request_pause();
        }
        for v in &self.vcpus {
            v.control.wait_paused();
        }
    }

    /// Resumes every vCPU.
    pub fn resume(&self) {
        for v in &self.vcpus {
            v.resume();
        }
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

fn vcpu_thread(index: u32, mut backend: Box<dyn VcpuBackend>, mut io: VcpuIo, control: &Control, latch: &StopLatch) {
    backend.on_thread_start();
    while control.may_enter() {
        match backend.run(&mut io) {
            Ok(RunExit::Kicked) => {}
            Ok(RunExit::Halted { .. }) => {
                // No backend here waits for interrupts in user space yet: a
                // halt that reaches the vCPU layer ends this vCPU.
                latch.vcpu_halted(index);
                break;
            }
            Ok(RunExit::Shutdown) => {
                latch.stop(StopReason::Shutdown { vcpu: index });
                break;
            }
            Ok(RunExit::Failed { why }) => {
                let registers = backend.dump();
                eprintln!("{registers}");
                latch.stop(StopReason::Failed { vcpu: index, why, registers });
                break;
            }
            Err(e) => {
                let registers = backend.dump();
                latch.stop(StopReason::Failed { vcpu: index, why: e.to_string(), registers });
                break;
            }
        }
    }
    backend.on_thread_exit();
    control.exited();
}
