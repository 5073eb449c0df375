//! Errors returned to the embedding program.
//!
//! Where QEMU asserts or aborts on misuse of the memory API, topos returns one
//! of these and leaves the topology exactly as it was. Guest accesses never
//! produce an `Error`: they produce a [`MemTxResult`](crate::MemTxResult).

use thiserror::Error;

/// Misuse of the memory API by the embedding program.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The region is already a subregion of some container.
    #[error("region `{region}` already has a parent (`{parent}`)")]
    AlreadyHasParent {
        /// The region being added.
        region: String,
        /// Its current container.
        parent: String,
    },
    /// The region is not a subregion of the given container.
    #[error("region `{region}` is not a subregion of `{container}`")]
    NotAChild {
        /// The region being removed.
        region: String,
        /// The container it was removed from.
        container: String,
    },
    /// Adding the subregion would make the region graph cyclic.
    #[error("adding `{region}` under `{container}` would create a cycle")]
    AliasCycle {
        /// The region being added.
        region: String,
        /// The container.
        container: String,
    },
    /// Aliases render their target; they cannot hold subregions.
    #[error("`{0}` is an alias and cannot hold subregions")]
    AliasCannotContain(String),
    /// The region is still a subregion of a container.
    #[error("region `{0}` is still mapped in a container")]
    StillMapped(String),
    /// An alias still refers to the region.
    #[error("region `{region}` is still the target of {aliases} alias(es)")]
    StillAliased {
        /// The region.
        region: String,
        /// How many aliases refer to it.
        aliases: usize,
    },
    /// The region is the root of an address space.
    #[error("region `{0}` is the root of an address space")]
    IsAddressSpaceRoot(String),
    /// The region was destroyed.
    #[error("region `{0}` was destroyed")]
    Destroyed(String),
    /// A size above 2^64, or an address computation that leaves the 64-bit
    /// space where it must not.
    #[error("size or address overflows the 64-bit address space: {0}")]
    Overflow(String),
    /// The operation needs a region of another kind.
    #[error("region `{region}` is not {expected}")]
    WrongKind {
        /// The region.
        region: String,
        /// What the operation needs ("RAM", "an alias", "a ROM device"...).
        expected: &'static str,
    },
    /// The offset/size pair lies outside the region.
    #[error("range {offset:#x}+{size:#x} is outside region `{region}`")]
    OutOfRange {
        /// The region.
        region: String,
        /// Offset of the range.
        offset: u64,
        /// Size of the range.
        size: u128,
    },
    /// The two objects belong to different topologies.
    #[error("`{0}` belongs to another topology")]
    ForeignObject(String),
    /// The topology the object belongs to has been dropped.
    #[error("the topology has been dropped")]
    TopologyGone,
    /// `commit` without a matching `begin` on this thread.
    #[error("commit without a matching begin on this thread")]
    NotInTransaction,
    /// A listener (or a hook it runs) tried to change the topology while the
    /// topology actor was committing.
    #[error("the topology cannot be changed from inside a commit (listener callback)")]
    MutationDuringCommit,
    /// The calling thread holds a device actor's turn, and must not wait for
    /// the topology's (see [`turns`](crate::turns)): defer the work with
    /// [`defer_until_no_turn`](crate::turns::defer_until_no_turn).
    #[error("the topology cannot be used while this thread holds a device's turn; defer the work")]
    InsideDeviceTurn,
    /// No matching ioeventfd is registered on the region.
    #[error("no matching ioeventfd on region `{0}`")]
    NoSuchEventfd(String),
    /// Invalid access constraints in a region's ops configuration.
    #[error("invalid access constraints: {0}")]
    InvalidConstraints(String),
    /// The address space was already destroyed.
    #[error("address space `{0}` was destroyed")]
    AddressSpaceDestroyed(String),
    /// Host memory for a RAM region could not be allocated.
    #[error("cannot allocate {size:#x} bytes of RAM for `{region}`: {reason}")]
    RamAllocation {
        /// The region.
        region: String,
        /// Requested size.
        size: u128,
        /// The OS error.
        reason: String,
    },
    /// A memory listener failed (returned an error or panicked) and was
    /// detached. The operation that triggered it was carried out and
    /// committed; the failure is also recorded as a
    /// [`Fault`](crate::Fault).
    #[error("{0}")]
    ListenerFailed(crate::ListenerFailure),
    /// Creating an eventfd failed.
    #[error("eventfd: {0}")]
    Eventfd(String),
}

/// Result alias for the memory API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
