//! Where QEMU 7.2's TCG departs from the architecture in what this test
//! sees, and how its outcome is brought back before comparing (each found
//! by this test, and checked against the SDM or the host CPU):
//!
//! * **#PF for a reserved bit lacks P.** QEMU reports RSVD alone; the SDM
//!   (4.7) says RSVD implies P (reserved bits are checked only in present
//!   entries). P is added to QEMU's record.
//! * **A read-modify-write reports a read fault.** With one vCPU, TCG runs
//!   `add [m], r`, `xchg [m], r` and their kin as a load then a store, so a
//!   not-present or user-inaccessible page faults with W clear. The host
//!   CPU (AMD, in ring 3 under PVM, where it runs natively) reports W for
//!   `add`, `or`, `xchg` and `lock add` on a not-present page: the
//!   instruction translates for writing first. W is added to QEMU's record
//!   of a read-modify-write step.
//! * **PDPTEs get an Accessed bit.** QEMU sets bit 5 of the PAE PDPTEs it
//!   walks through, a reserved bit there (PDPTEs are loaded into
//!   registers with CR3, not walked). It is not compared.

use super::gen::{Access, Op, Scenario};
use super::layout::*;
use super::model::{pf, Paging};
use super::outcome::Outcome;

/// Brings QEMU's outcome of `s` back to the architecture's.
pub fn normalize(s: &Scenario, o: &mut Outcome) {
    let records = o.records();
    for (i, r) in records.iter().enumerate() {
        if r[0] != 14 {
            continue;
        }
        let mut code = r[1];
        if code & pf::RSVD != 0 {
            code |= pf::P;
        }
        let rmw = matches!(
            s.ops.get(r[5] as usize),
            Some(Op::Access { access: Access::Alu { .. } | Access::AddByte { .. } | Access::Xchg { .. }, .. })
        );
        if rmw {
            code |= pf::W;
        }
        let at = (off::RECORDS + i as u64 * RECORD + 4) as usize;
        o.bytes[at..at + 4].copy_from_slice(&code.to_le_bytes());
    }
}

/// The bits of `s` QEMU sets where the architecture does not (scenario
/// offset → mask of byte 0).
pub fn undefined(s: &Scenario) -> Vec<(usize, u8)> {
    match s.paging {
        Paging::Pae { .. } => (0..8).map(|i| ((off::PDPT_A + 8 * i) as usize, 0x20)).collect(),
        Paging::Legacy { .. } => vec![],
    }
}
