//! Interrupt lines: how devices raise interrupts. The vCPU work connects a
//! sink (an interrupt controller model or KVM's irqfd); tests record levels.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where interrupt line changes go.
pub trait InterruptSink: Send + Sync + 'static {
    /// Line `line` is now at `level`.
    fn set_level(&self, line: u32, level: bool);
}

/// One interrupt line of a device.
#[derive(Clone)]
pub struct IrqLine {
    sink: Arc<dyn InterruptSink>,
    line: u32,
    level: Arc<AtomicBool>,
}

impl std::fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqLine").field("line", &self.line).field("level", &self.level()).finish()
    }
}

impl IrqLine {
    /// Line `line` of `sink`.
    pub fn new(sink: Arc<dyn InterruptSink>, line: u32) -> IrqLine {
        IrqLine { sink, line, level: Arc::new(AtomicBool::new(false)) }
    }

    /// Sets the level (only changes are forwarded).
    pub fn set(&self, level: bool) {
        if self.level.swap(level, Ordering::AcqRel) != level {
            self.sink.set_level(self.line, level);
        }
    }

    /// Raises the line.
    pub fn raise(&self) {
        self.set(true);
    }

    /// Lowers the line.
    pub fn lower(&self) {
        self.set(false);
    }

    /// The current level.
    pub fn level(&self) -> bool {
        self.level.load(Ordering::Acquire)
    }

    /// The line number.
    pub fn number(&self) -> u32 {
        self.line
    }
}

/// A sink that remembers each line's level and counts rising edges.
#[derive(Default)]
pub struct LevelRecorder {
    levels: Mutex<std::collections::BTreeMap<u32, bool>>,
    edges: AtomicU64,
}

impl LevelRecorder {
    /// A new recorder.
    pub fn new() -> Arc<LevelRecorder> {
        Arc::new(LevelRecorder::default())
    }

    /// The level of `line`.
    pub fn level(&self, line: u32) -> bool {
        self.levels.lock().unwrap_or_else(|e| e.into_inner()).get(&line).copied().unwrap_or(false)
    }

    /// How many rising edges were seen on any line.
    pub fn rising_edges(&self) -> u64 {
        self.edges.load(Ordering::Acquire)
    }
}

impl InterruptSink for LevelRecorder {
    fn set_level(&self, line: u32, level: bool) {
        self.levels.lock().unwrap_or_else(|e| e.into_inner()).insert(line, level);
        if level {
            self.edges.fetch_add(1, Ordering::AcqRel);
        }
    }
}
