//! The Accessor's revalidation (`accessor.rs` against
//! `AddressSpace::publish`): the per-vCPU cache keeps a view and the address
//! space's publication generation it was loaded at, and revalidates with one
//! load of that generation.
//!
//! * A reader that sees a new generation uses a view at least that new: the
//!   cache never pairs an older view with a newer generation (which would
//!   keep the stale view until the *next* commit). This needs the view
//!   swapped before the generation is stored, the generation stored
//!   `Release` and loaded `Acquire`, and `refresh` to load the generation
//!   before the view. Under loom the RCU cell is an atomic whose loads may
//!   be stale (see the runtime's `sync` module), so a broken ordering shows
//!   as an old view loaded after a new generation.
//! * Once a commit happens-before an access, the accessor sees the commit.
//!
//! The models know which layout each publication generation stands for and
//! check the cached view against the cached generation by layout.
#![cfg(topos_loom)]

use loom::thread;
use topos_loom_tests::model::{lay, layout_of, small};
use topos_runtime::Accessor;

/// The cache's invariant after a refresh, for a model whose publications
/// are `layouts[0]` at generation `g0`, `layouts[1]` at `g0 + 1`...: the
/// cached view is the one of the cached generation or a newer one.
fn check_pairing(acc: &Accessor, g0: u64, layouts: &[Vec<(u64, String)>]) {
    let seen = layout_of(acc.view());
    let view_at = layouts.iter().position(|l| *l == seen).unwrap_or_else(|| panic!("unknown layout {seen:?}"));
    let gen_at = (acc.generation() - g0) as usize;
    assert!(gen_at < layouts.len(), "generation {} was never published", acc.generation());
    assert!(view_at >= gen_at, "stale view {seen:?} cached with generation {}", acc.generation());
}

#[test]
fn refresh_never_pairs_a_new_generation_with_an_older_view() {
    loom::model(|| {
        let (topo, root, asp) = small().unwrap();
        let (a, b) = (topo.new_ram("a", 0x1000).unwrap(), topo.new_ram("b", 0x1000).unwrap());
        let mut acc = asp.accessor();
        let g0 = acc.generation();
        // Two commits: generations g0 (empty), g0 + 1 (a), g0 + 2 (a, b).
        let layouts = [lay(&[]), lay(&[(0, "a")]), lay(&[(0, "a"), (0x1000, "b")])];
        let layouts2 = layouts.clone();
        check_pairing(&acc, g0, &layouts);

        // The vCPU is the spawned thread and the writer runs first (loom's
        // DPOR remembers only the last access to an atomic, and the commit
        // loads the view before swapping it: a reader's loads made before
        // the commit would never be moved into it).
        let vcpu = thread::spawn(move || {
            // Accesses racing the commit.
            for _ in 0..2 {
                acc.refresh();
                check_pairing(&acc, g0, &layouts2);
            }
            acc
        });
        root.add_subregion(0, &a).unwrap();
        root.add_subregion(0x1000, &b).unwrap();
        let mut acc = vcpu.join().unwrap();
        // The commit happened-before this access: the cache must see it.
        let hit = acc.lookup(0).map(|r| r.region().name().to_string());
        assert_eq!(hit.as_deref(), Some("a"), "the accessor missed a commit that happened before");
        assert_eq!(acc.generation(), g0 + 2);
        check_pairing(&acc, g0, &layouts);
        assert!(acc.is_current());
    });
}
