//! One test per vector an instruction raises by itself, each in real mode
//! and in 32-bit protected mode at ring 0: the vector delivered, its error
//! code, the return address (the instruction for a fault, the next one for
//! a trap or a software interrupt), the flags pushed and the stack used,
//! and that a fault left the registers as they were.

use super::guest::{start, Expect, Mode, DATA};
use iced_x86::code_asm::*;
use topos_vcpu::interp::state::{cr0, flag};

/// `mod name { real, protected }`, each calling `name(mode)`.
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::super::guest::Mode;
            #[test]
            fn real() {
                super::$name(Mode::Real)
            }
            #[test]
            fn protected() {
                super::$name(Mode::Prot)
            }
        }
    )*};
}

both_modes!(
    de_divide_by_zero,
    de_quotient_overflow,
    de_aam_zero,
    db_int1,
    db_single_step,
    bp_int3,
    of_into,
    br_bound,
    ud_ud2,
    ud_invalid_opcode,
    ud_lock_on_a_register,
    ud_lock_on_a_move,
    nm_x87_with_em,
    nm_x87_with_ts,
    nm_wait_with_mp_ts,
    ud_x87_without_em,
    gp_data_beyond_limit,
    ss_stack_beyond_limit,
    gp_wrmsr_unknown,
    gp_rdmsr_unknown,
    gp_reserved_cr4_bit,
    gp_near_jump_beyond_limit,
    gp_far_jump_beyond_limit,
    int_n_soft_interrupt,
);

/// A fault: delivered with the faulting instruction's address, no register
/// changed.
fn expect_fault(
    mode: Mode,
    vector: u8,
    code: Option<u32>,
    f: impl FnOnce(&mut super::guest::Asm) -> Result<(), IcedError>,
) {
    let (mut g, before, c) = start(mode, f);
    let d = g.deliver();
    d.check(&before, Expect { vector, code, eip: c.at("fault") });
    let mut gpr = before.gpr;
    gpr[4] = g.state().gpr[4];
    assert_eq!(g.state().gpr, gpr, "a fault changes no register");
}

/// A trap or software interrupt: delivered with the next instruction's
/// address.
fn expect_trap(mode: Mode, vector: u8, f: impl FnOnce(&mut super::guest::Asm) -> Result<(), IcedError>) {
    let (mut g, before, c) = start(mode, f);
    let d = g.deliver();
    d.check(&before, Expect { vector, code: None, eip: c.at("next") });
}

fn de_divide_by_zero(mode: Mode) {
    expect_fault(mode, 0, None, |a| {
        a.mov(eax, 0x1234)?;
        a.mov(edx, 0)?;
        a.mov(ecx, 0)?;
        a.mark("fault");
        a.div(ecx)?;
        a.hlt()
    });
}

fn de_quotient_overflow(mode: Mode) {
    // 8-bit: 0x1000 / 1 does not fit in AL.
    expect_fault(mode, 0, None, |a| {
        a.mov(eax, 0x1000)?;
        a.mov(ecx, 1)?;
        a.mark("fault");
        a.div(cl)?;
        a.hlt()
    });
    // 32-bit: EDX:EAX = 1:0 divided by 1.
    expect_fault(mode, 0, None, |a| {
        a.mov(eax, 0)?;
        a.mov(edx, 1)?;
        a.mov(ecx, 1)?;
        a.mark("fault");
        a.div(ecx)?;
        a.hlt()
    });
    // Signed: -2^31 / -1.
    expect_fault(mode, 0, None, |a| {
        a.mov(eax, 0x8000_0000u32)?;
        a.mov(edx, 0xffff_ffffu32)?;
        a.mov(ecx, 0xffff_ffffu32)?;
        a.mark("fault");
        a.idiv(ecx)?;
        a.hlt()
    });
    // Signed 16-bit: 0x8000 / -1 (a negative quotient that fits does not fault).
    expect_fault(mode, 0, None, |a| {
        a.mov(eax, 0x8000)?;
        a.mov(edx, 0xffff)?;
        a.mov(ecx, 0x7fff)?;
        a.idiv(cx)?; // -32768 / 32767 = -1 remainder -1: fits
        a.mov(eax, 0x8000)?;
        a.mov(edx, 0xffff)?;
        a.mov(ecx, 0xffff)?;
        a.mark("fault");
        a.idiv(cx)?;
        a.hlt()
    });
}

fn de_aam_zero(mode: Mode) {
    expect_fault(mode, 0, None, |a| {
        a.mov(eax, 0x55)?;
        a.mark("fault");
        a.db(&[0xd4, 0x00])?; // aam 0
        a.hlt()
    });
}

fn db_int1(mode: Mode) {
    // `int1` (icebp) is a trap: the next instruction's address, and no RF.
    expect_trap(mode, 1, |a| {
        a.mark("fault");
        a.int1()?;
        a.mark("next");
        a.hlt()
    });
}

fn db_single_step(mode: Mode) {
    // With EFLAGS.TF set, the debug trap comes after the next instruction
    // (the next one's address pushed, TF in the pushed flags) with DR6.BS.
    let (mut g, mut before, c) = start(mode, |a| {
        a.mark("fault");
        a.nop()?;
        a.mark("next");
        a.hlt()
    });
    let f = before.eflags() | flag::TF;
    before.set_eflags(f);
    g.cpu.state_mut().set_eflags(f);
    let d = g.deliver();
    d.check(&before, Expect { vector: 1, code: None, eip: c.at("next") });
    assert_ne!(g.state().dr[6] & (1 << 14), 0, "DR6.BS");
}

fn bp_int3(mode: Mode) {
    expect_trap(mode, 3, |a| {
        a.stc()?;
        a.mark("fault");
        a.int3()?;
        a.mark("next");
        a.hlt()
    });
}

fn of_into(mode: Mode) {
    expect_trap(mode, 4, |a| {
        // No overflow: `into` does nothing.
        a.mov(eax, 1)?;
        a.add(eax, 1)?;
        CodeAssembler::into(&mut a.a)?;
        // Overflow: 0x7fffffff + 1.
        a.mov(eax, 0x7fff_ffff)?;
        a.add(eax, 1)?;
        a.mark("fault");
        CodeAssembler::into(&mut a.a)?;
        a.mark("next");
        a.hlt()
    });
}

fn br_bound(mode: Mode) {
    let (mut g, before, c) = start(mode, |a| {
        a.mov(dword_ptr(DATA), 10)?;
        a.mov(dword_ptr(DATA + 4), 20)?;
        a.mov(eax, 20)?;
        a.bound(eax, dword_ptr(DATA))?; // in range
        a.mov(eax, -5)?;
        a.mark("fault");
        a.bound(eax, dword_ptr(DATA))?;
        a.hlt()
    });
    g.deliver().check(&before, Expect { vector: 5, code: None, eip: c.at("fault") });
}

fn ud_ud2(mode: Mode) {
    expect_fault(mode, 6, None, |a| {
        a.mark("fault");
        a.ud2()?;
        a.hlt()
    });
}

fn ud_invalid_opcode(mode: Mode) {
    // fe /7 has no instruction.
    expect_fault(mode, 6, None, |a| {
        a.mark("fault");
        a.db(&[0xfe, 0xf8])?;
        a.hlt()
    });
    // `mov cs, ax`.
    expect_fault(mode, 6, None, |a| {
        a.mark("fault");
        a.db(&[0x8e, 0xc8])?;
        a.hlt()
    });
}

fn ud_lock_on_a_register(mode: Mode) {
    // lock add eax, ebx: lockable, but not with a register destination.
    expect_fault(mode, 6, None, |a| {
        a.mov(eax, 1)?;
        a.mark("fault");
        a.db(&[0xf0, 0x66, 0x01, 0xd8])?;
        a.hlt()
    });
}

fn ud_lock_on_a_move(mode: Mode) {
    // lock mov [DATA], al: `mov` is never lockable; memory is unchanged.
    let (mut g, before, c) = start(mode, |a| {
        a.mov(eax, 0x5a)?;
        a.mark("fault");
        a.lock().mov(byte_ptr(DATA), al)?;
        a.hlt()
    });
    g.deliver().check(&before, Expect { vector: 6, code: None, eip: c.at("fault") });
    assert_eq!(g.read(DATA, 1), [0]);
}

fn with_cr0(
    bits: u32,
    f: impl FnOnce(&mut super::guest::Asm) -> Result<(), IcedError>,
) -> impl FnOnce(&mut super::guest::Asm) -> Result<(), IcedError> {
    move |a| {
        a.mov(eax, cr0)?;
        a.or(eax, bits as i32)?;
        a.mov(cr0, eax)?;
        f(a)
    }
}

fn nm_x87_with_em(mode: Mode) {
    expect_fault(
        mode,
        7,
        None,
        with_cr0(cr0::EM, |a| {
            a.mark("fault");
            a.fld1()?;
            a.hlt()
        }),
    );
}

fn nm_x87_with_ts(mode: Mode) {
    expect_fault(
        mode,
        7,
        None,
        with_cr0(cr0::TS, |a| {
            a.mark("fault");
            a.db(&[0xd8, 0xc1])?; // fadd st, st(1)
            a.hlt()
        }),
    );
}

fn nm_wait_with_mp_ts(mode: Mode) {
    // `wait` ignores TS unless MP is set.
    expect_fault(
        mode,
        7,
        None,
        with_cr0(cr0::TS, |a| {
            a.wait()?;
            a.mov(eax, cr0)?;
            a.or(eax, cr0::MP as i32)?;
            a.mov(cr0, eax)?;
            a.mark("fault");
            a.wait()?;
            a.hlt()
        }),
    );
}

fn ud_x87_without_em(mode: Mode) {
    // This CPU has no FPU: with EM and TS clear, an x87 instruction is #UD.
    expect_fault(mode, 6, None, |a| {
        a.mark("fault");
        a.fld1()?;
        a.hlt()
    });
}

fn gp_data_beyond_limit(mode: Mode) {
    match mode {
        // A word at DS:0xffff crosses the 64 KiB limit.
        Mode::Real => expect_fault(mode, 13, None, |a| {
            a.mov(ebx, 0xffff)?;
            a.mark("fault");
            a.mov(ax, word_ptr(bx))?;
            a.hlt()
        }),
        // A dword at offset 0xfe of a 256-byte segment.
        Mode::Prot => expect_fault(mode, 13, Some(0), |a| {
            a.mov(eax, super::guest::sel::SMALL as i32)?;
            a.mov(es, ax)?;
            a.mov(eax, dword_ptr(0xfc).es())?; // the last dword: fine
            a.mark("fault");
            a.mov(eax, dword_ptr(0xfe).es())?;
            a.hlt()
        }),
    }
}

fn ss_stack_beyond_limit(mode: Mode) {
    match mode {
        // A word at SS:0xffff through BP crosses the 64 KiB limit: #SS.
        Mode::Real => expect_fault(mode, 12, None, |a| {
            a.mov(ebp, 0xffff)?;
            a.mark("fault");
            a.mov(ax, word_ptr(bp))?;
            a.hlt()
        }),
        // Below, with SS the small segment.
        Mode::Prot => {}
    }
    if mode == Mode::Prot {
        // SS is the small segment: ESP = 0x80 works, 0x100 is beyond it.
        let (mut g, before, c) = start(mode, |a| {
            a.mov(eax, super::guest::sel::SMALL as i32)?;
            a.mov(esp, 0x80)?;
            a.mov(ss, ax)?;
            a.mov(ecx, 0x100)?;
            a.mark("fault");
            a.mov(eax, dword_ptr(ecx).ss())?;
            a.hlt()
        });
        g.deliver().check(&before, Expect { vector: 12, code: Some(0), eip: c.at("fault") });
    }
}

fn gp_wrmsr_unknown(mode: Mode) {
    let code = if mode == Mode::Real { None } else { Some(0) };
    expect_fault(mode, 13, code, |a| {
        a.mov(ecx, 0x1234_5678)?;
        a.mark("fault");
        a.wrmsr()?;
        a.hlt()
    });
}

fn gp_rdmsr_unknown(mode: Mode) {
    let code = if mode == Mode::Real { None } else { Some(0) };
    expect_fault(mode, 13, code, |a| {
        a.mov(ecx, 0xc000_1234u32)?;
        a.mark("fault");
        a.rdmsr()?;
        a.hlt()
    });
}

fn gp_reserved_cr4_bit(mode: Mode) {
    let code = if mode == Mode::Real { None } else { Some(0) };
    expect_fault(mode, 13, code, |a| {
        a.mov(eax, 1 << 30)?;
        a.mark("fault");
        a.mov(cr4, eax)?;
        a.hlt()
    });
}

fn gp_near_jump_beyond_limit(mode: Mode) {
    if mode == Mode::Real {
        // A 32-bit near jump past 0xffff.
        expect_fault(mode, 13, None, |a| {
            a.mov(eax, 0x1_0000)?;
            a.mark("fault");
            a.jmp(eax)?;
            a.hlt()
        });
        return;
    }
    // In the 16-bit code segment (limit 0xffff): jmp far there, then a
    // 32-bit near jump past its limit.
    let inner = super::guest::CODE + 0x100;
    let code = super::guest::assemble(32, super::guest::CODE, |a| {
        a.db(&[0xea])?;
        a.dd(&[inner])?;
        a.dw(&[super::guest::sel::CODE16])
    });
    let code16 = super::guest::assemble(16, inner, |a| {
        a.mov(eax, 0x1_0000)?;
        a.mark("fault");
        a.jmp(eax)?;
        a.hlt()
    });
    let mut g = super::guest::Guest::new(mode, &code);
    g.write(inner, &code16.bytes);
    let before = g.run_to(code16.at("fault"));
    g.deliver().check(&before, Expect { vector: 13, code: Some(0), eip: code16.at("fault") });
}

fn gp_far_jump_beyond_limit(mode: Mode) {
    match mode {
        // jmp far 0:0x10000 (with an operand-size prefix).
        Mode::Real => expect_fault(mode, 13, None, |a| {
            a.mark("fault");
            a.db(&[0x66, 0xea, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00])?;
            a.hlt()
        }),
        // jmp far CODE16:0x10000.
        Mode::Prot => expect_fault(mode, 13, Some(0), |a| {
            a.mark("fault");
            a.db(&[0xea, 0x00, 0x00, 0x01, 0x00])?;
            a.dw(&[super::guest::sel::CODE16])?;
            a.hlt()
        }),
    }
}

fn int_n_soft_interrupt(mode: Mode) {
    // `int n` for every vector class: an exception's vector delivered by
    // software pushes no error code.
    for v in [0x08u8, 0x0d, 0x0e, 0x21, 0xff] {
        expect_trap(mode, v, |a| {
            a.mark("fault");
            a.int(v as u32)?;
            a.mark("next");
            a.hlt()
        });
    }
}

#[test]
fn gp_instruction_crossing_the_cs_limit_and_a_page() {
    // Real mode, CS base 0: `mov ax, 0x1234` at 0xfffe ends at 0x10000,
    // past the 64 KiB limit (and on the next page): #GP before it runs.
    let code = super::guest::assemble(16, super::guest::CODE, |a| a.jmp(0xfffe_u64));
    let mut g = super::guest::Guest::new(Mode::Real, &code);
    g.write(0xfffe, &[0xb8, 0x34, 0x12]);
    let before = g.run_to(0xfffe);
    g.deliver().check(&before, Expect { vector: 13, code: None, eip: 0xfffe });
    assert_eq!(g.state().gpr[0] & 0xffff, before.gpr[0] & 0xffff, "AX unchanged");
}
