//! The commit: the one place that consumes a transaction's intent, in one
//! direction —
//!
//! coalescing changes → render → diff and listeners → publish → ioeventfds
//! → generation and `commit` → broadcast.
//!
//! It runs on the thread that ends the outermost transaction, with the
//! topology's turn held (see `transaction.rs`), and never unwinds: listener
//! failures are collected (see `listener.rs`) and returned to the caller of
//! `commit`, after the commit has completed for everything else.

use crate::broadcast::{CommitDiff, SpaceDiff};
use crate::coalesced;
use crate::diff::topology_passes;
use crate::fault::ListenerFailure;
use crate::ioeventfd::update_ioeventfds;
use crate::listener::Listeners;
use crate::region::MemoryRegion;
use crate::render::physical_root;
use crate::sync::Arc;
use crate::topology::Topology;

impl Topology {
    /// Commits the open transaction's intent (turn held, `committing` set).
    pub(crate) fn run_commit(&self) -> Vec<ListenerFailure> {
        let (intent, ases, entries) = {
            let mut st = self.state();
            let intent = std::mem::take(&mut st.intent);
            (intent, st.address_spaces.clone(), st.listeners.clone())
        };
        let forced = self.state().renders.apply(&intent.damage);
        let topo = intent.topology || forced;
        let anything = topo || intent.ioeventfds;
        let generation = self.generation() + u64::from(anything);
        let ls = Listeners::new(entries, generation);

        // Coalescing changes, against the views published before.
        coalesced::report_changes(&intent.coalesced, &ases, &ls);
        if !anything {
            return ls.into_failures();
        }
        let want_diff = self.diff_sender().receiver_count() > 0;
        let mut diff = CommitDiff { generation, spaces: Vec::new() };

        // Render every physical root that some address space shows.
        let roots: Vec<Option<MemoryRegion>> =
            ases.iter().map(|a| if a.is_destroyed() { None } else { physical_root(a.root()) }).collect();
        let (rendered, empty) = {
            let mut st = self.state();
            let rendered = st.renders.render(&roots, generation);
            (rendered, st.renders.empty().clone())
        };

        if topo {
            ls.each_forward("begin", |l| l.begin());
        }
        self.shared().begin_publication();
        for (asp, root) in ases.iter().zip(&roots) {
            let mut sd = SpaceDiff { address_space: asp.id(), name: asp.name_arc().clone(), ..Default::default() };
            let old = asp.view();
            let r = root.as_ref().and_then(|r| rendered.get(&r.id()));
            let new = r.map_or_else(|| empty.clone(), |r| r.new.clone());
            // Incremental spans are valid only against the view this address
            // space had (it may have switched roots).
            let (spans, evspans) = match r {
                Some(r) if Arc::ptr_eq(&r.old, &old) => (r.spans.clone(), r.evspans.clone()),
                _ => (None, Vec::new()),
            };
            let changed = !Arc::ptr_eq(&old, &new);
            let nops = topo && ls.nop_for(asp.id());
            let observed = ls.any_for(asp.id()) || want_diff;
            // Diff and listeners, before the guest can see the new view.
            if (changed || nops) && observed {
                topology_passes(asp, &old, &new, &ls, &mut sd, if nops { None } else { spans.as_deref() });
            }
            // Publish.
            if changed {
                asp.publish(new.clone(), generation);
            }
            // ioeventfds, against the published view.
            if observed {
                let windows = match (&spans, changed) {
                    (Some(sp), _) => Some(crate::damage::normalize(sp.iter().chain(evspans.iter()).copied().collect())),
                    (None, true) => None,
                    (None, false) => Some(evspans.clone()),
                };
                update_ioeventfds(asp, &new, windows.as_deref(), Some(&ls), &mut sd);
            } else {
                asp.forget_eventfds();
            }
            sd.destroyed = asp.is_destroyed();
            if want_diff && !sd.is_empty() {
                diff.spaces.push(sd);
            }
        }
        // Every view is out: the generation may say so.
        self.shared().end_publication(generation);
        if topo {
            ls.each_forward("commit", |l| l.commit());
        }

        // Unlink destroyed address spaces.
        self.unlink_destroyed_address_spaces();
        if want_diff {
            let _ = self.diff_sender().send(Arc::new(diff));
        }
        ls.into_failures()
    }
}
