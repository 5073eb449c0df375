//! Event delivery: exceptions, software interrupts, NMIs and external
//! interrupts through the real-mode IVT or the protected-mode IDT
//! (interrupt and trap gates, with the stack switch through the TSS on a
//! privilege change), and the double-fault and triple-fault rules.
//!
//! Not modelled: task gates and task switches, and delivery from
//! virtual-8086 mode; an event that needs one shuts the VM down with a
//! warning (a guest cannot make the host do anything else).

use super::core::Core;
use super::event::{gp, np, ss, ts, vector, Event, Step};
use super::state::{attr, flag, SegReg, Segment};

/// Where an event comes from (it decides the gate-privilege check and the
/// EXT bit of error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Raised by the CPU for an instruction.
    Exception,
    /// `int n`, `int3`, `into`: the gate's DPL must allow the CPL.
    Software,
    /// An interrupt controller or an NMI.
    External,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Benign,
    Contributory,
    PageFault,
}

fn class(v: u8) -> Class {
    match v {
        0 | 10..=13 => Class::Contributory,
        14 => Class::PageFault,
        _ => Class::Benign,
    }
}

/// Whether an exception raised by the CPU with vector `v` is a fault (the
/// rest it raises are the traps `#DB` from `int1`, and the aborts `#DF`
/// and `#MC`).
fn is_fault(v: u8) -> bool {
    !matches!(v, 1 | 8 | 18)
}

impl Core {
    /// Delivers an event, applying the double-fault rules to faults raised
    /// while delivering it. `Err(Event::Shutdown)` is a triple fault.
    pub(crate) fn deliver(&mut self, vector: u8, code: Option<u32>, source: Source) -> Step {
        self.deliveries += 1;
        self.deliver_from(vector, code, source, None)
    }

    /// Delivers `int n` (`int3`, `into`) of the instruction at `at`, with
    /// EIP already after it: a fault while delivering it is a fault of
    /// the instruction (pushed with `at`).
    pub(crate) fn deliver_software(&mut self, vector: u8, at: u32) -> Step {
        self.deliver_from(vector, None, Source::Software, Some(at))
    }

    fn deliver_from(&mut self, vector: u8, code: Option<u32>, source: Source, mut at: Option<u32>) -> Step {
        let (mut v, mut code, mut source) = (vector, code, source);
        let mut nested = 0;
        loop {
            match self.deliver_once(v, code, source) {
                Ok(()) => return Ok(()),
                Err(Event::Exception { vector: v2, code: c2 }) => {
                    nested += 1;
                    if let Some(at) = at.take() {
                        self.s.eip = at;
                    }
                    // Only exceptions count for the double-fault rules: a
                    // fault while delivering `int 8` or an interrupt on
                    // vector 13 is delivered as the first exception.
                    let first = if source == Source::Exception { class(v) } else { Class::Benign };
                    if (source == Source::Exception && v == vector::DF) || nested > 3 {
                        return Err(Event::Shutdown);
                    }
                    let second = class(v2);
                    let double = (first == Class::Contributory && second == Class::Contributory)
                        || (first == Class::PageFault && second != Class::Benign);
                    if double {
                        v = vector::DF;
                        code = Some(0);
                    } else {
                        v = v2;
                        code = c2;
                    }
                    source = Source::Exception;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn deliver_once(&mut self, v: u8, code: Option<u32>, source: Source) -> Step {
        if !self.prot() {
            if self.s.flags.base() & flag::VM != 0 {
                tracing::warn!(cpu = self.index, vector = v, "interrupt from virtual-8086 mode: not modelled");
                return Err(Event::Shutdown);
            }
            return self.deliver_real(v);
        }
        self.deliver_protected(v, code, source)
    }

    fn deliver_real(&mut self, v: u8) -> Step {
        let off = u32::from(v) * 4;
        if off + 3 > u32::from(self.s.idtr.limit) {
            return Err(gp(u32::from(v) * 8 + 2));
        }
        let entry = self.read_sys(self.s.idtr.base.wrapping_add(off), 4)? as u32;
        let flags = self.s.flags.get();
        let (cs, ip) = (self.s.seg[SegReg::Cs as usize].selector, self.s.eip);
        let old_sp = self.s.gpr[4];
        let pushed = (|| -> Step {
            self.push(flags, 2)?;
            self.push(u32::from(cs), 2)?;
            self.push(ip, 2)
        })();
        if let Err(e) = pushed {
            self.s.gpr[4] = old_sp;
            return Err(e);
        }
        self.s.flags.set(flags & !(flag::IF | flag::TF | flag::AC | flag::RF));
        self.set_cs_real((entry >> 16) as u16);
        self.s.eip = entry & 0xffff;
        Ok(())
    }

    fn deliver_protected(&mut self, v: u8, code: Option<u32>, source: Source) -> Step {
        // EXT: the event being delivered is not the program's own `int n`
        // (an interrupt, or an exception — SDM vol. 3, 6.13).
        let ext = u32::from(source != Source::Software);
        let idt_err = u32::from(v) * 8 + 2 + ext;
        if u32::from(v) * 8 + 7 > u32::from(self.s.idtr.limit) {
            return Err(gp(idt_err));
        }
        let gate = self.read_sys(self.s.idtr.base.wrapping_add(u32::from(v) * 8), 8)?;
        let ty = ((gate >> 40) & 0x1f) as u8;
        let gate_dpl = ((gate >> 45) & 3) as u8;
        let cpl = self.s.cpl();
        let is32 = match ty {
            0x0e | 0x0f => true,
            0x06 | 0x07 => false,
            0x05 => {
                tracing::warn!(cpu = self.index, vector = v, "task gate in the IDT: task switches are not modelled");
                return Err(Event::Shutdown);
            }
            _ => return Err(gp(idt_err)),
        };
        if source == Source::Software && gate_dpl < cpl {
            return Err(gp(u32::from(v) * 8 + 2));
        }
        if gate & (1 << 47) == 0 {
            return Err(np(idt_err));
        }
        let interrupt_gate = ty & 1 == 0;
        let sel = ((gate >> 16) & 0xffff) as u16;
        let mut offset = ((gate & 0xffff) | ((gate >> 32) & 0xffff_0000)) as u32;
        if !is32 {
            offset &= 0xffff;
        }
        if sel & !3 == 0 {
            return Err(gp(ext));
        }
        let sel_err = u32::from(sel & 0xfffc) + ext;
        let desc =
            self.read_descriptor(sel, |_| Event::Exception { vector: 13, code: None }).map_err(|_| gp(sel_err))?;
        let cs = Segment::from_descriptor(sel, desc);
        let a = cs.attrs;
        if a & attr::S == 0 || a & attr::CODE == 0 || cs.dpl() > cpl {
            return Err(gp(sel_err));
        }
        if a & attr::P == 0 {
            return Err(np(sel_err));
        }
        let n = if is32 { 4 } else { 2 };
        // A fault's EFLAGS image has RF set, so that the return reruns the
        // instruction without a new instruction breakpoint (SDM vol. 3,
        // 17.3.1.1); traps, aborts and interrupts push EFLAGS as it is.
        let rf = if source == Source::Exception && is_fault(v) { flag::RF } else { 0 };
        let flags = self.s.flags.get() | rf;
        let old_cs = self.s.seg[SegReg::Cs as usize];
        let old_ss = self.s.seg[SegReg::Ss as usize];
        let old_esp = self.s.gpr[4];
        let eip = self.s.eip;
        let conforming = a & attr::DC != 0;
        let new_cpl = if conforming { cpl } else { cs.dpl() };
        // The frame: the old stack when the privilege changes, then
        // EFLAGS, CS, EIP and the error code.
        let mut frame = [0u32; 6];
        let mut len = 0;
        let inner = new_cpl < cpl;
        let mut new_ss_sel = 0;
        if inner {
            let (new_ss, new_esp) = self.stack_from_tss(new_cpl, ext)?;
            new_ss_sel = new_ss.selector;
            self.s.seg[SegReg::Ss as usize] = new_ss;
            self.s.gpr[4] = new_esp;
            // The pushes are supervisor accesses.
            self.set_supervisor();
            frame[..2].copy_from_slice(&[u32::from(old_ss.selector), old_esp]);
            len = 2;
        }
        frame[len..len + 3].copy_from_slice(&[flags, u32::from(old_cs.selector), eip]);
        len += 3;
        if let Some(code) = code {
            frame[len] = code;
            len += 1;
        }
        let pushed = frame[..len].iter().try_for_each(|&v| self.push(v, n)).map_err(|e| match e {
            Event::Exception { vector: 12, .. } if inner => ss(u32::from(new_ss_sel & 0xfffc) + ext),
            e => e,
        });
        // After the pushes, the new EIP is checked against the new CS's limit.
        if let Err(e) = pushed.and_then(|()| if offset > cs.limit { Err(gp(0)) } else { Ok(()) }) {
            self.s.seg[SegReg::Ss as usize] = old_ss;
            self.s.gpr[4] = old_esp;
            self.mode_changed();
            return Err(e);
        }
        self.set_accessed(sel, desc)?;
        let mut f = flags & !(flag::TF | flag::NT | flag::VM | flag::RF);
        if interrupt_gate {
            f &= !flag::IF;
        }
        self.s.flags.set(f);
        self.set_cs(Segment { selector: (sel & !3) | u16::from(new_cpl), attrs: a | attr::ACCESSED, ..cs });
        self.s.eip = offset;
        Ok(())
    }

    /// The inner stack for privilege `dpl` from the current TSS, checked
    /// as the CPU checks it.
    fn stack_from_tss(&mut self, dpl: u8, ext: u32) -> Step<(Segment, u32)> {
        let tr = self.s.tr;
        let tss_err = ts(u32::from(tr.selector & 0xfffc) + ext);
        let is32 = matches!(tr.attrs & 0xf, 0x9 | 0xb);
        let (esp_off, ss_off, esp_size) = if is32 {
            (4 + u32::from(dpl) * 8, 8 + u32::from(dpl) * 8, 4)
        } else {
            (2 + u32::from(dpl) * 4, 4 + u32::from(dpl) * 4, 2)
        };
        if ss_off + 1 > tr.limit || !tr.is_usable() {
            return Err(tss_err);
        }
        let esp = self.read_sys(tr.base.wrapping_add(esp_off), esp_size)? as u32;
        let sel = self.read_sys(tr.base.wrapping_add(ss_off), 2)? as u16;
        let sel_err = u32::from(sel & 0xfffc) + ext;
        if sel & !3 == 0 {
            return Err(ts(ext));
        }
        let desc =
            self.read_descriptor(sel, |_| Event::Exception { vector: 10, code: None }).map_err(|_| ts(sel_err))?;
        let s = Segment::from_descriptor(sel, desc);
        let a = s.attrs;
        let writable_data = a & attr::S != 0 && a & attr::CODE == 0 && a & attr::RW != 0;
        if (sel & 3) as u8 != dpl || s.dpl() != dpl || !writable_data {
            return Err(ts(sel_err));
        }
        if a & attr::P == 0 {
            return Err(ss(sel_err));
        }
        self.set_accessed(sel, desc)?;
        Ok((Segment { attrs: a | attr::ACCESSED, ..s }, esp))
    }
}
