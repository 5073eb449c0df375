//! Transactions: the topology's *turn* and the intent a transaction records.
//!
//! The actor's state is only ever touched by the thread that holds the
//! topology's turn. A transaction takes the turn at its outermost `begin`
//! and gives it back after its outermost `commit` (see `commit.rs`); a
//! single mutator outside a transaction takes it for just that change.
//! Other threads wait for the turn, so the result of concurrent transactions
//! is always that of some serial order. Running the actor's work on the
//! calling thread (rather than handing each mutation to a dedicated thread)
//! keeps misuse errors synchronous and costs no thread hop; the
//! serialisation is the same.
//!
//! Mutators do not render: they change the region tree and record their
//! [`Intent`] — whether a re-render or an ioeventfd update is due, what they
//! damaged, which coalesced ranges changed — and the outermost commit
//! consumes it.
//!
//! **An abandoned transaction** (its thread ended, or unwound out of every
//! frame, inside `begin` … `commit`) does not wedge the topology: the
//! thread's exit releases a token that marks the turn abandoned and wakes
//! the waiters; the next thread that needs the turn commits what the
//! transaction changed and reports a
//! [`Fault::TransactionAbandoned`](crate::Fault::TransactionAbandoned).
//!
//! Readers never take the turn: guest accesses load the published views.

use crate::coalesced::CoalescedChange;
use crate::error::{Error, Result};
use crate::fault::Fault;
use crate::region::MemoryRegion;
use crate::sync::{current_thread_id, Condvar, Mutex, ThreadId, Weak};
use crate::topology::{TopoInner, Topology};
use crate::types::HwAddr;
use std::cell::RefCell;

/// What a mutation damaged: where the next commit must re-render.
pub(crate) enum Damage {
    /// A child of `parent` changed at `[addr, addr + size)` of the parent:
    /// re-render that window wherever the parent is rendered.
    Child { parent: MemoryRegion, addr: HwAddr, size: u128 },
    /// Something about the region itself changed: re-render wherever it is
    /// rendered (everything, for a view rooted at it).
    Region(MemoryRegion),
    /// The region got a new address or container: views rooted at it move.
    RootPlaced(MemoryRegion),
    /// The region's ioeventfds changed: recompute them where it is rendered.
    Eventfds(MemoryRegion),
    /// Every view (dirty-log masks changed).
    All,
}

/// What the open transaction has done, for its commit.
#[derive(Default)]
pub(crate) struct Intent {
    /// The views must be rendered again.
    pub(crate) topology: bool,
    /// The ioeventfd sets must be recomputed.
    pub(crate) ioeventfds: bool,
    pub(crate) damage: Vec<Damage>,
    pub(crate) coalesced: Vec<CoalescedChange>,
}

impl Intent {
    /// A change that rendering sees (when `yes`).
    pub(crate) fn changed(&mut self, yes: bool) {
        self.topology |= yes;
    }

    /// A change of ioeventfds (when `yes`).
    pub(crate) fn eventfds_changed(&mut self, yes: bool) {
        self.ioeventfds |= yes;
    }

    /// Where the change may show.
    pub(crate) fn damage(&mut self, d: Damage) {
        self.damage.push(d);
    }
}

#[derive(Default)]
struct TurnState {
    owner: Option<ThreadId>,
    depth: u32,
    committing: bool,
    /// The owner went away with the transaction open.
    abandoned: bool,
}

/// Who may touch the actor's state: one thread at a time, re-entrantly.
pub(crate) struct Turn {
    m: Mutex<TurnState>,
    cv: Condvar,
}

impl Turn {
    pub(crate) fn new() -> Turn {
        Turn { m: Mutex::new(TurnState::default()), cv: Condvar::new() }
    }

    /// Marks the turn abandoned if `owner` still holds it.
    fn abandon(&self, owner: ThreadId) {
        let mut t = self.m.lock();
        if t.owner == Some(owner) {
            t.abandoned = true;
            drop(t);
            self.cv.notify_all();
        }
    }
}

/// The topologies whose turn this thread holds; dropped when the thread
/// exits, which marks those turns abandoned.
struct HeldTurns {
    thread: Option<ThreadId>,
    topologies: Vec<Weak<TopoInner>>,
}

impl Drop for HeldTurns {
    fn drop(&mut self) {
        let Some(me) = self.thread else { return };
        for t in self.topologies.drain(..) {
            if let Some(inner) = t.upgrade() {
                inner.turn().abandon(me);
            }
        }
    }
}

// loom's `thread_local!` has no `const` form.
#[allow(clippy::missing_const_for_thread_local)]
mod held {
    use super::{HeldTurns, RefCell};
    crate::sync::thread_local! {
        pub(super) static HELD: RefCell<HeldTurns> = RefCell::new(HeldTurns { thread: None, topologies: Vec::new() });
    }
}
use held::HELD;

/// Releases the turn if a transaction body unwinds.
struct TurnGuard<'a> {
    topo: &'a Topology,
    armed: bool,
}

impl Drop for TurnGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Failures are recorded as faults; an unwinding thread has no
            // one else to tell.
            let _ = self.topo.commit();
        }
    }
}

impl Topology {
    fn enter(&self, mutation: bool) -> Result<()> {
        if crate::turns::holds_device_turn() {
            return Err(Error::InsideDeviceTurn);
        }
        let me = current_thread_id();
        let turn = self.inner().turn();
        let mut t = turn.m.lock();
        if t.owner == Some(me) {
            if t.committing && mutation {
                return Err(Error::MutationDuringCommit);
            }
            t.depth += 1;
            return Ok(());
        }
        while t.owner.is_some() && !t.abandoned {
            t = turn.cv.wait(t);
        }
        let recovering = std::mem::take(&mut t.abandoned);
        t.owner = Some(me);
        t.depth = 1;
        t.committing = recovering;
        drop(t);
        crate::turns::topology_turn_taken();
        let _ = HELD.try_with(|h| {
            let mut h = h.borrow_mut();
            h.thread = Some(me);
            h.topologies.push(self.downgrade());
        });
        if recovering {
            // Complete the abandoned transaction before our own work.
            let failures = self.run_commit();
            turn.m.lock().committing = false;
            self.fault_log().report(Fault::TransactionAbandoned { generation: self.generation() });
            let _ = self.absorb_failures(failures);
        }
        Ok(())
    }

    fn leave(&self) -> Result<bool> {
        let me = current_thread_id();
        let mut t = self.inner().turn().m.lock();
        if t.owner != Some(me) || t.depth == 0 {
            return Err(Error::NotInTransaction);
        }
        t.depth -= 1;
        if t.depth > 0 {
            return Ok(false);
        }
        if t.committing {
            // The outermost level of a query made from a listener callback.
            t.depth = 0;
            return Ok(false);
        }
        t.committing = true;
        Ok(true)
    }

    fn release(&self) {
        let turn = self.inner().turn();
        let mut t = turn.m.lock();
        t.committing = false;
        t.owner = None;
        t.depth = 0;
        drop(t);
        let me = self.downgrade();
        let _ = HELD.try_with(|h| h.borrow_mut().topologies.retain(|w| !w.ptr_eq(&me)));
        turn.cv.notify_all();
        crate::turns::topology_turn_released();
    }

    fn in_commit(&self) -> bool {
        let t = self.inner().turn().m.lock();
        t.owner == Some(current_thread_id()) && t.committing
    }

    /// `memory_region_transaction_begin`: changes made until the matching
    /// outermost [`commit`](Self::commit) become visible together. Nests.
    /// Flushes the coalesced-MMIO ring first, as QEMU does. Blocks while
    /// another thread's transaction is open; fails with
    /// [`Error::InsideDeviceTurn`] on a thread that holds a device's turn.
    ///
    /// Prefer [`transaction`](Self::transaction), which commits even if its
    /// body panics. A thread that exits with a transaction open does not
    /// wedge the topology: the next thread that needs the turn commits what
    /// it changed and reports a
    /// [`Fault::TransactionAbandoned`](crate::Fault::TransactionAbandoned).
    pub fn begin(&self) -> Result<()> {
        if !self.in_commit() {
            self.flush_coalesced_mmio();
        }
        self.enter(true)
    }

    /// `memory_region_transaction_commit`: ends one level; the outermost
    /// level renders, diffs, runs listeners and publishes. Returns
    /// [`Error::ListenerFailed`] if a listener failed: the commit still
    /// completed (see [`MemoryListener`](crate::MemoryListener)).
    pub fn commit(&self) -> Result<()> {
        if self.leave()? {
            let failures = self.run_commit();
            self.release();
            self.absorb_failures(failures)?;
        }
        Ok(())
    }

    /// Runs `f` inside one transaction (begin, `f`, commit), committing even
    /// if `f` panics.
    pub fn transaction<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        self.begin()?;
        let mut guard = TurnGuard { topo: self, armed: true };
        let r = f();
        guard.armed = false;
        self.commit()?;
        Ok(r)
    }

    /// One mutation: nested in the caller's transaction or its own.
    pub(crate) fn with_mutation<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.begin()?;
        let mut guard = TurnGuard { topo: self, armed: true };
        let r = f();
        guard.armed = false;
        let c = self.commit();
        let r = r?;
        c?;
        Ok(r)
    }

    /// A consistent read of actor state (waits for other threads' open
    /// transactions; allowed from listener callbacks).
    pub(crate) fn with_query<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        self.enter(false)?;
        let mut guard = TurnGuard { topo: self, armed: true };
        let r = f();
        guard.armed = false;
        self.commit()?;
        Ok(r)
    }

    /// Records what a mutation did, for the commit (turn holder only).
    pub(crate) fn record(&self, f: impl FnOnce(&mut Intent)) {
        f(&mut self.state().intent);
    }
}
