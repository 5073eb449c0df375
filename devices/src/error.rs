//! The crate's one error type: what goes wrong when a board plugs, wires or
//! unplugs devices. Guests never cause one — a guest access is answered,
//! whatever it is (see each model's documentation).

use crate::actor::ActorError;

/// Why the embedder's request about a device could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration does not describe a device the model can be.
    #[error("invalid {device} configuration: {reason}")]
    InvalidConfig {
        /// The model (`"pflash"`, `"virtio-mmio"`, ...).
        device: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The slot number is not below 32.
    #[error("PCI slot {0} does not exist (bus 0 has slots 0-31)")]
    NoSuchSlot(u8),
    /// A function is already plugged into the slot.
    #[error("PCI slot {0} is in use")]
    SlotInUse(u8),
    /// No function is plugged into the slot.
    #[error("PCI slot {0} is empty")]
    SlotEmpty(u8),
    /// The description of a PCI function is inconsistent (or the model has
    /// no PCI identity and the board gave none).
    #[error("invalid PCI function: {0}")]
    InvalidFunction(String),
    /// The device has no region with that role.
    #[error("the device has no region `{0}`")]
    NoSuchRegion(String),
    /// The memory API refused an operation.
    #[error(transparent)]
    Memory(#[from] topos_runtime::Error),
    /// The device's actor is gone or failed.
    #[error(transparent)]
    Actor(#[from] ActorError),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
