//! The one place where the device harness's concurrency primitives come
//! from.
//!
//! The harness (`turn.rs`, `mailbox.rs`, `reply.rs`, `actor.rs`) imports
//! its atomics, locks, cells, thread-locals, mailbox queue and drainer
//! threads from here, never from `std`, `flume` or `tokio` directly. A loom
//! build (`RUSTFLAGS="--cfg topos_loom"`) swaps them for loom's
//! model-checked ones, so the loom models in `loom-tests/` check the
//! harness's own protocols rather than a copy of them:
//!
//! * [`UnsafeCell`] has loom's closure API (`with_mut`) in both builds, so
//!   loom sees every access to a device's state and checks that the turn
//!   orders them.
//! * [`Queue`] is the mailbox's message queue: `flume` normally, a loom
//!   mutex around a `VecDeque` under loom (flume has no loom hooks).
//! * [`spawn_blocking`] starts a drainer: on the device runtime's blocking
//!   pool normally, as a loom thread under loom.
//! * [`Mutex`] and [`Condvar`] are the runtime's (`topos_runtime::locks`):
//!   they never report poisoning, as handlers run under `catch_unwind` and
//!   every critical section leaves its data consistent before it can panic.
//! * [`spawn_thread`] starts a long-lived named thread (the interrupt
//!   controllers' deadline thread, `irqchip/clock.rs`): a std thread
//!   normally, a loom thread under loom; [`current_thread_id`] names the
//!   calling thread in the same world.
//!
//! Reference counting stays std's under loom too: loom's `Arc` has no `Weak`
//! and no unsized values, and the protocols under test are the atomics and
//! locks around the counts, not the counts.

#[cfg(not(topos_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};

#[cfg(topos_loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};

pub(crate) use std::sync::{Arc, Weak};

pub(crate) use topos_runtime::locks::{Condvar, Mutex};

/// A cell whose accesses go through closures, as loom's does (see the
/// module documentation).
#[cfg(not(topos_loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(topos_loom))]
impl<T> UnsafeCell<T> {
    /// A cell holding `value`.
    pub(crate) fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    /// Calls `f` with a pointer for writing.
    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

#[cfg(topos_loom)]
pub(crate) use loom::cell::UnsafeCell;

/// A multi-producer FIFO queue without a bound of its own (the mailbox
/// counts its slots itself).
#[cfg(not(topos_loom))]
pub(crate) struct Queue<T> {
    tx: flume::Sender<T>,
    rx: flume::Receiver<T>,
}

#[cfg(not(topos_loom))]
impl<T> Queue<T> {
    /// An empty queue.
    pub(crate) fn new() -> Self {
        let (tx, rx) = flume::unbounded();
        Queue { tx, rx }
    }

    /// Appends `value`.
    #[inline]
    pub(crate) fn push(&self, value: T) {
        // Both ends live in `self`: the queue cannot be disconnected.
        let _ = self.tx.send(value);
    }

    /// Takes the oldest value, if any.
    #[inline]
    pub(crate) fn pop(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

/// A multi-producer FIFO queue without a bound of its own (the mailbox
/// counts its slots itself).
#[cfg(topos_loom)]
pub(crate) struct Queue<T>(Mutex<std::collections::VecDeque<T>>);

#[cfg(topos_loom)]
impl<T> Queue<T> {
    /// An empty queue.
    pub(crate) fn new() -> Self {
        Queue(Mutex::new(std::collections::VecDeque::new()))
    }

    /// Appends `value`.
    pub(crate) fn push(&self, value: T) {
        self.0.lock().push_back(value);
    }

    /// Takes the oldest value, if any.
    pub(crate) fn pop(&self) -> Option<T> {
        self.0.lock().pop_front()
    }
}

/// Where drainers run: the device runtime's blocking pool.
#[cfg(not(topos_loom))]
pub(crate) type BlockingPool = tokio::runtime::Handle;

/// Where drainers run: loom threads.
#[cfg(topos_loom)]
#[derive(Debug, Clone, Default)]
pub(crate) struct BlockingPool;

/// Runs `f` on a thread of `pool` that may block. If the pool is shut down,
/// `f` is dropped without running: callers must make that drop safe.
#[cfg(not(topos_loom))]
pub(crate) fn spawn_blocking(pool: &BlockingPool, f: impl FnOnce() + Send + 'static) {
    drop(pool.spawn_blocking(f));
}

/// Runs `f` on a new loom thread.
#[cfg(topos_loom)]
pub(crate) fn spawn_blocking(_pool: &BlockingPool, f: impl FnOnce() + Send + 'static) {
    drop(loom::thread::spawn(f));
}

/// The handle of a thread started by [`spawn_thread`].
#[cfg(not(topos_loom))]
pub(crate) type JoinHandle = std::thread::JoinHandle<()>;

/// The handle of a thread started by [`spawn_thread`].
#[cfg(topos_loom)]
pub(crate) type JoinHandle = loom::thread::JoinHandle<()>;

/// The identity of a thread (loom's simulated thread under loom).
#[cfg(not(topos_loom))]
pub(crate) type ThreadId = std::thread::ThreadId;

/// The identity of a thread (loom's simulated thread under loom).
#[cfg(topos_loom)]
pub(crate) type ThreadId = loom::thread::ThreadId;

/// Starts a thread named `name` running `f`.
#[cfg(not(topos_loom))]
pub(crate) fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<JoinHandle> {
    std::thread::Builder::new().name(name.to_string()).spawn(f)
}

/// Starts a loom thread running `f`.
#[cfg(topos_loom)]
pub(crate) fn spawn_thread(_name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<JoinHandle> {
    Ok(loom::thread::spawn(f))
}

/// The identity of the calling thread.
#[cfg(not(topos_loom))]
pub(crate) fn current_thread_id() -> ThreadId {
    std::thread::current().id()
}

/// The identity of the calling thread.
#[cfg(topos_loom)]
pub(crate) fn current_thread_id() -> ThreadId {
    loom::thread::current().id()
}
