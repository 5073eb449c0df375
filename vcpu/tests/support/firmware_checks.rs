//! What the firmware tests of both accelerators check from the host after
//! a run: what the firmware did to the fixed-address devices.

use topos_devices::framebuffer::FbMode;
use topos_devices::pflash::PflashMode;
use topos_devices::uart::SerialSink;
use topos_vcpu::board::{self, PcConfig, PciModel};
use topos_vcpu::firmware::framebuffer::{line_colour, DRAWN_LINES};
use topos_vcpu::firmware::transcript::{self, Machine};
use topos_vcpu::firmware::{self as fw, QEMU_STATUS_PASS};
use topos_vcpu::machine::{self, Accel};
use topos_vcpu::vm::StopReason;

/// The mode the firmware sets.
fn firmware_mode() -> FbMode {
    use fw::framebuffer::{MODE_BYTES_PER_PIXEL, MODE_HEIGHT, MODE_STRIDE, MODE_WIDTH};
    FbMode { width: MODE_WIDTH, height: MODE_HEIGHT, bytes_per_pixel: MODE_BYTES_PER_PIXEL, stride: MODE_STRIDE }
}

/// Runs the firmware on a 2-vCPU board with every device on `accel`, and
/// checks from the host what it did to the fixed-address devices.
pub fn host_checks(accel: Accel) {
    let (sink, out) = SerialSink::buffer();
    let config = PcConfig {
        ram_size: 256 << 20,
        cpus: 2,
        bios: fw::bios_image().unwrap(),
        bios_in_flash: false,
        devices: vec![PciModel::Edu, PciModel::Framebuffer, PciModel::VirtioDoorbell, PciModel::Pflash],
        serial: sink,
        kernel: None,
    };
    let mut machine = machine::Machine::new(config, accel).unwrap();
    let mut display = machine.board_mut().devices.framebuffer.take().unwrap();
    let b = machine.board();
    let mode = firmware_mode();
    assert_eq!(board::FRAMEBUFFER_MODE, mode, "the board starts in the mode the firmware sets");
    // The display takes the first frame (new video RAM is all dirty, and a
    // first update is a full one) before the guest runs.
    assert!(display.update().unwrap().full);

    let reason = machine.run().unwrap();
    let text = out.to_string_lossy();
    assert_eq!(reason, StopReason::DebugExit(QEMU_STATUS_PASS), "{text}");
    if let Err(e) = transcript::check(&text, &transcript::expected_lines(&Machine::topos_pc(2, 256))) {
        panic!("{e}\n{text}");
    }

    // Exactly the scanlines the firmware says it drew are dirty (a stride
    // of one page makes page-granular tracking exact), in their colours:
    // the update folds in KVM's dirty log itself.
    let update = display.update().unwrap();
    assert_eq!(update.mode, Some(mode));
    assert!(!update.full, "the firmware's mode is the one the display had");
    let drawn: Vec<_> = DRAWN_LINES.iter().map(|&y| y..y + 1).collect();
    assert_eq!(update.dirty, drawn, "{text}");
    let mut pixels = vec![0u8; mode.line_bytes() as usize];
    for y in DRAWN_LINES {
        assert_eq!(display.read_scanline(&mode, y, &mut pixels), pixels.len());
        assert!(pixels.chunks(4).all(|p| p == line_colour(y).to_le_bytes()), "scanline {y}");
    }
    assert!(display.update().unwrap().dirty.is_empty(), "an update clears what it reports");

    // One kick of queue 0, through the ioeventfd (the device's register
    // handler never saw it: KVM signals the eventfd in the kernel, the
    // interpreter's dispatch in the runtime), and the device reset
    // afterwards.
    let (kicks, trapped, status) = b
        .devices
        .virtio_doorbell
        .as_ref()
        .unwrap()
        .handle()
        .with(|d, _| (d.kicks(0), d.trapped_kicks(), d.status()))
        .unwrap();
    assert_eq!((kicks, trapped, status), (1, 0, 0), "kicks, kicks through the register handler, status");

    // The query and the read array command, and the flash reads its array.
    let (flash_mode, stats) = b.devices.pflash.as_ref().unwrap().with(|d, _| (d.mode(), d.stats())).unwrap();
    assert_eq!(flash_mode, PflashMode::ReadArray);
    assert_eq!((stats.ops_writes, stats.programs, stats.erases), (2, 0, 0));
}
