//! The turns a thread holds, and the rule that keeps actors deadlock-free.
//!
//! topos has two kinds of *turn*: the topology's (held by a thread inside a
//! transaction, see [`Topology::begin`](crate::Topology::begin)) and each
//! device actor's (held by the thread running the device's handler, see
//! `topos-devices`). One rule keeps them free of deadlock:
//!
//! > **A thread that holds a device turn never blocks** — not on another
//! > actor and not on the topology's turn.
//!
//! The device harness marks the threads that hold a device turn with a
//! [`DeviceTurn`] guard. While one is alive, every topology operation that
//! would take the topology's turn (mutators, transactions, `mtree`,
//! `snapshot`, `subscribe`, listener registration) returns
//! [`Error::InsideDeviceTurn`](crate::Error::InsideDeviceTurn) instead of
//! waiting; the harness answers a synchronous access to a busy actor with an
//! error instead of waiting for it. Work that needs to block — a BAR remap, a
//! romd switch, a DMA into another device — is handed to
//! [`defer_until_no_turn`], which runs it on the same thread once it holds no
//! turn at all (neither a device's nor the topology's).
//!
//! Waiting in the other direction is allowed: a thread inside a topology
//! transaction may read a busy device and wait for it, because the device's
//! holder can never be waiting for the topology.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;

type Deferred = Box<dyn FnOnce() + Send>;

/// What one thread holds, and whether work waits for it to hold nothing: one
/// thread-local with nothing to drop, so the device harness's hot path (a
/// turn taken and given back per access) pays one plain thread-local access
/// each way. The work itself is in `DEFERRED`, touched only when there is
/// some.
struct ThreadTurns {
    /// Device turns held (nested accesses hold several).
    device: Cell<u32>,
    /// Topology turns held (one per topology it is in a transaction of).
    topology: Cell<u32>,
    /// Runs of deferred work in progress on this thread's stack (deferred
    /// work that makes an access runs that access's own deferred work when
    /// it returns: a nested run).
    running: Cell<u32>,
    /// Whether `DEFERRED` holds work.
    has_deferred: Cell<bool>,
}

impl ThreadTurns {
    const fn new() -> ThreadTurns {
        ThreadTurns {
            device: Cell::new(0),
            topology: Cell::new(0),
            running: Cell::new(0),
            has_deferred: Cell::new(false),
        }
    }

    /// Whether deferred work may run now: no turn held, work waiting, and
    /// not already [`MAX_NESTED_RUNS`] runs deep.
    #[inline]
    fn may_run_deferred(&self) -> bool {
        // Most releases find no work: test that first.
        self.has_deferred.get()
            && self.device.get() == 0
            && self.topology.get() == 0
            && self.running.get() < MAX_NESTED_RUNS
    }
}

#[cfg(not(topos_loom))]
std::thread_local! {
    static TURNS: ThreadTurns = const { ThreadTurns::new() };
    /// Work waiting for this thread to hold no turn.
    static DEFERRED: RefCell<Vec<Deferred>> = const { RefCell::new(Vec::new()) };
}

// loom's `thread_local!` has no `const` form.
#[cfg(topos_loom)]
#[allow(clippy::missing_const_for_thread_local)]
mod loom_state {
    loom::thread_local! {
        pub(super) static TURNS: super::ThreadTurns = super::ThreadTurns::new();
        pub(super) static DEFERRED: super::RefCell<Vec<super::Deferred>> = super::RefCell::new(Vec::new());
    }
}
#[cfg(topos_loom)]
use loom_state::{DEFERRED, TURNS};

/// Marks the calling thread as holding a device actor's turn for as long as
/// the guard lives (the device harness creates one per turn it takes).
/// Dropping the last turn the thread holds runs its deferred work.
#[derive(Debug)]
#[must_use = "the thread holds the turn only while the guard lives"]
pub struct DeviceTurn {
    /// Thread-bound: the count it maintains is the thread's own.
    _thread: PhantomData<*const ()>,
}

impl DeviceTurn {
    /// Records that the calling thread now holds one more device turn.
    #[inline]
    pub fn enter() -> DeviceTurn {
        TURNS.with(|t| t.device.set(t.device.get() + 1));
        DeviceTurn { _thread: PhantomData }
    }
}

impl Drop for DeviceTurn {
    #[inline]
    fn drop(&mut self) {
        // `try_with`: the guard may be dropped while the thread exits.
        let run = TURNS.try_with(|t| {
            t.device.set(t.device.get().saturating_sub(1));
            t.may_run_deferred()
        });
        if matches!(run, Ok(true)) {
            run_deferred();
        }
    }
}

/// True while the calling thread holds at least one device turn.
#[inline]
pub fn holds_device_turn() -> bool {
    TURNS.try_with(|t| t.device.get() > 0).unwrap_or(false)
}

/// True while the calling thread holds any turn: a device's or a topology's.
pub fn holds_any_turn() -> bool {
    TURNS.try_with(|t| t.device.get() > 0 || t.topology.get() > 0).unwrap_or(false)
}

/// Runs `f` on the calling thread as soon as it holds no turn at all: at
/// once if it holds none now, otherwise when it gives back its last device
/// or topology turn (in the order the work was deferred). A panic in `f` is
/// contained and reported through `tracing`.
///
/// Deferred work may itself make accesses that defer work: that work runs
/// when the access gives its turn back, before the deferred work that made
/// it goes on — so an access made from deferred work has taken effect when
/// it returns, as any other. Such nesting follows the real call stack; past
/// [`MAX_NESTED_RUNS`] levels, work waits for the outer run instead.
pub fn defer_until_no_turn(f: impl FnOnce() + Send + 'static) {
    DEFERRED.with(|d| d.borrow_mut().push(Box::new(f)));
    let run = TURNS.with(|t| {
        t.has_deferred.set(true);
        t.may_run_deferred()
    });
    if run {
        run_deferred();
    }
}

/// Whether work is waiting on this thread (for tests and diagnostics).
pub fn has_deferred_work() -> bool {
    TURNS.try_with(|t| t.has_deferred.get()).unwrap_or(false)
}

/// The topology took its turn on this thread.
pub(crate) fn topology_turn_taken() {
    TURNS.with(|t| t.topology.set(t.topology.get() + 1));
}

/// The topology gave its turn back on this thread.
pub(crate) fn topology_turn_released() {
    let run = TURNS.try_with(|t| {
        t.topology.set(t.topology.get().saturating_sub(1));
        t.may_run_deferred()
    });
    if matches!(run, Ok(true)) {
        run_deferred();
    }
}

/// Nesting bound of deferred-work runs on one thread's stack (see
/// [`defer_until_no_turn`]); it keeps a chain of accesses made from
/// deferred work from growing the stack without limit.
pub const MAX_NESTED_RUNS: u32 = 8;

/// Runs the thread's deferred work (the caller checked
/// `may_run_deferred`), including work deferred meanwhile.
#[cold]
fn run_deferred() {
    TURNS.with(|t| t.running.set(t.running.get() + 1));
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            let _ = TURNS.try_with(|t| t.running.set(t.running.get().saturating_sub(1)));
        }
    }
    let _reset = Reset;
    loop {
        TURNS.with(|t| t.has_deferred.set(false));
        let work = DEFERRED.with(|d| std::mem::take(&mut *d.borrow_mut()));
        if work.is_empty() {
            return;
        }
        for f in work {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                tracing::error!("deferred work panicked");
            }
        }
    }
}

#[cfg(all(test, not(topos_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn deferred_work_waits_for_the_last_turn() {
        let ran = Arc::new(AtomicU32::new(0));
        let outer = DeviceTurn::enter();
        let inner = DeviceTurn::enter();
        let r = ran.clone();
        defer_until_no_turn(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        drop(inner);
        assert_eq!(ran.load(Ordering::SeqCst), 0, "ran while a turn was still held");
        assert!(has_deferred_work());
        drop(outer);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert!(!has_deferred_work());
    }

    #[test]
    fn deferred_work_runs_at_once_without_turns_and_contains_panics() {
        let ran = Arc::new(AtomicU32::new(0));
        defer_until_no_turn(|| panic!("deferred work fails"));
        let r = ran.clone();
        defer_until_no_turn(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn work_deferred_by_an_access_from_deferred_work_runs_when_that_access_returns() {
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let turn = DeviceTurn::enter();
        let o = order.clone();
        defer_until_no_turn(move || {
            // An access from deferred work: its handler defers more.
            let access = DeviceTurn::enter();
            let o2 = o.clone();
            defer_until_no_turn(move || o2.lock().unwrap().push("inner"));
            drop(access);
            o.lock().unwrap().push("after the access");
        });
        let o = order.clone();
        defer_until_no_turn(move || o.lock().unwrap().push("next"));
        drop(turn);
        assert_eq!(*order.lock().unwrap(), ["inner", "after the access", "next"]);
    }

    #[test]
    fn nested_runs_are_bounded_and_nothing_is_lost() {
        fn chain(left: u32, ran: Arc<AtomicU32>) {
            defer_until_no_turn(move || {
                ran.fetch_add(1, Ordering::SeqCst);
                if left > 0 {
                    let access = DeviceTurn::enter();
                    chain(left - 1, ran);
                    drop(access);
                }
            });
        }
        let ran = Arc::new(AtomicU32::new(0));
        chain(3 * MAX_NESTED_RUNS, ran.clone());
        assert_eq!(ran.load(Ordering::SeqCst), 3 * MAX_NESTED_RUNS + 1);
        assert!(!has_deferred_work());
    }

    #[test]
    fn deferred_work_may_defer_more() {
        let ran = Arc::new(AtomicU32::new(0));
        let turn = DeviceTurn::enter();
        let r = ran.clone();
        defer_until_no_turn(move || {
            let _t = DeviceTurn::enter();
            let r2 = r.clone();
            defer_until_no_turn(move || {
                r2.fetch_add(10, Ordering::SeqCst);
            });
            r.fetch_add(1, Ordering::SeqCst);
        });
        drop(turn);
        assert_eq!(ran.load(Ordering::SeqCst), 11);
    }
}
