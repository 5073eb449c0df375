//! A KVM virtual machine for a topos topology: the in-kernel interrupt
//! controllers and PIT, the memslot mirror of the memory address space,
//! ioeventfds, coalesced MMIO, interrupt lines into the in-kernel IOAPIC/PICs, and vCPUs
//! with distinct APIC IDs.

use super::coalesced::{CoalescedRing, CoalescedZones};
use super::ioeventfds::{IoBus, IoeventfdMirror};
use super::memslots::{enable_manual_dirty_log_protect, MemslotMirror};
use super::vcpu::KvmVcpu;
use crate::error::{Error, Result};
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use std::sync::{Arc, Mutex, OnceLock};
use topos_devices::InterruptSink;
use topos_runtime::{AddressSpace, FlushHook, ListenerId, Topology};

/// The page of KVM's real-mode identity map (Intel hosts), where QEMU 7.2
/// puts it: the start of the range a `--kernel`'s memory map reserves
/// ([`KVM_RESERVED`](crate::board::multiboot::KVM_RESERVED)).
const IDENTITY_MAP_ADDRESS: u64 = crate::board::multiboot::KVM_RESERVED.0;
/// KVM's real-mode TSS (three pages), just after the identity map.
const TSS_ADDRESS: usize = IDENTITY_MAP_ADDRESS as usize + 0x1000;

/// A KVM VM mirroring a topology's memory address space.
pub struct KvmVm {
    vm: Arc<VmFd>,
    mirror: Arc<MemslotMirror>,
    /// The CPUID the host supports, read once; each vCPU gets a copy with
    /// its APIC ID.
    supported_cpuid: CpuId,
    /// Whether the kernel has coalesced MMIO.
    coalesced: bool,
    /// Whether the in-kernel irqchip and PIT exist (made with the first
    /// vCPU).
    irqchip: Mutex<bool>,
    /// The coalesced-MMIO ring, mapped with the first vCPU.
    ring: OnceLock<Arc<CoalescedRing>>,
    /// Drains the ring for the runtime (held here: the topology holds it
    /// weakly).
    flush_hook: OnceLock<FlushHook>,
    memory: AddressSpace,
    listeners: Vec<ListenerId>,
    topo: Topology,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm").field("mirror", &self.mirror).finish_non_exhaustive()
    }
}

impl KvmVm {
    /// Opens `/dev/kvm` and makes a VM whose memslots mirror `memory` (the
    /// board's `memory` address space) and whose ioeventfds mirror those of
    /// `memory` and `io`; the in-kernel irqchip and PIT come with the first
    /// vCPU.
    pub fn new(topo: &Topology, memory: &AddressSpace, io: &AddressSpace) -> Result<KvmVm> {
        let kvm = Kvm::new().map_err(|e| Error::KvmUnavailable(format!("/dev/kvm: {e}")))?;
        let vm = Arc::new(kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?);
        vm.set_identity_map_address(IDENTITY_MAP_ADDRESS).map_err(Error::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(TSS_ADDRESS).map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        let manual = enable_manual_dirty_log_protect(&kvm, &vm);
        let mirror = Arc::new(MemslotMirror::new(vm.clone(), kvm.get_nr_memslots() as u32).with_manual_protect(manual));
        let mut listeners = vec![topo.listener_register(mirror.clone(), 0, Some(memory))?];
        for (space, bus) in [(memory, IoBus::Mmio), (io, IoBus::Pio)] {
            let fds = Arc::new(IoeventfdMirror::new(vm.clone(), bus));
            listeners.push(topo.listener_register(fds, 0, Some(space))?);
        }
        let coalesced = kvm.check_extension(Cap::CoalescedMmio);
        if coalesced {
            listeners.push(topo.listener_register(Arc::new(CoalescedZones::new(vm.clone())), 0, Some(memory))?);
        }
        let supported_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(KvmVm {
            vm,
            mirror,
            supported_cpuid,
            coalesced,
            irqchip: Mutex::new(false),
            ring: OnceLock::new(),
            flush_hook: OnceLock::new(),
            memory: memory.clone(),
            listeners,
            topo: topo.clone(),
        })
    }

    /// The VM's descriptor.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The memslot mirror.
    pub fn memslots(&self) -> &Arc<MemslotMirror> {
        &self.mirror
    }

    /// Creates the in-kernel interrupt controllers and PIT, once, before
    /// the first vCPU (as KVM requires). They are made this late on
    /// purpose: the first memslot change after `KVM_CREATE_IRQCHIP` waits
    /// for an SRCU grace period (4-14 ms here), so the board's initial
    /// slots go in before it; device interrupt lines only move once the
    /// guest runs.
    fn ensure_irqchip(&self) -> Result<()> {
        let mut created = self.irqchip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !*created {
            self.vm.create_irq_chip().map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            self.vm.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;
            *created = true;
        }
        Ok(())
    }

    /// Creates vCPU `index` (its APIC ID), with the host's supported CPUID
    /// adjusted to say so.
    pub fn create_vcpu(&self, index: u32) -> Result<KvmVcpu> {
        self.ensure_irqchip()?;
        let fd = self.vm.create_vcpu(u64::from(index)).map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let mut cpuid = self.supported_cpuid.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                // Initial APIC ID in EBX[31:24].
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
                // x2APIC ID of the topology leaves.
                0xb | 0x1f => e.edx = index,
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        if self.coalesced && self.ring.get().is_none() {
            let ring =
                Arc::new(CoalescedRing::map(&fd).map_err(|e| Error::Config(format!("coalesced MMIO ring: {e}")))?);
            let (r, memory) = (ring.clone(), self.memory.clone());
            let hook: FlushHook = Arc::new(move || {
                r.drain(|addr, data| {
                    let _ = memory.write(addr, data);
                });
            });
            self.topo.set_coalesced_flush_hook(Some(&hook));
            let _ = self.flush_hook.set(hook);
            let _ = self.ring.set(ring);
        }
        Ok(KvmVcpu::new(fd, index, self.ring.get().cloned())?.with_vm(self.vm.clone()))
    }

    /// Whether the vCPUs' CPUID says AMD (see [`cpu_is_amd`]).
    pub fn cpu_is_amd(&self) -> bool {
        cpu_is_amd(&self.supported_cpuid)
    }

    /// An interrupt sink driving the in-kernel PICs and IOAPIC
    /// (`KVM_IRQ_LINE`): line `n` is GSI `n`.
    pub fn interrupt_sink(&self) -> Arc<dyn InterruptSink> {
        Arc::new(IrqLines { vm: self.vm.clone() })
    }
}

/// Whether `cpuid` (KVM's supported CPUID: what topos's vCPUs report) names
/// AMD (`AuthenticAMD` or `HygonGenuine` in leaf 0), as the host's does.
pub fn cpu_is_amd(cpuid: &CpuId) -> bool {
    cpuid.as_slice().iter().find(|e| e.function == 0).is_some_and(|e| {
        let vendor: Vec<u8> = [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
    })
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        // Deletes every slot before the regions they map can go.
        for id in self.listeners.drain(..) {
            let _ = self.topo.listener_unregister(id);
        }
    }
}

/// Device interrupt lines into the in-kernel irqchip.
struct IrqLines {
    vm: Arc<VmFd>,
}

impl InterruptSink for IrqLines {
    fn set_level(&self, line: u32, level: bool) {
        if let Err(e) = self.vm.set_irq_line(line, level) {
            tracing::warn!(line, level, "KVM_IRQ_LINE failed: {e}");
        }
    }
}
