//! Where everything lives in guest-physical memory, and the system tables
//! (GDT, IDTs, TSSs, page tables, fault stubs) every run starts from.
//!
//! One image serves every mode: real mode uses the IVT and the stubs; 32-bit
//! protected mode the 32-bit IDT, GDT and TSS; ring 3 under long mode the
//! page tables, the 64-bit IDT and TSS. The CPU sets no Accessed bit in them
//! (they are preset), so nothing here is written by a run except a fault's
//! frame on the ring-0 stack.

/// Real-mode interrupt vector table.
pub const IVT: u64 = 0;
/// Long mode: the PML4 (identity map, user-accessible, 2 MiB pages).
pub const PML4: u64 = 0x1000;
/// Long mode: the page-directory-pointer table.
pub const PDPT: u64 = 0x2000;
/// The page directory (2 MiB pages) shared by long mode and PAE.
pub const PD: u64 = 0x3000;
/// PAE paging: the four-entry PDPT (32-byte aligned).
pub const PAE_PDPT: u64 = 0x3800;
/// The GDT (see the selectors below).
pub const GDT: u64 = 0x4000;
/// Its limit.
pub const GDT_LIMIT: u16 = 0x5f;
/// The 64-bit IDT (vectors 0-31).
pub const IDT64: u64 = 0x5000;
/// The 32-bit IDT (vectors 0-31).
pub const IDT32: u64 = 0x6000;
/// The 64-bit TSS (`rsp0` = [`RING0_STACK_TOP`]).
pub const TSS64: u64 = 0x7000;
/// The 32-bit TSS (`ss0:esp0` = 0x10:[`RING0_STACK_TOP`]).
pub const TSS32: u64 = 0x7100;
/// Vector `v`'s stub, at `STUBS + 4 v`: `out 0xc0 + v, al; hlt` (the same
/// bytes in 16-, 32- and 64-bit code).
pub const STUBS: u64 = 0x8000;
/// Top of the stack a fault in ring 3 switches to.
pub const RING0_STACK_TOP: u64 = 0xa000;
/// Where a case's code is assembled to run.
pub const CODE: u64 = 0x1_0000;
/// The most code a case may have.
pub const CODE_MAX: usize = 0x8000;
/// The data window: every memory operand, string operation and the stack
/// land in it; it is compared after each run.
pub const WINDOW: u64 = 0x2_0000;
/// Its size (one real-mode segment).
pub const WINDOW_SIZE: usize = 0x1_0000;
/// The RAM the machines have.
pub const RAM_SIZE: u64 = 0x20_0000;

/// The port a case's last instruction (`out TERMINATOR_PORT, al`) writes.
pub const TERMINATOR_PORT: u16 = 0xe0;
/// The port vector `v`'s stub writes: `FAULT_PORT_BASE + v`.
pub const FAULT_PORT_BASE: u16 = 0xc0;
/// How many vectors have stubs.
pub const VECTORS: u8 = 32;

/// Ring-0 64-bit code.
pub const SEL_CODE64: u16 = 0x08;
/// Ring-0 data (flat, 32-bit).
pub const SEL_DATA0: u16 = 0x10;
/// Ring-0 32-bit code (flat).
pub const SEL_CODE32: u16 = 0x18;
/// Ring-3 32-bit code (flat): Linux's `__USER32_CS`, which PVM runs
/// natively.
pub const SEL_CODE32_R3: u16 = 0x20 | 3;
/// Ring-3 data (flat, 32-bit): Linux's `__USER_DS`.
pub const SEL_DATA3: u16 = 0x28 | 3;
/// Ring-3 64-bit code: Linux's `__USER_CS`.
pub const SEL_CODE64_R3: u16 = 0x30 | 3;
/// The 32-bit TSS (busy).
pub const SEL_TSS32: u16 = 0x38;
/// The 64-bit TSS (busy; two slots).
pub const SEL_TSS64: u16 = 0x40;

/// The GDT's descriptors, in selector order.
fn gdt() -> Vec<u64> {
    let tss32 = system_descriptor(TSS32, 0x67, 0xb);
    let tss64 = system_descriptor(TSS64, 0x67, 0xb);
    vec![
        0,
        0x00af_9b00_0000_ffff, // 0x08: code, 64-bit, DPL 0, accessed
        0x00cf_9300_0000_ffff, // 0x10: data, DPL 0, accessed
        0x00cf_9b00_0000_ffff, // 0x18: code, 32-bit, DPL 0, accessed
        0x00cf_fb00_0000_ffff, // 0x20: code, 32-bit, DPL 3, accessed
        0x00cf_f300_0000_ffff, // 0x28: data, DPL 3, accessed
        0x00af_fb00_0000_ffff, // 0x30: code, 64-bit, DPL 3, accessed
        tss32,                 // 0x38
        tss64,                 // 0x40 (low half)
        TSS64 >> 32,           // 0x48 (high half)
        0,
        0,
    ]
}

/// A present, DPL-0 system descriptor (`type_` 0xb: busy TSS) with byte
/// granularity.
fn system_descriptor(base: u64, limit: u32, type_: u64) -> u64 {
    let limit = u64::from(limit);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((type_ | 0x80) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

/// A 64-bit interrupt gate to `SEL_CODE64:target` (DPL 3 for the
/// vectors software may raise from ring 3, `int3` and `into`).
fn gate64(vector: u8, target: u64) -> [u8; 16] {
    let dpl: u64 = if matches!(vector, 3 | 4) { 3 } else { 0 };
    let low = (target & 0xffff)
        | (u64::from(SEL_CODE64) << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | (((target >> 16) & 0xffff) << 48);
    let high = target >> 32;
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&low.to_le_bytes());
    g[8..].copy_from_slice(&high.to_le_bytes());
    g
}

/// A 32-bit interrupt gate to `SEL_CODE32:target`.
fn gate32(vector: u8, target: u64) -> [u8; 8] {
    let dpl: u64 = if matches!(vector, 3 | 4) { 3 } else { 0 };
    let g = (target & 0xffff)
        | (u64::from(SEL_CODE32) << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | (((target >> 16) & 0xffff) << 48);
    g.to_le_bytes()
}

/// The system image: `(address, bytes)` pieces to copy into RAM before
/// every run (a run may have overwritten a ring-0 stack frame).
pub fn system_image() -> Vec<(u64, Vec<u8>)> {
    let mut pieces = Vec::new();
    // Real mode: vector v → 0000:(STUBS + 4v).
    let ivt: Vec<u8> = (0..VECTORS).flat_map(|v| ((STUBS as u32) + 4 * u32::from(v)).to_le_bytes()).collect();
    pieces.push((IVT, ivt));
    // Identity map of the first GiB, user-accessible, 2 MiB pages:
    // present | writable | user (| page size).
    pieces.push((PML4, (PDPT | 7).to_le_bytes().to_vec()));
    pieces.push((PDPT, (PD | 7).to_le_bytes().to_vec()));
    let pd: Vec<u8> = (0..512u64).flat_map(|i| ((i << 21) | 0x87).to_le_bytes()).collect();
    pieces.push((PD, pd));
    // PAE: PDPTEs have only the present bit (the rest is reserved).
    let pae: Vec<u8> = [PD | 1, 0, 0, 0].iter().flat_map(|e| e.to_le_bytes()).collect();
    pieces.push((PAE_PDPT, pae));
    pieces.push((GDT, gdt().iter().flat_map(|d| d.to_le_bytes()).collect()));
    let stub = |v: u8| STUBS + 4 * u64::from(v);
    pieces.push((IDT64, (0..VECTORS).flat_map(|v| gate64(v, stub(v))).collect()));
    pieces.push((IDT32, (0..VECTORS).flat_map(|v| gate32(v, stub(v))).collect()));
    let mut tss64 = vec![0u8; 0x68];
    tss64[4..12].copy_from_slice(&RING0_STACK_TOP.to_le_bytes());
    tss64[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes()); // no I/O bitmap
    pieces.push((TSS64, tss64));
    let mut tss32 = vec![0u8; 0x68];
    tss32[4..8].copy_from_slice(&(RING0_STACK_TOP as u32).to_le_bytes());
    tss32[8..10].copy_from_slice(&SEL_DATA0.to_le_bytes());
    tss32[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    pieces.push((TSS32, tss32));
    let stubs: Vec<u8> = (0..VECTORS).flat_map(|v| [0xe6, FAULT_PORT_BASE as u8 + v, 0xf4, 0xf4]).collect();
    pieces.push((STUBS, stubs));
    // The ring-0 stack, cleared.
    pieces.push((RING0_STACK_TOP - 0x1000, vec![0; 0x1000]));
    pieces
}
