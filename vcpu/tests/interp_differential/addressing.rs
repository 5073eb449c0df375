//! Memory operands in every addressing form, aimed at the data window: the
//! generator picks the form and the target, then the registers (and
//! displacement) that reach it, and emits the `mov`s that set them.

use super::gen::{gpr, holder, Gen};
use super::layout::WINDOW;
use super::registry::Profile;
use iced_x86::{Code, Instruction, MemoryOperand, Register};
use rand::Rng;

/// The 16-bit base/index pairs of the ModRM byte (with `None` for a
/// missing one); `[bp]` alone is encoded with a zero displacement.
const FORMS16: [(Register, Register); 8] = [
    (Register::BX, Register::SI),
    (Register::BX, Register::DI),
    (Register::BP, Register::SI),
    (Register::BP, Register::DI),
    (Register::SI, Register::None),
    (Register::DI, Register::None),
    (Register::BP, Register::None),
    (Register::BX, Register::None),
];

impl Gen {
    /// A segment override, sometimes (none in 64-bit-compatible code but
    /// the ones 64-bit mode ignores).
    pub(super) fn segment_override(&mut self) -> Register {
        if !self.rng.random_bool(0.2) {
            return Register::None;
        }
        let choices: &[Register] = match self.profile {
            Profile::Native => &[Register::DS, Register::ES, Register::SS],
            _ => &[Register::DS, Register::ES, Register::SS, Register::FS, Register::GS],
        };
        choices[self.rng.random_range(0..choices.len())]
    }

    /// A random address register usable for addressing (not in `avoid`, a
    /// mask of register numbers; never ESP, which addresses only through
    /// [`Gen::mem`]'s ESP form).
    fn address_register(&mut self, avoid: u8) -> Option<usize> {
        let free: Vec<usize> = (0..8).filter(|&n| n != 4 && avoid & (1 << n) == 0).collect();
        (!free.is_empty()).then(|| free[self.rng.random_range(0..free.len())])
    }

    /// A displacement: none, 8-bit or 32-bit (any value: the base makes up
    /// the difference modulo 2^32).
    fn displacement32(&mut self) -> (i64, u32) {
        match self.rng.random_range(0..3) {
            0 => (0, 0),
            1 => (i64::from(self.rng.random::<i8>()), 1),
            _ => (i64::from(self.value(32) as u32 as i32), 4),
        }
    }

    /// An index register's value: small, negative, or anything.
    fn index_value(&mut self) -> u32 {
        match self.rng.random_range(0..3) {
            0 => self.rng.random_range(0..64),
            1 => self.rng.random_range(-64i32..0) as u32,
            _ => self.value(32) as u32,
        }
    }

    /// A memory operand of `bytes` bytes whose effective address (an offset
    /// in the window, which is also DS's base in real mode) lies in
    /// `[lo, hi)`, with the instructions that set its registers; `avoid`
    /// is a mask of register numbers it must not use.
    pub(super) fn mem(&mut self, bytes: u32, avoid: u8, lo: u32, hi: u32) -> (MemoryOperand, Vec<Instruction>) {
        let offset = self.rng.random_range(lo..hi - bytes.max(1));
        if self.profile == Profile::Real && self.rng.random_bool(0.8) {
            return self.mem16(offset, avoid);
        }
        let base = if self.profile == Profile::Real { 0 } else { WINDOW as u32 };
        self.mem32(base.wrapping_add(offset), avoid)
    }

    /// A 32-bit-addressed operand at `target` (in 64-bit code, the same
    /// registers with an address-size prefix).
    fn mem32(&mut self, target: u32, avoid: u8) -> (MemoryOperand, Vec<Instruction>) {
        let seg = self.segment_override();
        let mut setup = Vec::new();
        let set = |setup: &mut Vec<Instruction>, n: usize, v: u32| {
            setup.push(Instruction::with2(Code::Mov_r32_imm32, gpr(32, n), v).expect("mov r32, imm32"));
        };
        let form = self.rng.random_range(0..8);
        // The ESP form: in ring 0 and real mode ESP is the tracked stack
        // pointer (aim near it); 64-bit-compatible code has no stack and
        // sets ESP like any other register.
        if form == 7 && self.profile != Profile::Real && avoid & (1 << 4) == 0 {
            let disp = i64::from(self.rng.random::<i8>());
            if self.profile == Profile::Native {
                set(&mut setup, 4, target.wrapping_sub(disp as u32));
            }
            // Otherwise [esp + disp8] reaches just around the stack pointer,
            // which stays in the window's stack half.
            return (MemoryOperand::new(Register::ESP, Register::None, 1, disp, 1, false, seg), setup);
        }
        let Some(b) = self.address_register(avoid) else {
            return (MemoryOperand::new(Register::None, Register::None, 1, i64::from(target), 4, false, seg), setup);
        };
        let op = match form {
            // [disp32]
            0 => MemoryOperand::new(Register::None, Register::None, 1, i64::from(target), 4, false, seg),
            // [base], [base + disp8], [base + disp32]
            1..=3 => {
                let (disp, size) = self.displacement32();
                set(&mut setup, b, target.wrapping_sub(disp as u32));
                MemoryOperand::new(gpr(32, b), Register::None, 1, disp, size, false, seg)
            }
            // [base + index*scale + disp], [index*scale + disp32]
            _ => {
                let Some(i) = self.address_register(avoid | (1 << b)) else {
                    return (
                        MemoryOperand::new(Register::None, Register::None, 1, i64::from(target), 4, false, seg),
                        setup,
                    );
                };
                let scale = 1u32 << self.rng.random_range(0..4);
                let index = self.index_value();
                let scaled = index.wrapping_mul(scale);
                set(&mut setup, i, index);
                if form == 6 {
                    let disp = target.wrapping_sub(scaled);
                    MemoryOperand::new(Register::None, gpr(32, i), scale, i64::from(disp as i32), 4, false, seg)
                } else {
                    let (disp, size) = self.displacement32();
                    set(&mut setup, b, target.wrapping_sub(scaled).wrapping_sub(disp as u32));
                    MemoryOperand::new(gpr(32, b), gpr(32, i), scale, disp, size, false, seg)
                }
            }
        };
        (op, setup)
    }

    /// A 16-bit-addressed operand at offset `target` (real mode).
    fn mem16(&mut self, target: u32, avoid: u8) -> (MemoryOperand, Vec<Instruction>) {
        let seg = self.segment_override();
        let usable: Vec<(Register, Register)> = FORMS16
            .iter()
            .copied()
            .filter(|&(b, i)| avoid & (1 << holder(b)) == 0 && (i == Register::None || avoid & (1 << holder(i)) == 0))
            .collect();
        if usable.is_empty() || self.rng.random_bool(0.1) {
            return (MemoryOperand::new(Register::None, Register::None, 1, i64::from(target), 2, false, seg), vec![]);
        }
        let (base, index) = usable[self.rng.random_range(0..usable.len())];
        let (disp, size): (i64, u32) = match self.rng.random_range(0..3) {
            0 if base != Register::BP || index != Register::None => (0, 0),
            0 | 1 => (i64::from(self.rng.random::<i8>()), 1),
            _ => (i64::from(self.rng.random::<u16>() as i16), 2),
        };
        let mut setup = Vec::new();
        let mut rest = (target as u16).wrapping_sub(disp as u16);
        if index != Register::None {
            let v: u16 = self.rng.random();
            setup.push(Instruction::with2(Code::Mov_r16_imm16, index, u32::from(v)).expect("mov r16, imm16"));
            rest = rest.wrapping_sub(v);
        }
        setup.push(Instruction::with2(Code::Mov_r16_imm16, base, u32::from(rest)).expect("mov r16, imm16"));
        (MemoryOperand::new(base, index, 1, disp, size, false, seg), setup)
    }
}
