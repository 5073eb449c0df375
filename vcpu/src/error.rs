//! The vCPU layer's errors.

/// What can go wrong building or running a VM (guest behaviour is never an
/// error here: it ends the VM with a [`StopReason`](crate::vm::StopReason)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/kvm` cannot be opened.
    #[error("KVM is not available: {0}")]
    KvmUnavailable(String),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The call that failed.
        what: &'static str,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// The memory API refused a change.
    #[error(transparent)]
    Runtime(#[from] topos_runtime::Error),
    /// A device could not be made.
    #[error(transparent)]
    Device(#[from] topos_devices::Error),
    /// The board's configuration is wrong.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A thread (a vCPU, or the device runtime) could not be started.
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }
}
