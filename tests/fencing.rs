//! Fencing of old I/O (issue 10, item 4): a removed LUN's store is not touched once
//! `remove_lun` has returned, and a LUN RESET on one session aborts every session's tasks.
//!
//! These tests drive PDUs by hand: a WRITE is left waiting for its Data-Out (InitialR2T=Yes,
//! ImmediateData=No) while another party acts.

mod common;

use common::initiator::{
    get_u32, put_u32, put_u64, LoginOptions, Pdu, Session, OP_DATA_OUT, OP_R2T, OP_SCSI_CMD, OP_SCSI_RESP,
    STATUS_CHECK_CONDITION,
};
use common::Target;
use serde_json::json;

const OP_TMF_REQ: u8 = 0x02;
const OP_TMF_RESP: u8 = 0x22;
const RESERVED_TAG: u32 = 0xffff_ffff;
const LEN: usize = 4096;

/// Sends a WRITE(10) of `LEN` bytes at LBA 0 with no data (at the CmdSN the target expects),
/// and waits for its R2T; returns the R2T's Target Transfer Tag.
fn write_waiting_for_data(s: &mut Session, itt: u32) -> u32 {
    let cmd_sn = s.exp_cmd_sn_by_nop();
    let mut cmd = Pdu::new(OP_SCSI_CMD);
    cmd.bhs[1] = 0x80 | 0x20 | 0x01; // F, W, SIMPLE
    put_u64(&mut cmd.bhs, 8, 0);
    put_u32(&mut cmd.bhs, 16, itt);
    put_u32(&mut cmd.bhs, 20, LEN as u32);
    put_u32(&mut cmd.bhs, 24, cmd_sn);
    cmd.bhs[32] = 0x2A; // WRITE(10), LBA 0
    cmd.bhs[32 + 8] = (LEN / 512) as u8;
    s.send(&cmd).unwrap();
    let r2t = s.recv().unwrap();
    assert_eq!((r2t.opcode(), r2t.itt()), (OP_R2T, itt), "R2T for the WRITE");
    assert_eq!((get_u32(&r2t.bhs, 40), get_u32(&r2t.bhs, 44)), (0, LEN as u32));
    r2t.ttt()
}

/// A target with two reactors (so the sessions land on different ones) and one 8 MiB disk, and
/// two sessions past the power-on unit attention: `victim`, whose writes wait for R2T, and
/// another one.
fn two_sessions_on_two_reactors() -> (Target, Session, Session) {
    let t = Target::start(&["--reactors", "2", "--lun", "name=disk0,file_path=disk0.img,size_mb=8,lun_id=0"]);
    let mut victim = t.login(&LoginOptions::solicited_only());
    let mut other = t.login(&LoginOptions::default());
    victim.test_unit_ready(0).unwrap();
    other.test_unit_ready(0).unwrap();
    (t, victim, other)
}

/// The Data-Out that answers the R2T: 0xAB bytes, which must never reach the store.
fn send_data(s: &mut Session, itt: u32, ttt: u32) {
    let mut d = Pdu::new(OP_DATA_OUT);
    d.bhs[1] = 0x80;
    put_u32(&mut d.bhs, 16, itt);
    put_u32(&mut d.bhs, 20, ttt);
    d.data = vec![0xAB; LEN];
    s.send(&d).unwrap();
}

fn image_head(t: &Target) -> Vec<u8> {
    let bytes = std::fs::read(t.root().join("disk0.img")).unwrap();
    bytes[..LEN].to_vec()
}

#[test]
fn hot_remove_fails_a_write_waiting_for_data_out_and_leaves_the_store_untouched() {
    let t = Target::start(&["--lun", "name=disk0,file_path=disk0.img,size_mb=8,lun_id=0"]);
    let mut s = t.login(&LoginOptions::solicited_only());
    s.test_unit_ready(0).unwrap(); // past the power-on unit attention
    let ttt = write_waiting_for_data(&mut s, 0x100);

    let mut c = t.control();
    let removed = c.call("remove_lun", json!({"name": "disk0"}));
    assert!(removed.get("error").is_none(), "remove_lun failed: {removed}");

    // The write ended before remove_lun answered: its status is already on the way.
    let rsp = s.recv().unwrap();
    assert_eq!((rsp.opcode(), rsp.itt()), (OP_SCSI_RESP, 0x100), "status of the fenced WRITE");
    assert_eq!(rsp.bhs[3], STATUS_CHECK_CONDITION, "the fenced WRITE must fail");
    let sense = &rsp.data[2..];
    assert_eq!((sense[2] & 0x0F, sense[12]), (0x05, 0x25), "LOGICAL UNIT NOT SUPPORTED");

    // Its data, sent anyway, goes nowhere.
    send_data(&mut s, 0x100, ttt);
    s.exp_cmd_sn_by_nop(); // a round trip: the Data-Out has been handled
    assert!(image_head(&t).iter().all(|&b| b == 0), "the removed LUN's store was written");
}

#[test]
fn lun_reset_from_one_session_aborts_another_sessions_command() {
    let (t, mut victim, mut resetter) = two_sessions_on_two_reactors();
    let ttt = write_waiting_for_data(&mut victim, 0x200);

    // LOGICAL UNIT RESET from the other session.
    let rsn = resetter.exp_cmd_sn_by_nop();
    let mut tmf = Pdu::new(OP_TMF_REQ);
    tmf.bhs[0] |= 0x40;
    tmf.bhs[1] = 0x80 | 5;
    put_u64(&mut tmf.bhs, 8, 0);
    put_u32(&mut tmf.bhs, 16, 0x300);
    put_u32(&mut tmf.bhs, 20, RESERVED_TAG);
    put_u32(&mut tmf.bhs, 24, rsn);
    resetter.send(&tmf).unwrap();
    let r = resetter.recv().unwrap();
    assert_eq!((r.opcode(), r.itt(), r.bhs[2]), (OP_TMF_RESP, 0x300, 0), "LUN RESET complete");

    // The victim's WRITE is gone: its data is dropped, no status comes for it (TAS=0), and
    // the store is untouched.
    send_data(&mut victim, 0x200, ttt);
    victim.exp_cmd_sn_by_nop(); // the next PDU is the NOP-In, not a status for 0x200
    assert!(image_head(&t).iter().all(|&b| b == 0), "the aborted WRITE reached the store");

    // And the victim learns of the reset: BUS DEVICE RESET FUNCTION OCCURRED.
    let sn = victim.exp_cmd_sn_by_nop();
    let mut tur = Pdu::new(OP_SCSI_CMD);
    tur.bhs[1] = 0x80 | 0x01;
    put_u32(&mut tur.bhs, 16, 0x201);
    put_u32(&mut tur.bhs, 24, sn);
    victim.send(&tur).unwrap();
    let rsp = victim.recv().unwrap();
    assert_eq!((rsp.opcode(), rsp.itt(), rsp.bhs[3]), (OP_SCSI_RESP, 0x201, STATUS_CHECK_CONDITION));
    let sense = &rsp.data[2..];
    assert_eq!((sense[2] & 0x0F, sense[12], sense[13]), (0x06, 0x29, 0x03), "unit attention after the reset");
}

#[test]
fn reinstatement_ends_the_old_sessions_write_before_the_new_login_is_answered() {
    let t = Target::start(&["--lun", "name=disk0,file_path=disk0.img,size_mb=8,lun_id=0"]);
    let isid = [0x80, 0, 0, 0x0A, 0x0B, 0x0C];
    let mut old = t.login(&LoginOptions { isid: Some(isid), ..LoginOptions::solicited_only() });
    old.test_unit_ready(0).unwrap();
    let ttt = write_waiting_for_data(&mut old, 0x400);

    // Same initiator and ISID, TSIH 0: the old session is reinstated.
    let mut new = t.login(&LoginOptions { isid: Some(isid), ..LoginOptions::default() });
    // By the time the new login was answered the old connection was gone: its data cannot
    // arrive any more (the send may still succeed into a dead socket's buffer, or fail).
    let mut d = Pdu::new(OP_DATA_OUT);
    d.bhs[1] = 0x80;
    put_u32(&mut d.bhs, 16, 0x400);
    put_u32(&mut d.bhs, 20, ttt);
    d.data = vec![0xAB; LEN];
    let _ = old.send(&d);
    assert!(old.recv().is_err(), "the reinstated session's connection is still open");
    new.test_unit_ready(0).unwrap();
    assert!(new.read10(0, 0, (LEN / 512) as u16, 512).unwrap().data.iter().all(|&b| b == 0));
    assert!(image_head(&t).iter().all(|&b| b == 0), "the old session's WRITE reached the store");
}

/// WRITE SAME(16) of `blocks` blocks of `pattern` at `lba`, sent without waiting.
fn submit_write_same(s: &mut Session, lba: u64, blocks: u32, pattern: u8) -> u32 {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x93;
    put_u64(&mut cdb, 2, lba);
    put_u32(&mut cdb, 10, blocks);
    s.submit(0, &cdb, Some(&[pattern; 512]), 0).expect("WRITE SAME(16) sent")
}

#[test]
fn reinstatement_waits_for_the_old_sessions_offloaded_writes() {
    // The old session queues eight 16 MiB WRITE SAMEs over one range: they run one after the
    // other on the offload pool (the range lock serialises them), long after the login that
    // reinstates the session. The new session then writes the range's last block; no old
    // write may land after it (RFC 7143 §6.3.5: the old tasks end before the new session).
    let t = Target::start(&["--lun", "name=disk0,file_path=disk0.img,size_mb=32,lun_id=0"]);
    let isid = [0x80, 0, 0, 0x0A, 0x0B, 0x0D];
    let mut old = t.login(&LoginOptions { isid: Some(isid), ..LoginOptions::default() });
    old.test_unit_ready(0).unwrap();
    const BLOCKS: u32 = 32768;
    for _ in 0..8 {
        submit_write_same(&mut old, 0, BLOCKS, 0xCD);
    }

    let mut new = t.login(&LoginOptions { isid: Some(isid), ..LoginOptions::default() });
    new.test_unit_ready(0).unwrap();
    let last = BLOCKS - 1;
    new.write10(0, last, &[0x11; 512], 512).unwrap().check().expect("WRITE(10) of the new session");
    // Long enough for any old WRITE SAME still queued to reach the block.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let back = new.read10(0, last, 1, 512).unwrap().check().expect("READ(10)").data;
    assert!(back.iter().all(|&b| b == 0x11), "an old session's WRITE SAME landed after the new session's write");
}

/// Sends a task management request (`function`, on LUN 0) and returns its response code.
fn task_mgmt(s: &mut Session, function: u8, itt: u32) -> u8 {
    let sn = s.exp_cmd_sn_by_nop();
    let mut tmf = Pdu::new(OP_TMF_REQ);
    tmf.bhs[0] |= 0x40;
    tmf.bhs[1] = 0x80 | function;
    put_u64(&mut tmf.bhs, 8, 0);
    put_u32(&mut tmf.bhs, 16, itt);
    put_u32(&mut tmf.bhs, 20, RESERVED_TAG);
    put_u32(&mut tmf.bhs, 24, sn);
    s.send(&tmf).unwrap();
    let r = s.recv().unwrap();
    assert_eq!((r.opcode(), r.itt()), (OP_TMF_RESP, itt), "task management response");
    r.bhs[2]
}

/// A TEST UNIT READY sent by hand: (status, sense key, ASC, ASCQ).
fn tur_sense(s: &mut Session, itt: u32) -> (u8, u8, u8, u8) {
    let sn = s.exp_cmd_sn_by_nop();
    let mut tur = Pdu::new(OP_SCSI_CMD);
    tur.bhs[1] = 0x80 | 0x01;
    put_u32(&mut tur.bhs, 16, itt);
    put_u32(&mut tur.bhs, 24, sn);
    s.send(&tur).unwrap();
    let rsp = s.recv().unwrap();
    assert_eq!((rsp.opcode(), rsp.itt()), (OP_SCSI_RESP, itt), "TEST UNIT READY status");
    if rsp.bhs[3] != STATUS_CHECK_CONDITION {
        return (rsp.bhs[3], 0, 0, 0);
    }
    let sense = &rsp.data[2..];
    (rsp.bhs[3], sense[2] & 0x0F, sense[12], sense[13])
}

#[test]
fn target_warm_reset_aborts_every_sessions_tasks_and_keeps_the_sessions() {
    let (t, mut victim, mut resetter) = two_sessions_on_two_reactors();
    let ttt = write_waiting_for_data(&mut victim, 0x500);

    assert_eq!(task_mgmt(&mut resetter, 6, 0x600), 0, "TARGET WARM RESET complete");

    // The victim's WRITE is aborted (no status, its data dropped), its session lives on and
    // learns of the reset through a unit attention.
    send_data(&mut victim, 0x500, ttt);
    victim.exp_cmd_sn_by_nop();
    assert!(image_head(&t).iter().all(|&b| b == 0), "the aborted WRITE reached the store");
    assert_eq!(tur_sense(&mut victim, 0x501), (STATUS_CHECK_CONDITION, 0x06, 0x29, 0x00), "reset unit attention");
    assert_eq!(tur_sense(&mut victim, 0x502).0, 0, "the session works after the reset");
    // The resetter may be told of its own reset first; then it works as well.
    let first = tur_sense(&mut resetter, 0x601);
    assert!(first.0 == 0 || first == (STATUS_CHECK_CONDITION, 0x06, 0x29, 0x00), "resetter: {first:?}");
    assert_eq!(tur_sense(&mut resetter, 0x602).0, 0, "the resetter's session works after the reset");
}

#[test]
fn target_cold_reset_answers_then_ends_every_session() {
    let t = Target::start(&["--reactors", "2", "--lun", "name=disk0,file_path=disk0.img,size_mb=8,lun_id=0"]);
    // Two bystanders, one on each reactor, one of them with a WRITE waiting for its data.
    let mut victim = t.login(&LoginOptions::solicited_only());
    let mut resetter = t.login(&LoginOptions::default());
    let mut bystander = t.login(&LoginOptions::default());
    victim.test_unit_ready(0).unwrap();
    resetter.test_unit_ready(0).unwrap();
    bystander.test_unit_ready(0).unwrap();
    let ttt = write_waiting_for_data(&mut victim, 0x700);

    assert_eq!(task_mgmt(&mut resetter, 7, 0x800), 0, "TARGET COLD RESET complete");
    // Then every connection of the target ends, the resetter's after its response. (`idle`
    // fails on a closed connection and returns Ok when it stays open that long.)
    let open_for = std::time::Duration::from_secs(5);
    assert!(resetter.idle(open_for).is_err(), "the resetter's connection is still open");
    assert!(bystander.idle(open_for).is_err(), "another session's connection is still open");
    let _ = victim.send(&{
        let mut d = Pdu::new(OP_DATA_OUT);
        d.bhs[1] = 0x80;
        put_u32(&mut d.bhs, 16, 0x700);
        put_u32(&mut d.bhs, 20, ttt);
        d.data = vec![0xAB; LEN];
        d
    });
    assert!(victim.idle(open_for).is_err(), "the victim's connection is still open");
    assert!(image_head(&t).iter().all(|&b| b == 0), "the aborted WRITE reached the store");

    // The target itself goes on: a new session logs in and works.
    let mut s = t.login(&LoginOptions::default());
    s.test_unit_ready(0).unwrap();
    assert!(s.read10(0, 0, 1, 512).unwrap().is_good());
}

/// PERSISTENT RESERVE OUT `action` with reservation key `key`, service action key `sa_key`
/// and type 1 (Write Exclusive).
fn prout(s: &mut Session, action: u8, key: u64, sa_key: u64) {
    let mut data = [0u8; 24];
    put_u64(&mut data, 0, key);
    put_u64(&mut data, 8, sa_key);
    let cdb = [0x5F, action, 0x01, 0, 0, 0, 0, 0, 24, 0];
    let r = s.command(0, &cdb, Some(&data), 0).expect("PERSISTENT RESERVE OUT");
    assert!(r.is_good(), "PERSISTENT RESERVE OUT {action}: status {:#x} sense {:?}", r.status, r.sense);
}

#[test]
fn preempt_and_abort_aborts_the_preempted_sessions_command() {
    let (t, mut victim, mut preemptor) = two_sessions_on_two_reactors();
    prout(&mut victim, 0, 0, 0xB); // REGISTER 0xB
    prout(&mut victim, 1, 0xB, 0); // RESERVE, Write Exclusive
    prout(&mut preemptor, 0, 0, 0xA); // REGISTER 0xA
    let ttt = write_waiting_for_data(&mut victim, 0x900);

    prout(&mut preemptor, 5, 0xA, 0xB); // PREEMPT AND ABORT 0xB

    // The victim's WRITE is gone (no status, data dropped, store untouched), and the victim
    // learns that its registration was preempted.
    send_data(&mut victim, 0x900, ttt);
    victim.exp_cmd_sn_by_nop();
    assert!(image_head(&t).iter().all(|&b| b == 0), "the preempted session's WRITE reached the store");
    assert_eq!(tur_sense(&mut victim, 0x901), (STATUS_CHECK_CONDITION, 0x06, 0x2A, 0x05), "REGISTRATIONS PREEMPTED");
}
