//! Coalesced MMIO on the interpreter: writes to a region's coalesced
//! ranges are buffered per vCPU instead of dispatched, and replayed in
//! order into the memory address space — before any access to a region
//! that flushes coalesced MMIO (by the topology's flush hook, from any
//! thread), before the vCPU's next access that is dispatched (KVM drains
//! its ring at every exit, so the vCPU's other accesses never overtake its
//! buffered writes), when the vCPU leaves the run loop, and when the buffer
//! is full.
//!
//! Writes of one vCPU are replayed in the order it made them; writes of
//! different vCPUs are replayed buffer by buffer (KVM's single ring orders
//! them globally; nothing a guest can rely on without a flush tells the
//! difference).

use crate::sync::{AtomicBool, Mutex, Ordering};
use std::sync::{Arc, Weak};
use topos_runtime::{AddressSpace, FlushHook, Topology};

/// Entries a buffer holds before it is replayed.
const CAPACITY: usize = 512;

#[derive(Debug, Clone, Copy)]
struct Write {
    addr: u64,
    data: u64,
    size: u8,
}

/// One vCPU's buffered writes.
#[derive(Debug)]
pub struct CoalescedBuffer {
    entries: Mutex<Vec<Write>>,
    /// Serialises replays so that each write is replayed once and in order.
    replay: Mutex<()>,
    pending: AtomicBool,
    memory: AddressSpace,
}

impl CoalescedBuffer {
    /// Buffers a write of the low `size` bytes of `data` at `addr` (what
    /// the interpreter does with a guest write to a coalesced range);
    /// replays the buffer when it is full.
    pub fn push(&self, addr: u64, data: u64, size: usize) {
        let full = {
            let mut e = self.entries.lock();
            e.push(Write { addr, data, size: size as u8 });
            self.pending.store(true, Ordering::Release);
            e.len() >= CAPACITY
        };
        if full {
            self.flush();
        }
    }

    /// Replays the buffered writes, in order (one load when there are
    /// none).
    pub fn flush(&self) {
        if !self.pending.load(Ordering::Acquire) {
            return;
        }
        let _order = self.replay.lock();
        let writes = {
            let mut e = self.entries.lock();
            self.pending.store(false, Ordering::Release);
            std::mem::take(&mut *e)
        };
        for w in writes {
            let b = w.data.to_le_bytes();
            let _ = self.memory.write(w.addr, &b[..usize::from(w.size)]);
        }
    }
}

/// Every vCPU's buffer of one machine, and the flush hook that drains
/// them.
pub struct CoalescedMmio {
    buffers: Arc<Mutex<Vec<Weak<CoalescedBuffer>>>>,
    memory: AddressSpace,
    _hook: FlushHook,
}

impl std::fmt::Debug for CoalescedMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoalescedMmio").finish_non_exhaustive()
    }
}

impl CoalescedMmio {
    /// Installs the flush hook on `topo`; buffers replay into `memory`.
    /// The hook runs while the returned value lives.
    pub fn install(topo: &Topology, memory: &AddressSpace) -> CoalescedMmio {
        let buffers: Arc<Mutex<Vec<Weak<CoalescedBuffer>>>> = Arc::default();
        let b = buffers.clone();
        let hook: FlushHook = Arc::new(move || {
            let live: Vec<Arc<CoalescedBuffer>> = b.lock().iter().filter_map(Weak::upgrade).collect();
            for buf in live {
                buf.flush();
            }
        });
        topo.set_coalesced_flush_hook(Some(&hook));
        CoalescedMmio { buffers, memory: memory.clone(), _hook: hook }
    }

    /// A new vCPU's buffer.
    pub fn buffer(&self) -> Arc<CoalescedBuffer> {
        let buf = Arc::new(CoalescedBuffer {
            entries: Mutex::new(Vec::new()),
            replay: Mutex::new(()),
            pending: AtomicBool::new(false),
            memory: self.memory.clone(),
        });
        let mut list = self.buffers.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&buf));
        buf
    }
}
