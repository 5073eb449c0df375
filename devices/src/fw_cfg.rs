//! QEMU's firmware configuration device (`fw_cfg`, `docs/specs/fw_cfg.rst`),
//! its traditional I/O-port interface: how firmware and test kernels
//! written for QEMU learn the machine's shape.
//!
//! * A 16-bit little-endian write to the selector port (`0x510` on a PC,
//!   offset 0 of [`PORTS`]) selects an item and rewinds it.
//! * Each 8-bit read of the data port (`0x511`, offset 1) returns the next
//!   byte of the selected item, and 0 past its end or for an unknown key.
//!   Writes to the data port are ignored (as in QEMU since 2.4).
//! * Items: the signature `"QEMU"` ([`SIGNATURE`]), the interface ID
//!   ([`ID`]: 1, the traditional interface without DMA), and what the
//!   board adds: RAM size ([`RAM_SIZE`], 64-bit LE), CPU counts
//!   ([`NB_CPUS`], [`MAX_CPUS`], 16-bit LE), and named files, listed in the
//!   file directory ([`FILE_DIR`]: a big-endian count, then per file its
//!   big-endian size, key and a 56-byte name) under keys from
//!   [`FILE_FIRST`].

#![forbid(unsafe_code)]

use crate::actor::{ActorHandle, Device, DeviceCtx, Spawned};
use crate::plug::{DeviceModel, DeviceRegion, PlugCtx, Plugged};
use std::collections::BTreeMap;
use topos_runtime::{Endianness, HwAddr, ImplConstraints, OpsConfig, ValidConstraints};

/// The selector and data ports of a PC (`FW_CFG_IO_BASE`).
pub const IO_BASE: u64 = 0x510;
/// The role of the device's one region: selector at offset 0, data at 1.
pub const PORTS: &str = "ports";
/// `FW_CFG_SIGNATURE`.
pub const SIGNATURE: u16 = 0x0000;
/// `FW_CFG_ID`.
pub const ID: u16 = 0x0001;
/// `FW_CFG_RAM_SIZE`.
pub const RAM_SIZE: u16 = 0x0003;
/// `FW_CFG_NB_CPUS`.
pub const NB_CPUS: u16 = 0x0005;
/// `FW_CFG_MAX_CPUS`.
pub const MAX_CPUS: u16 = 0x000f;
/// `FW_CFG_FILE_DIR`.
pub const FILE_DIR: u16 = 0x0019;
/// `FW_CFG_FILE_FIRST`: the key of the first file.
pub const FILE_FIRST: u16 = 0x0020;
/// Longest file name (with its terminating NUL).
pub const FILE_NAME_LEN: usize = 56;

/// The items a board offers.
#[derive(Debug, Clone)]
pub struct FwCfgConfig {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, Vec<u8>)>,
}

impl Default for FwCfgConfig {
    fn default() -> Self {
        let mut items = BTreeMap::new();
        items.insert(SIGNATURE, b"QEMU".to_vec());
        items.insert(ID, 1u32.to_le_bytes().to_vec());
        FwCfgConfig { items, files: Vec::new() }
    }
}

impl FwCfgConfig {
    /// The signature and ID only.
    pub fn new() -> FwCfgConfig {
        FwCfgConfig::default()
    }

    /// Sets item `key` to `data`.
    pub fn with_item(mut self, key: u16, data: Vec<u8>) -> FwCfgConfig {
        self.items.insert(key, data);
        self
    }

    /// The RAM size item, in bytes.
    pub fn with_ram_size(self, bytes: u64) -> FwCfgConfig {
        self.with_item(RAM_SIZE, bytes.to_le_bytes().to_vec())
    }

    /// The CPU count items (`NB_CPUS` and `MAX_CPUS`).
    pub fn with_cpus(self, cpus: u16) -> FwCfgConfig {
        self.with_item(NB_CPUS, cpus.to_le_bytes().to_vec()).with_item(MAX_CPUS, cpus.to_le_bytes().to_vec())
    }

    /// A named file (e.g. `"etc/..."`); names longer than 55 bytes are
    /// refused when the device is plugged.
    pub fn with_file(mut self, name: &str, data: Vec<u8>) -> FwCfgConfig {
        self.files.push((name.to_string(), data));
        self
    }

    fn build(mut self) -> crate::Result<BTreeMap<u16, Vec<u8>>> {
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (i, (name, data)) in self.files.into_iter().enumerate() {
            if name.len() >= FILE_NAME_LEN {
                return Err(crate::Error::InvalidConfig {
                    device: "fw_cfg",
                    reason: format!("file name {name:?} too long"),
                });
            }
            let key = FILE_FIRST + i as u16;
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&0u16.to_be_bytes());
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
            self.items.insert(key, data);
        }
        self.items.insert(FILE_DIR, dir);
        Ok(self.items)
    }
}

/// The `fw_cfg` device (an actor).
#[derive(Debug)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// The access rules: the selector takes 16-bit writes, the data port
    /// 8-bit reads; QEMU's ports are little-endian and accept 1 or 2 bytes.
    pub fn ops_config() -> OpsConfig {
        OpsConfig {
            endianness: Endianness::Little,
            valid: ValidConstraints { min_access_size: 1, max_access_size: 2, unaligned: false },
            impl_: ImplConstraints { min_access_size: 1, max_access_size: 2, unaligned: false },
        }
    }

    /// The item selected now.
    pub fn selected(&self) -> u16 {
        self.selected
    }
}

/// Plugging `fw_cfg`: one region, [`PORTS`] (2 ports, for the I/O space at
/// [`IO_BASE`]).
impl DeviceModel for FwCfg {
    type Config = FwCfgConfig;
    type Handle = ActorHandle<FwCfg>;

    fn plug(config: FwCfgConfig, ctx: PlugCtx) -> crate::Result<Plugged<ActorHandle<FwCfg>>> {
        let dev = FwCfg { items: config.build()?, selected: SIGNATURE, offset: 0 };
        let spawned = Spawned::with_options(&ctx.name, dev, ctx.irqs, &ctx.runtime, ctx.actor);
        let region = ctx.topology.new_io_arc(&ctx.name, spawned.ops(0), FwCfg::ops_config(), 2)?;
        Ok(Plugged::new(vec![DeviceRegion::io(PORTS, region)], spawned.handle()))
    }
}

impl Device for FwCfg {
    fn read(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, size: u32) -> u64 {
        if addr != 1 {
            // The selector reads as 0 in QEMU's port interface.
            return 0;
        }
        let mut value = 0u64;
        for i in 0..size {
            let byte = self.items.get(&self.selected).and_then(|d| d.get(self.offset)).copied().unwrap_or(0);
            if self.items.get(&self.selected).is_some_and(|d| self.offset < d.len()) {
                self.offset += 1;
            }
            value |= u64::from(byte) << (8 * i);
        }
        value
    }

    fn write(&mut self, _ctx: &mut DeviceCtx<'_>, _region: usize, addr: HwAddr, value: u64, _size: u32) {
        if addr == 0 {
            self.selected = value as u16;
            self.offset = 0;
        }
    }
}
