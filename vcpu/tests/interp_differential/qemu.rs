//! The QEMU TCG runner: a batch of cases in one `qemu-system-x86_64`
//! process, for what PVM cannot emulate (`daa`, `aaa`, `aas`, `enter`
//! with a nesting level or an operand-size prefix, `int n` in protected
//! mode, `ud2` in real mode...).
//!
//! Guest RAM is a file shared with QEMU (`memory-backend-file`,
//! `share=on`): the runner writes the system tables and every case (its
//! registers, code and window) into it, QEMU boots a 64 KiB BIOS made here
//! whose harness runs the cases one after the other, and the runner reads
//! each case's registers and window back from the file once QEMU has left
//! through `isa-debug-exit`.
//!
//! The harness: flat 32-bit protected mode; per case it copies the code to
//! [`CODE`] and the window to [`WINDOW`], then enters the case — ring-0
//! cases with `popad; popfd; mov esp, [esp]; jmp far`, real-mode cases
//! through a 16-bit code segment, clearing CR0.PE, and `popad; popfd; pop
//! esp` on a launch block below 1 MiB. A case's final `out` is followed by
//! a far jump back (instead of `hlt`); exceptions go to stubs that note
//! the vector. Back in the harness, the registers are saved (real mode
//! writes them through CS into a RAM copy of its code, the one segment it
//! can write without touching a register or the window) and the window is
//! copied out.

use super::case::Case;
use super::frame::{unwind, Frame};
use super::layout::*;
use super::outcome::{End, Outcome, State};
use super::registry::Profile;
use crate::support::harness_asm::{asm, jmp_far};
use crate::support::qemu_shared_ram::{Bios, Config, SharedRamQemu, ROM};
use iced_x86::code_asm::*;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// The spacing of the fault stubs.
const STUB: u32 = 32;
/// ROM offsets of the harness's parts (after the shared skeleton's reset
/// code and GDTR).
mod rom {
    /// The IDTR (32-bit) and IVT pseudo-descriptors, and the window's
    /// real-mode segment.
    pub const IDTR: u32 = 0x0110;
    pub const IVTR: u32 = 0x0120;
    pub const WINDOW_SEG: u32 = 0x0130;
    /// The main loop (32-bit).
    pub const MAIN: u32 = 0x1000;
    /// A ring-0 case's way back, then the protected-mode fault stubs.
    pub const PM_END: u32 = 0x2000;
    pub const PM_STUBS: u32 = 0x2100;
    /// Saving the state and copying the window out (32-bit).
    pub const COLLECT: u32 = 0x2800;
    /// Into real mode and a real-mode case (16-bit).
    pub const RM_LAUNCH: u32 = 0x3000;
    /// The real-mode return code, copied to [`super::RM_RAM`].
    pub const RM_RAM: u32 = 0x4000;
}
/// Where the real-mode return code runs (segment `RM_RAM >> 4`), with
/// the harness's variables after it.
const RM_RAM: u32 = 0x9000;
/// Its size.
const RM_RAM_SIZE: u32 = 0x800;
/// Offsets (from `RM_RAM`) of the variables: the saved registers (EAX..EDI),
/// EFLAGS, how the case ended (1: its `out`, 2: a fault) and the vector.
const SAVE: u32 = 0x800;
const SAVE_EFLAGS: u32 = SAVE + 0x20;
const KIND: u32 = SAVE + 0x24;
const VECTOR: u32 = SAVE + 0x28;
/// The current record's address, the case count (written by the runner)
/// and the index of the case running.
const CURRENT: u32 = SAVE + 0x2c;
const COUNT: u32 = SAVE + 0x30;
const INDEX: u32 = SAVE + 0x34;
/// Real mode's stack (top) while it saves the state, and the launch block
/// a real-mode case's registers are popped from.
const RM_STACK: u16 = 0xf00;
const LAUNCH: u32 = 0x9c00;
/// The harness's stack in protected mode.
const PM_STACK: u32 = 0xb000;
/// A 16-bit code segment at `f0000` and a 16-bit data segment at 0, for
/// the way into real mode.
const SEL_CODE16: u16 = 0x50;
const SEL_DATA16: u16 = 0x58;

/// Where the cases' records start, and their size: a header (mode, code
/// length, the launch block: EDI, ESI, EBP, ESP, EBX, EDX, ECX, EAX as
/// `popad` reads them, EFLAGS, ESP), the outcome (EAX..EDI, EFLAGS, kind,
/// vector) at +0x100, the code at +0x1000, the window in at +0x2000 and out
/// at +0x12000.
const RECORDS: u64 = 0x10_0000;
const RECORD: u64 = 0x2_2000;
const REC_OUT: u64 = 0x100;
const REC_CODE: u64 = 0x1000;
const REC_WINDOW_IN: u64 = 0x2000;
const REC_WINDOW_OUT: u64 = 0x1_2000;
/// The most code a case may have here.
const REC_CODE_MAX: usize = 0x1000;

/// The 64 KiB BIOS image holding the harness.
fn bios() -> Vec<u8> {
    // Real mode: protected mode with the runner's GDT.
    let mut bios = Bios::new(GDT as u32, GDT_LIMIT, SEL_CODE32, rom::MAIN);
    let mut idtr = (u16::from(VECTORS) * 8 - 1).to_le_bytes().to_vec();
    idtr.extend((IDT32 as u32).to_le_bytes());
    bios.put(rom::IDTR, &idtr);
    let mut ivtr = (u16::from(VECTORS) * 4 - 1).to_le_bytes().to_vec();
    ivtr.extend(0u32.to_le_bytes());
    bios.put(rom::IVTR, &ivtr);
    bios.put(rom::WINDOW_SEG, &((WINDOW >> 4) as u16).to_le_bytes());
    let var = |off: u32| RM_RAM + off;
    let (main, next_ip) = main_loop();
    bios.put(rom::MAIN, &main);
    // A ring-0 case's way back, and its fault stubs (note the vector, then
    // save).
    bios.put(
        rom::PM_END,
        &asm(32, ROM + rom::PM_END, |a| {
            a.mov(dword_ptr(var(KIND)), 1)?;
            a.jmp(u64::from(ROM + rom::COLLECT))
        }),
    );
    for v in 0..u32::from(VECTORS) {
        let at = rom::PM_STUBS + STUB * v;
        bios.put(
            at,
            &asm(32, ROM + at, |a| {
                a.mov(byte_ptr(var(VECTOR)), v)?;
                a.mov(byte_ptr(var(KIND)), 2)?;
                a.jmp(u64::from(ROM + rom::COLLECT))
            }),
        );
    }
    bios.put(rom::COLLECT, &collect(next_ip));
    bios.put(rom::RM_LAUNCH, &rm_launch());
    bios.put(rom::RM_RAM, &rm_ram());
    bios.image()
}

/// The main loop, and the address of its `next` (where the collector
/// returns).
fn main_loop() -> (Vec<u8>, u32) {
    let mut a = CodeAssembler::new(32).expect("an assembler");
    let mut next = a.create_label();
    main_body(&mut a, &mut next).expect("the main loop assembles");
    let res = a
        .assemble_options(u64::from(ROM + rom::MAIN), iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .expect("the main loop assembles");
    let next_ip = res.label_ip(&next).expect("next is bound") as u32;
    (res.inner.code_buffer, next_ip)
}

fn main_body(a: &mut CodeAssembler, next: &mut CodeLabel) -> Result<(), IcedError> {
    let var = |off: u32| RM_RAM + off;
    let mut done = a.create_label();
    let mut real = a.create_label();
    a.mov(ax, SEL_DATA0 as u32)?;
    for s in [ds, es, fs, gs, ss] {
        a.mov(s, ax)?;
    }
    a.mov(esp, PM_STACK)?;
    a.cld()?;
    a.mov(esi, ROM + rom::RM_RAM)?;
    a.mov(edi, RM_RAM)?;
    a.mov(ecx, RM_RAM_SIZE / 4)?;
    a.rep().movsd()?;
    a.mov(dword_ptr(var(INDEX)), 0)?;
    a.set_label(next)?;
    a.mov(eax, dword_ptr(var(INDEX)))?;
    a.cmp(eax, dword_ptr(var(COUNT)))?;
    a.jae(done)?;
    a.imul_3(eax, eax, RECORD as i32)?;
    a.add(eax, RECORDS as i32)?;
    a.mov(dword_ptr(var(CURRENT)), eax)?;
    a.lea(esi, ptr(eax + REC_CODE as i32))?;
    a.mov(edi, CODE as u32)?;
    a.mov(ecx, dword_ptr(eax + 4))?;
    a.rep().movsb()?;
    a.lea(esi, ptr(eax + REC_WINDOW_IN as i32))?;
    a.mov(edi, WINDOW as u32)?;
    a.mov(ecx, (WINDOW_SIZE / 4) as u32)?;
    a.rep().movsd()?;
    a.cmp(dword_ptr(eax), 1)?;
    a.je(real)?;
    // Ring 0: the launch block's registers, EFLAGS, ESP, and in.
    a.lidt(ptr(ROM + rom::IDTR))?;
    a.lea(esp, ptr(eax + 0x10))?;
    a.popad()?;
    a.popfd()?;
    a.mov(esp, dword_ptr(esp))?;
    jmp_far(a, SEL_CODE32, CODE as u32, true)?;
    // Real mode: the launch block goes below 1 MiB first.
    a.set_label(&mut real)?;
    a.lea(esi, ptr(eax + 0x10))?;
    a.mov(edi, LAUNCH)?;
    a.mov(ecx, 10)?;
    a.rep().movsd()?;
    jmp_far(a, SEL_CODE16, rom::RM_LAUNCH, true)?;
    a.set_label(&mut done)?;
    a.mov(al, 0)?;
    a.out(0xf4, al)?;
    a.hlt()
}

/// Saves a ring-0 case's registers (at `COLLECT`), or reloads the data
/// segments after real mode saved them (at `COLLECT + 0x100`), then copies
/// the outcome and the window to the record and goes on with the next case
/// (`next_ip`).
fn collect(next_ip: u32) -> Vec<u8> {
    let var = |off: u32| RM_RAM + off;
    let mut out = asm(32, ROM + rom::COLLECT, |a| {
        for (i, r) in [eax, ecx, edx, ebx, esp, ebp, esi, edi].into_iter().enumerate() {
            a.mov(dword_ptr(var(SAVE + 4 * i as u32)), r)?;
        }
        a.mov(esp, PM_STACK)?;
        a.pushfd()?;
        a.pop(dword_ptr(var(SAVE_EFLAGS)))?;
        a.jmp(u64::from(ROM + rom::COLLECT + 0x200))
    });
    out.resize(0x100, 0xf4);
    out.extend(asm(32, ROM + rom::COLLECT + 0x100, |a| {
        a.mov(ax, SEL_DATA0 as u32)?;
        for s in [ds, es, fs, gs, ss] {
            a.mov(s, ax)?;
        }
        a.mov(esp, PM_STACK)?;
        a.jmp(u64::from(ROM + rom::COLLECT + 0x200))
    }));
    out.resize(0x200, 0xf4);
    out.extend(asm(32, ROM + rom::COLLECT + 0x200, |a| {
        a.cld()?;
        a.mov(esi, var(SAVE))?;
        a.mov(edi, dword_ptr(var(CURRENT)))?;
        a.add(edi, REC_OUT as i32)?;
        a.mov(ecx, 11)?;
        a.rep().movsd()?;
        a.mov(esi, WINDOW as u32)?;
        a.mov(edi, dword_ptr(var(CURRENT)))?;
        a.add(edi, REC_WINDOW_OUT as i32)?;
        a.mov(ecx, (WINDOW_SIZE / 4) as u32)?;
        a.rep().movsd()?;
        a.add(dword_ptr(var(INDEX)), 1)?;
        a.jmp(u64::from(next_ip))
    }));
    out
}

/// Into real mode (entered at `SEL_CODE16:RM_LAUNCH`, CS based at
/// `f0000`) and into the case.
fn rm_launch() -> Vec<u8> {
    let real = rom::RM_LAUNCH + 0x40;
    let mut out = asm(16, rom::RM_LAUNCH, |a| {
        a.mov(ax, u32::from(SEL_DATA16))?;
        for s in [ds, es, fs, gs, ss] {
            a.mov(s, ax)?;
        }
        a.mov(eax, cr0)?;
        a.and(eax, 0xffff_fffe_u32 as i32)?;
        a.mov(cr0, eax)?;
        jmp_far(a, 0xf000, real, false)
    });
    assert!(out.len() <= 0x40);
    out.resize(0x40, 0xf4);
    out.extend(asm(16, real, |a| {
        a.xor(ax, ax)?;
        a.mov(ss, ax)?;
        a.mov(sp, LAUNCH)?;
        a.lidt(ptr(rom::IVTR).cs())?;
        for s in [ds, es, fs, gs] {
            a.mov(s, word_ptr(rom::WINDOW_SEG).cs())?;
        }
        a.popad()?;
        a.popfd()?;
        a.pop(esp)?;
        a.mov(ss, word_ptr(rom::WINDOW_SEG).cs())?;
        jmp_far(a, (CODE >> 4) as u16, 0, false)
    }));
    out
}

/// The real-mode return code, run from RAM at `RM_RAM >> 4 : 0`: the
/// end of a case (offset 0) and the fault stubs (offset `0x40 + STUB v`)
/// save the registers through CS, then return to protected mode.
fn rm_ram() -> Vec<u8> {
    let save = 0x500u32;
    let mut out = asm(16, 0, |a| {
        a.mov(dword_ptr(KIND).cs(), 1)?;
        a.jmp(u64::from(save))
    });
    out.resize(0x40, 0xf4);
    for v in 0..u32::from(VECTORS) {
        let at = 0x40 + STUB * v;
        out.extend(asm(16, at, |a| {
            a.mov(byte_ptr(VECTOR).cs(), v)?;
            a.mov(byte_ptr(KIND).cs(), 2)?;
            a.jmp(u64::from(save))
        }));
        out.resize((at + STUB) as usize, 0xf4);
    }
    out.resize(save as usize, 0xf4);
    // The GDTR for the way back, in the copied code.
    let gdtr_at = 0x5f0u32;
    out.extend(asm(16, save, |a| {
        for (i, r) in [eax, ecx, edx, ebx, esp, ebp, esi, edi].into_iter().enumerate() {
            a.mov(dword_ptr(SAVE + 4 * i as u32).cs(), r)?;
        }
        a.mov(ax, cs)?;
        a.mov(ss, ax)?;
        a.mov(sp, u32::from(RM_STACK))?;
        a.pushfd()?;
        a.pop(eax)?;
        a.mov(dword_ptr(SAVE_EFLAGS).cs(), eax)?;
        a.lgdt(ptr(gdtr_at).cs())?;
        a.mov(eax, cr0)?;
        a.or(eax, 1)?;
        a.mov(cr0, eax)?;
        jmp_far(a, SEL_CODE32, ROM + rom::COLLECT + 0x100, true)
    }));
    out.resize(gdtr_at as usize, 0xf4);
    out.extend(GDT_LIMIT.to_le_bytes());
    out.extend((GDT as u32).to_le_bytes());
    assert!(out.len() <= RM_RAM_SIZE as usize);
    out
}

/// The system tables as the KVM runner has them, but with the IVT and the
/// 32-bit IDT aimed at the harness's stubs and two 16-bit segments for the
/// way into real mode.
fn tables() -> Vec<(u64, Vec<u8>)> {
    let mut pieces = system_image();
    let ivt: Vec<u8> =
        (0..u32::from(VECTORS)).flat_map(|v| (((RM_RAM >> 4) << 16) | (0x40 + STUB * v)).to_le_bytes()).collect();
    pieces.push((IVT, ivt));
    let idt: Vec<u8> = (0..u64::from(VECTORS))
        .flat_map(|v| {
            let target = u64::from(ROM + rom::PM_STUBS + STUB * v as u32);
            let g =
                (target & 0xffff) | (u64::from(SEL_CODE32) << 16) | (0x8e << 40) | (((target >> 16) & 0xffff) << 48);
            g.to_le_bytes()
        })
        .collect();
    pieces.push((IDT32, idt));
    // 16-bit code at f0000 and 16-bit data at 0, limit 0xffff, accessed.
    let code16: u64 = 0x0000_9b0f_0000_ffff;
    let data16: u64 = 0x0000_9300_0000_ffff;
    pieces.push((GDT + u64::from(SEL_CODE16), code16.to_le_bytes().to_vec()));
    pieces.push((GDT + u64::from(SEL_DATA16), data16.to_le_bytes().to_vec()));
    pieces
}

/// The case's code for QEMU: a far jump back to the harness instead of the
/// final `hlt`.
fn code_for_qemu(case: &Case) -> Vec<u8> {
    let mut code = case.code[..(case.terminator() - case.origin()) as usize + 2].to_vec();
    let real = case.profile == Profile::Real;
    let ip = case.terminator() + 2;
    code.extend(asm(case.profile.bitness(), ip, |a| {
        if real {
            jmp_far(a, (RM_RAM >> 4) as u16, 0, false)
        } else {
            jmp_far(a, SEL_CODE32, ROM + rom::PM_END, true)
        }
    }));
    code
}

/// QEMU over a RAM file shared with it.
pub struct QemuRunner(SharedRamQemu);

impl QemuRunner {
    /// The runner, if QEMU is installed (says why not otherwise).
    pub fn new() -> Option<QemuRunner> {
        // QEMU's own trace of interrupts and resets, for the harness.
        let config = Config {
            scratch: "topos-diff",
            cpu: "max",
            log_env: "TOPOS_DIFF_QEMU_LOG",
            log: "int,cpu_reset,guest_errors,in_asm",
        };
        SharedRamQemu::new(config, &bios()).map(QemuRunner)
    }

    /// Runs `cases` (ring-0 and real-mode profiles) in one QEMU.
    pub fn run(&mut self, cases: &[Case]) -> Vec<Outcome> {
        let n = cases.len() as u64;
        let ram_size = (RECORDS + n * RECORD).next_multiple_of(1 << 20).max(16 << 20);
        let (path, file) = self.0.ram_file(ram_size);
        for (addr, bytes) in tables() {
            file.write_all_at(&bytes, addr).unwrap();
        }
        file.write_all_at(&(n as u32).to_le_bytes(), u64::from(RM_RAM + COUNT)).unwrap();
        for (i, case) in cases.iter().enumerate() {
            assert_ne!(case.profile, Profile::Native, "QEMU runs ring-0 and real-mode cases");
            let rec = RECORDS + i as u64 * RECORD;
            let code = code_for_qemu(case);
            assert!(code.len() <= REC_CODE_MAX, "case {} is too long for the QEMU harness", case.seed);
            let g = case.start.gpr;
            let mut header = vec![u32::from(case.profile == Profile::Real), code.len() as u32, 0, 0];
            header.extend([g[7], g[6], g[5], g[4], g[3], g[2], g[1], g[0], case.start.eflags, g[4]]);
            let header: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
            file.write_all_at(&header, rec).unwrap();
            file.write_all_at(&code, rec + REC_CODE).unwrap();
            file.write_all_at(&case.window, rec + REC_WINDOW_IN).unwrap();
        }
        let run = self.0.boot(&path, ram_size);
        assert_eq!(run.status, Some(1), "QEMU did not finish the batch: {run:?}");
        let outs =
            cases.iter().enumerate().map(|(i, case)| read_outcome(&file, RECORDS + i as u64 * RECORD, case)).collect();
        let _ = std::fs::remove_file(&path);
        outs
    }
}

/// Record `rec`'s outcome for `case`.
fn read_outcome(file: &File, rec: u64, case: &Case) -> Outcome {
    let mut out = [0u8; 44];
    file.read_exact_at(&mut out, rec + REC_OUT).unwrap();
    let word = |i: usize| u32::from_le_bytes(out[4 * i..4 * i + 4].try_into().unwrap());
    let mut window = vec![0u8; WINDOW_SIZE];
    file.read_exact_at(&mut window, rec + REC_WINDOW_OUT).unwrap();
    let mut state = State { gpr: std::array::from_fn(word), eip: case.terminator(), eflags: word(8) };
    let end = match word(9) {
        1 => End::Terminated,
        2 => {
            let frame = if case.profile == Profile::Real { Frame::Real } else { Frame::Prot32 };
            let w = &window;
            let top = u64::from(state.gpr[4]);
            let frame_at = if frame == Frame::Real { WINDOW + (top & 0xffff) } else { top };
            if !(WINDOW..WINDOW + WINDOW_SIZE as u64 - 16).contains(&frame_at) {
                End::Other(format!("vector {} with its frame outside the window (esp {top:#x})", word(10)))
            } else {
                unwind(frame, word(10) as u8, &mut state, |addr, len| {
                    let at = (addr - WINDOW) as usize;
                    w[at..at + len].to_vec()
                })
            }
        }
        k => End::Other(format!("the QEMU harness recorded no end (kind {k})")),
    };
    Outcome { end, state, window }
}
