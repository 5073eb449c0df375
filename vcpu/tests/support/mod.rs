//! What the vCPU layer's integration tests share: finding `/dev/kvm` and
//! QEMU (and saying so when they are absent), running a program under a
//! watchdog, a small KVM machine to run guest code on, and bounded waits.
#![allow(dead_code)] // each test file uses a part

pub mod firmware_checks;
pub mod harness_asm;
pub mod qemu_shared_ram;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use topos_devices::debug_exit::{DebugExit, DebugExitConfig, CONVENTIONAL_IOBASE, PORTS};
use topos_devices::plug::{DeviceModel, PlugCtx};
use topos_devices::DeviceRuntime;
use topos_runtime::{MemoryRegion, StandardSpaces, Topology};
use topos_vcpu::backend::VcpuBackend;
use topos_vcpu::board::multiboot::Flat32Entry;
use topos_vcpu::control::Activity;
use topos_vcpu::kvm::{KvmVcpu, KvmVm};
use topos_vcpu::vm::{StopLatch, StopReason, Vm, VmOptions};

/// A run taking longer than this is killed and fails its test.
pub const WATCHDOG: Duration = Duration::from_secs(60);

/// Whether `/dev/kvm` can be opened; prints why a test skips if not.
pub fn kvm_present() -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}

/// `qemu-system-x86_64` on PATH; prints why a test skips if not.
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path).map(|dir| dir.join("qemu-system-x86_64")).find(|p| p.is_file());
    if found.is_none() {
        println!("skipped: qemu-system-x86_64 not found");
    }
    found
}

/// The number in the environment variable `name`, if it is set (panics if
/// it is not a number).
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

/// Which seeds a randomised test runs: `{prefix}_SEED=s` runs `s` alone
/// (and asks for it to be printed), else `{prefix}_CASES` (default
/// `default_count`) seeds from `{prefix}_FIRST` (default 0).
pub struct Seeds {
    pub first: u64,
    pub count: u64,
    /// One seed, printed even if it passes.
    pub verbose: bool,
}

impl Seeds {
    pub fn from_env(prefix: &str, default_count: u64) -> Seeds {
        if let Some(seed) = env_u64(&format!("{prefix}_SEED")) {
            return Seeds { first: seed, count: 1, verbose: true };
        }
        Seeds {
            first: env_u64(&format!("{prefix}_FIRST")).unwrap_or(0),
            count: env_u64(&format!("{prefix}_CASES")).unwrap_or(default_count),
            verbose: false,
        }
    }
}

/// A scratch directory, `name` and the process id in the temporary
/// directory; removed when dropped (also when a test fails), unless
/// [`Scratch::kept_if`]'s variable is set.
pub struct Scratch {
    pub dir: PathBuf,
    keep: Option<&'static str>,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        Scratch { dir, keep: None }
    }

    /// Kept (and said so) if the environment variable `var` is set.
    pub fn kept_if(mut self, var: &'static str) -> Scratch {
        self.keep = Some(var);
        self
    }

    /// Writes `bytes` to `name` in the directory; returns its path.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, bytes).expect("a scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep.is_some_and(|var| std::env::var_os(var).is_some()) {
            eprintln!("kept {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one run produced.
#[derive(Debug)]
pub struct Run {
    /// The exit status (`None` if killed by the watchdog or a signal).
    pub status: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `cmd` (stdin closed, output captured), killing it after
/// [`WATCHDOG`].
pub fn run_with_watchdog(cmd: &mut Command) -> Run {
    let start = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the program starts");
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the program") {
            break status.code();
        }
        if start.elapsed() > WATCHDOG {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// `topos run` with `args`, under the watchdog.
pub fn topos_run(args: &[&str]) -> Run {
    run_with_watchdog(Command::new(env!("CARGO_BIN_EXE_topos")).arg("run").args(args))
}

/// Polls `cond` (yielding) until it holds; fails the test after
/// [`WATCHDOG`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WATCHDOG;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::yield_now();
    }
}

/// Waits for `vm` to stop by itself and for its threads (every vCPU has
/// left when it returns); fails the test after [`WATCHDOG`].
pub fn wait_bounded(vm: Vm) -> StopReason {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let handles: Vec<_> = vm.vcpus().to_vec();
        let reason = vm.wait();
        assert!(handles.iter().all(|h| h.activity() == Activity::Exited));
        let _ = tx.send(reason);
    });
    rx.recv_timeout(WATCHDOG).expect("the VM did not stop")
}

/// A 64 KiB BIOS image whose reset vector jumps to `code` (real mode, at
/// offset 0xc000: `f000:c000` through the low alias); the rest is `hlt`.
pub fn bios_at_reset(code: &[u8]) -> Vec<u8> {
    let mut image = vec![0xf4u8; 64 << 10];
    image[0xc000..0xc000 + code.len()].copy_from_slice(code);
    // At 0xfff0 (IP 0xfff0, CS base 0xffff0000): jmp near 0xc000.
    let rel = (0xc000i32 - (0xfff0 + 3)) as i16;
    image[0xfff0] = 0xe9;
    image[0xfff1..0xfff3].copy_from_slice(&rel.to_le_bytes());
    image
}

/// A machine to run guest code on KVM: 1 MiB of RAM at 0 and
/// `isa-debug-exit` at 0xf4, whose requests stop the VM and are logged.
pub struct KvmMachine {
    /// The topology.
    pub topo: Topology,
    /// Its address spaces.
    pub spaces: StandardSpaces,
    /// The RAM.
    pub ram: MemoryRegion,
    /// The KVM VM.
    pub kvm: KvmVm,
    /// Where stop reasons go.
    pub latch: Arc<StopLatch>,
    /// Every status `isa-debug-exit` was asked for, in order (logged under
    /// the same lock as the stop, so the first entry is what the latch
    /// kept).
    pub exits: Arc<Mutex<Vec<i32>>>,
    /// The device runtime.
    pub rt: DeviceRuntime,
}

/// A [`KvmMachine`], or `None` (with the reason printed) without
/// `/dev/kvm`.
pub fn kvm_machine() -> Option<KvmMachine> {
    let topo = Topology::new();
    let spaces = topo.standard_spaces().unwrap();
    let ram = topo.new_ram("ram", 0x10_0000).unwrap();
    spaces.system.add_subregion(0, &ram).unwrap();
    let kvm = match KvmVm::new(&topo, &spaces.memory, &spaces.io_space) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("skipped: {e}");
            return None;
        }
    };
    let latch = Arc::new(StopLatch::default());
    let rt = DeviceRuntime::new().unwrap();
    let exits = Arc::new(Mutex::new(Vec::new()));
    let (l, log) = (latch.clone(), exits.clone());
    let sink = move |status: i32| {
        let mut log = log.lock().unwrap();
        log.push(status);
        l.stop(StopReason::DebugExit(status));
    };
    let exit = DebugExit::plug(DebugExitConfig::conventional(sink), PlugCtx::new(&topo, &rt, "debug-exit")).unwrap();
    exit.map(PORTS, &spaces.io, CONVENTIONAL_IOBASE).unwrap();
    Some(KvmMachine { topo, spaces, ram, kvm, latch, exits, rt })
}

impl KvmMachine {
    /// Copies `bytes` into RAM at `addr`.
    pub fn load(&self, addr: u64, bytes: &[u8]) {
        self.ram.ram().unwrap().write(addr, bytes).unwrap();
    }

    /// The 32-bit word of RAM at `addr`.
    pub fn read_u32(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ram.ram().unwrap().read(addr, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    /// vCPU `index` in flat 32-bit protected mode at `entry` (no GDT in
    /// memory: the segment registers are loaded directly), with an empty
    /// IDT, a stack of its own and, for an AP too, runnable at once.
    pub fn vcpu_flat32(&self, index: u32, entry: Flat32Entry) -> KvmVcpu {
        let mut v = self.kvm.create_vcpu(index).unwrap();
        v.enter_flat32(entry).unwrap();
        let mut sregs = v.fd().get_sregs().unwrap();
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        v.fd().set_sregs(&sregs).unwrap();
        let mut regs = v.fd().get_regs().unwrap();
        regs.rsp = 0x7000 + u64::from(index) * 0x100;
        v.fd().set_regs(&regs).unwrap();
        let runnable = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
        v.fd().set_mp_state(runnable).unwrap();
        v
    }

    /// Starts `vcpus` with `options`.
    pub fn start_with(&self, vcpus: Vec<KvmVcpu>, options: VmOptions) -> Vm {
        let backends = vcpus.into_iter().map(|v| Box::new(v) as Box<dyn VcpuBackend>).collect();
        Vm::start_with(backends, &self.spaces.memory, &self.spaces.io_space, self.latch.clone(), options).unwrap()
    }

    /// Starts `vcpus`.
    pub fn start(&self, vcpus: Vec<KvmVcpu>) -> Vm {
        self.start_with(vcpus, VmOptions::default())
    }
}
