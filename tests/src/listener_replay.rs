//! One address space as a recording listener replays it from `region_add`
//! and `region_del`, with the checks of the listener protocol (semantics.md
//! §3) that the property tests share.

use std::collections::BTreeMap;
use std::fmt::Debug;

/// The ranges a listener holds for one address space, keyed by start
/// address, each with its size and what the test records of it (`E`), plus
/// what the current commit has sent so far.
#[derive(Debug)]
pub struct SpaceReplay<E> {
    held: BTreeMap<u64, (u128, E)>,
    /// A `region_add` was seen in the current commit.
    adding: bool,
    /// Start of the last `region_del` / `region_add` of the current commit.
    last_del: Option<u64>,
    last_add: Option<u64>,
}

impl<E> Default for SpaceReplay<E> {
    fn default() -> Self {
        SpaceReplay { held: BTreeMap::new(), adding: false, last_del: None, last_add: None }
    }
}

impl<E: Clone + Debug> SpaceReplay<E> {
    /// A commit starts (`begin`): forgets the order of the last one.
    pub fn begin(&mut self) {
        self.adding = false;
        self.last_del = None;
        self.last_add = None;
    }

    /// The replayed view: start address → entry.
    pub fn view(&self) -> BTreeMap<u64, E> {
        self.held.iter().map(|(&start, (_, e))| (start, e.clone())).collect()
    }

    /// Applies `region_add` of `[start, start + size)`; pushes onto `errors`
    /// an add out of address order, an empty one, or one overlapping a held
    /// range. `what` names the place in messages (e.g. "at 0x100 of memory").
    pub fn add(&mut self, start: u64, size: u128, e: E, errors: &mut Vec<String>, what: &str) {
        if self.last_add.is_some_and(|l| l >= start) {
            errors.push(format!("region_add {what} out of address order"));
        }
        self.adding = true;
        self.last_add = Some(start);
        if size == 0 {
            errors.push(format!("region_add of an empty section {what}"));
        }
        let end = start as u128 + size;
        if let Some((&ps, (psize, _))) = self.held.range(..=start).next_back() {
            if ps as u128 + psize > start as u128 {
                errors.push(format!("region_add {what} overlaps held range at {ps:#x}"));
            }
        }
        if let Some((&ns, _)) = self.held.range(start..).next() {
            if (ns as u128) < end {
                errors.push(format!("region_add {what} (to {end:#x}) overlaps held range at {ns:#x}"));
            }
        }
        self.held.insert(start, (size, e));
    }

    /// Applies `region_del` at `start`; pushes onto `errors` a delete after
    /// an add of the same commit, one out of address order, or one of a
    /// range not held as `same` (comparing the held entry with `e`) says.
    pub fn del(&mut self, start: u64, e: &E, same: impl Fn(&E, &E) -> bool, errors: &mut Vec<String>, what: &str) {
        if self.adding {
            errors.push(format!("region_del {what} after a region_add of the same commit"));
        }
        if self.last_del.is_some_and(|l| l >= start) {
            errors.push(format!("region_del {what} out of address order"));
        }
        self.last_del = Some(start);
        match self.held.get(&start) {
            Some((_, held)) if same(held, e) => {
                self.held.remove(&start);
            }
            held => errors.push(format!("region_del {what} of {e:?}, but the listener holds {:?}", held.map(|h| &h.1))),
        }
    }

    /// The entry held at exactly `start`, to update in place (`log_start`).
    pub fn get_mut(&mut self, start: u64) -> Option<&mut E> {
        self.held.get_mut(&start).map(|(_, e)| e)
    }
}
