//! The interpreter's per-vCPU working state ([`Core`]) and its memory path:
//! segment checks, the software TLB (guest page → host RAM page or MMIO),
//! and the accesses every instruction makes through them.
//!
//! A TLB entry is tagged with the linear page and the privilege it was
//! filled for; RAM entries hold the runtime's [`RamPage`], so a hit is an
//! index, a compare and one atomic load or store into guest RAM — no lock,
//! no allocation. Entries are valid for one view generation of the memory
//! address space: the run loop compares it once per block
//! ([`Accessor::is_at`](topos_runtime::Accessor::is_at)) and
//! flushes on a change, as it does on CR0/CR3/CR4 writes and `invlpg`.

use super::apic::Apic;
use super::coalesced::CoalescedBuffer;
use super::event::{gp, ss, Event, Step};
use super::paging::Access;
use super::state::{attr, flag, CpuState, SegReg};
use crate::backend::{Space, VcpuIo};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use topos_runtime::{MemTxResult, MemoryRegionSection, PageTarget, RamPage};

const TLB_BITS: u32 = 8;
const TLB_SIZE: usize = 1 << TLB_BITS;
/// A tag no linear page matches (real tags have bit 1 clear).
const INVALID: u32 = 2;

#[derive(Debug, Clone)]
enum Target {
    Ram(RamPage),
    /// Anything that is not one RAM page (at the entry's `phys`): the
    /// accessor dispatches.
    Mmio,
    /// This CPU's local APIC page.
    Apic,
}

#[derive(Debug, Clone)]
struct TlbEntry {
    read_tag: u32,
    write_tag: u32,
    /// The tag for instruction fetches (not set for a no-execute page).
    fetch_tag: u32,
    /// The physical page.
    phys: u64,
    target: Target,
    /// The coalesced ranges (physical, end exclusive) within an MMIO page.
    coalesced: Option<Arc<[(u64, u64)]>>,
    /// The offset bits of the page it was filled from (0xfff, or those of a
    /// 4 MiB or 2 MiB page).
    page_mask: u32,
}

impl Default for TlbEntry {
    fn default() -> TlbEntry {
        TlbEntry {
            read_tag: INVALID,
            write_tag: INVALID,
            fetch_tag: INVALID,
            phys: 0,
            target: Target::Mmio,
            coalesced: None,
            page_mask: 0xfff,
        }
    }
}

/// The per-vCPU state the instruction handlers work on.
pub(crate) struct Core {
    /// The architectural registers.
    pub(crate) s: CpuState,
    /// The vCPU's path to the machine.
    pub(crate) io: VcpuIo,
    /// Where EIP goes when the current instruction retires.
    pub(crate) next_eip: u32,
    /// Interrupts are inhibited until the next instruction retires (after
    /// `sti`, `mov ss`, `pop ss`).
    pub(crate) shadow: bool,
    /// The local APIC, when the CPU has one.
    pub(crate) apic: Option<Box<dyn Apic>>,
    /// Set by kicks; polled once per block.
    pub(crate) attention: Arc<AtomicBool>,
    /// Instructions retired.
    pub(crate) retired: u64,
    /// Events delivered (exceptions, interrupts) so far.
    pub(crate) deliveries: u64,
    /// The TSC's origin (the TSC counts nanoseconds from it).
    pub(crate) tsc_origin: std::time::Instant,
    /// Added to the TSC (written by `wrmsr` to IA32_TSC).
    pub(crate) tsc_offset: u64,
    /// The CPU's index (its APIC ID when it has an APIC).
    pub(crate) index: u32,
    /// How many CPUs the machine has (`cpuid` reports it).
    pub(crate) cpus: u32,
    /// The memory view changed since the code cache last looked.
    pub(crate) view_changed: bool,
    tlb: Box<[TlbEntry]>,
    /// The memory view generation the TLB entries are valid for.
    tlb_generation: u64,
    /// 1 when CPL is 3 (the privilege bit of TLB tags).
    user: u32,
    /// Protected mode (CR0.PE and not virtual-8086).
    prot: bool,
    /// Misaligned data accesses raise `#AC` (CPL 3, CR0.AM, EFLAGS.AC).
    align_check: bool,
    /// NMIs are blocked until the next `iret` (one is being handled).
    pub(crate) nmi_blocked: bool,
    /// The APIC page when the APIC is enabled.
    apic_page: Option<u64>,
    /// Set when a TLB flush happened (the code cache follows).
    pub(crate) flushed: bool,
    /// Some entry was filled from a large page since the last flush.
    large_cached: bool,
    /// Where writes to coalesced MMIO ranges are buffered, if anywhere.
    pub(crate) coalesced: Option<Arc<CoalescedBuffer>>,
    /// This vCPU buffered a coalesced write since it last flushed.
    coalesced_pushed: bool,
}

impl Core {
    pub(crate) fn new(io: VcpuIo, index: u32, apic: Option<Box<dyn Apic>>) -> Core {
        let mut c = Core {
            s: CpuState::reset(),
            io,
            next_eip: 0,
            shadow: false,
            apic_page: apic.as_ref().and_then(|a| a.page()),
            apic,
            attention: Arc::new(AtomicBool::new(false)),
            retired: 0,
            deliveries: 0,
            tsc_origin: std::time::Instant::now(),
            tsc_offset: 0,
            index,
            cpus: 1,
            view_changed: false,
            tlb: vec![TlbEntry::default(); TLB_SIZE].into_boxed_slice(),
            tlb_generation: u64::MAX,
            user: 0,
            prot: false,
            align_check: false,
            nmi_blocked: false,
            flushed: true,
            large_cached: false,
            coalesced: None,
            coalesced_pushed: false,
        };
        c.mode_changed();
        c
    }

    /// Recomputes what depends on CR0, EFLAGS.VM and CS (call after any of
    /// them changes).
    pub(crate) fn mode_changed(&mut self) {
        self.prot = self.s.protected();
        let user = u32::from(self.s.cpl() == 3);
        self.user = user;
        self.align_check = user == 1 && self.s.cr0 & super::state::cr0::AM != 0 && self.s.flags.base() & flag::AC != 0;
    }

    /// Makes the next accesses supervisor accesses until the next
    /// [`mode_changed`](Self::mode_changed) (an interrupt's pushes onto an
    /// inner stack).
    pub(crate) fn set_supervisor(&mut self) {
        self.user = 0;
    }

    /// Protected mode (not real, not virtual-8086).
    #[inline]
    pub(crate) fn prot(&self) -> bool {
        self.prot
    }

    /// Drops every TLB entry.
    pub(crate) fn flush_tlb(&mut self) {
        for e in self.tlb.iter_mut() {
            *e = TlbEntry::default();
        }
        self.flushed = true;
        self.large_cached = false;
    }

    /// Drops the entries of the page `la` is in (`invlpg`): its own, and
    /// when it is a 4 MiB or 2 MiB page cached as several 4 KiB entries,
    /// all of them (SDM 4.10.2.3).
    pub(crate) fn flush_page(&mut self, la: u32) {
        self.tlb[(la >> 12) as usize & (TLB_SIZE - 1)] = TlbEntry::default();
        if self.large_cached {
            for e in self.tlb.iter_mut() {
                let large = !(e.page_mask | 0xfff);
                if e.page_mask != 0xfff && e.read_tag & large == la & large {
                    *e = TlbEntry::default();
                }
            }
        }
    }

    /// Whether the memory view the TLB was filled from is still the
    /// published one (not whether the memory accessor's is: any device
    /// access loads the newest view into it).
    #[inline]
    pub(crate) fn tlb_is_current(&self) -> bool {
        self.io.memory_ref().is_at(self.tlb_generation)
    }

    /// Flushes the TLB if the memory view changed since it was filled.
    #[inline]
    pub(crate) fn revalidate(&mut self) {
        if !self.tlb_is_current() {
            self.io.memory().refresh();
            self.tlb_generation = self.io.memory().generation();
            self.flush_tlb();
            self.view_changed = true;
        }
    }

    /// The APIC's page moved or was enabled/disabled.
    pub(crate) fn apic_moved(&mut self) {
        self.apic_page = self.apic.as_ref().and_then(|a| a.page());
        self.flush_tlb();
    }

    fn fill(&mut self, la: u32, access: Access, user: u32) -> Step<usize> {
        let walk = self.walk(la, access, user != 0)?;
        let page = walk.phys & !0xfff;
        let idx = (la >> 12) as usize & (TLB_SIZE - 1);
        let mut coalesced = None;
        let target = if Some(page) == self.apic_page {
            Target::Apic
        } else {
            let t = self.io.memory().translate(page);
            if t.generation() != self.tlb_generation {
                self.flush_tlb();
                self.tlb_generation = t.generation();
                self.view_changed = true;
            }
            match t.target() {
                PageTarget::Ram(p) => Target::Ram(p.clone()),
                PageTarget::Mmio(section) => {
                    if self.coalesced.is_some() {
                        coalesced = coalesced_ranges(section);
                    }
                    Target::Mmio
                }
                _ => Target::Mmio,
            }
        };
        let tag = (la & !0xfff) | user;
        let e = &mut self.tlb[idx];
        e.read_tag = tag;
        e.write_tag = if walk.writable { tag } else { INVALID };
        e.fetch_tag = if walk.executable { tag } else { INVALID };
        e.phys = page;
        e.target = target;
        e.coalesced = coalesced;
        e.page_mask = walk.page_mask;
        self.large_cached |= walk.page_mask != 0xfff;
        Ok(idx)
    }

    /// The TLB index of `la`'s page for `access`, filling it if needed.
    #[inline]
    fn entry(&mut self, la: u32, access: Access, user: u32) -> Step<usize> {
        let idx = (la >> 12) as usize & (TLB_SIZE - 1);
        let tag = (la & !0xfff) | user;
        let e = &self.tlb[idx];
        let hit = match access {
            Access::Write => e.write_tag == tag,
            Access::Read => e.read_tag == tag,
            Access::Fetch => e.fetch_tag == tag,
        };
        if hit {
            Ok(idx)
        } else {
            self.fill(la, access, user)
        }
    }

    /// The physical address `la` translates to for `access` (at the
    /// current privilege).
    pub(crate) fn phys(&mut self, la: u32, access: Access) -> Step<u64> {
        let idx = self.entry(la, access, self.user)?;
        Ok(self.tlb[idx].phys | u64::from(la & 0xfff))
    }

    /// Translates the `size` bytes at `la` for writing at the current
    /// privilege (both pages of an access that straddles two), without
    /// writing: a read-modify-write does this before it reads, so that its
    /// `#PF` reports a write, as the CPU's does.
    pub(crate) fn probe_write(&mut self, la: u32, size: usize) -> Step {
        self.probe_write_as(la, size, self.user)
    }

    /// [`probe_write`](Self::probe_write) at privilege `user`.
    fn probe_write_as(&mut self, la: u32, size: usize, user: u32) -> Step {
        self.entry(la, Access::Write, user)?;
        let last = la.wrapping_add(size as u32 - 1);
        if last & !0xfff != la & !0xfff {
            self.entry(last & !0xfff, Access::Write, user)?;
        }
        Ok(())
    }

    /// The RAM page code at `la` is fetched from, if it is RAM or ROM.
    pub(crate) fn code_page(&mut self, la: u32) -> Option<RamPage> {
        let idx = self.entry(la, Access::Fetch, self.user).ok()?;
        match &self.tlb[idx].target {
            Target::Ram(p) => Some(p.clone()),
            _ => None,
        }
    }

    /// Reads `size` (1, 2, 4 or 8) bytes at linear `la`.
    #[inline]
    pub(crate) fn read_lin(&mut self, la: u32, size: usize) -> Step<u64> {
        self.read_as(la, size, self.user, Access::Read)
    }

    /// Reads for a supervisor access (descriptor tables, the TSS).
    pub(crate) fn read_sys(&mut self, la: u32, size: usize) -> Step<u64> {
        self.read_as(la, size, 0, Access::Read)
    }

    /// Writes for a supervisor access (descriptor Accessed bits).
    pub(crate) fn write_sys(&mut self, la: u32, value: u64, size: usize) -> Step {
        self.write_as(la, value, size, 0)
    }

    /// Reads code bytes (for the decoder).
    pub(crate) fn fetch_byte(&mut self, la: u32) -> Step<u8> {
        Ok(self.read_as(la, 1, self.user, Access::Fetch)? as u8)
    }

    #[inline(always)]
    fn read_as(&mut self, la: u32, size: usize, user: u32, access: Access) -> Step<u64> {
        let off = (la & 0xfff) as usize;
        if off + size <= 0x1000 {
            let e = &self.tlb[(la >> 12) as usize & (TLB_SIZE - 1)];
            let tag = if access == Access::Fetch { e.fetch_tag } else { e.read_tag };
            if tag == (la & !0xfff) | user {
                match &e.target {
                    Target::Ram(p) => return Ok(p.load(off, size)),
                    Target::Mmio if access != Access::Fetch => {
                        let addr = e.phys | off as u64;
                        return self.mmio_read(addr, size);
                    }
                    _ => {}
                }
            }
        }
        self.read_slow(la, size, user, access)
    }

    #[inline(never)]
    fn read_slow(&mut self, la: u32, size: usize, user: u32, access: Access) -> Step<u64> {
        let off = (la & 0xfff) as usize;
        if off + size > 0x1000 {
            let mut v = 0u64;
            for i in 0..size {
                v |= self.read_as(la.wrapping_add(i as u32), 1, user, access)? << (8 * i);
            }
            return Ok(v);
        }
        let idx = self.entry(la, access, user)?;
        match &self.tlb[idx].target {
            Target::Ram(p) => Ok(p.load(off, size)),
            Target::Mmio => {
                let addr = self.tlb[idx].phys | off as u64;
                self.mmio_read(addr, size)
            }
            Target::Apic => Ok(self.apic_read(off, size)),
        }
    }

    /// Writes the low `size` bytes of `value` at linear `la`.
    #[inline]
    pub(crate) fn write_lin(&mut self, la: u32, value: u64, size: usize) -> Step {
        self.write_as(la, value, size, self.user)
    }

    #[inline]
    fn write_as(&mut self, la: u32, value: u64, size: usize, user: u32) -> Step {
        let off = (la & 0xfff) as usize;
        if off + size <= 0x1000 {
            let e = &self.tlb[(la >> 12) as usize & (TLB_SIZE - 1)];
            if e.write_tag == (la & !0xfff) | user {
                match &e.target {
                    Target::Ram(p) if p.store(off, value, size) => return Ok(()),
                    Target::Mmio if e.coalesced.is_none() => {
                        let addr = e.phys | off as u64;
                        return self.mmio_write(addr, value, size);
                    }
                    _ => {}
                }
            }
        }
        self.write_slow(la, value, size, user)
    }

    #[inline(never)]
    fn write_slow(&mut self, la: u32, value: u64, size: usize, user: u32) -> Step {
        let off = (la & 0xfff) as usize;
        if off + size > 0x1000 {
            // Both pages must be writable before any byte is written; a
            // fault on the second reports its first byte in CR2.
            self.probe_write_as(la, size, user)?;
            for i in 0..size {
                self.write_as(la.wrapping_add(i as u32), value >> (8 * i), 1, user)?;
            }
            return Ok(());
        }
        let idx = self.entry(la, Access::Write, user)?;
        match &self.tlb[idx].target {
            Target::Ram(p) if p.store(off, value, size) => return Ok(()),
            Target::Apic => {
                self.apic_write(off, value, size);
                return Ok(());
            }
            // MMIO, ROM or a ROM device: the accessor dispatches the write.
            _ => {}
        }
        let addr = self.tlb[idx].phys | off as u64;
        if let (Some(ranges), Some(buf)) = (&self.tlb[idx].coalesced, &self.coalesced) {
            let end = addr + size as u64;
            if ranges.iter().any(|&(s, e)| s <= addr && end <= e) {
                buf.push(addr, value, size);
                self.coalesced_pushed = true;
                return Ok(());
            }
        }
        self.mmio_write(addr, value, size)
    }

    /// A read dispatched through the memory view (MMIO, or anything that is
    /// not one RAM page).
    #[inline]
    fn mmio_read(&mut self, addr: u64, size: usize) -> Step<u64> {
        self.flush_coalesced();
        let (v, r) = self.io.mmio_read_value(addr, size as u32);
        self.stop_on_fault(r)?;
        Ok(v)
    }

    /// A write dispatched through the memory view.
    #[inline]
    fn mmio_write(&mut self, addr: u64, value: u64, size: usize) -> Step {
        self.flush_coalesced();
        let r = self.io.mmio_write_value(addr, value, size as u32);
        self.stop_on_fault(r)
    }

    /// `Err(AccessFault)` when an access's result is one the VM's policy
    /// stops on (recorded in the `VcpuIo`, which the vCPU layer reads).
    #[inline]
    fn stop_on_fault(&self, r: MemTxResult) -> Step {
        if r == MemTxResult::ReservationAccess && self.io.has_fault() {
            return Err(Event::AccessFault);
        }
        Ok(())
    }

    fn apic_read(&mut self, off: usize, size: usize) -> u64 {
        let Some(apic) = self.apic.as_mut() else { return 0 };
        let reg = apic.read((off & !0xf) as u32);
        let shift = (off & 3) * 8;
        let v = u64::from(reg >> shift);
        if size >= 8 {
            v
        } else {
            v & ((1u64 << (size * 8)) - 1)
        }
    }

    fn apic_write(&mut self, off: usize, value: u64, size: usize) {
        let Some(apic) = self.apic.as_mut() else { return };
        // Only aligned 32-bit writes reach an xAPIC register; others are
        // dropped as on hardware, with a trace.
        if off & 0xf == 0 && size >= 4 {
            apic.write(off as u32, value as u32);
        } else {
            tracing::debug!(off, size, "local APIC: unaligned or narrow write dropped");
        }
    }

    /// An atomic read-modify-write of `size` bytes at linear `la` (the
    /// `lock` prefix, `xchg` with memory): `f` maps the old value to the
    /// new one. Returns the old value.
    pub(crate) fn atomic_lin(&mut self, la: u32, size: usize, mut f: impl FnMut(u64) -> u64) -> Step<u64> {
        let off = (la & 0xfff) as usize;
        if off + size > 0x1000 {
            // Split across pages: a bus lock on hardware; here a read then a
            // write (documented: not atomic against other vCPUs).
            let old = self.read_lin(la, size)?;
            self.write_lin(la, f(old), size)?;
            return Ok(old);
        }
        let idx = self.entry(la, Access::Write, self.user)?;
        let addr = match &self.tlb[idx].target {
            Target::Apic => {
                let old = self.apic_read(off, size);
                self.apic_write(off, f(old), size);
                return Ok(old);
            }
            Target::Mmio | Target::Ram(_) => self.tlb[idx].phys | off as u64,
        };
        let (r, res) = self.io.memory().atomic_fetch_update(addr, size as u32, |old| Some(f(old)));
        let res = self.io.record(res, Space::Memory, addr, size, true);
        self.stop_on_fault(res)?;
        Ok(r.unwrap_or_else(|old| old))
    }

    /// The linear address of `off` in segment `seg` for an access of
    /// `size` bytes, after the limit and type checks (`#GP(0)`, or
    /// `#SS(0)` for the stack segment).
    #[inline]
    pub(crate) fn seg_addr(&self, seg: usize, off: u32, size: u32, write: bool) -> Step<u32> {
        let s = &self.s.seg[seg];
        let a = s.attrs;
        // The common case first: a present, expand-up, read/write data
        // segment with a 4 GiB limit, and an access that does not wrap.
        if s.limit == u32::MAX
            && a & (attr::P | attr::CODE | attr::DC | attr::RW) == attr::P | attr::RW
            && !self.align_check
            && off.checked_add(size - 1).is_some()
        {
            return Ok(s.base.wrapping_add(off));
        }
        let fault = || if seg == SegReg::Ss as usize { ss(0) } else { gp(0) };
        if self.prot {
            if a & attr::P == 0 {
                return Err(fault());
            }
            if write {
                if a & attr::CODE != 0 || a & attr::RW == 0 {
                    return Err(fault());
                }
            } else if a & (attr::CODE | attr::RW) == attr::CODE {
                return Err(fault());
            }
        }
        let last = u64::from(off) + u64::from(size) - 1;
        if a & (attr::CODE | attr::DC) == attr::DC {
            // Expand-down: valid offsets are above the limit.
            let top = if a & attr::DB != 0 { 0xffff_ffffu64 } else { 0xffff };
            if u64::from(off) <= u64::from(s.limit) || last > top {
                return Err(fault());
            }
        } else if last > u64::from(s.limit) {
            return Err(fault());
        }
        let la = s.base.wrapping_add(off);
        if self.align_check && size.is_power_of_two() && la & (size - 1) != 0 {
            return Err(Event::exception(super::event::vector::AC, Some(0)));
        }
        Ok(la)
    }

    /// Reads `size` bytes at `seg:off`.
    #[inline]
    pub(crate) fn read_seg(&mut self, seg: usize, off: u32, size: usize) -> Step<u64> {
        let la = self.seg_addr(seg, off, size as u32, false)?;
        self.read_lin(la, size)
    }

    /// Writes `size` bytes at `seg:off`.
    #[inline]
    pub(crate) fn write_seg(&mut self, seg: usize, off: u32, value: u64, size: usize) -> Step {
        let la = self.seg_addr(seg, off, size as u32, true)?;
        self.write_lin(la, value, size)
    }

    /// Whether the stack is 32-bit (SS.B).
    #[inline]
    pub(crate) fn stack32(&self) -> bool {
        self.s.seg[SegReg::Ss as usize].is_32()
    }

    /// ESP or SP, as the stack size says.
    #[inline]
    pub(crate) fn sp(&self) -> u32 {
        if self.stack32() {
            self.s.gpr[4]
        } else {
            self.s.gpr[4] & 0xffff
        }
    }

    #[inline]
    pub(crate) fn set_sp(&mut self, v: u32) {
        if self.stack32() {
            self.s.gpr[4] = v;
        } else {
            self.s.gpr[4] = (self.s.gpr[4] & 0xffff_0000) | (v & 0xffff);
        }
    }

    /// The stack offset `delta` bytes from the top, wrapped to the stack size.
    #[inline]
    pub(crate) fn sp_offset(&self, delta: u32) -> u32 {
        let v = self.sp().wrapping_add(delta);
        if self.stack32() {
            v
        } else {
            v & 0xffff
        }
    }

    /// Pushes `size` bytes.
    #[inline]
    pub(crate) fn push(&mut self, value: u32, size: usize) -> Step {
        let sp = self.sp_offset((size as u32).wrapping_neg());
        self.write_seg(SegReg::Ss as usize, sp, u64::from(value), size)?;
        self.set_sp(sp);
        Ok(())
    }

    /// Pops `size` bytes.
    #[inline]
    pub(crate) fn pop(&mut self, size: usize) -> Step<u32> {
        let sp = self.sp();
        let v = self.read_seg(SegReg::Ss as usize, sp, size)? as u32;
        self.set_sp(self.sp_offset(size as u32));
        Ok(v)
    }

    /// Reads the stack `delta` bytes above the top without popping.
    pub(crate) fn peek(&mut self, delta: u32, size: usize) -> Step<u32> {
        let off = self.sp_offset(delta);
        Ok(self.read_seg(SegReg::Ss as usize, off, size)? as u32)
    }

    /// Replays this vCPU's buffered coalesced writes (before an access
    /// that is dispatched, and when the vCPU leaves the run loop).
    #[inline]
    pub(crate) fn flush_coalesced(&mut self) {
        // Only this vCPU fills its buffer: nothing to look at unless it
        // buffered a write since its last flush (the hook may have drained
        // it since; then the flush finds it empty).
        if !self.coalesced_pushed {
            return;
        }
        self.coalesced_pushed = false;
        if let Some(b) = &self.coalesced {
            b.flush();
        }
    }

    /// A port read.
    pub(crate) fn port_in(&mut self, port: u16, size: usize) -> Step<u32> {
        self.flush_coalesced();
        let (v, r) = self.io.pio_read_value(port, size as u32);
        self.stop_on_fault(r)?;
        Ok(v as u32)
    }

    /// A port write.
    pub(crate) fn port_out(&mut self, port: u16, value: u32, size: usize) -> Step {
        self.flush_coalesced();
        let r = self.io.pio_write_value(port, u64::from(value), size as u32);
        self.stop_on_fault(r)
    }

    /// EFLAGS.IF.
    #[inline]
    pub(crate) fn interrupts_enabled(&self) -> bool {
        self.s.flags.base() & flag::IF != 0
    }

    /// The TSC now.
    pub(crate) fn tsc(&self) -> u64 {
        (self.tsc_origin.elapsed().as_nanos() as u64).wrapping_add(self.tsc_offset)
    }
}

/// The coalesced ranges of an MMIO page's region that fall in the page
/// (the section `translate` gives for it), as physical ranges (end
/// exclusive).
fn coalesced_ranges(section: &MemoryRegionSection) -> Option<Arc<[(u64, u64)]>> {
    let out: Vec<(u64, u64)> = section.coalesced_ranges().into_iter().map(|(s, len)| (s, s + len)).collect();
    (!out.is_empty()).then(|| out.into())
}
