//! The generator's page walk: what a linear page translates to in the
//! current memory, with no TLB. The generator uses it to keep a scenario
//! inside what the architecture defines (which pages may be cached stale,
//! where a write lands, which Accessed bits are implementation-specific);
//! it is not the oracle (QEMU is), though its expected #PF records are
//! printed beside the runners' when they differ.
//!
//! It follows the SDM where QEMU's CPU (MAXPHYADDR 40) and the
//! interpreter's (36) agree: bits 40-62 of a PAE entry and bit 21 of a
//! 4 MiB PDE are reserved, bit 63 too unless EFER.NXE; the generator never
//! sets address bits 32-39 of a PAE entry, nor bits 13-20 of a 4 MiB PDE,
//! where they differ (and which would name memory beyond RAM).

use super::layout::{BASE, USED};

/// How the scenario pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// 32-bit paging; `pse`: CR4.PSE (4 MiB pages).
    Legacy { pse: bool },
    /// PAE paging; `nxe`: EFER.NXE.
    Pae { nxe: bool },
}

impl Paging {
    /// The size of an entry.
    pub fn entry(self) -> u64 {
        match self {
            Paging::Legacy { .. } => 4,
            Paging::Pae { .. } => 8,
        }
    }

    /// EFER.NXE with PAE: fetches are checked against NX and report I/D.
    pub fn nx(self) -> bool {
        matches!(self, Paging::Pae { nxe: true })
    }
}

/// Entry bits.
pub mod bit {
    pub const P: u64 = 1 << 0;
    pub const RW: u64 = 1 << 1;
    pub const US: u64 = 1 << 2;
    pub const A: u64 = 1 << 5;
    pub const D: u64 = 1 << 6;
    pub const PS: u64 = 1 << 7;
    pub const NX: u64 = 1 << 63;
}

/// What an access does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Fetch,
}

/// A linear page's mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The physical page.
    pub frame: u64,
    /// Writable, user and no-execute, combined over the levels.
    pub rw: bool,
    pub us: bool,
    pub nx: bool,
    /// For a large page: its linear base and its PDE's address.
    pub large: Option<(u32, u64)>,
}

/// Why a linear page has no mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// An entry (or the PDPTE register) is not present.
    NotPresent,
    /// An entry sets a reserved bit.
    Reserved,
}

/// A walk: the entries read (guest-physical addresses, in order; the PDPTE
/// registers are not memory) and what they give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    pub path: Vec<u64>,
    pub result: Result<Mapping, Missing>,
}

/// `#PF` error-code bits.
pub mod pf {
    pub const P: u32 = 1 << 0;
    pub const W: u32 = 1 << 1;
    pub const U: u32 = 1 << 2;
    pub const RSVD: u32 = 1 << 3;
    pub const ID: u32 = 1 << 4;
}

/// The paging state: memory (the scenario's bytes) and the registers that
/// paging reads.
#[derive(Clone)]
pub struct Machine {
    pub paging: Paging,
    /// The scenario's memory, from [`BASE`].
    pub mem: Vec<u8>,
    pub cr3: u32,
    /// PAE: the PDPTE registers, loaded with CR3.
    pub pdpte: [u64; 4],
    /// CR0.WP.
    pub wp: bool,
}

impl Machine {
    /// Reads `n` bytes at physical `pa` (zero outside the scenario).
    pub fn read(&self, pa: u64, n: u64) -> u64 {
        (0..n).fold(0u64, |v, i| v | (u64::from(self.byte(pa + i)) << (8 * i)))
    }

    /// The byte at `pa` (zero outside the scenario).
    pub fn byte(&self, pa: u64) -> u8 {
        match pa.checked_sub(BASE) {
            Some(o) if (o as usize) < USED => self.mem[o as usize],
            _ => 0,
        }
    }

    /// Writes the low `n` bytes of `v` at `pa` (which must be in the
    /// scenario).
    pub fn write(&mut self, pa: u64, n: u64, v: u64) {
        for i in 0..n {
            let o = (pa + i - BASE) as usize;
            self.mem[o] = (v >> (8 * i)) as u8;
        }
    }

    /// Loads CR3 (and, with PAE, the PDPTE registers).
    pub fn load_cr3(&mut self, cr3: u32) {
        self.cr3 = cr3;
        if let Paging::Pae { .. } = self.paging {
            let base = u64::from(cr3 & !0x1f);
            self.pdpte = std::array::from_fn(|i| self.read(base + 8 * i as u64, 8));
        }
    }

    /// The reserved bits of a PAE PDE or PTE (MAXPHYADDR 40).
    fn pae_reserved(&self) -> u64 {
        let nx = if self.paging.nx() { 0 } else { bit::NX };
        0x7fff_ff00_0000_0000 | nx
    }

    /// Translates the page of `la`.
    pub fn translate(&self, la: u32) -> Translation {
        match self.paging {
            Paging::Legacy { pse } => self.walk_legacy(la, pse),
            Paging::Pae { .. } => self.walk_pae(la),
        }
    }

    fn walk_legacy(&self, la: u32, pse: bool) -> Translation {
        let pde_at = u64::from(self.cr3 & !0xfff) + u64::from(la >> 22) * 4;
        let pde = self.read(pde_at, 4);
        let mut path = vec![pde_at];
        if pde & bit::P == 0 {
            return Translation { path, result: Err(Missing::NotPresent) };
        }
        if pde & bit::PS != 0 && pse {
            if pde & (1 << 21) != 0 {
                return Translation { path, result: Err(Missing::Reserved) };
            }
            assert_eq!(pde & 0x1f_e000, 0, "the generator never sets PSE-36 address bits");
            let base = la & !0x3f_ffff;
            let frame = (pde & 0xffc0_0000) + u64::from(la & 0x3f_f000);
            let m = Mapping {
                frame,
                rw: pde & bit::RW != 0,
                us: pde & bit::US != 0,
                nx: false,
                large: Some((base, pde_at)),
            };
            return Translation { path, result: Ok(m) };
        }
        let pte_at = (pde & 0xffff_f000) + u64::from((la >> 12) & 0x3ff) * 4;
        let pte = self.read(pte_at, 4);
        path.push(pte_at);
        if pte & bit::P == 0 {
            return Translation { path, result: Err(Missing::NotPresent) };
        }
        let m = Mapping {
            frame: pte & 0xffff_f000,
            rw: pde & pte & bit::RW != 0,
            us: pde & pte & bit::US != 0,
            nx: false,
            large: None,
        };
        Translation { path, result: Ok(m) }
    }

    fn walk_pae(&self, la: u32) -> Translation {
        const ADDR: u64 = 0x000f_ffff_ffff_f000;
        let pdpte = self.pdpte[(la >> 30) as usize];
        let mut path = vec![];
        if pdpte & bit::P == 0 {
            return Translation { path, result: Err(Missing::NotPresent) };
        }
        let rsvd = self.pae_reserved();
        let pde_at = (pdpte & ADDR) + u64::from((la >> 21) & 0x1ff) * 8;
        let pde = self.read(pde_at, 8);
        path.push(pde_at);
        if pde & bit::P == 0 {
            return Translation { path, result: Err(Missing::NotPresent) };
        }
        if pde & rsvd != 0 {
            return Translation { path, result: Err(Missing::Reserved) };
        }
        let nx = self.paging.nx();
        if pde & bit::PS != 0 {
            if pde & 0x1f_e000 != 0 {
                return Translation { path, result: Err(Missing::Reserved) };
            }
            let base = la & !0x1f_ffff;
            let frame = (pde & 0x000f_ffff_ffe0_0000) + u64::from(la & 0x1f_f000);
            let m = Mapping {
                frame,
                rw: pde & bit::RW != 0,
                us: pde & bit::US != 0,
                nx: nx && pde & bit::NX != 0,
                large: Some((base, pde_at)),
            };
            return Translation { path, result: Ok(m) };
        }
        let pte_at = (pde & ADDR) + u64::from((la >> 12) & 0x1ff) * 8;
        let pte = self.read(pte_at, 8);
        path.push(pte_at);
        if pte & bit::P == 0 {
            return Translation { path, result: Err(Missing::NotPresent) };
        }
        if pte & rsvd != 0 {
            return Translation { path, result: Err(Missing::Reserved) };
        }
        let m = Mapping {
            frame: pte & ADDR,
            rw: pde & pte & bit::RW != 0,
            us: pde & pte & bit::US != 0,
            nx: nx && (pde | pte) & bit::NX != 0,
            large: None,
        };
        Translation { path, result: Ok(m) }
    }

    /// The error code of a `kind` access at privilege `user` to a page
    /// translated as `t`, or `None` if it is allowed.
    pub fn fault(&self, t: &Translation, kind: Kind, user: bool) -> Option<u32> {
        let mut code = match t.result {
            Err(Missing::NotPresent) => 0,
            Err(Missing::Reserved) => pf::P | pf::RSVD,
            Ok(m) => {
                let denied = (user && !m.us)
                    || (kind == Kind::Write && !m.rw && (user || self.wp))
                    || (kind == Kind::Fetch && m.nx);
                if !denied {
                    return None;
                }
                pf::P
            }
        };
        if kind == Kind::Write {
            code |= pf::W;
        }
        if user {
            code |= pf::U;
        }
        if kind == Kind::Fetch && self.paging.nx() {
            code |= pf::ID;
        }
        Some(code)
    }
}
