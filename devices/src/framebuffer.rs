//! A linear framebuffer: video RAM dirty-logged for the VGA client, plus a
//! small register block (an actor) through which the guest sets the mode.
//!
//! The guest draws into the video RAM with ordinary writes, which go straight
//! to host memory and mark their pages dirty for [`DirtyClient::Vga`]. A
//! display calls [`Framebuffer::update`] once per frame: it asks the
//! accelerators for their dirty logs (`sync_dirty_bitmap`: a KVM vCPU's
//! writes reach the bitmaps only so), harvests the dirty
//! pages (`snapshot_and_clear_dirty`) and maps them to the scanlines of the
//! current mode, so only those need redrawing. Dirty tracking is
//! page-granular, as in QEMU: a scanline is reported if any page it shows
//! bytes of was written, so with a stride below the page size neighbours of a
//! written scanline are reported too; with a stride that is a multiple of the
//! page size the report is exact.
//!
//! New video RAM starts dirty and a mode change makes the next update a full
//! one, so the first frame of each mode is drawn completely.
//!
//! # Registers
//!
//! 32-bit registers; other access sizes read 0 and are ignored.
//!
//! | offset | name | access |
//! | --- | --- | --- |
//! | 0x00 | width in pixels | read/write |
//! | 0x04 | height in scanlines | read/write |
//! | 0x08 | stride in bytes | read/write |
//! | 0x0c | format: bytes per pixel, 1 to 4 | read/write |
//! | 0x10 | video RAM size in bytes | read-only |
//! | 0x14 | status: bit 0 set if the mode is valid | read-only |
//!
//! A mode is valid when width, height and format are non-zero, the format is
//! at most 4, the stride holds a scanline, and `stride * height` fits the
//! video RAM. While it is not, nothing is scanned out.

#![forbid(unsafe_code)]

use crate::actor::{ActorHandle, Device, DeviceCtx, Spawned};
use crate::error::{Error, Result};
use crate::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged};
use std::ops::Range;
use topos_runtime::{DirtyClient, HwAddr, MemoryRegion, OpsConfig, Topology, PAGE_SIZE};

/// The role of the video RAM region (prefetchable memory).
pub const VRAM: &str = "vram";
/// The role of the register block region (memory).
pub const REGS: &str = "regs";

/// Register: width in pixels.
pub const REG_WIDTH: HwAddr = 0x00;
/// Register: height in scanlines.
pub const REG_HEIGHT: HwAddr = 0x04;
/// Register: stride in bytes.
pub const REG_STRIDE: HwAddr = 0x08;
/// Register: bytes per pixel.
pub const REG_FORMAT: HwAddr = 0x0c;
/// Register: video RAM size (read-only).
pub const REG_VRAM_SIZE: HwAddr = 0x10;
/// Register: status (read-only); bit 0 is set while the mode is valid.
pub const REG_STATUS: HwAddr = 0x14;
/// Size of the register block.
pub const REGS_SIZE: u64 = 0x20;

/// A scanout mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FbMode {
    /// Width in pixels.
    pub width: u32,
    /// Height in scanlines.
    pub height: u32,
    /// Bytes per pixel, 1 to 4.
    pub bytes_per_pixel: u32,
    /// Bytes from one scanline to the next.
    pub stride: u32,
}

impl FbMode {
    /// Whether the mode is usable with `vram_size` bytes of video RAM.
    pub fn fits(&self, vram_size: u64) -> bool {
        self.width > 0
            && self.height > 0
            && (1..=4).contains(&self.bytes_per_pixel)
            && self.line_bytes() <= self.stride as u64
            && self.stride as u64 * self.height as u64 <= vram_size
    }

    /// The bytes of one scanline that are shown (`width * bytes_per_pixel`).
    pub fn line_bytes(&self) -> u64 {
        self.width as u64 * self.bytes_per_pixel as u64
    }

    /// The byte range of scanline `y` that is shown.
    pub fn line_range(&self, y: u32) -> Range<u64> {
        let start = y as u64 * self.stride as u64;
        start..start + self.line_bytes()
    }
}

/// What changed since the previous [`Framebuffer::update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FbUpdate {
    /// The mode to draw with, or `None` if the guest's mode is not valid.
    pub mode: Option<FbMode>,
    /// The mode changed (or this is the first update): redraw everything.
    pub full: bool,
    /// The scanlines to redraw, as sorted, disjoint, non-adjacent ranges.
    pub dirty: Vec<Range<u32>>,
}

impl FbUpdate {
    /// The number of scanlines to redraw.
    pub fn dirty_lines(&self) -> u32 {
        self.dirty.iter().map(|r| r.end - r.start).sum()
    }
}

/// What makes a framebuffer: its video RAM size and initial mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FbConfig {
    /// Video RAM size in bytes (a power of two to be a PCI BAR).
    pub vram_size: u64,
    /// The mode the registers start in; it must fit the video RAM.
    pub mode: FbMode,
}

/// The register block's state, run as an actor.
#[derive(Debug)]
pub struct FbRegs {
    raw: FbMode,
    vram_size: u64,
    /// Bumped by every register write that changes a value.
    generation: u64,
    writes: u64,
}

impl FbRegs {
    /// The mode, if valid.
    pub fn mode(&self) -> Option<FbMode> {
        self.raw.fits(self.vram_size).then_some(self.raw)
    }

    /// The register values as last written, valid or not.
    pub fn raw_mode(&self) -> FbMode {
        self.raw
    }

    /// Counts register changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Register writes that reached the device.
    pub fn writes(&self) -> u64 {
        self.writes
    }
}

impl Device for FbRegs {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, size: u32) -> u64 {
        if size != 4 {
            return 0;
        }
        match addr {
            REG_WIDTH => self.raw.width as u64,
            REG_HEIGHT => self.raw.height as u64,
            REG_STRIDE => self.raw.stride as u64,
            REG_FORMAT => self.raw.bytes_per_pixel as u64,
            REG_VRAM_SIZE => self.vram_size.min(u32::MAX as u64),
            REG_STATUS => self.mode().is_some() as u64,
            _ => 0,
        }
    }

    fn write(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, value: u64, size: u32) {
        self.writes += 1;
        if size != 4 {
            return;
        }
        let v = value as u32;
        let field = match addr {
            REG_WIDTH => &mut self.raw.width,
            REG_HEIGHT => &mut self.raw.height,
            REG_STRIDE => &mut self.raw.stride,
            REG_FORMAT => &mut self.raw.bytes_per_pixel,
            _ => return,
        };
        if *field != v {
            *field = v;
            self.generation += 1;
        }
    }
}

/// A framebuffer as the display holds it: the video RAM and the register
/// block's actor (the handle of a plugged framebuffer).
pub struct Framebuffer {
    vram: MemoryRegion,
    handle: ActorHandle<FbRegs>,
    /// To ask accelerators for their dirty logs before a harvest.
    topo: Topology,
    /// Register generation and mode of the previous update.
    last: Option<(u64, Option<FbMode>)>,
}

impl std::fmt::Debug for Framebuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framebuffer").field("vram", &self.vram).field("regs", &self.handle).finish_non_exhaustive()
    }
}

/// Plugging a framebuffer: two regions, [`VRAM`] (RAM named
/// `{name}.vram`, logged for the VGA client, prefetchable) and [`REGS`] (the
/// register block, `{name}.regs`), both for memory; the handle is the
/// display side's [`Framebuffer`].
impl DeviceModel for FbRegs {
    type Config = FbConfig;
    type Handle = Framebuffer;

    fn plug(config: FbConfig, ctx: PlugCtx) -> Result<Plugged<Framebuffer>> {
        let FbConfig { vram_size, mode } = config;
        if !mode.fits(vram_size) {
            let reason = format!("mode {mode:?} does not fit {vram_size:#x} bytes of video RAM");
            return Err(Error::InvalidConfig { device: "framebuffer", reason });
        }
        let topo = &ctx.topology;
        let vram = topo.new_ram(&format!("{}.vram", ctx.name), u128::from(vram_size))?;
        vram.set_log(true, DirtyClient::Vga)?;
        let dev = FbRegs { raw: mode, vram_size, generation: 0, writes: 0 };
        let spawned = Spawned::with_options(&ctx.name, dev, ctx.irqs, &ctx.runtime, ctx.actor);
        let regs = topo.new_io_arc(
            &format!("{}.regs", ctx.name),
            spawned.ops(0),
            OpsConfig::with_impl(1, 4),
            u128::from(REGS_SIZE),
        )?;
        let fb = Framebuffer { vram: vram.clone(), handle: spawned.handle(), topo: topo.clone(), last: None };
        Ok(Plugged::new(vec![DeviceRegion::prefetchable(VRAM, vram), DeviceRegion::memory(REGS, regs)], fb))
    }
}

impl Framebuffer {
    /// The video RAM region.
    pub fn vram(&self) -> &MemoryRegion {
        &self.vram
    }

    /// A handle to the register block's actor.
    pub fn handle(&self) -> &ActorHandle<FbRegs> {
        &self.handle
    }

    /// The guest's current mode, if valid (`None` also if the register
    /// block is gone).
    pub fn mode(&self) -> Option<FbMode> {
        self.handle.with(|d, _| d.mode()).ok().flatten()
    }

    /// Harvests the dirty pages of the video RAM and reports the scanlines
    /// of the current mode that changed since the previous call. Clears what
    /// it reports: a second call without writes in between reports nothing.
    pub fn update(&mut self) -> Result<FbUpdate> {
        let (generation, mode) = self.handle.with(|d, _| (d.generation(), d.mode()))?;
        let size = self.vram.size() as u64;
        // Fold in what an accelerator logged (a KVM vCPU's writes never pass
        // through the runtime), as QEMU's snapshot does.
        if let Err(e) = self.topo.sync_dirty_bitmap(&self.vram) {
            tracing::warn!(region = self.vram.name(), "dirty-log sync before a framebuffer update failed: {e}");
        }
        // Harvest before the pixels are read: a write after this is
        // reported by the next update.
        let harvest = self.vram.snapshot_and_clear_dirty(0, size, DirtyClient::Vga);
        let full = self.last.is_none_or(|(g, m)| g != generation || m != mode);
        self.last = Some((generation, mode));
        let Some(mode) = mode else {
            return Ok(FbUpdate { mode: None, full, dirty: Vec::new() });
        };
        let dirty = if full {
            std::iter::once(0..mode.height).collect()
        } else {
            match harvest {
                Ok((first, bits)) => scanlines(&mode, first, &bits),
                // Cannot happen for a region of our own size; redraw all.
                Err(_) => std::iter::once(0..mode.height).collect(),
            }
        };
        Ok(FbUpdate { mode: Some(mode), full, dirty })
    }

    /// Copies the shown bytes of scanline `y` of `mode` into `out` (at most
    /// `out.len()` bytes); returns how many were copied.
    pub fn read_scanline(&self, mode: &FbMode, y: u32, out: &mut [u8]) -> usize {
        if y >= mode.height {
            return 0;
        }
        let r = mode.line_range(y);
        let n = ((r.end - r.start) as usize).min(out.len());
        match self.vram.ram().and_then(|ram| ram.read(r.start, &mut out[..n])) {
            Ok(()) => n,
            Err(_) => 0,
        }
    }
}

/// Maps dirty pages (bit `i` of word `j` is page `first + 64 * j + i`) to
/// the scanlines of `mode` that show a byte of a dirty page.
fn scanlines(mode: &FbMode, first: u64, bits: &[u64]) -> Vec<Range<u32>> {
    let dirty = |page: u64| -> bool {
        let Some(rel) = page.checked_sub(first) else { return false };
        bits.get((rel / 64) as usize).is_some_and(|w| w >> (rel % 64) & 1 != 0)
    };
    let mut out: Vec<Range<u32>> = Vec::new();
    for y in 0..mode.height {
        let r = mode.line_range(y);
        let hit = (r.start / PAGE_SIZE..=(r.end - 1) / PAGE_SIZE).any(dirty);
        if hit {
            match out.last_mut() {
                Some(last) if last.end == y => last.end = y + 1,
                _ => out.push(y..y + 1),
            }
        }
    }
    out
}
