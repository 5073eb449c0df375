//! Halts in user space (`topos_vcpu::control`): a vCPU whose backend
//! returned on `hlt` waits in `Control::halt` for a kick or a request, and
//! the vCPUs of a VM count their dead halts (interrupts off) in a
//! `HaltGroup`; the halt that makes all of them dead is reported once.
//!
//! Each vCPU thread runs the loop of `vm.rs` (`may_enter`, read the kick
//! count, run, `halt`) around a scripted run; the one that sees every vCPU
//! dead stops them all, as the VM's stop latch does. A lost wake-up leaves
//! a thread waiting for ever (loom reports the deadlock, or the spinning
//! main thread runs out of branches); a miscount reports "all halted"
//! while a vCPU can still run, which the models assert never happens.
#![cfg(topos_loom)]

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;
use std::sync::Arc;
use topos_loom_tests::vcpu::NoKick;
use topos_vcpu::control::{Control, HaltGroup};

/// How one scripted run ends.
enum Run {
    /// Back to the loop (as after a kick or an exit).
    Again,
    /// `hlt`, with interrupts on (`true`) or off.
    Halt(bool),
}

/// `n` controls in one halt group.
fn controls(n: usize) -> Arc<Vec<Arc<Control>>> {
    let group = HaltGroup::new(n);
    Arc::new((0..n).map(|_| Arc::new(Control::in_group(Arc::new(NoKick), group.clone()))).collect())
}

/// The vCPU loop of `vm.rs` for vCPU `me`; counts reports of "every vCPU
/// halted" in `all_halted` and then stops every vCPU.
fn vcpu(
    me: usize,
    all: Arc<Vec<Arc<Control>>>,
    all_halted: Arc<AtomicUsize>,
    mut run: impl FnMut() -> Run + Send + 'static,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let control = &all[me];
        while control.may_enter() {
            let seen = control.kicks();
            if let Run::Halt(interrupts) = run() {
                if control.halt(seen, !interrupts) {
                    all_halted.fetch_add(1, Ordering::SeqCst);
                    for c in all.iter() {
                        c.stop();
                    }
                }
            }
        }
        control.exited();
    })
}

#[test]
fn a_kick_is_never_lost_against_a_halt() {
    loom::model(|| {
        let all = controls(1);
        let halted = Arc::new(AtomicUsize::new(0));
        // The vCPU halts with interrupts on until it finds the interrupt
        // posted for it; then it stops itself.
        let irq = Arc::new(AtomicBool::new(false));
        let (i, c) = (irq.clone(), all.clone());
        let v = vcpu(0, all.clone(), halted.clone(), move || {
            if i.load(Ordering::SeqCst) {
                c[0].stop();
                Run::Again
            } else {
                Run::Halt(true)
            }
        });
        // An interrupt controller: post, then kick.
        irq.store(true, Ordering::SeqCst);
        all[0].kick();
        v.join().unwrap();
        assert_eq!(halted.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn a_stop_racing_a_halt_ends_it() {
    loom::model(|| {
        let all = controls(1);
        let halted = Arc::new(AtomicUsize::new(0));
        let v = vcpu(0, all.clone(), halted.clone(), || Run::Halt(true));
        all[0].stop();
        all[0].wait_exited();
        v.join().unwrap();
    });
}

#[test]
fn every_vcpu_halted_with_interrupts_off_is_reported_once() {
    loom::model(|| {
        let all = controls(2);
        let halted = Arc::new(AtomicUsize::new(0));
        let a = vcpu(0, all.clone(), halted.clone(), || Run::Halt(false));
        let b = vcpu(1, all.clone(), halted.clone(), || Run::Halt(false));
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(halted.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn a_vcpu_woken_by_another_before_that_one_halts_is_never_counted_halted() {
    loom::model(|| {
        let all = controls(2);
        let halted = Arc::new(AtomicUsize::new(0));
        // vCPU 0 halts with interrupts off until woken (an INIT IPI), then
        // stops the VM. vCPU 1 wakes it, then halts with interrupts off for
        // good.
        let init = Arc::new(AtomicBool::new(false));
        let (i, c) = (init.clone(), all.clone());
        let a = vcpu(0, all.clone(), halted.clone(), move || {
            if i.load(Ordering::SeqCst) {
                for c in c.iter() {
                    c.stop();
                }
                Run::Again
            } else {
                Run::Halt(false)
            }
        });
        let (i, c) = (init.clone(), all.clone());
        let mut sent = false;
        let b = vcpu(1, all.clone(), halted.clone(), move || {
            if !sent {
                sent = true;
                i.store(true, Ordering::SeqCst);
                c[0].kick();
            }
            Run::Halt(false)
        });
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(halted.load(Ordering::SeqCst), 0, "all halted reported while vCPU 0 was being woken");
    });
}
