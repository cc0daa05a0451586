//! What the fuzz targets (fuzz/README.md, "Findings") found in the target, replayed against
//! the real binary: each input that crashed it, sent by our test initiator.

mod common;

use common::initiator::{get_u32, LoginOptions, OP_DATA_IN, OP_SCSI_RESP};
use common::Target;

/// GET LBA STATUS(16) from LBA 0 with an allocation length of 4096.
fn get_lba_status() -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9E;
    cdb[1] = 0x12;
    cdb[10..14].copy_from_slice(&4096u32.to_be_bytes());
    cdb
}

/// Found by `pdu`: GET LBA STATUS runs on the offload pool, which handed its work a Data-In
/// buffer only when the command's R bit was set; without it the work indexed an empty buffer
/// and the panic aborted the whole target. Now it answers as every Data-In command does,
/// whatever its R and W bits: with the data, cut to the Expected Data Transfer Length.
#[test]
fn get_lba_status_without_the_read_bit_is_answered() {
    let t = Target::start(&["--lun", "name=disk0,file_path=disk0.img,size_mb=4,lun_id=0"]);
    let mut s = t.login(&LoginOptions::default());
    s.test_unit_ready(0).unwrap().check().unwrap();
    // (EDTL, W bit, immediate data): no R bit in either.
    for (edtl, write, data) in [(0, false, &[][..]), (512, true, &[0u8; 512][..])] {
        let (itt, cmd) = s.raw_command(0, &get_lba_status(), edtl, write, true, data).unwrap();
        s.send(&cmd).unwrap();
        let mut rsp = s.recv().expect("an answer, not a dead target");
        // A W-bit command may get its (inline) Data-In cut to the EDTL first.
        while rsp.opcode() == OP_DATA_IN && rsp.flags() & 0x01 == 0 {
            rsp = s.recv().unwrap();
        }
        assert!(matches!(rsp.opcode(), OP_SCSI_RESP | OP_DATA_IN), "opcode {:#04x}", rsp.opcode());
        assert_eq!(rsp.itt(), itt);
        assert_eq!(rsp.bhs[3], 0, "status GOOD (EDTL {edtl}, W {write})");
        assert!(get_u32(&rsp.bhs, 44) > 0 || edtl > 0, "the overflow is reported as a residual");
    }
    // The target lives on: the same command, well formed, gets its descriptors.
    let r = s.command(0, &get_lba_status(), None, 4096).unwrap().check().unwrap();
    assert!(r.data.len() >= 24, "{} bytes", r.data.len());
    s.logout().unwrap();
}
