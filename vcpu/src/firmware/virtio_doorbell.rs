//! The virtio-mmio doorbell topos's board plugs with `--device
//! virtio-doorbell` at [`VIRTIO_DOORBELL`]: detected by its magic value
//! ("virt"), layout version and device id, brought up as a virtio 1.x
//! driver would (reset, ACKNOWLEDGE, DRIVER, `VIRTIO_F_VERSION_1`,
//! FEATURES_OK, queue 0 sized, placed and made ready, DRIVER_OK), then
//! kicked through QueueNotify.
//!
//! On topos the QueueNotify write signals an ioeventfd and never reaches
//! the device's register handler; the device runtime wakes the device
//! later, which then raises its used-buffer interrupt (InterruptStatus bit
//! 0). The firmware polls InterruptStatus with a timeout, acknowledges the
//! interrupt, checks that it cleared, and resets the device.
//!
//! Where nothing decodes the registers (QEMU's `pc`) the magic value reads
//! 0 and the part is skipped.

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::layout::{VIRTIO_DOORBELL, VIRTQ_DESC, VIRTQ_DEVICE, VIRTQ_DRIVER};
use super::transcript;

/// `MagicValue`: "virt".
const MAGIC: u32 = u32::from_le_bytes(*b"virt");
/// The register layout version the firmware drives (virtio 1.x).
pub(crate) const VERSION: u32 = 2;
/// Register offsets (virtio-mmio version 2).
const REG_MAGIC: u32 = 0x000;
const REG_VERSION: u32 = 0x004;
const REG_DEVICE_ID: u32 = 0x008;
const REG_DEVICE_FEATURES: u32 = 0x010;
const REG_DEVICE_FEATURES_SEL: u32 = 0x014;
const REG_DRIVER_FEATURES: u32 = 0x020;
const REG_DRIVER_FEATURES_SEL: u32 = 0x024;
const REG_QUEUE_SEL: u32 = 0x030;
const REG_QUEUE_NUM_MAX: u32 = 0x034;
const REG_QUEUE_NUM: u32 = 0x038;
const REG_QUEUE_READY: u32 = 0x044;
const REG_QUEUE_NOTIFY: u32 = 0x050;
const REG_INTERRUPT_STATUS: u32 = 0x060;
const REG_INTERRUPT_ACK: u32 = 0x064;
const REG_STATUS: u32 = 0x070;
const REG_QUEUE_DESC_LOW: u32 = 0x080;
const REG_QUEUE_DESC_HIGH: u32 = 0x084;
const REG_QUEUE_DRIVER_LOW: u32 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u32 = 0x094;
const REG_QUEUE_DEVICE_LOW: u32 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u32 = 0x0a4;
/// Device status bits.
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
/// `VIRTIO_F_VERSION_1`: bit 0 of feature word 1.
const F_VERSION_1_HIGH: u32 = 1;
/// InterruptStatus: a used buffer was returned.
const INT_VRING: u32 = 1;
/// The size the firmware gives queue 0.
const QUEUE_SIZE: u32 = 8;
/// How long the kick may take to show (µs).
const TIMEOUT_US: u32 = 1_000_000;

/// Writes `value` to register `reg`.
fn write(a: &mut Asm, reg: u32, value: u32) -> Result<()> {
    a.mov(dword_ptr(ebp + reg), value)?;
    Ok(())
}

/// Detects, initialises and kicks the device.
pub(crate) fn emit_bsp(a: &mut Asm) -> Result<()> {
    let mut present = a.label();
    let mut failed = a.label();
    let mut reset = a.label();
    let mut end = a.label();
    // Each check that fails jumps to a label that prints its line, counts
    // the failure and resets the device.
    let mut failures: Vec<(CodeLabel, &str)> = Vec::new();
    let mut check_fails = |a: &mut Asm, line: &'static str| -> CodeLabel {
        let l = a.label();
        failures.push((l, line));
        l
    };

    a.mov(ebp, VIRTIO_DOORBELL)?;
    a.cmp(dword_ptr(ebp + REG_MAGIC), MAGIC)?;
    a.je(present)?;
    a.print(&format!("{}\n", transcript::VIRTIO_DOORBELL_ABSENT))?;
    a.jmp(end)?;

    a.bind(&mut present)?;
    a.print(transcript::VIRTIO_DOORBELL_VERSION)?;
    a.mov(eax, dword_ptr(ebp + REG_VERSION))?;
    a.print_eax_dec()?;
    a.print(transcript::VIRTIO_DOORBELL_DEVICE)?;
    a.mov(eax, dword_ptr(ebp + REG_DEVICE_ID))?;
    a.print_eax_dec()?;
    a.print("\n")?;
    let l = check_fails(a, "virtio-doorbell: version UNSUPPORTED");
    a.cmp(dword_ptr(ebp + REG_VERSION), VERSION)?;
    a.jne(l)?;
    let l = check_fails(a, "virtio-doorbell: device id 0 (NO device)");
    a.cmp(dword_ptr(ebp + REG_DEVICE_ID), 0)?;
    a.je(l)?;

    // Reset, then the driver handshake.
    write(a, REG_STATUS, 0)?;
    write(a, REG_STATUS, STATUS_ACKNOWLEDGE)?;
    write(a, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)?;
    write(a, REG_DEVICE_FEATURES_SEL, 1)?;
    let l = check_fails(a, "virtio-doorbell: VIRTIO_F_VERSION_1 NOT offered");
    a.test(dword_ptr(ebp + REG_DEVICE_FEATURES), F_VERSION_1_HIGH)?;
    a.jz(l)?;
    write(a, REG_DRIVER_FEATURES_SEL, 1)?;
    write(a, REG_DRIVER_FEATURES, F_VERSION_1_HIGH)?;
    write(a, REG_DRIVER_FEATURES_SEL, 0)?;
    write(a, REG_DRIVER_FEATURES, 0)?;
    write(a, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)?;
    let l = check_fails(a, "virtio-doorbell: FEATURES_OK REFUSED");
    a.test(dword_ptr(ebp + REG_STATUS), STATUS_FEATURES_OK)?;
    a.jz(l)?;

    // Queue 0: size, areas, ready.
    write(a, REG_QUEUE_SEL, 0)?;
    let l = check_fails(a, "virtio-doorbell: queue 0 too SMALL");
    a.cmp(dword_ptr(ebp + REG_QUEUE_NUM_MAX), QUEUE_SIZE)?;
    a.jb(l)?;
    write(a, REG_QUEUE_NUM, QUEUE_SIZE)?;
    write(a, REG_QUEUE_DESC_LOW, VIRTQ_DESC)?;
    write(a, REG_QUEUE_DESC_HIGH, 0)?;
    write(a, REG_QUEUE_DRIVER_LOW, VIRTQ_DRIVER)?;
    write(a, REG_QUEUE_DRIVER_HIGH, 0)?;
    write(a, REG_QUEUE_DEVICE_LOW, VIRTQ_DEVICE)?;
    write(a, REG_QUEUE_DEVICE_HIGH, 0)?;
    write(a, REG_QUEUE_READY, 1)?;
    let l = check_fails(a, "virtio-doorbell: queue 0 NOT ready");
    a.cmp(dword_ptr(ebp + REG_QUEUE_READY), 1)?;
    a.jne(l)?;
    write(a, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)?;
    let l = check_fails(a, "virtio-doorbell: interrupt pending BEFORE the notify");
    a.cmp(dword_ptr(ebp + REG_INTERRUPT_STATUS), 0)?;
    a.jne(l)?;

    // The kick, and its effect once the device has been woken.
    write(a, REG_QUEUE_NOTIFY, 0)?;
    a.wait_until(TIMEOUT_US, |a, met| {
        a.test(dword_ptr(ebp + REG_INTERRUPT_STATUS), INT_VRING)?;
        a.jnz(met)?;
        Ok(())
    })?;
    let l = check_fails(a, "virtio-doorbell: notify NOT seen (timeout)");
    a.jc(l)?;
    a.print(&format!("{}\n", transcript::VIRTIO_DOORBELL_NOTIFY_SEEN))?;
    write(a, REG_INTERRUPT_ACK, INT_VRING)?;
    let l = check_fails(a, "virtio-doorbell: interrupt NOT acknowledged");
    a.cmp(dword_ptr(ebp + REG_INTERRUPT_STATUS), 0)?;
    a.jne(l)?;
    a.jmp(reset)?;

    for (mut label, line) in failures {
        a.bind(&mut label)?;
        a.print(&format!("{line}\n"))?;
        a.jmp(failed)?;
    }
    a.bind(&mut failed)?;
    a.fail()?;
    a.bind(&mut reset)?;
    write(a, REG_STATUS, 0)?;
    a.bind(&mut end)?;
    Ok(())
}
