//! A whole machine: the `pc` board on an accelerator, its vCPU threads, and
//! why it stopped. What `topos run` runs.

use crate::board::multiboot::{MapOptions, ENTRY_CODE_SELECTOR, ENTRY_DATA_SELECTOR};
use crate::board::{BoardWiring, PcBoard, PcConfig};
use crate::error::{Error, Result};
use crate::interp::{CoalescedMmio, InterpVcpu};
use crate::kvm::KvmVm;
use crate::vm::{StopLatch, StopReason, Vm};
use std::sync::Arc;
use topos_devices::irqchip::Irqchip;
use topos_runtime::{Fault, FaultHook, Topology};

/// How often a running machine checks whether every vCPU halted with
/// interrupts off (see [`Machine::run`]).
pub const HALT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Which accelerator runs the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM where it is hardware-accelerated (`/dev/kvm` opens and the host
    /// CPU has `vmx` or `svm`), the interpreter otherwise: see
    /// [`Accel::resolve`].
    Auto,
    /// KVM, or an error.
    Kvm,
    /// The x86 interpreter.
    Interp,
}

impl Accel {
    /// What `Auto` means on this host: KVM when `/dev/kvm` can be opened
    /// and the host CPU has hardware virtualization (`vmx` or `svm` in
    /// `/proc/cpuinfo`); the interpreter otherwise — without `/dev/kvm`,
    /// and under a software hypervisor such as PVM, which emulates ring-0
    /// guest code in the kernel far slower than the interpreter runs it.
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto => {
                let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
                if kvm && host_has_hardware_virtualization() {
                    Accel::Kvm
                } else {
                    Accel::Interp
                }
            }
            other => other,
        }
    }
}

/// Whether the host CPU advertises VMX or SVM.
pub fn host_has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| {
        s.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    })
}

impl std::str::FromStr for Accel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Accel> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "interp" => Ok(Accel::Interp),
            other => Err(Error::Config(format!("unknown accelerator `{other}` (auto, kvm, interp)"))),
        }
    }
}

/// The accelerator a machine was built on.
enum Backend {
    Kvm(KvmVm),
    Interp { coalesced: CoalescedMmio, irqchip: Arc<Irqchip> },
}

/// A machine ready to run.
pub struct Machine {
    board: PcBoard,
    backend: Backend,
    latch: Arc<StopLatch>,
    _fault_hook: FaultHook,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("board", &self.board).finish_non_exhaustive()
    }
}

impl Machine {
    /// Builds the board of `config` on `accel` ([`Accel::Auto`] is
    /// [resolved](Accel::resolve) first).
    pub fn new(config: PcConfig, accel: Accel) -> Result<Machine> {
        let topo = Topology::new();
        let spaces = topo.standard_spaces()?;
        let latch = Arc::new(StopLatch::default());
        let l = latch.clone();
        let fault_hook: FaultHook = Arc::new(move |f: &Fault| {
            if let Fault::ListenerFailed(failure) = f {
                l.stop(StopReason::ListenerFailed(failure.to_string()));
            }
        });
        topo.set_fault_hook(Some(&fault_hook));
        let l = latch.clone();
        let exit = Box::new(move |status: i32| l.stop(StopReason::DebugExit(status)));
        let (backend, wiring) = match accel.resolve() {
            Accel::Interp => {
                let irqchip = Irqchip::try_new(u32::from(config.cpus))?;
                let wiring = BoardWiring {
                    interrupts: irqchip.interrupt_sink(),
                    irqchip: Some(irqchip.clone()),
                    exit,
                    memory_map: MapOptions { kvm: false, amd: crate::interp::cpuid::IS_AMD },
                };
                let coalesced = CoalescedMmio::install(&topo, &spaces.memory);
                (Backend::Interp { coalesced, irqchip }, wiring)
            }
            _ => {
                let kvm = KvmVm::new(&topo, &spaces.memory, &spaces.io_space)?;
                let wiring = BoardWiring {
                    interrupts: kvm.interrupt_sink(),
                    irqchip: None,
                    exit,
                    memory_map: MapOptions { kvm: true, amd: kvm.cpu_is_amd() },
                };
                (Backend::Kvm(kvm), wiring)
            }
        };
        let board = PcBoard::build(&topo, &spaces, config, wiring)?;
        Ok(Machine { board, backend, latch, _fault_hook: fault_hook })
    }

    /// The accelerator the machine runs on ([`Accel::Kvm`] or
    /// [`Accel::Interp`]).
    pub fn accel(&self) -> Accel {
        match self.backend {
            Backend::Kvm(_) => Accel::Kvm,
            Backend::Interp { .. } => Accel::Interp,
        }
    }

    /// The board.
    pub fn board(&self) -> &PcBoard {
        &self.board
    }

    /// The board, to take device handles out of it (a display takes the
    /// framebuffer's).
    pub fn board_mut(&mut self) -> &mut PcBoard {
        &mut self.board
    }

    /// The latch a stop reason goes to (an embedder may stop the machine).
    pub fn latch(&self) -> &Arc<StopLatch> {
        &self.latch
    }

    /// Starts the vCPUs from reset (the BSP at the reset vector, or at the
    /// `--kernel`'s entry; the APs waiting for INIT/SIPI).
    pub fn start(&self) -> Result<Vm> {
        let mut backends: Vec<Box<dyn crate::backend::VcpuBackend>> = Vec::new();
        let cpus = u32::from(self.board.cpus);
        for i in 0..cpus {
            match &self.backend {
                Backend::Kvm(kvm) => {
                    let mut vcpu = kvm.create_vcpu(i)?;
                    if let (0, Some(entry)) = (i, self.board.entry) {
                        vcpu.enter_flat32(entry)?;
                    }
                    backends.push(Box::new(vcpu));
                }
                Backend::Interp { coalesced, irqchip } => {
                    let spaces = &self.board.spaces;
                    let apic = irqchip.take_lapic(i).map(|a| Box::new(a) as Box<dyn crate::interp::Apic>);
                    let mut vcpu = InterpVcpu::new(&spaces.memory, &spaces.io_space, i, cpus, apic);
                    vcpu.cpu().set_coalesced_buffer(coalesced.buffer());
                    if let (0, Some(entry)) = (i, self.board.entry) {
                        // As the KVM backend and QEMU's multiboot loader
                        // leave it.
                        let st = vcpu.cpu().state_mut();
                        st.enter_flat32_with(entry.eip, ENTRY_CODE_SELECTOR, ENTRY_DATA_SELECTOR);
                        st.gpr[0] = entry.eax;
                        st.gpr[3] = entry.ebx;
                    }
                    backends.push(Box::new(vcpu));
                }
            }
        }
        let vm = Vm::start(backends, &self.board.spaces.memory, &self.board.spaces.io_space, self.latch.clone())?;
        if let Backend::Interp { irqchip, .. } = &self.backend {
            // What the interrupt controllers post to a vCPU wakes it.
            for h in vm.vcpus() {
                let h = h.clone();
                irqchip.set_waker(h.index(), Arc::new(move || h.kick()));
            }
        }
        Ok(vm)
    }

    /// Runs until the guest stops the machine; returns why.
    ///
    /// KVM's in-kernel interrupt controllers handle `hlt` without telling
    /// user space, so a guest whose vCPUs all halt with interrupts off
    /// would sit for ever (as under QEMU). While it runs, the machine asks
    /// every [`HALT_CHECK_INTERVAL`] whether that is the case
    /// ([`Vm::check_halted`]: each vCPU is paused for about an exit's time
    /// and answers from its kernel state), and stops it with
    /// [`StopReason::AllHalted`] if so. The interpreter reports its halts
    /// itself (the VM stops as the last vCPU halts for good) and needs no
    /// such check.
    pub fn run(&self) -> Result<StopReason> {
        let vm = self.start()?;
        if matches!(self.backend, Backend::Kvm(_)) {
            while self.latch.wait_timeout(HALT_CHECK_INTERVAL).is_none() {
                vm.check_halted();
            }
        }
        Ok(vm.wait())
    }
}
