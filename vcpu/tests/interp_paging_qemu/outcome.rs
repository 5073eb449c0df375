//! How a scenario ended on one runner, and comparing two ends: the
//! registers, the #PF records, the fix-up table, the page tables and the
//! pool (data and entries, Accessed and Dirty bits included), all but
//! the bits the scenario leaves implementation-specific.

use super::gen::{error_code_name, Expect, Scenario};
use super::layout::*;
use super::model::Paging;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The end routine ran and returned.
    Finished,
    /// A triple fault.
    Shutdown,
    /// Anything else (the runner says what).
    Other(String),
}

/// A run's end and the scenario's bytes afterwards.
pub struct Outcome {
    pub end: End,
    pub bytes: Vec<u8>,
}

impl Outcome {
    fn word(&self, offset: u64) -> u32 {
        let o = offset as usize;
        u32::from_le_bytes(self.bytes[o..o + 4].try_into().unwrap())
    }

    /// Whether an exception other than #PF ended the scenario.
    pub fn aborted(&self) -> bool {
        self.word(off::ABORTED) != 0
    }

    /// The #PF (and other exception) records.
    pub fn records(&self) -> Vec<[u32; 7]> {
        let n = self.word(off::COUNT).min(MAX_RECORDS);
        (0..u64::from(n))
            .map(|i| std::array::from_fn(|f| self.word(off::RECORDS + i * RECORD + 4 * f as u64)))
            .collect()
    }
}

/// Names a compared offset's place, for reports.
fn place(paging: Paging, o: u64) -> String {
    let w = paging.entry();
    let entry = |base: u64, name: &str| format!("{name}[{:#x}]", (o - base) / w);
    match o {
        _ if o < off::MAIN => "descriptor tables".into(),
        _ if o < off::REGS => "code".into(),
        _ if o < off::REGS + 0x34 => {
            let names = ["EAX", "ECX", "EDX", "EBX", "ESP", "EBP", "ESI", "EDI", "EFLAGS", "CR0", "CR2", "CR3", "CR4"];
            names[((o - off::REGS) / 4) as usize].into()
        }
        _ if o < off::RECORDS => "#PF count / abort flag".into(),
        _ if o < off::FIXUPS => {
            let fields = ["vector", "error code", "CR2", "EIP", "CS", "step", "CR3", "-"];
            let r = (o - off::RECORDS) / RECORD;
            format!("record {r} {}", fields[((o - off::RECORDS) % RECORD / 4) as usize])
        }
        _ if o < off::STACK => "fix-up table".into(),
        _ if o < SYSTEM => match paging {
            Paging::Legacy { .. } if o < off::PD_B => entry(off::PD_A, "PD_A"),
            Paging::Legacy { .. } if o < off::SYS_PT => entry(off::PD_B, "PD_B"),
            _ if (off::SYS_PT..off::SYS_PT + 0x1000).contains(&o) => entry(off::SYS_PT, "system PT"),
            Paging::Pae { .. } if o < off::PAE_PD => "PDPT".into(),
            Paging::Pae { .. } => {
                let k = (o - off::PAE_PD) / 0x1000;
                entry(off::PAE_PD + k * 0x1000, &format!("PD{k}"))
            }
            _ => "system".into(),
        },
        _ => {
            let f = (o - SYSTEM) / 0x1000;
            format!("pool frame {f} entry {:#x}", (o - SYSTEM) % 0x1000 / w)
        }
    }
}

/// The differences between `a` and `b` (named `names`), at most `max`.
pub fn differences(s: &Scenario, (a, b): (&Outcome, &Outcome), names: (&str, &str), max: usize) -> Vec<String> {
    let mut out = vec![];
    if a.end != b.end {
        out.push(format!("end: {} {:?}, {} {:?}", names.0, a.end, names.1, b.end));
    }
    let mut o = 0;
    while o < USED && out.len() < max {
        // Entries in the page tables and the pool, words elsewhere.
        let w = if o < off::PD_A as usize { 4 } else { s.paging.entry() as usize };
        if a.bytes[o..o + w] == b.bytes[o..o + w] {
            o += w;
            continue;
        }
        // Masking what is undefined.
        let mut differ = false;
        for i in o..o + w {
            let mask = !s.undefined.get(&i).copied().unwrap_or(0);
            if compared(i) && (a.bytes[i] ^ b.bytes[i]) & mask != 0 {
                differ = true;
            }
        }
        if differ {
            let v = |x: &Outcome| x.bytes[o..o + w].iter().rev().fold(0u64, |v, &b| (v << 8) | u64::from(b));
            let masked = match s.undefined.get(&o) {
                Some(m) => format!(" (bits {m:#x} of byte 0 not compared)"),
                None => String::new(),
            };
            out.push(format!(
                "{} (pa {:#x}): {} {:#x}, {} {:#x}{masked}",
                place(s.paging, o as u64),
                BASE + o as u64,
                names.0,
                v(a),
                names.1,
                v(b)
            ));
        }
        o += w;
    }
    out
}

/// The records as a table.
pub fn records_table(o: &Outcome) -> String {
    let mut s = String::new();
    for r in o.records() {
        s.push_str(&format!(
            "    step {:>3}: vector {:>2} code {:#04x} ({}) CR2 {:#010x} EIP {:#010x} CS {:#x} CR3 {:#x}\n",
            r[5],
            r[0],
            r[1],
            error_code_name(r[1]),
            r[2],
            r[3],
            r[4],
            r[6]
        ));
    }
    if s.is_empty() {
        s.push_str("    (none)\n");
    }
    s
}

/// Where the model's expected #PFs differ from `o`'s records, if they do.
pub fn model_difference(expect: &[Expect], access_eip: &[Option<u32>], o: &Outcome) -> Option<String> {
    let got = o.records();
    for (i, e) in expect.iter().enumerate() {
        let eip = if e.fetch { e.cr2 } else { access_eip[e.step as usize].unwrap_or(0) };
        let cs = u32::from(if e.user { SEL_CODE3 } else { SEL_CODE0 });
        let want = [14, e.code, e.cr2, eip, cs, e.step];
        match got.get(i) {
            Some(r) if r[..6] == want => {}
            Some(r) => return Some(format!("record {i}: expected {want:#x?}, got {:#x?}", &r[..6])),
            None => return Some(format!("record {i}: expected {want:#x?}, got none")),
        }
    }
    (got.len() > expect.len()).then(|| format!("{} records more than expected", got.len() - expect.len()))
}
