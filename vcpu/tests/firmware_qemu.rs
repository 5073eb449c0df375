//! The embedded firmware: the image's shape, and a boot on real QEMU (`pc`
//! machine, TCG) for 1, 2 and 4 CPUs, checked against the transcript in
//! `topos_vcpu::firmware::transcript` (QEMU's `pc` has none of topos's
//! fixed-address devices: the pflash, framebuffer and virtio-doorbell parts
//! print their `skip:` lines). The QEMU runs skip, saying so, when
//! `qemu-system-x86_64` is not on PATH.

use std::path::Path;
use std::process::Command;

use topos_vcpu::firmware::{self, transcript, Machine};

mod support;

use support::{find_qemu, run_with_watchdog, Run, Scratch};

#[test]
fn image_is_128k_with_a_far_jump_at_the_reset_vector() {
    let image = firmware::bios_image().expect("the firmware assembles");
    assert_eq!(image.len(), 128 << 10);
    assert_eq!(image.len(), firmware::IMAGE_SIZE);
    // jmp far ptr16:16 (0xea offset:16 segment:16) to f000:0000.
    assert_eq!(&image[0x1fff0..0x1fff5], &[0xea, 0x00, 0x00, 0x00, 0xf0]);
}

#[test]
fn image_is_deterministic() {
    assert_eq!(firmware::bios_image().unwrap(), firmware::bios_image().unwrap());
}

#[test]
fn transcript_checker_matches_exact_and_prefix_lines() {
    use transcript::ExpectedLine::{Exact, Prefix};
    let want = [Exact("a: 1".into()), Prefix("b: ".into())];
    assert_eq!(transcript::check("a: 1\r\nb: 7\n", &want), Ok(()));
    assert!(transcript::check("a: 2\nb: 7\n", &want).is_err());
    assert!(transcript::check("a: 1\n", &want).is_err());
    assert!(transcript::check("a: 1\nb: 7\nc\n", &want).is_err());
}

/// Boots `image` on QEMU's `pc` machine with `ncpus` CPUs and `accel`,
/// under the watchdog.
fn run_qemu(qemu: &Path, image: &Path, ncpus: u32, accel: &str) -> Run {
    run_with_watchdog(
        Command::new(qemu)
            .args(["-machine", "pc", "-accel", accel, "-m", "256M", "-smp"])
            .arg(ncpus.to_string())
            .args(["-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio", "-bios"])
            .arg(image)
            .args(["-device", "edu", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]),
    )
}

/// Boots the firmware under TCG with `ncpus` CPUs and checks the transcript
/// and the exit status.
fn boots_on_qemu(ncpus: u32) {
    let Some(qemu) = find_qemu() else { return };
    let scratch = Scratch::new(&format!("topos-firmware-{ncpus}"));
    let image = scratch.file("bios.bin", &firmware::bios_image().expect("the firmware assembles"));

    let run = run_qemu(&qemu, &image, ncpus, "tcg");
    drop(scratch);
    println!("qemu -smp {ncpus} (tcg): {:?} in {:?}\n{}", run.status, run.elapsed, run.stdout);
    let context = format!("-smp {ncpus}: status {:?}\nstdout:\n{}\nstderr:\n{}", run.status, run.stdout, run.stderr);
    assert_eq!(run.status, Some(firmware::QEMU_STATUS_PASS), "{context}");
    let expected = firmware::expected_lines(&Machine::qemu_pc(ncpus));
    if let Err(e) = transcript::check(&run.stdout, &expected) {
        panic!("{e}\n{context}");
    }
}

#[test]
fn boots_on_qemu_pc_1_cpu() {
    boots_on_qemu(1);
}

#[test]
fn boots_on_qemu_pc_2_cpus() {
    boots_on_qemu(2);
}

#[test]
fn boots_on_qemu_pc_4_cpus() {
    boots_on_qemu(4);
}

#[test]
fn expected_transcript_for_qemu_pc_with_2_cpus() {
    let lines: Vec<String> = firmware::expected_lines(&Machine::qemu_pc(2)).iter().map(|l| l.to_string()).collect();
    let want = [
        r#""topos firmware""#,
        r#""fw_cfg: signature QEMU""#,
        r#""cpus: 2""#,
        r#""ram: 256 MiB""#,
        r#""smp: 2 cpus up, apic ids 0 1""#,
        r#""lock xadd: 2000 ok""#,
        r#""spinlock: 2000 ok""#,
        r#""pci 00:00.0 8086:1237 class 060000""#,
        r#""pci 00:01.0 8086:7000 class 060100""#,
        r#""pci 00:01.1 8086:7010 class 010180""#,
        r#""pci 00:01.3 8086:7113 class 068000""#,
        r#""pci 00:02.0 1234:11e8 class 00ff00""#,
        r#""edu: bar0 size 00100000 at feb00000""#,
        r#""edu: ident 010000ed""#,
        r#""edu: liveness ok""#,
        r#""edu: factorial 10! = 3628800""#,
        r#""edu: dma ok""#,
        r#""remap: 200 moves, reads ident="..."#,
        r#""remap: consistent""#,
        r#""skip: pflash (not present)""#,
        r#""skip: framebuffer (not present)""#,
        r#""skip: virtio-doorbell (not present)""#,
        r#""rom: alias ok""#,
        r#""rom: writes dropped""#,
        r#""result: pass""#,
    ];
    assert_eq!(lines, want);
}

#[test]
fn expected_transcript_for_topos_pc_has_the_fixed_address_devices() {
    let lines: Vec<String> =
        firmware::expected_lines(&Machine::topos_pc(1, 256)).iter().map(|l| l.to_string()).collect();
    let at = lines.iter().position(|l| l == r#""remap: consistent""#).expect("the remap verdict");
    let want = [
        r#""pflash: cfi QRY, 1024 KiB, 16 blocks of 64 KiB""#,
        r#""pflash: read array ok""#,
        r#""framebuffer: vram 4096 KiB""#,
        r#""framebuffer: mode 1024x768, 4 bytes per pixel, stride 4096""#,
        r#""framebuffer: drew lines 10 20 30""#,
        r#""virtio-doorbell: version 2, device 2""#,
        r#""virtio-doorbell: notify seen""#,
        r#""rom: alias ok""#,
    ];
    assert_eq!(&lines[at + 1..at + 1 + want.len()], want);
}
