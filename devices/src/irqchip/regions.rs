//! The controllers' port ranges and the IOAPIC's page as runtime regions.
//!
//! Plain [`MemoryRegionOps`] over the shared state (no actor): each access
//! takes its controller's mutex for the time of the access, on the
//! accessing vCPU's thread, so vCPUs never wait for a mailbox and devices
//! on other controllers never wait for each other. The ports take byte
//! accesses (wider ones are split by the runtime, as QEMU's `impl` sizes
//! do); the IOAPIC takes 1 to 4 bytes and answers only 32-bit accesses to
//! its windows.

use super::{Shared, ELCR_PORT, IOAPIC_BASE, PIC_MASTER_PORT, PIC_SLAVE_PORT, PIT_PORT, SPEAKER_PORT};
use crate::error::Result;
use crate::sync::Arc;
use topos_runtime::{HwAddr, MemoryRegion, MemoryRegionOps, OpsConfig, Topology};

/// The size of the IOAPIC's region.
const IOAPIC_SIZE: u128 = 0x1000;

/// A chip's two ports.
struct PicPorts {
    shared: Arc<Shared>,
    chip: usize,
}

impl MemoryRegionOps for PicPorts {
    fn read(&self, addr: HwAddr, _size: u32) -> u64 {
        u64::from(self.shared.with_pic(|pic| pic.read(self.chip, addr as u8)))
    }

    fn write(&self, addr: HwAddr, value: u64, _size: u32) {
        self.shared.with_pic(|pic| pic.write(self.chip, addr as u8, value as u8));
    }
}

/// A chip's ELCR.
struct ElcrPort {
    shared: Arc<Shared>,
    chip: usize,
}

impl MemoryRegionOps for ElcrPort {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        u64::from(self.shared.with_pic(|pic| pic.elcr(self.chip)))
    }

    fn write(&self, _addr: HwAddr, value: u64, _size: u32) {
        self.shared.with_pic(|pic| pic.write_elcr(self.chip, value as u8));
    }
}

/// The PIT's four ports.
struct PitPorts(Arc<Shared>);

impl MemoryRegionOps for PitPorts {
    fn read(&self, addr: HwAddr, _size: u32) -> u64 {
        u64::from(self.0.with_pit(|pit, now| pit.read(addr as u8, now)))
    }

    fn write(&self, addr: HwAddr, value: u64, _size: u32) {
        self.0.with_pit(|pit, now| pit.write(addr as u8, value as u8, now));
    }
}

/// Port `0x61`.
struct SpeakerPort(Arc<Shared>);

impl MemoryRegionOps for SpeakerPort {
    fn read(&self, _addr: HwAddr, _size: u32) -> u64 {
        u64::from(self.0.with_pit(|pit, now| pit.read_speaker(now)))
    }

    fn write(&self, _addr: HwAddr, value: u64, _size: u32) {
        self.0.with_pit(|pit, now| pit.write_speaker(value as u8, now));
    }
}

/// The IOAPIC's page.
struct IoApicPage(Arc<Shared>);

impl MemoryRegionOps for IoApicPage {
    fn read(&self, addr: HwAddr, size: u32) -> u64 {
        u64::from(self.0.ioapic.lock().read(addr, size))
    }

    fn write(&self, addr: HwAddr, value: u64, size: u32) {
        let shared = &self.0;
        shared.ioapic.lock().write(addr, value as u32, size, &mut |m| shared.deliver(m));
    }
}

/// Makes the regions and maps them (see [`Irqchip::map`](super::Irqchip::map)).
pub(super) fn map(shared: &Arc<Shared>, topo: &Topology, io: &MemoryRegion, system: &MemoryRegion) -> Result<()> {
    let bytes = OpsConfig::with_impl(1, 1);
    for (chip, port) in [(0, PIC_MASTER_PORT), (1, PIC_SLAVE_PORT)] {
        let r = topo.new_io("pic", PicPorts { shared: shared.clone(), chip }, bytes, 2)?;
        io.add_subregion(port, &r)?;
        let r = topo.new_io("elcr", ElcrPort { shared: shared.clone(), chip }, bytes, 1)?;
        io.add_subregion(ELCR_PORT + chip as u64, &r)?;
    }
    let r = topo.new_io("pit", PitPorts(shared.clone()), bytes, 4)?;
    io.add_subregion(PIT_PORT, &r)?;
    let r = topo.new_io("pcspk", SpeakerPort(shared.clone()), bytes, 1)?;
    io.add_subregion(SPEAKER_PORT, &r)?;
    let r = topo.new_io("ioapic", IoApicPage(shared.clone()), OpsConfig::with_impl(1, 4), IOAPIC_SIZE)?;
    system.add_subregion(IOAPIC_BASE, &r)?;
    Ok(())
}
