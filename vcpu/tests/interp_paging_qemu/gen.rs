//! The generator: a seeded random scenario — page tables in the pool, and
//! a sequence of accesses, `invlpg`s, CR3 loads, CR0.WP changes and
//! page-table edits, at CPL 0 and 3 — that stays inside what the
//! architecture defines, so that two correct CPUs end in the same state.
//!
//! # What keeps it defined
//!
//! * **Nothing escapes.** The system part's entries (its page table and
//!   its PDE, the PDPTEs) are never written by the test, and every entry a
//!   test can write points into the pool: PDEs are written only with
//!   chosen values (a pool frame, their own page directory for a recursive
//!   map, or the scenario's base for a large page), and every byte the
//!   test writes anywhere is "entry-like": its place in an 8-byte (PAE) or
//!   4-byte entry decides it, so that bits 16-31 name the pool's 64 KiB
//!   block and bits 32-39 stay zero (see [`Gen::entry_byte`]). The walk
//!   ([`Machine`]) says where each access lands; an access landing outside
//!   the pool, or a write landing in the code frames, is not emitted.
//! * **No stale translation is used.** A page may be cached by the TLB
//!   (and its entries by the paging-structure caches) at any time since it
//!   was last invalidated, so an access is emitted only to a page whose
//!   walk has not changed since: a write to any entry on a page's walk
//!   makes the page *stale* until `invlpg` (of the page, or of another page
//!   of the same large page when it has been a large page all along — SDM
//!   4.10.2.3), a CR3 load, or the handler's `invlpg` after a fix-up.
//!   This also keeps the Accessed and Dirty bits defined: a page whose
//!   entries were rewritten is not used again before it is invalidated.
//! * **Implementation-specific bits are noted.** When a walk faults,
//!   whether the Accessed bits of the entries it read were set is up to the
//!   implementation (QEMU sets them in the upper levels, KVM and the
//!   interpreter do not); likewise for the first page of an access whose
//!   second page faults, and for a read-modify-write whose write faults.
//!   Those bits are masked when comparing ([`Scenario::undefined`]) until a
//!   later successful access defines them again, and no access reads them
//!   meanwhile.
//! * **An access does not modify an entry of its own walk** with a
//!   read-modify-write: whether the value it reads holds the Dirty bit its
//!   translation sets is the implementation's choice (the host translates
//!   once, before reading; QEMU reads, then translates again to write).
//! * **The order of faults is unique.** A split access faults on at most
//!   one of its pages, and fix-ups are only attached to accesses that stay
//!   in one page.

use super::layout::*;
use super::model::{bit, pf, Kind, Machine, Missing, Paging, Translation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// The general registers an access can load into (EAX, ECX, EDX, EBX,
/// ESI, EDI as numbered by the CPU).
pub const DEST: [usize; 6] = [0, 1, 2, 3, 6, 7];

/// A read-modify-write ALU operation with an immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alu {
    Or,
    And,
    Xor,
}

/// What an access does (`size` in bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// `mov r32, [m]` or `movzx r32, byte/word [m]`.
    Load { size: u32, dst: usize },
    /// `mov [m], imm`.
    Store { size: u32, value: u32 },
    /// `mov r32, imm; mov [m], r32`.
    StoreReg { src: usize, value: u32 },
    /// `or/and/xor [m], imm`.
    Alu { op: Alu, size: u32, imm: u32 },
    /// `add byte [m], imm8`.
    AddByte { imm: u8 },
    /// `mov r32, imm; xchg [m], r32` (locked).
    Xchg { reg: usize, value: u32 },
    /// `mov esi, src; mov edi, m; movsb/movsd`.
    Movs { size: u32, src: u32 },
    /// `call m`: fetches `ret` (or `inc eax; ret`) from a code frame.
    Call,
}

impl Access {
    fn size(&self) -> u32 {
        match *self {
            Access::Load { size, .. } | Access::Store { size, .. } | Access::Alu { size, .. } => size,
            Access::Movs { size, .. } => size,
            Access::StoreReg { .. } | Access::Xchg { .. } => 4,
            Access::AddByte { .. } | Access::Call => 1,
        }
    }
}

/// One step of a scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// An access to linear `la` at CPL 3 (`user`) or 0; on its first #PF
    /// the handler sets `fix.1` in the entry at `fix.0`, invalidates the
    /// page and retries (else it skips the instruction).
    Access { user: bool, access: Access, la: u32, fix: Option<(u64, u32)> },
    /// `invlpg [la]`.
    Invlpg { la: u32 },
    /// A ring-0 store of an entry (`size` 4 or 8) through the identity map.
    Edit { pa: u64, value: u64, size: u32 },
    /// `mov cr3` (the same or the other top-level table); after a PDPTE
    /// edit, it follows in the same step.
    LoadCr3 { cr3: u32 },
    /// `mov cr0` changing WP.
    SetWp(bool),
    /// Into ring 3 (`iret`) or back (`int 0x30`).
    User(bool),
}

/// A #PF the model expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// The step (EBP) it happens in.
    pub step: u32,
    pub code: u32,
    pub cr2: u32,
    pub user: bool,
    /// A fetch fault (EIP is CR2).
    pub fetch: bool,
}

/// A generated scenario.
pub struct Scenario {
    pub seed: u64,
    pub paging: Paging,
    /// Whether CR0.WP is set at the start.
    pub wp: bool,
    /// The registers at the start (EAX..EDI).
    pub gpr: [u32; 8],
    /// The page tables and the pool at the start (the whole scenario's
    /// bytes; the rest is filled in by [`super::guest`]).
    pub memory: Vec<u8>,
    pub ops: Vec<Op>,
    /// What the model says each step does (for the listing).
    pub notes: Vec<String>,
    /// The #PFs the model expects, in order.
    pub expect: Vec<Expect>,
    /// Bits whose final value is implementation-specific: scenario offset →
    /// mask.
    pub undefined: BTreeMap<usize, u8>,
    /// CR3 of the two top-level tables.
    pub cr3: [u32; 2],
}

/// The CR3 values: page directories (32-bit) or PDPTs (PAE) A and B.
fn roots(paging: Paging) -> [u32; 2] {
    match paging {
        Paging::Legacy { .. } => [at(off::PD_A), at(off::PD_B)],
        Paging::Pae { .. } => [at(off::PDPT_A), at(off::PDPT_B)],
    }
}

/// A page the generator may access.
#[derive(Debug, Clone)]
struct Page {
    la: u32,
    /// No entry on its walk has changed since it was last invalidated.
    clean: bool,
    /// It has been a large page (base, PDE address) since then.
    large_since: Option<(u32, u64)>,
}

/// An access that must not be emitted.
struct Reject;

/// The generator's state.
struct Gen {
    rng: StdRng,
    m: Machine,
    pages: Vec<Page>,
    /// Entry address → its byte-0 bits that are implementation-specific.
    undefined: BTreeMap<u64, u8>,
    expect: Vec<Expect>,
    ops: Vec<Op>,
    notes: Vec<String>,
    user: bool,
    root: usize,
    /// Page directories, for edits.
    pds: Vec<u64>,
    /// The region indices (PDE index, or PDPTE index × 512 + PDE index).
    regions: Vec<u32>,
}

/// The system region's index (4 MiB page 1; PAE: PDPTE 0, PDE 2).
fn system_region(paging: Paging) -> u32 {
    match paging {
        Paging::Legacy { .. } => (BASE >> 22) as u32,
        Paging::Pae { .. } => (BASE >> 21) as u32,
    }
}

impl Gen {
    /// An entry's byte `pos` (its place in the entry), as the test writes
    /// it anywhere: flags and the low frame bits are free; bits 16-31 name
    /// the pool; in PAE, bits 32-39 are zero and bits 40-63 rarely set a
    /// reserved bit (or, often, NX).
    fn entry_byte(&mut self, pos: u64) -> u8 {
        // One random draw decides the byte (a byte, and two selectors).
        let r: u32 = self.rng.random();
        let (b, sel, sel2) = (r as u8, (r >> 8) as u8, (r >> 16) as u8);
        let nxe = self.m.paging.nx();
        match pos {
            // Present 85 % of the time.
            0 if sel < 218 => b | 1,
            0 => b & !1,
            1 => b,
            2 => (POOL >> 16) as u8,
            3 => (POOL >> 24) as u8,
            4 => 0,
            // A reserved bit 2 % of the time.
            5 | 6 if sel < 5 => b,
            5 | 6 => 0,
            _ => {
                // NX 30 % of the time with EFER.NXE (else 4 %: reserved),
                // reserved bits 3 %.
                let nx = if sel < if nxe { 77 } else { 10 } { 0x80 } else { 0 };
                let rsvd = if sel2 < 8 { b & 0x7f } else { 0 };
                nx | rsvd
            }
        }
    }

    /// The place of physical byte `pa` in an entry.
    fn pos(&self, pa: u64) -> u64 {
        pa % self.m.paging.entry()
    }

    /// A random page-table entry value (for the pool).
    fn entry_value(&mut self) -> u64 {
        let n = self.m.paging.entry();
        (0..n).fold(0u64, |v, i| v | (u64::from(self.entry_byte(i)) << (8 * i)))
    }

    /// A random PDE for page directory `pd`: a pool page table, the
    /// directory itself (a recursive map), or a large page at [`BASE`].
    fn pde_value(&mut self, pd: u64) -> u64 {
        let paging = self.m.paging;
        let mut flags: u64 = u64::from(self.rng.random::<u16>()) & 0xf7e;
        if self.rng.random_bool(0.9) {
            flags |= bit::P;
        }
        for b in [bit::RW, bit::US] {
            if self.rng.random_bool(0.75) {
                flags |= b;
            } else {
                flags &= !b;
            }
        }
        let large_ok = !matches!(paging, Paging::Legacy { pse: false });
        let r = self.rng.random_range(0..100);
        let mut v = if large_ok && r < 30 {
            let mut v = BASE | (flags & 0xfff) | bit::PS | (u64::from(self.rng.random_bool(0.5)) << 12);
            if self.rng.random_bool(0.05) {
                // A reserved bit: bit 21 (32-bit), one of 13-20 (PAE).
                v |= match paging {
                    Paging::Legacy { .. } => 1 << 21,
                    Paging::Pae { .. } => 1 << self.rng.random_range(13..21),
                };
            }
            v
        } else if r < 42 {
            pd | (flags & !bit::PS)
        } else {
            // Without CR4.PSE, PS is ignored: set it now and then.
            let frame = POOL + 0x1000 * self.rng.random_range(0..CODE_FRAMES[0]);
            let ps = if !large_ok && self.rng.random_bool(0.3) { bit::PS } else { 0 };
            frame | flags | ps
        };
        if let Paging::Pae { nxe } = paging {
            if self.rng.random_bool(if nxe { 0.3 } else { 0.03 }) {
                v |= bit::NX;
            }
            if self.rng.random_bool(0.03) {
                v |= 1 << self.rng.random_range(40..63);
            }
        }
        v
    }

    /// The interesting page of `la`, if any.
    fn page(&self, la: u32) -> Option<usize> {
        self.pages.iter().position(|p| p.la == la & !0xfff)
    }

    fn large_of(t: &Translation) -> Option<(u32, u64)> {
        t.result.ok().and_then(|m| m.large)
    }

    /// All pages are invalidated (CR3 load).
    fn flush_all(&mut self) {
        for i in 0..self.pages.len() {
            let t = self.m.translate(self.pages[i].la);
            self.pages[i].clean = true;
            self.pages[i].large_since = Self::large_of(&t);
        }
    }

    /// `invlpg la`: its page, and the pages of the same large page if
    /// both have been that large page since they were last invalidated.
    fn invalidate(&mut self, la: u32) {
        let own = Self::large_of(&self.m.translate(la));
        for i in 0..self.pages.len() {
            let p = &self.pages[i];
            let same_large = own.is_some() && p.large_since == own;
            if p.la == la & !0xfff || same_large {
                let t = self.m.translate(p.la);
                self.pages[i].clean = true;
                self.pages[i].large_since = Self::large_of(&t);
            }
        }
    }

    /// Writes `bytes` at `pa`; pages whose walk read any entry there become
    /// stale. `plain`: the bytes are stored, not combined with the old
    /// ones, so entries whose byte 0 is written have defined A/D bits again.
    fn modify(&mut self, pa: u64, bytes: &[u8], plain: bool) {
        let w = self.m.paging.entry();
        let end = pa + bytes.len() as u64;
        let before: Vec<Translation> = self.pages.iter().map(|p| self.m.translate(p.la)).collect();
        for (i, &b) in bytes.iter().enumerate() {
            self.m.write(pa + i as u64, 1, u64::from(b));
        }
        for (i, t) in before.iter().enumerate() {
            if t.path.iter().any(|&e| e < end && pa < e + w) {
                self.pages[i].clean = false;
                let now = Self::large_of(&self.m.translate(self.pages[i].la));
                if now != self.pages[i].large_since {
                    self.pages[i].large_since = None;
                }
            }
        }
        if plain {
            for a in pa..end {
                if a % w == 0 {
                    self.undefined.remove(&a);
                }
            }
        }
    }

    fn mark(&mut self, entry: u64, bits: u8) {
        *self.undefined.entry(entry).or_default() |= bits;
    }

    /// Notes what a faulting walk leaves implementation-specific: the
    /// Accessed bits of the present entries it read (all of them when the
    /// fault is one of permissions).
    fn mark_fault(&mut self, t: &Translation) {
        let upto = match t.result {
            Ok(_) => t.path.len(),
            Err(_) => t.path.len().saturating_sub(1),
        };
        for &e in &t.path[..upto] {
            self.mark(e, bit::A as u8);
        }
    }

    /// The physical address of `la` if it translates.
    fn phys(&self, la: u32) -> Option<u64> {
        self.m.translate(la).result.ok().map(|m| m.frame | u64::from(la & 0xfff))
    }

    fn in_pool(pa: u64) -> bool {
        (POOL..POOL + POOL_FRAMES * 0x1000).contains(&pa)
    }

    fn in_code(pa: u64) -> bool {
        CODE_FRAMES.iter().any(|f| (POOL + f * 0x1000..POOL + (f + 1) * 0x1000).contains(&pa))
    }

    /// Whether reading `pa` would see an implementation-specific bit.
    fn undefined_byte(&self, pa: u64) -> bool {
        self.undefined.get(&pa).is_some_and(|&m| m != 0)
    }

    /// Runs one attempt of `access` at `la` on the model: `Ok(None)` if it
    /// completes, `Ok(Some((code, cr2)))` if it faults.
    fn attempt(&mut self, user: bool, access: &mut Access, la: u32) -> Result<Option<(u32, u32)>, Reject> {
        let n = access.size();
        // (linear start, size, kind) of each operand, in the order checked.
        let mut checks: Vec<(u32, u32, Kind)> = vec![];
        match access {
            Access::Load { .. } => checks.push((la, n, Kind::Read)),
            Access::Store { .. } | Access::StoreReg { .. } | Access::Xchg { .. } => checks.push((la, n, Kind::Write)),
            // A read-modify-write translates for writing before it reads
            // (on the host CPU, its #PF reports W even when the page is
            // not present).
            Access::Alu { .. } | Access::AddByte { .. } => checks.push((la, n, Kind::Write)),
            Access::Movs { src, .. } => {
                checks.push((*src, n, Kind::Read));
                checks.push((la, n, Kind::Write));
            }
            Access::Call => checks.push((la, 1, Kind::Fetch)),
        }
        // Every page touched must be clean.
        for &(start, size, _) in &checks {
            for a in [start, start + size - 1] {
                match self.page(a) {
                    Some(i) if self.pages[i].clean => {}
                    _ => return Err(Reject),
                }
            }
        }
        let mut passed: Vec<(Translation, Kind)> = vec![];
        for &(start, size, kind) in &checks {
            let last = start + size - 1;
            let mut pages = vec![start & !0xfff];
            if last & !0xfff != start & !0xfff {
                pages.push(last & !0xfff);
            }
            for (k, &page) in pages.iter().enumerate() {
                let t = self.m.translate(page);
                if let Some(code) = self.m.fault(&t, kind, user) {
                    // A split access may fault on one page only (which one
                    // an implementation checks first is its choice).
                    if k == 0 && pages.len() > 1 {
                        let t2 = self.m.translate(pages[1]);
                        if self.m.fault(&t2, kind, user).is_some() {
                            return Err(Reject);
                        }
                    }
                    self.mark_fault(&t);
                    for (pt, pkind) in &passed {
                        self.mark_fault(&Translation { path: pt.path.clone(), result: Ok(pt.result.unwrap()) });
                        if *pkind == Kind::Write {
                            if let Some(&leaf) = pt.path.last() {
                                self.mark(leaf, bit::D as u8);
                            }
                        }
                    }
                    let cr2 = if k == 0 { start } else { page };
                    return Ok(Some((code, cr2)));
                }
                passed.push((t, kind));
            }
        }
        // Where every byte lands.
        let pas = |g: &Gen, start: u32, size: u32| -> Vec<u64> {
            (0..size).map(|i| g.phys(start + i).expect("translated")).collect()
        };
        let mut reads = vec![];
        let mut writes = vec![];
        for &(start, size, kind) in &checks {
            let p = pas(self, start, size);
            match kind {
                Kind::Read => reads = p,
                Kind::Write => writes = p,
                Kind::Fetch => {
                    let pa = p[0];
                    if !Self::in_code(pa) {
                        return Err(Reject);
                    }
                }
            }
        }
        if matches!(access, Access::Alu { .. } | Access::AddByte { .. } | Access::Xchg { .. }) {
            reads = writes.clone();
            // A read-modify-write of an entry its own walk uses: whether it
            // reads the Dirty bit its translation sets is the
            // implementation's choice (the host translates once, before
            // reading; QEMU reads, then translates again to write).
            let w = self.m.paging.entry();
            if passed.iter().flat_map(|(t, _)| &t.path).any(|&e| writes.iter().any(|&pa| (e..e + w).contains(&pa))) {
                return Err(Reject);
            }
        }
        if reads.iter().chain(&writes).any(|&pa| !Self::in_pool(pa))
            || writes.iter().any(|&pa| Self::in_code(pa))
            || reads.iter().any(|&pa| self.undefined_byte(pa))
        {
            return Err(Reject);
        }
        // Values, chosen now that the bytes' places in entries are known.
        let positions: Vec<u64> = writes.iter().map(|&pa| self.pos(pa)).collect();
        let free = |pos: u64| pos < 2;
        let mut new: Vec<u8> = vec![];
        let old: Vec<u8> = writes.iter().map(|&pa| self.m.byte(pa)).collect();
        match access {
            Access::Store { value, .. } | Access::StoreReg { value, .. } | Access::Xchg { value, .. } => {
                new = positions.iter().map(|&p| self.entry_byte(p)).collect();
                *value = new.iter().rev().fold(0u32, |v, &b| (v << 8) | u32::from(b));
            }
            Access::Alu { op, imm, .. } => {
                let mut bytes = vec![];
                for (i, &p) in positions.iter().enumerate() {
                    let b: u8 = if free(p) {
                        self.rng.random()
                    } else if *op == Alu::And {
                        0xff
                    } else {
                        0
                    };
                    bytes.push(b);
                    new.push(match op {
                        Alu::Or => old[i] | b,
                        Alu::And => old[i] & b,
                        Alu::Xor => old[i] ^ b,
                    });
                }
                *imm = bytes.iter().rev().fold(0u32, |v, &b| (v << 8) | u32::from(b));
            }
            Access::AddByte { imm } => {
                if !free(positions[0]) {
                    return Err(Reject);
                }
                new.push(old[0].wrapping_add(*imm));
            }
            Access::Movs { .. } => {
                if reads.iter().zip(&writes).any(|(&r, &w)| self.pos(r) != self.pos(w)) {
                    return Err(Reject);
                }
                new = reads.iter().map(|&pa| self.m.byte(pa)).collect();
            }
            Access::Load { .. } | Access::Call => {}
        }
        // It completes: the walks it made define their Accessed bits (and
        // a write's Dirty bit).
        for (t, kind) in &passed {
            for &e in &t.path {
                let bits = if *kind == Kind::Write && Some(&e) == t.path.last() { 0x60 } else { 0x20 };
                if let Some(m) = self.undefined.get_mut(&e) {
                    *m &= !bits;
                }
            }
        }
        let plain = matches!(access, Access::Store { .. } | Access::StoreReg { .. } | Access::Xchg { .. })
            || matches!(access, Access::Movs { .. });
        // Contiguous runs at once (a split write is two).
        let mut i = 0;
        while i < writes.len() {
            let mut j = i + 1;
            while j < writes.len() && writes[j] == writes[j - 1] + 1 {
                j += 1;
            }
            self.modify(writes[i], &new[i..j], plain);
            i = j;
        }
        Ok(None)
    }

    /// Runs `access` (with its fix-up) on the model; restores everything
    /// and says so if it must not be emitted.
    fn run_access(
        &mut self,
        step: u32,
        user: bool,
        access: &mut Access,
        la: u32,
        fix: Option<(u64, u32)>,
    ) -> Result<String, Reject> {
        let saved = (self.m.clone(), self.pages.clone(), self.undefined.clone(), self.expect.len());
        let mut note = String::new();
        let mut fixed = false;
        let r = loop {
            match self.attempt(user, access, la) {
                Ok(None) => {
                    note.push_str("completes");
                    break Ok(());
                }
                Ok(Some((code, cr2))) => {
                    let fetch = *access == Access::Call;
                    self.expect.push(Expect { step, code, cr2, user, fetch });
                    note.push_str(&format!("#PF({code:#x}) at {cr2:#x}; "));
                    match fix {
                        Some((pa, bits)) if !fixed && !fetch => {
                            fixed = true;
                            let old = self.m.read(pa, 4) as u32;
                            self.modify(pa, &(old | bits).to_le_bytes(), false);
                            self.invalidate(cr2);
                            note.push_str(&format!("fixed [{pa:#x}] |= {bits:#x}, retried: "));
                        }
                        _ => break Ok(()),
                    }
                }
                Err(Reject) => break Err(Reject),
            }
        };
        if r.is_err() {
            (self.m, self.pages, self.undefined) = (saved.0, saved.1, saved.2);
            self.expect.truncate(saved.3);
            return Err(Reject);
        }
        Ok(note)
    }

    /// A clean page, if any.
    fn clean_page(&mut self) -> Option<usize> {
        let clean: Vec<usize> = (0..self.pages.len()).filter(|&i| self.pages[i].clean).collect();
        (!clean.is_empty()).then(|| clean[self.rng.random_range(0..clean.len())])
    }

    /// An offset for a `size`-byte access in a page (sometimes crossing
    /// into the next one when that is interesting too).
    fn offset(&mut self, page: usize, size: u32) -> u32 {
        let la = self.pages[page].la;
        let next_ok = self.page(la.wrapping_add(0x1000)).is_some_and(|i| self.pages[i].clean);
        if size > 1 && next_ok && self.rng.random_bool(0.25) {
            return 0x1000 - self.rng.random_range(1..size);
        }
        let o = self.rng.random_range(0..0x1000 - size + 1);
        if self.rng.random_bool(0.7) {
            o & !(size - 1)
        } else {
            o
        }
    }

    /// The fix-up for a fault of `la` (an entry on its walk, or none).
    fn fix_for(&mut self, la: u32) -> Option<(u64, u32)> {
        if !self.rng.random_bool(0.35) {
            return None;
        }
        let t = self.m.translate(la);
        if t.result == Err(Missing::Reserved) || t.path.is_empty() {
            return None;
        }
        let e = match t.result {
            Err(_) => *t.path.last().unwrap(),
            Ok(_) => t.path[self.rng.random_range(0..t.path.len())],
        };
        self.editable(e).then(|| (e, [1, 3, 7, 6][self.rng.random_range(0..4)]))
    }

    /// Tries to generate and model one access.
    fn access(&mut self, step: u32, only: Option<usize>) -> Option<(Op, String)> {
        let user = self.user;
        for _ in 0..12 {
            let page = match only {
                Some(p) if self.pages[p].clean => p,
                Some(_) => return None,
                None => self.clean_page()?,
            };
            let dst = DEST[self.rng.random_range(0..DEST.len())];
            let size = [1, 2, 4, 4][self.rng.random_range(0..4)];
            let mut access = match self.rng.random_range(0..100) {
                0..=29 => Access::Load { size, dst },
                30..=49 => Access::Store { size, value: 0 },
                50..=54 => Access::StoreReg { src: dst, value: 0 },
                55..=64 => {
                    let op = [Alu::Or, Alu::And, Alu::Xor][self.rng.random_range(0..3)];
                    Access::Alu { op, size, imm: 0 }
                }
                65..=69 => Access::AddByte { imm: self.rng.random() },
                70..=77 => Access::Xchg { reg: dst, value: 0 },
                78..=87 => {
                    let src_page = self.clean_page()?;
                    let size = [1, 4][self.rng.random_range(0..2)];
                    let src = self.pages[src_page].la | self.offset(src_page, size);
                    Access::Movs { size, src }
                }
                _ => Access::Call,
            };
            let la = match access {
                Access::Call => {
                    // `inc eax; ret` pairs must stay in the page.
                    self.pages[page].la | self.rng.random_range(0..0xff0)
                }
                Access::Xchg { .. } | Access::AddByte { .. } | Access::Alu { .. } => {
                    let o = self.rng.random_range(0..0x1000 - access.size() + 1);
                    self.pages[page].la | o
                }
                _ => self.pages[page].la | self.offset(page, access.size()),
            };
            let split = (la & 0xfff) + access.size() > 0x1000;
            let fix = if split || access == Access::Call { None } else { self.fix_for(la) };
            if let Ok(note) = self.run_access(step, user, &mut access, la, fix) {
                return Some((Op::Access { user, access, la, fix }, note));
            }
        }
        None
    }

    /// Appends a step.
    fn push(&mut self, op: Op, note: String) {
        self.ops.push(op);
        self.notes.push(note);
    }

    /// Whether the entry at `e` may be edited: a pool entry, or a test
    /// region's PDE (never the system's).
    fn editable(&self, e: u64) -> bool {
        let w = self.m.paging.entry();
        Self::in_pool(e)
            || self.pds.iter().any(|&pd| {
                (pd..pd + 0x1000).contains(&e)
                    && self.regions.iter().any(|&r| u64::from(r) % (0x1000 / w) == (e - pd) / w)
            })
    }

    /// A pattern aimed at the TLB: use a page (and another page of the same
    /// large page), flip P, RW or US in an entry of its walk, invalidate
    /// it — with `invlpg` of the page, of the other page, or not at all —
    /// and use the pages again where the architecture says which entry
    /// counts.
    fn tlb_probe(&mut self) {
        let ok: Vec<usize> = (0..self.pages.len())
            .filter(|&i| self.pages[i].clean && self.m.translate(self.pages[i].la).result.is_ok())
            .collect();
        if ok.is_empty() {
            return;
        }
        let p = ok[self.rng.random_range(0..ok.len())];
        let large = Self::large_of(&self.m.translate(self.pages[p].la));
        let siblings: Vec<usize> = ok
            .iter()
            .copied()
            .filter(|&q| q != p && large.is_some() && Self::large_of(&self.m.translate(self.pages[q].la)) == large)
            .collect();
        let q = (!siblings.is_empty()).then(|| siblings[self.rng.random_range(0..siblings.len())]);
        for page in [Some(p), q].into_iter().flatten() {
            let step = self.ops.len() as u32;
            if let Some((op, note)) = self.access(step, Some(page)) {
                self.push(op, note);
            }
        }
        let t = self.m.translate(self.pages[p].la);
        let entries: Vec<u64> = t.path.iter().copied().filter(|&e| self.editable(e)).collect();
        if entries.is_empty() {
            return;
        }
        let e = entries[self.rng.random_range(0..entries.len())];
        let w = self.m.paging.entry();
        let value = self.m.read(e, w) ^ [bit::P, bit::RW, bit::US][self.rng.random_range(0..3)];
        self.modify(e, &value.to_le_bytes()[..w as usize], true);
        self.push(Op::Edit { pa: e, value, size: w as u32 }, format!("[{e:#x}] = {value:#x} (TLB probe)"));
        let target = match (self.rng.random_range(0..10), q) {
            (0..=4, _) => Some(p),
            (5..=7, Some(q)) => Some(q),
            _ => None,
        };
        if let Some(i) = target {
            let la = self.pages[i].la | (self.rng.random_range(0..0x1000) & !3);
            self.invalidate(la);
            self.push(Op::Invlpg { la }, String::new());
        }
        for page in [Some(p), q, Some(p)].into_iter().flatten() {
            let step = self.ops.len() as u32;
            if let Some((op, note)) = self.access(step, Some(page)) {
                self.push(op, note);
            }
        }
    }

    /// A PDE or pool-entry edit.
    fn edit(&mut self) -> (Op, String) {
        let w = self.m.paging.entry();
        let (pa, value) = if self.rng.random_bool(0.45) {
            let pd = self.pds[self.rng.random_range(0..self.pds.len())];
            let r = self.regions[self.rng.random_range(0..self.regions.len())];
            let idx = u64::from(r) % (0x1000 / w);
            (pd + idx * w, self.pde_value(pd))
        } else {
            // An entry on an interesting page's walk if it has a pool one.
            let i = self.rng.random_range(0..self.pages.len());
            let t = self.m.translate(self.pages[i].la);
            let at = t.path.iter().copied().find(|&e| Self::in_pool(e)).unwrap_or_else(|| {
                POOL + 0x1000 * self.rng.random_range(0..CODE_FRAMES[0]) + w * self.rng.random_range(0..0x1000 / w)
            });
            (at, self.entry_value())
        };
        self.modify(pa, &value.to_le_bytes()[..w as usize], true);
        (Op::Edit { pa, value, size: w as u32 }, format!("[{pa:#x}] = {value:#x}"))
    }

    /// A PDPTE edit (PAE), then CR3 loaded again.
    fn edit_pdpte(&mut self) -> (Op, String) {
        let root = self.rng.random_range(0..2);
        let pdpt = BASE + if root == 0 { off::PDPT_A } else { off::PDPT_B };
        let i = self.rng.random_range(1..4u64);
        let pd = BASE + off::PAE_PD + 0x1000 * self.rng.random_range(1..4u64);
        let value = pd | u64::from(self.rng.random_bool(0.85));
        let pa = pdpt + 8 * i;
        self.modify(pa, &value.to_le_bytes(), true);
        (Op::Edit { pa, value, size: 8 }, format!("PDPTE [{pa:#x}] = {value:#x} (CR3 reloaded)"))
    }

    fn load_cr3(&mut self, root: usize) -> (Op, String) {
        self.root = root;
        let cr3 = roots(self.m.paging)[root];
        self.m.load_cr3(cr3);
        self.flush_all();
        (Op::LoadCr3 { cr3 }, format!("cr3 = {cr3:#x}"))
    }
}

/// Generates scenario `seed`.
pub fn generate(seed: u64) -> Scenario {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7061_6769_6e67);
    let paging = if rng.random_bool(0.5) {
        Paging::Legacy { pse: rng.random_bool(0.75) }
    } else {
        Paging::Pae { nxe: rng.random_bool(0.5) }
    };
    let wp = rng.random_bool(0.5);
    let m = Machine { paging, mem: vec![0; USED], cr3: 0, pdpte: [0; 4], wp };
    let mut g = Gen {
        rng,
        m,
        pages: vec![],
        undefined: BTreeMap::new(),
        expect: vec![],
        ops: vec![],
        notes: vec![],
        user: false,
        root: 0,
        pds: vec![],
        regions: vec![],
    };
    build_tables(&mut g);
    let memory = g.m.mem.clone();
    let gpr: [u32; 8] = std::array::from_fn(|i| if i == 4 { STACK_TOP } else { g.rng.random() });
    g.load_cr3(0);
    let count = g.rng.random_range(30..90);
    while g.ops.len() < count {
        let step = g.ops.len() as u32;
        let pae = matches!(paging, Paging::Pae { .. });
        let r = g.rng.random_range(0..100);
        let privileged = !(0..=69).contains(&r);
        if g.user && privileged {
            g.ops.push(Op::User(false));
            g.notes.push("back to ring 0".into());
            g.user = false;
            continue;
        }
        if r < 8 && !g.user {
            g.tlb_probe();
            continue;
        }
        let (op, note) = match r {
            0..=59 => match g.access(step, None) {
                Some(x) => x,
                None if !g.user => {
                    let la = g.pages[g.rng.random_range(0..g.pages.len())].la;
                    g.invalidate(la);
                    (Op::Invlpg { la }, "invlpg (no access possible)".into())
                }
                None => continue,
            },
            60..=69 => {
                let to = !g.user;
                g.user = to;
                (Op::User(to), if to { "into ring 3".into() } else { "back to ring 0".into() })
            }
            70..=79 => {
                let stale: Vec<usize> = (0..g.pages.len()).filter(|&i| !g.pages[i].clean).collect();
                let i = if !stale.is_empty() && g.rng.random_bool(0.7) {
                    stale[g.rng.random_range(0..stale.len())]
                } else {
                    g.rng.random_range(0..g.pages.len())
                };
                let la = g.pages[i].la | (g.rng.random_range(0..0x1000) & !3);
                g.invalidate(la);
                (Op::Invlpg { la }, String::new())
            }
            80..=92 => g.edit(),
            93..=94 if pae => {
                let (op, note) = g.edit_pdpte();
                g.ops.push(op);
                g.notes.push(note);
                let root = g.root;
                g.load_cr3(root)
            }
            93..=96 => {
                let root = g.rng.random_range(0..2);
                g.load_cr3(root)
            }
            _ => {
                let to = !g.m.wp;
                g.m.wp = to;
                (Op::SetWp(to), String::new())
            }
        };
        g.ops.push(op);
        g.notes.push(note);
    }
    if g.user {
        g.ops.push(Op::User(false));
        g.notes.push("back to ring 0".into());
    }
    let undefined = g.undefined.iter().filter(|(_, &m)| m != 0).map(|(&a, &m)| ((a - BASE) as usize, m)).collect();
    Scenario {
        seed,
        paging,
        wp,
        gpr,
        memory,
        ops: g.ops,
        notes: g.notes,
        expect: g.expect,
        undefined,
        cr3: roots(paging),
    }
}

/// The page tables at the start: the system part's identity map, the
/// top-level tables, random PDEs for the test regions and random pool
/// frames; and the pages the generator will use.
fn build_tables(g: &mut Gen) {
    let paging = g.m.paging;
    let w = paging.entry();
    // The identity map of the scenario: supervisor, writable, accessed and
    // dirty (nothing the CPU would write), except the ring-3 pages.
    for i in 0..(USED as u64 / 0x1000) {
        let o = i * 0x1000;
        let flags: u64 = match o {
            off::USER | 0xa000 => 0x65,
            off::USER_STACK => 0x67,
            _ => 0x63,
        };
        let index = ((BASE + o) >> 12) & (0x1000 / w - 1);
        g.m.write(BASE + off::SYS_PT + index * w, w, (BASE + o) | flags);
    }
    let sys_pde = (BASE + off::SYS_PT) | 0x27;
    let sys = system_region(paging);
    let mut rng_regions = vec![];
    let (pds, span): (Vec<u64>, u32) = match paging {
        Paging::Legacy { .. } => (vec![BASE + off::PD_A, BASE + off::PD_B], 1024),
        Paging::Pae { .. } => ((0..5).map(|k| BASE + off::PAE_PD + 0x1000 * k).collect(), 2048),
    };
    // Every directory gets the regions' PDEs, so (PAE) no region may share
    // the system PDE's index in any of them.
    let per = if w == 4 { 1024 } else { 512 };
    while rng_regions.len() < 6 {
        let r = g.rng.random_range(0..span);
        if r % per != sys % per && !rng_regions.contains(&r) {
            rng_regions.push(r);
        }
    }
    match paging {
        Paging::Legacy { .. } => {
            for &pd in &pds {
                g.m.write(pd + u64::from(sys) * 4, 4, sys_pde);
            }
        }
        Paging::Pae { .. } => {
            // PD0 and PD4 hold the system PDE (PDPTE 0 of A and B).
            for k in [0, 4] {
                g.m.write(pds[k] + u64::from(sys % 512) * 8, 8, sys_pde);
            }
            for (i, &pd) in pds.iter().take(4).enumerate() {
                g.m.write(BASE + off::PDPT_A + 8 * i as u64, 8, pd | 1);
            }
            g.m.write(BASE + off::PDPT_B, 8, pds[4] | 1);
            for i in 1..4u64 {
                let pd = pds[g.rng.random_range(1..4)];
                let p = u64::from(g.rng.random_bool(0.85));
                g.m.write(BASE + off::PDPT_B + 8 * i, 8, pd | p);
            }
        }
    }
    // The test regions' PDEs in every directory (PAE: in every directory
    // at the region's PDE index; which PDPTE reaches it is the walk's
    // business).
    for &pd in &pds {
        for &r in &rng_regions {
            let at = pd + u64::from(r % (0x1000 / w as u32)) * w;
            let v = g.pde_value(pd);
            g.m.write(at, w, v);
        }
    }
    // The pool: entries everywhere but in the code frames.
    for f in 0..POOL_FRAMES {
        let frame = POOL + 0x1000 * f;
        if f == CODE_FRAMES[0] {
            for o in 0..0x1000 {
                g.m.write(frame + o, 1, 0xc3);
            }
        } else if f == CODE_FRAMES[1] {
            for o in 0..0x1000 {
                g.m.write(frame + o, 1, if o % 2 == 0 { 0x40 } else { 0xc3 });
            }
        } else {
            for e in 0..(0x1000 / w) {
                let v = g.entry_value();
                g.m.write(frame + e * w, w, v);
            }
        }
    }
    // Interesting pages: per region, pages that a large page maps to the
    // pool, random ones (one with its successor), and the pages a
    // recursive map shows the other regions' page tables at.
    let shift = if w == 4 { 22 } else { 21 };
    let mut las = vec![];
    for &r in &rng_regions {
        let base = r << shift;
        for _ in 0..2 {
            las.push(base | (g.rng.random_range(0x20..0x30) << 12));
        }
        let a = g.rng.random_range(0..per - 1);
        las.push(base | (a << 12));
        las.push(base | ((a + 1) << 12));
        las.push(base | (g.rng.random_range(0..per) << 12));
        let other = rng_regions[g.rng.random_range(0..rng_regions.len())];
        las.push(base | ((other % per) << 12));
    }
    las.sort_unstable();
    las.dedup();
    g.pages = las.into_iter().map(|la| Page { la, clean: true, large_since: None }).collect();
    g.pds = pds;
    g.regions = rng_regions;
}

/// A one-line description of `op`.
pub fn describe(op: &Op) -> String {
    match op {
        Op::Access { user, access, la, fix } => {
            let ring = if *user { "ring 3" } else { "ring 0" };
            let r = |i: &usize| ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"][*i];
            let what = match access {
                Access::Load { size, dst } => format!("load{size} {} <- [{la:#x}]", r(dst)),
                Access::Store { size, value } => format!("store{size} [{la:#x}] <- {value:#x}"),
                Access::StoreReg { src, value } => format!("store4 [{la:#x}] <- {} = {value:#x}", r(src)),
                Access::Alu { op, size, imm } => format!("{op:?}{size} [{la:#x}], {imm:#x}"),
                Access::AddByte { imm } => format!("add1 [{la:#x}], {imm:#x}"),
                Access::Xchg { reg, value } => format!("xchg4 [{la:#x}], {} = {value:#x}", r(reg)),
                Access::Movs { size, src } => format!("movs{size} [{la:#x}] <- [{src:#x}]"),
                Access::Call => format!("call {la:#x}"),
            };
            let fix = fix.map(|(pa, b)| format!(" (fix-up: [{pa:#x}] |= {b:#x})")).unwrap_or_default();
            format!("{ring}: {what}{fix}")
        }
        Op::Invlpg { la } => format!("invlpg [{la:#x}]"),
        Op::Edit { pa, value, size } => format!("edit{size} [{pa:#x}] = {value:#x}"),
        Op::LoadCr3 { cr3 } => format!("mov cr3, {cr3:#x}"),
        Op::SetWp(on) => format!("CR0.WP = {}", u8::from(*on)),
        Op::User(true) => "iret to ring 3".into(),
        Op::User(false) => "int 0x30 back to ring 0".into(),
    }
}

/// The error-code bits, for reports.
pub fn error_code_name(code: u32) -> String {
    let mut s = vec![];
    for (b, n) in [(pf::P, "P"), (pf::W, "W"), (pf::U, "U"), (pf::RSVD, "RSVD"), (pf::ID, "I/D")] {
        if code & b != 0 {
            s.push(n);
        }
    }
    s.join("|")
}
