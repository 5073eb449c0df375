//! Segment-register loads with the protected-mode checks: descriptor
//! lookup in the GDT or LDT, type, privilege and presence checks, the
//! Accessed bit, and what real and virtual-8086 mode do instead.

use super::core::Core;
use super::event::{gp, np, ss, Event, Step};
use super::state::{attr, SegReg, Segment};

impl Core {
    /// The linear address of the descriptor for `sel`, or `#GP(sel)` (or
    /// the error `fault` builds) when it lies beyond the table's limit.
    pub(crate) fn descriptor_addr(&self, sel: u16) -> Option<u32> {
        let index = u32::from(sel & !7);
        let (base, limit) = if sel & 4 != 0 {
            let l = &self.s.ldtr;
            if !l.is_usable() {
                return None;
            }
            (l.base, l.limit)
        } else {
            (self.s.gdtr.base, u32::from(self.s.gdtr.limit))
        };
        if index + 7 > limit {
            return None;
        }
        Some(base.wrapping_add(index))
    }

    /// Reads the 8-byte descriptor of `sel`; `Err(fault(sel))` when it is
    /// beyond its table.
    pub(crate) fn read_descriptor(&mut self, sel: u16, fault: fn(u32) -> Event) -> Step<u64> {
        let Some(la) = self.descriptor_addr(sel) else {
            return Err(fault(u32::from(sel & 0xfffc)));
        };
        self.read_sys(la, 8)
    }

    /// Sets the Accessed bit of `sel`'s descriptor if it is clear (the CPU
    /// writes the descriptor then).
    pub(crate) fn set_accessed(&mut self, sel: u16, desc: u64) -> Step {
        if desc & (1 << 40) == 0 {
            if let Some(la) = self.descriptor_addr(sel) {
                let byte = (desc >> 40) as u8 | 1;
                self.write_sys(la.wrapping_add(5), u64::from(byte), 1)?;
            }
        }
        Ok(())
    }

    /// Loads a data or stack segment register (ES, SS, DS, FS, GS) with
    /// `sel`, as `mov`, `pop`, `lds` and friends do. A load of SS inhibits
    /// interrupts until the next instruction retires.
    pub(crate) fn load_seg(&mut self, seg: usize, sel: u16) -> Step {
        if !self.prot() {
            let s = &mut self.s.seg[seg];
            s.selector = sel;
            s.base = u32::from(sel) << 4;
            if self.s.flags.base() & super::state::flag::VM != 0 {
                *s = Segment { selector: sel, base: u32::from(sel) << 4, limit: 0xffff, attrs: 0xf3 };
            }
            if seg == SegReg::Ss as usize {
                self.shadow = true;
            }
            return Ok(());
        }
        let cpl = self.s.cpl();
        let rpl = (sel & 3) as u8;
        if seg == SegReg::Ss as usize {
            let (s, desc) = self.stack_segment(sel, cpl)?;
            self.set_accessed(sel, desc)?;
            self.s.seg[seg] = s;
            self.shadow = true;
            return Ok(());
        }
        if sel & !3 == 0 {
            // A null selector: loads, and faults on use.
            self.s.seg[seg] = Segment { selector: sel, base: 0, limit: 0, attrs: 0 };
            return Ok(());
        }
        let desc = self.read_descriptor(sel, gp)?;
        let s = Segment::from_descriptor(sel, desc);
        let a = s.attrs;
        let code = a & attr::CODE != 0;
        let readable = !code || a & attr::RW != 0;
        let conforming_code = code && a & attr::DC != 0;
        if a & attr::S == 0 || !readable || (!conforming_code && (rpl > s.dpl() || cpl > s.dpl())) {
            return Err(gp(u32::from(sel & 0xfffc)));
        }
        if a & attr::P == 0 {
            return Err(np(u32::from(sel & 0xfffc)));
        }
        self.set_accessed(sel, desc)?;
        self.s.seg[seg] = Segment { attrs: a | attr::ACCESSED, ..s };
        Ok(())
    }

    /// The stack segment `sel` names, checked for use at privilege `pl`
    /// (CPL for a load of SS, the new CS's RPL for a return to an outer
    /// privilege): `#GP(0)` for a null selector, `#GP(sel)` unless it is a
    /// writable data segment with RPL and DPL `pl`, `#SS(sel)` when it is
    /// not present. Returns the segment to load (marked accessed) and its
    /// descriptor; the caller sets the descriptor's Accessed bit.
    pub(crate) fn stack_segment(&mut self, sel: u16, pl: u8) -> Step<(Segment, u64)> {
        if sel & !3 == 0 {
            return Err(gp(0));
        }
        let desc = self.read_descriptor(sel, gp)?;
        let s = Segment::from_descriptor(sel, desc);
        let a = s.attrs;
        let writable_data = a & attr::S != 0 && a & attr::CODE == 0 && a & attr::RW != 0;
        if (sel & 3) as u8 != pl || s.dpl() != pl || !writable_data {
            return Err(gp(u32::from(sel & 0xfffc)));
        }
        if a & attr::P == 0 {
            return Err(ss(u32::from(sel & 0xfffc)));
        }
        Ok((Segment { attrs: a | attr::ACCESSED, ..s }, desc))
    }

    /// Checks a code-segment descriptor for a direct far `jmp`/`call` to
    /// `sel` at the current privilege and returns the segment to load
    /// (with RPL set to CPL). Gates are not followed here.
    pub(crate) fn code_segment_for_transfer(&mut self, sel: u16) -> Step<(Segment, u64)> {
        if sel & !3 == 0 {
            return Err(gp(0));
        }
        let desc = self.read_descriptor(sel, gp)?;
        let s = Segment::from_descriptor(sel, desc);
        let cpl = self.s.cpl();
        let err = gp(u32::from(sel & 0xfffc));
        let a = s.attrs;
        if a & attr::S == 0 || a & attr::CODE == 0 {
            return Err(err);
        }
        if a & attr::DC != 0 {
            if s.dpl() > cpl {
                return Err(err);
            }
        } else if (sel & 3) as u8 > cpl || s.dpl() != cpl {
            return Err(err);
        }
        if a & attr::P == 0 {
            return Err(np(u32::from(sel & 0xfffc)));
        }
        let loaded = Segment { selector: (sel & !3) | u16::from(cpl), attrs: a | attr::ACCESSED, ..s };
        Ok((loaded, desc))
    }

    /// Installs a new CS (and what depends on it).
    pub(crate) fn set_cs(&mut self, cs: Segment) {
        self.s.seg[SegReg::Cs as usize] = cs;
        self.mode_changed();
    }

    /// A real-mode (or virtual-8086) CS load: base from the selector.
    pub(crate) fn set_cs_real(&mut self, sel: u16) {
        let cs = &mut self.s.seg[SegReg::Cs as usize];
        cs.selector = sel;
        cs.base = u32::from(sel) << 4;
        self.mode_changed();
    }
}
