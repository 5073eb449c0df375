//! What `cpuid` reports on the interpreter: a 32-bit P6-class CPU with the
//! features the interpreter implements (TSC, MSRs, CMPXCHG8B, CMOV, a
//! local APIC, PSE and PAE paging) and none it does not (no x87, no SSE,
//! no long mode).

/// Family 6, model 3, stepping 3: the value of EAX for leaf 1, and of EDX
/// after reset.
pub const SIGNATURE: u32 = 0x0000_0633;

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
const VENDOR: &[u8; 12] = b"GenuineIntel";

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
        0x8000_0000 => [0x8000_0000, 0, 0, 0],
        // Leaves above the maximum return the highest basic leaf's values
        // on Intel CPUs.
        _ => cpuid(1, 0, apic_id, cpus, has_apic),
    }
}
