//! Mutators of the attributes rendering reads: alias offset, readonly, romd
//! mode and the dirty-log mask.

use super::{MemoryRegion, RegionState};
use crate::error::{Error, Result};
use crate::transaction::Damage;
use crate::types::{DirtyClient, HwAddr};

impl MemoryRegion {
    /// Changes one attribute that rendering reads: nothing happens if the
    /// value does not change; otherwise a commit is due (if the region is
    /// enabled, QEMU's rule) and the region is re-rendered where it shows.
    fn update_attr<T: PartialEq + Copy>(
        &self,
        field: fn(&mut RegionState) -> &mut T,
        new: impl FnOnce(T) -> T,
    ) -> Result<()> {
        self.mutate(|topo| {
            let mut st = self.state();
            let slot = field(&mut st);
            let value = new(*slot);
            if *slot == value {
                return Ok(());
            }
            *slot = value;
            let pending = st.enabled;
            drop(st);
            topo.record(|i| {
                i.changed(pending);
                i.damage(Damage::Region(self.clone()));
            });
            Ok(())
        })
    }

    /// `memory_region_set_alias_offset`.
    pub fn set_alias_offset(&self, offset: HwAddr) -> Result<()> {
        if !self.is_alias() {
            return Err(Error::WrongKind { region: self.name().to_string(), expected: "an alias" });
        }
        self.update_attr(|st| &mut st.alias_offset, |_| offset)
    }

    /// `memory_region_set_readonly`.
    pub fn set_readonly(&self, readonly: bool) -> Result<()> {
        self.update_attr(|st| &mut st.readonly, |_| readonly)
    }

    /// `memory_region_rom_device_set_readable` (modern `set_romd`): in romd
    /// mode reads come straight from the backing RAM; otherwise they reach
    /// the ops too.
    pub fn rom_device_set_readable(&self, readable: bool) -> Result<()> {
        if !self.is_rom_device() {
            return Err(Error::WrongKind { region: self.name().to_string(), expected: "a ROM device" });
        }
        self.update_attr(|st| &mut st.romd, |_| readable)
    }

    /// `memory_region_set_log`: turns dirty logging for one client on or off.
    /// A call that changes nothing triggers nothing.
    pub fn set_log(&self, log: bool, client: DirtyClient) -> Result<()> {
        let bit = client.mask();
        self.update_attr(|st| &mut st.dirty_log_mask, |m| if log { m | bit } else { m & !bit })
    }
}
