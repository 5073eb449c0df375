//! QEMU's `fw_cfg` through its I/O ports, as firmware reads it.
// Runs real threads and a tokio runtime: not a loom model.
#![cfg(not(topos_loom))]

mod support;

use support::Board;
use topos_devices::fw_cfg::*;
use topos_devices::runtime::{AddressSpace, MemTxResult};
use topos_devices::{DeviceModel, Error};

/// Selects `key` and reads `len` bytes, one port read each.
fn read_item(io: &AddressSpace, key: u16, len: usize) -> Vec<u8> {
    assert_eq!(io.write_u64(IO_BASE, u64::from(key), 2), MemTxResult::Ok);
    (0..len).map(|_| io.read_u64(IO_BASE + 1, 1).0 as u8).collect()
}

fn plugged(config: FwCfgConfig) -> Board {
    let board = Board::new();
    board.plug_io::<FwCfg>(config, board.ctx("fw_cfg"), PORTS, IO_BASE);
    board
}

#[test]
fn firmware_finds_the_signature_id_ram_size_and_cpu_count() {
    let b = plugged(FwCfgConfig::new().with_ram_size(256 << 20).with_cpus(4));
    let io = b.io();
    assert_eq!(read_item(io, SIGNATURE, 4), b"QEMU");
    assert_eq!(read_item(io, ID, 4), [1, 0, 0, 0]);
    assert_eq!(read_item(io, RAM_SIZE, 8), (256u64 << 20).to_le_bytes());
    assert_eq!(read_item(io, NB_CPUS, 2), [4, 0]);
    assert_eq!(read_item(io, MAX_CPUS, 2), [4, 0]);
    // Past the end, and for an unknown key: zeros.
    assert_eq!(read_item(io, NB_CPUS, 4), [4, 0, 0, 0]);
    assert_eq!(read_item(io, 0x7777, 3), [0, 0, 0]);
}

#[test]
fn selecting_rewinds_and_data_writes_are_ignored() {
    let b = plugged(FwCfgConfig::new());
    let io = b.io();
    assert_eq!(read_item(io, SIGNATURE, 2), b"QE");
    assert_eq!(io.write_u64(IO_BASE + 1, 0x55, 1), MemTxResult::Ok);
    assert_eq!(io.read_u64(IO_BASE + 1, 1).0, u64::from(b'M'));
    assert_eq!(read_item(io, SIGNATURE, 4), b"QEMU");
}

#[test]
fn files_are_listed_in_the_directory_big_endian() {
    let b = plugged(FwCfgConfig::new().with_file("etc/hello", b"hi!".to_vec()).with_file("opt/x", vec![7; 5]));
    let io = b.io();
    let dir = read_item(io, FILE_DIR, 4 + 2 * 64);
    assert_eq!(dir[..4], 2u32.to_be_bytes());
    let entry = |i: usize| &dir[4 + 64 * i..4 + 64 * (i + 1)];
    assert_eq!(entry(0)[..4], 3u32.to_be_bytes());
    assert_eq!(entry(0)[4..6], FILE_FIRST.to_be_bytes());
    assert_eq!(&entry(0)[8..17], b"etc/hello");
    assert_eq!(entry(0)[17], 0);
    assert_eq!(entry(1)[4..6], (FILE_FIRST + 1).to_be_bytes());
    assert_eq!(read_item(io, FILE_FIRST, 3), b"hi!");
    assert_eq!(read_item(io, FILE_FIRST + 1, 5), [7; 5]);
}

#[test]
fn a_file_name_too_long_is_a_configuration_error() {
    let b = Board::new();
    let long = "x".repeat(FILE_NAME_LEN);
    let r = FwCfg::plug(FwCfgConfig::new().with_file(&long, vec![]), b.ctx("fw_cfg"));
    assert!(matches!(r, Err(Error::InvalidConfig { device: "fw_cfg", .. })), "{r:?}");
}
