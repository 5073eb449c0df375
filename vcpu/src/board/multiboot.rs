//! `--kernel`: loading a Multiboot (version 1) kernel as QEMU's `-kernel`
//! does, and the state the boot processor starts it in.
//!
//! The kernel is found by its header (magic `0x1BADB002` in the first
//! 8 KiB, 4-byte aligned, with a checksum). With flag bit 16 its header
//! gives the load addresses (the "a.out kludge"); otherwise it must be a
//! 32-bit ELF executable, whose `PT_LOAD` segments are loaded at their
//! physical addresses. Flags 0 (align modules), 1 (memory information) and
//! 2 (video mode, ignored as QEMU does) are understood; any other flag of
//! the low 16 (which a loader must understand) is refused.
//!
//! The boot information is built below the EBDA: the info structure, the
//! memory map and the command line. The command line is QEMU's: the
//! kernel's path, a space, and `--append`. The memory map and
//! `mem_lower`/`mem_upper` are what a kernel booted by QEMU 7.2 on KVM sees
//! (QEMU's option ROM collects them from SeaBIOS's E820 table, which adds
//! QEMU's own entries), in its order:
//!
//! | entry | type | from |
//! | --- | --- | --- |
//! | `0 .. 0x9fc00` | usable | RAM below the EBDA (`mem_lower` 639 KiB) |
//! | `0x9fc00 .. 0xa0000` | reserved | the EBDA |
//! | `0xf0000 .. 0x100000` | reserved | the BIOS segment |
//! | `1 MiB ..` top of low RAM − 128 KiB | usable | (`mem_upper`: its length) |
//! | the last 128 KiB of low RAM | reserved | SeaBIOS's tables |
//! | `0xfeffc000 .. 0xff000000` | reserved | KVM's identity map and TSS ([`KVM_RESERVED`]) |
//! | `0xfffc0000 .. 4 GiB` | reserved | SeaBIOS's 256 KiB ROM |
//! | `4 GiB ..` | usable | RAM above 4 GiB, if any |
//! | `0xfd00000000 ..` + 12 GiB | reserved | AMD's HyperTransport range, for an AMD CPU |
//!
//! The boot processor enters the kernel in flat 32-bit protected mode,
//! paging and interrupts off, with `EAX = 0x2BADB002` and `EBX` the
//! address of the information ([`Flat32Entry`]).

use topos_runtime::RamSlice;

/// The header's magic.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What `EAX` holds at the kernel's entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Where the information structure goes.
pub const INFO_ADDR: u64 = 0x9000;
/// Where the memory map goes.
const MMAP_ADDR: u64 = 0x9100;
/// Where the command line goes.
const CMDLINE_ADDR: u64 = 0x9800;
/// The EBDA's start: the boot information must end below it.
const EBDA: u64 = 0x9fc00;
/// What SeaBIOS keeps at the top of low RAM.
const SEABIOS_HIGH_TABLES: u64 = 0x20000;
/// Where the BIOS ROM area reported as reserved starts.
const BIOS_ROM_RESERVED: u64 = 0xfffc_0000;
/// KVM's identity-map page and real-mode TSS (QEMU 7.2's place for them).
pub const KVM_RESERVED: (u64, u64) = (0xfeff_c000, 0x4000);
/// AMD's HyperTransport range, reserved for AMD CPUs (QEMU's
/// `AMD_HT_START`, `AMD_HT_SIZE`).
pub const AMD_HT: (u64, u64) = (0xfd_0000_0000, 0x3_0000_0000);

/// The code selector the kernel is entered with (flat 32-bit), as QEMU's
/// Multiboot loader leaves it.
pub const ENTRY_CODE_SELECTOR: u16 = 0x10;

/// The data and stack selector the kernel is entered with (flat 32-bit),
/// as QEMU's Multiboot loader leaves it.
pub const ENTRY_DATA_SELECTOR: u16 = 0x18;

/// How the kernel must be entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flat32Entry {
    /// The entry point.
    pub eip: u32,
    /// [`BOOTLOADER_MAGIC`].
    pub eax: u32,
    /// The information structure's address.
    pub ebx: u32,
}

/// A kernel to load.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The file's bytes.
    pub image: Vec<u8>,
    /// Its path, as given (the first word of the command line).
    pub path: String,
    /// `--append`.
    pub append: String,
}

/// Why a kernel cannot be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MultibootError {
    /// No header in the first 8 KiB.
    #[error("no Multiboot header in the first 8 KiB")]
    NoHeader,
    /// The header asks for something this loader does not do.
    #[error("unsupported Multiboot flags {0:#x}")]
    UnsupportedFlags(u32),
    /// Not an ELF file, or not one this loader takes.
    #[error("not a loadable 32-bit ELF kernel: {0}")]
    BadElf(&'static str),
    /// The a.out-kludge addresses do not make sense.
    #[error("bad a.out-kludge addresses: {0}")]
    BadKludge(&'static str),
    /// A part of the kernel falls outside RAM below 4 GiB or on the boot
    /// information.
    #[error("the kernel's {what} at {start:#x}..{end:#x} is not in free RAM below 4 GiB")]
    Placement {
        /// What.
        what: &'static str,
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// The command line does not fit below the EBDA.
    #[error("the command line is too long ({0} bytes)")]
    CmdlineTooLong(usize),
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

/// One piece to copy into RAM: `bytes` at `addr`, then zeros up to `mem`.
struct Piece<'a> {
    addr: u64,
    bytes: &'a [u8],
    mem: u64,
}

/// Finds the header: (its offset, flags).
fn header(image: &[u8]) -> Result<(usize, u32), MultibootError> {
    let end = image.len().min(8192);
    (0..end.saturating_sub(11))
        .step_by(4)
        .find_map(|at| {
            let magic = u32_at(image, at)?;
            let flags = u32_at(image, at + 4)?;
            let sum = u32_at(image, at + 8)?;
            (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0).then_some((at, flags))
        })
        .ok_or(MultibootError::NoHeader)
}

fn elf_pieces(image: &[u8]) -> Result<(Vec<Piece<'_>>, u32), MultibootError> {
    let bad = MultibootError::BadElf;
    if image.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(bad("no ELF magic (and no a.out-kludge flag)"));
    }
    if image.get(4) != Some(&1) {
        return Err(bad("not a 32-bit ELF (QEMU refuses 64-bit kernels too)"));
    }
    if image.get(5) != Some(&1) || u16_at(image, 18) != Some(3) {
        return Err(bad("not little-endian i386"));
    }
    let entry = u32_at(image, 24).ok_or(bad("truncated header"))?;
    let phoff = u32_at(image, 28).ok_or(bad("truncated header"))? as usize;
    let phentsize = usize::from(u16_at(image, 42).ok_or(bad("truncated header"))?);
    let phnum = usize::from(u16_at(image, 44).ok_or(bad("truncated header"))?);
    if phentsize < 32 {
        return Err(bad("program headers too small"));
    }
    let mut pieces = Vec::new();
    for i in 0..phnum {
        let ph = phoff.checked_add(i * phentsize).ok_or(bad("program header offset overflows"))?;
        let field = |o: usize| u32_at(image, ph + o).ok_or(bad("truncated program header"));
        if field(0)? != 1 {
            continue; // not PT_LOAD
        }
        let (offset, paddr, filesz, memsz) = (field(4)? as usize, field(12)?, field(16)? as usize, field(20)?);
        if (memsz as usize) < filesz {
            return Err(bad("a segment's memory size is below its file size"));
        }
        let bytes = image.get(offset..offset.checked_add(filesz).ok_or(bad("segment overflows"))?);
        let bytes = bytes.ok_or(bad("a segment lies beyond the end of the file"))?;
        pieces.push(Piece { addr: u64::from(paddr), bytes, mem: u64::from(memsz) });
    }
    if pieces.is_empty() {
        return Err(bad("no loadable segment"));
    }
    Ok((pieces, entry))
}

fn kludge_pieces(image: &[u8], at: usize) -> Result<(Vec<Piece<'_>>, u32), MultibootError> {
    let bad = MultibootError::BadKludge;
    let field = |o: usize| u32_at(image, at + o).ok_or(bad("truncated header"));
    let (header_addr, load_addr, load_end, bss_end, entry) =
        (field(12)?, field(16)?, field(20)?, field(24)?, field(28)?);
    let behind = header_addr.checked_sub(load_addr).ok_or(bad("header_addr below load_addr"))? as usize;
    let offset = at.checked_sub(behind).ok_or(bad("load_addr before the file's start"))?;
    let len = if load_end == 0 {
        image.len() - offset
    } else {
        load_end.checked_sub(load_addr).ok_or(bad("load_end_addr below load_addr"))? as usize
    };
    let bytes = image.get(offset..offset + len).ok_or(bad("the load range lies beyond the end of the file"))?;
    let mem = if bss_end == 0 {
        len as u64
    } else {
        u64::from(bss_end.checked_sub(load_addr).ok_or(bad("bss_end_addr below load_addr"))?)
    };
    if mem < len as u64 {
        return Err(bad("bss_end_addr below load_end_addr"));
    }
    Ok((vec![Piece { addr: u64::from(load_addr), bytes, mem }], entry))
}

/// One memory-map entry: base, length, type (1 usable, 2 reserved).
type MapEntry = (u64, u64, u32);

/// What the memory map depends on besides RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapOptions {
    /// The accelerator is KVM (its pages are reserved).
    pub kvm: bool,
    /// The CPU is AMD's (the HyperTransport range is reserved).
    pub amd: bool,
}

/// The memory map a kernel booted by QEMU's `pc` sees (see the module
/// documentation).
pub fn memory_map(below_4g: u64, above_4g: u64, options: MapOptions) -> Vec<MapEntry> {
    let usable_top = below_4g - SEABIOS_HIGH_TABLES;
    let mut map = vec![
        (0, EBDA, 1),
        (EBDA, 0xa0000 - EBDA, 2),
        (0xf0000, 0x10000, 2),
        (0x10_0000, usable_top - 0x10_0000, 1),
        (usable_top, SEABIOS_HIGH_TABLES, 2),
    ];
    if options.kvm {
        map.push((KVM_RESERVED.0, KVM_RESERVED.1, 2));
    }
    map.push((BIOS_ROM_RESERVED, (1 << 32) - BIOS_ROM_RESERVED, 2));
    if above_4g > 0 {
        map.push((1 << 32, above_4g, 1));
    }
    if options.amd {
        map.push((AMD_HT.0, AMD_HT.1, 2));
    }
    map
}

/// Loads `kernel` into `ram` (guest-physical = RAM offset below 4 GiB) and
/// writes the boot information; returns how to enter it.
pub fn load(
    kernel: &Kernel,
    ram: &RamSlice,
    below_4g: u64,
    above_4g: u64,
    options: MapOptions,
) -> Result<Flat32Entry, MultibootError> {
    let image = &kernel.image;
    let (at, flags) = header(image)?;
    if flags & 0xfff8 != 0 {
        return Err(MultibootError::UnsupportedFlags(flags));
    }
    let (pieces, entry) = if flags & (1 << 16) != 0 { kludge_pieces(image, at)? } else { elf_pieces(image)? };

    let mut cmdline = format!("{} {}", kernel.path, kernel.append).into_bytes();
    cmdline.push(0);
    if CMDLINE_ADDR + cmdline.len() as u64 > EBDA {
        return Err(MultibootError::CmdlineTooLong(cmdline.len()));
    }
    let info_end = CMDLINE_ADDR + cmdline.len() as u64;
    for p in &pieces {
        let end = p.addr.saturating_add(p.mem);
        let outside = end > below_4g.min(ram.len());
        let on_info = p.addr < info_end && end > INFO_ADDR;
        if outside || on_info || end == u64::MAX {
            return Err(MultibootError::Placement { what: "segment", start: p.addr, end });
        }
    }
    let place = |what: &'static str, start: u64, end: u64| MultibootError::Placement { what, start, end };
    for p in &pieces {
        let end = p.addr + p.mem;
        ram.write(p.addr, p.bytes).map_err(|_| place("segment", p.addr, end))?;
        let zeros = vec![0u8; (p.mem - p.bytes.len() as u64) as usize];
        ram.write(p.addr + p.bytes.len() as u64, &zeros).map_err(|_| place("bss", p.addr, end))?;
    }

    let map = memory_map(below_4g, above_4g, options);
    let mut mmap = Vec::with_capacity(map.len() * 24);
    for (base, len, kind) in &map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
    }
    let mem_lower = (EBDA / 1024) as u32;
    let mem_upper = ((below_4g - SEABIOS_HIGH_TABLES - 0x10_0000) / 1024) as u32;
    let mut info = [0u8; 0x74];
    let mut put = |off: usize, v: u32| info[off..off + 4].copy_from_slice(&v.to_le_bytes());
    // flags: memory (0), boot device (1), command line (2), modules (3),
    // memory map (6).
    put(0, 1 | 1 << 1 | 1 << 2 | 1 << 3 | 1 << 6);
    put(4, mem_lower);
    put(8, mem_upper);
    put(12, 0x8000_ffff);
    put(16, CMDLINE_ADDR as u32);
    put(20, 0);
    put(24, 0);
    put(44, mmap.len() as u32);
    put(48, MMAP_ADDR as u32);
    let write =
        |addr: u64, bytes: &[u8]| ram.write(addr, bytes).map_err(|_| place("boot information", INFO_ADDR, EBDA));
    write(INFO_ADDR, &info)?;
    write(MMAP_ADDR, &mmap)?;
    write(CMDLINE_ADDR, &cmdline)?;
    Ok(Flat32Entry { eip: entry, eax: BOOTLOADER_MAGIC, ebx: INFO_ADDR as u32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use topos_runtime::Topology;

    /// A kludge kernel: header at 0, loaded at 1 MiB, 16 bytes of code,
    /// 4 KiB of BSS.
    fn kludge(flags: u32) -> Vec<u8> {
        let flags = flags | 1 << 16;
        let mut k = Vec::new();
        for v in [HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags))] {
            k.extend_from_slice(&v.to_le_bytes());
        }
        for v in [0x10_0000u32, 0x10_0000, 0x10_0030, 0x10_1030, 0x10_0020] {
            k.extend_from_slice(&v.to_le_bytes());
        }
        k.resize(0x30, 0x90);
        k
    }

    #[test]
    fn a_kludge_kernel_is_loaded_and_the_boot_information_written() {
        let topo = Topology::new();
        let ram = topo.new_ram("ram", 16 << 20).unwrap().ram().unwrap();
        ram.write(0x10_0030, &[0xff; 16]).unwrap();
        let k = Kernel { image: kludge(3), path: "k.bin".into(), append: "a b".into() };
        let entry = load(&k, &ram, 16 << 20, 0, MapOptions::default()).unwrap();
        assert_eq!(entry, Flat32Entry { eip: 0x10_0020, eax: BOOTLOADER_MAGIC, ebx: INFO_ADDR as u32 });
        let mut b = [0u8; 0x30];
        ram.read(0x10_0000, &mut b).unwrap();
        assert_eq!(b[..], k.image[..]);
        let mut bss = [1u8; 16];
        ram.read(0x10_0030, &mut bss).unwrap();
        assert_eq!(bss, [0; 16], "BSS is zeroed");
        let mut cmd = [0u8; 10];
        ram.read(CMDLINE_ADDR, &mut cmd).unwrap();
        assert_eq!(&cmd, b"k.bin a b\0");
        let mut info = [0u8; 12];
        ram.read(INFO_ADDR, &mut info).unwrap();
        assert_eq!(u32::from_le_bytes(info[4..8].try_into().unwrap()), 639);
        assert_eq!(u32::from_le_bytes(info[8..12].try_into().unwrap()), ((16 << 20) - 0x20000 - 0x10_0000) / 1024);
    }

    #[test]
    fn bad_kernels_are_refused_with_a_reason() {
        let topo = Topology::new();
        let ram = topo.new_ram("ram", 16 << 20).unwrap().ram().unwrap();
        let k = |image: Vec<u8>| Kernel { image, path: "k".into(), append: String::new() };
        assert_eq!(load(&k(vec![0; 100]), &ram, 16 << 20, 0, MapOptions::default()), Err(MultibootError::NoHeader));
        assert_eq!(
            load(&k(kludge(1 << 5)), &ram, 16 << 20, 0, MapOptions::default()),
            Err(MultibootError::UnsupportedFlags(1 << 5 | 1 << 16))
        );
        // No kludge flag: must be ELF.
        let mut not_elf = kludge(0);
        not_elf[4..8].copy_from_slice(&0u32.to_le_bytes());
        not_elf[8..12].copy_from_slice(&0u32.wrapping_sub(HEADER_MAGIC).to_le_bytes());
        assert!(matches!(load(&k(not_elf), &ram, 16 << 20, 0, MapOptions::default()), Err(MultibootError::BadElf(_))));
        // Loaded beyond RAM.
        assert!(matches!(
            load(&k(kludge(0)), &ram, 1 << 20, 0, MapOptions::default()),
            Err(MultibootError::Placement { .. })
        ));
        // A command line that cannot fit.
        let long = Kernel { image: kludge(0), path: "k".into(), append: "x".repeat(1 << 20) };
        assert!(matches!(
            load(&long, &ram, 16 << 20, 0, MapOptions::default()),
            Err(MultibootError::CmdlineTooLong(_))
        ));
    }

    #[test]
    fn the_memory_map_is_what_qemus_pc_reports() {
        let map = memory_map(256 << 20, 0, MapOptions::default());
        assert_eq!(map[0], (0, 0x9fc00, 1));
        assert_eq!(map[3], (0x10_0000, (256 << 20) - 0x20000 - 0x10_0000, 1));
        assert_eq!(map.len(), 6);
        assert_eq!(memory_map(0xc000_0000, 1 << 30, MapOptions::default()).last(), Some(&(1 << 32, 1 << 30, 1)));
        let kvm_amd = memory_map(0xc000_0000, 1 << 30, MapOptions { kvm: true, amd: true });
        assert_eq!(kvm_amd[5], (0xfeff_c000, 0x4000, 2));
        assert_eq!(kvm_amd[6], (0xfffc_0000, 0x4_0000, 2));
        assert_eq!(kvm_amd[7], (1 << 32, 1 << 30, 1));
        assert_eq!(kvm_amd[8], (0xfd_0000_0000, 0x3_0000_0000, 2));
    }
}
