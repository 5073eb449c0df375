//! The one place where the runtime's concurrency primitives come from.
//!
//! Every module that shares state between threads imports its atomics,
//! locks, `Arc` and the RCU cell from here, never from `std` or `arc-swap`
//! directly. A loom build (`RUSTFLAGS="--cfg topos_loom"`) swaps the
//! implementations for loom's model-checked ones, so the loom tests check the
//! runtime's own protocols rather than a copy of them.
//!
//! * [`Rcu`] is the publication cell for FlatViews and other read-mostly
//!   snapshots: `arc-swap` normally; under loom, a loom atomic index over the
//!   published values with arc-swap's documented orderings, so that loom
//!   explores stale loads of the cell (see the loom `Rcu` for why and how;
//!   arc-swap has no loom hooks, and its own correctness rests on its miri
//!   and sanitizer runs).
//! * [`Mutex`] never reports poisoning: a panicking listener or device must not
//!   wedge the topology for everybody else, and every critical section in the
//!   runtime leaves its data consistent before it calls out. It and
//!   [`Condvar`] are public (as `topos_runtime::locks`) so that the device
//!   harness locks with the same ones and one loom build swaps both.

#[cfg(not(topos_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
// Reference counting stays std's under loom too: loom's `Arc` has no `Weak`
// and no unsized values, and the protocols under test are the publication,
// locking and atomics around the counts, not the counts themselves.
pub(crate) use std::sync::{Arc, Weak};

#[cfg(topos_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};

#[cfg(not(topos_loom))]
pub(crate) use std::thread_local;

#[cfg(topos_loom)]
pub(crate) use loom::thread_local;

/// The identity of the calling thread (loom's simulated thread under loom).
#[cfg(not(topos_loom))]
pub(crate) fn current_thread_id() -> std::thread::ThreadId {
    std::thread::current().id()
}

/// The identity of the calling thread (loom's simulated thread under loom).
#[cfg(topos_loom)]
pub(crate) fn current_thread_id() -> loom::thread::ThreadId {
    loom::thread::current().id()
}

/// Lets other threads run (loom's scheduler under loom).
#[cfg(not(topos_loom))]
pub(crate) fn yield_now() {
    std::thread::yield_now();
}

/// Lets other threads run (loom's scheduler under loom).
#[cfg(topos_loom)]
pub(crate) fn yield_now() {
    loom::thread::yield_now();
}

/// The type of [`current_thread_id`].
#[cfg(not(topos_loom))]
pub(crate) type ThreadId = std::thread::ThreadId;
/// The type of [`current_thread_id`].
#[cfg(topos_loom)]
pub(crate) type ThreadId = loom::thread::ThreadId;

#[cfg(not(topos_loom))]
use std::sync as imp;

#[cfg(topos_loom)]
use loom::sync as imp;

/// A mutex that ignores poisoning (see the module documentation).
#[derive(Debug, Default)]
pub struct Mutex<T>(imp::Mutex<T>);

/// The guard of a [`Mutex`].
pub type MutexGuard<'a, T> = imp::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    /// A new unlocked mutex.
    pub fn new(value: T) -> Self {
        Self(imp::Mutex::new(value))
    }

    /// Locks the mutex, recovering the data if a previous holder panicked.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// A condition variable paired with [`Mutex`].
#[derive(Debug, Default)]
pub struct Condvar(imp::Condvar);

impl Condvar {
    /// A new condition variable.
    pub fn new() -> Self {
        Self(imp::Condvar::new())
    }

    /// Waits, recovering from poisoning like [`Mutex::lock`].
    pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        match self.0.wait(guard) {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Waits until notified or until `timeout` has passed (under loom,
    /// until notified: loom does not model time), recovering from
    /// poisoning like [`Mutex::lock`]. Like any condition variable wait it
    /// may return early: callers re-check their condition and the time.
    pub fn wait_timeout<'a, T>(&self, guard: MutexGuard<'a, T>, timeout: std::time::Duration) -> MutexGuard<'a, T> {
        match self.0.wait_timeout(guard, timeout) {
            Ok((g, _)) => g,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) {
        self.0.notify_all();
    }
}

/// An RCU cell: readers load the current `Arc<T>` without locking, a writer
/// replaces it; the old value lives until its last reader drops it.
#[cfg(not(topos_loom))]
pub(crate) struct Rcu<T>(arc_swap::ArcSwap<T>);

/// What [`Rcu::load`] returns: derefs to the `Arc<T>` that was current.
#[cfg(not(topos_loom))]
pub(crate) type RcuGuard<T> = arc_swap::Guard<Arc<T>>;

#[cfg(not(topos_loom))]
impl<T> Rcu<T> {
    /// A cell holding `value`.
    pub(crate) fn new(value: Arc<T>) -> Self {
        Self(arc_swap::ArcSwap::new(value))
    }

    /// The current value, without taking a lock (and, on the fast path,
    /// without touching the reference count).
    #[inline]
    pub(crate) fn load(&self) -> RcuGuard<T> {
        self.0.load()
    }

    /// The current value as an owned `Arc`.
    pub(crate) fn load_full(&self) -> Arc<T> {
        self.0.load_full()
    }

    /// Publishes `value`, returning the previous one.
    pub(crate) fn swap(&self, value: Arc<T>) -> Arc<T> {
        self.0.swap(value)
    }
}

/// The loom stand-in for arc-swap: a publication whose *visibility* loom
/// explores.
///
/// arc-swap has no loom hooks, and a mutex around an `Arc` (the first
/// stand-in) made every load see the latest value, so loom could not tell
/// whether the runtime's own atomics (a generation stored `Release` after the
/// view, a flag stored after a list) order publication correctly: a reader
/// that saw a new generation always got the new view anyway. Here the
/// current value is named by a loom atomic index, swapped `AcqRel` and
/// loaded `Acquire` — the orderings arc-swap documents for its pointer
/// (`arc_swap::docs::internal`, "Memory orders") — so a load that is not
/// ordered after a swap by happens-before may return the value before it,
/// exactly as loom lets any atomic load return a stale store. A reader that
/// pairs such a stale value with a newer generation is what the models
/// catch.
///
/// Lifetimes stay arc-swap's: the cell holds one strong reference to the
/// current value and hands it back from [`swap`](Self::swap); retired values
/// are kept only weakly, so a retired view is freed after its last reader
/// (the `flatview_publish` model checks this). A stale load corresponds to a
/// real load linearized before the swap, which arc-swap would have protected
/// with a debt; if the value has been freed since, the model cannot hand it
/// out and instead orders the load after every swap so far (taking the
/// writers' lock) and returns the current value, with the happens-before
/// edges a load of it carries (returning a newer value without them would
/// let a reader see a view before the stores that preceded its
/// publication, which no real load can). Values live in a std mutex, invisible
/// to loom and never held across a loom operation: the atomic index alone
/// carries the modelled happens-before edges.
#[cfg(topos_loom)]
pub(crate) struct Rcu<T> {
    /// The index in `values` of the current value.
    current: loom::sync::atomic::AtomicUsize,
    /// Serialises writers as arc-swap's single `swap` RMW does (an `AcqRel`
    /// chain of swaps gives writers the same happens-before edges).
    writer: loom::sync::Mutex<()>,
    /// Every value published, by index.
    values: std::sync::Mutex<Vec<RcuSlot<T>>>,
}

/// A value of a loom [`Rcu`]: the current one is held, retired ones are not.
#[cfg(topos_loom)]
enum RcuSlot<T> {
    Current(Arc<T>),
    Retired(Weak<T>),
}

#[cfg(topos_loom)]
pub(crate) type RcuGuard<T> = Arc<T>;

#[cfg(topos_loom)]
impl<T> Rcu<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        Self {
            current: loom::sync::atomic::AtomicUsize::new(0),
            writer: loom::sync::Mutex::new(()),
            values: std::sync::Mutex::new(vec![RcuSlot::Current(value)]),
        }
    }

    pub(crate) fn load(&self) -> RcuGuard<T> {
        let i = self.current.load(Ordering::Acquire);
        {
            let values = self.values.lock().unwrap();
            match &values[i] {
                RcuSlot::Current(a) => return a.clone(),
                RcuSlot::Retired(w) => {
                    if let Some(a) = w.upgrade() {
                        return a;
                    }
                }
            }
        }
        // The value this (stale) load found is gone. A real load that
        // returns a newer value synchronizes with the swap that published
        // it, so order this one after every swap so far (the writers' lock)
        // and load again: the current value, with the happens-before edges
        // a reader of it has.
        let _w = self.writer.lock().unwrap();
        let i = self.current.load(Ordering::Acquire);
        let values = self.values.lock().unwrap();
        match &values[i] {
            RcuSlot::Current(a) => a.clone(),
            RcuSlot::Retired(_) => unreachable!("with the writers' lock held the index names the current value"),
        }
    }

    pub(crate) fn load_full(&self) -> Arc<T> {
        self.load()
    }

    pub(crate) fn swap(&self, value: Arc<T>) -> Arc<T> {
        let _w = self.writer.lock().unwrap();
        let n = {
            let mut values = self.values.lock().unwrap();
            values.push(RcuSlot::Current(value));
            values.len() - 1
        };
        let old = self.current.swap(n, Ordering::AcqRel);
        let mut values = self.values.lock().unwrap();
        let RcuSlot::Current(a) = &values[old] else { unreachable!("only the current value is swapped out") };
        let a = a.clone();
        values[old] = RcuSlot::Retired(Arc::downgrade(&a));
        a
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Rcu<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Rcu").field(&*self.load_full()).finish()
    }
}
