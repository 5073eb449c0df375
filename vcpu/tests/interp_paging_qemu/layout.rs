//! Where a scenario lives in guest-physical memory.
//!
//! A scenario owns [`USED`] bytes at [`BASE`] (4 MiB, so that a 4 MiB or
//! 2 MiB page whose frame is `BASE` maps the scenario itself): the system
//! part ([`SYSTEM`] bytes: descriptor tables, code, handlers, results,
//! stacks and the page directories) and the pool ([`POOL`]: sixteen 4 KiB
//! frames that the test's page tables and data live in). The system part
//! is identity-mapped by entries no test access can reach, so the handlers
//! always run; every entry a test can write points into the pool (see
//! [`super::gen`]).

/// Where the scenario is: 4 MiB (the second 4 MiB page, the third 2 MiB
/// page).
pub const BASE: u64 = 0x40_0000;
/// The bytes of a scenario (system part and pool); what is compared.
pub const USED: usize = 0x3_0000;
/// The system part's size.
pub const SYSTEM: u64 = 0x2_0000;
/// The pool: 16 frames in one 64 KiB-aligned block, so that an entry whose
/// upper 16 bits name the block points into it whatever its lower bits.
pub const POOL: u64 = BASE + SYSTEM;
/// Pool frames.
pub const POOL_FRAMES: u64 = 16;
/// Pool frames that hold code (`ret`, or `inc eax; ret` pairs) for fetches;
/// they are never written and never used as page tables.
pub const CODE_FRAMES: [u64; 2] = [14, 15];

/// Offsets (from [`BASE`]) of the system part.
pub mod off {
    /// The GDT (see the selectors), then the GDTR and IDTR
    /// pseudo-descriptors.
    pub const GDT: u64 = 0x0;
    pub const GDTR: u64 = 0x80;
    pub const IDTR: u64 = 0x88;
    /// The 32-bit TSS.
    pub const TSS: u64 = 0x100;
    /// The IDT (vectors 0 to 0x30).
    pub const IDT: u64 = 0x800;
    /// The ring-0 code of the scenario (entered with paging off).
    pub const MAIN: u64 = 0x1000;
    /// Its largest size.
    pub const MAIN_MAX: usize = 0x7000;
    /// The handlers and the end routine.
    pub const HANDLERS: u64 = 0x8000;
    /// Ring-3 code (user, read-only): a `ret` first, then the blocks.
    pub const USER: u64 = 0x9000;
    /// Its largest size.
    pub const USER_MAX: usize = 0x2000;
    /// The ring-3 stack page (user, writable).
    pub const USER_STACK: u64 = 0xb000;
    /// The results: the registers at the end, the #PF count, flags, the
    /// harness's return address, then the records.
    pub const REGS: u64 = 0xc000;
    pub const COUNT: u64 = 0xc040;
    pub const ABORTED: u64 = 0xc044;
    /// Where the end routine jumps (written by the runner; not compared).
    pub const RET: u64 = 0xc048;
    /// Where the ring-3 return gate goes on.
    pub const CONT: u64 = 0xc04c;
    pub const RECORDS: u64 = 0xc100;
    /// The fix-up table: (EIP, resume EIP, entry to fix, bits to set).
    pub const FIXUPS: u64 = 0xe000;
    /// The ring-0 stack (not compared: fault frames hold EFLAGS.RF, which
    /// QEMU does not set).
    pub const STACK: u64 = 0xf000;
    /// The page directories (32-bit paging: A and B).
    pub const PD_A: u64 = 0x1_0000;
    pub const PD_B: u64 = 0x1_1000;
    /// The page table mapping the scenario's first 4 MiB or 2 MiB.
    pub const SYS_PT: u64 = 0x1_2000;
    /// PAE: the page-directory-pointer tables A and B.
    pub const PDPT_A: u64 = 0x1_3000;
    pub const PDPT_B: u64 = 0x1_3020;
    /// PAE: the page directories (PD0-PD3 for PDPT A; PD4 is B's first).
    pub const PAE_PD: u64 = 0x1_4000;
}

/// The size of a #PF (or unexpected exception) record: vector, error code,
/// CR2, EIP, CS, step (EBP), CR3, zero.
pub const RECORD: u64 = 32;
/// The most records kept.
pub const MAX_RECORDS: u32 = ((off::FIXUPS - off::RECORDS) / RECORD) as u32;
/// The size of a fix-up entry.
pub const FIXUP: u64 = 16;
/// The most fix-up entries (one zero entry ends the table).
pub const MAX_FIXUPS: usize = (0x1000 / FIXUP) as usize - 1;

/// Selectors of the scenario's GDT.
pub const SEL_CODE0: u16 = 0x08;
pub const SEL_DATA0: u16 = 0x10;
pub const SEL_CODE3: u16 = 0x18 | 3;
pub const SEL_DATA3: u16 = 0x20 | 3;
pub const SEL_TSS: u16 = 0x28;
/// The vector ring 3 returns through.
pub const RETURN_VECTOR: u8 = 0x30;

/// The absolute address of a system-part offset.
pub const fn at(offset: u64) -> u32 {
    (BASE + offset) as u32
}

/// The top of the ring-0 stack.
pub const STACK_TOP: u32 = at(off::STACK) + 0x1000;
/// The top of the ring-3 stack.
pub const USER_STACK_TOP: u32 = at(off::USER_STACK) + 0x1000;

/// Whether `offset` (from [`BASE`]) is compared after a run: everything but
/// the ring-0 stack and the harness's return address.
pub fn compared(offset: usize) -> bool {
    let o = offset as u64;
    !(off::STACK..off::STACK + 0x1000).contains(&o) && !(off::RET..off::RET + 4).contains(&o)
}

/// What the scenario's part of the image holds before paging: the GDT, the
/// pseudo-descriptors, the TSS and the IDT (`handler(v)`: vector `v`'s
/// handler).
pub fn descriptor_tables(image: &mut [u8], handler: impl Fn(u8) -> u32) {
    let tss = BASE + off::TSS;
    let tss_desc = 0x67 | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56);
    let gdt: [u64; 6] = [
        0,
        0x00cf_9b00_0000_ffff, // 0x08: code, ring 0, accessed
        0x00cf_9300_0000_ffff, // 0x10: data, ring 0, accessed
        0x00cf_fb00_0000_ffff, // 0x18: code, ring 3, accessed
        0x00cf_f300_0000_ffff, // 0x20: data, ring 3, accessed
        tss_desc,              // 0x28: available 32-bit TSS
    ];
    put(image, off::GDT, &gdt.iter().flat_map(|d| d.to_le_bytes()).collect::<Vec<_>>());
    let mut gdtr = ((gdt.len() * 8 - 1) as u16).to_le_bytes().to_vec();
    gdtr.extend(at(off::GDT).to_le_bytes());
    put(image, off::GDTR, &gdtr);
    let vectors = u16::from(RETURN_VECTOR) + 1;
    let mut idtr = (vectors * 8 - 1).to_le_bytes().to_vec();
    idtr.extend(at(off::IDT).to_le_bytes());
    put(image, off::IDTR, &idtr);
    let mut t = vec![0u8; 0x68];
    t[4..8].copy_from_slice(&STACK_TOP.to_le_bytes());
    t[8..10].copy_from_slice(&SEL_DATA0.to_le_bytes());
    t[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    put(image, off::TSS, &t);
    for v in 0..=RETURN_VECTOR {
        if (32..RETURN_VECTOR).contains(&v) {
            continue;
        }
        let target = u64::from(handler(v));
        let dpl: u64 = if v == RETURN_VECTOR { 3 } else { 0 };
        let gate = (target & 0xffff)
            | (u64::from(SEL_CODE0) << 16)
            | ((0x8e | (dpl << 5)) << 40)
            | (((target >> 16) & 0xffff) << 48);
        put(image, off::IDT + 8 * u64::from(v), &gate.to_le_bytes());
    }
}

/// Copies `bytes` to `offset` (from [`BASE`]) in `image`.
pub fn put(image: &mut [u8], offset: u64, bytes: &[u8]) {
    let o = offset as usize;
    image[o..o + bytes.len()].copy_from_slice(bytes);
}
