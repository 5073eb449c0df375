//! One-shot reply channels: how a caller that waits for an actor (a read, a
//! non-posted write, `ActorHandle::with`) gets its answer.
//!
//! The receiver waits on a condition variable until the value arrives or
//! the sender is dropped unanswered (the message was dropped with a failed
//! or stopping actor), so a waiting caller never hangs on a lost message.
//! Built on the [`sync`](crate::sync) shim, so loom checks it with the rest
//! of the harness.

use crate::sync::{Arc, Condvar, Mutex};

struct Slot<T> {
    value: Option<T>,
    /// The sender is gone (with or without an answer).
    closed: bool,
}

struct Chan<T> {
    slot: Mutex<Slot<T>>,
    ready: Condvar,
}

/// The answering end; dropping it unanswered wakes the receiver with
/// [`Unanswered`].
pub(crate) struct ReplyTx<T>(Arc<Chan<T>>);

/// The waiting end.
pub(crate) struct ReplyRx<T>(Arc<Chan<T>>);

/// The sender was dropped without answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unanswered;

/// A new channel.
pub(crate) fn channel<T>() -> (ReplyTx<T>, ReplyRx<T>) {
    let chan = Arc::new(Chan { slot: Mutex::new(Slot { value: None, closed: false }), ready: Condvar::new() });
    (ReplyTx(chan.clone()), ReplyRx(chan))
}

impl<T> ReplyTx<T> {
    /// Answers (the receiver may have given up: then the value is dropped).
    pub(crate) fn send(self, value: T) {
        self.0.slot.lock().value = Some(value);
        // `Drop` marks the channel closed and wakes the receiver.
    }
}

impl<T> Drop for ReplyTx<T> {
    fn drop(&mut self) {
        self.0.slot.lock().closed = true;
        self.0.ready.notify_all();
    }
}

impl<T> ReplyRx<T> {
    /// Waits for the answer.
    pub(crate) fn recv(self) -> Result<T, Unanswered> {
        let mut slot = self.0.slot.lock();
        while !slot.closed {
            slot = self.0.ready.wait(slot);
        }
        slot.value.take().ok_or(Unanswered)
    }
}
