//! loom models of the runtime's concurrency protocols.
//!
//! Each file in `tests/` models one protocol against the real runtime code:
//! built with `--cfg topos_loom`, the runtime takes its locks, atomics, RCU
//! cell and thread identities from loom (see `topos_runtime`'s `sync`
//! module), so loom explores the interleavings of the runtime's own
//! publication, transaction, listener, broadcast, dirty-bitmap and bounce
//! buffer code.
//!
//! ```sh
//! # bounded, as CI runs them
//! LOOM_MAX_PREEMPTIONS=2 RUSTFLAGS="--cfg topos_loom" \
//!     cargo test -p topos-loom-tests --release --target-dir target/loom
//! # unbounded (much longer)
//! RUSTFLAGS="--cfg topos_loom" cargo test -p topos-loom-tests --release --target-dir target/loom
//! ```
//!
//! Without `--cfg topos_loom` the test files compile to nothing.

/// Helpers shared by the models.
pub mod model {
    use topos_runtime::{AddressSpace, FlatView, MemoryRegion, Result, Topology};

    /// A topology with one 64 KiB root container in address space "m".
    pub fn small() -> Result<(Topology, MemoryRegion, AddressSpace)> {
        let topo = Topology::new();
        let root = topo.new_container("root", 0x10000)?;
        let asp = topo.address_space_init(&root, "m")?;
        Ok((topo, root, asp))
    }

    /// The (start, region name) pairs of the address space's current view.
    pub fn layout(asp: &AddressSpace) -> Vec<(u64, String)> {
        layout_of(&asp.view())
    }

    /// The (start, region name) pairs of a view.
    pub fn layout_of(view: &FlatView) -> Vec<(u64, String)> {
        view.ranges().iter().map(|r| (r.start(), r.region().name().to_string())).collect()
    }

    /// A layout written out: `[(0, "a")]` from `&[(0, "a")]`.
    pub fn lay(pairs: &[(u64, &str)]) -> Vec<(u64, String)> {
        pairs.iter().map(|(a, n)| (*a, n.to_string())).collect()
    }
}
