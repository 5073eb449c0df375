//! The device runtime: timers, ioeventfd watchers and the threads that drain
//! busy actors.
//!
//! A small tokio runtime ([`DeviceRuntime`]) waits for timers and ioeventfds.
//! Its async worker only ever *waits*: a wake-up is delivered to the actor
//! from the runtime's blocking pool, so neither a device's handler, nor the
//! work it defers, nor a wait for room in a full mailbox ever runs on the
//! worker that every timer and ioeventfd of every device depends on. The
//! blocking pool also runs the drainers to which busy actors hand their
//! backlog (see [`actor`](crate::actor)).
//!
//! Under loom (`--cfg topos_loom`) there is no tokio runtime: drainers are
//! loom threads, timers never fire and ioeventfds are not watched.

use crate::actor::AnyCore;
use crate::sync::{self, BlockingPool, Weak};
use std::time::Duration;
use topos_runtime::EventNotifier;

/// A wake-up that is not a guest access.
#[cfg_attr(topos_loom, allow(dead_code))]
pub(crate) enum Msg {
    /// A timer set with `DeviceCtx::set_timer` expired.
    Timer(u64),
    /// A watched ioeventfd fired.
    Eventfd(usize),
}

/// The runtime that delivers ioeventfd and timer wake-ups to actors and
/// drains busy ones (see the [module](self) documentation).
#[derive(Clone)]
pub struct DeviceRuntime {
    pool: BlockingPool,
    #[cfg(not(topos_loom))]
    _rt: Option<std::sync::Arc<tokio::runtime::Runtime>>,
}

impl std::fmt::Debug for DeviceRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRuntime").finish_non_exhaustive()
    }
}

impl DeviceRuntime {
    /// A runtime of its own, with one async worker thread (and tokio's
    /// blocking pool).
    #[cfg(not(topos_loom))]
    pub fn new() -> std::io::Result<DeviceRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("topos-devices")
            .enable_all()
            .build()?;
        Ok(DeviceRuntime { pool: rt.handle().clone(), _rt: Some(std::sync::Arc::new(rt)) })
    }

    /// Uses an existing tokio runtime (with its time and I/O drivers
    /// enabled). Its blocking pool must stay available while actors live.
    #[cfg(not(topos_loom))]
    pub fn from_handle(handle: tokio::runtime::Handle) -> DeviceRuntime {
        DeviceRuntime { pool: handle, _rt: None }
    }

    /// Under loom: drainers are loom threads; timers and ioeventfds are off.
    #[cfg(topos_loom)]
    pub fn new() -> std::io::Result<DeviceRuntime> {
        Ok(DeviceRuntime { pool: BlockingPool })
    }

    /// Runs `f` on a thread that may block (a drainer).
    pub(crate) fn spawn_blocking(&self, f: impl FnOnce() + Send + 'static) {
        sync::spawn_blocking(&self.pool, f);
    }
}

/// The tokio tasks of one actor (its timers and ioeventfd watchers),
/// aborted when the actor stops.
#[derive(Default)]
pub(crate) struct Tasks {
    #[cfg(not(topos_loom))]
    handles: sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Tasks {
    #[cfg(not(topos_loom))]
    fn push(&self, task: tokio::task::AbortHandle) {
        let mut handles = self.handles.lock();
        handles.retain(|t| !t.is_finished());
        handles.push(task);
    }

    /// Stops every task.
    pub(crate) fn abort_all(&self) {
        #[cfg(not(topos_loom))]
        for t in self.handles.lock().drain(..) {
            t.abort();
        }
    }
}

/// Delivers `msg` to the actor `me` after `after`.
#[cfg(not(topos_loom))]
pub(crate) fn set_timer(rt: &DeviceRuntime, tasks: &Tasks, me: Weak<dyn AnyCore>, after: Duration, token: u64) {
    let pool = rt.pool.clone();
    let task = rt.pool.spawn(async move {
        tokio::time::sleep(after).await;
        wake_from_blocking_pool(&pool, me, Msg::Timer(token)).await;
    });
    tasks.push(task.abort_handle());
}

/// Under loom timers never fire.
#[cfg(topos_loom)]
pub(crate) fn set_timer(_rt: &DeviceRuntime, _tasks: &Tasks, _me: Weak<dyn AnyCore>, _after: Duration, _token: u64) {
    tracing::debug!("timers do not fire under loom");
}

/// Delivers each signal of `notifier` to the actor `me` as
/// [`Msg::Eventfd`]`(index)`, one at a time: an actor slower than its
/// doorbell slows the doorbell's wake-ups down.
#[cfg(not(topos_loom))]
pub(crate) fn watch_eventfd(
    rt: &DeviceRuntime,
    tasks: &Tasks,
    me: Weak<dyn AnyCore>,
    notifier: EventNotifier,
    index: usize,
) {
    let fd = AsFd(notifier);
    let pool = rt.pool.clone();
    let task = rt.pool.spawn(async move {
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
                    wake_from_blocking_pool(&pool, me.clone(), Msg::Eventfd(index)).await;
                }
                Err(_) => ready.clear_ready(),
            }
        }
    });
    tasks.push(task.abort_handle());
}

/// Under loom ioeventfds are not watched.
#[cfg(topos_loom)]
pub(crate) fn watch_eventfd(
    _rt: &DeviceRuntime,
    _tasks: &Tasks,
    _me: Weak<dyn AnyCore>,
    _notifier: EventNotifier,
    _index: usize,
) {
    tracing::debug!("ioeventfds are not watched under loom");
}

/// Delivers `msg` to the actor from the blocking pool (see the
/// [module](self) documentation).
#[cfg(not(topos_loom))]
async fn wake_from_blocking_pool(pool: &BlockingPool, me: Weak<dyn AnyCore>, msg: Msg) {
    let _ = pool
        .spawn_blocking(move || {
            if let Some(core) = me.upgrade() {
                core.wake(msg);
            }
        })
        .await;
}

/// An eventfd as a raw fd for tokio.
#[cfg(not(topos_loom))]
struct AsFd(EventNotifier);

#[cfg(not(topos_loom))]
impl std::os::fd::AsRawFd for AsFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
