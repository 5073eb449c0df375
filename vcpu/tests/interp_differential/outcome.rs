//! What a run starts from and ends with, and how two ends compare.

use std::fmt;

/// The general registers' names, in encoding order.
pub const GPR_NAMES: [&str; 8] = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"];

/// The architectural state a case reads and writes (segments and control
/// registers are fixed by the mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub gpr: [u32; 8],
    /// The offset in CS (real mode: IP; otherwise the flat address).
    pub eip: u32,
    /// EFLAGS.
    pub eflags: u32,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// It reached the case's final `out`.
    Terminated,
    /// An exception was delivered to the harness's stub for `vector`; the
    /// state is the one its frame saved (the faulting or, for traps, the
    /// next instruction), with the stack pointer from before the frame.
    Fault {
        /// The vector.
        vector: u8,
        /// The error code the CPU pushed, for vectors that have one.
        error_code: Option<u32>,
    },
    /// The CPU shut down (triple fault).
    Shutdown,
    /// Anything else: the runner says what.
    Other(String),
}

/// Everything a run is compared on.
#[derive(Clone, PartialEq, Eq)]
pub struct Outcome {
    /// How it ended.
    pub end: End,
    /// The registers at the end.
    pub state: State,
    /// The data window (data and stack) at the end.
    pub window: Vec<u8>,
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}", self.end, self.state)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, v) in GPR_NAMES.iter().zip(self.gpr) {
            write!(f, "{name}={v:08x} ")?;
        }
        write!(f, "eip={:08x} eflags={:08x} [{}]", self.eip, self.eflags, flag_names(self.eflags))
    }
}

/// The set flags of `eflags`, by name.
pub fn flag_names(eflags: u32) -> String {
    const NAMES: [(u32, &str); 14] = [
        (0, "CF"),
        (2, "PF"),
        (4, "AF"),
        (6, "ZF"),
        (7, "SF"),
        (8, "TF"),
        (9, "IF"),
        (10, "DF"),
        (11, "OF"),
        (14, "NT"),
        (16, "RF"),
        (17, "VM"),
        (18, "AC"),
        (21, "ID"),
    ];
    let mut s: Vec<String> =
        NAMES.iter().filter(|(bit, _)| eflags & (1 << bit) != 0).map(|(_, n)| (*n).to_string()).collect();
    let iopl = (eflags >> 12) & 3;
    if iopl != 0 {
        s.push(format!("IOPL={iopl}"));
    }
    s.join(" ")
}

/// The first field in which `a` and `b` differ, given the EFLAGS bits
/// that count (`flags_mask`), as one line; `None` if they agree.
pub fn first_difference(a: &Outcome, b: &Outcome, flags_mask: u32) -> Option<String> {
    if a.end != b.end {
        return Some(format!("end: {:?} vs {:?}", a.end, b.end));
    }
    for (i, name) in GPR_NAMES.iter().enumerate() {
        if a.state.gpr[i] != b.state.gpr[i] {
            return Some(format!("{name}: {:08x} vs {:08x}", a.state.gpr[i], b.state.gpr[i]));
        }
    }
    if a.state.eip != b.state.eip {
        return Some(format!("eip: {:08x} vs {:08x}", a.state.eip, b.state.eip));
    }
    let (fa, fb) = (a.state.eflags & flags_mask, b.state.eflags & flags_mask);
    if fa != fb {
        return Some(format!("eflags: {fa:08x} vs {fb:08x} (differ in [{}])", flag_names(fa ^ fb)));
    }
    if a.window == b.window {
        return None;
    }
    if let Some(i) = a.window.iter().zip(&b.window).position(|(x, y)| x != y) {
        let end = (i + 16).min(a.window.len());
        return Some(format!("window byte {i:#06x}: {:02x?} vs {:02x?}", &a.window[i..end], &b.window[i..end]));
    }
    None
}
