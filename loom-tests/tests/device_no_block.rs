//! The rule that keeps device actors deadlock-free: a thread holding a
//! device turn never waits for another actor. Two devices whose handlers
//! read each other, driven from two threads, always finish; a read that
//! would have to wait is refused instead.
#![cfg(topos_loom)]

use loom::thread;
use std::sync::Arc;
use topos_devices::runtime::{HwAddr, MemTxResult, MemoryRegionOps};
use topos_devices::{ActorError, ActorHandle, Device, DeviceCtx, DeviceRuntime, Spawned};

/// Reads its peer (through the peer's region) and calls into it from its
/// write handler; records what it got.
#[derive(Default)]
struct Peer {
    ops: Option<Arc<dyn MemoryRegionOps>>,
    handle: Option<ActorHandle<Peer>>,
    got: Option<(MemTxResult, Result<(), ActorError>)>,
}

impl Device for Peer {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: HwAddr, _size: u32) -> u64 {
        1
    }
    fn write(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: HwAddr, _value: u64, _size: u32) {
        let read = self.ops.as_ref().map(|o| o.read_with_result(0, 8).1);
        let call = self.handle.as_ref().map(|h| h.with(|_, _| ()));
        self.got = read.zip(call);
    }
}

#[test]
fn devices_that_read_each_other_from_their_handlers_never_deadlock() {
    loom::model(|| {
        let rt = DeviceRuntime::new().unwrap();
        let x = Spawned::new("x", Peer::default(), vec![], &rt);
        let y = Spawned::new("y", Peer::default(), vec![], &rt);
        let (xh, yh, xo, yo) = (x.handle(), y.handle(), x.ops(0), y.ops(0));
        let (peer_o, peer_h) = (yo.clone(), yh.clone());
        xh.with(move |d, _| (d.ops, d.handle) = (Some(peer_o), Some(peer_h))).unwrap();
        let (peer_o, peer_h) = (xo.clone(), xh.clone());
        yh.with(move |d, _| (d.ops, d.handle) = (Some(peer_o), Some(peer_h))).unwrap();

        let t = thread::spawn(move || xo.write(0, 1, 8));
        yo.write(0, 1, 8);
        t.join().unwrap();
        for h in [&xh, &yh] {
            // Each handler got an answer: the peer's, or a refusal — the peer
            // is busy, or held by this very thread (which, holding the peer,
            // drained this device's queue and so ran this handler).
            let got = h.with(|d, _| d.got.take()).unwrap();
            assert!(
                matches!(
                    got,
                    Some((
                        MemTxResult::Ok | MemTxResult::AccessError,
                        Ok(()) | Err(ActorError::WouldBlock | ActorError::Reentrant)
                    ))
                ),
                "{got:?}"
            );
            // Break the cycle x → y → x.
            h.with(|d, _| (d.ops, d.handle) = (None, None)).unwrap();
        }
    });
}
