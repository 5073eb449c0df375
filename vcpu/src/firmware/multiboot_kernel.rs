//! # The multiboot test kernel
//!
//! A Multiboot (version 1) kernel assembled at run time, like the firmware
//! and with the firmware's routines (COM1 output, fw_cfg, the debug-exit
//! verdict), for testing a multiboot loader: QEMU's `-kernel`, and topos's
//! `topos run --kernel FILE --append CMDLINE`. It comes in two formats
//! ([`KernelFormat`]) with the same code at the same addresses: an ELF32
//! executable, and a flat binary whose multiboot header carries the load
//! addresses (the "a.out kludge", header flag bit 16).
//!
//! ## Layout
//!
//! Linked to load at [`LOAD_ADDR`] (1 MiB); offsets from there, which are
//! also file offsets:
//!
//! | offset | what |
//! | --- | --- |
//! | `0x0000` | ELF header, then its one program header at `0x34` (ELF only; zeros in the flat binary) |
//! | `0x0060` | the multiboot header ([`HEADER_OFFSET`]) |
//! | `0x0100` | data pool: the strings it prints |
//! | `0x1000` | 32-bit code, entered at its first byte ([`ENTRY_OFFSET`]); the file ends with it |
//! | `0x3000` | BSS: the failure counter (a dword), then the stack up to `0x4000` ([`BSS_END_OFFSET`]) |
//!
//! The header asks for page-aligned modules (flag bit 0) and memory
//! information (bit 1). In the flat binary it also sets bit 16 with
//! `header_addr` = `0x100060`, `load_addr` = `0x100000`, `load_end_addr` =
//! the end of the file, `bss_end_addr` = `0x104000` and `entry_addr` =
//! `0x101000`. The ELF file has one `PT_LOAD` segment from file offset 0,
//! `p_vaddr` = `p_paddr` = `0x100000`, `p_memsz` = `0x4000`, and
//! `e_entry` = `0x101000`.
//!
//! ## What it does
//!
//! Entered as Multiboot specifies (`eax` = `0x2badb002`, `ebx` = the
//! physical address of the multiboot information, flat 32-bit protected
//! mode, paging and interrupts off), it sets up its stack in its BSS and
//! prints, on COM1, one line each:
//!
//! ```text
//! multiboot: magic ok
//! cmdline: <the string at mbi->cmdline, whole>
//! mem: lower <mem_lower> KiB, upper <mem_upper> KiB
//! mmap: <base_addr as 016x> <length as 016x> <type>      (one line per entry)
//! cpus: <fw_cfg's CPU count>
//! result: pass
//! ```
//!
//! then writes [`EXIT_PASS`](super::EXIT_PASS) to `isa-debug-exit`, which
//! makes QEMU exit with status 1 ([`QEMU_STATUS_PASS`](super::QEMU_STATUS_PASS)).
//! The memory-map entries are walked from `mmap_addr` for `mmap_length`
//! bytes, each `size` (4 bytes), `base_addr` (8), `length` (8), `type` (4),
//! the next at `size + 4` bytes on.
//!
//! What can go wrong, and the line printed instead (each makes the result
//! `result: fail` and the debug-exit value [`EXIT_FAIL`](super::EXIT_FAIL)):
//!
//! * a wrong `eax`: `multiboot: magic BAD <eax as 08x>`; the information
//!   lines are then skipped (`ebx` means nothing), `cpus:` still follows;
//! * an information flag clear: `cmdline: missing (flags bit 2 clear)`,
//!   `mem: missing (flags bit 0 clear)` or `mmap: missing (flags bit 6
//!   clear)`;
//! * an empty memory map: `mmap: empty`; more than [`MAX_MMAP_ENTRIES`]
//!   entries: `mmap: more than 128 entries` after the first 128.
//!
//! Without fw_cfg the `cpus:` line is `skip: fw_cfg (not present)`, which
//! is not a failure.
//!
//! ## On QEMU
//!
//! `qemu-system-x86_64 -machine pc -accel tcg -m 256M -smp 2 -nodefaults
//! -kernel /tmp/kernel -append "hello topos" -device
//! isa-debug-exit,iobase=0xf4,iosize=0x04` (QEMU 7.2, SeaBIOS 1.16.2)
//! prints the same for both formats, after SeaBIOS's own banner and its
//! `Booting from ROM..` (no newline before the kernel's first line):
//!
//! ```text
//! multiboot: magic ok
//! cmdline: /tmp/kernel hello topos
//! mem: lower 639 KiB, upper 260992 KiB
//! mmap: 0000000000000000 000000000009fc00 1
//! mmap: 000000000009fc00 0000000000000400 2
//! mmap: 00000000000f0000 0000000000010000 2
//! mmap: 0000000000100000 000000000fee0000 1
//! mmap: 000000000ffe0000 0000000000020000 2
//! mmap: 00000000fffc0000 0000000000040000 2
//! mmap: 000000fd00000000 0000000300000000 2
//! cpus: 2
//! result: pass
//! ```
//!
//! QEMU passes the command line as `"<kernel path> <append>"`. The memory
//! map is SeaBIOS's e820 map as QEMU's multiboot option ROM collects it,
//! and `mem_upper` is the length of its entry at 1 MiB. SeaBIOS reserves its
//! EBDA (`0x9fc00`), the `0xf0000` segment, the last 128 KiB of RAM below
//! 4 GiB (its high-memory tables) and its 256 KiB ROM below 4 GiB. The last entry is QEMU's: it reserves the AMD
//! HyperTransport range below 1 TiB for a CPU model with an AMD vendor
//! string (TCG's default `qemu64`) and at least 40 physical address bits.
//! With `-cpu qemu64,vendor=GenuineIntel` that entry is absent. Under KVM
//! (`-accel kvm`), QEMU also reserves `0xfeffc000` for 16 KiB (KVM's
//! identity-map and TSS pages): `mmap: 00000000feffc000 0000000000004000 2`
//! comes before the ROM's entry.
//!
//! With `-m 4G`, RAM below 4 GiB ends at 3 GiB and the rest is at 4 GiB:
//!
//! ```text
//! mem: lower 639 KiB, upper 3144576 KiB
//! mmap: 0000000000000000 000000000009fc00 1
//! mmap: 000000000009fc00 0000000000000400 2
//! mmap: 00000000000f0000 0000000000010000 2
//! mmap: 0000000000100000 00000000bfee0000 1
//! mmap: 00000000bffe0000 0000000000020000 2
//! mmap: 00000000fffc0000 0000000000040000 2
//! mmap: 0000000100000000 0000000040000000 1
//! mmap: 000000fd00000000 0000000300000000 2
//! ```

use iced_x86::code_asm::*;

use super::asm::Asm;
use super::error::Result;
use super::transcript::{self, ExpectedLine};
use super::{console, exit, fw_cfg};

/// The two forms of the kernel; the code and its addresses are the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelFormat {
    /// An ELF32 executable (`ET_EXEC`, `EM_386`) with one `PT_LOAD`
    /// segment; the multiboot header has no address fields (flag bit 16
    /// clear), so the loader takes the addresses from the ELF headers.
    Elf,
    /// A flat binary, loaded whole at [`LOAD_ADDR`], whose multiboot header
    /// carries the addresses (flag bit 16 set).
    AoutKludge,
}

/// Where the kernel is linked to load (1 MiB).
pub const LOAD_ADDR: u32 = 0x10_0000;
/// Offset of the multiboot header in the file and in the loaded image.
pub const HEADER_OFFSET: u32 = 0x60;
/// Offset of the entry point (the first instruction).
pub const ENTRY_OFFSET: u32 = 0x1000;
/// Offset of the data pool.
const POOL_OFFSET: u32 = 0x100;
/// Offset of the BSS: the failure counter, then the stack.
const BSS_OFFSET: u32 = 0x3000;
/// Offset of the end of the BSS (the top of the stack).
pub const BSS_END_OFFSET: u32 = 0x4000;
/// The failure counter.
const FAILURES: u32 = LOAD_ADDR + BSS_OFFSET;
/// The top of the stack.
const STACK_TOP: u32 = LOAD_ADDR + BSS_END_OFFSET;

/// The multiboot header's magic number.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// The value a multiboot loader leaves in `eax`.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Header flag: align modules on page boundaries.
pub const HEADER_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: pass memory information.
pub const HEADER_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: the address fields are valid (the "a.out kludge").
pub const HEADER_ADDRESSES: u32 = 1 << 16;

/// Information flag: `mem_lower` and `mem_upper` are valid.
const INFO_MEMORY: u32 = 1 << 0;
/// Information flag: `cmdline` is valid.
const INFO_CMDLINE: u32 = 1 << 2;
/// Information flag: `mmap_length` and `mmap_addr` are valid.
const INFO_MMAP: u32 = 1 << 6;
/// Offsets in the multiboot information structure.
const MBI_FLAGS: u32 = 0;
const MBI_MEM_LOWER: u32 = 4;
const MBI_MEM_UPPER: u32 = 8;
const MBI_CMDLINE: u32 = 16;
const MBI_MMAP_LENGTH: u32 = 44;
const MBI_MMAP_ADDR: u32 = 48;

/// Memory-map entries printed at most (a loop guard against a bad map).
pub const MAX_MMAP_ENTRIES: u32 = 128;

/// The first line when `eax` held [`BOOTLOADER_MAGIC`].
pub const MAGIC_OK: &str = "multiboot: magic ok";
/// Prefix of the first line when it did not (`eax` follows, 8 hex digits).
pub const MAGIC_BAD: &str = "multiboot: magic BAD ";
/// Prefix of the command-line line.
pub const CMDLINE: &str = "cmdline: ";
/// Prefix of the memory line (`mem_lower` follows).
pub const MEM_LOWER: &str = "mem: lower ";
/// Between `mem_lower` and `mem_upper` on the memory line.
pub const MEM_UPPER: &str = " KiB, upper ";
/// End of the memory line.
pub const MEM_UNIT: &str = " KiB";
/// Prefix of a memory-map line.
pub const MMAP: &str = "mmap: ";

/// One entry of the multiboot memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmapEntry {
    /// `base_addr`.
    pub base: u64,
    /// `length`.
    pub length: u64,
    /// `type` (1: available RAM, 2: reserved, ...).
    pub kind: u32,
}

impl MmapEntry {
    /// The line the kernel prints for it.
    pub fn line(&self) -> String {
        format!("{MMAP}{:016x} {:016x} {}", self.base, self.length, self.kind)
    }
}

/// What the kernel should find in the multiboot information and fw_cfg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// The command line, whole (QEMU's is `"<kernel path> <append>"`).
    pub cmdline: String,
    /// `mem_lower` in KiB.
    pub mem_lower_kib: u32,
    /// `mem_upper` in KiB.
    pub mem_upper_kib: u32,
    /// The memory map, in order.
    pub mmap: Vec<MmapEntry>,
    /// fw_cfg's CPU count.
    pub ncpus: u32,
}

impl Boot {
    /// The transcript a passing run prints, for
    /// [`transcript::check`].
    pub fn expected_lines(&self) -> Vec<ExpectedLine> {
        let mut lines = vec![
            MAGIC_OK.to_owned(),
            format!("{CMDLINE}{}", self.cmdline),
            format!("{MEM_LOWER}{}{MEM_UPPER}{}{MEM_UNIT}", self.mem_lower_kib, self.mem_upper_kib),
        ];
        lines.extend(self.mmap.iter().map(MmapEntry::line));
        lines.push(format!("{}{}", transcript::CPUS, self.ncpus));
        lines.push(transcript::RESULT_PASS.to_owned());
        lines.into_iter().map(ExpectedLine::Exact).collect()
    }
}

/// Prints the command-line, memory and memory-map lines from the
/// information at `ebp` (clobbers everything but `ebp` and `esp`).
fn emit_info(a: &mut Asm) -> Result<()> {
    let puts = a.rt.puts;

    let mut no_cmdline = a.label();
    let mut mem = a.label();
    a.test(dword_ptr(ebp + MBI_FLAGS), INFO_CMDLINE)?;
    a.jz(no_cmdline)?;
    a.print(CMDLINE)?;
    a.mov(esi, dword_ptr(ebp + MBI_CMDLINE))?;
    a.call(puts)?;
    a.print("\n")?;
    a.jmp(mem)?;
    a.bind(&mut no_cmdline)?;
    a.print(&format!("{CMDLINE}missing (flags bit 2 clear)\n"))?;
    a.fail()?;

    let mut no_mem = a.label();
    let mut mmap = a.label();
    a.bind(&mut mem)?;
    a.test(dword_ptr(ebp + MBI_FLAGS), INFO_MEMORY)?;
    a.jz(no_mem)?;
    a.print(MEM_LOWER)?;
    a.mov(eax, dword_ptr(ebp + MBI_MEM_LOWER))?;
    a.print_eax_dec()?;
    a.print(MEM_UPPER)?;
    a.mov(eax, dword_ptr(ebp + MBI_MEM_UPPER))?;
    a.print_eax_dec()?;
    a.print(&format!("{MEM_UNIT}\n"))?;
    a.jmp(mmap)?;
    a.bind(&mut no_mem)?;
    a.print("mem: missing (flags bit 0 clear)\n")?;
    a.fail()?;

    // esi walks the entries up to ebx; ecx counts down the entries left.
    let mut no_mmap = a.label();
    let mut entry = a.label();
    let mut walked = a.label();
    let mut end = a.label();
    a.bind(&mut mmap)?;
    a.test(dword_ptr(ebp + MBI_FLAGS), INFO_MMAP)?;
    a.jz(no_mmap)?;
    a.mov(esi, dword_ptr(ebp + MBI_MMAP_ADDR))?;
    a.mov(ebx, esi)?;
    a.add(ebx, dword_ptr(ebp + MBI_MMAP_LENGTH))?;
    a.mov(ecx, MAX_MMAP_ENTRIES)?;
    a.bind(&mut entry)?;
    a.cmp(esi, ebx)?;
    a.jae(walked)?;
    a.print(MMAP)?;
    // base_addr and length (high dword first), then type.
    for (high, low) in [(8, 4), (16, 12)] {
        a.mov(eax, dword_ptr(esi + high))?;
        a.print_eax_hex(8)?;
        a.mov(eax, dword_ptr(esi + low))?;
        a.print_eax_hex(8)?;
        a.print(" ")?;
    }
    a.mov(eax, dword_ptr(esi + 20))?;
    a.print_eax_dec()?;
    a.print("\n")?;
    a.mov(eax, dword_ptr(esi))?;
    a.lea(esi, dword_ptr(esi + eax + 4))?;
    a.dec(ecx)?;
    a.jnz(entry)?;
    a.print(&format!("{MMAP}more than {MAX_MMAP_ENTRIES} entries\n"))?;
    a.fail()?;
    a.jmp(end)?;
    a.bind(&mut walked)?;
    a.cmp(ecx, MAX_MMAP_ENTRIES)?;
    a.jne(end)?;
    a.print(&format!("{MMAP}empty\n"))?;
    a.fail()?;
    a.jmp(end)?;
    a.bind(&mut no_mmap)?;
    a.print(&format!("{MMAP}missing (flags bit 6 clear)\n"))?;
    a.fail()?;
    a.bind(&mut end)?;
    Ok(())
}

/// The kernel's program, from the entry to the debug exit, then the
/// routines it calls.
fn emit(a: &mut Asm) -> Result<()> {
    let mut bad_magic = a.label();
    let mut cpus = a.label();
    let mut no_fw_cfg = a.label();
    let mut verdict = a.label();
    a.cli()?;
    a.cld()?;
    a.mov(esp, STACK_TOP)?;
    a.mov(dword_ptr(FAILURES), 0)?;
    a.mov(ebp, ebx)?;
    a.mov(edi, eax)?;
    console::emit_init(a)?;
    a.cmp(edi, BOOTLOADER_MAGIC)?;
    a.jne(bad_magic)?;
    a.print(&format!("{MAGIC_OK}\n"))?;
    emit_info(a)?;
    a.jmp(cpus)?;
    a.bind(&mut bad_magic)?;
    a.print(MAGIC_BAD)?;
    a.mov(eax, edi)?;
    a.print_eax_hex(8)?;
    a.print("\n")?;
    a.fail()?;

    a.bind(&mut cpus)?;
    fw_cfg::emit_check_signature(a, no_fw_cfg)?;
    fw_cfg::emit_cpus(a)?;
    a.jmp(verdict)?;
    a.bind(&mut no_fw_cfg)?;
    a.print(&format!("{}\n", transcript::FW_CFG_ABSENT))?;
    a.bind(&mut verdict)?;
    exit::emit_bsp(a)?;

    console::emit_routines(a)
}

/// The multiboot header: magic, flags, checksum, and for the a.out kludge
/// the five address fields.
fn header(format: KernelFormat, file_len: u32) -> Vec<u8> {
    let mut flags = HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO;
    if format == KernelFormat::AoutKludge {
        flags |= HEADER_ADDRESSES;
    }
    let checksum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags);
    let mut fields = vec![HEADER_MAGIC, flags, checksum];
    if format == KernelFormat::AoutKludge {
        fields.extend([
            LOAD_ADDR + HEADER_OFFSET,  // header_addr
            LOAD_ADDR,                  // load_addr
            LOAD_ADDR + file_len,       // load_end_addr
            LOAD_ADDR + BSS_END_OFFSET, // bss_end_addr
            LOAD_ADDR + ENTRY_OFFSET,   // entry_addr
        ]);
    }
    fields.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// The ELF32 file header and its one program header, loading the file's
/// first `file_len` bytes (from offset 0) at [`LOAD_ADDR`], zero-filled to
/// [`BSS_END_OFFSET`].
fn elf_headers(file_len: u32) -> Vec<u8> {
    const EHDR_SIZE: u16 = 52;
    const PHDR_SIZE: u16 = 32;
    const ET_EXEC: u16 = 2;
    const EM_386: u16 = 3;
    const PT_LOAD: u32 = 1;
    const PF_RWX: u32 = 7;
    let mut h = Vec::new();
    // e_ident: magic, ELFCLASS32, ELFDATA2LSB, EV_CURRENT, System V ABI.
    h.extend_from_slice(b"\x7fELF\x01\x01\x01\x00");
    h.resize(16, 0);
    h.extend(ET_EXEC.to_le_bytes());
    h.extend(EM_386.to_le_bytes());
    h.extend(1u32.to_le_bytes()); // e_version
    h.extend((LOAD_ADDR + ENTRY_OFFSET).to_le_bytes()); // e_entry
    h.extend(u32::from(EHDR_SIZE).to_le_bytes()); // e_phoff
    h.extend(0u32.to_le_bytes()); // e_shoff: no section headers
    h.extend(0u32.to_le_bytes()); // e_flags
    h.extend(EHDR_SIZE.to_le_bytes());
    h.extend(PHDR_SIZE.to_le_bytes());
    h.extend(1u16.to_le_bytes()); // e_phnum
    h.extend([0u8; 6]); // e_shentsize, e_shnum, e_shstrndx
    for field in [PT_LOAD, 0, LOAD_ADDR, LOAD_ADDR, file_len, BSS_END_OFFSET, PF_RWX, 0x1000] {
        // p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align
        h.extend(field.to_le_bytes());
    }
    debug_assert_eq!(h.len(), usize::from(EHDR_SIZE + PHDR_SIZE));
    h
}

/// Copies `bytes` to `offset` of `image`, growing it as needed, failing if
/// they would overrun `end`.
fn place(image: &mut Vec<u8>, part: &'static str, bytes: &[u8], offset: u32, end: u32) -> Result<()> {
    let (offset, end) = (offset as usize, end as usize);
    if image.len() < offset + bytes.len() {
        image.resize(offset + bytes.len(), 0);
    }
    super::image::place(image, part, bytes, offset, end)
}

/// Assembles the kernel file in `format`.
pub(crate) fn build(format: KernelFormat) -> Result<Vec<u8>> {
    let mut a = Asm::with_layout(LOAD_ADDR + POOL_OFFSET, (ENTRY_OFFSET - POOL_OFFSET) as usize, FAILURES)?;
    emit(&mut a)?;
    let (code, pool) = a.assemble_flat(LOAD_ADDR + ENTRY_OFFSET)?;

    let mut image = Vec::new();
    place(&mut image, "32-bit code", &code, ENTRY_OFFSET, BSS_OFFSET)?;
    let file_len = image.len() as u32;
    if format == KernelFormat::Elf {
        place(&mut image, "ELF headers", &elf_headers(file_len), 0, HEADER_OFFSET)?;
    }
    place(&mut image, "multiboot header", &header(format, file_len), HEADER_OFFSET, POOL_OFFSET)?;
    place(&mut image, "data pool", &pool, POOL_OFFSET, ENTRY_OFFSET)?;
    Ok(image)
}
