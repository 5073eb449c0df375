//! The one way building the firmware can fail: the assembler rejects an
//! instruction, or a part outgrows the room the layout gives it.

use iced_x86::IcedError;

/// Why [`bios_image`](super::bios_image) could not build the image.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// iced-x86 refused an instruction or a label (a bug in the firmware
    /// source, never a property of the machine it will run on).
    #[error("the assembler rejected the firmware code")]
    Assemble(#[from] IcedError),
    /// A part of the image is larger than the slot the layout reserves.
    #[error("{part} takes {size} bytes but its slot holds {max}")]
    TooLarge {
        /// Which part (for instance "32-bit code").
        part: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The room the layout gives it.
        max: usize,
    },
}

/// Results of building the firmware.
pub type Result<T> = std::result::Result<T, FirmwareError>;
