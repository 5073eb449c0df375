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
//! slowest one takes to leave guest code, not a polling interval.

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
}

/// The control block shared by one vCPU thread and its handles.
pub struct Control {
    state: Mutex<State>,
    changed: Condvar,
    /// A request other than `Run` waits: read by the vCPU thread before
    /// every entry, without the lock.
    pending: AtomicBool,
    kick: Arc<dyn Kick>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("state", &*self.state.lock()).finish()
    }
}

impl Control {
    /// A control block for a vCPU kicked by `kick`, asked to run.
    pub fn new(kick: Arc<dyn Kick>) -> Control {
        Control {
            state: Mutex::new(State { request: Request::Run, activity: Activity::Running }),
            changed: Condvar::new(),
            pending: AtomicBool::new(false),
            kick,
        }
    }

    fn ask(&self, request: Request) {
        {
            let mut st = self.state.lock();
            if st.request == Request::Stop || st.activity == Activity::Exited {
                return;
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
    /// state), without a request.
    pub fn kick(&self) {
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
        self.kick.clear();
        if !self.pending.load(Ordering::SeqCst) {
            return true;
        }
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
                    if st.activity != Activity::Paused {
                        st.activity = Activity::Paused;
                        self.changed.notify_all();
                    }
                    st = self.changed.wait(st);
                }
            }
        }
    }

    /// Called by the vCPU thread as it leaves (whatever the reason).
    pub fn exited(&self) {
        let mut st = self.state.lock();
        st.activity = Activity::Exited;
        self.changed.notify_all();
    }
}
