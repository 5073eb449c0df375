//! A scenario as guest code: the image both runners start from.
//!
//! Entered in flat 32-bit ring 0 with paging off at [`off::MAIN`], the
//! main code loads the scenario's GDT, IDT and TSS, CR4 (PSE or PAE), CR3
//! and CR0 (PG, WP as generated), sets the registers and runs the steps,
//! each after `mov ebp, step`. Ring-3 steps run in blocks entered with
//! `iret` and left through the DPL-3 gate [`RETURN_VECTOR`]. The #PF
//! handler records (vector, error code, CR2, EIP, CS, EBP, CR3), then
//! looks the faulting EIP up in the fix-up table: the first time an entry
//! has a fix, it sets the bits, `invlpg`s CR2 and retries; otherwise it
//! resumes after the instruction. A fetch fault (EIP = CR2: the target of
//! a `call`) resumes at a `ret` of the faulting ring. Any other exception
//! records itself and ends the scenario. The end routine stores the
//! registers and CR0, CR2, CR3, CR4, turns paging off and jumps through
//! [`off::RET`] (the runner's way back).

use super::gen::{Access, Alu, Op, Scenario};
use super::layout::*;
use super::model::Paging;
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

/// The general registers by number.
fn gpr(i: usize) -> AsmRegister32 {
    [eax, ecx, edx, ebx, esp, ebp, esi, edi][i]
}

/// CR0 while the scenario runs: PG, WP as asked, NE, ET, PE.
pub fn cr0_value(wp: bool) -> u32 {
    0x8000_0031 | (u32::from(wp) << 16)
}

/// Where the handler page's entry points are.
pub struct Handlers {
    pub code: Vec<u8>,
    /// Vector → handler.
    pub vectors: Vec<u32>,
    /// The end routine.
    pub end: u32,
}

/// A ring-0 `ret` (fetch faults at CPL 0 resume there) and a `hlt` (the
/// interpreter's runner returns there), after the handlers.
pub const KRET: u32 = at(off::HANDLERS) + 0xff0;
pub const HLT: u32 = at(off::HANDLERS) + 0xff8;

fn label_ip(r: &CodeAssemblerResult, l: &CodeLabel) -> u32 {
    r.label_ip(l).expect("a bound label") as u32
}

/// The handlers, the end routine and the rings' `ret`s.
pub fn handlers() -> Handlers {
    let mut a = CodeAssembler::new(32).expect("an assembler");
    let mut labels: Vec<CodeLabel> = (0..=RETURN_VECTOR).map(|_| a.create_label()).collect();
    let mut end = a.create_label();
    let mut common = a.create_label();
    let count = at(off::COUNT);
    let record = |a: &mut CodeAssembler, vector: Option<u32>, frame: i32| -> Result<(), IcedError> {
        // EBX: the record; [esp+frame] is the error code, then EIP, CS.
        let mut full = a.create_label();
        a.mov(ebx, dword_ptr(count))?;
        a.cmp(ebx, MAX_RECORDS as i32)?;
        a.jae(full)?;
        a.shl(ebx, 5)?;
        a.add(ebx, at(off::RECORDS) as i32)?;
        match vector {
            Some(v) => a.mov(dword_ptr(ebx), v)?,
            None => {
                a.mov(eax, dword_ptr(esp + (frame - 4)))?;
                a.mov(dword_ptr(ebx), eax)?;
            }
        }
        a.mov(eax, dword_ptr(esp + frame))?;
        a.mov(dword_ptr(ebx + 4), eax)?;
        a.mov(eax, cr2)?;
        a.mov(dword_ptr(ebx + 8), eax)?;
        a.mov(eax, dword_ptr(esp + (frame + 4)))?;
        a.mov(dword_ptr(ebx + 12), eax)?;
        a.mov(eax, dword_ptr(esp + (frame + 8)))?;
        a.mov(dword_ptr(ebx + 16), eax)?;
        a.mov(dword_ptr(ebx + 20), ebp)?;
        a.mov(eax, cr3)?;
        a.mov(dword_ptr(ebx + 24), eax)?;
        a.add(dword_ptr(count), 1)?;
        a.set_label(&mut full)?;
        a.nop()
    };
    let mut build = || -> Result<(), IcedError> {
        // #PF.
        let mut find = a.create_label();
        let mut found = a.create_label();
        let mut skip = a.create_label();
        let mut out = a.create_label();
        let mut fetch = a.create_label();
        let mut unknown = a.create_label();
        a.set_label(&mut labels[14])?;
        a.pushad()?;
        record(&mut a, Some(14), 32)?;
        a.mov(eax, dword_ptr(esp + 36))?;
        a.mov(edx, cr2)?;
        a.cmp(eax, edx)?;
        a.je(fetch)?;
        a.mov(esi, at(off::FIXUPS))?;
        a.set_label(&mut find)?;
        a.mov(edx, dword_ptr(esi))?;
        a.test(edx, edx)?;
        a.jz(unknown)?;
        a.cmp(edx, eax)?;
        a.je(found)?;
        a.add(esi, FIXUP as i32)?;
        a.jmp(find)?;
        a.set_label(&mut found)?;
        a.mov(edx, dword_ptr(esi + 8))?;
        a.test(edx, edx)?;
        a.jz(skip)?;
        a.mov(ecx, dword_ptr(esi + 12))?;
        a.or(dword_ptr(edx), ecx)?;
        a.mov(dword_ptr(esi + 8), 0)?;
        a.mov(eax, cr2)?;
        a.invlpg(ptr(eax))?;
        a.jmp(out)?;
        a.set_label(&mut skip)?;
        a.mov(edx, dword_ptr(esi + 4))?;
        a.mov(dword_ptr(esp + 36), edx)?;
        a.set_label(&mut out)?;
        a.popad()?;
        a.add(esp, 4)?;
        a.iretd()?;
        // A fetch fault: back to the `call` through a `ret` of its ring.
        a.set_label(&mut fetch)?;
        a.mov(dword_ptr(esp + 36), KRET)?;
        a.cmp(dword_ptr(esp + 40), i32::from(SEL_CODE0))?;
        a.je(out)?;
        a.mov(dword_ptr(esp + 36), at(off::USER))?;
        a.jmp(out)?;
        a.set_label(&mut unknown)?;
        a.popad()?;
        a.push(14)?;
        a.jmp(common)?;
        // Other exceptions: record and end.
        for v in 0..32u8 {
            if v == 14 {
                continue;
            }
            a.set_label(&mut labels[usize::from(v)])?;
            if !matches!(v, 8 | 10..=13 | 17 | 21) {
                a.push(0)?;
            }
            a.push(i32::from(v))?;
            a.jmp(common)?;
        }
        a.set_label(&mut common)?;
        a.pushad()?;
        record(&mut a, None, 36)?;
        a.mov(dword_ptr(at(off::ABORTED)), 1)?;
        a.popad()?;
        a.jmp(end)?;
        // Back from ring 3.
        a.set_label(&mut labels[usize::from(RETURN_VECTOR)])?;
        a.mov(esp, STACK_TOP)?;
        a.jmp(dword_ptr(at(off::CONT)))?;
        // The end.
        a.set_label(&mut end)?;
        for (i, r) in [eax, ecx, edx, ebx, esp, ebp, esi, edi].into_iter().enumerate() {
            a.mov(dword_ptr(at(off::REGS) + 4 * i as u32), r)?;
        }
        a.mov(esp, STACK_TOP)?;
        a.pushfd()?;
        a.pop(dword_ptr(at(off::REGS) + 32))?;
        for (i, c) in [cr0, cr2, cr3, cr4].into_iter().enumerate() {
            a.mov(eax, c)?;
            a.mov(dword_ptr(at(off::REGS) + 36 + 4 * i as u32), eax)?;
        }
        a.mov(eax, cr0)?;
        a.and(eax, 0x7fff_ffff)?;
        a.mov(cr0, eax)?;
        a.jmp(dword_ptr(at(off::RET)))
    };
    build().expect("the handlers assemble");
    let r = a
        .assemble_options(u64::from(at(off::HANDLERS)), BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .expect("the handlers assemble");
    let vectors = (0..=RETURN_VECTOR)
        .map(|v| if (32..RETURN_VECTOR).contains(&v) { 0 } else { label_ip(&r, &labels[usize::from(v)]) })
        .collect();
    assert!(r.inner.code_buffer.len() < (KRET - at(off::HANDLERS)) as usize);
    Handlers { end: label_ip(&r, &end), vectors, code: r.inner.code_buffer.clone() }
}

/// The code of one access (after `mov ebp, step`); its instruction and
/// the one after it are labelled.
fn emit_access(
    a: &mut CodeAssembler,
    step: u32,
    access: &Access,
    la: u32,
    labels: (&mut CodeLabel, &mut CodeLabel),
) -> Result<(), IcedError> {
    a.mov(ebp, step)?;
    let m = u64::from(la);
    match access {
        Access::StoreReg { src, value } | Access::Xchg { reg: src, value } => a.mov(gpr(*src), *value)?,
        Access::Movs { src, .. } => {
            a.mov(esi, *src)?;
            a.mov(edi, la)?;
        }
        _ => {}
    }
    a.set_label(labels.0)?;
    match *access {
        Access::Load { size: 4, dst } => a.mov(gpr(dst), dword_ptr(m))?,
        Access::Load { size: 2, dst } => a.movzx(gpr(dst), word_ptr(m))?,
        Access::Load { dst, .. } => a.movzx(gpr(dst), byte_ptr(m))?,
        Access::Store { size: 4, value } => a.mov(dword_ptr(m), value)?,
        Access::Store { size: 2, value } => a.mov(word_ptr(m), value & 0xffff)?,
        Access::Store { value, .. } => a.mov(byte_ptr(m), value & 0xff)?,
        Access::StoreReg { src, .. } => a.mov(dword_ptr(m), gpr(src))?,
        Access::Alu { op, size, imm } => {
            let imm = match size {
                4 => imm as i32,
                2 => i32::from(imm as u16 as i16),
                _ => i32::from(imm as u8 as i8),
            };
            let mem = match size {
                4 => dword_ptr(m),
                2 => word_ptr(m),
                _ => byte_ptr(m),
            };
            match op {
                Alu::Or => a.or(mem, imm)?,
                Alu::And => a.and(mem, imm)?,
                Alu::Xor => a.xor(mem, imm)?,
            }
        }
        Access::AddByte { imm } => a.add(byte_ptr(m), i32::from(imm as i8))?,
        Access::Xchg { reg, .. } => a.xchg(dword_ptr(m), gpr(reg))?,
        Access::Movs { size: 4, .. } => a.movsd()?,
        Access::Movs { .. } => a.movsb()?,
        Access::Call => a.call(m)?,
    }
    a.set_label(labels.1)
}

/// One assembled part: the code, and each access step's instruction and
/// resume addresses.
struct Part {
    code: Vec<u8>,
    /// Step → (instruction, resume).
    accesses: Vec<(usize, u32, u32)>,
    /// Ring-3 block starts (main: where each block returns to).
    blocks: Vec<u32>,
}

/// The ring-3 blocks, at [`off::USER`] + 1 (after the ring's `ret`).
fn user_part(s: &Scenario) -> Result<Part, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut blocks = vec![];
    let mut labels = vec![];
    let mut inside = false;
    for (step, op) in s.ops.iter().enumerate() {
        match op {
            Op::User(true) => {
                let mut l = a.create_label();
                a.set_label(&mut l)?;
                blocks.push(l);
                inside = true;
            }
            Op::User(false) => {
                assert!(inside);
                a.int(u32::from(RETURN_VECTOR))?;
                inside = false;
            }
            Op::Access { user: true, access, la, .. } => {
                let (mut i, mut r) = (a.create_label(), a.create_label());
                emit_access(&mut a, step as u32, access, *la, (&mut i, &mut r))?;
                labels.push((step, i, r));
            }
            _ => {}
        }
    }
    if blocks.is_empty() {
        a.nop()?;
    }
    let r = a.assemble_options(u64::from(at(off::USER)) + 1, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    Ok(Part {
        code: r.inner.code_buffer.clone(),
        accesses: labels.iter().map(|(s, i, x)| (*s, label_ip(&r, i), label_ip(&r, x))).collect(),
        blocks: blocks.iter().map(|l| label_ip(&r, l)).collect(),
    })
}

/// The ring-0 code: set-up, the steps, then the end routine. `conts`: where
/// each ring-3 block returns to (from a first pass).
fn main_part(s: &Scenario, user_blocks: &[u32], conts: &[u32], end: u32) -> Result<Part, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    a.lgdt(ptr(at(off::GDTR)))?;
    a.lidt(ptr(at(off::IDTR)))?;
    a.mov(ax, u32::from(SEL_DATA0))?;
    for sr in [ds, es, fs, gs, ss] {
        a.mov(sr, ax)?;
    }
    a.mov(esp, STACK_TOP)?;
    a.mov(ax, u32::from(SEL_TSS))?;
    a.ltr(ax)?;
    a.xor(eax, eax)?;
    a.mov(cr2, eax)?;
    let cr4_value = match s.paging {
        Paging::Legacy { pse } => u32::from(pse) << 4,
        Paging::Pae { .. } => 1 << 5,
    };
    a.mov(eax, cr4_value)?;
    a.mov(cr4, eax)?;
    a.mov(eax, s.cr3[0])?;
    a.mov(cr3, eax)?;
    a.mov(eax, cr0_value(s.wp))?;
    a.mov(cr0, eax)?;
    for (i, &v) in s.gpr.iter().enumerate() {
        if i != 4 && i != 5 {
            a.mov(gpr(i), v)?;
        }
    }
    a.push(2)?;
    a.popfd()?;
    let mut labels = vec![];
    let mut after = vec![];
    let mut block = 0;
    for (step, op) in s.ops.iter().enumerate() {
        let n = step as u32;
        match op {
            Op::Access { user: false, access, la, .. } => {
                let (mut i, mut r) = (a.create_label(), a.create_label());
                emit_access(&mut a, n, access, *la, (&mut i, &mut r))?;
                labels.push((step, i, r));
            }
            Op::Access { user: true, .. } => {}
            Op::Invlpg { la } => {
                a.mov(ebp, n)?;
                a.invlpg(ptr(*la))?;
            }
            Op::Edit { pa, value, size } => {
                a.mov(ebp, n)?;
                a.mov(dword_ptr(*pa), *value as u32)?;
                if *size == 8 {
                    a.mov(dword_ptr(*pa + 4), (*value >> 32) as u32)?;
                }
            }
            Op::LoadCr3 { cr3: v } => {
                a.mov(ebp, *v)?;
                a.mov(cr3, ebp)?;
                a.mov(ebp, n)?;
            }
            Op::SetWp(wp) => {
                a.mov(ebp, cr0_value(*wp))?;
                a.mov(cr0, ebp)?;
                a.mov(ebp, n)?;
            }
            Op::User(true) => {
                a.mov(dword_ptr(at(off::CONT)), conts.get(block).copied().unwrap_or(0))?;
                a.mov(ebp, u32::from(SEL_DATA3))?;
                a.mov(ds, bp)?;
                a.mov(es, bp)?;
                a.push(i32::from(SEL_DATA3))?;
                a.push(USER_STACK_TOP as i32)?;
                a.pushfd()?;
                a.push(i32::from(SEL_CODE3))?;
                a.push(user_blocks[block] as i32)?;
                a.iretd()?;
                let mut l = a.create_label();
                a.set_label(&mut l)?;
                after.push(l);
                a.mov(ebp, u32::from(SEL_DATA0))?;
                a.mov(ds, bp)?;
                a.mov(es, bp)?;
                block += 1;
            }
            Op::User(false) => {}
        }
    }
    a.jmp(u64::from(end))?;
    let r = a.assemble_options(u64::from(at(off::MAIN)), BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    Ok(Part {
        code: r.inner.code_buffer.clone(),
        accesses: labels.iter().map(|(s, i, x)| (*s, label_ip(&r, i), label_ip(&r, x))).collect(),
        blocks: after.iter().map(|l| label_ip(&r, l)).collect(),
    })
}

/// A scenario's image and what the reports need.
pub struct Image {
    /// The scenario's bytes at [`BASE`].
    pub bytes: Vec<u8>,
    /// Step → the EIP of its access instruction.
    pub access_eip: Vec<Option<u32>>,
}

/// Builds the image of `s`.
pub fn build(s: &Scenario) -> Image {
    let h = handlers();
    let user = user_part(s).expect("the ring-3 code assembles");
    let first = main_part(s, &user.blocks, &[], h.end).expect("the code assembles");
    let main = main_part(s, &user.blocks, &first.blocks, h.end).expect("the code assembles");
    assert_eq!(first.blocks, main.blocks, "the two passes agree");
    assert!(main.code.len() <= off::MAIN_MAX, "seed {}: the main code is too long", s.seed);
    assert!(user.code.len() < off::USER_MAX, "seed {}: the ring-3 code is too long", s.seed);
    let mut bytes = s.memory.clone();
    descriptor_tables(&mut bytes, |v| h.vectors[usize::from(v)]);
    put(&mut bytes, off::HANDLERS, &h.code);
    put(&mut bytes, u64::from(KRET) - BASE, &[0xc3]);
    put(&mut bytes, u64::from(HLT) - BASE, &[0xf4]);
    put(&mut bytes, off::MAIN, &main.code);
    put(&mut bytes, off::USER, &[0xc3]);
    put(&mut bytes, off::USER + 1, &user.code);
    let mut access_eip = vec![None; s.ops.len()];
    let mut fixups = vec![];
    for &(step, insn, resume) in main.accesses.iter().chain(&user.accesses) {
        access_eip[step] = Some(insn);
        if let Op::Access { access, fix, .. } = &s.ops[step] {
            if *access != Access::Call {
                let (pa, bits) = fix.unwrap_or((0, 0));
                fixups.extend([insn, resume, pa as u32, bits]);
            }
        }
    }
    assert!(fixups.len() / 4 <= MAX_FIXUPS, "seed {}: too many accesses", s.seed);
    let table: Vec<u8> = fixups.iter().flat_map(|v| v.to_le_bytes()).collect();
    put(&mut bytes, off::FIXUPS, &table);
    Image { bytes, access_eip }
}
