//! What the interpreter does not implement (issue 9): the guest gets `#UD`
//! (or the fault the interpreter documents), the host gets a `tracing`
//! warning naming it, and nothing panics.
//!
//! Each test captures the warnings of its own thread with a scoped
//! subscriber. "Once per instruction kind" is per process, so each test
//! uses an instruction no other test in this binary executes.

#[path = "interp_exceptions/guest.rs"]
mod guest;

use guest::{gate, sel, start, Expect, Mode};
use iced_x86::code_asm::*;
use std::io::Write;
use std::sync::{Arc, Mutex};
use topos_vcpu::interp::state::flag;
use topos_vcpu::interp::Exit;

/// A writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The warnings logged so far, one per line.
    fn warnings(&self) -> Vec<String> {
        let b = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&b).lines().filter(|l| l.contains("WARN")).map(str::to_owned).collect()
    }
}

/// Runs `f` with this thread's warnings captured.
fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    let out = Captured::default();
    let w = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let r = tracing::subscriber::with_default(subscriber, f);
    (r, out.warnings())
}

#[test]
fn an_unimplemented_instruction_is_ud_and_a_warning_once() {
    // rdpmc: decoded by iced-x86, not implemented here.
    let (_, warnings) = capture(|| {
        let (mut g, before, c) = start(Mode::Prot, |a| {
            a.mark("fault");
            a.rdpmc()?;
            a.hlt()
        });
        g.deliver().check(&before, Expect { vector: 6, code: None, eip: c.at("fault") });
        // Again: #UD again, no second warning.
        g.cpu.state_mut().halted = false;
        g.cpu.state_mut().eip = c.at("fault");
        g.cpu.state_mut().gpr[4] = before.gpr[4];
        g.cpu.state_mut().set_eflags(before.eflags());
        g.deliver().check(&before, Expect { vector: 6, code: None, eip: c.at("fault") });
    });
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert!(warnings[0].contains("does not implement") && warnings[0].contains("Rdpmc"), "{warnings:?}");
}

#[test]
fn an_unimplemented_instruction_in_real_mode() {
    // fxsave [0xa000]: a legacy instruction this CPU does not have.
    let (_, warnings) = capture(|| {
        let (mut g, before, c) = start(Mode::Real, |a| {
            a.mark("fault");
            a.fxsave(ptr(0xa000))?;
            a.hlt()
        });
        g.deliver().check(&before, Expect { vector: 6, code: None, eip: c.at("fault") });
        assert_eq!(g.read(0xa000, 16), [0; 16], "nothing written");
    });
    assert!(warnings.iter().any(|w| w.contains("Fxsave")), "{warnings:?}");
}

#[test]
fn a_task_switch_by_far_jump_is_gp_and_a_warning() {
    // jmp far to the TSS descriptor: task switches are not modelled, the
    // guest gets #GP(selector).
    let (_, warnings) = capture(|| {
        let (mut g, before, c) = start(Mode::Prot, |a| {
            a.mark("fault");
            a.db(&[0xea, 0, 0, 0, 0])?;
            a.dw(&[sel::TSS])?;
            a.hlt()
        });
        g.deliver().check(&before, Expect { vector: 13, code: Some(u32::from(sel::TSS)), eip: c.at("fault") });
    });
    assert!(warnings.iter().any(|w| w.contains("not modelled")), "{warnings:?}");
}

#[test]
fn a_task_gate_shuts_down_with_a_warning() {
    // int through a task gate: a task switch the interpreter cannot do; it
    // stops the machine (documented) rather than run on wrongly.
    let (exit, warnings) = capture(|| {
        let (mut g, _, _) = start(Mode::Prot, |a| {
            a.mark("fault");
            a.int(0x50)?;
            a.hlt()
        });
        g.set_gate(0x50, gate(sel::TSS, 0, 0x5, 0, true));
        g.run(10)
    });
    assert_eq!(exit, Exit::Shutdown);
    assert!(warnings.iter().any(|w| w.contains("task gate")), "{warnings:?}");
}

#[test]
fn iret_with_nt_is_gp_and_a_warning() {
    let (_, warnings) = capture(|| {
        let (mut g, before, c) = start(Mode::Prot, |a| {
            a.pushfd()?;
            a.or(dword_ptr(esp), flag::NT)?;
            a.popfd()?;
            a.mark("fault");
            a.iretd()?;
            a.hlt()
        });
        g.deliver().check(&before, Expect { vector: 13, code: Some(0), eip: c.at("fault") });
    });
    assert!(warnings.iter().any(|w| w.contains("NT")), "{warnings:?}");
}
