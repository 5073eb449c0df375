//! Linear to physical translation: the page walks of 32-bit paging (4 KiB
//! and 4 MiB pages) and PAE paging (4 KiB and 2 MiB pages), with the
//! Accessed and Dirty bits set as the CPU sets them and `#PF` error codes.

use super::core::Core;
use super::event::Event;
use super::state::{cr0, cr4};
use topos_runtime::AtomicRmw;

/// What a translation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
    Fetch,
}

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

/// The physical-address width (MAXPHYADDR): `cpuid` has no leaf
/// 0x8000_0008, so it is 36 with PAE (SDM 4.1.4). Address bits from it up
/// are reserved in PAE entries, and above PSE-36's four in a 4 MiB PDE.
const MAXPHYADDR: u32 = 36;
/// Bits MAXPHYADDR-62 of a PAE entry.
const PAE_RESERVED: u64 = ((1 << 63) - 1) & !((1 << MAXPHYADDR) - 1);
/// Bits 17-21 of a 4 MiB PDE: above the PSE-36 address bits 13-16.
const PSE_RESERVED: u64 = 0x3e_0000;

/// `#PF` error-code bits.
mod pf {
    pub(super) const PRESENT: u32 = 1 << 0;
    pub(super) const WRITE: u32 = 1 << 1;
    pub(super) const USER: u32 = 1 << 2;
    pub(super) const RSVD: u32 = 1 << 3;
    pub(super) const FETCH: u32 = 1 << 4;
}

/// A successful walk: the physical address and whether writes may be
/// cached (the page is writable for this access and its Dirty bit is set).
pub(crate) struct Walk {
    pub(crate) phys: u64,
    pub(crate) writable: bool,
    /// Instructions may be fetched from the page (not NX with EFER.NXE).
    pub(crate) executable: bool,
    /// The offset bits of the page mapped: 0xfff, or those of a 4 MiB or
    /// 2 MiB page (whose TLB entries `invlpg` drops all at once).
    pub(crate) page_mask: u32,
}

impl Core {
    /// Translates `la` for `access` at privilege `user` (CPL 3, and not an
    /// implicit supervisor access such as a descriptor-table read).
    pub(crate) fn walk(&mut self, la: u32, access: Access, user: bool) -> Result<Walk, Event> {
        if self.s.cr0 & cr0::PG == 0 {
            return Ok(Walk { phys: u64::from(la), writable: true, executable: true, page_mask: 0xfff });
        }
        if self.s.cr4 & cr4::PAE != 0 {
            self.walk_pae(la, access, user)
        } else {
            self.walk_32(la, access, user)
        }
    }

    fn pt_read(&mut self, addr: u64, size: u32) -> u64 {
        self.io.memory().read_u64(addr, size).0
    }

    fn pt_set(&mut self, addr: u64, entry: u64, bits: u64) {
        if entry & bits != bits {
            // The walk's own writes are atomic, as the CPU's locked updates.
            let _ = self.io.memory().atomic_rmw(addr, 4, AtomicRmw::Or(bits));
        }
    }

    /// Sets the Accessed bit of the leaf `entry` at `addr` (and Dirty for
    /// a write) and returns whether writes through it may be cached: the
    /// permission check allowed them (`writable`) and Dirty is set.
    fn leaf_accessed(&mut self, addr: u64, entry: u64, access: Access, writable: bool) -> bool {
        let set = if access == Access::Write { A | D } else { A };
        self.pt_set(addr, entry, set);
        writable && (access == Access::Write || entry & D != 0)
    }

    fn page_fault(&mut self, la: u32, access: Access, user: bool, code: u32) -> Event {
        let mut code = code;
        if access == Access::Write {
            code |= pf::WRITE;
        }
        if user {
            code |= pf::USER;
        }
        if access == Access::Fetch && self.nx_enabled() {
            code |= pf::FETCH;
        }
        self.s.cr2 = la;
        Event::exception(14, Some(code))
    }

    fn nx_enabled(&self) -> bool {
        self.s.cr4 & cr4::PAE != 0 && self.s.efer & (1 << 11) != 0
    }

    /// Applies the permission rules to the combined U/S and R/W bits.
    fn check(&mut self, la: u32, access: Access, user: bool, us: bool, rw: bool, nx: bool) -> Result<bool, Event> {
        let wp = self.s.cr0 & cr0::WP != 0;
        let denied = (user && !us)
            || (access == Access::Write && !rw && (user || wp))
            || (access == Access::Fetch && nx && self.nx_enabled());
        if denied {
            return Err(self.page_fault(la, access, user, pf::PRESENT));
        }
        Ok(rw || (!user && !wp))
    }

    fn walk_32(&mut self, la: u32, access: Access, user: bool) -> Result<Walk, Event> {
        let pde_addr = u64::from(self.s.cr3 & !0xfff) | u64::from((la >> 22) << 2);
        let pde = self.pt_read(pde_addr, 4);
        if pde & P == 0 {
            return Err(self.page_fault(la, access, user, 0));
        }
        if pde & PS != 0 && self.s.cr4 & cr4::PSE != 0 {
            if pde & PSE_RESERVED != 0 {
                return Err(self.page_fault(la, access, user, pf::PRESENT | pf::RSVD));
            }
            let writable = self.check(la, access, user, pde & US != 0, pde & RW != 0, false)?;
            let writable = self.leaf_accessed(pde_addr, pde, access, writable);
            // PSE-36: bits 13-16 of the entry are physical bits 32-35.
            let high = ((pde >> 13) & 0xf) << 32;
            let phys = high | (pde & 0xffc0_0000) | u64::from(la & 0x3f_ffff);
            return Ok(Walk { phys, writable, executable: true, page_mask: 0x3f_ffff });
        }
        let pte_addr = (pde & 0xffff_f000) | u64::from(((la >> 12) & 0x3ff) << 2);
        let pte = self.pt_read(pte_addr, 4);
        if pte & P == 0 {
            return Err(self.page_fault(la, access, user, 0));
        }
        let writable = self.check(la, access, user, pde & pte & US != 0, pde & pte & RW != 0, false)?;
        self.pt_set(pde_addr, pde, A);
        let writable = self.leaf_accessed(pte_addr, pte, access, writable);
        let phys = (pte & 0xffff_f000) | u64::from(la & 0xfff);
        Ok(Walk { phys, writable, executable: true, page_mask: 0xfff })
    }

    fn walk_pae(&mut self, la: u32, access: Access, user: bool) -> Result<Walk, Event> {
        const ADDR: u64 = 0x000f_ffff_ffff_f000;
        let rsvd_high: u64 = if self.nx_enabled() { PAE_RESERVED } else { PAE_RESERVED | NX };
        let pdpte_addr = u64::from(self.s.cr3 & !0x1f) + u64::from(la >> 30) * 8;
        let pdpte = self.pt_read(pdpte_addr, 8);
        if pdpte & P == 0 {
            return Err(self.page_fault(la, access, user, 0));
        }
        if pdpte & (0x1e6 | PAE_RESERVED | NX) != 0 {
            return Err(self.page_fault(la, access, user, pf::PRESENT | pf::RSVD));
        }
        let pde_addr = (pdpte & ADDR) + u64::from((la >> 21) & 0x1ff) * 8;
        let pde = self.pt_read(pde_addr, 8);
        if pde & P == 0 {
            return Err(self.page_fault(la, access, user, 0));
        }
        if pde & rsvd_high != 0 {
            return Err(self.page_fault(la, access, user, pf::PRESENT | pf::RSVD));
        }
        if pde & PS != 0 {
            if pde & 0x1f_e000 != 0 {
                return Err(self.page_fault(la, access, user, pf::PRESENT | pf::RSVD));
            }
            let writable = self.check(la, access, user, pde & US != 0, pde & RW != 0, pde & NX != 0)?;
            let writable = self.leaf_accessed(pde_addr, pde, access, writable);
            let phys = (pde & 0x000f_ffff_ffe0_0000) | u64::from(la & 0x1f_ffff);
            let executable = pde & NX == 0 || !self.nx_enabled();
            return Ok(Walk { phys, writable, executable, page_mask: 0x1f_ffff });
        }
        let pte_addr = (pde & ADDR) + u64::from((la >> 12) & 0x1ff) * 8;
        let pte = self.pt_read(pte_addr, 8);
        if pte & P == 0 {
            return Err(self.page_fault(la, access, user, 0));
        }
        if pte & rsvd_high != 0 {
            return Err(self.page_fault(la, access, user, pf::PRESENT | pf::RSVD));
        }
        let nx = (pde | pte) & NX != 0;
        let writable = self.check(la, access, user, pde & pte & US != 0, pde & pte & RW != 0, nx)?;
        self.pt_set(pde_addr, pde, A);
        let writable = self.leaf_accessed(pte_addr, pte, access, writable);
        let phys = (pte & ADDR) | u64::from(la & 0xfff);
        let executable = !nx || !self.nx_enabled();
        Ok(Walk { phys, writable, executable, page_mask: 0xfff })
    }
}
