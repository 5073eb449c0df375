//! Every legacy encoding iced-x86 knows for the mnemonics the generator
//! uses, by mnemonic, with the operand shapes the generator can fill: so a
//! sequence meets every encoding of an instruction (`82 /0`, `f6 /1`,
//! `d0 /6`, the short register forms...) without a table written by hand.

use iced_x86::{Code, EncodingKind, Mnemonic, OpCodeOperandKind as K};
use std::collections::HashMap;
use std::sync::OnceLock;

/// Where a sequence runs, which decides the encodings it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// 32-bit operations that mean the same assembled for 32-bit protected
    /// mode and for 64-bit mode (run natively in ring 3 under PVM).
    Native,
    /// 32-bit protected mode, ring 0.
    Prot32,
    /// Real mode (16-bit code).
    Real,
}

impl Profile {
    /// The code size of the case's own assembly.
    pub fn bitness(self) -> u32 {
        if self == Profile::Real {
            16
        } else {
            32
        }
    }

    /// Whether `code` is valid here.
    fn allows(self, code: Code) -> bool {
        let info = code.op_code();
        match self {
            Profile::Native => info.mode32() && info.mode64(),
            Profile::Prot32 => info.mode32(),
            Profile::Real => info.mode16(),
        }
    }
}

/// The operand kinds the generator fills.
fn supported(kind: K) -> bool {
    matches!(
        kind,
        K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r8_reg
            | K::r8_opcode
            | K::r16_reg
            | K::r16_opcode
            | K::r32_reg
            | K::r32_opcode
            | K::mem
            | K::imm8
            | K::imm8sex16
            | K::imm8sex32
            | K::imm16
            | K::imm32
            | K::imm8_const_1
            | K::al
            | K::cl
            | K::ax
            | K::eax
    )
}

/// The width in bits an operand kind names (0: none).
pub fn kind_bits(kind: K) -> u32 {
    match kind {
        K::r8_or_mem | K::r8_reg | K::r8_opcode | K::al | K::cl => 8,
        K::r16_or_mem | K::r16_reg | K::r16_opcode | K::ax => 16,
        K::r32_or_mem | K::r32_reg | K::r32_opcode | K::eax => 32,
        _ => 0,
    }
}

/// The operation width of `code`: that of its first sized operand, else its
/// operand size (`cbw`, `pushfd`...).
pub fn code_bits(code: Code) -> u32 {
    let info = code.op_code();
    info.op_kinds().iter().map(|&k| kind_bits(k)).find(|&b| b != 0).unwrap_or_else(|| info.operand_size())
}

fn registry() -> &'static HashMap<Mnemonic, Vec<Code>> {
    static REGISTRY: OnceLock<HashMap<Mnemonic, Vec<Code>>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut map: HashMap<Mnemonic, Vec<Code>> = HashMap::new();
        for code in Code::values() {
            let info = code.op_code();
            if info.encoding() != EncodingKind::Legacy
                || !info.is_instruction()
                || !(info.mode16() || info.mode32())
                || !info.op_kinds().iter().all(|&k| supported(k))
                // Encodings a decoder option enables (the 486 A-step
                // `cmpxchg` at 0f a6/a7...).
                || info.decoder_option() != iced_x86::DecoderOptions::NONE
                // Undefined (the 386 manual: "the result is undefined").
                || code == Code::Bswap_r16
            {
                continue;
            }
            map.entry(code.mnemonic()).or_default().push(code);
        }
        map
    })
}

/// The encodings of `mnemonic` valid in `profile` whose width is `bits`
/// (any width if 0) and whose operand kinds satisfy `shape`.
pub fn codes(profile: Profile, mnemonic: Mnemonic, bits: u32, shape: impl Fn(&[K]) -> bool) -> Vec<Code> {
    registry()
        .get(&mnemonic)
        .map(|all| {
            all.iter()
                .copied()
                .filter(|&c| profile.allows(c) && (bits == 0 || code_bits(c) == bits) && shape(c.op_code().op_kinds()))
                .collect()
        })
        .unwrap_or_default()
}
