//! What the interpreter does with flags the architecture leaves undefined:
//! what the CPUs of the vendor it reports do (AMD: `cpuid` reports
//! QEMU's `qemu64`, an AMD CPU), as measured against the host CPU — an
//! AMD processor running guest code natively in ring 3 under KVM — by the
//! differential test (`vcpu/tests/interp_differential`).

/// Shifts and double shifts with a non-zero count set AF.
pub(crate) const SHIFT_AF: bool = true;
/// `mul` and `imul` leave SF, ZF, AF and PF unchanged.
pub(crate) const MUL_KEEPS_SZAP: bool = true;
/// `div` and `idiv` set AF and clear SF, ZF and PF (CF and OF unchanged).
pub(crate) const DIV_AF_SET_SZP_CLEAR: bool = true;
