//! The device actor harness.
//!
//! A device model implements [`Device`] over state it owns. The harness runs
//! it as an actor: accesses become messages in a `flume` mailbox, processed
//! one at a time in FIFO order by whoever holds the actor's *turn*. There is
//! no dedicated thread:
//!
//! * **Inline fast path.** An access first tries to take the turn. If the
//!   actor is idle it gets it, drains the mailbox (so earlier posted writes
//!   are applied first) and runs the access on the calling thread, with
//!   exclusive ownership of the device state. No thread hop.
//! * **Busy actor.** Otherwise a write is posted and the caller returns at
//!   once; a read (or [`ActorHandle::with`]) is posted and the caller waits
//!   for the reply. The thread holding the turn drains the mailbox before it
//!   gives the turn back, and re-checks it afterwards, so no message is ever
//!   left behind.
//!
//! Either way the device sees accesses one at a time, in the order they were
//! issued per caller, and a read sees every write the device received before
//! it. Devices never share a lock with each other: two vCPUs on two devices
//! run in parallel.
//!
//! Wake-ups other than guest accesses (ioeventfds, timers) come from a small
//! tokio runtime ([`DeviceRuntime`]) and enter the same mailbox.
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
use crate::turn::{Held, Turn};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use topos_runtime::turns::{self, DeviceTurn};
use topos_runtime::{EventNotifier, HwAddr, MemTxResult, MemoryRegionOps};

/// A device model run by the harness.
///
/// `region` is the index of the device's region the access hit (its BARs or
/// port ranges, numbered as the device chooses when it makes them); `addr` is
/// relative to that region. Values are in the device's byte order, as for
/// [`MemoryRegionOps`].
#[allow(unused_variables)]
pub trait Device: Send + 'static {
    /// A guest read.
    fn read(&mut self, ctx: &mut DeviceCtx<'_>, region: usize, addr: HwAddr, size: u32) -> u64;
    /// A guest write (posted: the guest does not wait for it).
    fn write(&mut self, ctx: &mut DeviceCtx<'_>, region: usize, addr: HwAddr, value: u64, size: u32);
    /// The ioeventfd registered with index `index` fired.
    fn eventfd(&mut self, ctx: &mut DeviceCtx<'_>, index: usize) {}
    /// A timer set with [`DeviceCtx::set_timer`] expired.
    fn timer(&mut self, ctx: &mut DeviceCtx<'_>, token: u64) {}
    /// The last region referring to the device is gone; the mailbox has
    /// been drained. Called once, as the actor stops.
    fn unplugged(&mut self, ctx: &mut DeviceCtx<'_>) {}
}

/// The tokio runtime that delivers ioeventfd and timer wake-ups to actors.
#[derive(Clone)]
pub struct DeviceRuntime {
    handle: tokio::runtime::Handle,
    _rt: Option<Arc<tokio::runtime::Runtime>>,
}

impl std::fmt::Debug for DeviceRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRuntime").finish_non_exhaustive()
    }
}

impl DeviceRuntime {
    /// A runtime of its own, with one worker thread.
    pub fn new() -> std::io::Result<DeviceRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("topos-devices")
            .enable_all()
            .build()?;
        Ok(DeviceRuntime { handle: rt.handle().clone(), _rt: Some(Arc::new(rt)) })
    }

    /// Uses an existing tokio runtime.
    pub fn from_handle(handle: tokio::runtime::Handle) -> DeviceRuntime {
        DeviceRuntime { handle, _rt: None }
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
        let me = self.shared.me.clone();
        let rt = self.shared.runtime.handle.clone();
        let task = self.shared.runtime.handle.spawn(async move {
            tokio::time::sleep(after).await;
            wake_from_blocking_pool(&rt, me, Msg::Timer(token)).await;
        });
        let mut tasks = self.shared.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
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
    /// may not wait for it (see [`topos_runtime::turns`]).
    #[error("the device is busy and the caller holds a device turn")]
    WouldBlock,
}

type Call<D> = Box<dyn FnOnce(&mut D, &mut DeviceCtx<'_>) + Send>;

/// The answer to a caller that waits: the result and the work the handler
/// deferred, for the caller to run.
type Reply<T> = flume::Sender<(T, Vec<Deferred>)>;

/// A message in an actor's mailbox. Type-erased messages (timers,
/// ioeventfds) carry no device type.
enum Msg {
    Timer(u64),
    Eventfd(usize),
}

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
    Wake(Msg),
}

/// An actor without its device type: what wake-ups and
/// [`DeviceCtx::handle`] need.
trait AnyCore: Send + Sync + 'static {
    /// Delivers a wake-up (on a thread that may wait: never the async
    /// worker).
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

/// Delivers `msg` to the actor from the runtime's blocking pool, so that
/// neither the device's handlers, nor the work they defer, nor a wait for
/// room in the mailbox ever run on the async worker, which every timer and
/// ioeventfd of every device depends on.
async fn wake_from_blocking_pool(rt: &tokio::runtime::Handle, me: Weak<dyn AnyCore>, msg: Msg) {
    let _ = rt
        .spawn_blocking(move || {
            if let Some(core) = me.upgrade() {
                core.wake(msg);
            }
        })
        .await;
}

struct Shared {
    name: String,
    irqs: Vec<IrqLine>,
    runtime: DeviceRuntime,
    /// The actor itself (weak: the actor owns this).
    me: Weak<dyn AnyCore>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

struct Core<D: Device> {
    /// The device state, reachable only by the holder of the turn; the turn
    /// word also counts the messages waiting in the mailbox.
    turn: Turn<D>,
    tx: flume::Sender<Mail<D>>,
    rx: flume::Receiver<Mail<D>>,
    failed: AtomicBool,
    shared: Arc<Shared>,
}

impl<D: Device> Core<D> {
    /// Runs one message with the turn held.
    fn handle(&self, dev: &mut D, mail: Mail<D>) {
        Self::handle_in(&self.failed, &self.shared, dev, mail)
    }

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
                let _ = done.send((r, collected.into_inner()));
            }
            Mail::Read { region, addr, size, reply } => {
                let collected = RefCell::new(Vec::new());
                let r = Self::run_in(failed, shared, dev, Some(&collected), |d, ctx| d.read(ctx, region, addr, size));
                let r = r.map_or((0, MemTxResult::AccessError), |v| (v, MemTxResult::Ok));
                let _ = reply.send((r, collected.into_inner()));
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

    /// Calls into the device, containing a panic.
    #[inline]
    fn run<R>(&self, dev: &mut D, f: impl FnOnce(&mut D, &mut DeviceCtx<'_>) -> R) -> Option<R> {
        Self::run_in(&self.failed, &self.shared, dev, None, f)
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

    /// Handles every queued message, with the turn held.
    fn drain(&self, held: &mut Held<'_, D>) {
        while held.pending() {
            match self.rx.try_recv() {
                Ok(mail) => {
                    held.take_pending();
                    self.handle(held, mail);
                }
                Err(_) => break,
            }
        }
    }

    /// Gives the turn back, draining whatever was queued meanwhile; then, if
    /// the thread holds no other turn, runs its deferred work.
    #[inline]
    fn finish(&self, mut held: Held<'_, D>) {
        loop {
            match held.try_release() {
                Ok(marker) => {
                    drop(marker);
                    return;
                }
                Err(h) => {
                    held = h;
                    self.drain(&mut held);
                }
            }
        }
    }

    /// Takes the turn for an access: at once if idle, after draining if
    /// messages are queued; `None` if another thread holds it.
    #[inline]
    fn enter(&self) -> Option<Held<'_, D>> {
        if let Some(h) = self.turn.try_enter_idle() {
            return Some(h);
        }
        let mut h = self.turn.try_enter()?;
        self.drain(&mut h);
        Some(h)
    }

    fn post(&self, mail: Mail<D>) {
        if self.tx.send(mail).is_ok() && self.turn.add_pending() {
            if let Some(mut h) = self.turn.try_enter() {
                self.drain(&mut h);
                self.finish(h);
            }
        }
    }

    #[inline]
    fn read(&self, region: usize, addr: HwAddr, size: u32) -> (u64, MemTxResult) {
        if self.failed.load(Ordering::Acquire) {
            return (0, MemTxResult::AccessError);
        }
        if let Some(mut h) = self.enter() {
            let r = self.run(&mut h, |d, ctx| d.read(ctx, region, addr, size));
            self.finish(h);
            return r.map_or((0, MemTxResult::AccessError), |v| (v, MemTxResult::Ok));
        }
        if self.turn.held_by_me() {
            tracing::debug!(device = %self.shared.name, "re-entrant read refused");
            return (0, MemTxResult::AccessError);
        }
        if turns::holds_device_turn() {
            tracing::debug!(device = %self.shared.name, "read of a busy device from inside a device turn refused");
            return (0, MemTxResult::AccessError);
        }
        let (tx, rx) = flume::bounded(1);
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
        if let Some(mut h) = self.enter() {
            let r = self.run(&mut h, |d, ctx| d.write(ctx, region, addr, value, size));
            self.finish(h);
            return if r.is_some() { MemTxResult::Ok } else { MemTxResult::AccessError };
        }
        if self.turn.held_by_me() {
            tracing::debug!(device = %self.shared.name, "re-entrant write refused");
            return MemTxResult::AccessError;
        }
        if policy == WritePolicy::NonPosted {
            if !turns::holds_device_turn() {
                let (tx, rx) = flume::bounded(1);
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
        // Last reference: nobody else can hold the turn. Apply what is still
        // queued, then say goodbye — marked as holding a device turn, like
        // any handler (this may run inside another device's handler or a
        // topology commit that dropped the last view of the device).
        let _marker = DeviceTurn::enter();
        let mails: Vec<Mail<D>> = self.rx.try_iter().collect();
        let Core { turn, failed, shared, .. } = self;
        let dev = turn.get_mut();
        for mail in mails {
            Self::handle_in(failed, shared, dev, mail);
        }
        Self::run_in(failed, shared, dev, None, |d, ctx| d.unplugged(ctx));
        for t in self.shared.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
        tracing::debug!(device = %self.shared.name, "device actor stopped");
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
    /// Spawns `device` as an actor named `name` with interrupt lines `irqs`.
    pub fn new(name: &str, device: D, irqs: Vec<IrqLine>, runtime: &DeviceRuntime) -> Spawned<D> {
        let (tx, rx) = flume::unbounded();
        let core = Arc::new_cyclic(|me: &Weak<Core<D>>| {
            let shared = Arc::new(Shared {
                name: name.to_string(),
                irqs,
                runtime: runtime.clone(),
                me: me.clone(),
                tasks: Mutex::new(Vec::new()),
            });
            Core { turn: Turn::new(device), tx, rx, failed: AtomicBool::new(false), shared }
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
    /// Messages waiting in the mailbox now.
    pub queued: usize,
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

impl<D: Device> ActorHandle<D> {
    /// Runs `f` on the device with exclusive access, in mailbox order (after
    /// every access issued before it), and returns its result.
    pub fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut D, &mut DeviceCtx<'_>) -> R + Send + 'static,
    ) -> Result<R, ActorError> {
        let core = self.core.upgrade().ok_or(ActorError::Gone)?;
        if core.failed.load(Ordering::Acquire) {
            return Err(ActorError::Failed);
        }
        if let Some(mut h) = core.enter() {
            let r = core.run(&mut h, f);
            core.finish(h);
            return r.ok_or(ActorError::Failed);
        }
        if core.turn.held_by_me() {
            return Err(ActorError::Reentrant);
        }
        if turns::holds_device_turn() {
            tracing::debug!(device = %core.shared.name, "call on a busy device from inside a device turn refused");
            return Err(ActorError::WouldBlock);
        }
        let (tx, rx) = flume::bounded(1);
        let call: Call<D> = Box::new(move |d, ctx| {
            let r = f(d, ctx);
            let _ = tx.send((r, ctx.take_collected()));
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
        if let Some(mut h) = core.enter() {
            let r = core.run(&mut h, f);
            core.finish(h);
            return r.ok_or(ActorError::Failed);
        }
        core.post(Mail::Call { f: Box::new(f), collect: false });
        Ok(())
    }

    /// Counters of the actor's mailbox.
    pub fn stats(&self) -> Result<ActorStats, ActorError> {
        let core = self.core.upgrade().ok_or(ActorError::Gone)?;
        Ok(ActorStats { queued: core.turn.queued() })
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
        let me = core.shared.me.clone();
        let fd = AsFd(notifier);
        let rt = core.shared.runtime.handle.clone();
        let pool = rt.clone();
        let task = rt.spawn(async move {
            // The wrapper owns an `Arc` of the eventfd, so the descriptor
            // outlives its registration (the I/O-safety concern behind the
            // deprecation does not arise).
            #[allow(deprecated)]
            let Ok(afd) = tokio::io::unix::AsyncFd::new(fd) else {
                return;
            };
            loop {
                let Ok(mut ready) = afd.readable().await else { return };
                // Consume the counter; spurious wake-ups read nothing.
                match afd.get_ref().0.read() {
                    Ok(_) => {
                        if me.strong_count() == 0 {
                            return;
                        }
                        // One wake-up at a time: a device slower than its
                        // doorbell slows the doorbell down.
                        wake_from_blocking_pool(&pool, me.clone(), Msg::Eventfd(index)).await;
                    }
                    Err(_) => ready.clear_ready(),
                }
            }
        });
        core.shared.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(task.abort_handle());
        Ok(())
    }
}

/// An eventfd as a raw fd for tokio.
struct AsFd(EventNotifier);

impl std::os::fd::AsRawFd for AsFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
