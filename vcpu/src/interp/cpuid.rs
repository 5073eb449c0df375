//! What `cpuid` reports on the interpreter: the vendor and signature of
//! QEMU's default TCG CPU (`qemu64`: AuthenticAMD, family 15, model 107,
//! stepping 1), so that a board on the interpreter matches QEMU TCG's
//! (the memory map a multiboot kernel sees has AMD's 1 TiB HyperTransport
//! hole, as QEMU reports it for AMD CPUs), with the features the
//! interpreter implements (TSC, MSRs, CMPXCHG8B, CMOV, a local APIC, PSE,
//! PAE and global pages) and none it does not (no x87, no SSE, no long
//! mode).

/// Family 15, model 107 (extended model 6), stepping 1: the value of EAX
/// for leaf 1, and of EDX after reset.
pub const SIGNATURE: u32 = 0x0006_0fb1;

/// Leaf 1 EDX feature bits.
mod edx {
    pub(super) const DE: u32 = 1 << 2;
    pub(super) const PSE: u32 = 1 << 3;
    pub(super) const TSC: u32 = 1 << 4;
    pub(super) const MSR: u32 = 1 << 5;
    pub(super) const PAE: u32 = 1 << 6;
    pub(super) const CX8: u32 = 1 << 8;
    pub(super) const APIC: u32 = 1 << 9;
    pub(super) const PGE: u32 = 1 << 13;
    pub(super) const CMOV: u32 = 1 << 15;
}

/// The vendor string, in EBX, EDX, ECX order.
const VENDOR: &[u8; 12] = b"AuthenticAMD";

/// Whether the vendor is AMD (the board's memory map follows it).
pub const IS_AMD: bool = true;

/// The four registers `cpuid` returns for `leaf`/`subleaf` on CPU `apic_id`
/// of `cpus` (`has_apic`: whether the APIC is enabled in IA32_APIC_BASE,
/// which leaf 1 reports).
pub fn cpuid(leaf: u32, _subleaf: u32, apic_id: u32, cpus: u32, has_apic: bool) -> [u32; 4] {
    let word = |i: usize| u32::from_le_bytes([VENDOR[i], VENDOR[i + 1], VENDOR[i + 2], VENDOR[i + 3]]);
    match leaf {
        0 => [1, word(0), word(8), word(4)],
        1 => {
            let mut d = edx::DE | edx::PSE | edx::TSC | edx::MSR | edx::PAE | edx::CX8 | edx::PGE | edx::CMOV;
            if has_apic {
                d |= edx::APIC;
            }
            let logical = cpus.clamp(1, 255);
            // Hyper-threading bit 28 with the logical count, as QEMU reports
            // for multi-CPU guests.
            if logical > 1 {
                d |= 1 << 28;
            }
            let b = (apic_id << 24) | (logical << 16) | (8 << 8);
            [SIGNATURE, b, 0, d]
        }
        0x8000_0000 => [0x8000_0000, word(0), word(8), word(4)],
        // Leaves above the maximum read as zero on AMD CPUs.
        _ => [0; 4],
    }
}
