//! Posting interrupts to a local APIC against its vCPU deciding to halt
//! (`topos_devices::irqchip`): an event posted from another thread — an
//! IPI, a device line through the PIC, an INIT/SIPI, an event posted
//! before the vCPU's waker was installed — is never lost.
//!
//! The irqchip is the real one (its atomics, fences and locks come from
//! the devices' sync shim, loom's under `--cfg topos_loom`), and so is the
//! vCPU's halt (`topos_vcpu::control::Control`, whose kick count makes a
//! halt return at once if a kick came after the count was read). The
//! vCPU side is the interpreter's loop reduced to what matters: read the
//! kick count, run a "block" (poll `attention()`, take what is pending),
//! and halt only if `interrupt_pending()` (or `take_startup()`) finds
//! nothing; the waker kicks the control. A lost event leaves the vCPU
//! halted for ever (loom reports a deadlock) or spinning with the event
//! pending and the attention flag clear (loom runs out of branches).
#![cfg(topos_loom)]

use loom::thread;
use std::sync::Arc;
use topos_devices::irqchip::{Irqchip, LocalApic, Startup};
use topos_loom_tests::vcpu::NoKick;
use topos_vcpu::control::Control;

const EOI: u32 = 0xb0;
const SVR: u32 = 0xf0;
const ICR: u32 = 0x300;
const ICR2: u32 = 0x310;

/// Two CPUs, each local APIC software-enabled (SVR 0x1ff): the chip, the
/// boot processor's local APIC and the application processor's.
fn two_cpus() -> (Arc<Irqchip>, LocalApic, LocalApic) {
    let chip = Irqchip::new(2);
    let mut bsp = chip.take_lapic(0).unwrap();
    let mut ap = chip.take_lapic(1).unwrap();
    bsp.write(SVR, 0x1ff);
    ap.write(SVR, 0x1ff);
    (chip, bsp, ap)
}

/// A control for CPU `cpu`, installed as that CPU's waker.
fn control_for(chip: &Irqchip, cpu: u32) -> Arc<Control> {
    let control = Arc::new(Control::new(Arc::new(NoKick)));
    let c = control.clone();
    chip.set_waker(cpu, Arc::new(move || c.kick()));
    control
}

/// The interpreter's loop with interrupts enabled: runs until it has taken
/// `n` maskable interrupts (each handler ends with an EOI), halting
/// whenever none is pending.
fn vcpu_taking(control: Arc<Control>, mut apic: LocalApic, n: usize) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut taken = Vec::new();
        loop {
            assert!(control.may_enter());
            let seen = control.kicks();
            // A block of guest code, then the check the core makes between
            // blocks.
            if apic.attention() {
                if let Some(vector) = apic.take_interrupt() {
                    taken.push(vector);
                    if taken.len() == n {
                        return taken;
                    }
                    apic.write(EOI, 0);
                    continue;
                }
            }
            // The guest executes `hlt` (IF = 1).
            if apic.interrupt_pending() {
                // Not halting: the next block sees the attention flag.
                thread::yield_now();
                continue;
            }
            control.halt(seen, false);
        }
    })
}

/// [`vcpu_taking`] one interrupt.
fn vcpu_until_interrupt(control: Arc<Control>, apic: LocalApic) -> thread::JoinHandle<u8> {
    let v = vcpu_taking(control, apic, 1);
    thread::spawn(move || v.join().unwrap()[0])
}

/// An application processor waiting for INIT and then SIPI, halted in
/// between; returns the SIPI's vector.
fn vcpu_until_sipi(control: Arc<Control>, mut apic: LocalApic) -> thread::JoinHandle<u8> {
    thread::spawn(move || {
        let mut init = false;
        loop {
            assert!(control.may_enter());
            let seen = control.kicks();
            match apic.take_startup() {
                Some(Startup::Init) => {
                    apic.reset();
                    init = true;
                    continue;
                }
                Some(Startup::Sipi(vector)) if init => return vector,
                Some(Startup::Sipi(_)) => continue,
                None => {}
            }
            control.halt(seen, false);
        }
    })
}

fn send(apic: &mut LocalApic, dest: u8, low: u32) {
    apic.write(ICR2, u32::from(dest) << 24);
    apic.write(ICR, low);
}

#[test]
fn an_ipi_racing_a_halt_is_never_lost() {
    loom::model(|| {
        let (chip, mut bsp, ap) = two_cpus();
        let control = control_for(&chip, 1);
        let v = vcpu_until_interrupt(control, ap);
        // Fixed IPI, physical destination 1, vector 0x50.
        send(&mut bsp, 1, 0x4050);
        assert_eq!(v.join().unwrap(), 0x50);
    });
}

#[test]
fn an_ipi_racing_the_vcpu_taking_another_is_never_lost() {
    loom::model(|| {
        let (chip, mut bsp, ap) = two_cpus();
        let control = control_for(&chip, 1);
        let v = vcpu_taking(control, ap, 2);
        // The second may arrive while the vCPU looks at the first.
        send(&mut bsp, 1, 0x4050);
        send(&mut bsp, 1, 0x4060);
        let mut taken = v.join().unwrap();
        taken.sort();
        assert_eq!(taken, [0x50, 0x60]);
    });
}

#[test]
fn an_interrupt_racing_the_vcpu_taking_an_nmi_is_never_lost() {
    loom::model(|| {
        let (chip, mut bsp, mut ap) = two_cpus();
        let control = control_for(&chip, 1);
        // The core's loop: NMIs and interrupts are taken when the attention
        // flag says so; before halting, a pending NMI is taken instead.
        let v = thread::spawn(move || {
            let (mut nmi, mut vector) = (false, None);
            loop {
                assert!(control.may_enter());
                let seen = control.kicks();
                if ap.attention() {
                    nmi |= ap.take_nmi();
                    if vector.is_none() {
                        vector = ap.take_interrupt();
                    }
                    if nmi && vector.is_some() {
                        return vector;
                    }
                    continue;
                }
                if !nmi && ap.take_nmi() {
                    nmi = true;
                    continue;
                }
                if ap.interrupt_pending() {
                    thread::yield_now();
                    continue;
                }
                control.halt(seen, false);
            }
        });
        send(&mut bsp, 1, 0x4400); // NMI
        send(&mut bsp, 1, 0x4050);
        assert_eq!(v.join().unwrap(), Some(0x50));
    });
}

#[test]
fn a_device_interrupt_through_the_pic_racing_a_halt_is_never_lost() {
    loom::model(|| {
        // At power-on the PIC requests with vector base 0 and the boot
        // processor takes its INTR (LINT0 is ExtINT, the APIC software
        // disabled).
        let chip = Irqchip::new(1);
        let bsp = chip.take_lapic(0).unwrap();
        let control = control_for(&chip, 0);
        let sink = chip.interrupt_sink();
        let v = vcpu_until_interrupt(control, bsp);
        let device = thread::spawn(move || sink.set_level(4, true));
        device.join().unwrap();
        assert_eq!(v.join().unwrap(), 4);
    });
}

#[test]
fn init_and_sipi_racing_halts_start_the_ap() {
    loom::model(|| {
        let chip = Irqchip::new(2);
        let mut bsp = chip.take_lapic(0).unwrap();
        let ap = chip.take_lapic(1).unwrap();
        let control = control_for(&chip, 1);
        let v = vcpu_until_sipi(control, ap);
        send(&mut bsp, 1, 0x4500); // INIT
        send(&mut bsp, 1, 0x4610); // SIPI, vector 0x10
        assert_eq!(v.join().unwrap(), 0x10);
    });
}

#[test]
fn an_event_posted_before_the_waker_is_set_is_not_lost() {
    loom::model(|| {
        let (chip, mut bsp, ap) = two_cpus();
        // The vCPU runs before the machine installs its waker.
        let control = Arc::new(Control::new(Arc::new(NoKick)));
        let v = vcpu_until_interrupt(control.clone(), ap);
        let sender = thread::spawn(move || send(&mut bsp, 1, 0x4050));
        let c = control.clone();
        chip.set_waker(1, Arc::new(move || c.kick()));
        sender.join().unwrap();
        assert_eq!(v.join().unwrap(), 0x50);
    });
}
