//! Starting a KVM vCPU somewhere other than the reset vector: flat 32-bit
//! protected mode, as a Multiboot kernel is entered.

use super::vcpu::KvmVcpu;
use crate::board::multiboot::{Flat32Entry, ENTRY_CODE_SELECTOR, ENTRY_DATA_SELECTOR};
use crate::error::{Error, Result};
use kvm_bindings::kvm_segment;

/// A flat 4 GiB segment (present, ring 0, 32-bit, 4 KiB granularity) of
/// `type_` (0xb: code, execute/read, accessed; 0x3: data, read/write,
/// accessed) with `selector`, to load straight into a vCPU's registers.
pub fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl KvmVcpu {
    /// Puts the vCPU in flat 32-bit protected mode (paging and interrupts
    /// off; code selector [`ENTRY_CODE_SELECTOR`], data
    /// [`ENTRY_DATA_SELECTOR`], as QEMU's Multiboot loader leaves them) at
    /// `entry`.
    pub fn enter_flat32(&mut self, entry: Flat32Entry) -> Result<()> {
        let fd = self.fd();
        let mut sregs = fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        sregs.cs = flat_segment(ENTRY_CODE_SELECTOR, 0xb);
        for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
            *s = flat_segment(ENTRY_DATA_SELECTOR, 0x3);
        }
        sregs.cr0 = (sregs.cr0 | 1) & !(1 << 31);
        fd.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
        let mut regs = fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        regs.rip = u64::from(entry.eip);
        regs.rax = u64::from(entry.eax);
        regs.rbx = u64::from(entry.ebx);
        regs.rflags = 2;
        fd.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        Ok(())
    }
}
