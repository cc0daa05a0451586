//! Task attributes (issue 10, item 4; SAM-5 8.6): an ORDERED command waits for the earlier
//! commands of its LUN on the session and holds back the SIMPLE ones after it; a HEAD OF
//! QUEUE command is answered at once. Driven by hand: a WRITE is left waiting for its
//! Data-Out (InitialR2T=Yes, ImmediateData=No) while the others arrive. ACA and the reserved
//! attributes are refused (NormACA=0).

mod common;

use common::initiator::{
    get_u32, put_u32, LoginOptions, Pdu, OP_DATA_IN, OP_DATA_OUT, OP_R2T, OP_SCSI_CMD, OP_SCSI_RESP,
};
use common::Target;
use std::time::Duration;

const SIMPLE: u8 = 1;
const ORDERED: u8 = 2;
const HEAD_OF_QUEUE: u8 = 3;
const LEN: usize = 4096;

/// A SCSI Command PDU on LUN 0 with task attribute `attr` and a 10-byte CDB.
fn command(attr: u8, itt: u32, cmd_sn: u32, cdb: &[u8], edtl: u32, flags: u8) -> Pdu {
    let mut c = Pdu::new(OP_SCSI_CMD);
    c.bhs[1] = 0x80 | flags | attr;
    put_u32(&mut c.bhs, 16, itt);
    put_u32(&mut c.bhs, 20, edtl);
    put_u32(&mut c.bhs, 24, cmd_sn);
    c.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
    c
}

fn rw10(op: u8, blocks: u8) -> [u8; 10] {
    [op, 0, 0, 0, 0, 0, 0, 0, blocks, 0]
}

#[test]
fn ordered_waits_for_earlier_commands_and_head_of_queue_does_not() {
    let t = Target::start(&["--lun", "name=disk0,file_path=disk0.img,size_mb=8,lun_id=0"]);
    let mut s = t.login(&LoginOptions::solicited_only());
    s.test_unit_ready(0).unwrap(); // past the power-on unit attention
    let sn = s.exp_cmd_sn_by_nop();
    let blocks = (LEN / 512) as u8;

    // A: a SIMPLE WRITE of LBA 0, waiting for its data.
    s.send(&command(SIMPLE, 0xA, sn, &rw10(0x2A, blocks), LEN as u32, 0x20)).unwrap();
    let r2t = s.recv().unwrap();
    assert_eq!((r2t.opcode(), r2t.itt()), (OP_R2T, 0xA));
    // B: an ORDERED READ of the same blocks; C: a SIMPLE TEST UNIT READY after it.
    s.send(&command(ORDERED, 0xB, sn + 1, &rw10(0x28, blocks), LEN as u32, 0x40)).unwrap();
    s.send(&command(SIMPLE, 0xC, sn + 2, &[0; 10], 0, 0)).unwrap();
    // D: HEAD OF QUEUE, answered at once although B and C wait.
    s.send(&command(HEAD_OF_QUEUE, 0xD, sn + 3, &[0; 10], 0, 0)).unwrap();
    let d = s.recv().unwrap();
    assert_eq!((d.opcode(), d.itt(), d.bhs[3]), (OP_SCSI_RESP, 0xD, 0), "HEAD OF QUEUE answered first");
    // B and C stay quiet while A has no data (ExpCmdSN moved past them all the same).
    assert_eq!(s.exp_cmd_sn_by_nop(), sn + 4);
    s.idle(Duration::from_millis(300)).expect("nothing answered while the WRITE waits");

    // A's data: A completes, then B reads what A wrote, then C.
    let mut data = Pdu::new(OP_DATA_OUT);
    data.bhs[1] = 0x80;
    put_u32(&mut data.bhs, 16, 0xA);
    put_u32(&mut data.bhs, 20, r2t.ttt());
    data.data = vec![0x5A; LEN];
    s.send(&data).unwrap();
    let a = s.recv().unwrap();
    assert_eq!((a.opcode(), a.itt(), a.bhs[3]), (OP_SCSI_RESP, 0xA, 0), "the WRITE completes first");
    let mut read = Vec::new();
    loop {
        let p = s.recv().unwrap();
        assert_eq!(p.itt(), 0xB, "the ORDERED READ answers before the SIMPLE command after it");
        if p.opcode() == OP_DATA_IN {
            assert_eq!(get_u32(&p.bhs, 40) as usize, read.len());
            read.extend_from_slice(&p.data);
            if p.bhs[1] & 0x01 != 0 {
                assert_eq!(p.bhs[3], 0, "READ status");
                break;
            }
        } else {
            assert_eq!((p.opcode(), p.bhs[3]), (OP_SCSI_RESP, 0), "READ status");
            break;
        }
    }
    assert_eq!(read, vec![0x5A; LEN], "the ORDERED READ ran before the WRITE ahead of it completed");
    let c = s.recv().unwrap();
    assert_eq!((c.opcode(), c.itt(), c.bhs[3]), (OP_SCSI_RESP, 0xC, 0), "the SIMPLE command after it");
}

#[test]
fn ordered_on_an_idle_lun_and_simple_commands_on_another_lun_run_at_once() {
    let t = Target::start(&[
        "--lun",
        "name=disk0,file_path=disk0.img,size_mb=8,lun_id=0",
        "--lun",
        "name=disk1,file_path=disk1.img,size_mb=8,lun_id=1",
    ]);
    let mut s = t.login(&LoginOptions::solicited_only());
    s.test_unit_ready(0).unwrap();
    s.test_unit_ready(1).unwrap();
    let sn = s.exp_cmd_sn_by_nop();
    // A WRITE on LUN 0 waits for its data; an ORDERED READ on LUN 1 does not wait for it.
    s.send(&command(SIMPLE, 0x1, sn, &rw10(0x2A, 8), LEN as u32, 0x20)).unwrap();
    assert_eq!(s.recv().unwrap().opcode(), OP_R2T);
    let mut b = command(ORDERED, 0x2, sn + 1, &rw10(0x28, 8), LEN as u32, 0x40);
    b.bhs[9] = 1; // LUN 1
    s.send(&b).unwrap();
    let p = s.recv().unwrap();
    assert_eq!((p.itt(), p.opcode()), (0x2, OP_DATA_IN), "the ORDERED READ of the other LUN runs at once");
}

#[test]
fn aca_and_reserved_task_attributes_are_refused_with_invalid_message_error() {
    let t = Target::start(&["--lun", "name=disk0,file_path=disk0.img,size_mb=8,lun_id=0"]);
    let mut s = t.login(&LoginOptions::default());
    s.test_unit_ready(0).unwrap(); // past the power-on unit attention
    let sn = s.exp_cmd_sn_by_nop();
    // ACA (4) and the reserved values 5-7: no ACA condition exists (INQUIRY NormACA=0).
    // The ACA one is a WRITE with immediate data, which must not reach the store.
    for (i, attr) in [4u8, 5, 6, 7].into_iter().enumerate() {
        let itt = 0x40 + i as u32;
        let c = if attr == 4 {
            let mut w = command(attr, itt, sn + i as u32, &rw10(0x2A, 1), 512, 0x20);
            w.data = vec![0xEE; 512];
            w
        } else {
            command(attr, itt, sn + i as u32, &[0; 10], 0, 0)
        };
        s.send(&c).unwrap();
        let r = s.recv().unwrap();
        assert_eq!((r.opcode(), r.itt(), r.bhs[3]), (OP_SCSI_RESP, itt, 0x02), "attr {attr}: CHECK CONDITION");
        // Fixed-format sense after the 2-byte length: key at 2, ASC/ASCQ at 12/13.
        let sense = &r.data[2..];
        assert_eq!((sense[2] & 0x0F, sense[12], sense[13]), (0x05, 0x49, 0x00), "attr {attr}: INVALID MESSAGE ERROR");
    }
    // The session goes on, and the refused WRITE stored nothing.
    s.send(&command(SIMPLE, 0x50, sn + 4, &rw10(0x28, 1), 512, 0x40)).unwrap();
    let mut data = Vec::new();
    loop {
        let p = s.recv().unwrap();
        assert_eq!(p.itt(), 0x50);
        if p.opcode() == OP_DATA_IN {
            data.extend_from_slice(&p.data);
        }
        // The status: a SCSI Response, or a final Data-In with S set.
        if p.opcode() == OP_SCSI_RESP || p.bhs[1] & 0x01 != 0 {
            assert_eq!(p.bhs[3], 0, "READ status");
            break;
        }
    }
    assert_eq!(data, vec![0u8; 512], "the ACA WRITE's immediate data was not written");
}
