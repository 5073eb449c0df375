//! # topos-devices
//!
//! Device models for topos, run as actors (see [`actor`]): each device owns
//! its state, receives accesses through a mailbox, and never shares a lock
//! with another device (the only `unsafe` is the actor's turn cell, in
//! `turn.rs`). All device behaviour is reached through address
//! space accesses, as a guest would.
#![deny(unsafe_code)]

pub mod actor;
pub mod debug_exit;
pub mod edu;
pub mod framebuffer;
pub mod irq;
mod mailbox;
pub mod pci;
pub mod pflash;
mod reply;
mod sync;
mod turn;
pub mod uart;
pub mod virtio_doorbell;
pub mod wakeups;

pub use actor::{ActorError, ActorHandle, ActorOptions, ActorStats, Device, DeviceCtx, Spawned, WritePolicy};
pub use irq::{InterruptSink, IrqLine, LevelRecorder};
pub use topos_runtime as runtime;
pub use wakeups::DeviceRuntime;
