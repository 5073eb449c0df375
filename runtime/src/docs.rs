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
