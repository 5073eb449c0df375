//! A whole machine: the `pc` board on an accelerator, its vCPU threads, and
//! why it stopped. What `topos run` runs.

use crate::board::multiboot::MapOptions;
use crate::board::{BoardWiring, PcBoard, PcConfig};
use crate::error::{Error, Result};
use crate::kvm::KvmVm;
use crate::vm::{StopLatch, StopReason, Vm};
use std::sync::Arc;
use topos_runtime::{Fault, FaultHook, Topology};

/// How often a running machine checks whether every vCPU halted with
/// interrupts off (see [`Machine::run`]).
pub const HALT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Which accelerator runs the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM if `/dev/kvm` can be opened (the interpreter once it exists).
    Auto,
    /// KVM, or an error.
    Kvm,
    /// The x86 interpreter (not yet available).
    Interp,
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

/// A machine ready to run.
pub struct Machine {
    board: PcBoard,
    kvm: KvmVm,
    latch: Arc<StopLatch>,
    _fault_hook: FaultHook,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("board", &self.board).finish_non_exhaustive()
    }
}

impl Machine {
    /// Builds the board of `config` on `accel`.
    pub fn new(config: PcConfig, accel: Accel) -> Result<Machine> {
        match accel {
            Accel::Interp => {
                return Err(Error::Config("the x86 interpreter is not available yet: use --accel kvm".into()))
            }
            Accel::Auto | Accel::Kvm => {}
        }
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
        let kvm = KvmVm::new(&topo, &spaces.memory, &spaces.io_space)?;
        let l = latch.clone();
        let wiring = BoardWiring {
            interrupts: kvm.interrupt_sink(),
            irqchip: None,
            exit: Box::new(move |status: i32| l.stop(StopReason::DebugExit(status))),
            memory_map: MapOptions { kvm: true, amd: kvm.cpu_is_amd() },
        };
        let board = PcBoard::build(&topo, &spaces, config, wiring)?;
        Ok(Machine { board, kvm, latch, _fault_hook: fault_hook })
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
        for i in 0..u32::from(self.board.cpus) {
            let mut vcpu = self.kvm.create_vcpu(i)?;
            if let (0, Some(entry)) = (i, self.board.entry) {
                vcpu.enter_flat32(entry)?;
            }
            backends.push(Box::new(vcpu));
        }
        Vm::start(backends, &self.board.spaces.memory, &self.board.spaces.io_space, self.latch.clone())
    }

    /// Runs until the guest stops the machine; returns why.
    ///
    /// KVM's in-kernel interrupt controllers handle `hlt` without telling
    /// user space, so a guest whose vCPUs all halt with interrupts off
    /// would sit for ever (as under QEMU). While it runs, the machine asks
    /// every [`HALT_CHECK_INTERVAL`] whether that is the case
    /// ([`Vm::check_halted`]: each vCPU is paused for about an exit's time
    /// and answers from its kernel state), and stops it with
    /// [`StopReason::AllHalted`] if so.
    pub fn run(&self) -> Result<StopReason> {
        let vm = self.start()?;
        while self.latch.wait_timeout(HALT_CHECK_INTERVAL).is_none() {
            vm.check_halted();
        }
        Ok(vm.wait())
    }
}
