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

// loom's `thread_local!` (swapped in by the sync shim) has no `const` form.
#[allow(clippy::missing_const_for_thread_local)]
mod state {
    use super::{Cell, Deferred, RefCell};
    crate::sync::thread_local! {
    /// Device turns held by this thread (nested accesses hold several).
    pub(super) static DEVICE_TURNS: Cell<u32> = Cell::new(0);
    /// Topology turns held by this thread (one per topology it is in a
    /// transaction of).
    pub(super) static TOPOLOGY_TURNS: Cell<u32> = Cell::new(0);
    /// Work waiting for this thread to hold no turn.
    pub(super) static DEFERRED: RefCell<Vec<Deferred>> = RefCell::new(Vec::new());
    /// How many runs of deferred work are in progress on this thread's
    /// stack (deferred work that makes an access runs that access's own
    /// deferred work when it returns: a nested run).
    pub(super) static RUNNING: Cell<u32> = Cell::new(0);
    }
}
use state::{DEFERRED, DEVICE_TURNS, RUNNING, TOPOLOGY_TURNS};

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
    pub fn enter() -> DeviceTurn {
        DEVICE_TURNS.with(|c| c.set(c.get() + 1));
        DeviceTurn { _thread: PhantomData }
    }
}

impl Drop for DeviceTurn {
    fn drop(&mut self) {
        // `try_with`: the guard may be dropped while the thread exits.
        let left = DEVICE_TURNS.try_with(|c| {
            let n = c.get().saturating_sub(1);
            c.set(n);
            n
        });
        if matches!(left, Ok(0)) {
            run_deferred_if_free();
        }
    }
}

/// True while the calling thread holds at least one device turn.
pub fn holds_device_turn() -> bool {
    DEVICE_TURNS.try_with(Cell::get).unwrap_or(0) > 0
}

/// True while the calling thread holds any turn: a device's or a topology's.
pub fn holds_any_turn() -> bool {
    holds_device_turn() || TOPOLOGY_TURNS.try_with(Cell::get).unwrap_or(0) > 0
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
    run_deferred_if_free();
}

/// Whether work is waiting on this thread (for tests and diagnostics).
pub fn has_deferred_work() -> bool {
    DEFERRED.try_with(|d| !d.borrow().is_empty()).unwrap_or(false)
}

/// The topology took its turn on this thread.
pub(crate) fn topology_turn_taken() {
    TOPOLOGY_TURNS.with(|c| c.set(c.get() + 1));
}

/// The topology gave its turn back on this thread.
pub(crate) fn topology_turn_released() {
    let left = TOPOLOGY_TURNS.try_with(|c| {
        let n = c.get().saturating_sub(1);
        c.set(n);
        n
    });
    if matches!(left, Ok(0)) {
        run_deferred_if_free();
    }
}

/// Nesting bound of deferred-work runs on one thread's stack (see
/// [`defer_until_no_turn`]); it keeps a chain of accesses made from
/// deferred work from growing the stack without limit.
pub const MAX_NESTED_RUNS: u32 = 8;

/// Runs the deferred work if the thread holds no turn (and is not already
/// [`MAX_NESTED_RUNS`] runs deep).
fn run_deferred_if_free() {
    if holds_any_turn() || RUNNING.try_with(Cell::get).unwrap_or(MAX_NESTED_RUNS) >= MAX_NESTED_RUNS {
        return;
    }
    RUNNING.with(|r| r.set(r.get() + 1));
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            let _ = RUNNING.try_with(|r| r.set(r.get().saturating_sub(1)));
        }
    }
    let _reset = Reset;
    loop {
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
