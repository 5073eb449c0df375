//! The embedded firmware on topos's own `pc` board under KVM (issue 8,
//! acceptance 1): `topos run` with no BIOS boots it with 1, 2 and 4 vCPUs
//! and the default devices (edu, framebuffer, virtio-doorbell, pflash);
//! the transcript must be the one the firmware prints on QEMU, but for the
//! PCI functions topos's board does not model and the lines of the
//! fixed-address devices QEMU's `pc` lacks, and the exit status its
//! `isa-debug-exit` verdict (1: pass). An in-process machine checks from the
//! host what the firmware did to those devices: the framebuffer's dirty
//! scanlines, the doorbell's kick through its ioeventfd, the flash back in
//! read array mode. Skipped with a printed reason without `/dev/kvm`.

mod support;

use support::{kvm_present, topos_run, Run};
use topos_vcpu::firmware::transcript::{self, Machine};
use topos_vcpu::machine::Accel;

#[test]
fn the_embedded_firmware_passes_on_kvm_with_1_2_and_4_vcpus() {
    if !kvm_present() {
        return;
    }
    for n in [1u32, 2, 4] {
        let Run { status, stdout: out, stderr: err, .. } = topos_run(&["--accel", "kvm", "--smp", &n.to_string()]);
        let want = transcript::expected_lines(&Machine::topos_pc(n, 256));
        if let Err(e) = transcript::check(&out, &want) {
            panic!("--smp {n}: {e}\nstdout:\n{out}\nstderr:\n{err}");
        }
        assert_eq!(status, Some(1), "--smp {n}: the firmware's pass is status (0 << 1) | 1; stderr: {err}");
    }
}

#[test]
fn a_different_ram_size_reaches_the_firmware_through_fw_cfg() {
    if !kvm_present() {
        return;
    }
    let Run { status, stdout: out, stderr: err, .. } = topos_run(&["--accel", "kvm", "-m", "64M"]);
    let want = transcript::expected_lines(&Machine::topos_pc(1, 64));
    if let Err(e) = transcript::check(&out, &want) {
        panic!("{e}\nstdout:\n{out}\nstderr:\n{err}");
    }
    assert_eq!(status, Some(1));
}

/// The board with every device model: the host checks, through the
/// board's own device handles, what the firmware did to them.
#[test]
fn the_host_sees_what_the_firmware_did_to_the_fixed_address_devices() {
    if !kvm_present() {
        return;
    }
    support::firmware_checks::host_checks(Accel::Kvm);
}
