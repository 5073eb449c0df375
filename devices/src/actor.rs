//! The device actor harness.
//!
//! A device model implements [`Device`] over state it owns. The harness runs
//! it as an actor: accesses become messages in a bounded mailbox, processed
//! one at a time in FIFO order by whoever holds the actor's *turn*. There is
//! no dedicated thread:
//!
//! * **Inline fast path.** An access first tries to take the turn. If the
//!   actor is idle it gets it, drains the mailbox (so earlier posted writes
//!   are applied first) and runs the access on the calling thread, with
//!   exclusive ownership of the device state. No thread hop.
//! * **Busy actor.** Otherwise a write is posted and the caller returns at
//!   once (unless its region is [non-posted](WritePolicy::NonPosted)); a
//!   read (or [`ActorHandle::with`]) is posted and the caller waits for the
//!   reply. The thread holding the turn drains the mailbox before it gives
//!   the turn back, and re-checks it afterwards, so no message is ever left
//!   behind.
//!
//! Either way the device sees accesses one at a time, in the order they were
//! issued per caller, and a read sees every write the device received before
//! it. Devices never share a lock with each other: two vCPUs on two devices
//! run in parallel.
//!
//! # The rule: a thread holding a device turn never blocks
//!
//! A thread that runs a handler holds the device's turn (it is marked as
//! such in `topos_runtime::turns`), and it never waits — not for another
//! actor, not for the topology's turn — because the thread it would wait
//! for may be waiting for this device. So, from inside a handler:
//!
//! * a synchronous access to a busy actor (a read, [`ActorHandle::with`])
//!   is refused: reads answer `(0, `[`MemTxResult::AccessError`]`)`, calls
//!   [`ActorError::WouldBlock`], as a re-entrant access does; writes are
//!   posted;
//! * topology operations return `Error::InsideDeviceTurn`;
//! * work that needs to wait — a BAR remap, a romd switch, a DMA through a
//!   bus-master space — is deferred with [`DeviceCtx::defer`] and runs once
//!   the thread holds no turn at all. Its results come back to the device
//!   through its mailbox ([`ActorHandle::post`], [`DeviceCtx::handle`]).
//!
//! # Bounded mailboxes, bounded work for others
//!
//! A mailbox holds at most [`ActorOptions::capacity`] messages from senders
//! that may wait: a sender that holds no turn and finds it full waits for
//! room, so a guest flooding a slow device is slowed down to the device's
//! pace, never allowed to grow memory without limit. A sender that holds a
//! turn never waits; it may exceed the bound, since what it posts is bounded
//! by its own handler.
//!
//! A thread that takes the turn handles at most [`ActorOptions::budget`]
//! queued messages for others in that turn. Beyond it, the turn itself —
//! still taken, so nothing can slip in — goes with the remaining backlog to
//! a drainer on the device runtime's blocking pool, which drains it by
//! rounds of the same budget; the thread's own access then queues behind
//! the backlog like any other (a write is posted, a read waits; from inside
//! a handler, where it cannot wait, a read is refused as for a busy actor).
//! No message is stranded, and no caller drains forever for others.
//! [`ActorHandle::stats`] counts what happened, so that tests assert bounds
//! by counting, never by timing.
//!
//! Wake-ups other than guest accesses (ioeventfds, timers) come from a small
//! tokio runtime ([`DeviceRuntime`]) and enter the same mailbox from its
//! blocking pool (see [`crate::wakeups`]).
//!
//! **Lifetime.** Regions (and the FlatViews that name them) hold the actor.
//! When the last of them goes, the actor drains its mailbox (no posted write
//! is lost), tells the device it was unplugged, stops its ioeventfd and
//! timer tasks, and is freed. [`ActorHandle`]s do not keep it alive.
//!
//! **Failure.** A device that panics is marked failed and reported through
//! `tracing`; from then on it answers like an unassigned address with an
//! error result ([`MemTxResult::AccessError`]) and is never called again.
//! Nothing else is affected.

use crate::irq::IrqLine;
use crate::mailbox::Mailbox;
use crate::reply::{self, ReplyTx};
use crate::sync::{Arc, AtomicBool, AtomicUsize, Ordering, Weak};
use crate::turn::{HandOff, Held, Turn};
use crate::wakeups::{self, DeviceRuntime, Msg, Tasks};
use std::cell::RefCell;
use std::num::NonZeroUsize;
use std::time::Duration;
use topos_runtime::turns::{self, DeviceTurn};
use topos_runtime::{EventNotifier, HwAddr, MemTxResult, MemoryRegionOps};

/// A device model run by the harness.
///
/// `region` is the index of the device's region the access hit (its BARs or
/// port ranges, numbered as the device chooses when it makes them); `addr` is
/// relative to that region. Values are in the device's byte order, as for
/// [`MemoryRegionOps`].
///
/// Handlers run holding the device's turn: they must not block (see the
/// [module](self) documentation).
#[allow(unused_variables)]
pub trait Device: Send + 'static {
    /// A guest read.
    fn read(&mut self, ctx: &mut DeviceCtx<'_>, region: usize, addr: HwAddr, size: u32) -> u64;
    /// A guest write.
    fn write(&mut self, ctx: &mut DeviceCtx<'_>, region: usize, addr: HwAddr, value: u64, size: u32);
    /// The ioeventfd registered with index `index` fired.
    fn eventfd(&mut self, ctx: &mut DeviceCtx<'_>, index: usize) {}
    /// A timer set with [`DeviceCtx::set_timer`] expired.
    fn timer(&mut self, ctx: &mut DeviceCtx<'_>, token: u64) {}
    /// The last region referring to the device is gone; the mailbox has
    /// been drained. Called once, as the actor stops.
    fn unplugged(&mut self, ctx: &mut DeviceCtx<'_>) {}
}

/// Tunables of an actor's mailbox (see the [module](self) documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActorOptions {
    /// Messages the mailbox holds from senders that may wait.
    pub capacity: NonZeroUsize,
    /// Queued messages a thread handles for others in one turn before it
    /// hands the backlog to a drainer.
    pub budget: NonZeroUsize,
}

impl ActorOptions {
    /// The default capacity.
    pub const DEFAULT_CAPACITY: NonZeroUsize = NonZeroUsize::new(256).unwrap();
    /// The default budget.
    pub const DEFAULT_BUDGET: NonZeroUsize = NonZeroUsize::new(64).unwrap();
}

impl Default for ActorOptions {
    /// 256 messages, 64 of them handled per turn.
    fn default() -> Self {
        ActorOptions { capacity: Self::DEFAULT_CAPACITY, budget: Self::DEFAULT_BUDGET }
    }
}

/// Work a handler deferred (see [`DeviceCtx::defer`]).
type Deferred = Box<dyn FnOnce() + Send>;

/// What a device can do besides answering accesses.
pub struct DeviceCtx<'a> {
    shared: &'a Shared,
    /// Set while the handler serves a caller that waits for it: its deferred
    /// work goes back to that caller instead of staying on this thread.
    collect: Option<&'a RefCell<Vec<Deferred>>>,
}

impl DeviceCtx<'_> {
    /// Interrupt line `i` of the device, if it has one.
    pub fn irq(&self, i: usize) -> Option<&IrqLine> {
        self.shared.irqs.get(i)
    }

    /// Calls [`Device::timer`] with `token` after `after` (from the device
    /// runtime). Timers of an unplugged device never fire.
    pub fn set_timer(&self, after: Duration, token: u64) {
        wakeups::set_timer(&self.shared.runtime, &self.shared.tasks, self.shared.me.clone(), after, token);
    }

    /// Runs `f` once the calling thread holds no turn at all — neither this
    /// device's, nor another device's it was called from, nor the
    /// topology's (see [`topos_runtime::turns::defer_until_no_turn`]).
    /// Use it for work that may block, which a thread holding a device turn
    /// must never do: changing the topology (a thread inside a transaction
    /// may be waiting for this device), or a synchronous access to another
    /// device.
    ///
    /// The work runs on the thread that made the access: when the handler
    /// serves a caller that waits for it (a read, a non-posted write, an
    /// [`ActorHandle::with`]) on another thread, the work is handed back to
    /// that caller and done before its access returns; otherwise it runs on
    /// the thread that ran the handler, before that thread's own access
    /// returns.
    pub fn defer(&self, f: impl FnOnce() + Send + 'static) {
        match self.collect {
            Some(c) => c.borrow_mut().push(Box::new(f)),
            None => turns::defer_until_no_turn(f),
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// A handle to this device's own actor, for work that runs outside the
    /// turn and comes back to the device ([`ActorHandle::post`]); `None` if
    /// `D` is not the device's type, or while the actor stops.
    pub fn handle<D: Device>(&self) -> Option<ActorHandle<D>> {
        let core = self.shared.me.upgrade()?.into_any().downcast::<Core<D>>().ok()?;
        Some(ActorHandle { core: Arc::downgrade(&core) })
    }

    /// The work deferred so far for a waiting caller.
    fn take_collected(&self) -> Vec<Deferred> {
        self.collect.map(|c| c.take()).unwrap_or_default()
    }
}

/// Runs work a handler deferred on behalf of the calling thread (see
/// [`DeviceCtx::defer`]): at once, or once the thread holds no turn.
fn run_handed_back(work: Vec<Deferred>) {
    for f in work {
        turns::defer_until_no_turn(f);
    }
}

/// How the writes to one of an actor's regions behave while the actor is
/// busy (an idle actor runs every access at once, on the caller's thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WritePolicy {
    /// The write is posted: the caller goes on at once; the device sees it
    /// in mailbox order (a later read from any thread sees it).
    #[default]
    Posted,
    /// The caller waits until the write was handled and the work its
    /// handler deferred is done, as for a read — for registers whose effects
    /// a guest expects once its store returns (a PCI configuration write
    /// that moves a BAR). A caller that holds a device turn cannot wait: its
    /// write is posted.
    NonPosted,
}

/// Why a call to an actor did not run.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum ActorError {
    /// The actor has stopped (no region refers to it any more).
    #[error("the device is gone")]
    Gone,
    /// The device panicked earlier and is failed.
    #[error("the device failed")]
    Failed,
    /// The device was called from inside its own handler.
    #[error("re-entrant access to the device")]
    Reentrant,
    /// The device is busy and the calling thread holds a device turn, so it
    /// may not wait for it (see the [module](self) documentation).
    #[error("the device is busy and the caller holds a device turn")]
    WouldBlock,
}

type Call<D> = Box<dyn FnOnce(&mut D, &mut DeviceCtx<'_>) + Send>;

/// The answer to a caller that waits: the result and the work the handler
/// deferred, for the caller to run.
type Reply<T> = ReplyTx<(T, Vec<Deferred>)>;

enum Mail<D> {
    /// A write; `done` is set when the writer waits for it.
    Write {
        region: usize,
        addr: HwAddr,
        value: u64,
        size: u32,
        done: Option<Reply<MemTxResult>>,
    },
    Read {
        region: usize,
        addr: HwAddr,
        size: u32,
        reply: Reply<(u64, MemTxResult)>,
    },
    /// A closure; with `collect`, it answers a waiting caller and takes the
    /// deferred work back itself (see [`DeviceCtx::take_collected`]).
    Call {
        f: Call<D>,
        collect: bool,
    },
    /// Under loom no timer or ioeventfd ever wakes an actor.
    #[cfg_attr(topos_loom, allow(dead_code))]
    Wake(Msg),
}

/// An actor without its device type: what wake-ups and
/// [`DeviceCtx::handle`] need.
pub(crate) trait AnyCore: Send + Sync + 'static {
    /// Delivers a wake-up (on a thread that may wait: never the async
    /// worker).
    #[cfg_attr(topos_loom, allow(dead_code))]
    fn wake(&self, msg: Msg);
    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

impl<D: Device> AnyCore for Core<D> {
    fn wake(&self, msg: Msg) {
        self.post(Mail::Wake(msg));
    }
    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// What handlers reach through their [`DeviceCtx`].
struct Shared {
    name: String,
    irqs: Vec<IrqLine>,
    runtime: DeviceRuntime,
    /// The actor itself (weak: the actor owns this).
    me: Weak<dyn AnyCore>,
    tasks: Tasks,
}

/// Counters behind [`ActorStats`].
#[derive(Default)]
struct Counters {
    max_queued: AtomicUsize,
    max_caller_drain: AtomicUsize,
    handoffs: AtomicUsize,
}

/// Messages a thread may still handle for others in its turn, and how many
/// it has.
struct Work {
    left: usize,
    done: usize,
    /// A drainer of the blocking pool (not a caller with an access of its
    /// own).
    drainer: bool,
}

struct Core<D: Device> {
    /// The device state, reachable only by the holder of the turn; the turn
    /// word also counts the messages waiting in the mailbox.
    turn: Turn<D>,
    mailbox: Mailbox<Mail<D>>,
    failed: AtomicBool,
    options: ActorOptions,
    counters: Counters,
    /// The actor itself, for the drainers it starts.
    me: Weak<Core<D>>,
    shared: Arc<Shared>,
}

impl<D: Device> Core<D> {
    fn handle_in(failed: &AtomicBool, shared: &Shared, dev: &mut D, mail: Mail<D>) {
        let run = |dev: &mut D, f: &mut dyn FnMut(&mut D, &mut DeviceCtx<'_>)| {
            Self::run_in(failed, shared, dev, None, f);
        };
        match mail {
            Mail::Write { region, addr, value, size, done: None } => {
                run(dev, &mut |d, ctx| d.write(ctx, region, addr, value, size));
            }
            Mail::Write { region, addr, value, size, done: Some(done) } => {
                let collected = RefCell::new(Vec::new());
                let r = Self::run_in(failed, shared, dev, Some(&collected), |d, ctx| {
                    d.write(ctx, region, addr, value, size)
                });
                let r = if r.is_some() { MemTxResult::Ok } else { MemTxResult::AccessError };
                done.send((r, collected.into_inner()));
            }
            Mail::Read { region, addr, size, reply } => {
                let collected = RefCell::new(Vec::new());
                let r = Self::run_in(failed, shared, dev, Some(&collected), |d, ctx| d.read(ctx, region, addr, size));
                let r = r.map_or((0, MemTxResult::AccessError), |v| (v, MemTxResult::Ok));
                reply.send((r, collected.into_inner()));
            }
            Mail::Call { f, collect } => {
                let collected = RefCell::new(Vec::new());
                Self::run_in(failed, shared, dev, collect.then_some(&collected), f);
            }
            Mail::Wake(Msg::Timer(t)) => {
                run(dev, &mut |d, ctx| d.timer(ctx, t));
            }
            Mail::Wake(Msg::Eventfd(i)) => {
                run(dev, &mut |d, ctx| d.eventfd(ctx, i));
            }
        }
    }

    /// Calls into the device with the turn held, containing a panic.
    #[inline]
    fn run<R>(&self, held: &mut Held<'_, D>, f: impl FnOnce(&mut D, &mut DeviceCtx<'_>) -> R) -> Option<R> {
        held.with_mut(|dev| Self::run_in(&self.failed, &self.shared, dev, None, f))
    }

    #[inline]
    fn run_in<R>(
        failed: &AtomicBool,
        shared: &Shared,
        dev: &mut D,
        collect: Option<&RefCell<Vec<Deferred>>>,
        f: impl FnOnce(&mut D, &mut DeviceCtx<'_>) -> R,
    ) -> Option<R> {
        if failed.load(Ordering::Acquire) {
            return None;
        }
        let mut ctx = DeviceCtx { shared, collect };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(dev, &mut ctx))) {
            Ok(v) => Some(v),
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                tracing::error!(device = %shared.name, panic = %msg, "device failed; it now answers as unassigned");
                failed.store(true, Ordering::Release);
                None
            }
        }
    }

    /// A caller's allowance of work for others.
    fn caller_work(&self) -> Work {
        Work { left: self.options.budget.get(), done: 0, drainer: false }
    }

    /// Handles queued messages with the turn held, while any are counted and
    /// the budget lasts.
    fn drain(&self, held: &mut Held<'_, D>, work: &mut Work) {
        while work.left > 0 && held.pending() {
            // A counted message was sent before it was counted.
            let Some(mail) = self.mailbox.recv(|| held.take_pending()) else { break };
            work.left -= 1;
            work.done += 1;
            held.with_mut(|dev| Self::handle_in(&self.failed, &self.shared, dev, mail));
        }
    }

    /// Gives the turn back, draining whatever was queued meanwhile; once the
    /// budget is spent, hands the turn and the backlog to a drainer. Then,
    /// if the thread holds no other turn, runs its deferred work.
    #[inline]
    fn finish(&self, held: Held<'_, D>, work: Work) {
        match held.try_release() {
            Ok(marker) => {
                if work.done > 0 {
                    self.note(&work);
                }
                drop(marker);
            }
            Err(held) => self.finish_busy(held, work),
        }
    }

    /// [`finish`](Self::finish) when messages were queued meanwhile.
    #[cold]
    fn finish_busy(&self, mut held: Held<'_, D>, mut work: Work) {
        loop {
            if work.left == 0 {
                self.note(&work);
                self.hand_off(held);
                return;
            }
            self.drain(&mut held, &mut work);
            match held.try_release() {
                Ok(marker) => {
                    self.note(&work);
                    drop(marker);
                    return;
                }
                Err(h) => held = h,
            }
        }
    }

    fn note(&self, work: &Work) {
        if !work.drainer && work.done > 0 {
            self.counters.max_caller_drain.fetch_max(work.done, Ordering::Relaxed);
        }
    }

    /// Passes the turn, still taken, to a drainer on the blocking pool.
    fn hand_off(&self, mut held: Held<'_, D>) {
        let Some(core) = self.me.upgrade() else {
            // Unreachable: whoever calls into the actor holds a reference.
            // Drain here rather than strand anything.
            let mut work = Work { left: usize::MAX, done: 0, drainer: true };
            self.drain(&mut held, &mut work);
            return self.finish(held, work);
        };
        self.counters.handoffs.fetch_add(1, Ordering::Relaxed);
        let (handoff, marker) = held.hand_off();
        let drainer = Drainer { core, handoff: Some(handoff) };
        self.shared.runtime.spawn_blocking(move || drainer.run());
        // Only now: the marker's drop may run deferred work that waits for
        // this very device, which needs the drainer on its way.
        drop(marker);
    }

    /// Takes the turn for an access of the calling thread, with its
    /// allowance of work for others: at once if idle, after draining the
    /// queue if that fits in the budget. `None` if another thread holds the
    /// turn, or if the backlog outlasted the budget (the turn then went to a
    /// drainer): either way the access must queue behind.
    #[inline]
    fn enter(&self) -> Option<(Held<'_, D>, Work)> {
        if let Some(h) = self.turn.try_enter_idle() {
            return Some((h, self.caller_work()));
        }
        let mut h = self.turn.try_enter()?;
        let mut work = self.caller_work();
        self.drain(&mut h, &mut work);
        if h.pending() {
            self.note(&work);
            self.hand_off(h);
            return None;
        }
        Some((h, work))
    }

    /// Queues `mail`. A caller that holds no turn waits for room; if the turn
    /// was free, the caller takes it and drains (within its budget).
    fn post(&self, mail: Mail<D>) {
        if turns::holds_device_turn() {
            self.mailbox.send_unbounded(mail);
        } else {
            self.mailbox.send_waiting(mail);
        }
        let counted = self.turn.add_pending();
        self.counters.max_queued.fetch_max(counted.queued, Ordering::Relaxed);
        if counted.was_free {
            if let Some(mut h) = self.turn.try_enter() {
                let mut work = self.caller_work();
                self.drain(&mut h, &mut work);
                self.finish(h, work);
            }
        }
    }

    /// Why a caller that found the actor busy may not wait for it, if so.
    fn refuse_wait(&self, what: &str) -> Option<ActorError> {
        if self.turn.held_by_me() {
            tracing::debug!(device = %self.shared.name, "re-entrant {what} refused");
            Some(ActorError::Reentrant)
        } else if turns::holds_device_turn() {
            tracing::debug!(device = %self.shared.name, "{what} of a busy device from inside a device turn refused");
            Some(ActorError::WouldBlock)
        } else {
            None
        }
    }

    #[inline]
    fn read(&self, region: usize, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        if self.failed.load(Ordering::Acquire) {
            return (0, MemTxResult::AccessError);
        }
        if let Some((mut h, work)) = self.enter() {
            let r = self.run(&mut h, |d, ctx| d.read(ctx, region, addr, size));
            self.finish(h, work);
            return r.map_or((0, MemTxResult::AccessError), |v| (v, MemTxResult::Ok));
        }
        if self.refuse_wait("read").is_some() {
            return (0, MemTxResult::AccessError);
        }
        let (tx, rx) = reply::channel();
        self.post(Mail::Read { region, addr, size, reply: tx });
        match rx.recv() {
            Ok((r, work)) => {
                run_handed_back(work);
                r
            }
            Err(_) => (0, MemTxResult::AccessError),
        }
    }

    #[inline]
    fn write(&self, region: usize, addr: HwAddr, value: u64, size: u32, policy: WritePolicy) -> MemTxResult {
        if self.failed.load(Ordering::Acquire) {
            return MemTxResult::AccessError;
        }
        if let Some((mut h, work)) = self.enter() {
            let r = self.run(&mut h, |d, ctx| d.write(ctx, region, addr, value, size));
            self.finish(h, work);
            return if r.is_some() { MemTxResult::Ok } else { MemTxResult::AccessError };
        }
        if self.turn.held_by_me() {
            tracing::debug!(device = %self.shared.name, "re-entrant write refused");
            return MemTxResult::AccessError;
        }
        if policy == WritePolicy::NonPosted {
            if !turns::holds_device_turn() {
                let (tx, rx) = reply::channel();
                self.post(Mail::Write { region, addr, value, size, done: Some(tx) });
                return match rx.recv() {
                    Ok((r, work)) => {
                        run_handed_back(work);
                        r
                    }
                    Err(_) => MemTxResult::AccessError,
                };
            }
            tracing::debug!(device = %self.shared.name, "non-posted write from inside a device turn is posted");
        }
        self.post(Mail::Write { region, addr, value, size, done: None });
        MemTxResult::Ok
    }
}

impl<D: Device> Drop for Core<D> {
    fn drop(&mut self) {
        // Last reference: nobody else can hold the turn (a drainer holds a
        // reference). Apply what is still queued, then say goodbye — marked
        // as holding a device turn, like any handler (this may run inside
        // another device's handler or a topology commit that dropped the
        // last view of the device).
        let _marker = DeviceTurn::enter();
        let Core { turn, mailbox, failed, shared, .. } = self;
        turn.with_exclusive(|dev| {
            while let Some(mail) = mailbox.recv(|| ()) {
                Self::handle_in(failed, shared, dev, mail);
            }
            Self::run_in(failed, shared, dev, None, |d, ctx| d.unplugged(ctx));
        });
        shared.tasks.abort_all();
        tracing::debug!(device = %shared.name, "device actor stopped");
    }
}

/// Drains an actor whose turn was handed off (see [`Core::hand_off`]).
struct Drainer<D: Device> {
    core: Arc<Core<D>>,
    handoff: Option<HandOff>,
}

impl<D: Device> Drainer<D> {
    fn run(mut self) {
        if let Some(handoff) = self.handoff.take() {
            self.drain(handoff, self.core.options.budget.get());
        }
    }

    /// Adopts the turn and drains a round of `budget` messages (handing off
    /// again beyond it).
    fn drain(&self, handoff: HandOff, budget: usize) {
        let core = &self.core;
        let mut held = core.turn.adopt(handoff);
        let mut work = Work { left: budget, done: 0, drainer: true };
        core.drain(&mut held, &mut work);
        core.finish(held, work);
    }
}

impl<D: Device> Drop for Drainer<D> {
    fn drop(&mut self) {
        // Dropped without running: the device runtime is shut down. The turn
        // is still taken; drain here, whatever it takes, rather than strand
        // the backlog.
        if let Some(handoff) = self.handoff.take() {
            tracing::warn!(device = %self.core.shared.name, "device runtime gone: draining on this thread");
            self.drain(handoff, usize::MAX);
        }
    }
}

/// The adapter from an actor to one of its regions' [`MemoryRegionOps`].
struct ActorOps<D: Device> {
    core: Arc<Core<D>>,
    region: usize,
    policy: WritePolicy,
}

impl<D: Device> MemoryRegionOps for ActorOps<D> {
    fn read(&self, addr: HwAddr, size: u32) -> u64 {
        self.core.read(self.region, addr, size).0
    }
    fn write(&self, addr: HwAddr, value: u64, size: u32) {
        let _ = self.core.write(self.region, addr, value, size, self.policy);
    }
    fn read_with_result(&self, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        self.core.read(self.region, addr, size)
    }
    fn write_with_result(&self, addr: HwAddr, value: u64, size: u32) -> MemTxResult {
        self.core.write(self.region, addr, value, size, self.policy)
    }
}

/// A newly spawned actor. Use [`ops`](Self::ops) to make its regions; once
/// this and every region are dropped, the actor stops.
pub struct Spawned<D: Device> {
    core: Arc<Core<D>>,
}

impl<D: Device> Spawned<D> {
    /// Spawns `device` as an actor named `name` with interrupt lines `irqs`
    /// and the default [`ActorOptions`].
    pub fn new(name: &str, device: D, irqs: Vec<IrqLine>, runtime: &DeviceRuntime) -> Spawned<D> {
        Spawned::with_options(name, device, irqs, runtime, ActorOptions::default())
    }

    /// Spawns `device` as an actor with the given mailbox `options`.
    pub fn with_options(
        name: &str,
        device: D,
        irqs: Vec<IrqLine>,
        runtime: &DeviceRuntime,
        options: ActorOptions,
    ) -> Spawned<D> {
        let core = Arc::new_cyclic(|me: &Weak<Core<D>>| {
            let shared = Arc::new(Shared {
                name: name.to_string(),
                irqs,
                runtime: runtime.clone(),
                me: me.clone(),
                tasks: Tasks::default(),
            });
            Core {
                turn: Turn::new(device),
                mailbox: Mailbox::new(options.capacity),
                failed: AtomicBool::new(false),
                options,
                counters: Counters::default(),
                me: me.clone(),
                shared,
            }
        });
        Spawned { core }
    }

    /// The ops for the device's region number `region`, with posted writes.
    pub fn ops(&self, region: usize) -> Arc<dyn MemoryRegionOps> {
        self.ops_with(region, WritePolicy::Posted)
    }

    /// The ops for the device's region number `region`, whose writes follow
    /// `policy` while the actor is busy.
    pub fn ops_with(&self, region: usize, policy: WritePolicy) -> Arc<dyn MemoryRegionOps> {
        Arc::new(ActorOps { core: self.core.clone(), region, policy })
    }

    /// A handle that does not keep the actor alive.
    pub fn handle(&self) -> ActorHandle<D> {
        ActorHandle { core: Arc::downgrade(&self.core) }
    }
}

/// Counters of an actor's mailbox (see [`ActorHandle::stats`]), for tests
/// and monitors: they let a test assert bounds by counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ActorStats {
    /// The options the actor was spawned with.
    pub options: ActorOptions,
    /// A thread holds the turn now (or it is in transit to a drainer).
    /// Not busy with messages queued would mean messages stranded.
    pub busy: bool,
    /// Messages waiting in the mailbox now.
    pub queued: usize,
    /// The most messages ever waiting at once.
    pub max_queued: usize,
    /// The most queued messages a caller (a thread with an access of its
    /// own, not a drainer) handled in one turn.
    pub max_caller_drain: usize,
    /// How many times a backlog was handed to a drainer.
    pub handoffs: usize,
}

/// A handle to an actor that does not keep it alive.
pub struct ActorHandle<D: Device> {
    core: Weak<Core<D>>,
}

impl<D: Device> Clone for ActorHandle<D> {
    fn clone(&self) -> Self {
        ActorHandle { core: self.core.clone() }
    }
}

impl<D: Device> std::fmt::Debug for ActorHandle<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.core.upgrade() {
            Some(c) => f.debug_struct("ActorHandle").field("device", &c.shared.name).finish(),
            None => f.write_str("ActorHandle(gone)"),
        }
    }
}

impl<D: Device> ActorHandle<D> {
    /// Runs `f` on the device with exclusive access, in mailbox order (after
    /// every access issued before it), and returns its result. From inside a
    /// handler, a busy actor answers [`ActorError::WouldBlock`] instead of
    /// being waited for.
    pub fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut D, &mut DeviceCtx<'_>) -> R + Send + 'static,
    ) -> Result<R, ActorError> {
        let core = self.core.upgrade().ok_or(ActorError::Gone)?;
        if core.failed.load(Ordering::Acquire) {
            return Err(ActorError::Failed);
        }
        if let Some((mut h, work)) = core.enter() {
            let r = core.run(&mut h, f);
            core.finish(h, work);
            return r.ok_or(ActorError::Failed);
        }
        if let Some(e) = core.refuse_wait("call") {
            return Err(e);
        }
        let (tx, rx) = reply::channel();
        let call: Call<D> = Box::new(move |d, ctx| {
            let r = f(d, ctx);
            tx.send((r, ctx.take_collected()));
        });
        core.post(Mail::Call { f: call, collect: true });
        drop(core);
        let (r, work) = rx.recv().map_err(|_| ActorError::Failed)?;
        run_handed_back(work);
        Ok(r)
    }

    /// Runs `f` on the device in mailbox order (after every access issued
    /// before it) without waiting for it: at once on this thread if the
    /// actor is idle, otherwise posted like a write. Work that left the
    /// device's turn (a DMA) reports back this way.
    pub fn post(&self, f: impl FnOnce(&mut D, &mut DeviceCtx<'_>) + Send + 'static) -> Result<(), ActorError> {
        let core = self.core.upgrade().ok_or(ActorError::Gone)?;
        if core.failed.load(Ordering::Acquire) {
            return Err(ActorError::Failed);
        }
        if let Some((mut h, work)) = core.enter() {
            let r = core.run(&mut h, f);
            core.finish(h, work);
            return r.ok_or(ActorError::Failed);
        }
        core.post(Mail::Call { f: Box::new(f), collect: false });
        Ok(())
    }

    /// Counters of the actor's mailbox.
    pub fn stats(&self) -> Result<ActorStats, ActorError> {
        let core = self.core.upgrade().ok_or(ActorError::Gone)?;
        let c = &core.counters;
        Ok(ActorStats {
            options: core.options,
            busy: core.turn.is_taken(),
            queued: core.turn.queued(),
            max_queued: c.max_queued.load(Ordering::Relaxed),
            max_caller_drain: c.max_caller_drain.load(Ordering::Relaxed),
            handoffs: c.handoffs.load(Ordering::Relaxed),
        })
    }

    /// Whether the actor is still running.
    pub fn is_alive(&self) -> bool {
        self.core.strong_count() > 0
    }

    /// Whether the device panicked.
    pub fn is_failed(&self) -> bool {
        self.core.upgrade().is_some_and(|c| c.failed.load(Ordering::Acquire))
    }

    /// Delivers `notifier`'s signals to [`Device::eventfd`] with `index`.
    pub fn watch_eventfd(&self, notifier: EventNotifier, index: usize) -> Result<(), ActorError> {
        let core = self.core.upgrade().ok_or(ActorError::Gone)?;
        let shared = &core.shared;
        wakeups::watch_eventfd(&shared.runtime, &shared.tasks, shared.me.clone(), notifier, index);
        Ok(())
    }
}
