//! The device mailbox's bound (`topos_devices`'s `mailbox.rs`): senders that
//! find it full wait for room and are woken when a slot frees — no wake-up
//! is lost — and the queue never holds more than its capacity.
#![cfg(topos_loom)]

use loom::thread;
use std::num::NonZeroUsize;
use topos_devices::{ActorOptions, DeviceRuntime, Spawned};
use topos_loom_tests::devices::{before, Recorder};

#[test]
fn senders_wait_for_room_and_are_woken() {
    loom::model(|| {
        let rt = DeviceRuntime::new().unwrap();
        let (dev, log) = Recorder::new();
        // One slot; a budget large enough that no drainer is needed.
        let options = ActorOptions { capacity: NonZeroUsize::MIN, budget: NonZeroUsize::new(8).unwrap() };
        let s = Spawned::with_options("recorder", dev, vec![], &rt, options);
        let (h, ops) = (s.handle(), s.ops(0));
        let other = ops.clone();
        // While one thread holds the turn, the other's second write finds the
        // single slot taken and waits for the holder to drain the first.
        let t = thread::spawn(move || {
            other.write(0, 1, 8);
            other.write(0, 2, 8);
        });
        ops.write(0, 10, 8);
        ops.write(0, 20, 8);
        t.join().unwrap();
        let stats = h.stats().unwrap();
        assert!(stats.max_queued <= 1, "{stats:?}");
        assert_eq!((stats.busy, stats.queued), (false, 0), "{stats:?}");
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(before(&seen, 1, 2) && before(&seen, 10, 20), "{seen:?}");
    });
}
