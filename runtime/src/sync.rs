//! The one place where the runtime's concurrency primitives come from.
//!
//! Every module that shares state between threads imports its atomics,
//! locks, `Arc` and the RCU cell from here, never from `std` or `arc-swap`
//! directly. A loom build (`RUSTFLAGS="--cfg topos_loom"`) swaps the
//! implementations for loom's model-checked ones, so the loom tests check the
//! runtime's own protocols rather than a copy of them.
//!
//! * [`Rcu`] is the publication cell for FlatViews and other read-mostly
//!   snapshots: `arc-swap` normally, a loom mutex around an `Arc` under loom
//!   (arc-swap has no loom hooks; its own correctness rests on its miri and
//!   sanitizer runs).
//! * [`Mutex`] never reports poisoning: a panicking listener or device must not
//!   wedge the topology for everybody else, and every critical section in the
//!   runtime leaves its data consistent before it calls out.

#[cfg(not(topos_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
// Reference counting stays std's under loom too: loom's `Arc` has no `Weak`
// and no unsized values, and the protocols under test are the publication,
// locking and atomics around the counts, not the counts themselves.
pub(crate) use std::sync::{Arc, Weak};

#[cfg(topos_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

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
pub(crate) struct Mutex<T>(imp::Mutex<T>);

/// The guard of a [`Mutex`].
pub(crate) type MutexGuard<'a, T> = imp::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    /// A new unlocked mutex.
    pub(crate) fn new(value: T) -> Self {
        Self(imp::Mutex::new(value))
    }

    /// Locks the mutex, recovering the data if a previous holder panicked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// A condition variable paired with [`Mutex`].
#[derive(Debug, Default)]
pub(crate) struct Condvar(imp::Condvar);

impl Condvar {
    /// A new condition variable.
    pub(crate) fn new() -> Self {
        Self(imp::Condvar::new())
    }

    /// Waits, recovering from poisoning like [`Mutex::lock`].
    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        match self.0.wait(guard) {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Wakes every waiter.
    pub(crate) fn notify_all(&self) {
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

#[cfg(topos_loom)]
pub(crate) struct Rcu<T>(loom::sync::Mutex<Arc<T>>);

#[cfg(topos_loom)]
pub(crate) type RcuGuard<T> = Arc<T>;

#[cfg(topos_loom)]
impl<T> Rcu<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        Self(loom::sync::Mutex::new(value))
    }
    pub(crate) fn load(&self) -> RcuGuard<T> {
        self.0.lock().unwrap().clone()
    }
    pub(crate) fn load_full(&self) -> Arc<T> {
        self.0.lock().unwrap().clone()
    }
    pub(crate) fn swap(&self, value: Arc<T>) -> Arc<T> {
        std::mem::replace(&mut *self.0.lock().unwrap(), value)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Rcu<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Rcu").field(&*self.load_full()).finish()
    }
}
