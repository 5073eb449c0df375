//! The 8254 programmable interval timer of a PC (ports `0x40`-`0x43`) and
//! the port-`0x61` bits that belong to it (channel 2's gate and output, the
//! speaker data enable, the refresh toggle).
//!
//! A pure state machine over an explicit time in nanoseconds (the
//! [`Irqchip`](super::Irqchip) passes its clock's); counts are derived from
//! that time at 1.193182 MHz, so nothing needs polling. Behaviour follows
//! the 8254 datasheet as QEMU's `pc` and KVM's in-kernel PIT implement it:
//!
//! * three channels; the control word selects a channel's access mode
//!   (LSB, MSB, LSB then MSB), its mode (0-5; 6 and 7 are 2 and 3) and
//!   BCD (recorded and reported, but counting stays binary, as in QEMU and
//!   KVM; traced); a count of 0 means 65536;
//! * the counter-latch command and the read-back command (count and/or
//!   status of several channels at once; a latched value is read once,
//!   and a second latch before it is read is ignored);
//! * counts read back as the channel counts down (modes 0, 1, 4, 5 wrap
//!   at 0; mode 2 reloads; mode 3 counts down by two twice per period),
//!   and each channel's OUT as the datasheet's waveforms give it;
//! * gates: channels 0 and 1 are always enabled; channel 2's gate is port
//!   `0x61` bit 0, and a rising edge restarts counting in modes 1, 2, 3
//!   and 5 (in modes 0 and 4 a low gate does not pause counting, as in
//!   QEMU and KVM);
//! * OUT follows the datasheet's waveforms in every mode (QEMU and KVM
//!   invert modes 1, 2, 4 and 5; only reads of the status byte and of
//!   port `0x61` show OUT, and firmware reads it in mode 0, where all
//!   agree);
//! * a count written restarts counting at once in every mode (as in QEMU
//!   and KVM; the datasheet has modes 2 and 3 take it at the next reload);
//! * channel 0 drives ISA IRQ 0 with one pulse per expiry, as KVM's PIT
//!   does: once at terminal count in modes 0, 1 and 4, every period in
//!   modes 2 and 3 (a period is at least [`MIN_PERIOD_NS`](super::clock::MIN_PERIOD_NS), KVM's
//!   `min_timer_period_us`, so a guest cannot make the host spin; expiries
//!   the host missed are not made up for). As on KVM, channel 0 gives no
//!   interrupt until a count is written to it after reset.

/// The PIT's input clock, in Hz.
pub(crate) const PIT_HZ: u64 = 1_193_182;

use super::clock::{next_period, period_of};

const NS_PER_S: u128 = 1_000_000_000;

/// Whole PIT ticks in `ns` nanoseconds.
fn ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / NS_PER_S) as u64
}

/// The time `t` ticks take, in nanoseconds (rounded up: the tick has
/// happened by then).
fn ns_for(t: u64) -> u64 {
    (u128::from(t) * NS_PER_S).div_ceil(u128::from(PIT_HZ)) as u64
}

/// Read/write states of a channel (the datasheet's byte pointer).
const RW_LSB: u8 = 1;
const RW_MSB: u8 = 2;
const RW_WORD0: u8 = 3;
const RW_WORD1: u8 = 4;

#[derive(Debug, Clone)]
struct Channel {
    /// The count loaded (1-65536).
    count: u32,
    /// When it was loaded (or the gate last triggered), in ns.
    load: u64,
    /// Mode 0-5.
    mode: u8,
    bcd: bool,
    /// Access mode of the control word (1: LSB, 2: MSB, 3: LSB then MSB;
    /// 0 until the first control word, read and written as LSB).
    rw_mode: u8,
    read_state: u8,
    write_state: u8,
    /// The LSB of a two-byte count write.
    write_latch: u8,
    /// A latched count and its read state, until read.
    latched: Option<(u16, u8)>,
    /// A latched status byte, until read.
    status: Option<u8>,
    gate: bool,
}

impl Channel {
    fn new(gate: bool, now: u64) -> Channel {
        Channel {
            count: 0x10000,
            load: now,
            mode: 3,
            bcd: false,
            rw_mode: 0,
            read_state: 0,
            write_state: 0,
            write_latch: 0,
            latched: None,
            status: None,
            gate,
        }
    }

    /// Ticks since the count was loaded.
    fn elapsed(&self, now: u64) -> u64 {
        ticks(now.saturating_sub(self.load))
    }

    /// The counting element now (before truncation to 16 bits).
    fn counter(&self, now: u64) -> u64 {
        let d = self.elapsed(now);
        let count = u64::from(self.count);
        match self.mode {
            2 => count - d % count,
            3 => count - (2 * d) % count,
            _ => count.wrapping_sub(d) & 0xffff,
        }
    }

    /// The OUT pin now.
    fn out(&self, now: u64) -> bool {
        let d = self.elapsed(now);
        let count = u64::from(self.count);
        match self.mode {
            // Low while counting, high from terminal count on (mode 1:
            // from the trigger, which is the load here).
            0 | 1 => d >= count,
            // Low for the one clock before each reload.
            2 => d % count != count - 1,
            // High for the first half of each period (the larger half when
            // the count is odd).
            3 => d % count < count.div_ceil(2),
            // A one-clock low strobe at terminal count.
            _ => d != count,
        }
    }

    fn latch_count(&mut self, now: u64) {
        if self.latched.is_none() {
            self.latched = Some((self.counter(now) as u16, self.rw_mode.max(RW_LSB)));
        }
    }

    fn latch_status(&mut self, now: u64) {
        if self.status.is_none() {
            self.status = Some(
                u8::from(self.out(now)) << 7 | (self.rw_mode & 3) << 4 | (self.mode & 7) << 1 | u8::from(self.bcd),
            );
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(status) = self.status.take() {
            return status;
        }
        if let Some((value, state)) = self.latched {
            return match state {
                RW_MSB => {
                    self.latched = None;
                    (value >> 8) as u8
                }
                RW_WORD0 => {
                    self.latched = Some((value, RW_MSB));
                    value as u8
                }
                _ => {
                    self.latched = None;
                    value as u8
                }
            };
        }
        let count = self.counter(now) as u16;
        match self.read_state {
            RW_MSB => (count >> 8) as u8,
            RW_WORD0 => {
                self.read_state = RW_WORD1;
                count as u8
            }
            RW_WORD1 => {
                self.read_state = RW_WORD0;
                (count >> 8) as u8
            }
            _ => count as u8,
        }
    }
}

/// The 8254 (see the [module](self) documentation).
#[derive(Debug, Clone)]
pub(crate) struct Pit {
    channels: [Channel; 3],
    /// Port `0x61` bit 1: speaker data enable.
    speaker_data: bool,
    /// Channel 0's next interrupt, in ns.
    next_irq: Option<u64>,
    /// Channel 0's interrupt period, for the periodic modes.
    period: Option<u64>,
    /// BCD counting was asked for (traced once).
    bcd_traced: bool,
}

impl Pit {
    /// The PIT at power-on, `now` ns into the clock: every channel in
    /// mode 3 with a count of 65536, channel 2's gate low, no interrupt
    /// armed.
    pub(crate) fn new(now: u64) -> Pit {
        Pit {
            channels: [Channel::new(true, now), Channel::new(true, now), Channel::new(false, now)],
            speaker_data: false,
            next_irq: None,
            period: None,
            bcd_traced: false,
        }
    }

    /// When channel 0 next interrupts (a time of the clock, in ns).
    pub(crate) fn deadline(&self) -> Option<u64> {
        self.next_irq
    }

    /// Called at or after [`deadline`](Self::deadline): whether channel 0
    /// pulses IRQ 0 now. Schedules the next period (skipping any the host
    /// missed).
    pub(crate) fn expire(&mut self, now: u64) -> bool {
        match self.next_irq {
            Some(at) if at <= now => {
                self.next_irq = self.period.map(|p| next_period(at, now, p));
                true
            }
            _ => false,
        }
    }

    /// Arms channel 0's interrupt after a count was loaded or the gate
    /// triggered.
    fn arm_channel0(&mut self) {
        let c = &self.channels[0];
        let span = ns_for(u64::from(c.count));
        (self.next_irq, self.period) = match c.mode {
            0 | 1 | 4 => (Some(c.load + span), None),
            2 | 3 => {
                let period = period_of(span, "8254 channel 0");
                (Some(c.load + period), Some(period))
            }
            _ => (None, None),
        };
    }

    fn load(&mut self, channel: usize, value: u32, now: u64) {
        let c = &mut self.channels[channel];
        c.count = if value == 0 { 0x10000 } else { value };
        c.load = now;
        if channel == 0 {
            self.arm_channel0();
        }
    }

    /// A guest read of port `0x40 + port` (the control port reads 0).
    pub(crate) fn read(&mut self, port: u8, now: u64) -> u8 {
        match port & 3 {
            3 => 0,
            ch => self.channels[usize::from(ch)].read(now),
        }
    }

    /// A guest write of `value` to port `0x40 + port`.
    pub(crate) fn write(&mut self, port: u8, value: u8, now: u64) {
        let port = port & 3;
        if port != 3 {
            let ch = usize::from(port);
            let c = &mut self.channels[ch];
            match c.write_state {
                RW_MSB => self.load(ch, u32::from(value) << 8, now),
                RW_WORD0 => {
                    c.write_latch = value;
                    c.write_state = RW_WORD1;
                }
                RW_WORD1 => {
                    c.write_state = RW_WORD0;
                    let v = u32::from(c.write_latch) | u32::from(value) << 8;
                    self.load(ch, v, now);
                }
                _ => self.load(ch, u32::from(value), now),
            }
            return;
        }
        let select = value >> 6;
        if select == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear statuses,
            // of the channels in bits 1-3.
            for (ch, c) in self.channels.iter_mut().enumerate() {
                if value & (2 << ch) != 0 {
                    if value & 0x20 == 0 {
                        c.latch_count(now);
                    }
                    if value & 0x10 == 0 {
                        c.latch_status(now);
                    }
                }
            }
            return;
        }
        let c = &mut self.channels[usize::from(select)];
        let access = (value >> 4) & 3;
        if access == 0 {
            c.latch_count(now);
            return;
        }
        c.rw_mode = access;
        c.read_state = access;
        c.write_state = access;
        c.mode = match (value >> 1) & 7 {
            m @ 6..=7 => m - 4,
            m => m,
        };
        c.bcd = value & 1 != 0;
        if c.bcd && !self.bcd_traced {
            self.bcd_traced = true;
            tracing::debug!("8254: BCD counting is not modelled (counting stays binary)");
        }
    }

    /// A guest read of port `0x61`: bit 5 channel 2's OUT, bit 4 the
    /// refresh request toggle (flips about every 16 µs), bit 1 speaker
    /// data, bit 0 channel 2's gate.
    pub(crate) fn read_speaker(&self, now: u64) -> u8 {
        let c = &self.channels[2];
        u8::from(c.out(now)) << 5 | (((now >> 14) & 1) as u8) << 4 | u8::from(self.speaker_data) << 1 | u8::from(c.gate)
    }

    /// A guest write of port `0x61`: bit 0 channel 2's gate, bit 1 speaker
    /// data (the other bits are the keyboard controller's and NMI
    /// status's: ignored).
    pub(crate) fn write_speaker(&mut self, value: u8, now: u64) {
        self.speaker_data = value & 2 != 0;
        self.set_gate(2, value & 1 != 0, now);
    }

    fn set_gate(&mut self, channel: usize, gate: bool, now: u64) {
        let c = &mut self.channels[channel];
        if !c.gate && gate && matches!(c.mode, 1 | 2 | 3 | 5) {
            c.load = now;
            if channel == 0 {
                self.arm_channel0();
            }
        }
        self.channels[channel].gate = gate;
    }
}

#[cfg(test)]
mod tests {
    use super::super::clock::MIN_PERIOD_NS;
    use super::*;

    const MS: u64 = 1_000_000;

    fn program(pit: &mut Pit, channel: u8, mode: u8, count: u16, now: u64) {
        pit.write(3, channel << 6 | 0x30 | mode << 1, now);
        pit.write(channel, count as u8, now);
        pit.write(channel, (count >> 8) as u8, now);
    }

    fn read_word(pit: &mut Pit, channel: u8, now: u64) -> u16 {
        let lo = pit.read(channel, now);
        let hi = pit.read(channel, now);
        u16::from(lo) | u16::from(hi) << 8
    }

    #[test]
    fn nothing_fires_until_channel_0_is_programmed() {
        let pit = Pit::new(0);
        assert_eq!(pit.deadline(), None);
    }

    #[test]
    fn mode_2_interrupts_at_its_rate() {
        // Linux's and SeaBIOS's 1 kHz / 18.2 Hz tick: mode 2, LATCH.
        let mut pit = Pit::new(0);
        let start = 5 * MS;
        program(&mut pit, 0, 2, 1193, start);
        let period = ns_for(1193);
        assert!((999_000..=1_001_000).contains(&period), "{period}");
        assert_eq!(pit.deadline(), Some(start + period));
        assert!(!pit.expire(start + period - 1));
        let mut pulses = 0;
        let mut now = start;
        // One second of deadlines met on time: one pulse per period.
        while now < start + 1000 * MS {
            now = pit.deadline().unwrap();
            assert!(pit.expire(now));
            pulses += 1;
        }
        assert!((999..=1001).contains(&pulses), "{pulses}");
        // A host that sleeps through ten periods gets one pulse, and the
        // next deadline stays on the period grid.
        let late = now + 10 * period + period / 2;
        assert!(pit.expire(late));
        let next = pit.deadline().unwrap();
        assert!(next > late && next - late <= period);
        assert_eq!((next - start) % period, 0);
        // Count 0 is 65536: 18.2 Hz.
        program(&mut pit, 0, 2, 0, 0);
        assert_eq!(pit.deadline(), Some(ns_for(65536)));
    }

    #[test]
    fn short_periods_are_clamped() {
        let mut pit = Pit::new(0);
        program(&mut pit, 0, 3, 2, 0);
        assert_eq!(pit.deadline(), Some(MIN_PERIOD_NS));
    }

    #[test]
    fn mode_0_fires_once() {
        let mut pit = Pit::new(0);
        program(&mut pit, 0, 0, 11932, MS);
        let at = pit.deadline().unwrap();
        assert!((at - MS).abs_diff(10 * MS) < 1000);
        assert!(pit.expire(at));
        assert_eq!(pit.deadline(), None);
        assert!(!pit.expire(at + 100 * MS));
    }

    #[test]
    fn counts_read_back_as_they_count_down() {
        let mut pit = Pit::new(0);
        program(&mut pit, 0, 2, 1000, 0);
        assert_eq!(read_word(&mut pit, 0, 0), 1000);
        // 100 ticks later.
        let t = ns_for(100);
        assert_eq!(read_word(&mut pit, 0, t), 900);
        // Mode 2 reloads.
        assert_eq!(read_word(&mut pit, 0, ns_for(1100)), 900);
        // Mode 3 counts by two.
        program(&mut pit, 1, 3, 1000, 0);
        assert_eq!(read_word(&mut pit, 1, ns_for(100)), 800);
        // Mode 0 wraps.
        program(&mut pit, 1, 0, 10, 0);
        assert_eq!(read_word(&mut pit, 1, ns_for(12)), 0xfffe);
        // LSB-only and MSB-only access.
        pit.write(3, 0x50 | 2 << 1, 0); // channel 1, LSB only, mode 2
        pit.write(1, 0x80, 0);
        assert_eq!(pit.read(1, 0), 0x80);
        pit.write(3, 0x60 | 2 << 1, 0); // channel 1, MSB only
        pit.write(1, 0x12, 0);
        assert_eq!(pit.read(1, 0), 0x12);
    }

    #[test]
    fn latch_and_read_back() {
        let mut pit = Pit::new(0);
        program(&mut pit, 0, 2, 1000, 0);
        pit.write(3, 0x00, ns_for(10)); // latch channel 0
        pit.write(3, 0x00, ns_for(20)); // ignored: already latched
        assert_eq!(read_word(&mut pit, 0, ns_for(500)), 990);
        assert_eq!(read_word(&mut pit, 0, ns_for(500)), 500, "the latch is read once");
        // Read-back of channel 0's status and count: status first.
        pit.write(3, 0xc2, ns_for(30));
        assert_eq!(pit.read(0, ns_for(600)), 0x80 | 0x30 | 2 << 1, "OUT high, LSB/MSB, mode 2");
        assert_eq!(read_word(&mut pit, 0, ns_for(600)), 970);
        // Status only, of channels 1 and 2.
        pit.write(3, 0xec, 0);
        assert_eq!(pit.read(1, 0), 0x80 | 3 << 1, "power-on: OUT high, mode 3");
        assert_eq!(pit.read(2, 0) & 0x0e, 3 << 1);
        // Modes 6 and 7 are 2 and 3.
        pit.write(3, 0x80 | 0x30 | 7 << 1 | 1, 0);
        pit.write(3, 0xe8, 0);
        assert_eq!(pit.read(2, 0), 0x80 | 0x30 | 3 << 1 | 1);
    }

    #[test]
    fn channel_2_calibration_through_port_0x61() {
        // The firmware TSC calibration: gate high, speaker off, channel 2
        // mode 0 with a 10 ms count, poll port 0x61 bit 5.
        let mut pit = Pit::new(0);
        assert_eq!(pit.read_speaker(0) & 0x01, 0, "gate low at power-on");
        pit.write_speaker(0x01, MS);
        program(&mut pit, 2, 0, 11932, MS);
        assert_eq!(pit.read_speaker(MS) & 0x23, 0x01, "counting: OUT low, gate high, speaker off");
        let done = MS + ns_for(11932);
        assert_eq!(pit.read_speaker(done - 1000) & 0x20, 0);
        assert_eq!(pit.read_speaker(done) & 0x20, 0x20, "terminal count: OUT high");
        assert_eq!(pit.deadline(), None, "channel 2 has no interrupt");
        // The refresh bit toggles.
        assert_ne!(pit.read_speaker(0) & 0x10, pit.read_speaker(1 << 14) & 0x10);
        // A rising gate restarts mode 2.
        program(&mut pit, 2, 2, 1000, 0);
        pit.write_speaker(0x00, ns_for(300));
        pit.write_speaker(0x01, ns_for(400));
        assert_eq!(read_word(&mut pit, 2, ns_for(400) + ns_for(50)), 950);
    }

    #[test]
    fn out_waveforms() {
        let mut c = Channel::new(true, 0);
        c.count = 4;
        c.mode = 2;
        let outs: Vec<bool> = (0..8).map(|t| c.out(ns_for(t))).collect();
        assert_eq!(outs, [true, true, true, false, true, true, true, false]);
        c.mode = 3;
        let outs: Vec<bool> = (0..8).map(|t| c.out(ns_for(t))).collect();
        assert_eq!(outs, [true, true, false, false, true, true, false, false]);
        c.mode = 4;
        let outs: Vec<bool> = (0..6).map(|t| c.out(ns_for(t))).collect();
        assert_eq!(outs, [true, true, true, true, false, true]);
    }

    #[test]
    fn odd_guest_values_never_panic() {
        let mut pit = Pit::new(0);
        for value in 0..=255u8 {
            for port in 0..8 {
                pit.write(port, value, u64::from(value) * 1000);
                pit.read(port, u64::from(value) * 1000);
            }
            pit.write_speaker(value, 0);
            pit.read_speaker(u64::MAX);
            let _ = pit.expire(u64::MAX / 2);
        }
    }
}
