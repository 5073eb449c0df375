//! `info mtree` text, in the format of QEMU 7.2.

use crate::error::Result;
use crate::region::{MemoryRegion, RegionKind};
use crate::sync::Arc;
use crate::topology::Topology;
use std::fmt::Write;

/// Options of [`Topology::mtree`] (the flags of `info mtree`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MtreeOptions {
    /// `-f`: print each FlatView instead of the region trees.
    pub flatview: bool,
    /// `-D`: also print disabled regions (suffixed ` [disabled]`).
    pub disabled: bool,
}

/// QEMU's `memory_region_type`.
fn region_type(mr: &MemoryRegion) -> &'static str {
    match mr.kind() {
        RegionKind::Alias { target } => region_type(target),
        RegionKind::RomDevice { .. } if mr.state().romd => "romd",
        RegionKind::Ram(_) if mr.state().readonly => "rom",
        RegionKind::Ram(_) => "ram",
        _ => "i/o",
    }
}

/// QEMU's `MR_SIZE`: size − 1, or 0 for an empty region, as a 64-bit value.
fn mr_size(size: u128) -> u64 {
    if size == 0 {
        0
    } else {
        (size - 1) as u64
    }
}

struct Printer<'a> {
    out: &'a mut String,
    disabled: bool,
    alias_queue: Vec<MemoryRegion>,
}

impl Printer<'_> {
    fn print_mr(&mut self, mr: &MemoryRegion, level: usize, base: u64) {
        let (addr, prio, enabled, alias_offset, subs) = {
            let st = mr.state();
            (st.addr, st.priority, st.enabled, st.alias_offset, st.subregions.clone())
        };
        let cur_start = base.wrapping_add(addr);
        let cur_end = cur_start.wrapping_add(mr_size(mr.size()));
        let overflow = cur_start < base || cur_end < cur_start;
        let show = enabled || self.disabled;
        let suffix = if enabled { "" } else { " [disabled]" };
        // QEMU prints the overflow warning before deciding whether the line
        // itself is shown.
        if overflow {
            self.out.push_str("[DETECTED OVERFLOW!] ");
        }
        if show {
            for _ in 0..level {
                self.out.push_str("  ");
            }
        }
        if let RegionKind::Alias { target } = mr.kind() {
            if !self.alias_queue.iter().any(|m| m == target) {
                self.alias_queue.push(target.clone());
            }
            if show {
                let _ = writeln!(
                    self.out,
                    "{:016x}-{:016x} (prio {}, {}): alias {} @{} {:016x}-{:016x}{}",
                    cur_start,
                    cur_end,
                    prio,
                    region_type(mr),
                    mr.name(),
                    target.name(),
                    alias_offset,
                    alias_offset.wrapping_add(mr_size(mr.size())),
                    suffix
                );
            }
        } else if show {
            let _ = writeln!(
                self.out,
                "{:016x}-{:016x} (prio {}, {}): {}{}",
                cur_start,
                cur_end,
                prio,
                region_type(mr),
                mr.name(),
                suffix
            );
        }
        // Children by ascending address, higher priority first at equal
        // addresses, list order otherwise (QEMU's insertion rule).
        let mut queue: Vec<(u64, i32, MemoryRegion)> = Vec::with_capacity(subs.len());
        for s in subs {
            let (a, p) = {
                let st = s.state();
                (st.addr, st.priority)
            };
            let pos = queue.iter().position(|(qa, qp, _)| a < *qa || (a == *qa && p > *qp)).unwrap_or(queue.len());
            queue.insert(pos, (a, p, s));
        }
        for (_, _, s) in queue {
            self.print_mr(&s, level + 1, cur_start);
        }
    }
}

impl Topology {
    /// The text of QEMU 7.2's `info mtree` (with `-f` and `-D` as options).
    ///
    /// Address spaces sharing a root are printed once under one
    /// `address-space:` line each (sorted by name), groups in address-space
    /// creation order; then every alias target as `memory-region:`.
    ///
    /// It reads the region tree with the topology's turn held, so it fails
    /// with [`Error::InsideDeviceTurn`](crate::Error::InsideDeviceTurn) on a
    /// thread that holds a device's turn (and waits for other threads' open
    /// transactions).
    pub fn mtree(&self, opts: MtreeOptions) -> Result<String> {
        self.with_query(|| {
            let mut out = String::new();
            if opts.flatview {
                self.mtree_flatviews(&mut out);
            } else {
                self.mtree_trees(&mut out, opts.disabled);
            }
            out
        })
    }

    fn mtree_trees(&self, out: &mut String, disabled: bool) {
        let ases = self.address_spaces();
        let mut groups: Vec<(MemoryRegion, Vec<String>)> = Vec::new();
        for a in &ases {
            match groups.iter_mut().find(|(r, _)| r == a.root()) {
                Some((_, names)) => names.push(a.name().to_string()),
                None => groups.push((a.root().clone(), vec![a.name().to_string()])),
            }
        }
        let mut p = Printer { out, disabled, alias_queue: Vec::new() };
        for (root, mut names) in groups {
            names.sort();
            for n in names {
                let _ = writeln!(p.out, "address-space: {n}");
            }
            p.print_mr(&root, 1, 0);
            p.out.push('\n');
        }
        let mut i = 0;
        while i < p.alias_queue.len() {
            let mr = p.alias_queue[i].clone();
            let _ = writeln!(p.out, "memory-region: {}", mr.name());
            p.print_mr(&mr, 1, 0);
            p.out.push('\n');
            i += 1;
        }
    }

    fn mtree_flatviews(&self, out: &mut String) {
        let ases = self.address_spaces();
        let mut views: Vec<(Arc<crate::FlatView>, Vec<crate::AddressSpace>)> = Vec::new();
        for a in &ases {
            let v = a.view();
            match views.iter_mut().find(|(w, _)| Arc::ptr_eq(w, &v)) {
                Some((_, list)) => list.push(a.clone()),
                None => views.push((v, vec![a.clone()])),
            }
        }
        for (n, (view, list)) in views.iter().enumerate() {
            let _ = writeln!(out, "FlatView #{n}");
            for a in list {
                let _ = write!(out, " AS \"{}\", root: {}", a.name(), a.root().name());
                if let Some(t) = a.root().alias_target() {
                    let _ = write!(out, ", alias {}", t.name());
                }
                out.push('\n');
            }
            let _ = writeln!(out, " Root memory region: {}", view.root().map_or("(none)", |r| r.name()));
            if view.is_empty() {
                out.push_str("  No rendered FlatView\n\n");
                continue;
            }
            for fr in view.iter() {
                let mr = fr.region();
                let ty = if fr.readonly() { "rom" } else { region_type(mr) };
                let _ = write!(
                    out,
                    "  {:016x}-{:016x} (prio {}, {}): {}",
                    fr.start(),
                    fr.last(),
                    mr.priority(),
                    ty,
                    mr.name()
                );
                if fr.offset_in_region() != 0 {
                    let _ = write!(out, " @{:016x}", fr.offset_in_region());
                }
                out.push('\n');
            }
            out.push('\n');
        }
    }
}
