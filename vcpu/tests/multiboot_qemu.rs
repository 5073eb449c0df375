//! The multiboot test kernel: its headers, and a boot of both formats with
//! QEMU's own multiboot loader (`-kernel FILE -append "hello topos"` on the
//! `pc` machine, TCG), checked line for line against the transcript QEMU
//! prints, which is pinned here for topos's loader to match. The QEMU runs
//! skip, saying so, when `qemu-system-x86_64` is not on PATH. The same
//! kernel on topos's interpreter must print the pinned TCG transcript.

use std::path::Path;
use std::process::Command;

mod support;

use support::{find_qemu, run_with_watchdog, Run, Scratch};
use topos_vcpu::firmware::multiboot_kernel::{self as mbk, Boot, MmapEntry};
use topos_vcpu::firmware::{self, transcript, KernelFormat};

/// What the tests pass with `-append`.
const APPEND: &str = "hello topos";

/// The start of the kernel's first line. On QEMU, SeaBIOS prints its
/// banner and `Booting from ROM..` on COM1 first, with no newline after it.
const FIRST_LINE: &str = "multiboot: magic ";

/// What the kernel prints on QEMU 7.2 (SeaBIOS 1.16.2, TCG's default
/// `qemu64` CPU) with `-m 256M -smp 2 -kernel {kernel} -append "hello
/// topos"`, in both formats, from its first line on.
const QEMU_256M: &str = "\
multiboot: magic ok
cmdline: {kernel} hello topos
mem: lower 639 KiB, upper 260992 KiB
mmap: 0000000000000000 000000000009fc00 1
mmap: 000000000009fc00 0000000000000400 2
mmap: 00000000000f0000 0000000000010000 2
mmap: 0000000000100000 000000000fee0000 1
mmap: 000000000ffe0000 0000000000020000 2
mmap: 00000000fffc0000 0000000000040000 2
mmap: 000000fd00000000 0000000300000000 2
cpus: 2
result: pass
";

/// The same with `-m 4G`: RAM below 4 GiB ends at 3 GiB, the other GiB is
/// at 4 GiB.
const QEMU_4G: &str = "\
multiboot: magic ok
cmdline: {kernel} hello topos
mem: lower 639 KiB, upper 3144576 KiB
mmap: 0000000000000000 000000000009fc00 1
mmap: 000000000009fc00 0000000000000400 2
mmap: 00000000000f0000 0000000000010000 2
mmap: 0000000000100000 00000000bfee0000 1
mmap: 00000000bffe0000 0000000000020000 2
mmap: 00000000fffc0000 0000000000040000 2
mmap: 0000000100000000 0000000040000000 1
mmap: 000000fd00000000 0000000300000000 2
cpus: 2
result: pass
";

/// `transcript`'s lines, exactly, with `{kernel}` replaced by `kernel`.
fn expected(transcript: &str, kernel: &Path) -> Vec<transcript::ExpectedLine> {
    let transcript = transcript.replace("{kernel}", &kernel.display().to_string());
    transcript.lines().map(|l| transcript::ExpectedLine::Exact(l.to_owned())).collect()
}

/// The little-endian dword at `offset`.
fn dword(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

/// The offset of the multiboot header: the first 4-aligned magic in the
/// first 8 KiB whose checksum holds, as a loader looks for it.
fn find_header(kernel: &[u8]) -> Option<usize> {
    (0..kernel.len().min(8192) - 12).step_by(4).find(|&i| {
        let (magic, flags, checksum) = (dword(kernel, i), dword(kernel, i + 4), dword(kernel, i + 8));
        magic == 0x1bad_b002 && magic.wrapping_add(flags).wrapping_add(checksum) == 0
    })
}

fn kernel(format: KernelFormat) -> Vec<u8> {
    firmware::multiboot_kernel(format).expect("the kernel assembles")
}

#[test]
fn header_is_in_the_first_8k_with_page_align_and_memory_info() {
    for format in [KernelFormat::Elf, KernelFormat::AoutKludge] {
        let k = kernel(format);
        let at = find_header(&k).expect("a multiboot header");
        assert_eq!(at, mbk::HEADER_OFFSET as usize, "{format:?}");
        let flags = dword(&k, at + 4);
        let addresses = if format == KernelFormat::AoutKludge { 1 << 16 } else { 0 };
        assert_eq!(flags, 0b11 | addresses, "{format:?}");
    }
}

#[test]
fn elf_is_an_elf32_executable_loading_at_1m() {
    let k = kernel(KernelFormat::Elf);
    assert_eq!(&k[..7], b"\x7fELF\x01\x01\x01");
    let half = |o: usize| u16::from_le_bytes([k[o], k[o + 1]]);
    assert_eq!((half(16), half(18)), (2, 3), "ET_EXEC, EM_386");
    assert_eq!(dword(&k, 24), 0x10_1000, "e_entry");
    assert_eq!((dword(&k, 28), half(42), half(44)), (52, 32, 1), "e_phoff, e_phentsize, e_phnum");
    let ph: Vec<u32> = (0..8).map(|i| dword(&k, 52 + 4 * i)).collect();
    // p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align
    assert_eq!(ph, [1, 0, 0x10_0000, 0x10_0000, k.len() as u32, 0x4000, 7, 0x1000]);
}

#[test]
fn aout_kludge_header_addresses_cover_the_file_and_bss() {
    let k = kernel(KernelFormat::AoutKludge);
    let at = mbk::HEADER_OFFSET as usize;
    let field = |i: usize| dword(&k, at + 12 + 4 * i);
    let (header, load, load_end, bss_end, entry) = (field(0), field(1), field(2), field(3), field(4));
    assert_eq!(load, mbk::LOAD_ADDR);
    assert_eq!(header - load, at as u32, "the file loads from offset 0");
    assert_eq!(load_end - load, k.len() as u32);
    assert_eq!(bss_end, mbk::LOAD_ADDR + mbk::BSS_END_OFFSET);
    assert_eq!(entry, mbk::LOAD_ADDR + mbk::ENTRY_OFFSET);
    assert!(load_end <= bss_end && (load..load_end).contains(&entry));
}

#[test]
fn formats_differ_only_in_their_headers() {
    let (elf, aout) = (kernel(KernelFormat::Elf), kernel(KernelFormat::AoutKludge));
    assert_eq!(elf.len(), aout.len());
    assert_eq!(&elf[0x100..], &aout[0x100..], "pool and code");
    assert!(aout[..mbk::HEADER_OFFSET as usize].iter().all(|&b| b == 0));
    assert_eq!(kernel(KernelFormat::Elf), elf, "deterministic");
}

#[test]
fn boot_expected_lines_match_the_qemu_transcript() {
    let entry = |base, length, kind| MmapEntry { base, length, kind };
    let boot = Boot {
        cmdline: format!("{{kernel}} {APPEND}"),
        mem_lower_kib: 639,
        mem_upper_kib: 3_144_576,
        mmap: vec![
            entry(0, 0x9fc00, 1),
            entry(0x9fc00, 0x400, 2),
            entry(0xf0000, 0x10000, 2),
            entry(0x10_0000, 0xbfee_0000, 1),
            entry(0xbffe_0000, 0x2_0000, 2),
            entry(0xfffc_0000, 0x4_0000, 2),
            entry(0x1_0000_0000, 0x4000_0000, 1),
            entry(0xfd_0000_0000, 0x3_0000_0000, 2),
        ],
        ncpus: 2,
    };
    assert_eq!(boot.expected_lines(), expected(QEMU_4G, Path::new("{kernel}")));
}

/// Boots `kernel` with QEMU's multiboot loader on a `pc` machine with
/// `mem` of RAM and 2 CPUs, under the watchdog.
fn run_qemu(qemu: &Path, kernel: &Path, mem: &str) -> Run {
    run_with_watchdog(
        Command::new(qemu)
            .args(["-machine", "pc", "-accel", "tcg", "-m", mem, "-smp", "2"])
            .args(["-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio", "-kernel"])
            .arg(kernel)
            .args(["-append", APPEND, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]),
    )
}

/// Boots the kernel in `format` on QEMU with `mem` of RAM and checks the
/// exit status and the transcript against `want`.
fn boots_on_qemu(format: KernelFormat, mem: &str, want: &str) {
    let Some(qemu) = find_qemu() else { return };
    let scratch = Scratch::new(&format!("topos-multiboot-{format:?}-{mem}"));
    let kernel_path = scratch.file("kernel", &kernel(format));

    let run = run_qemu(&qemu, &kernel_path, mem);
    drop(scratch);
    println!("qemu {format:?} -m {mem} (tcg): {:?} in {:?}\n{}", run.status, run.elapsed, run.stdout);
    let context =
        format!("{format:?} -m {mem}: status {:?}\nstdout:\n{}\nstderr:\n{}", run.status, run.stdout, run.stderr);
    assert_eq!(run.status, Some(firmware::QEMU_STATUS_PASS), "{context}");
    let output = run.stdout.find(FIRST_LINE).map_or(run.stdout.as_str(), |at| &run.stdout[at..]);
    if let Err(e) = transcript::check(output, &expected(want, &kernel_path)) {
        panic!("{e}\n{context}");
    }
}

#[test]
fn elf_boots_on_qemu_256m() {
    boots_on_qemu(KernelFormat::Elf, "256M", QEMU_256M);
}

#[test]
fn aout_kludge_boots_on_qemu_256m() {
    boots_on_qemu(KernelFormat::AoutKludge, "256M", QEMU_256M);
}

#[test]
fn elf_boots_on_qemu_4g() {
    boots_on_qemu(KernelFormat::Elf, "4G", QEMU_4G);
}

#[test]
fn aout_kludge_boots_on_qemu_4g() {
    boots_on_qemu(KernelFormat::AoutKludge, "4G", QEMU_4G);
}

/// Boots the kernel in `format` with `topos run --accel interp` and checks
/// that it prints what QEMU's TCG prints (the pinned transcript): the same
/// memory map (the interpreter's board reports no KVM-only ranges), the
/// command line, the CPU count, the verdict.
fn boots_on_the_interpreter(format: KernelFormat, mem: &str, want: &str) {
    let scratch = Scratch::new(&format!("topos-multiboot-interp-{format:?}-{mem}"));
    let kernel_path = scratch.file("kernel", &kernel(format));
    let path = kernel_path.display().to_string();
    let run =
        support::topos_run(&["--accel", "interp", "--kernel", &path, "--append", APPEND, "-m", mem, "--smp", "2"]);
    drop(scratch);
    let context =
        format!("{format:?} -m {mem}: status {:?}\nstdout:\n{}\nstderr:\n{}", run.status, run.stdout, run.stderr);
    assert_eq!(run.status, Some(firmware::QEMU_STATUS_PASS), "{context}");
    if let Err(e) = transcript::check(&run.stdout, &expected(want, &kernel_path)) {
        panic!("{e}\n{context}");
    }
}

#[test]
fn elf_boots_on_the_interpreter_as_on_tcg_256m() {
    boots_on_the_interpreter(KernelFormat::Elf, "256M", QEMU_256M);
}

#[test]
fn aout_kludge_boots_on_the_interpreter_as_on_tcg_4g() {
    boots_on_the_interpreter(KernelFormat::AoutKludge, "4G", QEMU_4G);
}
