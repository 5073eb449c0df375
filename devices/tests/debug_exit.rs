//! QEMU's `isa-debug-exit`, driven through the I/O-port address space.
// Runs real threads and a tokio runtime: not a loom model.
#![cfg(not(topos_loom))]

mod support;

use proptest::prelude::*;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use support::Board;
use topos_devices::debug_exit::*;
use topos_devices::runtime::MemTxResult;
use topos_devices::{ActorHandle, DeviceModel, Error};

struct Rig {
    board: Board,
    h: ActorHandle<DebugExit>,
}

impl Rig {
    fn io(&self) -> &topos_devices::runtime::AddressSpace {
        self.board.io()
    }
}

/// An `isa-debug-exit` of `config`, mapped at port `iobase`.
fn rig(iobase: u64, config: DebugExitConfig) -> Rig {
    let board = Board::new();
    let h = board.plug_io::<DebugExit>(config, board.ctx("isa-debug-exit"), PORTS, iobase).handle;
    Rig { board, h }
}

#[test]
fn writing_0x10_requests_exit_status_0x21() {
    let (tx, rx) = mpsc::channel();
    let r = rig(CONVENTIONAL_IOBASE, DebugExitConfig::conventional(tx));
    assert_eq!(r.io().write_u64(0xf4, 0x10, 1), MemTxResult::Ok);
    assert_eq!(rx.try_recv(), Ok(0x21));
    assert_eq!(r.h.with(|d, _| (d.requests(), d.last_status())).unwrap(), (1, Some(0x21)));
    // Every write is a request; the device carries on.
    assert_eq!(r.io().write_u64(0xf4, 0, 4), MemTxResult::Ok);
    assert_eq!(rx.try_recv(), Ok(1));
    assert!(!r.h.is_failed());
}

#[test]
fn reads_return_zero_and_request_nothing() {
    let (tx, rx) = mpsc::channel();
    let r = rig(CONVENTIONAL_IOBASE, DebugExitConfig::conventional(tx));
    for (port, size) in [(0xf4, 1), (0xf4, 2), (0xf4, 4), (0xf5, 1), (0xf6, 2), (0xf7, 1)] {
        assert_eq!(r.io().read_u64(port, size), (0, MemTxResult::Ok), "port {port:#x} size {size}");
    }
    assert!(rx.try_recv().is_err());
    // Outside the range: unassigned I/O.
    assert_eq!(r.io().read_u64(0xf8, 1), (0xff, MemTxResult::Ok));
}

#[test]
fn qemu_defaults_and_wide_values() {
    assert_eq!((QEMU_DEFAULT_IOBASE, QEMU_DEFAULT_IOSIZE), (0x501, 2));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let r = rig(QEMU_DEFAULT_IOBASE, DebugExitConfig::qemu_default(move |status| s.lock().unwrap().push(status)));
    // Alignment is relative to the region, as in QEMU: a 2-byte write at
    // 0x501 (offset 0) reaches the device whole...
    assert_eq!(r.io().write_u64(0x501, 0x0203, 2), MemTxResult::Ok);
    // ...one at 0x502 (offset 1) is cut: one byte for the device, one for
    // the unassigned port 0x503.
    assert_eq!(r.io().write_u64(0x502, 0x0203, 2), MemTxResult::Ok);
    assert_eq!(*seen.lock().unwrap(), vec![0x0407, 0x07]);
    // A 32-bit value: the status is truncated to an int as in C.
    assert_eq!(exit_status(0xffff_ffff), -1);
    assert_eq!(exit_status(0x7fff_ffff), -1);
    assert_eq!(exit_status(0x4000_0000), i32::MIN | 1);
    assert_eq!(exit_status(1), 3);
}

#[test]
fn a_wide_write_to_a_one_port_range_is_not_clamped() {
    let (tx, rx) = mpsc::channel();
    let r = rig(0xf4, DebugExitConfig::new(1, tx));
    assert_eq!(r.io().write_u64(0xf4, 0x1234_5678, 4), MemTxResult::Ok);
    assert_eq!(rx.try_recv(), Ok(exit_status(0x1234_5678)));
    assert!(rx.try_recv().is_err());
}

#[test]
fn an_empty_port_range_is_a_configuration_error() {
    let board = Board::new();
    let (tx, _rx) = mpsc::channel();
    let r = DebugExit::plug(DebugExitConfig::new(0, tx), board.ctx("isa-debug-exit"));
    assert!(matches!(r, Err(Error::InvalidConfig { device: "isa-debug-exit", .. })), "{r:?}");
}

// ----- property test ---------------------------------------------------------

/// The pieces `(port, len)` an access of `size` bytes at `port` is cut
/// into (QEMU's `memory_access_size`: at most 4 bytes, naturally aligned
/// relative to the region hit: the device's range from `iobase`, or the
/// `io` root region elsewhere).
fn pieces(port: u64, size: u64, iobase: u64, iosize: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < size {
        let a = port + done;
        let off = if a >= iobase && a < iobase + iosize { a - iobase } else { a };
        let mut max = 4u64;
        let align = off & off.wrapping_neg();
        if align != 0 && align < max {
            max = align;
        }
        let l = (size - done).min(max);
        let l = 1u64 << (63 - l.leading_zeros());
        out.push((a, l));
        done += l;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_accesses_never_break_debug_exit(
        iobase in prop_oneof![Just(0xf4u64), Just(0x501), 0x100u64..0x200],
        iosize in 1u64..=8,
        ops in proptest::collection::vec((any::<bool>(), 0u64..12, prop_oneof![Just(1u64), Just(2), Just(4)], any::<u64>()), 1..48),
    ) {
        let (tx, rx) = mpsc::channel();
        let r = rig(iobase, DebugExitConfig::new(iosize, tx));
        let mut expected = Vec::new();
        for (is_write, rel, size, value) in ops {
            let port = (iobase + rel).saturating_sub(2);
            let in_range = |a: u64| a >= iobase && a < iobase + iosize;
            if is_write {
                prop_assert_eq!(r.io().write_u64(port, value, size as u32), MemTxResult::Ok);
                for (a, l) in pieces(port, size, iobase, iosize) {
                    if in_range(a) {
                        let shift = 8 * (a - port);
                        let v = (value >> shift) & (u64::MAX >> (64 - 8 * l));
                        expected.push(exit_status(v));
                    }
                }
            } else {
                let (v, res) = r.io().read_u64(port, size as u32);
                prop_assert_eq!(res, MemTxResult::Ok);
                for (a, l) in pieces(port, size, iobase, iosize) {
                    let shift = 8 * (a - port);
                    let bytes = (v >> shift) & (u64::MAX >> (64 - 8 * l));
                    let want = if in_range(a) { 0 } else { u64::MAX >> (64 - 8 * l) };
                    prop_assert_eq!(bytes, want, "piece at {:#x}+{}", a, l);
                }
            }
            prop_assert!(!r.h.is_failed());
        }
        let got: Vec<i32> = rx.try_iter().collect();
        prop_assert!(got.iter().all(|s| s & 1 == 1), "statuses are odd");
        prop_assert_eq!(r.h.with(|d, _| d.requests()).unwrap(), got.len() as u64);
        prop_assert_eq!(got, expected);
    }
}
