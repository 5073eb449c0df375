//! The `pc` board on KVM and `topos run` (issue 8): a BIOS image booted
//! from the reset vector prints on the UART and ends the VM through
//! `isa-debug-exit` with QEMU's status; `topos mtree` prints the board's
//! map; bad options are errors. Tests that need `/dev/kvm` skip with a
//! printed reason without it.

mod support;

use std::process::Command;
use support::{kvm_present, Scratch};
use topos_devices::uart::SerialSink;
use topos_vcpu::board::{PcConfig, PciModel};
use topos_vcpu::machine::{Accel, Machine};
use topos_vcpu::vm::StopReason;

/// A 64 KiB BIOS: at the reset vector a jump to code that prints `text` on
/// COM1 and writes `exit` to `isa-debug-exit`, then halts.
fn bios(text: &[u8], exit: u8) -> Vec<u8> {
    let mut code = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &b in text {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code.extend_from_slice(&[0xb0, exit, 0xe6, 0xf4, 0xf4]); // mov al, exit; out 0xf4, al; hlt
    support::bios_at_reset(&code)
}

#[test]
fn a_bios_prints_on_the_uart_and_exits_through_debug_exit() {
    if !kvm_present() {
        return;
    }
    let (sink, out) = SerialSink::buffer();
    let config = PcConfig {
        ram_size: 64 << 20,
        cpus: 2,
        bios: bios(b"hello from the reset vector\n", 0x10),
        devices: vec![PciModel::Edu],
        serial: sink,
        kernel: None,
        bios_in_flash: false,
    };
    let machine = Machine::new(config, Accel::Kvm).unwrap();
    let reason = machine.run().unwrap();
    assert_eq!(reason, StopReason::DebugExit(0x21));
    assert_eq!(out.to_string_lossy(), "hello from the reset vector\n");
}

#[test]
fn topos_run_boots_a_bios_file_and_exits_with_the_guests_status() {
    if !kvm_present() {
        return;
    }
    let scratch = Scratch::new("topos-pc-board");
    let path = scratch.file("bios.bin", &bios(b"ok\n", 0));
    let out = Command::new(env!("CARGO_BIN_EXE_topos"))
        .args(["run", "--bios"])
        .arg(&path)
        .args(["--smp", "2", "-m", "128M", "--device", "edu"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "(0 << 1) | 1");
}

#[test]
fn topos_mtree_prints_the_board_and_bad_options_are_errors() {
    let scratch = Scratch::new("topos-pc-mtree");
    let path = scratch.file("bios.bin", &bios(b"", 0));
    let out = Command::new(env!("CARGO_BIN_EXE_topos")).args(["mtree", "--bios"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "0000000000000000-000000000fffffff (prio 0, ram): alias ram-below-4g @pc.ram 0000000000000000-000000000fffffff",
        "00000000000f0000-00000000000fffff (prio 1, rom): alias isa-bios @pc.bios 0000000000000000-000000000000ffff",
        "00000000ffff0000-00000000ffffffff (prio 0, rom): pc.bios",
        "00000000000003f8-00000000000003ff (prio 0, i/o): serial0",
        "0000000000000510-0000000000000511 (prio 0, i/o): fw_cfg",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    std::fs::write(&path, vec![0u8; 1000]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_topos")).args(["mtree", "--bios"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 64 KiB"));
    let out = Command::new(env!("CARGO_BIN_EXE_topos"))
        .args(["run", "--accel", "interp", "--bios"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A minimal Multiboot kernel (a.out kludge, loaded at 1 MiB, entry at
/// +0x20): its 32-bit code prints `m`, the first byte of the command line
/// (from the information EBX points to) and a newline, and exits through
/// `isa-debug-exit` with 0 if EAX held the Multiboot magic, 1 otherwise.
fn multiboot_kernel() -> Vec<u8> {
    let flags: u32 = 1 << 16 | 2;
    let magic = topos_vcpu::board::multiboot::HEADER_MAGIC;
    let mut k = Vec::new();
    for v in [magic, flags, 0u32.wrapping_sub(magic.wrapping_add(flags))] {
        k.extend_from_slice(&v.to_le_bytes());
    }
    for v in [0x10_0000u32, 0x10_0000, 0, 0x10_2000, 0x10_0020] {
        k.extend_from_slice(&v.to_le_bytes());
    }
    k.resize(0x20, 0);
    let code: &[u8] = &[
        0x3d, 0x02, 0xb0, 0xad, 0x2b, // cmp eax, 0x2badb002
        0x0f, 0x95, 0xc1, // setne cl
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'm', 0xee, // mov al, 'm'; out dx, al
        0x8b, 0x73, 0x10, // mov esi, [ebx+16] (cmdline)
        0x8a, 0x06, 0xee, // mov al, [esi]; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
        0x88, 0xc8, // mov al, cl
        0xe6, 0xf4, // out 0xf4, al
        0xf4, // hlt
    ];
    k.extend_from_slice(code);
    k
}

#[test]
fn topos_run_enters_a_multiboot_kernel_with_the_multiboot_state() {
    if !kvm_present() {
        return;
    }
    let scratch = Scratch::new("topos-pc-multiboot");
    let path = scratch.file("kernel.bin", &multiboot_kernel());
    let out = Command::new(env!("CARGO_BIN_EXE_topos"))
        .args(["run", "--kernel"])
        .arg(&path)
        .args(["--append", "quiet"])
        .output()
        .unwrap();
    let first = path.display().to_string().into_bytes()[0] as char;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("m{first}\n"),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "EAX held the Multiboot magic");
    std::fs::write(&path, [0u8; 64]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_topos")).args(["run", "--kernel"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Multiboot header"));
}

#[test]
fn every_device_model_plugs_into_the_board_and_the_firmware_boots_from_a_flash() {
    let scratch = Scratch::new("topos-pc-devices");
    let fw = scratch.dir.join("fw.bin");
    let topos = env!("CARGO_BIN_EXE_topos");
    let out = Command::new(topos).args(["firmware", "-o"]).arg(&fw).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&fw).unwrap(), topos_vcpu::firmware::bios_image().unwrap());

    let all = ["--device", "edu", "--device", "framebuffer", "--device", "virtio-doorbell", "--device", "pflash"];
    let out = Command::new(topos).arg("mtree").args(all).args(["--pflash"]).arg(&fw).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "00000000fd000000-00000000fd3fffff (prio 0, ram): framebuffer.vram",
        "00000000fe000000-00000000fe00001f (prio 0, i/o): framebuffer.regs",
        "00000000fe001000-00000000fe0011ff (prio 0, i/o): virtio-mmio",
        "00000000fef00000-00000000feffffff (prio 0, romd): pflash1",
        "00000000fffe0000-00000000ffffffff (prio 0, romd): system.flash0",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    let dup = Command::new(topos).args(["mtree", "--device", "pflash", "--device", "pflash"]).output().unwrap();
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("once"));

    if kvm_present() {
        let out = Command::new(topos).args(["run", "--smp", "2", "--pflash"]).arg(&fw).args(all).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.ends_with("result: pass\n"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1));
    }
}

#[test]
fn topos_run_stops_a_guest_whose_vcpus_all_halted_with_interrupts_off() {
    if !kvm_present() {
        return;
    }
    let scratch = Scratch::new("topos-pc-halted");
    // cli; hlt; jmp $-1: the BSP halts for good; the APs never get a SIPI.
    let path = scratch.file("bios.bin", &support::bios_at_reset(&[0xfa, 0xf4, 0xeb, 0xfd]));
    let run = support::run_with_watchdog(
        Command::new(env!("CARGO_BIN_EXE_topos")).args(["run", "--smp", "2", "--bios"]).arg(&path),
    );
    drop(scratch);
    assert_eq!(run.status, Some(0), "every vCPU halted: a clean stop; stderr: {}", run.stderr);
}

/// A memory listener that fails every `region_add` (a memslot mirror whose
/// ioctl failed, say).
struct FailingListener;

impl topos_runtime::MemoryListener for FailingListener {
    fn region_add(&self, _section: &topos_runtime::MemoryRegionSection) -> topos_runtime::ListenerResult {
        Err("this listener refuses every range".into())
    }
}

#[test]
fn a_failing_memory_listener_stops_the_machine_with_a_reason() {
    if !kvm_present() {
        return;
    }
    let config = PcConfig {
        ram_size: 64 << 20,
        cpus: 1,
        // cli; jmp $: runs for ever unless stopped.
        bios: support::bios_at_reset(&[0xfa, 0xeb, 0xfe]),
        devices: vec![PciModel::Edu],
        serial: SerialSink::Null,
        kernel: None,
        bios_in_flash: false,
    };
    let machine = Machine::new(config, Accel::Kvm).unwrap();
    let vm = machine.start().unwrap();
    let b = machine.board();
    b.topo.listener_register(std::sync::Arc::new(FailingListener), 0, Some(&b.spaces.memory)).unwrap_err();
    let reason = support::wait_bounded(vm);
    assert!(matches!(&reason, StopReason::ListenerFailed(why) if why.contains("refuses")), "{reason:?}");
    assert_eq!(reason.exit_status(), 3);
}
