//! The vCPU control protocol (`topos_vcpu::control`): pause, resume, stop
//! and kick against a vCPU thread that enters and leaves guest code.
//!
//! The backend is modelled after the KVM one: a kick arms "return at once"
//! (`immediate_exit`) under the kicker's lock and interrupts the vCPU only
//! if it is in guest code at that moment (a signal sent before the entry
//! is lost, as a real one is); the guest itself never leaves. So a kick
//! the protocol loses leaves the vCPU in guest code for ever, and loom
//! reports the deadlock.
#![cfg(topos_loom)]

use loom::sync::{Condvar, Mutex};
use loom::thread;
use std::sync::Arc;
use topos_vcpu::control::{Activity, Control, Kick};

#[derive(Default)]
struct GuestState {
    armed: bool,
    in_guest: bool,
    interrupted: bool,
}

/// A vCPU whose guest code never exits by itself.
#[derive(Default)]
struct FakeVcpu {
    state: Mutex<GuestState>,
    signal: Condvar,
}

impl Kick for FakeVcpu {
    fn kick(&self) {
        let mut st = self.state.lock().unwrap();
        st.armed = true;
        if st.in_guest {
            st.interrupted = true;
            self.signal.notify_all();
        }
    }

    fn clear(&self) {
        self.state.lock().unwrap().armed = false;
    }
}

impl FakeVcpu {
    /// One `KVM_RUN`: returns at once if armed, else runs guest code until
    /// interrupted.
    fn run(&self, entries: &loom::sync::atomic::AtomicUsize) {
        let mut st = self.state.lock().unwrap();
        if st.armed {
            return;
        }
        entries.fetch_add(1, loom::sync::atomic::Ordering::SeqCst);
        st.in_guest = true;
        while !st.interrupted {
            st = self.signal.wait(st).unwrap();
        }
        st.interrupted = false;
        st.in_guest = false;
    }
}

fn start() -> (Arc<Control>, Arc<loom::sync::atomic::AtomicUsize>, thread::JoinHandle<()>) {
    let vcpu = Arc::new(FakeVcpu::default());
    let control = Arc::new(Control::new(vcpu.clone()));
    let entries = Arc::new(loom::sync::atomic::AtomicUsize::new(0));
    let (c, e) = (control.clone(), entries.clone());
    let t = thread::spawn(move || {
        while c.may_enter() {
            vcpu.run(&e);
        }
        c.exited();
    });
    (control, entries, t)
}

#[test]
fn a_pause_returns_with_the_vcpu_out_of_guest_code_and_stop_ends_it() {
    loom::model(|| {
        let (control, _, t) = start();
        control.pause();
        let a = control.activity();
        assert!(a == Activity::Paused, "pause returned with the vCPU {a:?}");
        control.stop();
        control.wait_exited();
        t.join().unwrap();
    });
}

#[test]
fn a_resumed_vcpu_enters_guest_code_again_and_a_stop_racing_it_is_not_lost() {
    loom::model(|| {
        let (control, entries, t) = start();
        control.pause();
        let before = entries.load(loom::sync::atomic::Ordering::SeqCst);
        control.resume();
        while entries.load(loom::sync::atomic::Ordering::SeqCst) == before {
            thread::yield_now();
        }
        let c = control.clone();
        let stopper = thread::spawn(move || c.stop());
        control.kick();
        stopper.join().unwrap();
        control.wait_exited();
        t.join().unwrap();
    });
}

#[test]
fn a_pause_is_acknowledged_only_after_the_park_hook_ran() {
    loom::model(|| {
        let vcpu = Arc::new(FakeVcpu::default());
        let control = Arc::new(Control::new(vcpu.clone()));
        let entries = Arc::new(loom::sync::atomic::AtomicUsize::new(0));
        // What the hook records (the VM's liveness answer) is published by
        // the acknowledgement alone: Relaxed here on purpose.
        let hooked = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let (c, e, h) = (control.clone(), entries.clone(), hooked.clone());
        let t = thread::spawn(move || {
            while c.may_enter_with(|| h.store(true, loom::sync::atomic::Ordering::Relaxed)) {
                vcpu.run(&e);
            }
            c.exited();
        });
        control.pause();
        assert!(hooked.load(loom::sync::atomic::Ordering::Relaxed), "a pause returned before the park hook ran");
        control.stop();
        control.wait_exited();
        t.join().unwrap();
    });
}
