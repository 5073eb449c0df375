//! The CFI flash, driven through address-space accesses as a guest would.
// Runs real threads and a tokio runtime: not a loom model.
#![cfg(not(topos_loom))]

mod support;

use proptest::prelude::*;
use topos_devices::pflash::{PflashCfi01, PflashConfig, PflashImage, PflashMode, FLASH, SR_PROGRAM_ERROR, SR_READY};
use topos_devices::runtime::{AddressSpace, MemTxResult, MemoryRegion};
use topos_devices::{ActorHandle, DeviceModel, Error, Plugged};

/// Where the flash is mapped.
const BASE: u64 = 0xfff0_0000;

struct Board {
    /// Keeps the topology alive.
    _board: support::Board,
    system: MemoryRegion,
    mem: AddressSpace,
    flash: Plugged<ActorHandle<PflashCfi01>>,
}

/// A flash of `config` holding `content`, mapped at [`BASE`].
fn board(config: PflashConfig, content: &[u8]) -> Board {
    let board = support::Board::new();
    let image = PflashImage { config, content: content.to_vec() };
    let flash = board.plug_mem::<PflashCfi01>(image, board.ctx("pflash"), FLASH, BASE);
    let (system, mem) = (board.spaces.system.clone(), board.spaces.memory.clone());
    Board { _board: board, system, mem, flash }
}

impl Board {
    fn read(&self, off: u64, size: u32) -> u64 {
        let (v, r) = self.mem.read_u64(BASE + off, size);
        assert_eq!(r, MemTxResult::Ok, "read at {off:#x}");
        v
    }
    fn write(&self, off: u64, value: u64, size: u32) {
        assert_eq!(self.mem.write_u64(BASE + off, value, size), MemTxResult::Ok, "write at {off:#x}");
    }
    fn read_bytes(&self, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        assert_eq!(self.mem.read(BASE + off, &mut buf), MemTxResult::Ok);
        buf
    }
    fn mode(&self) -> PflashMode {
        self.flash.handle.with(|d, _| d.mode()).unwrap()
    }
    fn ops_reads(&self) -> u64 {
        self.flash.handle.with(|d, _| d.stats().ops_reads).unwrap()
    }
    fn romd(&self) -> bool {
        self.flash.region(FLASH).unwrap().is_romd()
    }
}

fn small(width: u8) -> PflashConfig {
    PflashConfig { width, block_size: 0x1000, num_blocks: 8, ..PflashConfig::default() }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ 0x5a).collect()
}

#[test]
fn array_reads_return_the_content_straight_from_ram() {
    let content = pattern(0x2000);
    let b = board(small(2), &content);
    assert!(b.romd());
    for (off, size) in [(0u64, 1u32), (1, 1), (2, 2), (4, 4), (0x1ffc, 4), (0x123, 1)] {
        let want = content[off as usize..][..size as usize].iter().rev().fold(0u64, |v, &x| v << 8 | x as u64);
        assert_eq!(b.read(off, size), want, "at {off:#x}");
    }
    assert_eq!(b.read_bytes(0, 0x2000), content);
    // Past the initial content the flash reads erased.
    assert!(b.read_bytes(0x2000, 0x6000).iter().all(|&x| x == 0xff));
    assert_eq!(b.ops_reads(), 0, "array mode reads never reach the device");
    assert_eq!(b.mode(), PflashMode::ReadArray);
}

#[test]
fn program_a_word_and_read_it_back_bits_only_clear() {
    let b = board(small(2), &[0xf0, 0x0f, 0xff, 0xff]);
    b.write(0x2, 0x40, 2);
    assert!(!b.romd(), "a command switches to I/O mode");
    b.write(0x2, 0x1234, 2);
    assert_eq!(b.read(0x2, 2), SR_READY as u64, "after a program, reads return status");
    b.write(0, 0xff, 2);
    assert!(b.romd());
    assert_eq!(b.read(0x2, 2), 0x1234);

    // Program over programmed bits: 1 → 0 only.
    b.write(0x0, 0x10, 2);
    b.write(0x0, 0xff00, 2);
    b.write(0x0, 0xff, 2);
    assert_eq!(b.read(0x0, 2), 0x0f00);
    b.write(0x2, 0x40, 2);
    b.write(0x2, 0xffff, 2);
    b.write(0x2, 0xff, 2);
    assert_eq!(b.read(0x2, 2), 0x1234, "programming ones changes nothing");
    b.write(0x2, 0x40, 2);
    b.write(0x2, 0x0, 2);
    b.write(0x2, 0xff, 2);
    assert_eq!(b.read(0x2, 2), 0);
    assert_eq!(b.flash.handle.with(|d, _| d.stats().programs).unwrap(), 4);
}

#[test]
fn block_erase_restores_ones_in_that_block_only() {
    let content = vec![0u8; 0x8000];
    let b = board(small(4), &content);
    b.write(0x1234, 0x20, 4);
    assert_eq!(b.read(0x1234, 4), 0x80, "status, zero-extended to the 4-byte unit");
    b.write(0x1000, 0xd0, 4);
    assert_eq!(b.read(0x0, 1), SR_READY as u64);
    b.write(0, 0xff, 4);
    assert!(b.romd());
    assert!(b.read_bytes(0x1000, 0x1000).iter().all(|&x| x == 0xff));
    assert!(b.read_bytes(0x0, 0x1000).iter().all(|&x| x == 0));
    assert!(b.read_bytes(0x2000, 0x6000).iter().all(|&x| x == 0));
    assert_eq!(b.ops_reads(), 2);
}

#[test]
fn an_erase_without_confirm_returns_to_array_and_erases_nothing() {
    let b = board(small(2), &[0u8; 0x8000]);
    b.write(0x1000, 0x20, 2);
    b.write(0x1000, 0x70, 2);
    assert!(b.romd());
    assert!(b.read_bytes(0x1000, 0x1000).iter().all(|&x| x == 0));
    assert_eq!(b.flash.handle.with(|d, _| d.stats().erases).unwrap(), 0);
}

#[test]
fn read_status_returns_ready_per_unit_and_reaches_the_device() {
    for width in [1u8, 2, 4] {
        let b = board(small(width), &pattern(0x100));
        b.write(0x40, 0x70, width as u32);
        assert!(!b.romd());
        assert_eq!(b.mode(), PflashMode::ReadStatus);
        assert_eq!(b.read(0x0, 1), 0x80);
        let unit = 0x80u64;
        let four = match width {
            1 => 0x8080_8080,
            2 => 0x0080_0080,
            _ => unit,
        };
        assert_eq!(b.read(0x0, 4), four, "width {width}");
        assert!(b.ops_reads() >= 2);
        b.write(0, 0xff, 1);
        assert!(b.romd());
        let before = b.ops_reads();
        assert_eq!(b.read_bytes(0, 0x100), pattern(0x100));
        assert_eq!(b.ops_reads(), before);
    }
}

#[test]
fn cfi_query_answers_qry_and_the_geometry_scaled_by_width() {
    for width in [1u8, 2, 4] {
        let config = small(width);
        let b = board(config, &[]);
        let w = width as u64;
        b.write(0x55 * w, 0x98, width as u32);
        assert!(!b.romd());
        let unit = |n: u64| b.read(n * w, width as u32);
        assert_eq!([unit(0x10), unit(0x11), unit(0x12)], [b'Q' as u64, b'R' as u64, b'Y' as u64], "width {width}");
        assert_eq!(b.read(0x10 * w, 1), b'Q' as u64);
        // Primary command set 0x0001 (Intel/Sharp extended).
        assert_eq!(unit(0x13) | unit(0x14) << 8, 1);
        // 32 KiB device.
        assert_eq!(unit(0x27), 15);
        // One erase region: 8 blocks of 0x1000 bytes.
        assert_eq!(unit(0x2c), 1);
        assert_eq!(unit(0x2d) | unit(0x2e) << 8, 7);
        assert_eq!((unit(0x2f) | unit(0x30) << 8) * 256, 0x1000);
        assert_eq!([unit(0x31), unit(0x32), unit(0x33)], [b'P' as u64, b'R' as u64, b'I' as u64]);
        // Outside the table: 0.
        assert_eq!(unit(0x200), 0);
        b.write(0, 0xff, width as u32);
        assert!(b.romd());
        assert_eq!(b.mode(), PflashMode::ReadArray);
        assert_eq!(b.read(0x10 * w, 1), 0xff);
    }
}

#[test]
fn read_identifier_codes() {
    let config = PflashConfig { manufacturer_id: 0x89, device_id: 0x18, ..small(2) };
    let b = board(config, &[]);
    b.write(0, 0x90, 2);
    assert_eq!(b.read(0, 2), 0x89);
    assert_eq!(b.read(2, 2), 0x18);
    assert_eq!(b.read(0, 4), 0x0018_0089);
    b.write(0, 0x00, 2);
    assert!(b.romd());
}

#[test]
fn clear_status_clears_errors_of_a_read_only_flash() {
    let config = PflashConfig { read_only: true, ..small(2) };
    let b = board(config, &[0x55; 4]);
    b.write(0, 0x40, 2);
    b.write(0, 0x0000, 2);
    assert_eq!(b.read(0, 2), (SR_READY | SR_PROGRAM_ERROR) as u64);
    b.write(0, 0x50, 2);
    assert!(b.romd(), "clear status returns to read array");
    assert_eq!(b.read(0, 2), 0x5555, "nothing was programmed");
    b.write(0, 0x70, 2);
    assert_eq!(b.read(0, 2), SR_READY as u64);
}

#[test]
fn buffered_program() {
    let b = board(small(2), &[]);
    b.write(0x100, 0xe8, 2);
    assert_eq!(b.read(0x100, 2), SR_READY as u64);
    b.write(0x100, 3, 2); // four words
    for (i, v) in [0x1111u64, 0x2222, 0x3333, 0x4444].into_iter().enumerate() {
        b.write(0x100 + 2 * i as u64, v, 2);
    }
    assert_eq!(b.mode(), PflashMode::BufferConfirm);
    b.write(0x100, 0xd0, 2);
    assert_eq!(b.read(0x100, 2), SR_READY as u64);
    b.write(0x100, 0xff, 2);
    assert_eq!(b.read(0x100, 4), 0x2222_1111);
    assert_eq!(b.read(0x104, 4), 0x4444_3333);
    assert_eq!(b.read(0x108, 2), 0xffff);
}

#[test]
fn the_actor_stops_when_its_region_goes() {
    let b = board(small(2), &[]);
    let handle = b.flash.handle.clone();
    b.write(0, 0x70, 2);
    b.system.del_subregion(b.flash.region(FLASH).unwrap()).unwrap();
    drop(b.flash);
    assert!(!handle.is_alive(), "the device holds its region weakly, so nothing keeps it alive");
}

#[test]
fn bad_configurations_are_errors() {
    let board = support::Board::new();
    let plug =
        |config: PflashConfig, content: Vec<u8>| PflashCfi01::plug(PflashImage { config, content }, board.ctx("bad"));
    for config in [
        PflashConfig { width: 3, ..small(2) },
        PflashConfig { block_size: 0x1001, ..small(2) },
        PflashConfig { block_size: 0x80, ..small(2) },
        PflashConfig { num_blocks: 0, ..small(2) },
    ] {
        let r = plug(config, vec![]);
        assert!(matches!(r, Err(Error::InvalidConfig { device: "pflash", .. })), "{config:?}: {r:?}");
    }
    assert!(matches!(plug(small(2), vec![0; 0x8001]), Err(Error::InvalidConfig { .. })));
}

/// Command bytes worth hitting often, so random sequences walk the state
/// machine.
const COMMANDS: [u64; 14] = [0xff, 0x00, 0x70, 0x50, 0x40, 0x10, 0x20, 0x28, 0xd0, 0x98, 0x90, 0xe8, 0x60, 0x01];

#[derive(Debug, Clone)]
enum Op {
    Read { off: u64, size: u32 },
    Write { off: u64, size: u32, value: u64 },
}

fn op(len: u64) -> impl Strategy<Value = Op> {
    let size = prop_oneof![Just(1u32), Just(2), Just(4)];
    let value = prop_oneof![3 => proptest::sample::select(COMMANDS.to_vec()), 2 => any::<u32>().prop_map(u64::from)];
    prop_oneof![
        (0..len, size.clone()).prop_map(move |(off, size)| Op::Read { off: off.min(len - size as u64), size }),
        (0..len, size, value).prop_map(move |(off, size, value)| Op::Write {
            off: off.min(len - size as u64),
            size,
            value
        }),
    ]
}

const P_BLOCK: u64 = 0x100;
const P_BLOCKS: u32 = 8;
const P_LEN: u64 = P_BLOCK * P_BLOCKS as u64;

fn run(b: &Board, ops: &[Op]) -> Result<(), TestCaseError> {
    let h = &b.flash.handle;
    for op in ops {
        match *op {
            Op::Read { off, size } => {
                let (_, r) = b.mem.read_u64(BASE + off, size);
                prop_assert_eq!(r, MemTxResult::Ok);
            }
            Op::Write { off, size, value } => {
                prop_assert_eq!(b.mem.write_u64(BASE + off, value, size), MemTxResult::Ok);
            }
        }
        let mode = h.with(|d, _| d.mode()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(mode == PflashMode::ReadArray, b.romd(), "array mode iff romd, after {:?}", op);
    }
    prop_assert!(!h.is_failed());
    Ok(())
}

/// Back to read array from any state: a state that expects data takes 0xFF
/// as data (programming ones changes nothing), a buffered program may expect
/// up to 256 of them.
fn to_array(b: &Board) {
    for _ in 0..300 {
        if b.romd() {
            break;
        }
        b.write(0, 0xff, 1);
    }
    assert!(b.romd());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any access sequence: no panic, array mode iff romd, and an erased
    /// block reads 0xFF while the others keep their bytes.
    #[test]
    fn random_accesses(width in prop_oneof![Just(1u8), Just(2), Just(4)],
                       ops in proptest::collection::vec(op(P_LEN), 1..64),
                       block in 0..P_BLOCKS) {
        let config = PflashConfig { width, block_size: P_BLOCK, num_blocks: P_BLOCKS, ..PflashConfig::default() };
        let b = board(config, &pattern(P_LEN as usize));
        run(&b, &ops)?;
        to_array(&b);
        let before = b.read_bytes(0, P_LEN as usize);
        let at = block as u64 * P_BLOCK;
        b.write(at + 4, 0x20, width as u32);
        b.write(at + 8, 0xd0, width as u32);
        prop_assert_eq!(b.read(at, 1) & 0x80, 0x80);
        b.write(0, 0xff, 1);
        prop_assert!(b.romd());
        let after = b.read_bytes(0, P_LEN as usize);
        for (i, (x, y)) in before.iter().zip(&after).enumerate() {
            if i as u64 / P_BLOCK == block as u64 {
                prop_assert_eq!(*y, 0xff, "erased byte {:#x}", i);
            } else {
                prop_assert_eq!(x, y, "byte {:#x} of another block", i);
            }
        }
    }

    /// Without erase commands, content bits only ever go from 1 to 0.
    #[test]
    fn without_erase_bits_only_clear(width in prop_oneof![Just(1u8), Just(2), Just(4)],
                                     ops in proptest::collection::vec(op(P_LEN), 1..64)) {
        let ops: Vec<Op> = ops
            .into_iter()
            .map(|o| match o {
                // A multi-byte write on a narrow flash is several commands:
                // take the erase-setup opcodes out of every byte.
                Op::Write { off, size, value } => {
                    let mut b = value.to_le_bytes();
                    for x in b.iter_mut().filter(|x| matches!(**x, 0x20 | 0x28)) {
                        *x ^= 0x40;
                    }
                    Op::Write { off, size, value: u64::from_le_bytes(b) }
                }
                o => o,
            })
            .collect();
        let config = PflashConfig { width, block_size: P_BLOCK, num_blocks: P_BLOCKS, ..PflashConfig::default() };
        let initial = pattern(P_LEN as usize);
        let b = board(config, &initial);
        run(&b, &ops)?;
        to_array(&b);
        let now = b.read_bytes(0, P_LEN as usize);
        for (i, (x, y)) in initial.iter().zip(&now).enumerate() {
            prop_assert_eq!(y & !x, 0, "byte {:#x} gained bits: {:#x} -> {:#x}", i, x, y);
        }
        prop_assert_eq!(b.flash.handle.with(|d, _| d.stats().erases).unwrap(), 0);
    }
}
