//! How the runtime behaves, for embedders (documentation only).
//!
//! # Memory model
//!
//! * **Transactions.** Every mutator is a transaction of its own unless it
//!   runs inside [`Topology::begin`](crate::Topology::begin) …
//!   [`Topology::commit`](crate::Topology::commit) (or
//!   [`Topology::transaction`](crate::Topology::transaction)). Transactions
//!   nest per thread; changes become visible to the guest together, at the
//!   outermost commit. Transactions of different threads are serialized by
//!   the topology actor: one waits for the other, so the result is always
//!   that of some serial order. Each commit that changes something gets the
//!   next [generation](crate::Topology::generation).
//! * **RCU lifetime.** Each address space publishes an immutable
//!   [`FlatView`](crate::FlatView). A reader loads it without a lock; the
//!   view, every region it names, their host memory and their devices stay
//!   alive until the last reader drops it, however many commits happen
//!   meanwhile.
//! * **One load per access.** Resolve an address *and* perform the access
//!   through the same view. The access paths of
//!   [`AddressSpace`](crate::AddressSpace) do exactly that:
//!
//! ```
//! # use topos_runtime::*;
//! # let topo = Topology::new();
//! # let s = topo.standard_spaces()?;
//! # s.system.add_subregion(0, &topo.new_ram("ram", 0x1000)?)?;
//! // Right: one view for the lookup and the copy.
//! let view = s.memory.load_view();
//! let range = view.lookup(0x10).expect("mapped");
//! assert_eq!(range.region().name(), "ram");
//! # Ok::<(), Error>(())
//! ```
//!
//! ```
//! # use topos_runtime::*;
//! # let topo = Topology::new();
//! # let s = topo.standard_spaces()?;
//! # s.system.add_subregion(0, &topo.new_ram("ram", 0x1000)?)?;
//! // WARNING: broken pattern. Looking up in one view and then accessing
//! // through a fresh load may act on a region that a commit in between
//! // removed or moved.
//! let name = s.memory.view().lookup(0x10).map(|r| r.region().name().to_string());
//! let mut b = [0u8; 1];
//! let _ = s.memory.read(0x10, &mut b); // may no longer be `name`
//! # let _ = name;
//! # Ok::<(), Error>(())
//! ```
//!
//! * **Listeners** run synchronously, on the committing thread: region
//!   callbacks before the new view is published, ioeventfd callbacks and
//!   `commit` after; see [`MemoryListener`](crate::MemoryListener) for the
//!   order and for what happens when one fails. Asynchronous observers use
//!   [`Topology::subscribe`](crate::Topology::subscribe).
//! * **Generations.** Each commit that changes something gets the next
//!   [generation](crate::Topology::generation); it moves once the commit's
//!   views are all published, so it never runs ahead of what readers see.
//!   Each [`FlatView`](crate::FlatView) carries the generation that rendered
//!   it, and each address space the generation of its last publication
//!   ([`AddressSpace::generation`](crate::AddressSpace::generation)): one
//!   load tells a per-vCPU cache whether it is current.
//! * **Device turns.** A thread that holds a device actor's turn never
//!   waits for the topology; see [`turns`](crate::turns).
//!
//! # A newcomer's map
//!
//! Where each concept of QEMU's `memory.h` lives (all under `runtime/src/`):
//!
//! | concept | file |
//! | --- | --- |
//! | `MemoryRegion`: the node, its kinds and queries | `region/mod.rs` |
//! | `add_subregion`, `del_subregion`, `set_address`, `set_enabled`, `destroy` | `region/tree.rs` |
//! | `set_readonly`, `set_alias_offset`, `rom_device_set_readable`, `set_log` | `region/attributes.rs` |
//! | `memory_region_init_*`, `memory_map_init` (the handle and constructors) | `topology.rs` |
//! | `memory_region_transaction_begin` / `_commit` (the turn, the recorded intent) | `transaction.rs` |
//! | the commit: render, diff, listeners, publish, ioeventfds, broadcast | `commit.rs` |
//! | `render_memory_region`, `memory_region_get_flatview_root` | `render.rs` |
//! | which windows a change damages; one render cache per physical root | `damage.rs` |
//! | `FlatView`, `FlatRange`, lookup, splicing | `flatview.rs` |
//! | `address_space_update_topology_pass` (the range diff) | `diff.rs` |
//! | `MemoryListener`, registration, failure policy | `listener.rs` |
//! | faults (failed listeners, abandoned transactions) | `fault.rs` |
//! | commit diffs for observers, snapshots | `broadcast.rs` |
//! | `AddressSpace`, `address_space_init` / `_destroy` | `address_space.rs` |
//! | `address_space_rw`, `memory_region_dispatch_*` | `dispatch.rs` |
//! | the per-vCPU access cache | `accessor.rs` |
//! | page translation for software TLBs | `translate.rs` |
//! | self-modifying-code watch | `code_watch.rs` |
//! | `address_space_map` / `_unmap`, bounce buffers, map clients | `map.rs` |
//! | `memory_region_find` | `find.rs` |
//! | `MemoryRegionOps`, access legalisation | `ops.rs` (old-style tables: `ops_tables.rs`) |
//! | `memory_region_add_eventfd` and the address-space ioeventfd sets | `ioeventfd.rs` |
//! | coalesced MMIO and the flush hook's callers | `coalesced.rs` |
//! | dirty bitmaps | `dirty.rs`; their API and global logging: `dirty_log.rs` |
//! | RAM blocks (the crate's `unsafe`) | `ram.rs` |
//! | `mtree_info` | `mtree.rs` |
//! | the loom/std primitives | `sync.rs`; device turns and deferral: `turns.rs` |
//!
//! **A guest access, top to bottom.** [`AddressSpace::read`](crate::AddressSpace::read)
//! (or an [`Accessor`](crate::Accessor), which first revalidates its cached
//! view with one load) loads the published `FlatView` once (`address_space.rs`);
//! `dispatch.rs` walks the access range by range: RAM is copied directly from
//! the `RamBlock` (`ram.rs`) and its pages marked dirty and code-watch
//! checked (`dirty_log.rs`); MMIO is cut to legal sizes (`ops.rs`), checked
//! against ioeventfds (`ioeventfd.rs`) and the coalesced flush flag
//! (`coalesced.rs`), and handed to the region's `MemoryRegionOps` — for a
//! device model, the actor harness of `topos-devices`; a hole reads 0 with
//! `DecodeError`. Nothing on this path takes a lock.
//!
//! **A commit, top to bottom.** A mutator (`region/`, `ioeventfd.rs`,
//! `coalesced.rs`, `dirty_log.rs`) takes the topology's turn
//! (`transaction.rs`), changes the tree and records its intent; the
//! outermost commit (`commit.rs`) then, in one direction: reports coalescing
//! changes; turns the damage into windows and renders them (`damage.rs`,
//! `render.rs`, `flatview.rs`); per address space, diffs old and new views
//! and calls the listeners (`diff.rs`, `listener.rs`), publishes the view,
//! and updates the ioeventfds (`ioeventfd.rs`); moves the generation and
//! calls `commit`; broadcasts the diff (`broadcast.rs`); and finally returns
//! any listener failure (`fault.rs`).
//!
//! # Guest RAM
//!
//! Every path that reads or writes guest RAM through the runtime
//! ([`AddressSpace`](crate::AddressSpace), [`Accessor`](crate::Accessor),
//! [`Mapping`](crate::Mapping), [`RamSlice`](crate::RamSlice), dirty-logged writes, device
//! DMA, the guest atomics of [`guest_atomic`](crate::docs#guest-atomics)) ends in
//! this module, which touches guest bytes only with the host's atomic loads
//! and stores (`AtomicU8`/`16`/`32`/`64`) and, for long copies on x86-64,
//! `rep movsb` (a byte-wise atomic copy, see below). So:
//!
//! * **No data race.** Any number of threads may read and write the same
//!   guest bytes at once; the outcome is some interleaving of their pieces,
//!   never undefined behaviour in the runtime.
//! * **Single-copy atomicity.** An access of 1, 2, 4 or 8 bytes whose *host*
//!   address is a multiple of its size is one atomic load or store of that
//!   width: a concurrent reader sees the old or the new value, never a mix
//!   (x86's rule for aligned accesses). RAM the runtime allocates is page
//!   aligned, so for RAM mapped at an 8-aligned guest address (and aliases at
//!   8-aligned offsets), host and guest alignment agree. RAM from
//!   [`Topology::new_ram_from_ptr`](crate::Topology::new_ram_from_ptr) keeps
//!   the alignment of the pointer it was given.
//! * **Other copies shorter than 256 bytes** (and every copy on hosts other
//!   than x86-64) are split into naturally aligned pieces of 1, 2, 4 and 8
//!   bytes (rising to the first 8-byte boundary, whole words, then falling),
//!   each one atomic access. Every naturally aligned 1-, 2-, 4- or 8-byte
//!   unit that lies wholly inside such a copy is moved by a single access at
//!   least that wide, so it cannot tear either. A misaligned value (4 bytes
//!   at an odd address, say) may tear between its pieces, as it may on x86
//!   when it crosses a cache line.
//! * **Copies of 256 bytes or more** on x86-64 are one `rep movsb`, as fast
//!   as `memcpy` (which uses it too): race-free, with every byte an atomic
//!   access. Fast-string hardware moves such copies in cache-line chunks in
//!   practice, but that is not architectural, so no unit wider than a byte
//!   is promised atomic there. (A copy with atomic words instead costs about 3x `memcpy`: the
//!   compiler may not widen or vectorise atomics.)
//! * **No copy is atomic as a whole**: another thread may see some of its
//!   pieces new and others old, in any order (as with x86's `rep movs`).
//! * **Ordering.** Loads are `Acquire` and stores `Release`: on x86 hosts
//!   they are plain moves (free), on weaker hosts they keep a guest's
//!   message passing (store data, then store a flag) in order, close to
//!   x86-TSO. Read-modify-write atomics are `SeqCst`, like `lock`ed x86
//!   instructions.
//!
//! What this does **not** cover: the guest itself (KVM vCPUs write RAM
//! behind the compiler's back; that is the hardware's memory model), and
//! memory reached through raw pointers the runtime hands out
//! ([`MemoryRegion::ram_ptr`](crate::MemoryRegion::ram_ptr),
//! [`RamSlice::as_ptr`](crate::RamSlice::as_ptr), [`Mapping::as_ptr`](crate::Mapping::as_ptr)),
//! whose users must use atomics (or volatile accesses) themselves. One
//! honest caveat: Rust's abstract machine (like C++'s) leaves *racing
//! atomic accesses of different sizes to overlapping bytes* undefined, and
//! guest memory is inherently accessed with mixed sizes (a byte store racing
//! a 4-byte load). Every host this runs on defines them (each atomic here is
//! one plain load, store or locked instruction on memory the compiler knows
//! nothing about); this is the same footing as every VMM's guest memory.
//!
//! # Guest atomics
//!
//! Guest atomics: read-modify-write and compare-exchange of 1, 2, 4 or 8
//! bytes of guest memory, on [`AddressSpace`](crate::AddressSpace) and [`Accessor`](crate::Accessor) — what an x86
//! interpreter needs for `lock`-prefixed instructions, `xchg`, `xadd`,
//! `cmpxchg` and `cmpxchg8b`.
//!
//! Each operation takes a guest address and a size, works on the
//! little-endian value stored there (operands are truncated to the size,
//! results zero-extended) and returns the **old value** with the access's
//! [`MemTxResult`](crate::MemTxResult):
//!
//! * [`AddressSpace::atomic_rmw`](crate::AddressSpace::atomic_rmw) applies an [`AtomicRmw`](crate::AtomicRmw) (exchange, add,
//!   subtract, and, or, xor) and returns the old value;
//! * [`AddressSpace::atomic_compare_exchange`](crate::AddressSpace::atomic_compare_exchange) stores `new` if the value is
//!   `current`: `Ok(old)` if it stored, `Err(actual)` if not (like
//!   [`AtomicU64::compare_exchange`](std::sync::atomic::AtomicU64::compare_exchange));
//! * [`AddressSpace::atomic_fetch_update`](crate::AddressSpace::atomic_fetch_update) stores `f(old)` unless `f` returns
//!   `None`, retrying if the value changed meanwhile (so `f` may run more
//!   than once; it must not access guest memory itself): `Ok(old)` if it
//!   stored, `Err(old)` if not (like
//!   [`AtomicU64::fetch_update`](std::sync::atomic::AtomicU64::fetch_update)).
//!   The interpreter builds `adc`, `btc`, `neg` and friends on it.
//!
//! The [`Accessor`](crate::Accessor) methods of the same names do the same through the
//! accessor's cache.
//!
//! ## What is atomic
//!
//! The plain accesses' rules are in [`ram`](crate::docs#guest-ram): aligned loads and
//! stores of up to 8 bytes are single-copy atomic. Atomics add, by target:
//!
//! | target (the whole access) | how | atomic with respect to |
//! | --- | --- | --- |
//! | writable RAM, host address a multiple of the size | one host atomic (`lock xadd`, `xchg`, `lock cmpxchg`...), `SeqCst` | everything: every other access through the runtime, and vCPUs running natively |
//! | writable RAM, misaligned but inside one aligned 8-byte host word | a compare-exchange loop on that 8-byte word | everything, as above (a concurrent store to a neighbouring byte of the word makes the loop retry, never lost) |
//! | writable RAM, crossing an aligned 8-byte host word (or a page, or from one RAM range into the next, or the edge of embedder-provided memory) | a process-wide lock held around a read, the operation and a write of the bytes | **other crossing atomics only**. A plain store or a lock-free atomic to the same bytes can land between its read and its write and be overwritten; each piece of its read and write is still atomic on its own (see [`ram`](crate::docs#guest-ram)) |
//! | MMIO, ROM devices, ROM, reservations, holes, or partly any of these | a read, then a write, by the rules of `address_space_read`/`write` (devices see a read and a write of the same size) | **nothing**: not atomic across vCPUs |
//!
//! * **Split locks.** x86 makes even a `lock`ed access that crosses a cache
//!   line atomic (the bus lock), and QEMU's TCG gets there by stopping every
//!   other vCPU for the instruction. The runtime cannot stop vCPUs, so it
//!   serialises crossing atomics with each other only; a vCPU layer that
//!   needs the full guarantee must make the instruction exclusive (stop the
//!   other vCPUs) around the call, as QEMU does. Guests rarely do this: Linux
//!   treats split locks as bugs (`split_lock_detect`).
//! * **MMIO.** A device register is read, the operation applied, and the
//!   result written back, as QEMU does for `lock`ed accesses to MMIO (QEMU
//!   runs them with every other vCPU stopped and under its big lock; topos
//!   has neither, so another vCPU's access to the device can fall between
//!   the read and the write). A compare-exchange whose comparison fails
//!   still writes the old value back, as x86's `cmpxchg` does and QEMU's
//!   non-parallel path does.
//! * **ROM and read-only RAM.** The old value is read; the write is dropped
//!   and the result is [`MemTxResult::DecodeError`](crate::MemTxResult::DecodeError) (QEMU's result for a
//!   write to ROM). A `fetch_update` whose `f` declines writes nothing and
//!   returns [`MemTxResult::Ok`](crate::MemTxResult::Ok).
//! * **Unassigned addresses.** Read as 0 and the write is dropped, with
//!   [`MemTxResult::DecodeError`](crate::MemTxResult::DecodeError) (QEMU's unassigned access); reservations
//!   answer [`MemTxResult::ReservationAccess`](crate::MemTxResult::ReservationAccess) the same way.
//! * **ROM devices** in romd mode give the old value from their memory and
//!   receive the write through their ops, like any write to them.
//! * **Sizes** other than 1, 2, 4 and 8 touch nothing and return
//!   [`MemTxResult::DecodeError`](crate::MemTxResult::DecodeError) with an old value of 0.
//! * **Alignment is the host's.** Lock-freedom depends on the host address:
//!   runtime-allocated RAM is page aligned, so for RAM at an 8-aligned guest
//!   address host and guest alignment agree.
//!
//! ## Dirty logging of atomics
//!
//! An atomic that stores to RAM marks its pages dirty like any write through
//! the runtime — even when the stored value equals the old one (an `or`
//! with 0). One that stores nothing (a failed compare-exchange on RAM, a
//! declined `fetch_update`) marks nothing: the bytes did not change.
//!
//! ```
//! use topos_runtime::{AtomicRmw, MemTxResult, Topology};
//! let topo = Topology::new();
//! let spaces = topo.standard_spaces()?;
//! let ram = topo.new_ram("ram", 0x1000)?;
//! spaces.system.add_subregion(0, &ram)?;
//! let m = &spaces.memory;
//! assert_eq!(m.atomic_rmw(0x10, 4, AtomicRmw::Add(5)), (0, MemTxResult::Ok));
//! assert_eq!(m.atomic_compare_exchange(0x10, 4, 5, 9), (Ok(5), MemTxResult::Ok));
//! assert_eq!(m.atomic_compare_exchange(0x10, 4, 5, 1), (Err(9), MemTxResult::Ok));
//! // `lock bts dword [0x10], 0`: set bit 0, the old bit is the carry flag.
//! let (old, r) = m.atomic_fetch_update(0x10, 4, |v| Some(v | 1));
//! assert_eq!((old, r), (Ok(9), MemTxResult::Ok));
//! # Ok::<(), topos_runtime::Error>(())
//! ```
//!
//! # QEMU names
//!
//! | QEMU | topos |
//! | --- | --- |
//! | `memory_region_init` | [`Topology::new_container`](crate::Topology::new_container) |
//! | `memory_region_init_io` | [`Topology::new_io`](crate::Topology::new_io) |
//! | `memory_region_init_ram` | [`Topology::new_ram`](crate::Topology::new_ram) |
//! | `memory_region_init_ram_ptr` | [`Topology::new_ram_from_ptr`](crate::Topology::new_ram_from_ptr) (`unsafe`) |
//! | `memory_region_init_alias` | [`Topology::new_alias`](crate::Topology::new_alias) |
//! | `memory_region_init_rom_device` | [`Topology::new_rom_device`](crate::Topology::new_rom_device) |
//! | `memory_region_init_reservation` | [`Topology::new_reservation`](crate::Topology::new_reservation) |
//! | `memory_region_destroy` | [`MemoryRegion::destroy`](crate::MemoryRegion::destroy) |
//! | `memory_region_size` / `_name` / `_is_ram` / `_is_rom` / `_is_romd` / `_is_logging` | [`MemoryRegion::size`](crate::MemoryRegion::size) and friends |
//! | `memory_region_get_ram_ptr` | [`MemoryRegion::ram`](crate::MemoryRegion::ram) (safe), [`MemoryRegion::ram_ptr`](crate::MemoryRegion::ram_ptr) |
//! | `memory_region_get_ram_addr` | [`MemoryRegion::ram_addr`](crate::MemoryRegion::ram_addr) |
//! | `memory_region_add_subregion(_overlap)` / `_del_subregion` | [`MemoryRegion::add_subregion`](crate::MemoryRegion::add_subregion), [`add_subregion_overlap`](crate::MemoryRegion::add_subregion_overlap), [`del_subregion`](crate::MemoryRegion::del_subregion) |
//! | `memory_region_set_enabled` / `_set_address` / `_set_alias_offset` / `_set_readonly` | same names on [`MemoryRegion`](crate::MemoryRegion) |
//! | `memory_region_rom_device_set_readable` | [`MemoryRegion::rom_device_set_readable`](crate::MemoryRegion::rom_device_set_readable) |
//! | `memory_region_set_log` / `_get_dirty` / `_set_dirty` / `_reset_dirty` / `_test_and_clear_dirty` | same names on [`MemoryRegion`](crate::MemoryRegion) |
//! | `memory_region_sync_dirty_bitmap` | [`Topology::sync_dirty_bitmap`](crate::Topology::sync_dirty_bitmap) |
//! | `memory_global_sync_dirty_bitmap` | [`Topology::global_sync_dirty_bitmap`](crate::Topology::global_sync_dirty_bitmap) |
//! | `memory_global_dirty_log_start` / `_stop` | [`Topology::global_dirty_log_start`](crate::Topology::global_dirty_log_start) / [`_stop`](crate::Topology::global_dirty_log_stop) |
//! | `memory_region_set/add/clear_coalescing` | same names on [`MemoryRegion`](crate::MemoryRegion) |
//! | `memory_region_set/clear_flush_coalesced` | same names on [`MemoryRegion`](crate::MemoryRegion) |
//! | `memory_region_add/del_eventfd` | [`MemoryRegion::add_eventfd`](crate::MemoryRegion::add_eventfd) / [`del_eventfd`](crate::MemoryRegion::del_eventfd) |
//! | `memory_region_find` | [`Topology::find`](crate::Topology::find), [`AddressSpace::find`](crate::AddressSpace::find) |
//! | `memory_region_section_addr` | [`MemoryRegionSection::addr`](crate::MemoryRegionSection::addr) |
//! | `memory_region_transaction_begin` / `_commit` | [`Topology::begin`](crate::Topology::begin) / [`commit`](crate::Topology::commit) |
//! | `memory_listener_register` / `_unregister` | [`Topology::listener_register`](crate::Topology::listener_register) / [`listener_unregister`](crate::Topology::listener_unregister) |
//! | `mtree_info` | [`Topology::mtree`](crate::Topology::mtree) |
//! | `address_space_init` / `_destroy` | [`Topology::address_space_init`](crate::Topology::address_space_init) / [`address_space_destroy`](crate::Topology::address_space_destroy) |
//! | `address_space_rw` / `_read` / `_write` | [`AddressSpace::rw`](crate::AddressSpace::rw) / [`read`](crate::AddressSpace::read) / [`write`](crate::AddressSpace::write) |
//! | `address_space_map` / `_unmap` | [`AddressSpace::map`](crate::AddressSpace::map) / [`unmap`](crate::AddressSpace::unmap) |
//! | `cpu_register_map_client` | [`AddressSpace::register_map_client`](crate::AddressSpace::register_map_client) |
//! | `MemoryRegionOps` (`old_portio`, `old_mmio`) | [`MemoryRegionOps`](crate::MemoryRegionOps) + [`OpsConfig`](crate::OpsConfig) ([`PortioTable`](crate::PortioTable), [`MmioTable`](crate::MmioTable)) |
