//! Faults while delivering an event: the double-fault rules (contributory
//! after contributory, anything but a benign exception after `#PF`: `#DF`
//! with error code 0 and the first fault's return address; otherwise the
//! second exception is delivered), and triple faults (a fault while
//! delivering `#DF`: the machine shuts down).

use super::guest::{gate, sel, start, Asm, Expect, Guest, Mode, HANDLERS, IDT};
use super::paging::{enable, set_pte, Paging};
use iced_x86::code_asm::*;
use iced_x86::IcedError;
use topos_vcpu::interp::Exit;

fn absent_gate(g: &Guest, v: u8) {
    g.set_gate(v, gate(sel::CODE0, HANDLERS, 0xe, 0, false));
}

fn wrmsr_fault(a: &mut Asm) -> Result<(), IcedError> {
    a.mov(ecx, 0x1234)?;
    a.mark("fault");
    a.wrmsr()?;
    a.hlt()
}

#[test]
fn gp_then_np_is_a_double_fault() {
    let (mut g, before, c) = start(Mode::Prot, wrmsr_fault);
    absent_gate(&g, 13);
    g.deliver().check(&before, Expect { vector: 8, code: Some(0), eip: c.at("fault") });
}

#[test]
fn pf_then_gp_is_a_double_fault() {
    // #PF whose gate names a selector beyond the GDT.
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mark("fault");
        a.mov(eax, dword_ptr(0x30_0000))?;
        a.hlt()
    });
    enable(&mut g, Paging::Bits32);
    set_pte(&g, Paging::Bits32, 0x30_0000, 0);
    g.set_gate(14, gate(0x400, HANDLERS, 0xe, 0, true));
    let mut before = before;
    before.cr0 = g.state().cr0;
    g.deliver().check(&before, Expect { vector: 8, code: Some(0), eip: c.at("fault") });
}

/// Moves the IDT so that it starts `below` bytes under 0x21000, with the
/// page at 0x20000 (`low_absent`) or 0x21000 absent: the gates on that
/// page cannot be read.
fn split_idt(g: &mut Guest, below: u32, low_absent: bool) -> u32 {
    let base = 0x21000 - below;
    let table = g.read(IDT, 256 * 8);
    g.write(base, &table);
    g.cpu.state_mut().idtr.base = base;
    enable(g, Paging::Bits32);
    set_pte(g, Paging::Bits32, if low_absent { 0x20000 } else { 0x21000 }, 0);
    base
}

#[test]
fn pf_then_pf_is_a_double_fault() {
    // Gates 0-8 on a present page, 9 and up on an absent one.
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mark("fault");
        a.mov(eax, dword_ptr(0x30_0000))?;
        a.hlt()
    });
    let base = split_idt(&mut g, 9 * 8, false);
    set_pte(&g, Paging::Bits32, 0x30_0000, 0);
    let mut before = before;
    before.cr0 = g.state().cr0;
    let d = g.deliver();
    d.check(&before, Expect { vector: 8, code: Some(0), eip: c.at("fault") });
    assert_eq!(d.cr2, base + 14 * 8, "CR2: the second #PF's address (gate 14)");
}

#[test]
fn gp_then_pf_is_delivered_serially() {
    // Gates 0-13 on an absent page, 14 and up present: #GP's gate faults,
    // and the #PF is delivered with #GP's return address.
    let (mut g, before, c) = start(Mode::Prot, wrmsr_fault);
    let base = split_idt(&mut g, 14 * 8, true);
    let mut before = before;
    before.cr0 = g.state().cr0;
    let d = g.deliver();
    d.check(&before, Expect { vector: 14, code: Some(0), eip: c.at("fault") });
    assert_eq!(d.cr2, base + 13 * 8);
}

#[test]
fn int3_then_pf_is_delivered_serially() {
    // A software interrupt whose gate faults: the #PF returns to the int3.
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mark("fault");
        a.int3()?;
        a.hlt()
    });
    let base = split_idt(&mut g, 4 * 8, true);
    let mut before = before;
    before.cr0 = g.state().cr0;
    let d = g.deliver();
    d.check(&before, Expect { vector: 14, code: Some(0), eip: c.at("fault") });
    assert_eq!(d.cr2, base + 3 * 8);
}

#[test]
fn real_mode_double_fault() {
    // The IVT ends after vector 12: #GP's entry is beyond it (#GP again,
    // contributory twice), and #DF's is within.
    let (mut g, before, c) = start(Mode::Real, |a| {
        a.mov(ebx, 0xffff)?;
        a.mark("fault");
        a.mov(ax, word_ptr(bx))?;
        a.hlt()
    });
    g.cpu.state_mut().idtr.limit = 13 * 4 - 1;
    let mut before = before;
    before.idtr = g.state().idtr;
    g.deliver().check(&before, Expect { vector: 8, code: None, eip: c.at("fault") });
}

#[test]
fn triple_fault_double_fault_gate_absent() {
    let (mut g, _, _) = start(Mode::Prot, wrmsr_fault);
    absent_gate(&g, 13);
    absent_gate(&g, 8);
    assert_eq!(g.run(10), Exit::Shutdown);
}

#[test]
fn triple_fault_empty_idt_and_ivt() {
    for mode in [Mode::Real, Mode::Prot] {
        let (mut g, _, _) = start(mode, |a| {
            a.mark("fault");
            a.ud2()
        });
        g.cpu.state_mut().idtr.limit = 0;
        assert_eq!(g.run(10), Exit::Shutdown, "{mode:?}");
    }
}

#[test]
fn triple_fault_ring3_fault_with_the_inner_stack_absent() {
    // #GP at ring 3; the TSS's ring-0 stack page is absent: #PF while
    // delivering #GP (serial), #PF while delivering #PF (#DF), #PF while
    // delivering #DF: shutdown.
    let code = super::guest::assemble(32, super::guest::CODE, |a| {
        a.mark("fault");
        a.cli()?;
        a.hlt()
    });
    let mut g = Guest::new(Mode::Prot, &code);
    g.enter_ring3(super::guest::CODE);
    enable(&mut g, Paging::Bits32);
    set_pte(&g, Paging::Bits32, super::guest::STACK0_TOP - 0x1000, 0);
    assert_eq!(g.run(10), Exit::Shutdown);
}
