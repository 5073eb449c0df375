//! The embedded firmware on the interpreter (issue 9, acceptance 1): `topos
//! run --accel interp` boots it with 1, 2 and 4 vCPUs, prints the
//! transcript it prints on KVM (and on QEMU, but for what topos's board
//! does not model) — including the remap section, with the BAR moving
//! under the running vCPUs — and exits with the same status; where
//! `/dev/kvm` is present, the two accelerators' transcripts are compared
//! line by line (but for the remap phase's read counts, which depend on
//! timing). The host then checks what the firmware did to the devices, as
//! on KVM.

mod support;

use support::{kvm_present, topos_run, Run};
use topos_vcpu::firmware::transcript::{self, Machine};
use topos_vcpu::machine::Accel;

/// The transcript without the numbers that depend on timing.
fn comparable(out: &str) -> Vec<String> {
    out.lines()
        .map(
            |l| {
                if l.starts_with("remap: ") && l.contains("reads") {
                    "remap: <reads>".to_string()
                } else {
                    l.to_string()
                }
            },
        )
        .collect()
}

#[test]
fn the_embedded_firmware_passes_on_the_interpreter_with_1_2_and_4_vcpus_as_on_kvm() {
    let kvm = kvm_present();
    for n in [1u32, 2, 4] {
        let smp = n.to_string();
        let Run { status, stdout: out, stderr: err, .. } = topos_run(&["--accel", "interp", "--smp", &smp]);
        let want = transcript::expected_lines(&Machine::topos_pc(n, 256));
        if let Err(e) = transcript::check(&out, &want) {
            panic!("--smp {n}: {e}\nstdout:\n{out}\nstderr:\n{err}");
        }
        assert_eq!(status, Some(1), "--smp {n}: the firmware's pass is status (0 << 1) | 1; stderr: {err}");
        if kvm {
            let theirs = topos_run(&["--accel", "kvm", "--smp", &smp]);
            assert_eq!(theirs.status, status, "--smp {n}: KVM's status; stderr: {}", theirs.stderr);
            assert_eq!(comparable(&out), comparable(&theirs.stdout), "--smp {n}: interpreter vs KVM");
        }
    }
}

#[test]
fn the_default_accelerator_runs_the_firmware() {
    // `topos run` with no options: KVM on a host with VMX/SVM, the
    // interpreter elsewhere (this machine: whichever it is, it passes).
    let Run { status, stdout: out, stderr: err, .. } = topos_run(&[]);
    if let Err(e) = transcript::check(&out, &transcript::expected_lines(&Machine::topos_pc(1, 256))) {
        panic!("{e}\nstdout:\n{out}\nstderr:\n{err}");
    }
    assert_eq!(status, Some(1), "{err}");
}

#[test]
fn the_host_sees_what_the_firmware_did_to_the_fixed_address_devices_on_the_interpreter() {
    support::firmware_checks::host_checks(Accel::Interp);
}
