//! A case: one generated sequence assembled for where it runs (and, for
//! 64-bit-compatible sequences, for 64-bit mode too), with its initial
//! registers and window, and its listing for failure reports.

use super::flags::COMPARED;
use super::gen::{generate, terminator, Generated, Options};
use super::layout::{CODE, CODE_MAX};
use super::outcome::State;
use super::registry::Profile;
use iced_x86::code_asm::CodeAssembler;
use iced_x86::{BlockEncoderOptions, Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

/// One generated case.
pub struct Case {
    /// Its profile.
    pub profile: Profile,
    /// Its seed.
    pub seed: u64,
    /// What the generator was allowed.
    pub options: Options,
    /// The code, at [`Case::origin`] in its own mode (16- or 32-bit).
    pub code: Vec<u8>,
    /// Each instruction's offset in `code`.
    offsets: Vec<u32>,
    /// The same instructions for 64-bit mode, at [`CODE`] (64-bit-compatible
    /// cases only).
    pub code64: Vec<u8>,
    /// Each instruction's offset in `code64`.
    offsets64: Vec<u32>,
    /// The registers at the start.
    pub start: State,
    /// The window at the start.
    pub window: Vec<u8>,
    /// The arithmetic flags the architecture leaves undefined at the end.
    pub undefined: u32,
    /// Whether it ends with an exception instead of reaching its `out`.
    pub faults: bool,
    /// What it was assembled from.
    generated: Generated,
}

/// `insns` assembled for `bitness` at `ip`, with each instruction's offset.
fn assemble(insns: &[Instruction], bitness: u32, ip: u32) -> (Vec<u8>, Vec<u32>) {
    let mut a = CodeAssembler::new(bitness).expect("a code assembler");
    for &i in insns {
        a.add_instruction(i).expect("an instruction");
    }
    let r = a
        .assemble_options(u64::from(ip), BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap_or_else(|e| panic!("assembling for {bitness}-bit code: {e}"));
    assert!(r.inner.code_buffer.len() <= CODE_MAX, "a case's code is too long");
    (r.inner.code_buffer, r.inner.new_instruction_offsets)
}

impl Case {
    /// Case `seed` of `profile` (see [`generate`]).
    pub fn new(profile: Profile, seed: u64, options: Options) -> Case {
        Case::assemble(profile, seed, options, generate(profile, seed, options))
    }

    fn assemble(profile: Profile, seed: u64, options: Options, g: Generated) -> Case {
        let origin = if profile == Profile::Real { 0 } else { CODE as u32 };
        let mut insns = g.insns.clone();
        insns.extend(terminator());
        let (code, offsets) = assemble(&insns, profile.bitness(), origin);
        let (code64, offsets64) =
            if profile == Profile::Native { assemble(&insns, 64, CODE as u32) } else { (vec![], vec![]) };
        Case {
            profile,
            seed,
            options,
            code,
            offsets,
            code64,
            offsets64,
            start: g.start,
            window: g.window.clone(),
            undefined: g.undefined,
            faults: g.faults,
            generated: g,
        }
    }

    /// How many instructions come before the final `out`.
    pub fn len(&self) -> usize {
        self.generated.insns.len()
    }

    /// The case cut after its first `n` instructions (then `out`, `hlt`).
    pub fn prefix(&self, n: usize) -> Case {
        let g = &self.generated;
        let cut = Generated {
            insns: g.insns[..n].to_vec(),
            undefined_after: g.undefined_after[..n].to_vec(),
            start: g.start,
            window: g.window.clone(),
            undefined: if n == 0 { 0 } else { g.undefined_after[n - 1] },
            faults: g.faults && n == g.insns.len(),
        };
        Case::assemble(self.profile, self.seed, self.options, cut)
    }

    /// Instruction `i`'s kind: its iced-x86 code (mnemonic and operand
    /// form), with its prefixes.
    pub fn instruction_kind(&self, i: usize) -> String {
        let insn = &self.generated.insns[i];
        let mut s = format!("{:?}", insn.code());
        if insn.has_lock_prefix() {
            s.insert_str(0, "lock ");
        }
        if insn.has_rep_prefix() {
            s.insert_str(0, "rep ");
        }
        if insn.has_repne_prefix() {
            s.insert_str(0, "repne ");
        }
        s
    }

    /// Instruction `i`, disassembled.
    pub fn instruction(&self, i: usize) -> String {
        let start = self.offsets[i] as usize;
        let end = self.offsets[i + 1] as usize;
        Self::disassemble(&self.code[start..end], self.profile.bitness(), self.origin() + start as u32)
            .trim()
            .to_string()
    }

    /// The offset in CS of the first instruction.
    pub fn origin(&self) -> u32 {
        self.start.eip
    }

    /// CS's base while it runs.
    pub fn code_base(&self) -> u32 {
        if self.profile == Profile::Real {
            CODE as u32
        } else {
            0
        }
    }

    /// The EIP of the final `out` (the `hlt` follows it).
    pub fn terminator(&self) -> u32 {
        self.origin() + self.offsets[self.offsets.len() - 2]
    }

    /// The RIP of the final `out` in the 64-bit code.
    pub fn terminator64(&self) -> u32 {
        CODE as u32 + self.offsets64[self.offsets64.len() - 2]
    }

    /// The EIP in the case's own code of the instruction at `rip` in the
    /// 64-bit code (`rip` itself if it is not an instruction's start).
    pub fn eip_from_64(&self, rip: u32) -> u32 {
        match self.offsets64.iter().position(|&o| CODE as u32 + o == rip) {
            Some(i) => self.origin() + self.offsets[i],
            None => rip,
        }
    }

    /// The EFLAGS bits a comparison looks at: all of [`COMPARED`], or
    /// without the arithmetic flags left undefined.
    pub fn flags_mask(&self, with_undefined: bool) -> u32 {
        if with_undefined {
            COMPARED
        } else {
            COMPARED & !self.undefined
        }
    }

    /// The disassembly of `code` for `bitness` at `ip`, one instruction a
    /// line.
    fn disassemble(code: &[u8], bitness: u32, ip: u32) -> String {
        let mut decoder = Decoder::with_ip(bitness, code, u64::from(ip), DecoderOptions::NONE);
        let mut formatter = IntelFormatter::new();
        let mut out = String::new();
        let mut text = String::new();
        for insn in &mut decoder {
            text.clear();
            formatter.format(&insn, &mut text);
            let start = (insn.ip() - u64::from(ip)) as usize;
            let bytes: String = code[start..start + insn.len()].iter().map(|b| format!("{b:02x}")).collect();
            out.push_str(&format!("  {:08x}  {bytes:<24} {text}\n", insn.ip()));
        }
        out
    }

    /// The listing: the case's code, and the 64-bit code if any.
    pub fn listing(&self) -> String {
        let mut s = format!("{}-bit code:\n", self.profile.bitness());
        s.push_str(&Self::disassemble(&self.code, self.profile.bitness(), self.origin()));
        if !self.code64.is_empty() {
            s.push_str("64-bit code (KVM, ring 3):\n");
            s.push_str(&Self::disassemble(&self.code64, 64, CODE as u32));
        }
        s
    }
}
