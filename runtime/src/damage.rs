//! Incremental rendering: one render cache per physical root (address spaces
//! whose roots render the same tree share it and its view), the placements
//! its last render recorded, and the translation of a transaction's damage
//! into the address windows its next render must redo.

use crate::flatview::FlatView;
use crate::region::{MemoryRegion, RegionId};
use crate::render::{render, render_windows, Placements};
use crate::sync::Arc;
use crate::transaction::Damage;
use std::collections::HashMap;

/// The rendering state of one physical root.
struct RenderCache {
    root: MemoryRegion,
    view: Arc<FlatView>,
    placements: Placements,
    /// Placements right after the last full render (bounds their growth).
    full_count: usize,
    full: bool,
    /// Address windows to re-render at the next commit.
    windows: Vec<(u128, u128)>,
    /// Address windows whose ioeventfds changed (no re-render).
    evwindows: Vec<(u128, u128)>,
}

impl RenderCache {
    fn new(root: MemoryRegion, empty: &Arc<FlatView>) -> RenderCache {
        RenderCache {
            root,
            view: empty.clone(),
            placements: Placements::default(),
            full_count: 0,
            full: true,
            windows: Vec::new(),
            evwindows: Vec::new(),
        }
    }

    /// Windows where region `id` was rendered.
    fn placed(&self, id: RegionId) -> impl Iterator<Item = (u128, u128)> + '_ {
        self.placements.map.get(&id).into_iter().flatten().map(|p| (p.start, p.end))
    }
}

/// Sorts windows and merges those that overlap or touch.
pub(crate) fn normalize(mut w: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    w.retain(|x| x.0 < x.1);
    w.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(w.len());
    for (s, e) in w {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// What a commit rendered for one physical root.
pub(crate) struct Rendered {
    pub(crate) old: Arc<FlatView>,
    pub(crate) new: Arc<FlatView>,
    /// Where the views may differ (range-aligned in both), or `None` when
    /// everything was re-rendered.
    pub(crate) spans: Option<Vec<(u128, u128)>>,
    /// Where ioeventfds may have changed without a re-render.
    pub(crate) evspans: Vec<(u128, u128)>,
}

/// Every physical root's render cache, and the shared empty view.
pub(crate) struct RenderCaches {
    caches: HashMap<RegionId, RenderCache>,
    empty: Arc<FlatView>,
}

impl Default for RenderCaches {
    fn default() -> Self {
        RenderCaches { caches: HashMap::new(), empty: Arc::new(FlatView::empty()) }
    }
}

impl RenderCaches {
    /// The shared empty view (address spaces with nothing to render).
    pub(crate) fn empty(&self) -> &Arc<FlatView> {
        &self.empty
    }

    /// Turns a transaction's damage into windows of the caches that exist.
    /// Returns true if some view must be rendered again although the
    /// mutators did not say so (a cache rooted at a region that moved).
    pub(crate) fn apply(&mut self, damage: &[Damage]) -> bool {
        let mut forced = false;
        for d in damage {
            for c in self.caches.values_mut() {
                match d {
                    Damage::All => c.full = true,
                    Damage::RootPlaced(r) => {
                        if c.root == *r {
                            c.full = true;
                            forced = true;
                        }
                    }
                    Damage::Region(r) => {
                        if c.root == *r {
                            c.full = true;
                        }
                        if !c.full {
                            let w: Vec<_> = c.placed(r.id()).collect();
                            c.windows.extend(w);
                        }
                    }
                    Damage::Child { parent, addr, size } => {
                        if c.full {
                            continue;
                        }
                        if let Some(ps) = c.placements.map.get(&parent.id()) {
                            for p in ps {
                                let s = (p.base + *addr as i128).max(p.start as i128);
                                let e = (p.base + *addr as i128 + *size as i128).min(p.end as i128);
                                if s < e {
                                    c.windows.push((s as u128, e as u128));
                                }
                            }
                        }
                    }
                    Damage::Eventfds(r) => {
                        let w: Vec<_> = c.placed(r.id()).collect();
                        c.evwindows.extend(w);
                    }
                }
            }
        }
        forced
    }

    /// Brings the cache of every root in `roots` up to date for commit
    /// `generation` and returns the result per physical root; caches of
    /// roots no longer used are dropped.
    pub(crate) fn render(&mut self, roots: &[Option<MemoryRegion>], generation: u64) -> HashMap<RegionId, Rendered> {
        let mut out: HashMap<RegionId, Rendered> = HashMap::new();
        for root in roots.iter().flatten() {
            if out.contains_key(&root.id()) {
                continue;
            }
            let empty = &self.empty;
            let c = self.caches.entry(root.id()).or_insert_with(|| RenderCache::new(root.clone(), empty));
            let old = c.view.clone();
            let stale = c.placements.count > 4 * c.full_count + 4096;
            let (new, spans) = if c.full || stale {
                let v = Arc::new(render(Some(root), &mut c.placements, generation));
                c.full_count = c.placements.count;
                (v, None)
            } else if !c.windows.is_empty() {
                let windows = normalize(std::mem::take(&mut c.windows));
                let pieces = render_windows(Some(root), &windows, &mut c.placements);
                let v = Arc::new(old.splice(&windows, pieces, Some(root.clone()), generation));
                // Grow the windows to range boundaries of both views.
                let mut sp = windows;
                loop {
                    let grown = v.expand(&old.expand(&sp));
                    if grown == sp {
                        break;
                    }
                    sp = grown;
                }
                (v, Some(sp))
            } else {
                (old.clone(), Some(Vec::new()))
            };
            let evspans = new.expand(&normalize(std::mem::take(&mut c.evwindows)));
            c.full = false;
            c.windows.clear();
            c.view = new.clone();
            out.insert(root.id(), Rendered { old, new, spans, evspans });
        }
        self.caches.retain(|id, _| out.contains_key(id));
        out
    }
}
