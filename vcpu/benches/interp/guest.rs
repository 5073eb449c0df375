//! The guest every backend runs: a 64 KiB BIOS image, assembled with
//! iced-x86, that goes from the reset vector to flat 32-bit protected mode,
//! sets up its devices, and has each CPU run one timed loop between two
//! marker writes.
//!
//! The same image runs on topos (interpreter or KVM), QEMU TCG and Bochs:
//! everything it touches exists on QEMU's `pc` as on topos's board
//! (`edu` in PCI slots 2 and 3, the POST port `0x80`, `fw_cfg`'s selector
//! at `0x510`, `isa-debug-exit` at `0xf4`, the local APIC).
//!
//! Per CPU (its index from `cpuid` leaf 1, EBX[31:24]):
//!
//! ```text
//! BSP: program the edus' BAR0 and command registers, check their ID
//!      register (status 3 if missing), INIT/SIPI the APs (cpus > 1),
//!      set GO                                  APs: wait for GO
//! all: lock inc READY; wait until READY = cpus
//!      start marker: out 0x510, ax = 0x3f00 | 2·index ; out 0xe9, al = 1 + 2·index
//!      loop: <op> ; dec ecx ; jnz loop          (ecx = iterations)
//!      end marker:   out 0x510, ax = 0x3f01 | 2·index ; out 0xe9, al = 2 + 2·index
//!      lock inc DONE
//! BSP: wait until DONE = cpus; out 0xf4, al = 0 (QEMU status 1)
//! APs: cli; hlt
//! ```
//!
//! `<op>` is nothing (the `dec ecx; jnz` loop), `out dx, al` (a PIO write
//! to port `0x80`), `mov [ebx], eax` or `mov eax, [ebx]` (an MMIO write or
//! read of the edu's liveness register, CPU `i` on edu `i`).
//!
//! The markers: `fw_cfg_select` is traced by QEMU (`-trace fw_cfg_select`,
//! its keys `0x3f00..` select nothing), topos overlays the port with the
//! bench's marker device, and Bochs prints port `0xe9` (`port_e9_hack`) to
//! its standard output. Where a marker port has no device the write is
//! dropped.

use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction, MemoryOperand, Register};

/// The image's size: the top 64 KiB below 4 GiB, and its alias at
/// `0xf0000`.
pub const IMAGE_SIZE: usize = 64 << 10;
/// Where the image's first byte is in the top mapping.
const ROM_BASE: u32 = 0xffff_0000;
/// The per-CPU table: device address, then port, 8 bytes per CPU.
const TABLE_OFFSET: u32 = 0xd000;
/// The real-mode entry, at `f000:e000`.
const REAL_OFFSET: u32 = 0xe000;
/// The SIPI target: vector `0xff` starts an AP at `ff00:0000`, physical
/// `0xff000`, which is this offset in the low alias.
const TRAMPOLINE_OFFSET: u32 = 0xf000;
const SIPI_VECTOR: u32 = 0xff;
/// The reset vector.
const RESET_OFFSET: u32 = 0xfff0;

/// RAM: the GDT and its register (built by each CPU with immediate stores,
/// Accessed bits preset, so no CPU writes ROM), and the shared variables.
const GDTR: u32 = 0x7f0;
const GDT: u32 = 0x800;
const GO: u32 = 0x900;
const READY: u32 = 0x904;
const DONE: u32 = 0x908;
/// Flat 32-bit code (selector 0x08) and data (0x10), Accessed set.
const GDT_ENTRIES: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// The marker port (QEMU's `fw_cfg` selector).
pub const MARK_PORT: u16 = 0x510;
/// Bochs's debug port.
const E9_PORT: i32 = 0xe9;
/// `isa-debug-exit`.
const EXIT_PORT: i32 = 0xf4;
/// The PIO device: the POST port (QEMU's `ioport80`, topos's POST port).
pub const PIO_PORT: u16 = 0x80;
/// The edus' BAR0 (1 MiB each), CPU `i` on edu `i`, in PCI slot
/// `EDU_SLOTS[i]`.
pub const EDU_BARS: [u32; 2] = [0xfeb0_0000, 0xfea0_0000];
pub const EDU_SLOTS: [u32; 2] = [2, 3];
/// The edu's identification register's value and its liveness register.
const EDU_ID: u32 = 0x0100_00ed;
const EDU_LIVENESS: u32 = 0x04;
/// The local APIC's spurious-vector and interrupt-command registers.
const APIC_SVR: u32 = 0xfee0_00f0;
const APIC_ICR: u32 = 0xfee0_0300;

/// What the timed loop does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `dec ecx; jnz` alone.
    Loop,
    /// `out dx, al` to [`PIO_PORT`].
    PioWrite,
    /// `mov [ebx], eax` to the edu's liveness register.
    MmioWrite,
    /// `mov eax, [ebx]` from it.
    MmioRead,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Loop => "`dec ecx; jnz` loop",
            Kind::PioWrite => "PIO write (`out dx, al` to port 0x80)",
            Kind::MmioWrite => "MMIO write (`mov [ebx], eax` to edu 0x04)",
            Kind::MmioRead => "MMIO read (`mov eax, [ebx]` from edu 0x04)",
        }
    }

    /// Its name in `TOPOS_BENCH_KINDS`.
    pub fn knob(self) -> &'static str {
        match self {
            Kind::Loop => "loop",
            Kind::PioWrite => "pio-write",
            Kind::MmioWrite => "mmio-write",
            Kind::MmioRead => "mmio-read",
        }
    }

    /// Whether the loop touches a device.
    pub fn is_access(self) -> bool {
        self != Kind::Loop
    }
}

/// The marker key CPU `index` writes at its start (`end` false) or end.
pub fn marker_key(index: u32, end: bool) -> u16 {
    0x3f00 | (index << 1) as u16 | u16::from(end)
}

/// Decodes a marker key: (index, end).
pub fn parse_marker_key(key: u64) -> Option<(usize, bool)> {
    (key & !0xff == 0x3f00).then_some((((key & 0xff) >> 1) as usize, key & 1 == 1))
}

/// The byte CPU `index` writes to port `0xe9` at its start or end (a
/// control character, which no emulator's own output contains).
pub fn marker_char(index: u32, end: bool) -> u8 {
    1 + 2 * index as u8 + u8::from(end)
}

/// QEMU's exit status for an `isa-debug-exit` write of `value`; topos
/// reports the same.
pub const fn exit_status(value: i32) -> i32 {
    (value << 1) | 1
}
/// The status of a run whose loop ran.
pub const STATUS_OK: i32 = exit_status(0);
/// The status when an edu did not answer with its ID.
pub const STATUS_NO_EDU: i32 = exit_status(1);

/// What a run's exit status means.
pub fn describe_status(status: i32) -> &'static str {
    match status {
        STATUS_OK => "the loop ran",
        STATUS_NO_EDU => "an edu did not answer with its ID at its BAR",
        _ => "unexpected",
    }
}

/// The image for `cpus` CPUs (1 or 2), each running `iterations` of `kind`.
pub fn bios(kind: Kind, iterations: u32, cpus: u32) -> Vec<u8> {
    assert!((1..=2).contains(&cpus) && iterations > 0);
    let mut image = vec![0xffu8; IMAGE_SIZE];
    let mut place = |offset: u32, bytes: &[u8]| {
        image[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
    };
    let pm_entry = ROM_BASE;
    place(0, &protected_mode(kind, iterations, cpus, pm_entry).expect("assemble the 32-bit code"));
    for i in 0..cpus {
        let (addr, port) =
            if kind == Kind::PioWrite { (0, u32::from(PIO_PORT)) } else { (EDU_BARS[i as usize] + EDU_LIVENESS, 0) };
        let at = TABLE_OFFSET + 8 * i;
        place(at, &addr.to_le_bytes());
        place(at + 4, &port.to_le_bytes());
    }
    place(REAL_OFFSET, &real_mode(pm_entry).expect("assemble the real-mode entry"));
    let jump = far_jump_to_real_entry().expect("assemble the far jump");
    place(TRAMPOLINE_OFFSET, &jump);
    place(RESET_OFFSET, &jump);
    image
}

/// `jmp far f000:REAL_OFFSET` (the reset vector and the SIPI trampoline).
fn far_jump_to_real_entry() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.add_instruction(Instruction::with_far_branch(Code::Jmp_ptr1616, 0xf000, REAL_OFFSET)?)?;
    a.assemble(0)
}

/// Builds the GDT in RAM and enters protected mode at `pm_entry`. Every
/// CPU runs it (they store the same values).
fn real_mode(pm_entry: u32) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.cld()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(ss, ax)?;
    for (i, e) in GDT_ENTRIES.iter().enumerate() {
        let at = GDT + 8 * i as u32;
        a.mov(dword_ptr(at), *e as u32)?;
        a.mov(dword_ptr(at + 4), (*e >> 32) as u32)?;
    }
    a.mov(word_ptr(GDTR), (8 * GDT_ENTRIES.len() - 1) as u32)?;
    a.mov(dword_ptr(GDTR + 2), GDT)?;
    // o32 lgdt [GDTR]: all 32 bits of the base.
    let gdtr = MemoryOperand::with_base_displ_size(Register::None, i64::from(GDTR), 2);
    a.add_instruction(Instruction::with1(Code::Lgdt_m1632, gdtr)?)?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    a.add_instruction(Instruction::with_far_branch(Code::Jmp_ptr1632, 0x08, pm_entry)?)?;
    a.assemble(u64::from(REAL_OFFSET))
}

/// `out MARK_PORT, ax = key(edi, end)` then `out 0xe9, al = char(edi, end)`.
/// Clobbers eax and edx.
fn marker(a: &mut CodeAssembler, end: bool) -> Result<(), IcedError> {
    a.mov(eax, edi)?;
    a.shl(eax, 1)?;
    a.or(eax, u32::from(marker_key(0, end)))?;
    a.mov(edx, u32::from(MARK_PORT))?;
    a.out(dx, ax)?;
    a.mov(eax, edi)?;
    a.shl(eax, 1)?;
    a.add(eax, u32::from(marker_char(0, end)))?;
    a.out(E9_PORT, al)?;
    Ok(())
}

/// A PCI configuration write of `value` (`size` 2 or 4 bytes) to register
/// `reg` of slot `slot`, function 0. Clobbers eax and edx.
fn pci_write(a: &mut CodeAssembler, slot: u32, reg: u32, value: u32, size: u32) -> Result<(), IcedError> {
    a.mov(eax, 0x8000_0000 | (slot << 11) | (reg & 0xfc))?;
    a.mov(edx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(edx, 0xcfcu32 + (reg & 3))?;
    a.mov(eax, value)?;
    if size == 2 {
        a.out(dx, ax)?;
    } else {
        a.out(dx, eax)?;
    }
    Ok(())
}

/// The 32-bit program (see the module's documentation), at `ip`.
fn protected_mode(kind: Kind, iterations: u32, cpus: u32, ip: u32) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut ap = a.create_label();
    let mut common = a.create_label();
    let mut no_edu = a.create_label();
    a.mov(eax, 0x10u32)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(eax, 1u32)?;
    a.cpuid()?;
    a.shr(ebx, 24)?;
    a.mov(edi, ebx)?;
    a.test(edi, edi)?;
    a.jnz(ap)?;

    // The BSP.
    if kind.is_access() {
        for (slot, bar) in EDU_SLOTS.iter().zip(EDU_BARS) {
            pci_write(&mut a, *slot, 0x10, bar, 4)?;
            // Command: memory space.
            pci_write(&mut a, *slot, 0x04, 0x0002, 2)?;
            a.cmp(dword_ptr(bar), EDU_ID)?;
            a.jne(no_edu)?;
        }
    }
    if cpus > 1 {
        a.or(dword_ptr(APIC_SVR), 0x100)?;
        // INIT, then a startup IPI, to all excluding self.
        a.mov(dword_ptr(APIC_ICR), 0x000c_4500)?;
        a.mov(dword_ptr(APIC_ICR), 0x000c_4600 | SIPI_VECTOR)?;
    }
    a.mov(dword_ptr(GO), 1)?;
    a.jmp(common)?;

    // The APs (started by SIPI, or from reset where nothing parks them).
    a.set_label(&mut ap)?;
    a.pause()?;
    a.cmp(dword_ptr(GO), 1)?;
    a.jne(ap)?;

    // Everyone: meet, then run.
    a.set_label(&mut common)?;
    a.lock().inc(dword_ptr(READY))?;
    let mut meet = a.create_label();
    a.set_label(&mut meet)?;
    a.pause()?;
    a.cmp(dword_ptr(READY), cpus)?;
    a.jne(meet)?;
    a.mov(ebx, dword_ptr(edi * 8 + (ROM_BASE + TABLE_OFFSET)))?;
    a.mov(esi, dword_ptr(edi * 8 + (ROM_BASE + TABLE_OFFSET + 4)))?;
    marker(&mut a, false)?;
    a.mov(edx, esi)?;
    a.mov(ecx, iterations)?;
    let mut body = a.create_label();
    a.set_label(&mut body)?;
    match kind {
        Kind::Loop => {}
        Kind::PioWrite => a.out(dx, al)?,
        Kind::MmioWrite => a.mov(dword_ptr(ebx), eax)?,
        Kind::MmioRead => a.mov(eax, dword_ptr(ebx))?,
    }
    a.dec(ecx)?;
    a.jnz(body)?;
    marker(&mut a, true)?;
    a.lock().inc(dword_ptr(DONE))?;
    let mut park = a.create_label();
    a.test(edi, edi)?;
    a.jnz(park)?;
    let mut wait_done = a.create_label();
    a.set_label(&mut wait_done)?;
    a.pause()?;
    a.cmp(dword_ptr(DONE), cpus)?;
    a.jne(wait_done)?;
    a.mov(al, 0)?;
    a.out(EXIT_PORT, al)?;
    a.jmp(park)?;

    a.set_label(&mut no_edu)?;
    a.mov(al, 1)?;
    a.out(EXIT_PORT, al)?;
    a.set_label(&mut park)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(park)?;
    a.assemble(u64::from(ip))
}
