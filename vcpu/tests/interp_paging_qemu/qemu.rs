//! The QEMU TCG runner: a batch of scenarios in one `qemu-system-x86_64
//! -accel tcg` process (default CPU, `qemu64`).
//!
//! As in the instruction-level differential test, guest RAM is a file
//! shared with QEMU: the runner writes every scenario's image into its own
//! record, and a BIOS made here copies each one in turn to [`BASE`], sets
//! EFER.NXE with `wrmsr` as the scenario asks (and notes what EFER reads
//! back), jumps to the scenario's entry with paging off, and copies the
//! scenario's bytes back into the record when the scenario's end routine
//! returns (through [`off::RET`]). A scenario that shuts QEMU down (a
//! triple fault) is read where it stopped, and the batch goes on in a new
//! QEMU from the next one.

use super::guest::Image;
use super::layout::*;
use super::outcome::{End, Outcome};
use crate::support::harness_asm::{asm, jmp_far};
use crate::support::qemu_shared_ram::{Bios, Config, SharedRamQemu, GDTR, ROM};
use iced_x86::code_asm::*;
use std::os::unix::fs::FileExt;

/// ROM offsets (after the shared skeleton's): the main loop (32-bit) and
/// the way back from a scenario.
const MAIN: u32 = 0x1000;
const BACK: u32 = 0x2000;
/// The harness's GDT (flat code 0x08, flat data 0x10, as the scenarios'),
/// in RAM below 16 MiB (a real-mode `lgdt` loads 24 bits of base).
const GDT: u32 = 0x1000;
const HARNESS_STACK: u32 = 0x8000;
/// The header: the scenario count, the index to run next, then per
/// scenario (16 bytes): EFER.NXE wanted, EFER read back, done.
const HEADER: u32 = 0x10_0000;
const HEADER_SCENARIO: u32 = HEADER + 0x10;
/// The records: the image in, then the bytes out.
const RECORDS: u64 = 0x100_0000;
const RECORD: u64 = 2 * USED as u64;
const EFER: u32 = 0xc000_0080;
const NXE: u32 = 1 << 11;

/// The 64 KiB BIOS image.
fn bios() -> Vec<u8> {
    let mut bios = Bios::new(GDT, 23, SEL_CODE0, MAIN);
    let index = HEADER + 4;
    let segments = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(ax, u32::from(SEL_DATA0))?;
        for s in [ds, es, fs, gs, ss] {
            a.mov(s, ax)?;
        }
        a.mov(esp, HARNESS_STACK)?;
        a.cld()
    };
    bios.put(
        MAIN,
        &asm(32, ROM + MAIN, |a| {
            let mut next = a.create_label();
            let mut done = a.create_label();
            let mut keep = a.create_label();
            segments(a)?;
            a.set_label(&mut next)?;
            a.mov(ebx, dword_ptr(index))?;
            a.cmp(ebx, dword_ptr(HEADER))?;
            a.jae(done)?;
            a.imul_3(esi, ebx, RECORD as i32)?;
            a.add(esi, RECORDS as i32)?;
            a.mov(edi, BASE as u32)?;
            a.mov(ecx, (USED / 4) as u32)?;
            a.rep().movsd()?;
            a.mov(dword_ptr(at(off::RET)), ROM + BACK)?;
            // EFER.NXE as asked, and what EFER reads back.
            a.mov(esi, ebx)?;
            a.shl(esi, 4)?;
            a.add(esi, HEADER_SCENARIO as i32)?;
            a.mov(ecx, EFER)?;
            a.rdmsr()?;
            a.and(eax, !NXE as i32)?;
            a.test(dword_ptr(esi), 1)?;
            a.jz(keep)?;
            a.or(eax, NXE as i32)?;
            a.set_label(&mut keep)?;
            a.wrmsr()?;
            a.rdmsr()?;
            a.mov(dword_ptr(esi + 4), eax)?;
            a.xor(eax, eax)?;
            a.mov(cr4, eax)?;
            a.mov(eax, at(off::MAIN))?;
            a.jmp(eax)?;
            a.set_label(&mut done)?;
            a.mov(al, 0)?;
            a.out(0xf4, al)?;
            a.hlt()
        }),
    );
    bios.put(
        BACK,
        &asm(32, ROM + BACK, |a| {
            a.lgdt(ptr(ROM + GDTR))?;
            jmp_far(a, SEL_CODE0, ROM + BACK + 0x20, true)
        }),
    );
    bios.put(
        BACK + 0x20,
        &asm(32, ROM + BACK + 0x20, |a| {
            segments(a)?;
            a.mov(ebx, dword_ptr(index))?;
            a.mov(esi, BASE as u32)?;
            a.imul_3(edi, ebx, RECORD as i32)?;
            a.add(edi, (RECORDS + USED as u64) as i32)?;
            a.mov(ecx, (USED / 4) as u32)?;
            a.rep().movsd()?;
            a.shl(ebx, 4)?;
            a.mov(dword_ptr(ebx + (HEADER_SCENARIO + 8)), 1)?;
            a.add(dword_ptr(index), 1)?;
            a.jmp(u64::from(ROM + MAIN))
        }),
    );
    bios.image()
}

/// QEMU over a RAM file shared with it.
pub struct QemuRunner(SharedRamQemu);

impl QemuRunner {
    /// The runner, if QEMU is installed (says why not otherwise).
    pub fn new() -> Option<QemuRunner> {
        let config = Config {
            scratch: "topos-paging",
            cpu: "qemu64",
            log_env: "TOPOS_PAGING_QEMU_LOG",
            log: "int,cpu_reset,guest_errors",
        };
        SharedRamQemu::new(config, &bios()).map(QemuRunner)
    }

    /// Runs the scenarios `(nxe, image)`, in one QEMU unless one of them
    /// shuts it down.
    pub fn run(&mut self, scenarios: &[(bool, &Image)]) -> Vec<Outcome> {
        let n = scenarios.len() as u64;
        let ram_size = (RECORDS + n * RECORD).next_multiple_of(1 << 20);
        let (path, file) = self.0.ram_file(ram_size);
        let gdt: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        file.write_all_at(&gdt.iter().flat_map(|d| d.to_le_bytes()).collect::<Vec<_>>(), u64::from(GDT)).unwrap();
        file.write_all_at(&(n as u32).to_le_bytes(), u64::from(HEADER)).unwrap();
        for (i, (nxe, img)) in scenarios.iter().enumerate() {
            let h = u64::from(HEADER_SCENARIO) + 16 * i as u64;
            file.write_all_at(&u32::from(*nxe).to_le_bytes(), h).unwrap();
            file.write_all_at(&img.bytes, RECORDS + i as u64 * RECORD).unwrap();
        }
        let mut outs: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
        let mut first = 0u64;
        while first < n {
            file.write_all_at(&(first as u32).to_le_bytes(), u64::from(HEADER + 4)).unwrap();
            let status = self.0.boot(&path, ram_size).status;
            let mut next = n;
            let mut stopped = false;
            for i in first..n {
                let h = u64::from(HEADER_SCENARIO) + 16 * i;
                let mut hdr = [0u8; 12];
                file.read_exact_at(&mut hdr, h).unwrap();
                let efer = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
                let done = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) == 1;
                if done {
                    assert_eq!(
                        efer & NXE != 0,
                        scenarios[i as usize].0,
                        "QEMU did not take EFER.NXE = {}",
                        scenarios[i as usize].0
                    );
                    let mut bytes = vec![0u8; USED];
                    file.read_exact_at(&mut bytes, RECORDS + i * RECORD + USED as u64).unwrap();
                    outs[i as usize] = Some(Outcome { end: End::Finished, bytes });
                } else {
                    // It stopped QEMU: its bytes are where it ran.
                    let mut bytes = vec![0u8; USED];
                    file.read_exact_at(&mut bytes, BASE).unwrap();
                    let end = match status {
                        Some(0) => End::Shutdown,
                        other => End::Other(format!("QEMU stopped with status {other:?}")),
                    };
                    outs[i as usize] = Some(Outcome { end, bytes });
                    next = i + 1;
                    stopped = true;
                    break;
                }
            }
            if !stopped {
                assert_eq!(status, Some(1), "QEMU did not end the batch through isa-debug-exit");
            }
            first = next;
        }
        let _ = std::fs::remove_file(&path);
        outs.into_iter().map(|o| o.expect("every scenario ran")).collect()
    }
}
