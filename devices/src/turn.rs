//! The actor's *turn*: exclusive access to a device's state, combined in one
//! atomic word with the count of messages waiting in its mailbox.
//!
//! `state` = `BUSY` bit | (pending messages × `ONE`). Taking the turn is a
//! compare-and-swap that sets `BUSY`; giving it back is a compare-and-swap
//! from exactly `BUSY` to 0, which fails if a message was counted meanwhile,
//! so the holder drains it first. A sender counts its message after sending
//! it; if it finds the turn free at that moment, it takes the turn itself and
//! drains. Both sides meet on the same word, so no message is ever left
//! without a drainer, and the uncontended path costs what a mutex does: one
//! compare-and-swap to enter, one to leave.
//!
//! A holder that has done its share of work for others can *hand the turn
//! off* ([`Held::hand_off`]): `BUSY` stays set, so senders keep counting on
//! a holder, and a drainer thread adopts the turn ([`Turn::adopt`]) and goes
//! on draining.
//!
//! Every [`Held`] carries a [`DeviceTurn`] marker, so the holding thread is
//! known to hold a device turn (`topos_runtime::turns`): it then never
//! blocks, and the work it defers waits until it holds no turn.
//!
//! This is the crate's only `unsafe`: the state lives in an `UnsafeCell` that
//! only the holder of the turn touches.
#![allow(unsafe_code)]

use crate::sync::{AtomicUsize, Ordering, UnsafeCell};
use topos_runtime::turns::DeviceTurn;

const BUSY: usize = 1;
const ONE: usize = 2;

/// A value reachable only by the holder of the turn.
pub(crate) struct Turn<T> {
    state: AtomicUsize,
    /// Token of the thread holding the turn (0 when free or handed off), for
    /// re-entrancy detection.
    owner: AtomicUsize,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is only reached through a `Held` (or through `&mut Turn`),
// and at most one `Held` exists at a time: one is created only by setting
// `BUSY` (which excludes all others until it is cleared) or by adopting a
// `HandOff`, which exists only once its `Held` is gone and is consumed by
// the adoption. The value moves between threads with the turn, hence
// `T: Send`.
unsafe impl<T: Send> Sync for Turn<T> {}

#[cfg(not(topos_loom))]
mod token {
    std::thread_local! {
        /// Its address identifies the thread.
        pub(super) static TOKEN: u8 = const { 0 };
    }
}

// loom's `thread_local!` has no `const` form.
#[cfg(topos_loom)]
#[allow(clippy::missing_const_for_thread_local)]
mod token {
    loom::thread_local! {
        /// Its address identifies the thread.
        pub(super) static TOKEN: u8 = 0;
    }
}

/// A per-thread token: the address of a thread-local.
#[inline]
pub(crate) fn thread_token() -> usize {
    token::TOKEN.with(|t| t as *const u8 as usize)
}

/// What [`Turn::add_pending`] saw.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counted {
    /// The turn was free: the sender must take it and drain.
    pub(crate) was_free: bool,
    /// Messages counted, this one included.
    pub(crate) queued: usize,
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

    /// Counts one sent message.
    #[inline]
    pub(crate) fn add_pending(&self) -> Counted {
        let before = self.state.fetch_add(ONE, Ordering::AcqRel);
        Counted { was_free: before & BUSY == 0, queued: before / ONE + 1 }
    }

    /// Messages counted as waiting in the mailbox.
    pub(crate) fn queued(&self) -> usize {
        self.state.load(Ordering::Relaxed) / ONE
    }

    /// Whether some thread holds the turn (or it is in transit to a
    /// drainer).
    pub(crate) fn is_taken(&self) -> bool {
        self.state.load(Ordering::Relaxed) & BUSY != 0
    }

    /// Whether this thread holds the turn.
    pub(crate) fn held_by_me(&self) -> bool {
        self.state.load(Ordering::Relaxed) & BUSY != 0 && self.owner.load(Ordering::Relaxed) == thread_token()
    }

    /// Takes over a turn that was handed off. The hand-off travels to the
    /// adopting thread through the thread spawn, which orders everything the
    /// last holder did before the adoption.
    pub(crate) fn adopt(&self, handoff: HandOff) -> Held<'_, T> {
        debug_assert_eq!(handoff.turn, self as *const Self as usize, "a hand-off adopted by another turn");
        self.held()
    }

    /// Exclusive access without the turn, for the last owner.
    pub(crate) fn with_exclusive<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: `&mut self` excludes every `Held` (they borrow the turn).
        self.value.with_mut(|v| f(unsafe { &mut *v }))
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

/// A turn in transit between a holder that handed it off and the drainer
/// that adopts it (`BUSY` stays set meanwhile). It must be adopted: dropped,
/// it would leave the turn taken forever.
#[derive(Debug)]
pub(crate) struct HandOff {
    /// The address of the turn, checked by [`Turn::adopt`].
    turn: usize,
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

    /// Calls `f` with exclusive access to the value.
    #[inline]
    pub(crate) fn with_mut<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: a `Held` exists only while its creator holds the turn
        // (`BUSY` set, or adopted from a hand-off), which excludes every
        // other access to `value` (see `Sync`); `&mut self` makes this
        // borrow unique.
        self.turn.value.with_mut(|v| f(unsafe { &mut *v }))
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

    /// Hands the turn off without giving it back: `BUSY` stays set. Returns
    /// the hand-off for the drainer to adopt and this thread's turn marker,
    /// to drop only once the drainer is on its way (the marker's drop may
    /// run deferred work that waits for this device).
    pub(crate) fn hand_off(self) -> (HandOff, DeviceTurn) {
        self.turn.owner.store(0, Ordering::Relaxed);
        (HandOff { turn: self.turn as *const Turn<T> as usize }, self.marker)
    }
}
