//! The framebuffer, driven through address-space accesses as a guest would.
// Runs real threads and a tokio runtime: not a loom model.
#![cfg(not(topos_loom))]

mod support;

use proptest::prelude::*;
use std::collections::BTreeSet;
use topos_devices::framebuffer::{
    FbConfig, FbMode, FbRegs, FbUpdate, Framebuffer, REG_FORMAT, REG_HEIGHT, REG_STATUS, REG_STRIDE, REG_VRAM_SIZE,
    REG_WIDTH,
};
use topos_devices::runtime::{AddressSpace, MemTxResult};
use topos_devices::{DeviceModel, Error};

const VRAM: u64 = 0xe000_0000;
const REGS: u64 = 0xfe00_0000;

struct Board {
    /// Keeps the topology alive.
    _board: support::Board,
    mem: AddressSpace,
    fb: Framebuffer,
}

/// A framebuffer with its video RAM at [`VRAM`] and registers at [`REGS`].
fn board(vram_size: u64, mode: FbMode) -> Board {
    use topos_devices::framebuffer::{REGS as REGS_ROLE, VRAM as VRAM_ROLE};
    let board = support::Board::new();
    let system = &board.spaces.system;
    let fb = board
        .plug_at::<FbRegs>(
            FbConfig { vram_size, mode },
            board.ctx("fb"),
            &[(VRAM_ROLE, system, VRAM), (REGS_ROLE, system, REGS)],
        )
        .handle;
    let mem = board.spaces.memory.clone();
    Board { _board: board, mem, fb }
}

impl Board {
    fn pixel(&self, mode: &FbMode, x: u32, y: u32, value: u64) {
        let off = y as u64 * mode.stride as u64 + x as u64 * mode.bytes_per_pixel as u64;
        assert_eq!(self.mem.write_u64(VRAM + off, value, mode.bytes_per_pixel), MemTxResult::Ok);
    }
    fn update(&mut self) -> FbUpdate {
        self.fb.update().unwrap()
    }
    fn reg(&self, r: u64) -> u64 {
        let (v, res) = self.mem.read_u64(REGS + r, 4);
        assert_eq!(res, MemTxResult::Ok);
        v
    }
    fn set_reg(&self, r: u64, v: u64) {
        assert_eq!(self.mem.write_u64(REGS + r, v, 4), MemTxResult::Ok);
    }
}

/// One page per scanline: dirty tracking is exact.
const PAGE_LINES: FbMode = FbMode { width: 1024, height: 16, bytes_per_pixel: 4, stride: 4096 };

#[test]
fn two_written_scanlines_are_reported_then_nothing() {
    let mut b = board(0x10000, PAGE_LINES);
    let first = b.update();
    assert!(first.full, "the first update draws everything");
    assert_eq!(first.dirty, vec![0..16]);
    let again = b.update();
    assert!(!again.full);
    assert!(again.dirty.is_empty(), "nothing was written since: {:?}", again.dirty);

    b.pixel(&PAGE_LINES, 10, 3, 0x00ff_00ff);
    b.pixel(&PAGE_LINES, 1023, 9, 0x1234_5678);
    let u = b.update();
    assert_eq!(u.mode, Some(PAGE_LINES));
    assert!(!u.full);
    assert_eq!(u.dirty, vec![3..4, 9..10]);
    assert_eq!(u.dirty_lines(), 2);
    assert!(b.update().dirty.is_empty(), "the second call reports none");

    let mut line = vec![0u8; 4096];
    assert_eq!(b.fb.read_scanline(&PAGE_LINES, 9, &mut line), 4096);
    assert_eq!(&line[4092..], &0x1234_5678u32.to_le_bytes());
}

#[test]
fn adjacent_scanlines_merge_into_one_range() {
    let mut b = board(0x10000, PAGE_LINES);
    b.update();
    for y in [4, 5, 6, 15] {
        b.pixel(&PAGE_LINES, 0, y, 1);
    }
    assert_eq!(b.update().dirty, vec![4..7, 15..16]);
}

#[test]
fn small_strides_report_every_scanline_of_a_dirty_page() {
    // 320 bytes per scanline: page 1 (0x1000..0x2000) holds parts of
    // scanlines 12..=25.
    let mode = FbMode { width: 320, height: 200, bytes_per_pixel: 1, stride: 320 };
    let mut b = board(0x10000, mode);
    b.update();
    b.pixel(&mode, 100, 20, 0xaa);
    let u = b.update();
    assert_eq!(u.dirty, vec![12..26]);
    assert!(u.dirty.iter().any(|r| r.contains(&20)));
}

#[test]
fn registers_read_back_and_a_mode_change_forces_a_full_update() {
    let mut b = board(0x10000, PAGE_LINES);
    assert_eq!(
        [b.reg(REG_WIDTH), b.reg(REG_HEIGHT), b.reg(REG_STRIDE), b.reg(REG_FORMAT), b.reg(REG_VRAM_SIZE)],
        [1024, 16, 4096, 4, 0x10000]
    );
    assert_eq!(b.reg(REG_STATUS), 1);
    b.update();

    b.set_reg(REG_WIDTH, 512);
    let u = b.update();
    let half = FbMode { width: 512, ..PAGE_LINES };
    assert_eq!(u.mode, Some(half));
    assert!(u.full);
    assert_eq!(u.dirty, vec![0..16]);
    assert_eq!(b.fb.mode(), Some(half));

    // Too tall for the video RAM: nothing is scanned out.
    b.set_reg(REG_HEIGHT, 17);
    assert_eq!(b.reg(REG_STATUS), 0);
    let u = b.update();
    assert_eq!(u.mode, None);
    assert!(u.dirty.is_empty());
    b.set_reg(REG_HEIGHT, 8);
    let u = b.update();
    assert!(u.full);
    assert_eq!(u.dirty, vec![0..8]);

    // Read-only registers ignore writes; other sizes read 0.
    b.set_reg(REG_VRAM_SIZE, 1);
    assert_eq!(b.reg(REG_VRAM_SIZE), 0x10000);
    assert_eq!(b.mem.read_u64(REGS + REG_WIDTH, 2), (0, MemTxResult::Ok));
}

#[test]
fn a_mode_that_does_not_fit_is_refused() {
    let board = support::Board::new();
    let plug = |vram_size, mode| FbRegs::plug(FbConfig { vram_size, mode }, board.ctx("fb"));
    assert!(matches!(plug(0x1000, PAGE_LINES), Err(Error::InvalidConfig { device: "framebuffer", .. })));
    let zero = FbMode { width: 0, ..PAGE_LINES };
    assert!(matches!(plug(0x10000, zero), Err(Error::InvalidConfig { .. })));
}

#[derive(Debug, Clone)]
enum Op {
    Pixel { off: u64, size: u32, value: u32 },
    Reg { reg: u64, size: u32, value: u32 },
    Update,
}

const P_VRAM: u64 = 0x10000;

fn op() -> impl Strategy<Value = Op> {
    let size = || prop_oneof![Just(1u32), Just(2), Just(4)];
    let reg =
        proptest::sample::select(vec![REG_WIDTH, REG_HEIGHT, REG_STRIDE, REG_FORMAT, REG_VRAM_SIZE, REG_STATUS, 0x18]);
    let value = prop_oneof![0u32..5, 0u32..1100, Just(320u32), Just(4096), any::<u32>()];
    prop_oneof![
        8 => (0..P_VRAM, size(), any::<u32>()).prop_map(|(off, size, value)| Op::Pixel {
            off: off.min(P_VRAM - size as u64),
            size,
            value
        }),
        2 => (reg, prop_oneof![4 => Just(4u32), 1 => size()], value).prop_map(|(reg, size, value)| Op::Reg { reg, size, value }),
        2 => Just(Op::Update),
    ]
}

/// The registers as the guest set them, and which pages it wrote.
struct Model {
    raw: FbMode,
    changed: bool,
    pages: BTreeSet<u64>,
}

impl Model {
    fn mode(&self) -> Option<FbMode> {
        self.raw.fits(P_VRAM).then_some(self.raw)
    }
}

fn check_update(b: &mut Board, m: &mut Model) -> Result<(), TestCaseError> {
    let u = b.update();
    let mode = m.mode();
    prop_assert_eq!(u.mode, mode);
    prop_assert_eq!(u.full, m.changed);
    let reported: Vec<u32> = u.dirty.iter().flat_map(|r| r.clone()).collect();
    for w in u.dirty.windows(2) {
        prop_assert!(w[0].end < w[1].start, "ranges sorted, disjoint, not adjacent: {:?}", u.dirty);
    }
    match mode {
        None => prop_assert!(reported.is_empty()),
        Some(mode) if m.changed => prop_assert_eq!(reported, (0..mode.height).collect::<Vec<_>>()),
        Some(mode) => {
            let want: Vec<u32> = (0..mode.height)
                .filter(|&y| {
                    let r = mode.line_range(y);
                    (r.start / 4096..=(r.end - 1) / 4096).any(|p| m.pages.contains(&p))
                })
                .collect();
            prop_assert_eq!(reported, want);
        }
    }
    m.changed = false;
    m.pages.clear();
    let again = b.update();
    prop_assert!(!again.full && again.dirty.is_empty(), "a second update reports nothing: {:?}", again);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random pixel and register accesses: updates report exactly the
    /// scanlines that show a written page (everything after a mode change),
    /// then nothing; the device never fails.
    #[test]
    fn random_accesses(ops in proptest::collection::vec(op(), 1..64)) {
        let mut b = board(P_VRAM, PAGE_LINES);
        let _ = b.update();
        let mut m = Model { raw: PAGE_LINES, changed: false, pages: BTreeSet::new() };
        for op in &ops {
            match *op {
                Op::Pixel { off, size, value } => {
                    prop_assert_eq!(b.mem.write_u64(VRAM + off, value as u64, size), MemTxResult::Ok);
                    m.pages.insert(off / 4096);
                    m.pages.insert((off + size as u64 - 1) / 4096);
                }
                Op::Reg { reg, size, value } => {
                    prop_assert_eq!(b.mem.write_u64(REGS + reg, value as u64, size), MemTxResult::Ok);
                    let field = match (size, reg) {
                        (4, REG_WIDTH) => Some(&mut m.raw.width),
                        (4, REG_HEIGHT) => Some(&mut m.raw.height),
                        (4, REG_STRIDE) => Some(&mut m.raw.stride),
                        (4, REG_FORMAT) => Some(&mut m.raw.bytes_per_pixel),
                        _ => None,
                    };
                    if let Some(f) = field {
                        m.changed |= *f != value;
                        *f = value;
                    }
                    prop_assert_eq!(b.reg(REG_STATUS), m.mode().is_some() as u64);
                }
                Op::Update => check_update(&mut b, &mut m)?,
            }
        }
        check_update(&mut b, &mut m)?;
        prop_assert!(!b.fb.handle().is_failed());
    }
}
