//! The arithmetic flags an instruction reads, defines and leaves undefined,
//! so that comparisons against an emulator (PVM's ring 0) can leave out
//! what the architecture does not define, and the generator can define a
//! flag again before an instruction reads it.

/// Carry.
pub const CF: u32 = 1 << 0;
/// Parity.
pub const PF: u32 = 1 << 2;
/// Auxiliary carry.
pub const AF: u32 = 1 << 4;
/// Zero.
pub const ZF: u32 = 1 << 6;
/// Sign.
pub const SF: u32 = 1 << 7;
/// Overflow.
pub const OF: u32 = 1 << 11;
/// The six arithmetic flags.
pub const ARITH: u32 = CF | PF | AF | ZF | SF | OF;
/// Direction.
pub const DF: u32 = 1 << 10;
/// Interrupt enable.
pub const IF: u32 = 1 << 9;
/// Resume: set in the EFLAGS image a fault pushes (PVM's delivery sets
/// it), never by the instructions generated here; not compared.
pub const RF: u32 = 1 << 16;
/// Every EFLAGS bit a comparison looks at (all but RF and VM; bit 1, and
/// the reserved bits, which are constant).
pub const COMPARED: u32 = 0x003f_7fff & !RF & !(1 << 17);

/// What one instruction does to the arithmetic flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effect {
    /// Flags whose value it reads.
    pub uses: u32,
    /// Flags it sets to a defined value.
    pub defines: u32,
    /// Flags it leaves architecturally undefined.
    pub undefines: u32,
}

impl Effect {
    /// No flag read or written.
    pub const NONE: Effect = Effect { uses: 0, defines: 0, undefines: 0 };

    /// Defines `defines`, leaves `undefines` undefined.
    pub const fn sets(defines: u32, undefines: u32) -> Effect {
        Effect { uses: 0, defines, undefines }
    }

    /// Also reads `uses`.
    pub const fn reading(self, uses: u32) -> Effect {
        Effect { uses, ..self }
    }

    /// The undefined set after this instruction, from the one before.
    pub fn apply(self, undefined: u32) -> u32 {
        (undefined & !self.defines & !self.undefines) | self.undefines
    }
}

/// The flags condition code `cc` (0-15, as in `Jcc`) tests.
pub fn condition_uses(cc: u32) -> u32 {
    match cc >> 1 {
        0 => OF,
        1 => CF,
        2 => ZF,
        3 => CF | ZF,
        4 => SF,
        5 => PF,
        6 => SF | OF,
        _ => ZF | SF | OF,
    }
}

/// A shift's (`shl`, `sal`, `shr`, `sar`) effect for a count (before
/// masking) on an operand of `bits`.
pub fn shift(count: u32, bits: u32) -> Effect {
    let count = count & 0x1f;
    match count {
        0 => Effect::NONE,
        1 => Effect::sets(CF | PF | ZF | SF | OF, AF),
        // CF is undefined once the count reaches the operand size (8- and
        // 16-bit operands only: counts are masked to 5 bits).
        n if n >= bits => Effect::sets(PF | ZF | SF, AF | OF | CF),
        _ => Effect::sets(CF | PF | ZF | SF, AF | OF),
    }
}

/// A rotate's effect; `through_carry` for `rcl`/`rcr`.
pub fn rotate(count: u32, through_carry: bool) -> Effect {
    let count = count & 0x1f;
    let uses = if through_carry { CF } else { 0 };
    match count {
        0 => Effect::NONE,
        1 => Effect::sets(CF | OF, 0).reading(uses),
        _ => Effect::sets(CF, OF).reading(uses),
    }
}

/// A double shift's (`shld`, `shrd`) effect.
pub fn double_shift(count: u32, bits: u32) -> Effect {
    let count = count & 0x1f;
    match count {
        0 => Effect::NONE,
        n if n > bits => Effect::sets(0, ARITH),
        1 => Effect::sets(CF | PF | ZF | SF | OF, AF),
        _ => Effect::sets(CF | PF | ZF | SF, AF | OF),
    }
}
