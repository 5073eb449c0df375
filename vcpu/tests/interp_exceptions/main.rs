//! Exceptions on the interpreter (issue 9, acceptance 3): every vector the
//! interpreter raises, in real mode and in 32-bit protected mode — the
//! vector delivered through the IVT or IDT, the error code, CR2, the
//! return address, the flags and the stack pushed, privilege changes
//! through the TSS, nested faults (double fault, serial delivery) and
//! triple faults.
//!
//! Each test runs guest code on a [`guest::Guest`] whose handlers only
//! halt; the host reads what the CPU pushed.

mod guest;
mod nested;
mod paging;
mod protected;
mod vectors;
