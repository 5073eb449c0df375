//! A CFI parallel flash with the Intel/Sharp command set (the model of
//! QEMU's `hw/block/pflash_cfi01.c`), as a ROM device run by an actor.
//!
//! In *read array* mode the region is in romd mode: guest reads come straight
//! from the backing RAM and never reach the device. The first command write
//! switches the region to I/O mode, so reads reach the device and answer with
//! the status register, the identifier codes or the CFI query table,
//! depending on the command; *read array* (`0xFF`, or `0x00`/`0xF0`) switches
//! back. The region is in romd mode exactly while the flash is in read array
//! mode.
//!
//! | first cycle | second cycle | effect |
//! | --- | --- | --- |
//! | `0xFF`, `0x00`, `0xF0` | | read array |
//! | `0x70` | | read status register |
//! | `0x50` | | clear the status error bits, read array |
//! | `0x40`, `0x10` | data | program: bits only go from 1 to 0; then read status |
//! | `0x20`, `0x28` | `0xD0` at an address in the block | erase the block to `0xFF`; then read status |
//! | `0x98` | | CFI query ("QRY" at unit 0x10) |
//! | `0x90` | | read identifier (unit 0: manufacturer, unit 1: device) |
//! | `0xE8` | count, count + 1 data writes, `0xD0` | buffered program |
//! | `0x60` | `0x01`, `0xD0`, `0x2F` | block lock bits (accepted, not emulated) |
//!
//! An unknown sequence returns to read array, as QEMU does. Operations
//! complete at once (no timing): the status register reads "ready"
//! (bit 7) whenever the guest looks.
//!
//! The flash is one device as wide as the bus (`width` 1, 2 or 4 bytes, QEMU's
//! `device-width` equal to `width`), little-endian. Query, identifier and
//! status answers are given per *unit* of `width` bytes: the CFI byte `n` is
//! at byte offset `n * width`, zero-extended to the unit; a read narrower or
//! wider than a unit sees the bytes of consecutive units.

#![forbid(unsafe_code)]

use crate::actor::{ActorHandle, Device, DeviceCtx, Spawned};
use crate::error::{Error, Result};
use crate::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use topos_runtime::{HwAddr, MemoryRegion, OpsConfig, RamSlice, WeakRegion};

/// The role of the flash's one region: the ROM device (map it in system
/// memory; a PC's firmware flash ends at 4 GiB).
pub const FLASH: &str = "flash";

/// Status register: the write state machine is ready.
pub const SR_READY: u8 = 0x80;
/// Status register: erase error (or command sequence error with
/// [`SR_PROGRAM_ERROR`]).
pub const SR_ERASE_ERROR: u8 = 0x20;
/// Status register: program error (or command sequence error with
/// [`SR_ERASE_ERROR`]).
pub const SR_PROGRAM_ERROR: u8 = 0x10;
/// The status bits that [`CMD_CLEAR_STATUS`] clears.
const SR_ERRORS: u8 = 0x3a;

/// Command: read array (also `0x00` and `0xF0`).
pub const CMD_READ_ARRAY: u8 = 0xff;
/// Command: read status register.
pub const CMD_READ_STATUS: u8 = 0x70;
/// Command: clear status register.
pub const CMD_CLEAR_STATUS: u8 = 0x50;
/// Command: word program setup (also `0x10`).
pub const CMD_PROGRAM: u8 = 0x40;
/// Command: block erase setup (also `0x28`).
pub const CMD_BLOCK_ERASE: u8 = 0x20;
/// Command: confirm (block erase, buffered program, lock bits).
pub const CMD_CONFIRM: u8 = 0xd0;
/// Command: CFI query.
pub const CMD_CFI_QUERY: u8 = 0x98;
/// Command: read identifier codes.
pub const CMD_READ_ID: u8 = 0x90;
/// Command: buffered program setup.
pub const CMD_WRITE_BUFFER: u8 = 0xe8;
/// Command: block lock bits setup.
pub const CMD_LOCK_SETUP: u8 = 0x60;

/// Length of the CFI query table (its last byte is at unit `CFI_LEN - 1`).
const CFI_LEN: usize = 0x40;

/// The geometry of a flash (see [`PflashImage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PflashConfig {
    /// Bus (and device) width in bytes: 1, 2 or 4.
    pub width: u8,
    /// Erase block size in bytes: a power of two from 256 bytes to 16 MiB,
    /// at least `width`.
    pub block_size: u64,
    /// Number of erase blocks, 1 to 65536.
    pub num_blocks: u32,
    /// Manufacturer code (identifier unit 0).
    pub manufacturer_id: u16,
    /// Device code (identifier unit 1).
    pub device_id: u16,
    /// Program and erase fail with an error status and change nothing.
    pub read_only: bool,
}

impl Default for PflashConfig {
    /// A 2-byte-wide flash of 64 blocks of 64 KiB (Intel's manufacturer code,
    /// a 28F320-like device code).
    fn default() -> Self {
        PflashConfig {
            width: 2,
            block_size: 0x10000,
            num_blocks: 64,
            manufacturer_id: 0x0089,
            device_id: 0x0016,
            read_only: false,
        }
    }
}

impl PflashConfig {
    /// The size of the flash in bytes.
    pub fn size(&self) -> u64 {
        self.block_size * self.num_blocks as u64
    }

    /// Checks the geometry.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidConfig { device: "pflash", reason: why });
        if !matches!(self.width, 1 | 2 | 4) {
            return bad(format!("width {} is not 1, 2 or 4", self.width));
        }
        if !self.block_size.is_power_of_two() || !(0x100..=0x100_0000).contains(&self.block_size) {
            return bad(format!("block size {:#x} is not a power of two from 256 B to 16 MiB", self.block_size));
        }
        if !(1..=0x10000).contains(&self.num_blocks) {
            return bad(format!("{} blocks: the CFI table describes 1 to 65536", self.num_blocks));
        }
        Ok(())
    }

    /// log2 of the write buffer size in bytes (CFI byte 0x2A).
    fn buffer_log2(&self) -> u32 {
        let max = if self.width == 1 { 8 } else { 11 };
        self.block_size.trailing_zeros().min(max)
    }
}

/// What makes a flash: its geometry and what it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PflashImage {
    /// The geometry.
    pub config: PflashConfig,
    /// The content from offset 0; the rest reads erased (`0xFF`).
    pub content: Vec<u8>,
}

/// The read mode of the flash (what a read that reaches the device answers)
/// and where the write state machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PflashMode {
    /// Read array: the region is in romd mode.
    ReadArray,
    /// Reads return the status register.
    ReadStatus,
    /// Reads return the identifier codes.
    ReadId,
    /// Reads return the CFI query table.
    ReadCfi,
    /// The next write is data to program (reads return status).
    ProgramSetup,
    /// The next write must confirm a block erase (reads return status).
    EraseSetup,
    /// The next write sets lock bits (reads return status).
    LockSetup,
    /// The next write is the buffered program word count (reads return
    /// status).
    BufferCount,
    /// The next `remaining` writes are buffered program data.
    BufferData {
        /// Data writes still expected.
        remaining: u32,
    },
    /// The next write must confirm the buffered program.
    BufferConfirm,
}

/// Counters of what reached the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PflashStats {
    /// Reads that reached the device (none while in romd mode).
    pub ops_reads: u64,
    /// Writes that reached the device (every guest write does).
    pub ops_writes: u64,
    /// Program operations (word or buffered data writes).
    pub programs: u64,
    /// Block erases.
    pub erases: u64,
}

/// The flash device state, run as an actor (see its [`DeviceModel`]
/// implementation).
#[derive(Debug)]
pub struct PflashCfi01 {
    config: PflashConfig,
    mode: PflashMode,
    status: u8,
    cfi: [u8; CFI_LEN],
    /// The device's own region (weak: the region holds the actor).
    region: Option<WeakRegion>,
    /// The romd mode the device wants, published for deferred syncs.
    want_romd: Arc<AtomicBool>,
    /// Serialises deferred syncs so the last one applies the latest mode.
    sync_lock: Arc<Mutex<()>>,
    stats: PflashStats,
}

impl PflashCfi01 {
    fn new(config: PflashConfig) -> PflashCfi01 {
        PflashCfi01 {
            config,
            mode: PflashMode::ReadArray,
            status: SR_READY,
            cfi: cfi_table(&config),
            region: None,
            want_romd: Arc::new(AtomicBool::new(true)),
            sync_lock: Arc::new(Mutex::new(())),
            stats: PflashStats::default(),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> PflashMode {
        self.mode
    }

    /// The status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// What reached the device so far.
    pub fn stats(&self) -> PflashStats {
        self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &PflashConfig {
        &self.config
    }

    /// The CFI query table, one byte per unit.
    pub fn cfi_table(&self) -> &[u8] {
        &self.cfi
    }

    fn region(&self) -> Option<MemoryRegion> {
        self.region.as_ref().and_then(WeakRegion::upgrade)
    }

    /// Puts the region in romd mode exactly while in read array mode. The
    /// switch changes the topology, so it is deferred until the thread holds
    /// no turn (`DeviceCtx::defer`): a thread inside a topology transaction
    /// may be waiting for this flash, or for a device whose DMA wrote it.
    fn sync_romd(&self, ctx: &DeviceCtx<'_>) {
        let want = self.mode == PflashMode::ReadArray;
        if self.want_romd.swap(want, Ordering::AcqRel) == want && self.region().is_some_and(|r| r.is_romd() == want) {
            return;
        }
        let (flag, lock, weak) = (self.want_romd.clone(), self.sync_lock.clone(), self.region.clone());
        ctx.defer(move || {
            let _serial = lock.lock().unwrap_or_else(|e| e.into_inner());
            let want = flag.load(Ordering::Acquire);
            let Some(region) = weak.as_ref().and_then(WeakRegion::upgrade) else { return };
            if region.is_romd() != want {
                if let Err(e) = region.rom_device_set_readable(want) {
                    tracing::warn!(region = region.name(), error = %e, "pflash: could not switch romd mode");
                }
            }
        });
    }

    /// Builds a read of `size` bytes at `addr` from per-unit answers.
    fn assemble(&self, addr: HwAddr, size: u32, unit: impl Fn(u64) -> u32) -> u64 {
        let w = self.config.width as u64;
        let mut v = 0u64;
        for i in 0..size.min(8) as u64 {
            let a = addr.wrapping_add(i);
            let byte = (unit(a / w) >> (8 * (a % w))) & 0xff;
            v |= (byte as u64) << (8 * i);
        }
        v
    }

    fn read_array(&self, addr: HwAddr, size: u32) -> u64 {
        let mut b = [0xffu8; 8];
        let n = (size as usize).min(8);
        if let Some(ram) = self.region().and_then(|r| r.ram().ok()) {
            let _ = ram.read(addr, &mut b[..n]);
        }
        u64::from_le_bytes(b) & mask(size)
    }

    /// Programs `size` bytes of `value` at `addr`: bits only go 1 → 0.
    fn program(&mut self, addr: HwAddr, value: u64, size: u32) {
        self.stats.programs += 1;
        if self.config.read_only {
            self.status |= SR_PROGRAM_ERROR;
            return;
        }
        let n = (size as usize).min(8);
        let Some(region) = self.region() else { return };
        let Ok(ram) = region.ram() else { return };
        let mut old = [0u8; 8];
        if ram.read(addr, &mut old[..n]).is_err() {
            self.status |= SR_PROGRAM_ERROR;
            return;
        }
        let new: Vec<u8> = old[..n].iter().zip(value.to_le_bytes()).map(|(o, v)| o & v).collect();
        if ram.write(addr, &new).is_ok() {
            let _ = region.set_dirty(addr, n as u64);
        }
    }

    /// Erases the block that contains `addr`.
    fn erase(&mut self, addr: HwAddr) {
        self.stats.erases += 1;
        if self.config.read_only {
            self.status |= SR_ERASE_ERROR;
            return;
        }
        let bs = self.config.block_size;
        let start = addr & !(bs - 1);
        let Some(region) = self.region() else { return };
        let Ok(ram) = region.ram() else { return };
        if fill_ones(&ram, start, bs).is_ok() {
            let _ = region.set_dirty(start, bs);
        } else {
            self.status |= SR_ERASE_ERROR;
        }
    }

    /// A write in a read mode: a new command.
    fn command(&mut self, cmd: u8) -> PflashMode {
        match cmd {
            0x00 | 0xf0 | CMD_READ_ARRAY => PflashMode::ReadArray,
            CMD_READ_STATUS => PflashMode::ReadStatus,
            CMD_CLEAR_STATUS => {
                self.status &= !SR_ERRORS;
                PflashMode::ReadArray
            }
            CMD_PROGRAM | 0x10 => PflashMode::ProgramSetup,
            CMD_BLOCK_ERASE | 0x28 => PflashMode::EraseSetup,
            CMD_CFI_QUERY => PflashMode::ReadCfi,
            CMD_READ_ID => PflashMode::ReadId,
            CMD_WRITE_BUFFER => {
                self.status |= SR_READY;
                PflashMode::BufferCount
            }
            CMD_LOCK_SETUP => PflashMode::LockSetup,
            _ => {
                tracing::debug!(cmd, "pflash: unimplemented command");
                PflashMode::ReadArray
            }
        }
    }
}

/// Writes `len` bytes of `0xFF` (erased flash) at `off`.
fn fill_ones(ram: &RamSlice, off: u64, len: u64) -> topos_runtime::Result<()> {
    let ones = [0xffu8; 0x1000];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ones.len() as u64);
        ram.write(off + done, &ones[..n as usize])?;
        done += n;
    }
    Ok(())
}

fn mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// The CFI query table of a flash with this geometry.
fn cfi_table(c: &PflashConfig) -> [u8; CFI_LEN] {
    let mut t = [0u8; CFI_LEN];
    t[0x10..0x13].copy_from_slice(b"QRY");
    // Primary command set: Intel/Sharp extended (0x0001).
    t[0x13] = 0x01;
    // Primary extended query table at unit 0x31.
    t[0x15] = 0x31;
    // Vcc min 4.5 V, max 5.5 V; no Vpp.
    t[0x1b] = 0x45;
    t[0x1c] = 0x55;
    // Typical timeouts: word program 2^7 us, buffer 2^7 us, block erase
    // 2^10 ms; maximum multipliers 2^4.
    t[0x1f] = 0x07;
    t[0x20] = 0x07;
    t[0x21] = 0x0a;
    t[0x23] = 0x04;
    t[0x24] = 0x04;
    t[0x25] = 0x04;
    // Device size, 2^n bytes.
    let size = c.size();
    t[0x27] = (64 - (size - 1).leading_zeros()) as u8;
    // Interface: x8, x16 or x32 only.
    t[0x28] = match c.width {
        1 => 0x00,
        2 => 0x01,
        _ => 0x03,
    };
    // Write buffer, 2^n bytes.
    t[0x2a] = c.buffer_log2() as u8;
    // One uniform erase block region: count - 1, then size / 256.
    t[0x2c] = 0x01;
    let blocks = (c.num_blocks - 1) as u16;
    t[0x2d..0x2f].copy_from_slice(&blocks.to_le_bytes());
    let units = (c.block_size >> 8) as u16;
    t[0x2f..0x31].copy_from_slice(&units.to_le_bytes());
    // Primary extended table "PRI", version 1.0, one protection field.
    t[0x31..0x34].copy_from_slice(b"PRI");
    t[0x34] = b'1';
    t[0x35] = b'0';
    t[0x3f] = 0x01;
    t
}

impl Device for PflashCfi01 {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, size: u32) -> u64 {
        self.stats.ops_reads += 1;
        match self.mode {
            // Only a read that was queued before the switch back lands here.
            PflashMode::ReadArray => self.read_array(addr, size),
            PflashMode::ReadId => {
                let (m, d) = (self.config.manufacturer_id, self.config.device_id);
                self.assemble(addr, size, |u| match u & 0xff {
                    0 => m as u32,
                    1 => d as u32,
                    _ => 0,
                })
            }
            PflashMode::ReadCfi => self.assemble(addr, size, |u| self.cfi.get(u as usize).copied().unwrap_or(0) as u32),
            _ => {
                let s = self.status as u32;
                self.assemble(addr, size, |_| s)
            }
        }
    }

    fn write(&mut self, ctx: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, value: u64, size: u32) {
        self.stats.ops_writes += 1;
        let cmd = value as u8;
        self.mode = match self.mode {
            PflashMode::ReadArray | PflashMode::ReadStatus | PflashMode::ReadId | PflashMode::ReadCfi => {
                self.command(cmd)
            }
            PflashMode::ProgramSetup => {
                self.program(addr, value, size);
                self.status |= SR_READY;
                PflashMode::ReadStatus
            }
            PflashMode::EraseSetup => match cmd {
                CMD_CONFIRM => {
                    self.erase(addr);
                    self.status |= SR_READY;
                    PflashMode::ReadStatus
                }
                _ => PflashMode::ReadArray,
            },
            PflashMode::LockSetup => match cmd {
                0x01 | CMD_CONFIRM | 0x2f => {
                    self.status |= SR_READY;
                    PflashMode::ReadStatus
                }
                _ => PflashMode::ReadArray,
            },
            PflashMode::BufferCount => {
                let w = self.config.width as u32;
                let count = (value & mask(w)) + 1;
                if count * w as u64 > 1u64 << self.config.buffer_log2() {
                    self.status |= SR_PROGRAM_ERROR | SR_ERASE_ERROR;
                    PflashMode::ReadStatus
                } else {
                    PflashMode::BufferData { remaining: count as u32 }
                }
            }
            PflashMode::BufferData { remaining } => {
                self.program(addr, value, size);
                self.status |= SR_READY;
                match remaining {
                    0 | 1 => PflashMode::BufferConfirm,
                    n => PflashMode::BufferData { remaining: n - 1 },
                }
            }
            PflashMode::BufferConfirm => {
                if cmd != CMD_CONFIRM {
                    self.status |= SR_PROGRAM_ERROR | SR_ERASE_ERROR;
                }
                self.status |= SR_READY;
                PflashMode::ReadStatus
            }
        };
        self.sync_romd(ctx);
    }
}

/// Plugging a flash: one region, [`FLASH`] (a ROM device in read array
/// mode, for system memory), filled with the image's content and erased
/// after it.
impl DeviceModel for PflashCfi01 {
    type Config = PflashImage;
    type Handle = ActorHandle<PflashCfi01>;

    fn plug(image: PflashImage, ctx: PlugCtx) -> Result<Plugged<ActorHandle<PflashCfi01>>> {
        let PflashImage { config, content } = image;
        config.validate()?;
        let size = config.size();
        if content.len() as u64 > size {
            let reason = format!("{} bytes of content do not fit a flash of {size:#x} bytes", content.len());
            return Err(Error::InvalidConfig { device: "pflash", reason });
        }
        let spawned = Spawned::with_options(&ctx.name, PflashCfi01::new(config), ctx.irqs, &ctx.runtime, ctx.actor);
        let region =
            ctx.topology.new_rom_device_arc(&ctx.name, spawned.ops(0), OpsConfig::with_impl(1, 4), u128::from(size))?;
        let ram = region.ram()?;
        ram.write(0, &content)?;
        let start = content.len() as u64;
        fill_ones(&ram, start, size - start)?;
        let weak = region.downgrade();
        let handle = spawned.handle();
        handle.with(move |d, _| d.region = Some(weak))?;
        Ok(Plugged::new(vec![DeviceRegion::prefetchable(FLASH, region)], handle))
    }
}
