//! Protected mode only: privilege changes through the TSS (ring 3 to ring
//! 0: SS:ESP pushed, the inner stack from the TSS), `#GP` for privilege
//! and null selectors, `#NP` and `#SS` for absent segments and gates,
//! `#TS` for a bad inner stack, and the IDT limit.

use super::guest::{sel, start, Asm, Before, Expect, Guest, Mode, CODE, STACK0_TOP, STACK3_TOP};
use iced_x86::code_asm::*;
use iced_x86::IcedError;
use topos_vcpu::interp::state::flag;
use topos_vcpu::interp::{Exit, SegReg};

/// Runs `f` at ring 3 (flat segments, the ring-3 stack) up to `fault`.
pub(crate) fn start3(f: impl FnOnce(&mut Asm) -> Result<(), IcedError>) -> (Guest, Before, super::guest::Code) {
    let code = super::guest::assemble(32, CODE, f);
    let mut g = Guest::new(Mode::Prot, &code);
    g.enter_ring3(CODE);
    let before = g.run_to(code.at("fault"));
    (g, before, code)
}

/// Checks a delivery from ring 3 to a ring-0 handler: the frame on the
/// TSS's ring-0 stack with the outer SS:ESP, and the handler's SS from the
/// TSS.
pub(crate) fn check_inner(g: &Guest, before: &Before, e: Expect) {
    let d = g.delivery().expect("halted in a handler");
    assert_eq!(d.vector, e.vector, "vector ({d:x?})");
    let n = usize::from(e.code.is_some());
    if let Some(code) = e.code {
        assert_eq!(d.slots[0], code, "error code ({d:x?})");
    }
    let f = &d.slots[n..];
    let rf = if super::guest::is_fault(e.vector) && e.eip == before.eip { flag::RF } else { 0 };
    let cs3 = u32::from(before.segment(SegReg::Cs).selector);
    let ss3 = u32::from(before.segment(SegReg::Ss).selector);
    assert_eq!(f[..5], [e.eip, cs3, before.eflags() | rf, before.gpr[4], ss3], "frame ({d:x?})");
    assert_eq!(d.esp, STACK0_TOP - 4 * (5 + n as u32), "ESP: on the TSS's ring-0 stack");
    assert_eq!(d.ss, sel::DATA0, "SS from the TSS");
    assert_eq!(d.cs, sel::CODE0);
}

#[test]
fn int_from_ring3_switches_to_the_tss_stack_and_iret_returns() {
    let (mut g, before, c) = start3(|a| {
        a.mov(eax, 7)?;
        a.mark("fault");
        a.int(0x80)?;
        a.mark("next");
        a.mov(ebx, 1)?;
        a.mark("back");
        a.jmp(0)
    });
    g.deliver();
    check_inner(&g, &before, Expect { vector: 0x80, code: None, eip: c.at("next") });
    // The handler's `iretd` returns to ring 3 on the ring-3 stack.
    g.cpu.state_mut().halted = false;
    let _ = g.run_to(c.at("back"));
    let s = g.state();
    assert_eq!(s.segment(SegReg::Cs).selector, sel::CODE3);
    assert_eq!(s.segment(SegReg::Ss).selector, sel::DATA3);
    assert_eq!(s.segment(SegReg::Ds).selector, sel::DATA3, "DPL-3 data segments stay");
    assert_eq!(s.gpr[4], STACK3_TOP);
    assert_eq!(s.gpr[3], 1);
}

#[test]
fn gp_from_ring3_pushes_its_error_code_on_the_inner_stack() {
    // cli with IOPL 0 at CPL 3.
    let (mut g, before, c) = start3(|a| {
        a.mark("fault");
        a.cli()?;
        a.hlt()
    });
    g.deliver();
    check_inner(&g, &before, Expect { vector: 13, code: Some(0), eip: c.at("fault") });
}

/// Emits one instruction.
type Emit = Box<dyn Fn(&mut Asm) -> Result<(), IcedError>>;

#[test]
fn gp_privileged_instructions_at_ring3() {
    let cases: [(&str, Emit); 6] = [
        ("hlt", Box::new(|a| a.hlt())),
        ("mov eax, cr0", Box::new(|a| a.mov(eax, cr0))),
        ("lidt", Box::new(|a| a.lidt(ptr(0xa000)))),
        ("in al, 0x60 (IOPL 0, no bitmap)", Box::new(|a| a.in_(al, 0x60))),
        ("wrmsr", Box::new(|a| a.wrmsr())),
        ("int 0x21 through a DPL-0 gate", Box::new(|a| a.int(0x21))),
    ];
    for (what, f) in cases {
        let (mut g, before, c) = start3(|a| {
            a.mark("fault");
            f(a)?;
            a.hlt()
        });
        g.deliver();
        let code = if what.starts_with("int") { 0x21 * 8 + 2 } else { 0 };
        eprintln!("{what}");
        check_inner(&g, &before, Expect { vector: 13, code: Some(code), eip: c.at("fault") });
    }
}

#[test]
fn gp_loading_a_ring0_data_segment_at_ring3() {
    let (mut g, before, c) = start3(|a| {
        a.mov(eax, sel::DATA0 as u32)?;
        a.mark("fault");
        a.mov(ds, ax)?;
        a.hlt()
    });
    g.deliver();
    check_inner(&g, &before, Expect { vector: 13, code: Some(u32::from(sel::DATA0)), eip: c.at("fault") });
}

#[test]
fn ss_push_beyond_the_ring3_stack_limit() {
    // SS = a 256-byte ring-3 segment, ESP = 2: the push wraps below 0.
    let (mut g, before, c) = start3(|a| {
        a.mov(eax, sel::SMALL3 as u32)?;
        a.mov(ss, ax)?;
        a.mov(esp, 2)?;
        a.mark("fault");
        a.push(eax)?;
        a.hlt()
    });
    g.deliver();
    check_inner(&g, &before, Expect { vector: 12, code: Some(0), eip: c.at("fault") });
    assert_eq!(g.state().cr2, 0);
}

#[test]
fn gp_null_selector_use() {
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.xor(eax, eax)?;
        a.mov(es, ax)?; // loading null is fine
        a.mark("fault");
        a.mov(ebx, dword_ptr(0).es())?;
        a.hlt()
    });
    g.deliver().check(&before, Expect { vector: 13, code: Some(0), eip: c.at("fault") });
    // A null SS cannot even be loaded.
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.xor(eax, eax)?;
        a.mark("fault");
        a.mov(ss, ax)?;
        a.hlt()
    });
    g.deliver().check(&before, Expect { vector: 13, code: Some(0), eip: c.at("fault") });
}

#[test]
fn gp_write_to_read_only_and_code_segments() {
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mov(eax, sel::READ_ONLY as u32)?;
        a.mov(es, ax)?;
        a.mov(ebx, dword_ptr(0xa000).es())?; // reading is fine
        a.mark("fault");
        a.mov(dword_ptr(0xa000).es(), ebx)?;
        a.hlt()
    });
    g.deliver().check(&before, Expect { vector: 13, code: Some(0), eip: c.at("fault") });
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mark("fault");
        a.mov(dword_ptr(0xa000).cs(), ebx)?;
        a.hlt()
    });
    g.deliver().check(&before, Expect { vector: 13, code: Some(0), eip: c.at("fault") });
}

#[test]
fn np_and_ss_loading_absent_segments() {
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mov(eax, sel::ABSENT_DATA as u32)?;
        a.mark("fault");
        a.mov(ds, ax)?;
        a.hlt()
    });
    g.deliver().check(&before, Expect { vector: 11, code: Some(u32::from(sel::ABSENT_DATA)), eip: c.at("fault") });
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mov(eax, sel::ABSENT_DATA as u32)?;
        a.mark("fault");
        a.mov(ss, ax)?;
        a.hlt()
    });
    g.deliver().check(&before, Expect { vector: 12, code: Some(u32::from(sel::ABSENT_DATA)), eip: c.at("fault") });
    // A far jump to an absent code segment.
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mark("fault");
        a.db(&[0xea, 0, 0x80, 0, 0])?;
        a.dw(&[sel::ABSENT_CODE])?;
        a.hlt()
    });
    g.deliver().check(&before, Expect { vector: 11, code: Some(u32::from(sel::ABSENT_CODE)), eip: c.at("fault") });
}

#[test]
fn np_int_through_an_absent_gate() {
    // int n: #NP with the gate's IDT error code (IDT bit, no EXT), the
    // int instruction as the return address.
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mark("fault");
        a.int(0x40)?;
        a.hlt()
    });
    g.set_gate(0x40, super::guest::gate(sel::CODE0, super::guest::HANDLERS, 0xe, 0, false));
    g.deliver().check(&before, Expect { vector: 11, code: Some(0x40 * 8 + 2), eip: c.at("fault") });
}

#[test]
fn np_exception_through_an_absent_gate_sets_ext() {
    // #UD (benign) whose gate is absent: #NP delivered next, with EXT set
    // (it happened while delivering an event the program did not ask for).
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mark("fault");
        a.ud2()?;
        a.hlt()
    });
    g.set_gate(6, super::guest::gate(sel::CODE0, super::guest::HANDLERS, 0xe, 0, false));
    g.deliver().check(&before, Expect { vector: 11, code: Some(6 * 8 + 2 + 1), eip: c.at("fault") });
}

#[test]
fn np_gate_to_an_absent_code_segment() {
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mark("fault");
        a.int(0x41)?;
        a.hlt()
    });
    g.set_gate(0x41, super::guest::gate(sel::ABSENT_CODE, super::guest::HANDLERS, 0xe, 0, true));
    g.deliver().check(&before, Expect { vector: 11, code: Some(u32::from(sel::ABSENT_CODE)), eip: c.at("fault") });
}

#[test]
fn gp_idt_limit() {
    // The IDT ends before vector 0x40: int 0x40 is #GP(0x40 * 8 + 2).
    let (mut g, before, c) = start(Mode::Prot, |a| {
        a.mark("fault");
        a.int(0x40)?;
        a.hlt()
    });
    g.cpu.state_mut().idtr.limit = 0x40 * 8 - 1;
    g.deliver().check(&before, Expect { vector: 13, code: Some(0x40 * 8 + 2), eip: c.at("fault") });
}

/// Sends `vectors` to ring-3 handlers (the flat ring-3 code segment, so
/// their delivery from ring 3 needs no inner stack), runs until the first
/// of them is entered, and returns its vector and the frame on the ring-3
/// stack (a ring-3 handler cannot halt: the test steps to it).
fn run_to_ring3_handler(g: &mut Guest, vectors: &[u8]) -> (u8, [u32; 4], u32) {
    use super::guest::{gate, HANDLERS};
    for &v in vectors {
        g.set_gate(v, gate(sel::CODE3, HANDLERS + 16 * u32::from(v), 0xe, 0, true));
    }
    for _ in 0..100 {
        let eip = g.state().eip;
        if let Some(&v) = vectors.iter().find(|&&v| eip == HANDLERS + 16 * u32::from(v)) {
            assert_eq!(g.state().segment(SegReg::Cs).selector, sel::CODE3);
            let top = g.state().gpr[4];
            let w = |i: u32| g.read_u32(top + 4 * i);
            return (v, [w(0), w(1), w(2), w(3)], top);
        }
        assert_eq!(g.cpu.step(), Exit::Limit, "stopped at {eip:#x}");
    }
    panic!("no ring-3 handler of {vectors:?} ran; state {:x?}", g.state());
}

/// A ring-3 `int 0x80` with the TSS's SS0 replaced by `ss0` raises
/// `vector` with `code`, delivered at ring 3 with the `int` as the return
/// address.
fn bad_inner_stack(ss0: u32, tss_limit: u32, vector: u8, code: u32) {
    let (mut g, before, c) = start3(|a| {
        a.mark("fault");
        a.int(0x80)?;
        a.hlt()
    });
    g.write_u32(super::guest::TSS + 8, ss0);
    g.cpu.state_mut().tr.limit = tss_limit;
    let (v, frame, top) = run_to_ring3_handler(&mut g, &[10, 12, 13]);
    assert_eq!((v, frame[0]), (vector, code), "vector and error code (ss0 {ss0:#x})");
    let flags = before.eflags() | flag::RF;
    assert_eq!(frame[1..], [c.at("fault"), u32::from(sel::CODE3), flags], "return CS:EIP, EFLAGS");
    assert_eq!(top, STACK3_TOP - 16, "on the ring-3 stack");
}

#[test]
fn ts_bad_inner_stack_selector() {
    // Null: #TS(EXT = 0 for int n).
    bad_inner_stack(0, 0x67, 10, 0);
    // A ring-3 data segment (RPL and DPL are not 0).
    bad_inner_stack(u32::from(sel::DATA3), 0x67, 10, u32::from(sel::DATA3 & !3));
    // Read-only data.
    bad_inner_stack(u32::from(sel::READ_ONLY), 0x67, 10, u32::from(sel::READ_ONLY));
    // Beyond the GDT.
    bad_inner_stack(0x400, 0x67, 10, 0x400);
    // Code.
    bad_inner_stack(u32::from(sel::CODE0), 0x67, 10, u32::from(sel::CODE0));
    // A TSS too short to hold SS0 (it needs bytes 4-9): #TS(TSS selector).
    bad_inner_stack(u32::from(sel::DATA0), 0x8, 10, u32::from(sel::TSS));
}

#[test]
fn ss_absent_inner_stack() {
    bad_inner_stack(u32::from(sel::ABSENT_DATA), 0x67, 12, u32::from(sel::ABSENT_DATA));
}

#[test]
fn ts_while_delivering_a_fault_is_a_double_fault() {
    // A ring-3 #GP whose delivery finds a bad inner stack: #TS with EXT
    // set, contributory after contributory: #DF(0), pushed with the
    // faulting instruction's address.
    let (mut g, before, c) = start3(|a| {
        a.mark("fault");
        a.cli()?;
        a.hlt()
    });
    g.write_u32(super::guest::TSS + 8, 0);
    let (v, frame, top) = run_to_ring3_handler(&mut g, &[8]);
    assert_eq!(v, 8);
    assert_eq!(frame, [0, c.at("fault"), u32::from(sel::CODE3), before.eflags()], "#DF frame");
    assert_eq!(top, STACK3_TOP - 16);
}

#[test]
fn ts_ext_bit_while_delivering_an_exception() {
    // A ring-3 #UD (benign) whose delivery finds a null SS0: #TS(EXT).
    let (mut g, before, c) = start3(|a| {
        a.mark("fault");
        a.ud2()?;
        a.hlt()
    });
    g.write_u32(super::guest::TSS + 8, u32::from(sel::DATA3));
    let (v, frame, _) = run_to_ring3_handler(&mut g, &[10]);
    assert_eq!((v, frame[0]), (10, u32::from(sel::DATA3 & !3) | 1));
    assert_eq!(frame[1..], [c.at("fault"), u32::from(sel::CODE3), before.eflags() | flag::RF]);
}

#[test]
fn np_int_on_an_exception_vector_is_delivered_serially() {
    // `int 8` and `int 13` are software interrupts, not exceptions: a
    // fault while delivering them is the first exception (no #DF, no
    // shutdown for vector 8).
    for v in [8u8, 13] {
        let (mut g, before, c) = start(Mode::Prot, |a| {
            a.mark("fault");
            a.int(u32::from(v))?;
            a.hlt()
        });
        g.set_gate(v, super::guest::gate(sel::CODE0, super::guest::HANDLERS, 0xe, 0, false));
        g.deliver().check(&before, Expect { vector: 11, code: Some(u32::from(v) * 8 + 2), eip: c.at("fault") });
    }
}
