//! How other threads control a running vCPU: pause, resume, stop and kick,
//! with no lost kick.
//!
//! A request is recorded under the control's lock, then `pending` is set,
//! then the vCPU is kicked: its backend arms a flag that makes the current
//! or next entry into guest code return at once (KVM's `immediate_exit`)
//! and interrupts a run in progress (a signal). The vCPU thread, before
//! each entry, first disarms that flag (`Kick::clear`) and then reads
//! `pending`. Both sides use sequentially consistent accesses, so either the
//! thread sees `pending` before it enters, or the kicker's arming comes after
//! the thread's disarming and the entry returns at once: a kick is never
//! lost, and no periodic re-kick is needed.
//!
//! A pause is acknowledged: [`Control::pause`] returns once the vCPU thread
//! has stopped between two runs, so pausing N vCPUs takes as long as the
//! slowest one takes to leave guest code, not a polling interval. A thread
//! that parks for a pause first runs the hook it passed to
//! [`Control::may_enter_with`] (the VM records there whether the vCPU could
//! ever run again), and acknowledges after it: whoever sees the pause
//! acknowledged sees what the hook did.
//!
//! ## Halts in user space
//!
//! A backend that does not wait for interrupts itself returns from its run
//! when the guest halts; the vCPU thread then waits in [`Control::halt`]
//! until a kick (an interrupt, an INIT, ... was posted for it) or a request
//! wakes it. No wake-up is lost: every kick counts, under the control's
//! lock, and a halt returns at once if any kick came after the thread read
//! the count ([`Control::kicks`]) before the run that halted. A halt with
//! interrupts off is *dead*: only another vCPU can end it. The vCPUs of a
//! [`HaltGroup`] (one VM) count their dead halts together; the halt that
//! makes every one of them dead is reported to its caller, which stops the
//! VM. A kick or a request that ends a dead halt takes it off the count
//! before it returns, so a vCPU that wakes another and then halts never
//! makes the group look dead.

use crate::sync::{Arc, AtomicBool, Condvar, Mutex, Ordering};

/// Makes a vCPU leave guest code (implemented by each backend).
pub trait Kick: Send + Sync {
    /// Arms the vCPU's "return at once" flag and interrupts a run in
    /// progress. Called from any thread.
    fn kick(&self);
    /// Disarms the flag; called by the vCPU thread before it checks for
    /// requests and enters guest code.
    fn clear(&self);
}

/// What the vCPU's controllers ask of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Run guest code.
    Run,
    /// Stay out of guest code until resumed.
    Pause,
    /// Leave for good.
    Stop,
}

/// What the vCPU thread is doing, as far as its controllers know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Running (or about to run) guest code.
    Running,
    /// Paused between two runs, waiting to be resumed.
    Paused,
    /// Its thread has left.
    Exited,
}

#[derive(Debug)]
struct State {
    request: Request,
    activity: Activity,
    /// Kicks so far (wrapping): a halt returns at once if this moved
    /// since the thread read it before the run that halted.
    kicks: u64,
    /// While the thread waits in a halt: whether the halt is dead (counted
    /// in the group).
    halted: Option<bool>,
}

/// The vCPUs whose dead halts (halted with interrupts off, so that only
/// another vCPU can wake them) are counted together: every vCPU of one VM.
#[derive(Debug)]
pub struct HaltGroup {
    count: Mutex<GroupCount>,
}

#[derive(Debug)]
struct GroupCount {
    total: usize,
    dead: usize,
}

impl HaltGroup {
    /// A group of `total` vCPUs.
    pub fn new(total: usize) -> Arc<HaltGroup> {
        Arc::new(HaltGroup { count: Mutex::new(GroupCount { total, dead: 0 }) })
    }

    /// Counts one more dead halt; true if now every vCPU is in one.
    fn add(&self) -> bool {
        let mut c = self.count.lock();
        c.dead += 1;
        c.dead == c.total
    }

    fn remove(&self) {
        let mut c = self.count.lock();
        c.dead -= 1;
    }
}

/// The control block shared by one vCPU thread and its handles.
pub struct Control {
    state: Mutex<State>,
    changed: Condvar,
    /// A request other than `Run` waits: read by the vCPU thread before
    /// every entry, without the lock.
    pending: AtomicBool,
    kick: Arc<dyn Kick>,
    group: Arc<HaltGroup>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("state", &*self.state.lock()).finish()
    }
}

impl Control {
    /// A control block for a vCPU kicked by `kick`, asked to run, alone in
    /// its [`HaltGroup`].
    pub fn new(kick: Arc<dyn Kick>) -> Control {
        Control::in_group(kick, HaltGroup::new(1))
    }

    /// A control block for a vCPU kicked by `kick`, asked to run, whose
    /// dead halts count in `group`.
    pub fn in_group(kick: Arc<dyn Kick>, group: Arc<HaltGroup>) -> Control {
        Control {
            state: Mutex::new(State { request: Request::Run, activity: Activity::Running, kicks: 0, halted: None }),
            changed: Condvar::new(),
            pending: AtomicBool::new(false),
            kick,
            group,
        }
    }

    /// Ends a halt the thread waits in (the caller notifies).
    fn wake(&self, st: &mut State) {
        if let Some(dead) = st.halted.take() {
            if dead {
                self.group.remove();
            }
        }
    }

    fn ask(&self, request: Request) {
        {
            let mut st = self.state.lock();
            if st.request == Request::Stop || st.activity == Activity::Exited {
                return;
            }
            if request != Request::Run {
                self.wake(&mut st);
            }
            st.request = request;
            self.pending.store(request != Request::Run, Ordering::SeqCst);
            self.changed.notify_all();
        }
        if request != Request::Run {
            self.kick.kick();
        }
    }

    /// Makes the vCPU leave guest code once and re-enter (to notice new
    /// state), without a request; wakes it from a halt in user space.
    pub fn kick(&self) {
        {
            let mut st = self.state.lock();
            st.kicks = st.kicks.wrapping_add(1);
            if st.halted.is_some() {
                self.wake(&mut st);
                self.changed.notify_all();
            }
        }
        self.kick.kick();
    }

    /// Asks the vCPU to pause and waits until it has (or has exited).
    pub fn pause(&self) {
        self.request_pause();
        self.wait_paused();
    }

    /// Asks the vCPU to pause, without waiting (pause several vCPUs at
    /// once: ask each, then [`wait_paused`](Self::wait_paused) for each).
    pub fn request_pause(&self) {
        self.ask(Request::Pause);
    }

    /// Waits until a pause asked for has taken effect (or the vCPU exited,
    /// or someone resumed or stopped it meanwhile).
    pub fn wait_paused(&self) {
        let mut st = self.state.lock();
        while st.request == Request::Pause && st.activity == Activity::Running {
            st = self.changed.wait(st);
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let st = self.state.lock();
        if st.request == Request::Pause {
            drop(st);
            self.ask(Request::Run);
        }
    }

    /// Asks the vCPU to leave for good (does not wait; see [`wait_exited`](Self::wait_exited)).
    pub fn stop(&self) {
        self.ask(Request::Stop);
    }

    /// Waits until the vCPU thread has left.
    pub fn wait_exited(&self) {
        let mut st = self.state.lock();
        while st.activity != Activity::Exited {
            st = self.changed.wait(st);
        }
    }

    /// What the vCPU is doing now.
    pub fn activity(&self) -> Activity {
        self.state.lock().activity
    }

    // ----- the vCPU thread's side --------------------------------------------

    /// Called by the vCPU thread before each entry into guest code: returns
    /// `false` if it must leave. Blocks while paused.
    pub fn may_enter(&self) -> bool {
        self.may_enter_with(|| {})
    }

    /// [`may_enter`](Self::may_enter), calling `on_park` (without the lock)
    /// before the thread acknowledges a pause: when [`pause`](Self::pause)
    /// returns, what `on_park` did is visible to its caller. A pause that
    /// follows another with no entry in between runs it once.
    pub fn may_enter_with(&self, mut on_park: impl FnMut()) -> bool {
        self.kick.clear();
        if !self.pending.load(Ordering::SeqCst) {
            return true;
        }
        let mut parked = false;
        let mut st = self.state.lock();
        loop {
            match st.request {
                Request::Run => {
                    st.activity = Activity::Running;
                    self.changed.notify_all();
                    return true;
                }
                Request::Stop => return false,
                Request::Pause => {
                    if !parked {
                        drop(st);
                        on_park();
                        parked = true;
                        st = self.state.lock();
                        continue;
                    }
                    if st.activity != Activity::Paused {
                        st.activity = Activity::Paused;
                        self.changed.notify_all();
                    }
                    st = self.changed.wait(st);
                }
            }
        }
    }

    /// The kick count, read by the vCPU thread before a run (after
    /// [`may_enter`](Self::may_enter)), for [`halt`](Self::halt).
    pub fn kicks(&self) -> u64 {
        self.state.lock().kicks
    }

    /// Called by the vCPU thread when its backend halted; `seen` is what
    /// [`kicks`](Self::kicks) returned before that run, `dead` says the
    /// guest halted with interrupts off (only another vCPU can wake it).
    ///
    /// Returns at once if a kick or a request came since; otherwise waits
    /// until one does. Returns `true`, without waiting, if this halt made
    /// every vCPU of the group dead: the caller then stops the VM.
    pub fn halt(&self, seen: u64, dead: bool) -> bool {
        let mut st = self.state.lock();
        if st.kicks != seen || self.pending.load(Ordering::SeqCst) {
            return false;
        }
        if dead && self.group.add() {
            self.group.remove();
            return true;
        }
        st.halted = Some(dead);
        while st.halted.is_some() {
            st = self.changed.wait(st);
        }
        false
    }

    /// Called by the vCPU thread as it leaves (whatever the reason).
    pub fn exited(&self) {
        let mut st = self.state.lock();
        st.activity = Activity::Exited;
        self.changed.notify_all();
    }
}
