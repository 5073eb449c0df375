//! Decoded blocks and their cache.
//!
//! A block is a run of instructions decoded once by iced-x86 from one
//! guest page, ending at the first instruction that transfers control or
//! changes what decoding depends on ([`Op::ends_block`]), at
//! [`MAX_OPS`], or at the page's end. Blocks are cached by guest-physical
//! address, EIP and code size. A block's page is watched
//! ([`CodeWatch`]) before it is decoded: a write to it from anywhere (this
//! vCPU, another one, DMA) bumps the topology's code-write epoch, which the
//! run loop compares once per block (and after each instruction that
//! writes memory), and the blocks of written pages are dropped. A change
//! of the memory view drops every block (the page may now be something
//! else). The cache is bounded: past [`MAX_BLOCKS`] it starts again empty.

use super::core::Core;
use super::event::Step;
use super::exec::{prepare, Op};
use super::paging::Access;
use iced_x86::{Decoder, DecoderOptions};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use topos_runtime::{AddressSpace, CodeWatch, Topology};

/// Instructions per block at most.
pub(crate) const MAX_OPS: usize = 64;
/// Blocks cached at most.
pub(crate) const MAX_BLOCKS: usize = 16 * 1024;
/// Entries of the direct-mapped lookup table in front of the map.
const FAST: usize = 4096;

/// What a block is cached by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    /// Guest-physical address of its first byte.
    pub(crate) phys: u64,
    /// EIP of its first instruction (branch targets are decoded from it).
    pub(crate) eip: u32,
    /// 16 or 32.
    pub(crate) bits: u8,
}

/// A run of decoded instructions.
#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) key: Key,
    pub(crate) ops: Box<[Op]>,
}

/// A multiplicative hasher for [`Key`]s (the map is private to one vCPU;
/// keys are not attacker-chosen beyond guest addresses).
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
}

type Map<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// One vCPU's decoded blocks.
pub(crate) struct BlockCache {
    slab: Vec<Option<Block>>,
    free: Vec<u32>,
    map: Map<Key, u32>,
    fast: Box<[(Key, u32)]>,
    /// Watched code pages and the blocks decoded from each.
    watches: Map<u64, (CodeWatch, Vec<u32>)>,
    memory: AddressSpace,
    topo: Option<Topology>,
    epoch: u64,
}

const NO_KEY: Key = Key { phys: u64::MAX, eip: 0, bits: 0 };

impl BlockCache {
    pub(crate) fn new(memory: &AddressSpace) -> BlockCache {
        let topo = memory.topology().ok();
        let epoch = topo.as_ref().map_or(0, Topology::code_write_epoch);
        BlockCache {
            slab: Vec::new(),
            free: Vec::new(),
            map: Map::default(),
            fast: vec![(NO_KEY, 0); FAST].into_boxed_slice(),
            watches: Map::default(),
            memory: memory.clone(),
            topo,
            epoch,
        }
    }

    #[inline]
    fn slot(key: &Key) -> usize {
        ((key.eip as usize) ^ (key.phys as usize >> 12)) & (FAST - 1)
    }

    /// The cached block for `key`, if any.
    #[inline]
    pub(crate) fn get(&mut self, key: &Key) -> Option<u32> {
        let s = Self::slot(key);
        let (k, i) = self.fast[s];
        if k == *key {
            return Some(i);
        }
        let i = *self.map.get(key)?;
        self.fast[s] = (*key, i);
        Some(i)
    }

    /// The block in slot `i`.
    #[inline]
    pub(crate) fn block(&self, i: u32) -> &Block {
        self.slab[i as usize].as_ref().expect("a live slot")
    }

    /// Whether code may have been written since the last check (one load).
    #[inline]
    pub(crate) fn code_written(&self) -> bool {
        self.topo.as_ref().is_some_and(|t| t.code_write_epoch() != self.epoch)
    }

    /// Drops the blocks of every watched page that was written.
    pub(crate) fn drop_written(&mut self) {
        let Some(topo) = &self.topo else { return };
        self.epoch = topo.code_write_epoch();
        let written: Vec<u64> = self.watches.iter().filter(|(_, (w, _))| w.is_written()).map(|(p, _)| *p).collect();
        for page in written {
            if let Some((_, blocks)) = self.watches.remove(&page) {
                for i in blocks {
                    self.remove(i);
                }
            }
        }
        for f in self.fast.iter_mut() {
            *f = (NO_KEY, 0);
        }
    }

    fn remove(&mut self, i: u32) {
        if let Some(b) = self.slab[i as usize].take() {
            self.map.remove(&b.key);
            self.free.push(i);
        }
    }

    /// Drops every block (a new memory view, or the cache is full).
    pub(crate) fn clear(&mut self) {
        self.slab.clear();
        self.free.clear();
        self.map.clear();
        self.watches.clear();
        for f in self.fast.iter_mut() {
            *f = (NO_KEY, 0);
        }
    }

    /// Adds a block decoded from the watched page `page`; returns its slot.
    pub(crate) fn insert(&mut self, block: Block, watch: CodeWatch) -> u32 {
        if self.map.len() >= MAX_BLOCKS {
            self.clear();
        }
        let key = block.key;
        let i = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(block);
                i
            }
            None => {
                self.slab.push(Some(block));
                (self.slab.len() - 1) as u32
            }
        };
        self.map.insert(key, i);
        self.fast[Self::slot(&key)] = (key, i);
        self.watches.entry(key.phys & !0xfff).or_insert_with(|| (watch, Vec::new())).1.push(i);
        i
    }

    /// Watches the code page holding `phys` (before decoding from it).
    pub(crate) fn watch(&self, phys: u64) -> Option<CodeWatch> {
        match self.watches.get(&(phys & !0xfff)) {
            Some((w, _)) if !w.is_written() => Some(w.clone()),
            _ => self.memory.watch_code(phys),
        }
    }
}

/// Decodes a block at the current CS:EIP. Returns the block and whether it
/// may be cached (its bytes all came from one RAM or ROM page).
pub(crate) fn decode(core: &mut Core, cache: &BlockCache) -> Step<(Block, Option<CodeWatch>)> {
    let cs = core.s.seg[super::state::SegReg::Cs as usize];
    let bits: u32 = if cs.is_32() { 32 } else { 16 };
    let eip = core.s.eip;
    let la = cs.base.wrapping_add(eip);
    let phys = core.phys(la, Access::Fetch)?;
    let key = Key { phys, eip, bits: bits as u8 };
    let page_left = 0x1000 - (la & 0xfff) as usize;
    let watch = cache.watch(phys);
    let mut buf = [0u8; MAX_OPS * 15];
    let (len, cacheable) = match core.code_page(la) {
        Some(page) if watch.is_some() => {
            let off = (la & 0xfff) as usize;
            let n = page_left.min(buf.len());
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = page.load(off + i, 1) as u8;
            }
            (n, true)
        }
        _ => {
            // Not RAM (or unwatchable): one instruction, fetched byte by
            // byte across pages, not cached.
            let mut n = 0;
            while n < 15 {
                match core.fetch_byte(la.wrapping_add(n as u32)) {
                    Ok(b) => buf[n] = b,
                    Err(e) if n == 0 => return Err(e),
                    Err(_) => break,
                }
                n += 1;
            }
            (n, false)
        }
    };
    let mut decoder = Decoder::with_ip(bits, &buf[..len], u64::from(eip), DecoderOptions::NONE);
    let mut ops = Vec::with_capacity(8);
    while decoder.can_decode() && ops.len() < MAX_OPS {
        let ins = decoder.decode();
        if ins.is_invalid() && decoder.last_error() == iced_x86::DecoderError::NoMoreBytes {
            break;
        }
        let mut op = prepare(ins);
        let end = u64::from(eip) + (decoder.position() as u64);
        if end - 1 > u64::from(cs.limit) {
            // Beyond CS's limit: the fetch faults.
            op.exec = super::exec::limit_fault;
            op.ends_block = true;
        }
        let ends = op.ends_block;
        ops.push(op);
        if ends || !cacheable {
            break;
        }
    }
    if ops.is_empty() {
        // The first instruction straddles the page's end: decode it alone
        // from bytes fetched across the two pages, uncached.
        let mut n = 0;
        while n < 15 {
            match core.fetch_byte(la.wrapping_add(n as u32)) {
                Ok(b) => buf[n] = b,
                Err(e) if n < page_left => return Err(e),
                Err(e) => {
                    // The second page faults: only if the instruction needs it.
                    let mut d = Decoder::with_ip(bits, &buf[..n], u64::from(eip), DecoderOptions::NONE);
                    let ins = d.decode();
                    if ins.is_invalid() && d.last_error() == iced_x86::DecoderError::NoMoreBytes {
                        return Err(e);
                    }
                    break;
                }
            }
            n += 1;
        }
        let mut d = Decoder::with_ip(bits, &buf[..n], u64::from(eip), DecoderOptions::NONE);
        let mut op = prepare(d.decode());
        op.ends_block = true;
        if u64::from(eip) + d.position() as u64 - 1 > u64::from(cs.limit) {
            op.exec = super::exec::limit_fault;
        }
        ops.push(op);
        return Ok((Block { key, ops: ops.into_boxed_slice() }, None));
    }
    let watch = if cacheable { watch } else { None };
    Ok((Block { key, ops: ops.into_boxed_slice() }, watch))
}
