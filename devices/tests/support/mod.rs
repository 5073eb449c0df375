//! What the device tests share: the test binary's device runtime, a
//! watchdog, configuration cycles, and a board that plugs devices through
//! the plug contract and maps them the way the `pc` board does.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::Duration;
use topos_devices::pci::{
    PciHost, PciHostBridge, PciHostConfig, CONFIG_ADDRESS, CONFIG_ADDRESS_PORT, CONFIG_DATA, CONFIG_DATA_PORT,
};
use topos_devices::plug::{DeviceModel, PlugCtx, Plugged};
use topos_devices::runtime::{AddressSpace, MemTxResult, MemoryRegion, StandardSpaces, Topology};
use topos_devices::DeviceRuntime;

/// A generous bound for waiting on another thread; never a timing
/// assertion.
pub const WAIT: Duration = Duration::from_secs(20);

/// The test binary's device runtime, shared by its tests.
pub fn runtime() -> &'static DeviceRuntime {
    static RT: OnceLock<DeviceRuntime> = OnceLock::new();
    RT.get_or_init(|| DeviceRuntime::new().unwrap())
}

/// Runs `f` on its own thread and fails the test if it has not finished
/// after 60 s: a deadlock, never a timing assertion. A panic in `f` is the
/// test's.
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::sync::mpsc::RecvTimeoutError;
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || tx.send(f()).unwrap());
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        Err(RecvTimeoutError::Disconnected) => std::panic::resume_unwind(t.join().unwrap_err()),
        Err(RecvTimeoutError::Timeout) => panic!("{what}: deadlocked"),
    }
}

/// A board: a topology with the standard address spaces, plugging devices
/// through [`DeviceModel`] and mapping their regions itself.
pub struct Board {
    pub topo: Topology,
    pub spaces: StandardSpaces,
    pub rt: DeviceRuntime,
}

impl Board {
    /// A board on the test binary's device runtime.
    pub fn new() -> Board {
        Board::with_runtime(runtime().clone())
    }

    /// A board on `rt`.
    pub fn with_runtime(rt: DeviceRuntime) -> Board {
        let topo = Topology::new();
        let spaces = topo.standard_spaces().unwrap();
        Board { topo, spaces, rt }
    }

    /// `size` bytes of RAM at address 0.
    pub fn add_ram(&self, size: u64) -> MemoryRegion {
        let ram = self.topo.new_ram("ram", u128::from(size)).unwrap();
        self.spaces.system.add_subregion(0, &ram).unwrap();
        ram
    }

    /// The context to plug a device named `name`.
    pub fn ctx(&self, name: &str) -> PlugCtx {
        PlugCtx::new(&self.topo, &self.rt, name)
    }

    /// The memory address space.
    pub fn mem(&self) -> &AddressSpace {
        &self.spaces.memory
    }

    /// The I/O address space.
    pub fn io(&self) -> &AddressSpace {
        &self.spaces.io_space
    }

    /// Plugs a device and maps each `(role, container, address)`.
    pub fn plug_at<M: DeviceModel>(
        &self,
        config: M::Config,
        ctx: PlugCtx,
        maps: &[(&str, &MemoryRegion, u64)],
    ) -> Plugged<M::Handle> {
        let plugged = M::plug(config, ctx).unwrap();
        for (role, container, addr) in maps {
            plugged.map(role, container, *addr).unwrap();
        }
        plugged
    }

    /// Plugs a device with its region `role` at port `port`.
    pub fn plug_io<M: DeviceModel>(
        &self,
        config: M::Config,
        ctx: PlugCtx,
        role: &str,
        port: u64,
    ) -> Plugged<M::Handle> {
        self.plug_at::<M>(config, ctx, &[(role, &self.spaces.io, port)])
    }

    /// Plugs a device with its region `role` at `addr` in system memory.
    pub fn plug_mem<M: DeviceModel>(
        &self,
        config: M::Config,
        ctx: PlugCtx,
        role: &str,
        addr: u64,
    ) -> Plugged<M::Handle> {
        self.plug_at::<M>(config, ctx, &[(role, &self.spaces.system, addr)])
    }

    /// A PCI host as on a PC: QEMU's `pci` container under system memory,
    /// CONFIG_ADDRESS at `0xcf8` and CONFIG_DATA at `0xcfc`.
    pub fn pci_host(&self) -> PciHost {
        let pci_mem = PciHost::pci_memory(&self.topo, &self.spaces.system).unwrap();
        let config = PciHostConfig { system: self.spaces.system.clone(), pci_mem, io: self.spaces.io.clone() };
        let io = &self.spaces.io;
        let host = self.plug_at::<PciHostBridge>(
            config,
            self.ctx("pci-host"),
            &[(CONFIG_ADDRESS, io, CONFIG_ADDRESS_PORT), (CONFIG_DATA, io, CONFIG_DATA_PORT)],
        );
        host.handle
    }
}

/// The CONFIG_ADDRESS value selecting `reg` of `bus:slot.func`.
pub fn cfg_addr(bus: u32, slot: u8, func: u32, reg: u8) -> u32 {
    0x8000_0000 | bus << 16 | u32::from(slot) << 11 | func << 8 | u32::from(reg & 0xfc)
}

/// A configuration read through ports `0xcf8`/`0xcfc`.
pub fn cfg_read_at(io: &AddressSpace, bus: u32, slot: u8, func: u32, reg: u8, size: u32) -> u32 {
    assert_eq!(io.write_u64(0xcf8, u64::from(cfg_addr(bus, slot, func, reg)), 4), MemTxResult::Ok);
    let (v, r) = io.read_u64(0xcfc + u64::from(reg & 3), size);
    assert_eq!(r, MemTxResult::Ok);
    v as u32
}

/// A configuration write through ports `0xcf8`/`0xcfc`.
pub fn cfg_write_at(io: &AddressSpace, bus: u32, slot: u8, func: u32, reg: u8, value: u32, size: u32) {
    assert_eq!(io.write_u64(0xcf8, u64::from(cfg_addr(bus, slot, func, reg)), 4), MemTxResult::Ok);
    assert_eq!(io.write_u64(0xcfc + u64::from(reg & 3), u64::from(value), size), MemTxResult::Ok);
}

/// A configuration read of function 0 of `slot` on bus 0.
pub fn cfg_read(io: &AddressSpace, slot: u8, reg: u8, size: u32) -> u32 {
    cfg_read_at(io, 0, slot, 0, reg, size)
}

/// A configuration write to function 0 of `slot` on bus 0.
pub fn cfg_write(io: &AddressSpace, slot: u8, reg: u8, value: u32, size: u32) {
    cfg_write_at(io, 0, slot, 0, reg, value, size)
}
