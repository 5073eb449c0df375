//! Topology changes under running vCPUs (not yet: the reader returns at
//! once).

use super::asm::Asm;
use super::error::Result;

/// Emits `remap_reader`.
pub(crate) fn emit_routines(a: &mut Asm) -> Result<()> {
    a.bind_routine(|r| &mut r.remap_reader)?;
    a.ret()?;
    Ok(())
}
