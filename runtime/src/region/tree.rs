//! Mutators of the region tree: subregions, addresses, enabling, destroy.
//!
//! Each records what the next commit must re-render (see
//! [`Intent`](crate::transaction::Intent)) instead of rendering anything
//! itself.

use super::{ChildGeo, MemoryRegion, RegionKind};
use crate::error::{Error, Result};
use crate::sync::{Arc, Ordering, Weak};
use crate::transaction::Damage;
use crate::types::HwAddr;
use std::collections::HashSet;

impl MemoryRegion {
    /// True if `target` can be reached from `self` through subregions and
    /// alias targets (including `self == target`).
    fn reaches(&self, target: &MemoryRegion) -> bool {
        let mut seen = HashSet::new();
        let mut stack = vec![self.clone()];
        while let Some(r) = stack.pop() {
            if r == *target {
                return true;
            }
            if !seen.insert(r.id()) {
                continue;
            }
            if let Some(t) = r.alias_target() {
                stack.push(t);
            }
            stack.extend(r.state().subregions.iter().cloned());
        }
        false
    }

    fn add_subregion_common(&self, offset: HwAddr, child: &MemoryRegion, priority: i32) -> Result<()> {
        self.check_same_topology(child)?;
        self.mutate(|topo| {
            child.check_alive()?;
            if self.is_alias() {
                return Err(Error::AliasCannotContain(self.name().to_string()));
            }
            if let Some(p) = child.container() {
                return Err(Error::AlreadyHasParent { region: child.name().to_string(), parent: p.name().to_string() });
            }
            if child.state().parent.is_some() {
                // The parent is being dropped; treat as still attached.
                return Err(Error::AlreadyHasParent { region: child.name().to_string(), parent: "?".into() });
            }
            if child.reaches(self) {
                return Err(Error::AliasCycle { region: child.name().to_string(), container: self.name().to_string() });
            }
            {
                let mut cs = child.state();
                cs.parent = Some(Arc::downgrade(&self.0));
                cs.addr = offset;
                cs.priority = priority;
            }
            let child_enabled = child.is_enabled();
            let mut st = self.state();
            // Insert before the first sibling whose priority is <= ours.
            let pos = st.subregions.iter().position(|o| o.state().priority <= priority).unwrap_or(st.subregions.len());
            st.subregions.insert(pos, child.clone());
            st.child_geo.insert(pos, ChildGeo::of(offset, child.size(), child_enabled));
            let pending = st.enabled && child_enabled;
            drop(st);
            let child_is_root = child.is_as_root();
            topo.record(|i| {
                i.changed(pending || child_is_root);
                i.damage(Damage::Child { parent: self.clone(), addr: offset, size: child.size() });
                // The child renders at its own address where it is a root
                // (of an address space, or of a shared view): those views
                // move with it.
                i.damage(Damage::RootPlaced(child.clone()));
            });
            Ok(())
        })
    }

    /// `memory_region_add_subregion`: adds `child` at `offset` with priority 0.
    pub fn add_subregion(&self, offset: HwAddr, child: &MemoryRegion) -> Result<()> {
        self.add_subregion_common(offset, child, 0)
    }

    /// `memory_region_add_subregion_overlap`: adds `child` at `offset` with a
    /// priority; higher priorities hide lower ones, and among equal
    /// priorities the most recently added child wins.
    pub fn add_subregion_overlap(&self, offset: HwAddr, child: &MemoryRegion, priority: i32) -> Result<()> {
        self.add_subregion_common(offset, child, priority)
    }

    /// Moves `child`, a subregion of `self`, to `addr`: what
    /// `del_subregion` then `add_subregion_overlap` would do (it becomes the
    /// newest among siblings of its priority), in one step.
    fn move_subregion(&self, child: &MemoryRegion, addr: HwAddr, priority: i32) -> Result<()> {
        let topo = self.topology()?;
        let mut st = self.state();
        let Some(from) = st.subregions.iter().position(|c| c == child) else {
            return Err(Error::NotAChild { region: child.name().to_string(), container: self.name().to_string() });
        };
        let old = std::mem::replace(&mut child.state().addr, addr);
        // Where `add_subregion` would put it once removed: before the first
        // other sibling whose priority is <= its own.
        let to = st.subregions.iter().enumerate().position(|(i, o)| i != from && o.state().priority <= priority);
        let to = match to {
            Some(i) if i > from => i - 1,
            Some(i) => i,
            None => st.subregions.len() - 1,
        };
        let child_enabled = child.is_enabled();
        st.child_geo[from] = ChildGeo::of(addr, child.size(), child_enabled);
        if to < from {
            st.subregions[to..=from].rotate_right(1);
            st.child_geo[to..=from].rotate_right(1);
        } else if to > from {
            st.subregions[from..=to].rotate_left(1);
            st.child_geo[from..=to].rotate_left(1);
        }
        let pending = st.enabled && child_enabled;
        drop(st);
        let child_is_root = child.is_as_root();
        topo.record(|i| {
            i.changed(pending || child_is_root);
            i.damage(Damage::Child { parent: self.clone(), addr: old, size: child.size() });
            i.damage(Damage::Child { parent: self.clone(), addr, size: child.size() });
            i.damage(Damage::RootPlaced(child.clone()));
        });
        Ok(())
    }

    /// `memory_region_del_subregion`.
    pub fn del_subregion(&self, child: &MemoryRegion) -> Result<()> {
        self.check_same_topology(child)?;
        self.mutate(|topo| {
            let mut st = self.state();
            let Some(pos) = st.subregions.iter().position(|c| c == child) else {
                return Err(Error::NotAChild { region: child.name().to_string(), container: self.name().to_string() });
            };
            let removed = st.subregions.remove(pos);
            st.child_geo.remove(pos);
            let pending = st.enabled && child.is_enabled();
            drop(st);
            let addr = {
                let mut cs = removed.state();
                cs.parent = None;
                cs.addr
            };
            drop(removed);
            topo.record(|i| {
                i.changed(pending);
                i.damage(Damage::Child { parent: self.clone(), addr, size: child.size() });
            });
            Ok(())
        })
    }

    /// `memory_region_set_enabled`.
    pub fn set_enabled(&self, enabled: bool) -> Result<()> {
        self.mutate(|topo| {
            let mut st = self.state();
            if st.enabled == enabled {
                return Ok(());
            }
            st.enabled = enabled;
            let parent = st.parent.as_ref().and_then(Weak::upgrade).map(MemoryRegion);
            let addr = st.addr;
            let geo = ChildGeo::of(addr, self.size(), enabled);
            drop(st);
            if let Some(p) = &parent {
                let mut ps = p.state();
                if let Some(k) = ps.subregions.iter().position(|c| c == self) {
                    ps.child_geo[k] = geo;
                }
            }
            let aliases = self.aliases();
            // Re-render where the region is, or would be, rendered: through
            // its container or any alias of it.
            topo.record(|i| {
                i.changed(true);
                i.damage(Damage::Region(self.clone()));
                if let Some(p) = parent {
                    i.damage(Damage::Child { parent: p, addr, size: self.size() });
                }
                for a in aliases {
                    i.damage(Damage::Region(a));
                }
            });
            Ok(())
        })
    }

    /// `memory_region_set_address`: moves the region within its container.
    /// A real move re-inserts it, so it becomes the newest among siblings of
    /// equal priority (as in QEMU).
    pub fn set_address(&self, addr: HwAddr) -> Result<()> {
        let topo = self.topology()?;
        topo.with_mutation(|| {
            self.check_alive()?;
            let (cur, parent, prio) = {
                let st = self.state();
                (st.addr, st.parent.as_ref().and_then(Weak::upgrade).map(MemoryRegion), st.priority)
            };
            match parent {
                Some(p) if cur != addr => p.move_subregion(self, addr, prio),
                _ => {
                    // No container: QEMU only stores the address. The root of
                    // an address space renders at its own address, though, so
                    // re-render rather than leave its view stale.
                    let moved = {
                        let mut st = self.state();
                        let moved = st.addr != addr;
                        st.addr = addr;
                        moved && st.enabled
                    };
                    if moved {
                        let rooted = self.is_as_root();
                        topo.record(|i| {
                            i.changed(rooted);
                            i.damage(Damage::Region(self.clone()));
                            i.damage(Damage::RootPlaced(self.clone()));
                        });
                    }
                    Ok(())
                }
            }
        })
    }

    /// `memory_region_destroy`: fails while the region is a subregion, the
    /// target of an alias, or the root of an address space; otherwise
    /// detaches its subregions and marks it destroyed. Its memory is freed
    /// when the last handle and the last view referring to it are gone.
    pub fn destroy(&self) -> Result<()> {
        self.mutate(|topo| {
            if self.container().is_some() {
                return Err(Error::StillMapped(self.name().to_string()));
            }
            let aliases = self.0.alias_refs.load(Ordering::Acquire);
            if aliases > 0 {
                return Err(Error::StillAliased { region: self.name().to_string(), aliases });
            }
            if self.is_as_root() {
                return Err(Error::IsAddressSpaceRoot(self.name().to_string()));
            }
            let children = {
                let mut st = self.state();
                st.child_geo.clear();
                std::mem::take(&mut st.subregions)
            };
            let enabled = self.is_enabled();
            for c in &children {
                let addr = {
                    let mut cs = c.state();
                    cs.parent = None;
                    cs.addr
                };
                let pending = enabled && c.is_enabled();
                topo.record(|i| {
                    i.changed(pending);
                    i.damage(Damage::Child { parent: self.clone(), addr, size: c.size() });
                });
            }
            self.state().destroyed = true;
            if let RegionKind::Alias { target } = self.kind() {
                target.0.alias_refs.fetch_sub(1, Ordering::AcqRel);
            }
            Ok(())
        })
    }
}
