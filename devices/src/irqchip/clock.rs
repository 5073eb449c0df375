//! Time for the interrupt controllers: a monotonic clock, and one deadline
//! thread per [`Irqchip`](super::Irqchip) that fires the APIC timers and
//! the PIT without anyone polling.
//!
//! Each timer source has a slot (one per local APIC, then the PIT) holding
//! its next deadline. A source arms its slot whenever its state changes
//! (under its own lock, then the clock's: sources lock before the clock,
//! never the other way round). The thread is spawned when a first deadline
//! is armed; it sleeps on a condition variable until the earliest
//! deadline (or until a slot changes), takes the slots that are due, and —
//! holding no lock of its own — asks each source to fire: the source checks
//! its own state (a deadline moved meanwhile is simply not due), posts its
//! interrupt, and arms its next deadline. It exits when the `Irqchip` is
//! dropped, which joins it.

use super::Shared;
use crate::sync::{current_thread_id, spawn_thread, Arc, Condvar, JoinHandle, Mutex};
use std::time::{Duration, Instant};

/// The shortest period of a periodic timer, APIC or PIT (KVM's default
/// `min_timer_period_us`, 200 µs): a guest cannot make the host spin.
pub(crate) const MIN_PERIOD_NS: u64 = 200_000;

/// The period of a periodic `timer` that counts down `span` ns: at least
/// [`MIN_PERIOD_NS`].
pub(crate) fn period_of(span: u64, timer: &'static str) -> u64 {
    if span < MIN_PERIOD_NS {
        tracing::debug!(timer, span, "periodic timer clamped to 200 µs");
        MIN_PERIOD_NS
    } else {
        span
    }
}

/// The first time after `now` on the grid `deadline + k × period` (k ≥ 1)
/// of a periodic timer that expired at `deadline`: periods the host missed
/// are skipped, not made up.
pub(crate) fn next_period(deadline: u64, now: u64, period: u64) -> u64 {
    deadline + ((now - deadline) / period + 1) * period
}

/// The deadline thread's name.
const THREAD_NAME: &str = "topos-irqchip-clock";

/// The clock and its deadline table.
pub(crate) struct Clock {
    origin: Instant,
    state: Mutex<ClockState>,
    changed: Condvar,
}

struct ClockState {
    /// Each source's next deadline, in ns of [`Clock::now`].
    deadlines: Vec<Option<u64>>,
    /// The thread, once spawned.
    thread: Option<JoinHandle>,
    /// Whether the thread was spawned (it may have been joined since).
    spawned: bool,
    /// The `Irqchip` is gone: the thread leaves and no new one starts.
    shutdown: bool,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state.lock();
        f.debug_struct("Clock")
            .field("deadlines", &st.deadlines)
            .field("spawned", &st.spawned)
            .field("shutdown", &st.shutdown)
            .finish()
    }
}

impl Clock {
    /// A clock starting now, with `slots` sources.
    pub(crate) fn new(slots: usize) -> Clock {
        Clock {
            origin: Instant::now(),
            state: Mutex::new(ClockState {
                deadlines: vec![None; slots],
                thread: None,
                spawned: false,
                shutdown: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// Nanoseconds since the clock started (monotonic).
    pub(crate) fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Sets source `slot`'s next deadline; starts the thread (running
    /// `shared`'s sources) on the first deadline.
    pub(crate) fn arm(&self, slot: usize, deadline: Option<u64>, shared: &Shared) {
        let mut st = self.state.lock();
        let Some(entry) = st.deadlines.get_mut(slot) else {
            return;
        };
        *entry = deadline;
        if deadline.is_some() && !st.spawned && !st.shutdown {
            st.spawned = true;
            // Spawned under the lock, so that a concurrent shutdown either
            // comes first (no thread) or finds the handle to join.
            match shared.upgrade().map(|s| spawn_thread(THREAD_NAME, move || run(s))) {
                Some(Ok(handle)) => st.thread = Some(handle),
                Some(Err(e)) => tracing::error!(error = %e, "interrupt controllers: cannot start the timer thread"),
                None => {}
            }
        }
        self.changed.notify_all();
    }

    /// Whether the deadline thread was started.
    #[cfg(test)]
    pub(crate) fn spawned(&self) -> bool {
        self.state.lock().spawned
    }

    /// Stops the thread and waits for it to leave (unless called on it).
    pub(crate) fn shutdown(&self) {
        let handle = {
            let mut st = self.state.lock();
            st.shutdown = true;
            self.changed.notify_all();
            st.thread.take()
        };
        if let Some(handle) = handle {
            if handle.thread().id() != current_thread_id() {
                let _ = handle.join();
            }
        }
    }
}

/// The deadline thread.
fn run(shared: Arc<Shared>) {
    let clock = &shared.clock;
    let mut due = Vec::new();
    let mut st = clock.state.lock();
    loop {
        if st.shutdown {
            return;
        }
        let now = clock.now();
        let mut earliest: Option<u64> = None;
        for (slot, deadline) in st.deadlines.iter_mut().enumerate() {
            match *deadline {
                Some(at) if at <= now => {
                    *deadline = None;
                    due.push(slot);
                }
                Some(at) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
                None => {}
            }
        }
        if due.is_empty() {
            st = match earliest {
                Some(at) => clock.changed.wait_timeout(st, Duration::from_nanos(at - now)),
                None => clock.changed.wait(st),
            };
            continue;
        }
        drop(st);
        for slot in due.drain(..) {
            // A bug in a source must not stop every timer of the VM: the
            // locks ignore poisoning, and the other sources keep firing.
            let fired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shared.fire(slot, now)));
            if fired.is_err() {
                tracing::error!(slot, "interrupt controllers: a timer source panicked while firing");
            }
        }
        st = clock.state.lock();
    }
}
