//! Lazy EFLAGS: arithmetic instructions record their operands and result,
//! and a flag is computed only when something reads it (a `jcc`, `pushf`,
//! an interrupt). Most results are never looked at, so most instructions
//! only store three words.

use super::state::flag::*;

/// Which operation produced the recorded result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlagOp {
    /// No pending result: every flag is in `base`.
    None,
    /// `add` (and `xadd`, `adc` with no carry in).
    Add,
    /// `adc` with a carry in.
    Adc,
    /// `sub`, `cmp`, `neg`, `cmpxchg`, `scas`, `cmps` (and `sbb` with no
    /// borrow in).
    Sub,
    /// `sbb` with a borrow in.
    Sbb,
    /// `and`, `or`, `xor`, `test`: CF, OF and AF clear.
    Logic,
    /// `inc`: CF is kept in `base`.
    Inc,
    /// `dec`: CF is kept in `base`.
    Dec,
}

/// EFLAGS with the arithmetic flags possibly pending.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LazyFlags {
    op: FlagOp,
    /// Operand width in bits (8, 16, 32).
    bits: u8,
    dst: u32,
    src: u32,
    res: u32,
    /// Every flag not pending, and CF for `Inc`/`Dec`.
    base: u32,
}

#[inline]
fn mask(bits: u8) -> u32 {
    if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    }
}

/// PF: set when the low byte has an even number of ones.
#[inline]
pub(crate) fn parity(v: u32) -> bool {
    (v as u8).count_ones() % 2 == 0
}

impl LazyFlags {
    pub(crate) fn new(value: u32) -> LazyFlags {
        LazyFlags { op: FlagOp::None, bits: 32, dst: 0, src: 0, res: 0, base: value }
    }

    /// The flags that are not pending (the arithmetic ones may be stale).
    #[inline]
    pub(crate) fn base(&self) -> u32 {
        self.base
    }

    /// Every flag.
    #[inline]
    pub(crate) fn get(&self) -> u32 {
        if self.op == FlagOp::None {
            return self.base;
        }
        let mut f = self.base & !ARITH;
        if self.cf() {
            f |= CF;
        }
        if self.pf() {
            f |= PF;
        }
        if self.af() {
            f |= AF;
        }
        if self.zf() {
            f |= ZF;
        }
        if self.sf() {
            f |= SF;
        }
        if self.of() {
            f |= OF;
        }
        f
    }

    /// Replaces every flag.
    #[inline]
    pub(crate) fn set(&mut self, value: u32) {
        self.op = FlagOp::None;
        self.base = value;
    }

    /// Replaces the flags in `which` with those of `value`, keeping the rest.
    #[inline]
    pub(crate) fn set_some(&mut self, which: u32, value: u32) {
        let f = self.get();
        self.set((f & !which) | (value & which));
    }

    /// Records an arithmetic result.
    #[inline]
    pub(crate) fn record(&mut self, op: FlagOp, bits: u8, dst: u32, src: u32, res: u32) {
        if matches!(op, FlagOp::Inc | FlagOp::Dec) {
            let cf = self.cf();
            self.base = (self.base & !CF) | u32::from(cf);
        }
        self.op = op;
        self.bits = bits;
        self.dst = dst;
        self.src = src;
        self.res = res;
    }

    /// Replaces the arithmetic flags: ZF, SF and PF from the `bits`-wide
    /// `res`, the others (CF, AF, OF) as given in `others`.
    #[inline]
    pub(crate) fn set_result(&mut self, bits: u8, res: u32, others: u32) {
        let res = res & mask(bits);
        let mut f = (self.get() & !ARITH) | others;
        if res == 0 {
            f |= ZF;
        }
        if (res >> (bits - 1)) & 1 != 0 {
            f |= SF;
        }
        if parity(res) {
            f |= PF;
        }
        self.set(f);
    }

    /// Sets a non-arithmetic bit (IF, DF, TF...) or clears it.
    #[inline]
    pub(crate) fn set_bit(&mut self, bit: u32, on: bool) {
        if on {
            self.base |= bit;
        } else {
            self.base &= !bit;
        }
    }

    #[inline]
    pub(crate) fn cf(&self) -> bool {
        let m = mask(self.bits);
        let (d, s, r) = (self.dst & m, self.src & m, self.res & m);
        match self.op {
            FlagOp::None | FlagOp::Inc | FlagOp::Dec => self.base & CF != 0,
            FlagOp::Add => r < d,
            FlagOp::Adc => r <= d,
            FlagOp::Sub => d < s,
            FlagOp::Sbb => d <= s,
            FlagOp::Logic => false,
        }
    }

    #[inline]
    pub(crate) fn zf(&self) -> bool {
        if self.op == FlagOp::None {
            return self.base & ZF != 0;
        }
        self.res & mask(self.bits) == 0
    }

    #[inline]
    pub(crate) fn sf(&self) -> bool {
        if self.op == FlagOp::None {
            return self.base & SF != 0;
        }
        (self.res >> (self.bits - 1)) & 1 != 0
    }

    #[inline]
    pub(crate) fn pf(&self) -> bool {
        if self.op == FlagOp::None {
            return self.base & PF != 0;
        }
        parity(self.res)
    }

    #[inline]
    pub(crate) fn af(&self) -> bool {
        match self.op {
            FlagOp::None => self.base & AF != 0,
            FlagOp::Logic => false,
            _ => (self.dst ^ self.src ^ self.res) & 0x10 != 0,
        }
    }

    #[inline]
    pub(crate) fn of(&self) -> bool {
        let sign = self.bits - 1;
        let (d, s, r) = (self.dst, self.src, self.res);
        match self.op {
            FlagOp::None => self.base & OF != 0,
            FlagOp::Add | FlagOp::Adc | FlagOp::Inc => ((d ^ r) & (s ^ r)) >> sign & 1 != 0,
            FlagOp::Sub | FlagOp::Sbb | FlagOp::Dec => ((d ^ s) & (d ^ r)) >> sign & 1 != 0,
            FlagOp::Logic => false,
        }
    }

    /// Evaluates condition code `cc` (the low nibble of a `jcc` opcode).
    #[inline]
    pub(crate) fn condition(&self, cc: u8) -> bool {
        let v = match cc >> 1 {
            0 => self.of(),
            1 => self.cf(),
            2 => self.zf(),
            3 => self.cf() || self.zf(),
            4 => self.sf(),
            5 => self.pf(),
            6 => self.sf() != self.of(),
            _ => self.zf() || (self.sf() != self.of()),
        };
        v != (cc & 1 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_sub_flags_match_the_definitions() {
        let mut f = LazyFlags::new(FIXED);
        f.record(FlagOp::Add, 8, 0x7f, 1, 0x80);
        assert_eq!(f.get() & ARITH, OF | SF | AF);
        f.record(FlagOp::Add, 8, 0xff, 1, 0x100);
        assert_eq!(f.get() & ARITH, CF | ZF | AF | PF);
        f.record(FlagOp::Sub, 32, 0, 1, u32::MAX);
        assert_eq!(f.get() & ARITH, CF | SF | AF | PF);
        f.record(FlagOp::Sbb, 16, 5, 5, 0xffff);
        assert!(f.cf());
    }

    #[test]
    fn inc_keeps_the_carry() {
        let mut f = LazyFlags::new(FIXED | CF);
        f.record(FlagOp::Inc, 32, 0xffff_ffff, 1, 0);
        assert!(f.cf() && f.zf());
        f.record(FlagOp::Dec, 32, 1, 1, 0);
        assert!(f.cf());
    }

    #[test]
    fn conditions() {
        let mut f = LazyFlags::new(FIXED);
        f.record(FlagOp::Sub, 32, 1, 2, u32::MAX); // 1 < 2
        assert!(f.condition(0x2)); // jb
        assert!(f.condition(0xc)); // jl
        assert!(!f.condition(0x4)); // jz
        assert!(f.condition(0x5)); // jnz
    }
}
