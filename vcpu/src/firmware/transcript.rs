//! What the firmware prints, line by line, as a function of the machine it
//! runs on, and a checker for a captured transcript. Fixed lines are
//! compared exactly; lines whose numbers vary from run to run (the AP read
//! counts of the remap phase) are matched by their fixed prefix.

use std::fmt;

/// The first line.
pub const BANNER: &str = "topos firmware";
/// The last line when every check passed.
pub const RESULT_PASS: &str = "result: pass";
/// The last line when a check failed.
pub const RESULT_FAIL: &str = "result: fail";

/// One line of an expected transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedLine {
    /// The line, exactly.
    Exact(String),
    /// A line starting with this (its tail varies from run to run).
    Prefix(String),
}

impl ExpectedLine {
    /// Whether `line` (without its newline) is this line.
    pub fn matches(&self, line: &str) -> bool {
        match self {
            ExpectedLine::Exact(s) => line == s,
            ExpectedLine::Prefix(p) => line.starts_with(p.as_str()),
        }
    }
}

impl fmt::Display for ExpectedLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedLine::Exact(s) => write!(f, "{s:?}"),
            ExpectedLine::Prefix(p) => write!(f, "{p:?}..."),
        }
    }
}

/// What the firmware should find on the machine it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// CPUs (fw_cfg's count, all of which must come up).
    pub ncpus: u32,
}

impl Machine {
    /// QEMU's `pc` machine as the firmware tests start it (`-m 256M -smp
    /// ncpus -nodefaults -device edu -device isa-debug-exit`).
    pub fn qemu_pc(ncpus: u32) -> Machine {
        Machine { ncpus }
    }
}

/// The transcript a passing run prints on `machine`.
pub fn expected_lines(machine: &Machine) -> Vec<ExpectedLine> {
    let _ = machine.ncpus;
    let exact = |s: &str| ExpectedLine::Exact(s.to_owned());
    vec![exact(BANNER), exact(RESULT_PASS)]
}

/// How a transcript differs from the expected one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranscriptMismatch {
    /// Line `line` (1-based) is not the expected one.
    #[error("line {line}: expected {expected}, found {found:?}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What should be there.
        expected: String,
        /// What is there.
        found: String,
    },
    /// The transcript ends before line `line`.
    #[error("transcript ends before line {line}: expected {expected}")]
    Missing {
        /// 1-based line number.
        line: usize,
        /// What should be there.
        expected: String,
    },
    /// The transcript goes on after the last expected line.
    #[error("line {line}: unexpected extra line {found:?}")]
    Extra {
        /// 1-based line number.
        line: usize,
        /// The extra line.
        found: String,
    },
}

/// Checks a captured transcript against `expected`, line for line (carriage
/// returns are ignored; a trailing newline is allowed).
pub fn check(output: &str, expected: &[ExpectedLine]) -> Result<(), TranscriptMismatch> {
    let mut lines = output.lines().map(|l| l.trim_end_matches('\r'));
    for (i, want) in expected.iter().enumerate() {
        match lines.next() {
            Some(found) if want.matches(found) => {}
            Some(found) => {
                return Err(TranscriptMismatch::Line {
                    line: i + 1,
                    expected: want.to_string(),
                    found: found.to_owned(),
                })
            }
            None => return Err(TranscriptMismatch::Missing { line: i + 1, expected: want.to_string() }),
        }
    }
    match lines.next() {
        Some(found) => Err(TranscriptMismatch::Extra { line: expected.len() + 1, found: found.to_owned() }),
        None => Ok(()),
    }
}
