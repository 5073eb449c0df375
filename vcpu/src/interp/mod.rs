//! # The x86 interpreter
//!
//! A vCPU backend that runs guest code without `/dev/kvm`: real mode,
//! 16- and 32-bit protected mode with segmentation and privilege checks,
//! 32-bit and PAE paging, the integer instruction set of the 386 and what
//! 486/Pentium-class firmware uses, exceptions and interrupts as the CPU
//! delivers them. Every memory access goes through the runtime's published
//! views, so device accesses from many vCPU threads run in parallel with no
//! big lock.
//!
//! It is also a library: [`Cpu`] drives one CPU over an address space, with
//! every register reachable in [`CpuState`] (see its example).
//!
//! ## How it runs
//!
//! | file | what |
//! | --- | --- |
//! | [`state`] | the architectural registers ([`CpuState`], [`Segment`]) |
//! | `flags.rs` | lazy EFLAGS: results recorded, flags computed when read |
//! | `core.rs` | the working state, the software TLB and every memory access |
//! | `paging.rs` | page walks (32-bit, PSE, PAE), Accessed/Dirty bits, `#PF` |
//! | `segment.rs` | segment loads and their protected-mode checks |
//! | `block.rs` | decoding with iced-x86 into cached blocks, self-modifying code |
//! | `exec/` | instruction semantics, one family per file |
//! | `interrupt.rs` | IVT/IDT delivery, stack switches, double and triple faults |
//! | `coalesced.rs` | coalesced MMIO: per-vCPU write buffers and their flush |
//! | `cpu.rs` | [`Cpu`]: the run loop, interrupts from the local APIC |
//! | `backend.rs` | [`InterpVcpu`]: the [`VcpuBackend`](crate::backend::VcpuBackend) |
//! | [`cpuid`] | what `cpuid` reports |
//! | `undefined.rs` | what architecturally undefined flags are set to |
//!
//! The hot path: the run loop polls the kick flag and the APIC's attention
//! flag (one load each), checks the memory view's generation and the
//! code-write epoch (one load each), finds the block for CS:EIP in a
//! direct-mapped table, and calls each instruction's handler through a
//! function pointer chosen at decode time. RAM accesses hit the TLB and
//! load or store through the runtime's [`RamPage`](topos_runtime::RamPage)
//! with one atomic operation; nothing on that path locks or allocates.
//!
//! ## What is not modelled
//!
//! Long mode, virtual-8086 mode, task switches (task gates, `iret` with
//! NT, far transfers to TSS descriptors), call gates, x87/MMX/SSE (`#NM`
//! or `#UD` as a CPU without them), debug breakpoints (DR0–DR3 and DR7 are
//! stored only; single-stepping with EFLAGS.TF does raise `#DB` with
//! DR6.BS), SMM, and the NX bit outside PAE paging. An instruction the
//! interpreter does not implement raises `#UD` for the guest and logs a
//! warning once. The protected-mode privilege checks firmware and kernels
//! rely on are modelled (segment loads, gates, `iret`/`retf` to outer
//! rings, I/O permission bitmap); a `rep` string instruction counts as one
//! instruction per burst of iterations against [`Cpu::run`]'s limit.

mod apic;
mod backend;
mod block;
mod coalesced;
mod core;
mod cpu;
pub mod cpuid;
mod event;
mod exec;
mod flags;
mod interrupt;
mod paging;
mod segment;
pub mod state;
mod undefined;

pub use apic::{Apic, Startup};
pub use backend::InterpVcpu;
pub use coalesced::{CoalescedBuffer, CoalescedMmio};
pub use cpu::{Cpu, Exit};
pub use state::{CpuState, DescriptorTable, SegReg, Segment};
