//! # topos-devices
//!
//! Device models for topos, run as actors (see [`actor`]): each device owns
//! its state, receives accesses through a bounded mailbox, and never shares
//! a lock with another device (the only `unsafe` is the actor's turn cell,
//! in `turn.rs`). All device behaviour is reached through address space
//! accesses, as a guest would.
//!
//! One rule keeps the actors deadlock-free: **a thread that holds a device's
//! turn never blocks** — not on another actor, not on the topology's turn.
//! From inside a handler, a synchronous access to a busy actor is refused
//! (as a re-entrant one is), topology operations fail with
//! `Error::InsideDeviceTurn`, and work that must wait (a BAR remap, a romd
//! switch, a DMA) is deferred until the thread holds no turn at all
//! ([`DeviceCtx::defer`]); its results come back through the device's
//! mailbox. Mailboxes are bounded: a guest that floods a slow device is
//! slowed down to its pace, and a thread that takes a turn does a bounded
//! amount of work for others before handing the backlog to a drainer
//! ([`ActorOptions`]).
//!
//! The interrupt controllers the x86 interpreter needs in user space (8259
//! PICs, 8254 PIT, IOAPIC, local APICs) are in [`irqchip`]: they are not
//! actors but state behind short locks, reached from vCPU threads and
//! device threads alike, and they deliver to vCPUs by posting and waking.
//!
//! Every model is plugged the same way ([`plug`]): configuration in, its
//! regions (unmapped) and a handle out; the board maps the regions — at
//! fixed addresses in system memory or the I/O space, or as a PCI
//! function's BARs through the host bridge
//! ([`pci::PciHost::plug_model`]). Errors of plugging and wiring are one
//! type, [`Error`].
//!
//! The harness takes its concurrency primitives from one shim (`sync.rs`),
//! so that the loom models in `loom-tests/` (`--cfg topos_loom`) check its
//! real code.
#![deny(unsafe_code)]

pub mod actor;
pub mod debug_exit;
pub mod edu;
mod error;
pub mod framebuffer;
pub mod fw_cfg;
pub mod irq;
pub mod irqchip;
mod mailbox;
pub mod pci;
pub mod pflash;
pub mod plug;
mod reply;
mod sync;
mod turn;
pub mod uart;
pub mod virtio_doorbell;
pub mod wakeups;

pub use actor::{ActorError, ActorHandle, ActorOptions, ActorStats, Device, DeviceCtx, Spawned, WritePolicy};
pub use error::{Error, Result};
pub use irq::{InterruptSink, IrqLine, LevelRecorder};
pub use plug::{DeviceModel, PlugCtx, Plugged};
pub use topos_runtime as runtime;
pub use wakeups::DeviceRuntime;
