//! Device interrupts reach the guest (issue 8): the UART's line (IRQ 4)
//! goes through `KVM_IRQ_LINE` into the in-kernel 8259 PIC and the guest
//! takes the interrupt. The guest is a Multiboot kernel (assembled here
//! with iced-x86) that loads a GDT and an IDT, programs the PICs (vectors
//! 0x20.., only IRQ 4 unmasked), enables the UART's "transmitter empty"
//! interrupt, which is pending at once, and halts with interrupts on; only
//! the interrupt handler writes to `isa-debug-exit`. On the interpreter
//! the same kernel takes the interrupt from the user-space PIC. The KVM
//! case is skipped with a printed reason without `/dev/kvm`.

mod support;

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use std::sync::mpsc;
use std::time::Duration;
use support::kvm_present;
use topos_devices::uart::SerialSink;
use topos_vcpu::board::multiboot::{Kernel, HEADER_MAGIC};
use topos_vcpu::board::{PcConfig, PciModel};
use topos_vcpu::machine::{Accel, Machine};
use topos_vcpu::vm::StopReason;

const BASE: u64 = 0x10_0000;
const ENTRY: u64 = BASE + 0x40;
const GDT: u64 = BASE + 0x800;
const GDTR: u64 = BASE + 0x840;
const IDTR: u64 = BASE + 0x880;
const IDT: u64 = BASE + 0x900;
const VECTORS: u64 = 0x30;
/// IRQ 4 after the PIC is told to start at vector 0x20.
const UART_VECTOR: u64 = 0x24;

fn put(image: &mut [u8], addr: u64, bytes: &[u8]) {
    let at = (addr - BASE) as usize;
    image[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Where the far jump that reloads CS lands, from the entry.
const RELOAD_OFFSET: u64 = 19;

/// Which interrupt the kernel waits for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    /// The UART's "transmitter empty" interrupt (IRQ 4), once.
    Uart,
    /// [`PIT_TICKS`] ticks of the PIT's channel 0 (IRQ 0) at 1 kHz, each
    /// acknowledged with an EOI to the PIC.
    Pit,
}

/// Ticks the PIT kernel counts before it exits.
const PIT_TICKS: u8 = 10;
/// IRQ 0 after the PIC is told to start at vector 0x20.
const PIT_VECTOR: u64 = 0x20;
/// Where the PIT kernel counts ticks.
const TICKS: u32 = 0x9_1000;

/// The kernel: an a.out-kludge Multiboot image loaded at 1 MiB.
fn kernel(source: Source) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut handler = a.create_label();
    let mut idle = a.create_label();
    // Multiboot leaves ESP undefined: the interrupt needs a stack in RAM.
    a.mov(esp, 0x9_0000u32)?;
    a.lgdt(ptr(GDTR as u32))?;
    // Reload CS and the data segments from this GDT (loaders differ: QEMU
    // leaves CS 0x08, topos 0x10), so the handler's `iret` finds its CS.
    // `mov esp` (5 bytes), `lgdt` (7), this far jump (7): it lands right
    // after itself (checked below).
    let mut reload = a.create_label();
    a.add_instruction(iced_x86::Instruction::with_far_branch(
        iced_x86::Code::Jmp_ptr1632,
        0x10,
        (ENTRY + RELOAD_OFFSET) as u32,
    )?)?;
    a.set_label(&mut reload)?;
    a.mov(eax, 0x18u32)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.lidt(ptr(IDTR as u32))?;
    // 8259 PICs: ICW1..ICW4, vectors 0x20 and 0x28, cascade on IRQ 2,
    // then only IRQ 4 unmasked.
    for (port, value) in
        [(0x20, 0x11), (0xa0, 0x11), (0x21, 0x20), (0xa1, 0x28), (0x21, 4), (0xa1, 2), (0x21, 1), (0xa1, 1)]
    {
        a.mov(al, value)?;
        a.out(port, al)?;
    }
    a.mov(al, if source == Source::Uart { 0xef } else { 0xfe })?;
    a.out(0x21, al)?;
    a.mov(al, 0xff)?;
    a.out(0xa1, al)?;
    match source {
        Source::Uart => {
            // COM1: IER = transmitter holding register empty (pending at
            // once; MCR has OUT2 set since reset).
            a.mov(dx, 0x3f9u32)?;
            a.mov(al, 2)?;
            a.out(dx, al)?;
        }
        Source::Pit => {
            a.mov(dword_ptr(TICKS), 0)?;
            // Channel 0, lobyte/hibyte, mode 2, divisor 1193 (1 kHz).
            a.mov(al, 0x34)?;
            a.out(0x43, al)?;
            a.mov(al, (1193 & 0xff) as u32)?;
            a.out(0x40, al)?;
            a.mov(al, (1193 >> 8) as u32)?;
            a.out(0x40, al)?;
        }
    }
    a.sti()?;
    a.set_label(&mut idle)?;
    a.hlt()?;
    a.jmp(idle)?;
    a.set_label(&mut handler)?;
    match source {
        Source::Uart => {
            // Status (0x10 << 1) | 1.
            a.mov(al, 0x10)?;
            a.out(0xf4, al)?;
            a.cli()?;
            a.hlt()?;
        }
        Source::Pit => {
            let mut more = a.create_label();
            a.push(eax)?;
            a.mov(al, 0x20)?;
            a.out(0x20, al)?;
            a.inc(dword_ptr(TICKS))?;
            a.cmp(dword_ptr(TICKS), u32::from(PIT_TICKS))?;
            a.jb(more)?;
            a.mov(al, 0x10)?;
            a.out(0xf4, al)?;
            a.cli()?;
            a.hlt()?;
            a.set_label(&mut more)?;
            a.pop(eax)?;
            a.iretd()?;
        }
    }
    let code = a.assemble_options(ENTRY, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let handler_ip = code.label_ip(&handler)?;
    assert_eq!(code.label_ip(&reload)?, ENTRY + RELOAD_OFFSET, "the far jump's target");

    let mut image = vec![0u8; (IDT - BASE + VECTORS * 8) as usize];
    let flags = 1u32 << 16;
    let mut header = Vec::new();
    for v in [HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags))] {
        header.extend_from_slice(&v.to_le_bytes());
    }
    for v in [BASE as u32, BASE as u32, 0, 0, ENTRY as u32] {
        header.extend_from_slice(&v.to_le_bytes());
    }
    put(&mut image, BASE, &header);
    put(&mut image, ENTRY, code.inner.code_buffer.as_slice());
    // GDT: null, null, code 0x10, data 0x18 (flat, accessed bits set).
    let gdt: [u64; 4] = [0, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    put(&mut image, GDT, &gdt.iter().flat_map(|d| d.to_le_bytes()).collect::<Vec<_>>());
    let mut gdtr = (31u16).to_le_bytes().to_vec();
    gdtr.extend_from_slice(&(GDT as u32).to_le_bytes());
    put(&mut image, GDTR, &gdtr);
    let mut idtr = ((VECTORS * 8 - 1) as u16).to_le_bytes().to_vec();
    idtr.extend_from_slice(&(IDT as u32).to_le_bytes());
    put(&mut image, IDTR, &idtr);
    // A 32-bit interrupt gate for the source's vector.
    let ip = handler_ip as u32;
    let gate = u64::from(ip & 0xffff) | 0x10 << 16 | 0x8e00u64 << 32 | u64::from(ip >> 16) << 48;
    let vector = if source == Source::Uart { UART_VECTOR } else { PIT_VECTOR };
    put(&mut image, IDT + vector * 8, &gate.to_le_bytes());
    Ok(image)
}

#[test]
fn the_uarts_interrupt_reaches_the_guest_through_the_in_kernel_pic() {
    if !kvm_present() {
        return;
    }
    interrupts_reach_the_guest(Source::Uart, Accel::Kvm);
}

/// On the interpreter the same line goes into the user-space 8259 (and the
/// IOAPIC, masked here) and reaches the vCPU through its local APIC's
/// LINT0 in virtual-wire mode.
#[test]
fn the_uarts_interrupt_reaches_the_guest_through_the_user_space_pic_on_the_interpreter() {
    interrupts_reach_the_guest(Source::Uart, Accel::Interp);
}

/// A kernel that counts the PIT's ticks through the PIC, on the
/// interpreter's user-space PIT and PIC.
#[test]
fn the_pits_ticks_reach_the_guest_through_the_pic_on_the_interpreter() {
    interrupts_reach_the_guest(Source::Pit, Accel::Interp);
}

/// The same kernel on KVM's in-kernel PIT and PIC (on a host with VMX or
/// SVM: PVM's ring-0 emulator stops at the handler's `iret` with an
/// emulation failure).
#[test]
fn the_pits_ticks_reach_the_guest_through_the_in_kernel_pic() {
    if !kvm_present() {
        return;
    }
    if !topos_vcpu::machine::host_has_hardware_virtualization() {
        println!("skipped: KVM here is a software hypervisor (no vmx/svm), whose emulator cannot run iret in ring 0");
        return;
    }
    interrupts_reach_the_guest(Source::Pit, Accel::Kvm);
}

/// And on QEMU's TCG, booted with its multiboot loader.
#[test]
fn the_pit_kernel_passes_on_qemu_tcg() {
    let Some(qemu) = support::find_qemu() else { return };
    let scratch = support::Scratch::new("topos-pit-kernel").kept_if("TOPOS_KEEP_KERNEL");
    let path = scratch.file("kernel", &kernel(Source::Pit).unwrap());
    let run = support::run_with_watchdog(
        std::process::Command::new(qemu)
            .args(["-machine", "pc", "-accel", "tcg", "-m", "64M", "-nodefaults", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&path)
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]),
    );
    drop(scratch);
    assert_eq!(run.status, Some(0x21), "{}", run.stderr);
}

fn interrupts_reach_the_guest(source: Source, accel: Accel) {
    let config = PcConfig {
        ram_size: 64 << 20,
        cpus: 1,
        bios: topos_vcpu::firmware::bios_image().unwrap(),
        bios_in_flash: false,
        devices: vec![PciModel::Edu],
        serial: SerialSink::Null,
        kernel: Some(Kernel { image: kernel(source).unwrap(), path: "irq-test".into(), append: String::new() }),
    };
    let machine = Machine::new(config, accel).unwrap();
    let latch = machine.latch().clone();
    let (tx, rx) = mpsc::channel();
    let runner = std::thread::spawn(move || {
        let _ = tx.send(machine.run());
    });
    let reason = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(r) => r.unwrap(),
        Err(_) => {
            latch.stop(StopReason::Requested);
            let _ = runner.join();
            panic!("no interrupt reached the guest within 30 s (it halts with interrupts on until one does)");
        }
    };
    runner.join().unwrap();
    assert_eq!(reason, StopReason::DebugExit(0x21), "only the interrupt handler writes to debug-exit");
}
