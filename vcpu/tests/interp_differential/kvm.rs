//! The KVM runner: one VM and one vCPU for every case, put into the case's
//! mode with `KVM_SET_SREGS` (no mode-switching guest code), ended by the
//! case's `out` (or a fault stub's) exit to user space.

use super::case::Case;
use super::frame::{unwind, Frame};
use super::layout::*;
use super::outcome::{End, Outcome, State};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuExit;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;
use topos_runtime::{MemoryRegion, StandardSpaces, Topology};
use topos_vcpu::backend::VcpuBackend;
use topos_vcpu::control::Kick;
use topos_vcpu::kvm::{flat_segment, KvmVcpu, KvmVm};

/// How long one case may run on KVM before the watchdog kicks it out.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a case runs on KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Env {
    /// Real mode: CS = `CODE >> 4`, IP from 0; DS = ES = SS = FS = GS =
    /// `WINDOW >> 4`.
    Real,
    /// 32-bit protected mode, ring 0, no paging, flat segments.
    Prot32,
    /// Ring 3, 32-bit code: compatibility mode under long mode (4-level
    /// paging), flat segments (the rate probe: PVM emulates it).
    Compat3,
    /// Ring 3, 32-bit code: protected mode with PAE paging, flat segments
    /// (the rate probe: PVM cannot run it).
    Pae3,
    /// Ring 0, 32-bit code: protected mode with PAE paging (the rate probe:
    /// PVM cannot run it).
    Pae0,
    /// Ring 3, 64-bit code under long mode: native under PVM.
    Long3,
}

impl Env {
    /// Whether code runs at CPL 3.
    pub fn ring3(self) -> bool {
        matches!(self, Env::Compat3 | Env::Pae3 | Env::Long3)
    }
}

/// A segment with `selector`, flat 4 GiB (or a real-mode 64 KiB segment
/// at `selector << 4`), of `type_` at `dpl`.
fn segment(env: Env, selector: u16, type_: u8, code: bool) -> kvm_segment {
    if env == Env::Real {
        return kvm_segment {
            base: u64::from(selector) << 4,
            limit: 0xffff,
            selector,
            type_,
            present: 1,
            s: 1,
            ..Default::default()
        };
    }
    let long_code = code && env == Env::Long3;
    kvm_segment {
        dpl: (selector & 3) as u8,
        db: u8::from(!long_code),
        l: u8::from(long_code),
        ..flat_segment(selector, type_)
    }
}

/// The system registers of `env`, over `base` (the vCPU's current ones).
fn sregs_for(env: Env, mut s: kvm_sregs) -> kvm_sregs {
    let (cs, data) = match env {
        Env::Real => ((CODE >> 4) as u16, (WINDOW >> 4) as u16),
        Env::Prot32 | Env::Pae0 => (SEL_CODE32, SEL_DATA0),
        Env::Compat3 | Env::Pae3 => (SEL_CODE32_R3, SEL_DATA3),
        Env::Long3 => (SEL_CODE64_R3, SEL_DATA3),
    };
    s.cs = segment(env, cs, 0xb, true);
    for seg in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *seg = segment(env, data, 0x3, false);
    }
    s.gdt.base = GDT;
    s.gdt.limit = GDT_LIMIT;
    let (cr0, cr3, cr4, efer) = match env {
        Env::Real => (0x10, 0, 0, 0),
        Env::Prot32 => (0x31, 0, 0, 0),
        Env::Pae3 | Env::Pae0 => (0x8000_0031, PAE_PDPT, 0x20, 0),
        Env::Compat3 | Env::Long3 => (0x8000_0031, PML4, 0x20, 0x500),
    };
    (s.cr0, s.cr3, s.cr4, s.efer) = (cr0, cr3, cr4, efer);
    let (idt, idt_limit, tr, tss) = match env {
        Env::Real => (IVT, u16::from(VECTORS) * 4 - 1, 0, 0),
        Env::Prot32 | Env::Pae3 | Env::Pae0 => (IDT32, u16::from(VECTORS) * 8 - 1, SEL_TSS32, TSS32),
        Env::Compat3 | Env::Long3 => (IDT64, u16::from(VECTORS) * 16 - 1, SEL_TSS64, TSS64),
    };
    s.idt.base = idt;
    s.idt.limit = idt_limit;
    s.tr = kvm_segment { base: tss, limit: 0x67, selector: tr, type_: 0xb, present: 1, ..Default::default() };
    s
}

/// Kicks the vCPU out of a case that runs longer than [`CASE_TIMEOUT`].
struct Watchdog {
    arm: mpsc::Sender<bool>,
}

impl Watchdog {
    fn new(kicker: Arc<dyn Kick>) -> Watchdog {
        let (arm, armed) = mpsc::channel::<bool>();
        std::thread::spawn(move || {
            // `true`: a case starts; `false`: it ended.
            while let Ok(start) = armed.recv() {
                if !start {
                    continue;
                }
                match armed.recv_timeout(CASE_TIMEOUT) {
                    Ok(_) => {}
                    Err(RecvTimeoutError::Timeout) => {
                        kicker.kick();
                        let _ = armed.recv();
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        });
        Watchdog { arm }
    }
}

/// One KVM VM with one vCPU and the harness's RAM.
pub struct KvmRunner {
    vcpu: KvmVcpu,
    kicker: Arc<dyn Kick>,
    watchdog: Watchdog,
    /// Kept for the memslots.
    _vm: KvmVm,
    ram: MemoryRegion,
    _spaces: StandardSpaces,
    _topo: Topology,
    /// The sregs `KVM_GET_SREGS` gave at creation.
    initial_sregs: kvm_sregs,
}

impl KvmRunner {
    /// The runner, or why there is none (no `/dev/kvm`).
    pub fn new() -> Result<KvmRunner, String> {
        let topo = Topology::new();
        let spaces = topo.standard_spaces().map_err(|e| e.to_string())?;
        let ram = topo.new_ram("ram", RAM_SIZE.into()).map_err(|e| e.to_string())?;
        spaces.system.add_subregion(0, &ram).map_err(|e| e.to_string())?;
        let vm = KvmVm::new(&topo, &spaces.memory, &spaces.io_space).map_err(|e| e.to_string())?;
        let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
        vcpu.on_thread_start();
        let kicker = vcpu.kicker();
        let initial_sregs = vcpu.fd().get_sregs().map_err(|e| e.to_string())?;
        for (addr, bytes) in system_image() {
            ram.ram().unwrap().write(addr, &bytes).unwrap();
        }
        let watchdog = Watchdog::new(kicker.clone());
        Ok(KvmRunner { vcpu, kicker, watchdog, _vm: vm, ram, _spaces: spaces, _topo: topo, initial_sregs })
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.ram.ram().unwrap().write(addr, bytes).unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.ram.ram().unwrap().read(addr, &mut b).unwrap();
        b
    }

    /// Runs `code` (at [`CODE`]) in `env` from `start` over `window`.
    pub fn run(&mut self, env: Env, code: &[u8], start: &State, window: &[u8]) -> Outcome {
        assert!(code.len() <= CODE_MAX && window.len() == WINDOW_SIZE);
        self.write(CODE, code);
        self.write(WINDOW, window);
        // A fault in ring 3 leaves its frame here.
        self.write(RING0_STACK_TOP - 0x40, &[0; 0x40]);
        let fd = self.vcpu.fd();
        fd.set_sregs(&sregs_for(env, self.initial_sregs)).expect("KVM_SET_SREGS");
        let g = |i: usize| u64::from(start.gpr[i]);
        let regs = kvm_regs {
            rax: g(0),
            rcx: g(1),
            rdx: g(2),
            rbx: g(3),
            rsp: g(4),
            rbp: g(5),
            rsi: g(6),
            rdi: g(7),
            rip: u64::from(start.eip),
            rflags: u64::from(start.eflags),
            ..Default::default()
        };
        fd.set_regs(&regs).expect("KVM_SET_REGS");
        let _ = self.watchdog.arm.send(true);
        // Every exit ends the case: the code has no I/O but its last `out`.
        let end = match self.vcpu.fd().run() {
            Ok(VcpuExit::IoOut(port, _)) if port == TERMINATOR_PORT => End::Terminated,
            Ok(VcpuExit::IoOut(port, _)) if (FAULT_PORT_BASE..FAULT_PORT_BASE + u16::from(VECTORS)).contains(&port) => {
                End::Fault { vector: (port - FAULT_PORT_BASE) as u8, error_code: None }
            }
            Ok(VcpuExit::Shutdown) => End::Shutdown,
            Ok(VcpuExit::InternalError) => End::Other(self.internal_error()),
            Ok(other) => End::Other(format!("KVM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => End::Other(format!("no exit within {CASE_TIMEOUT:?}: kicked")),
            Err(e) => End::Other(format!("KVM_RUN: {e}")),
        };
        let _ = self.watchdog.arm.send(false);
        self.kicker.clear();
        let r = self.vcpu.fd().get_regs().expect("KVM_GET_REGS");
        let mut state = State {
            gpr: [r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi].map(|v| v as u32),
            eip: r.rip as u32,
            eflags: r.rflags as u32,
        };
        let end = match end {
            End::Terminated => {
                // KVM reports the `out` done: EIP is after it.
                state.eip = state.eip.wrapping_sub(2);
                End::Terminated
            }
            End::Fault { vector, .. } => self.unwind_fault(env, vector, &mut state),
            e => e,
        };
        Outcome { end, state, window: self.read(WINDOW, WINDOW_SIZE) }
    }

    /// A `KVM_EXIT_INTERNAL_ERROR`'s suberror and data.
    fn internal_error(&mut self) -> String {
        let run = self.vcpu.fd().get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which
        // the kernel fills the `internal` member; it holds integers only.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        format!("KVM internal error {}, data {:x?}", internal.suberror, &internal.data[..n])
    }

    /// Runs `case` in `env` ([`Env::Long3`]: its 64-bit code, natively on
    /// PVM), with EIP given in the case's own code: a case that reaches its
    /// final `out` ends [`End::Terminated`] at that `out` (in ring 3 the
    /// `out` raises #GP, IOPL being 0 underneath PVM, which counts as
    /// reaching it).
    pub fn run_case(&mut self, case: &Case, env: Env) -> Outcome {
        let code = if env == Env::Long3 { &case.code64 } else { &case.code };
        let mut out = self.run(env, code, &case.start, &case.window);
        match (&out.end, env) {
            (End::Fault { vector: 13, error_code: Some(0) }, Env::Long3) if out.state.eip == case.terminator64() => {
                out.end = End::Terminated;
                out.state.eip = case.terminator();
            }
            (End::Fault { .. }, Env::Long3) => out.state.eip = case.eip_from_64(out.state.eip),
            (End::Terminated, _) if out.state.eip != case.terminator() => {
                out.end = End::Other(format!("port {TERMINATOR_PORT:#x} written at {:#x}", out.state.eip));
            }
            _ => {}
        }
        out
    }

    /// Replaces the stub's state by the one the fault's frame saved.
    fn unwind_fault(&self, env: Env, vector: u8, state: &mut State) -> End {
        let frame = match env {
            Env::Real => Frame::Real,
            Env::Compat3 | Env::Long3 => Frame::Long,
            Env::Pae3 => Frame::Ring3,
            Env::Prot32 | Env::Pae0 => Frame::Prot32,
        };
        unwind(frame, vector, state, |addr, len| self.read(addr, len))
    }
}

impl Drop for KvmRunner {
    fn drop(&mut self) {
        // The kick no longer has a thread to signal.
        self.vcpu.on_thread_exit();
    }
}
