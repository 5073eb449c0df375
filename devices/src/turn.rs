//! The actor's *turn*: exclusive access to a device's state, combined in one
//! atomic word with the count of messages waiting in its mailbox.
//!
//! `state` = `BUSY` bit | (pending messages × `ONE`). Taking the turn is a
//! compare-and-swap that sets `BUSY`; giving it back is a compare-and-swap
//! from exactly `BUSY` to 0, which fails if a message was queued meanwhile,
//! so the holder drains it first. A sender counts its message after sending
//! it; if it finds the turn free at that moment, it takes the turn itself and
//! drains. Both sides meet on the same word, so no message is ever left
//! without a drainer, and the uncontended path costs what a mutex does: one
//! compare-and-swap to enter, one to leave.
//!
//! This is the crate's only `unsafe`: the state lives in an `UnsafeCell` that
//! only the holder of the turn touches.
#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use topos_runtime::turns::DeviceTurn;

const BUSY: usize = 1;
const ONE: usize = 2;

/// A value reachable only by the holder of the turn.
pub(crate) struct Turn<T> {
    state: AtomicUsize,
    /// Token of the thread holding the turn (0 when free), for re-entrancy
    /// detection.
    owner: AtomicUsize,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is only reached through a `Held`, and at most one `Held`
// exists at a time (it is created only by setting `BUSY`, which excludes all
// others until it is cleared). The value moves between threads with the turn,
// hence `T: Send`.
unsafe impl<T: Send> Sync for Turn<T> {}

thread_local! {
    static TOKEN: u8 = const { 0 };
}

/// A per-thread token: the address of a thread-local.
#[inline]
pub(crate) fn thread_token() -> usize {
    TOKEN.with(|t| t as *const u8 as usize)
}

impl<T> Turn<T> {
    pub(crate) fn new(value: T) -> Self {
        Turn { state: AtomicUsize::new(0), owner: AtomicUsize::new(0), value: UnsafeCell::new(value) }
    }

    fn held(&self) -> Held<'_, T> {
        self.owner.store(thread_token(), Ordering::Relaxed);
        Held { turn: self, marker: DeviceTurn::enter() }
    }

    /// Takes the turn if it is free and nothing is queued (the fast path).
    #[inline]
    pub(crate) fn try_enter_idle(&self) -> Option<Held<'_, T>> {
        self.state.compare_exchange(0, BUSY, Ordering::Acquire, Ordering::Relaxed).ok().map(|_| self.held())
    }

    /// Takes the turn if it is free (messages may be queued).
    pub(crate) fn try_enter(&self) -> Option<Held<'_, T>> {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & BUSY != 0 {
                return None;
            }
            match self.state.compare_exchange_weak(s, s | BUSY, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Some(self.held()),
                Err(now) => s = now,
            }
        }
    }

    /// Counts one sent message; true if the turn was free at that moment
    /// (the caller must then try to take it and drain).
    pub(crate) fn add_pending(&self) -> bool {
        self.state.fetch_add(ONE, Ordering::AcqRel) & BUSY == 0
    }

    /// Messages counted as waiting in the mailbox.
    pub(crate) fn queued(&self) -> usize {
        self.state.load(Ordering::Relaxed) / ONE
    }

    /// Whether this thread holds the turn.
    pub(crate) fn held_by_me(&self) -> bool {
        self.state.load(Ordering::Relaxed) & BUSY != 0 && self.owner.load(Ordering::Relaxed) == thread_token()
    }

    /// Exclusive access without the turn, for the last owner.
    pub(crate) fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }
}

/// Proof of holding the turn; gives access to the value. It marks the
/// thread as holding a device turn (`topos_runtime::turns`) for its whole
/// life, so the thread's topology operations fail fast instead of waiting
/// and work deferred with `defer_until_no_turn` waits for the release.
pub(crate) struct Held<'a, T> {
    turn: &'a Turn<T>,
    marker: DeviceTurn,
}

impl<T> Held<'_, T> {
    /// Messages are waiting.
    #[inline]
    pub(crate) fn pending(&self) -> bool {
        self.turn.state.load(Ordering::Acquire) >= ONE
    }

    /// Accounts for one message taken from the mailbox.
    pub(crate) fn take_pending(&self) {
        self.turn.state.fetch_sub(ONE, Ordering::AcqRel);
    }

    /// Gives the turn back if nothing is queued; otherwise keeps it (the
    /// caller drains and tries again). On success it returns the thread's
    /// turn marker: dropping it (once the caller is done) runs the thread's
    /// deferred work if this was the last turn it held. The marker outlives
    /// the release so that the deferred work never runs while the turn is
    /// still taken: it may well access this very device.
    #[inline]
    pub(crate) fn try_release(self) -> Result<DeviceTurn, Self> {
        self.turn.owner.store(0, Ordering::Relaxed);
        match self.turn.state.compare_exchange(BUSY, 0, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => Ok(self.marker),
            Err(_) => {
                self.turn.owner.store(thread_token(), Ordering::Relaxed);
                Err(self)
            }
        }
    }
}

impl<T> std::ops::Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a `Held` exists only while `BUSY` is set by its creator,
        // which excludes every other access to `value` (see `Sync`).
        unsafe { &*self.turn.value.get() }
    }
}

impl<T> std::ops::DerefMut for Held<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes the borrow unique.
        unsafe { &mut *self.turn.value.get() }
    }
}
