//! Reading an exception's frame back: a case that faults ends in the
//! vector's stub (`out`, `hlt`); the state compared is the one the frame
//! saved, as the faulting code saw it.

use super::layout::WINDOW;
use super::outcome::{End, State};

/// How the CPU pushed the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Real mode: IP, CS, FLAGS (16-bit) on SS:SP (SS is the window).
    Real,
    /// 32-bit protected mode, no privilege change: [error code,] EIP, CS,
    /// EFLAGS on the faulting code's stack.
    Prot32,
    /// 32-bit protected mode from ring 3: [error code,] EIP, CS, EFLAGS,
    /// ESP, SS on the ring-0 stack.
    Ring3,
    /// Long mode: [error code,] RIP, CS, RFLAGS, RSP, SS (8 bytes each) on
    /// the ring-0 stack.
    Long,
}

/// Whether the CPU pushes an error code for `vector` (never in real mode).
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Rewrites `state` (the stub's, its stack pointer just below the frame)
/// into the one the frame saved, reading memory with `read(address, len)`.
pub fn unwind(frame: Frame, vector: u8, state: &mut State, read: impl Fn(u64, usize) -> Vec<u8>) -> End {
    let has_code = frame != Frame::Real && has_error_code(vector);
    let sp = u64::from(state.gpr[4]);
    let (stack, width) = match frame {
        Frame::Real => (WINDOW + (sp & 0xffff), 2u64),
        Frame::Prot32 | Frame::Ring3 => (sp, 4),
        Frame::Long => (sp, 8),
    };
    let slots = if matches!(frame, Frame::Ring3 | Frame::Long) { 5 } else { 3 } + u64::from(has_code);
    let bytes = read(stack, (slots * width) as usize);
    let slot = |i: u64| {
        let b = &bytes[(i * width) as usize..((i + 1) * width) as usize];
        b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)) as u32
    };
    let first = u64::from(has_code);
    let error_code = has_code.then(|| slot(0));
    let live = state.eflags;
    state.eip = slot(first);
    state.eflags = slot(first + 2);
    match frame {
        Frame::Ring3 | Frame::Long => state.gpr[4] = slot(first + 3),
        Frame::Real => {
            let sp = state.gpr[4].wrapping_add((slots * width) as u32);
            state.gpr[4] = (state.gpr[4] & 0xffff_0000) | (sp & 0xffff);
            // FLAGS is 16 bits: the upper half is the live one (delivery
            // clears AC).
            state.eflags = (live & 0xffff_0000) | (state.eflags & 0xffff);
        }
        Frame::Prot32 => state.gpr[4] = state.gpr[4].wrapping_add((slots * width) as u32),
    }
    End::Fault { vector, error_code }
}
