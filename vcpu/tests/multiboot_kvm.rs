//! `topos run --kernel` (issue 8, acceptance 3): the multiboot test kernel,
//! as ELF and as an a.out-kludge image, boots on topos's `pc` board under
//! KVM, reads its command line and memory map from the Multiboot
//! information and the CPU count from `fw_cfg`, and exits through
//! `isa-debug-exit`; and, where QEMU is installed, QEMU on KVM prints the
//! same lines for the same kernel. Skipped with a printed reason without
//! `/dev/kvm` (or QEMU, for the comparison).

mod support;

use std::path::Path;
use std::process::Command;
use support::{find_qemu, kvm_present, run_with_watchdog, topos_run, Run, Scratch};
use topos_vcpu::board::memory_map::split_ram;
use topos_vcpu::board::multiboot::{memory_map, MapOptions};
use topos_vcpu::firmware::multiboot_kernel::{Boot, MmapEntry};
use topos_vcpu::firmware::{self, transcript, KernelFormat};

const APPEND: &str = "hello topos";
/// Where the kernel's transcript starts (QEMU's SeaBIOS prints before it).
const FIRST_LINE: &str = "multiboot: magic ";

/// What topos's board gives the kernel with `ram` bytes and `ncpus` CPUs.
fn expected(kernel: &Path, ram: u64, ncpus: u32) -> Boot {
    let (below, above) = split_ram(ram);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
    let amd = topos_vcpu::kvm::vm::cpu_is_amd(&cpuid);
    let mmap = memory_map(below, above, MapOptions { kvm: true, amd });
    Boot {
        cmdline: format!("{} {APPEND}", kernel.display()),
        mem_lower_kib: 639,
        mem_upper_kib: mmap[3].1 as u32 / 1024,
        mmap: mmap.iter().map(|&(base, length, kind)| MmapEntry { base, length, kind }).collect(),
        ncpus,
    }
}

fn write_kernel(format: KernelFormat, tag: &str) -> (Scratch, std::path::PathBuf) {
    let scratch = Scratch::new(&format!("topos-mb-kvm-{tag}-{format:?}"));
    let path = scratch.file("kernel", &firmware::multiboot_kernel(format).unwrap());
    (scratch, path)
}

fn boots_on_topos(format: KernelFormat, mem: &str, ram: u64) {
    if !kvm_present() {
        return;
    }
    let (scratch, path) = write_kernel(format, mem);
    let kernel = path.display().to_string();
    let run = topos_run(&["--accel", "kvm", "--kernel", &kernel, "--append", APPEND, "-m", mem, "--smp", "2"]);
    drop(scratch);
    let context = format!("{format:?} -m {mem}: {:?}\nstdout:\n{}\nstderr:\n{}", run.status, run.stdout, run.stderr);
    assert_eq!(run.status, Some(firmware::QEMU_STATUS_PASS), "{context}");
    if let Err(e) = transcript::check(&run.stdout, &expected(&path, ram, 2).expected_lines()) {
        panic!("{e}\n{context}");
    }
}

#[test]
fn elf_kernel_boots_on_topos_256m() {
    boots_on_topos(KernelFormat::Elf, "256M", 256 << 20);
}

#[test]
fn aout_kludge_kernel_boots_on_topos_256m() {
    boots_on_topos(KernelFormat::AoutKludge, "256M", 256 << 20);
}

#[test]
fn elf_kernel_boots_on_topos_4g_with_ram_above_4g() {
    boots_on_topos(KernelFormat::Elf, "4G", 4 << 30);
}

/// The kernel's transcript from a run's output.
fn transcript_of(run: &Run) -> &str {
    run.stdout.find(FIRST_LINE).map_or(run.stdout.as_str(), |at| &run.stdout[at..])
}

#[test]
fn topos_and_qemu_on_kvm_print_the_same_lines() {
    if !kvm_present() {
        return;
    }
    let Some(qemu) = find_qemu() else { return };
    for (format, mem) in [(KernelFormat::Elf, "256M"), (KernelFormat::AoutKludge, "4G")] {
        let (scratch, path) = write_kernel(format, &format!("cmp{mem}"));
        let kernel = path.display().to_string();
        let ours = topos_run(&["--accel", "kvm", "--kernel", &kernel, "--append", APPEND, "-m", mem, "--smp", "2"]);
        let theirs = run_with_watchdog(
            Command::new(&qemu)
                .args(["-machine", "pc", "-accel", "kvm", "-m", mem, "-smp", "2"])
                .args(["-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio", "-kernel"])
                .arg(&path)
                .args(["-append", APPEND, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]),
        );
        drop(scratch);
        if theirs.status != Some(firmware::QEMU_STATUS_PASS) {
            println!("skipped: QEMU on KVM did not run the kernel here: {:?}\n{}", theirs.status, theirs.stderr);
            return;
        }
        assert_eq!(ours.status, theirs.status);
        assert_eq!(transcript_of(&ours), transcript_of(&theirs), "{format:?} -m {mem}");
    }
}
