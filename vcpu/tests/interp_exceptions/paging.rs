//! `#PF`: not-present pages, writes to read-only pages (CR0.WP), user
//! accesses to supervisor pages, instruction fetches, accesses that
//! straddle two pages — with CR2 and the error code's P, W/R, U/S and
//! RSVD bits — in 32-bit paging with 4 KiB and 4 MiB pages, and in PAE
//! paging with 4 KiB and 2 MiB pages.

use super::guest::{Asm, Before, Code, Expect, Guest, Mode, CODE, DATA, PAGING};
use super::protected::check_inner;
use iced_x86::code_asm::*;
use iced_x86::IcedError;
use topos_vcpu::interp::state::{cr0, cr4};

/// The page the tests make absent, read-only or supervisor-only.
const PAGE: u32 = 0x20000;

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PS: u64 = 0x80;

/// Error-code bits.
const E_P: u32 = 1;
const E_W: u32 = 2;
const E_U: u32 = 4;
const E_RSVD: u32 = 8;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Paging {
    /// 32-bit paging (CR4.PSE set, so 4 MiB pages work).
    Bits32,
    /// PAE paging.
    Pae,
}

/// Identity-maps the first 4 MiB with 4 KiB pages (present, writable,
/// user) and turns paging on with WP.
pub(crate) fn enable(g: &mut Guest, mode: Paging) {
    match mode {
        Paging::Bits32 => {
            let (pd, pt) = (PAGING, PAGING + 0x1000);
            g.write_u32(pd, pt | (P | RW | US) as u32);
            for i in 0..1024 {
                g.write_u32(pt + 4 * i, (i << 12) | (P | RW | US) as u32);
            }
        }
        Paging::Pae => {
            let (pdpt, pd, pt) = (PAGING, PAGING + 0x1000, PAGING + 0x2000);
            g.write_u64(pdpt, u64::from(pd) | P);
            for t in 0..2u32 {
                g.write_u64(pd + 8 * t, u64::from(pt + 0x1000 * t) | P | RW | US);
                for i in 0..512 {
                    let page = (t * 512 + i) << 12;
                    g.write_u64(pt + 0x1000 * t + 8 * i, u64::from(page) | P | RW | US);
                }
            }
        }
    }
    let s = g.cpu.state_mut();
    s.cr3 = PAGING;
    s.cr4 |= if mode == Paging::Pae { cr4::PAE } else { cr4::PSE };
    s.cr0 |= cr0::PG | cr0::WP;
}

/// The address of the page-table entry of `la` (in the first 4 MiB).
fn pte(mode: Paging, la: u32) -> u32 {
    match mode {
        Paging::Bits32 => PAGING + 0x1000 + 4 * (la >> 12),
        Paging::Pae => PAGING + 0x2000 + 8 * (la >> 12),
    }
}

pub(crate) fn set_pte(g: &Guest, mode: Paging, la: u32, entry: u64) {
    match mode {
        Paging::Bits32 => g.write_u32(pte(mode, la), entry as u32),
        Paging::Pae => g.write_u64(pte(mode, la), entry),
    }
}

/// Assembles `f`, enables paging, applies `setup`, runs to `fault`.
fn paged(
    mode: Paging,
    ring3: bool,
    setup: impl FnOnce(&Guest),
    f: impl FnOnce(&mut Asm) -> Result<(), IcedError>,
) -> (Guest, Before, Code) {
    let code = super::guest::assemble(32, CODE, f);
    let mut g = Guest::new(Mode::Prot, &code);
    if ring3 {
        g.enter_ring3(CODE);
    }
    enable(&mut g, mode);
    setup(&g);
    let before = g.run_to(code.at("fault"));
    (g, before, code)
}

/// Expects `#PF(code)` with CR2 = `cr2`, at ring 0.
fn expect_pf(g: &mut Guest, before: &Before, at: u32, code: u32, fault_la: u32) {
    let d = g.deliver();
    d.check(before, Expect { vector: 14, code: Some(code), eip: at });
    assert_eq!(d.cr2, fault_la, "CR2");
}

/// Expects `#PF(code)` with CR2 = `cr2`, from ring 3.
fn expect_pf3(g: &mut Guest, before: &Before, at: u32, code: u32, fault_la: u32) {
    let d = g.deliver();
    check_inner(g, before, Expect { vector: 14, code: Some(code), eip: at });
    assert_eq!(d.cr2, fault_la, "CR2");
}

/// Runs `insn` (paging enabled, then `setup`) at ring 0, or at ring 3 if
/// `ring3`, and expects `#PF(code)` at it with CR2 = `fault_la`.
fn pf_on(
    mode: Paging,
    ring3: bool,
    setup: impl FnOnce(&Guest),
    insn: impl FnOnce(&mut Asm) -> Result<(), IcedError>,
    code: u32,
    fault_la: u32,
) {
    let (mut g, before, c) = paged(mode, ring3, setup, |a| {
        a.mark("fault");
        insn(a)?;
        a.hlt()
    });
    if ring3 {
        expect_pf3(&mut g, &before, c.at("fault"), code, fault_la);
    } else {
        expect_pf(&mut g, &before, c.at("fault"), code, fault_la);
    }
}

const MODES: [Paging; 2] = [Paging::Bits32, Paging::Pae];

#[test]
fn not_present_read_and_write() {
    for mode in MODES {
        pf_on(mode, false, |g| set_pte(g, mode, PAGE, 0), |a| a.mov(eax, dword_ptr(PAGE + 0x10)), 0, PAGE + 0x10);
        pf_on(mode, false, |g| set_pte(g, mode, PAGE, 0), |a| a.mov(dword_ptr(PAGE + 0x20), eax), E_W, PAGE + 0x20);
    }
}

/// A read-modify-write of the dword at `PAGE + 8`.
type Rmw = fn(&mut Asm) -> Result<(), IcedError>;

const RMWS: [(&str, Rmw); 9] = [
    ("add", |a| a.add(dword_ptr(PAGE + 8), eax)),
    ("shl", |a| a.shl(dword_ptr(PAGE + 8), 3)),
    ("rcr by cl", |a| a.rcr(dword_ptr(PAGE + 8), cl)),
    ("shld", |a| a.shld(dword_ptr(PAGE + 8), eax, 3)),
    ("or imm", |a| a.or(dword_ptr(PAGE + 8), 1)),
    ("inc", |a| a.inc(dword_ptr(PAGE + 8))),
    ("xadd", |a| a.xadd(dword_ptr(PAGE + 8), eax)),
    ("xchg", |a| a.xchg(dword_ptr(PAGE + 8), eax)),
    ("lock add", |a| a.lock().add(dword_ptr(PAGE + 8), eax)),
];

#[test]
fn read_modify_write_faults_as_a_write() {
    // The CPU translates a read-modify-write's destination for writing
    // before reading it: on a page that is not present, or supervisor-only
    // from ring 3, its #PF reports W, as the host CPU's does (measured in
    // ring 3 under PVM for add, or, xchg and lock add; QEMU's TCG reports
    // a read). Found by the paging differential test against QEMU.
    for mode in MODES {
        for (name, rmw) in RMWS {
            println!("{name} ({mode:?})");
            pf_on(mode, false, |g| set_pte(g, mode, PAGE, 0), rmw, E_W, PAGE + 8);
            pf_on(mode, true, |g| set_pte(g, mode, PAGE, u64::from(PAGE) | P | RW), rmw, E_P | E_W | E_U, PAGE + 8);
        }
    }
}

#[test]
fn write_to_read_only_with_and_without_wp() {
    for mode in MODES {
        let ro = |g: &Guest| set_pte(g, mode, PAGE, u64::from(PAGE) | P | US);
        let (mut g, before, c) = paged(mode, false, ro, |a| {
            a.mov(eax, dword_ptr(PAGE))?; // reading is fine
            a.mov(eax, 0x1234_5678)?;
            a.mark("fault");
            a.mov(dword_ptr(PAGE + 4), eax)?;
            a.hlt()
        });
        expect_pf(&mut g, &before, c.at("fault"), E_P | E_W, PAGE + 4);
        assert_eq!(g.read_u32(PAGE + 4), 0, "nothing written");
        // With WP clear, ring 0 writes through.
        g.cpu.state_mut().cr0 &= !cr0::WP;
        g.cpu.state_mut().halted = false;
        g.cpu.state_mut().eip = c.at("fault");
        g.cpu.step();
        assert_eq!(g.read_u32(PAGE + 4), 0x1234_5678, "WP = 0: a supervisor write to a read-only page ({mode:?})");
    }
}

#[test]
fn user_access_to_a_supervisor_page_and_user_write_to_read_only() {
    for mode in MODES {
        pf_on(
            mode,
            true,
            |g| set_pte(g, mode, PAGE, u64::from(PAGE) | P | RW),
            |a| a.mov(eax, dword_ptr(PAGE + 8)),
            E_P | E_U,
            PAGE + 8,
        );
        pf_on(
            mode,
            true,
            |g| set_pte(g, mode, PAGE, u64::from(PAGE) | P | US),
            |a| a.mov(dword_ptr(PAGE + 12), eax),
            E_P | E_W | E_U,
            PAGE + 12,
        );
    }
}

#[test]
fn fetch_from_a_not_present_page() {
    // The fault is at the jump's target: pushed EIP and CR2 are the target.
    for mode in MODES {
        let (mut g, before, _) = paged(
            mode,
            true,
            |g| set_pte(g, mode, PAGE, 0),
            |a| {
                a.mov(eax, PAGE)?;
                a.mark("fault");
                a.jmp(eax)
            },
        );
        assert_eq!(g.cpu.step(), topos_vcpu::interp::Exit::Limit);
        let mut at_target = before.clone();
        at_target.eip = PAGE;
        expect_pf3(&mut g, &at_target, PAGE, E_U, PAGE);
    }
}

#[test]
fn access_straddling_into_a_bad_page() {
    // A dword at PAGE - 2: the first two bytes are fine, the rest faults.
    // CR2 is where the faulting page starts, and a write writes nothing.
    for mode in MODES {
        let (mut g, before, c) = paged(
            mode,
            false,
            |g| set_pte(g, mode, PAGE, u64::from(PAGE) | P | US),
            |a| {
                a.mov(eax, 0x1122_3344)?;
                a.mark("fault");
                a.mov(dword_ptr(PAGE - 2), eax)?;
                a.hlt()
            },
        );
        expect_pf(&mut g, &before, c.at("fault"), E_P | E_W, PAGE);
        assert_eq!(g.read(PAGE - 2, 4), [0; 4], "nothing written ({mode:?})");
        pf_on(mode, false, |g| set_pte(g, mode, PAGE, 0), |a| a.mov(eax, dword_ptr(PAGE - 1)), 0, PAGE);
    }
}

/// A large page (4 MiB in 32-bit paging, 2 MiB in PAE) at linear 4 MiB,
/// mapping physical 0 with `flags`.
fn large_page(g: &Guest, mode: Paging, flags: u64) {
    match mode {
        Paging::Bits32 => g.write_u32(PAGING + 4, (flags | PS) as u32),
        Paging::Pae => g.write_u64(PAGING + 0x1000 + 16, flags | PS),
    }
}

const LARGE: u32 = 0x40_0000;

#[test]
fn large_pages() {
    for mode in MODES {
        // Mapped read-only: reads see physical memory, a write faults.
        let (mut g, before, c) = paged(
            mode,
            false,
            |g| large_page(g, mode, P | US),
            |a| {
                a.mov(dword_ptr(DATA), 0x5566_7788)?;
                a.mov(ebx, dword_ptr(LARGE + DATA))?;
                a.mark("fault");
                a.mov(dword_ptr(LARGE + DATA + 4), ebx)?;
                a.hlt()
            },
        );
        expect_pf(&mut g, &before, c.at("fault"), E_P | E_W, LARGE + DATA + 4);
        assert_eq!(g.state().gpr[3], 0x5566_7788, "read through the large page ({mode:?})");
        // Supervisor-only, from ring 3.
        pf_on(
            mode,
            true,
            |g| large_page(g, mode, P | RW),
            |a| a.mov(ebx, dword_ptr(LARGE + DATA)),
            E_P | E_U,
            LARGE + DATA,
        );
        // Not present.
        pf_on(
            mode,
            false,
            |g| large_page(g, mode, RW),
            |a| a.mov(dword_ptr(LARGE + 0x12345), ebx),
            E_W,
            LARGE + 0x12345,
        );
    }
}

#[test]
fn invlpg_drops_every_piece_of_a_large_page() {
    // Two 4 KiB pieces of a writable large page are written (the TLB holds
    // both), its PDE is made read-only and one piece invalidated: the other
    // must not keep its stale writable entry — `invlpg` drops every TLB
    // entry of the large page (SDM 4.10.2.3). Found by the paging
    // differential test against QEMU.
    for mode in MODES {
        let pde = match mode {
            Paging::Bits32 => PAGING + 4,
            Paging::Pae => PAGING + 0x1000 + 16,
        };
        let (mut g, before, c) = paged(
            mode,
            false,
            |g| large_page(g, mode, P | RW | US),
            |a| {
                a.mov(dword_ptr(LARGE + DATA), eax)?;
                a.mov(dword_ptr(LARGE + DATA + 0x1000), eax)?;
                a.mov(dword_ptr(pde), (P | US | PS) as u32)?;
                a.invlpg(ptr(LARGE + DATA))?;
                a.mark("fault");
                a.mov(dword_ptr(LARGE + DATA + 0x1000), eax)?;
                a.hlt()
            },
        );
        expect_pf(&mut g, &before, c.at("fault"), E_P | E_W, LARGE + DATA + 0x1000);
    }
}

#[test]
fn pae_reserved_bits() {
    // Bit 63 (NX) is reserved without EFER.NXE, and so are a 2 MiB page's
    // bits 13-20 (address bits from MAXPHYADDR up: see
    // `address_bits_from_maxphyaddr_up_are_reserved`).
    pf_on(
        Paging::Pae,
        false,
        |g| set_pte(g, Paging::Pae, PAGE, u64::from(PAGE) | P | RW | (1 << 63)),
        |a| a.mov(eax, dword_ptr(PAGE)),
        E_P | E_RSVD,
        PAGE,
    );
    pf_on(
        Paging::Pae,
        false,
        |g| large_page(g, Paging::Pae, P | RW | (1 << 13)),
        |a| a.mov(dword_ptr(LARGE), eax),
        E_P | E_W | E_RSVD,
        LARGE,
    );
}

#[test]
fn address_bits_from_maxphyaddr_up_are_reserved() {
    // `cpuid` has no leaf 0x8000_0008, so MAXPHYADDR is 36 (SDM 4.1.4):
    // bits 36-62 of a PAE entry are reserved, and so are bits 17-21 of a
    // 4 MiB PDE (above PSE-36's address bits 13-16). Found by the paging
    // differential test against QEMU (whose MAXPHYADDR is 40: it agrees
    // on bits 40-62 and bit 21).
    for bit in [36, 40, 51, 52, 62] {
        println!("PAE PTE bit {bit}");
        pf_on(
            Paging::Pae,
            false,
            |g| set_pte(g, Paging::Pae, PAGE, u64::from(PAGE) | P | RW | (1 << bit)),
            |a| a.mov(eax, dword_ptr(PAGE)),
            E_P | E_RSVD,
            PAGE,
        );
        println!("PAE 2 MiB PDE bit {bit}");
        pf_on(
            Paging::Pae,
            false,
            |g| large_page(g, Paging::Pae, P | RW | (1 << bit)),
            |a| a.mov(dword_ptr(LARGE), eax),
            E_P | E_W | E_RSVD,
            LARGE,
        );
    }
    for bit in [17, 21] {
        println!("4 MiB PDE bit {bit}");
        pf_on(
            Paging::Bits32,
            false,
            |g| large_page(g, Paging::Bits32, P | RW | (1 << bit)),
            |a| a.mov(dword_ptr(LARGE), eax),
            E_P | E_W | E_RSVD,
            LARGE,
        );
    }
}

#[test]
fn a_fixed_entry_works_after_the_fault() {
    // The handler's fix (here the host's) and a retry: the TLB holds no
    // stale not-present entry.
    let (mut g, _, _) = paged(
        Paging::Bits32,
        false,
        |g| set_pte(g, Paging::Bits32, PAGE, 0),
        |a| {
            a.mark("fault");
            a.mov(dword_ptr(PAGE), 7)?;
            a.hlt()
        },
    );
    let d = g.deliver();
    assert_eq!((d.vector, d.slots[0], d.cr2), (14, E_W, PAGE), "the first write faults");
    set_pte(&g, Paging::Bits32, PAGE, u64::from(PAGE) | P | RW | US);
    g.cpu.state_mut().halted = false;
    assert_eq!(g.run(10), topos_vcpu::interp::Exit::Halted);
    assert_eq!(g.read_u32(PAGE), 7, "the retried write went through");
}

#[test]
fn fetch_from_a_no_execute_page_after_reading_it() {
    // PAE with EFER.NXE (set directly: the library's state has it): a
    // read of the page is fine, a fetch from it is #PF(P | I/D), even
    // with the page already in the TLB for the read.
    let code = super::guest::assemble(32, CODE, |a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.mov(eax, PAGE)?;
        a.mark("fault");
        a.jmp(eax)
    });
    let mut g = Guest::new(Mode::Prot, &code);
    enable(&mut g, Paging::Pae);
    set_pte(&g, Paging::Pae, PAGE, u64::from(PAGE) | P | RW | (1 << 63));
    g.cpu.state_mut().efer |= 1 << 11;
    let mut before = g.run_to(code.at("fault"));
    assert_eq!(g.cpu.step(), topos_vcpu::interp::Exit::Limit);
    before.eip = PAGE;
    expect_pf(&mut g, &before, PAGE, E_P | 0x10, PAGE);
}
