//! loom models of topos's concurrency protocols.
//!
//! Each file in `tests/` models one protocol against the real code: built
//! with `--cfg topos_loom`, the runtime and the device harness take their
//! locks, atomics, cells, queues, RCU cell, thread identities, thread-locals
//! and drainer threads from loom (see the `sync` modules of `topos_runtime`
//! and `topos_devices`), so loom explores the interleavings of their own
//! code (and the vCPU layer's control protocol, `topos_vcpu::control`).
//!
//! | model | what it checks |
//! | --- | --- |
//! | `accessor` | an [`Accessor`](topos_runtime::Accessor) never pairs a new generation with an older view, and sees a commit that happened before |
//! | `generation` | a reader that sees `Topology::generation() == g` then loads views at least as new as `g`'s, in every address space |
//! | `flatview_publish` | readers see one transaction's views whole; a retired view, and a removed region, live exactly as long as a reader holds them |
//! | `commit_serialization` | concurrent transactions both survive, generations strictly increase |
//! | `listener_order` | commits' callbacks never interleave, follow priority; listeners hear of a range before a reader can reach it; `commit` sees the new generation |
//! | `listener_failure` | a failing listener is detached at once; the commits complete; the failure is returned once and recorded once |
//! | `turn` | two waiters take the turn one at a time; an abandoned transaction is completed by the next thread; listener callbacks may query but not mutate, and do not end the commit |
//! | `queries` | `snapshot` is one generation, `mtree` never shows half a transaction, a device-turn holder is refused instead of waiting |
//! | `diff_broadcast` | a subscriber racing the commits hands out gapless diffs or an honest resync, and ends where the topology is |
//! | `dirty_bitmap` | no dirty bit lost or harvested twice, on the whole-word, masked-word and per-page paths |
//! | `map_clients` | a client registered after a failed map is woken, and then finds the budget free |
//! | `ioeventfd` | a write racing `add_eventfd` goes one way; `eventfd_add` reaches listeners only after the view is published |
//! | `device_turn` | device handlers never overlap; a post racing a release is never stranded; FIFO per sender; a read of a busy actor gets its answer |
//! | `device_mailbox` | a full mailbox makes senders wait for room, and they are woken |
//! | `device_handoff` | a caller handles at most its budget of others' messages; the backlog is drained by a drainer |
//! | `device_no_block` | two devices whose handlers read and call each other never deadlock |
//! | `irqchip_post` | an interrupt, NMI, INIT/SIPI or PIC request posted to a local APIC (`topos_devices::irqchip`) while its vCPU looks at another or decides to halt is never lost; nor is one posted before the vCPU's waker is installed |
//! | `vcpu_control` | a kick racing a vCPU's entry into guest code is never lost; a pause returns only once the vCPU is out of guest code, and it runs again after resume; stop ends it |
//!
//! ```sh
//! # bounded, as CI runs them
//! LOOM_MAX_PREEMPTIONS=2 RUSTFLAGS="--cfg topos_loom" \
//!     cargo test -p topos-loom-tests --release --target-dir target/loom
//! # unbounded (the models are small: seconds, not minutes)
//! RUSTFLAGS="--cfg topos_loom" cargo test -p topos-loom-tests --release --target-dir target/loom
//! ```
//!
//! Without `--cfg topos_loom` the test files compile to nothing.
//!
//! # Can the models fail?
//!
//! `mutations.py` (next to this crate's `Cargo.toml`) applies the bugs
//! listed in `mutations.toml` one at a time — a generation stored too early
//! or too weakly, a harvest split into a load and a store, an `if` for a
//! `while`, a query that skips the turn... — runs the model named for each,
//! restores the file, and prints a table; every listed mutation must be
//! caught (a mutant that does not build counts as invalid, not caught).
//!
//! ```sh
//! python3 loom-tests/mutations.py            # each mutation against its model (~7 min)
//! python3 loom-tests/mutations.py --suite    # each against the whole suite
//! python3 loom-tests/mutations.py --only turn-if-not-while
//! python3 loom-tests/mutations.py --list
//! ```
//!
//! New mutations, in any crate of the workspace, are entries in
//! `mutations.toml` (its header gives the format). Mutants that change no
//! observable behaviour are kept apart as `[[equivalent]]`, with the
//! argument.
//!
//! # Writing a model that can fail
//!
//! * **Spawn the observer; let the writer run first.** loom's DPOR records
//!   only the *last* access to each atomic or lock. The commit itself loads
//!   the generation and the view before it stores them, so a reader's loads
//!   made *before* the commit in loom's first execution are forgotten and
//!   never moved into it (a model written that way explores one schedule).
//!   Loads made after the commit are seen, and DPOR moves them back into
//!   every gap of it.
//! * **Keep the state the assertion compares in loom's sight.** A listener
//!   that records what it saw behind a loom mutex lets loom try the reader
//!   before and after the callback; behind a std mutex it would not.
//! * **Mind what loom cannot see.** The RCU cell is a loom stand-in whose
//!   loads may be stale, like any loom atomic (see the runtime's `sync`
//!   module); tokio's broadcast channel and `std` reference counts are not
//!   modelled and give no happens-before edge under loom.
//! * Check how many executions a model explores: `LOOM_LOG=info` and
//!   `--nocapture` print "Completed in N iterations". One iteration means
//!   the model is sequential.

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

/// Helpers shared by the device harness models.
pub mod devices {
    use std::sync::{Arc, Mutex};
    use topos_devices::runtime::HwAddr;
    use topos_devices::{Device, DeviceCtx};

    /// What a [`Recorder`] saw, in order.
    ///
    /// A std mutex, invisible to loom: nothing in its critical sections
    /// yields to loom, and the models read it once their threads are done.
    pub type Log = Arc<Mutex<Vec<u64>>>;

    /// Records every value written to it; reads return how many it has.
    /// Its handlers run inside the harness's turn cell, so loom checks that
    /// the turn makes them exclusive.
    pub struct Recorder(pub Log);

    impl Recorder {
        /// A recorder and its log.
        pub fn new() -> (Recorder, Log) {
            let log = Log::default();
            (Recorder(log.clone()), log)
        }
    }

    impl Device for Recorder {
        fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: HwAddr, _size: u32) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn write(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, _addr: HwAddr, value: u64, _size: u32) {
            self.0.lock().unwrap().push(value);
        }
    }

    /// Whether `a` comes before `b` in `log` (both present).
    pub fn before(log: &[u64], a: u64, b: u64) -> bool {
        matches!((log.iter().position(|&v| v == a), log.iter().position(|&v| v == b)), (Some(i), Some(j)) if i < j)
    }
}

/// Helpers shared by the vCPU models.
pub mod vcpu {
    use topos_vcpu::control::Kick;

    /// A kick that does nothing: the models run no guest code to
    /// interrupt (scripted runs return by themselves), so a vCPU thread
    /// leaves a halt only through its control's condition variable.
    pub struct NoKick;

    impl Kick for NoKick {
        fn kick(&self) {}
        fn clear(&self) {}
    }
}
