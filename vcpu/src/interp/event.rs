//! Why an instruction did not complete: an exception for the guest, or
//! something that leaves the interpreter loop.

/// The outcome of an instruction that did not simply retire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A fault or trap to deliver through the IVT/IDT; EIP still points at
    /// the faulting instruction (faults) or was already advanced (traps,
    /// software interrupts).
    Exception {
        /// The vector.
        vector: u8,
        /// The error code pushed with it, if the vector has one.
        code: Option<u32>,
    },
    /// `int n`/`into`/`int3`: a software interrupt (EIP already advanced).
    SoftInt(u8),
    /// `hlt` (EIP already advanced).
    Halt,
    /// The guest shut the machine down (a triple fault).
    Shutdown,
    /// An access the VM's policy stops on (recorded in the `VcpuIo`).
    AccessFault,
}

/// Exception vectors.
pub(crate) mod vector {
    /// Divide error.
    pub(crate) const DE: u8 = 0;
    /// Debug (single-step).
    pub(crate) const DB: u8 = 1;
    /// BOUND range exceeded.
    pub(crate) const BR: u8 = 5;
    /// Invalid opcode.
    pub(crate) const UD: u8 = 6;
    /// Device not available.
    pub(crate) const NM: u8 = 7;
    /// Double fault.
    pub(crate) const DF: u8 = 8;
    /// Invalid TSS.
    pub(crate) const TS: u8 = 10;
    /// Segment not present.
    pub(crate) const NP: u8 = 11;
    /// Stack-segment fault.
    pub(crate) const SS: u8 = 12;
    /// General protection.
    pub(crate) const GP: u8 = 13;
    /// Alignment check.
    pub(crate) const AC: u8 = 17;
}

impl Event {
    pub(crate) fn exception(vector: u8, code: Option<u32>) -> Event {
        Event::Exception { vector, code }
    }
}

/// `#GP(code)`.
#[inline]
pub(crate) fn gp(code: u32) -> Event {
    Event::exception(vector::GP, Some(code))
}

/// `#SS(code)`.
#[inline]
pub(crate) fn ss(code: u32) -> Event {
    Event::exception(vector::SS, Some(code))
}

/// `#NP(code)`.
#[inline]
pub(crate) fn np(code: u32) -> Event {
    Event::exception(vector::NP, Some(code))
}

/// `#TS(code)`.
#[inline]
pub(crate) fn ts(code: u32) -> Event {
    Event::exception(vector::TS, Some(code))
}

/// `#UD`.
#[inline]
pub(crate) fn ud() -> Event {
    Event::exception(vector::UD, None)
}

/// `#DE`.
#[inline]
pub(crate) fn de() -> Event {
    Event::exception(vector::DE, None)
}

/// The result type of everything an instruction does.
pub(crate) type Step<T = ()> = Result<T, Event>;
