//! The device actor's turn (`topos_devices`'s `turn.rs` and the harness
//! around it): handlers never run concurrently, a message posted while the
//! holder gives the turn back is never stranded, each sender's messages
//! arrive in order, and a read of a busy actor gets its answer.
#![cfg(topos_loom)]

use loom::thread;
use topos_devices::runtime::MemTxResult;
use topos_devices::{DeviceRuntime, Spawned};
use topos_loom_tests::devices::{before, Recorder};

#[test]
fn handlers_are_exclusive_and_a_post_racing_a_release_is_not_stranded() {
    loom::model(|| {
        let rt = DeviceRuntime::new().unwrap();
        let (dev, log) = Recorder::new();
        let s = Spawned::new("recorder", dev, vec![], &rt);
        let (h, ops) = (s.handle(), s.ops(0));
        let other = ops.clone();
        // Either thread may find the other holding the turn and post; loom
        // also runs the post against the holder's release.
        let t = thread::spawn(move || other.write(0, 1, 8));
        ops.write(0, 2, 8);
        t.join().unwrap();
        let stats = h.stats().unwrap();
        assert!(!stats.busy, "the turn was left taken");
        assert_eq!(stats.queued, 0, "a message was stranded");
        let mut seen = log.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, [1, 2]);
    });
}

#[test]
fn each_senders_messages_arrive_in_order() {
    loom::model(|| {
        let rt = DeviceRuntime::new().unwrap();
        let (dev, log) = Recorder::new();
        let s = Spawned::new("recorder", dev, vec![], &rt);
        let ops = s.ops(0);
        let other = ops.clone();
        let t = thread::spawn(move || {
            other.write(0, 1, 8);
            other.write(0, 2, 8);
        });
        ops.write(0, 10, 8);
        ops.write(0, 20, 8);
        t.join().unwrap();
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(before(&seen, 1, 2) && before(&seen, 10, 20), "{seen:?}");
    });
}

#[test]
fn a_read_of_a_busy_actor_gets_its_answer_after_earlier_writes() {
    loom::model(|| {
        let rt = DeviceRuntime::new().unwrap();
        let (dev, _log) = Recorder::new();
        let s = Spawned::new("recorder", dev, vec![], &rt);
        let ops = s.ops(0);
        let other = ops.clone();
        let t = thread::spawn(move || other.write(0, 7, 8));
        // The read waits for its reply if the writer holds the turn; it sees
        // this thread's own earlier write in any case.
        ops.write(0, 8, 8);
        let (n, r) = ops.read_with_result(0, 8);
        assert_eq!(r, MemTxResult::Ok);
        assert!(n == 1 || n == 2, "{n}");
        t.join().unwrap();
    });
}
