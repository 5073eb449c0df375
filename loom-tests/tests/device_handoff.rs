//! The device harness's hand-off (`Core::hand_off` and the drainer): a
//! caller handles at most its budget of others' messages, the rest goes with
//! the still-taken turn to a drainer thread, and every message is handled.
#![cfg(topos_loom)]

use loom::thread;
use std::num::NonZeroUsize;
use topos_devices::{ActorOptions, DeviceRuntime, Spawned};
use topos_loom_tests::devices::{before, Recorder};

#[test]
fn a_backlog_beyond_the_budget_goes_to_a_drainer_and_is_all_handled() {
    loom::model(|| {
        let rt = DeviceRuntime::new().unwrap();
        let (dev, log) = Recorder::new();
        let options = ActorOptions { capacity: NonZeroUsize::new(4).unwrap(), budget: NonZeroUsize::MIN };
        let s = Spawned::with_options("recorder", dev, vec![], &rt, options);
        let (h, ops) = (s.handle(), s.ops(0));
        let other = ops.clone();
        // Two posts against one access: whichever thread ends up draining
        // may handle only one message for the other before handing off.
        let t = thread::spawn(move || {
            other.write(0, 1, 8);
            other.write(0, 2, 8);
        });
        ops.write(0, 10, 8);
        t.join().unwrap();
        // Queued behind whatever a drainer still has, this waits for it; a
        // turn handed off to nobody would make it wait forever (loom reports
        // the deadlock). The drainer that answers may still hold the turn.
        h.with(|_, _| ()).unwrap();
        let stats = h.stats().unwrap();
        assert!(stats.max_caller_drain <= 1, "{stats:?}");
        assert_eq!(stats.queued, 0, "{stats:?}");
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(before(&seen, 1, 2), "{seen:?}");
    });
}
