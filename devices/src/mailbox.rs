//! An actor's mailbox: a FIFO queue with a bounded number of *slots*.
//!
//! A sender that may wait takes a slot before it sends and waits while all
//! are taken: a guest that floods a slow device is slowed down to the
//! device's pace instead of growing the queue without limit. A sender that
//! must not wait — a thread that holds a device turn (it never blocks, see
//! `topos_runtime::turns`) — sends without a slot; what such senders post is
//! bounded by their own handlers, not by the guest. Receiving a message
//! frees its slot.
//!
//! `slots` = `ROOM_WANTED` bit | (slots taken × `ONE_SLOT`). A sender that
//! finds no slot sets `ROOM_WANTED` and checks again, both under the `room`
//! lock, then sleeps on `freed`. A receiver frees a slot with one atomic
//! subtraction; only if that subtraction saw `ROOM_WANTED` does it take the
//! lock, clear the bit and wake the sleepers. Both sides meet on the same
//! atomic word, so either the receiver sees the bit or the sender sees the
//! freed slot: no wake-up is lost, and the uncontended receive takes no
//! lock.
//!
//! Counting messages for the turn protocol (who drains, see `turn.rs`) is
//! not the mailbox's business: the queue only carries them.

use crate::sync::{AtomicUsize, Condvar, Mutex, Ordering, Queue};
use std::num::NonZeroUsize;

const ROOM_WANTED: usize = 1;
const ONE_SLOT: usize = 2;

/// A message and whether it holds a slot.
struct Letter<M> {
    mail: M,
    slotted: bool,
}

/// See the [module](self) documentation.
pub(crate) struct Mailbox<M> {
    queue: Queue<Letter<M>>,
    slots: AtomicUsize,
    capacity: usize,
    room: Mutex<()>,
    freed: Condvar,
}

impl<M> Mailbox<M> {
    /// An empty mailbox with `capacity` slots.
    pub(crate) fn new(capacity: NonZeroUsize) -> Self {
        Mailbox {
            queue: Queue::new(),
            slots: AtomicUsize::new(0),
            capacity: capacity.get(),
            room: Mutex::new(()),
            freed: Condvar::new(),
        }
    }

    /// Sends `mail` in a slot, waiting for one while all are taken. Only for
    /// callers that may wait.
    pub(crate) fn send_waiting(&self, mail: M) {
        self.take_slot();
        self.queue.push(Letter { mail, slotted: true });
    }

    /// Sends `mail` without a slot, for callers that must not wait.
    pub(crate) fn send_unbounded(&self, mail: M) {
        self.queue.push(Letter { mail, slotted: false });
    }

    /// Takes the oldest message and frees its slot, calling `taken` in
    /// between: whoever counts the queued messages uncounts this one before
    /// a sender can reuse its slot, so the count never exceeds the slots.
    #[inline]
    pub(crate) fn recv(&self, taken: impl FnOnce()) -> Option<M> {
        let letter = self.queue.pop()?;
        taken();
        if letter.slotted {
            self.free_slot();
        }
        Some(letter.mail)
    }

    fn take_slot(&self) {
        let mut s = self.slots.load(Ordering::Relaxed);
        loop {
            if s / ONE_SLOT < self.capacity {
                match self.slots.compare_exchange_weak(s, s + ONE_SLOT, Ordering::AcqRel, Ordering::Relaxed) {
                    Ok(_) => return,
                    Err(now) => {
                        s = now;
                        continue;
                    }
                }
            }
            // Full: say so, then sleep unless a slot was freed meanwhile.
            let room = self.room.lock();
            s = self.slots.fetch_or(ROOM_WANTED, Ordering::AcqRel);
            if s / ONE_SLOT < self.capacity {
                continue;
            }
            drop(self.freed.wait(room));
            s = self.slots.load(Ordering::Relaxed);
        }
    }

    fn free_slot(&self) {
        let before = self.slots.fetch_sub(ONE_SLOT, Ordering::AcqRel);
        if before & ROOM_WANTED != 0 {
            let _room = self.room.lock();
            self.slots.fetch_and(!ROOM_WANTED, Ordering::AcqRel);
            self.freed.notify_all();
        }
    }
}
