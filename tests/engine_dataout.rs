//! Data-Out is accepted by coverage: a write starts only once every byte of its buffer came
//! from its own Data-Out, in the sequences the target asked for. Anything else (an overlap, a
//! misplaced F bit) is rejected with "protocol error" and ends the connection (ERL 0),
//! and nothing of that write reaches the disk. A DataSN out of sequence (a lost PDU) fails the
//! command with PROTOCOL SERVICE CRC ERROR and keeps the session. Real binary, real sockets.

mod common;

use common::initiator::{
    get_u32, LoginOptions, Pdu, Response, Session, OP_R2T, OP_REJECT, OP_SCSI_RESP, STATUS_CHECK_CONDITION,
};
use common::Target;
use std::time::Duration;

const BS: u32 = 512;

fn start() -> Target {
    Target::start(&["--lun", "name=disk0,file_path=disk0.img,size_mb=16,lun_id=0"])
}

/// InitialR2T=Yes, ImmediateData=No: every byte of a write is solicited by an R2T.
fn solicited_only() -> LoginOptions {
    LoginOptions { immediate_data: false, initial_r2t: true, ..Default::default() }
}

fn write10_cdb(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// Sends WRITE(10) of `len` bytes at `lba` with no immediate data and returns (ITT, TTT) of
/// the R2T that asks for all of it.
fn write_until_r2t(s: &mut Session, lba: u32, len: u32) -> (u32, u32) {
    let (itt, cmd) = s.raw_command(0, &write10_cdb(lba, (len / BS) as u16), len, true, true, &[]).unwrap();
    s.send(&cmd).unwrap();
    let r2t = s.recv().unwrap();
    assert_eq!(r2t.opcode(), OP_R2T, "R2T for the write");
    assert_eq!(get_u32(&r2t.bhs, 40), 0, "R2T buffer offset");
    assert_eq!(get_u32(&r2t.bhs, 44), len, "R2T desired length");
    (itt, r2t.ttt())
}

/// The target rejects `pdu`'s header with reason "protocol error" (0x04) and then closes.
fn assert_rejected_and_closed(s: &mut Session, pdu: &Pdu) {
    let rej = s.recv_raw().expect("a Reject");
    assert_eq!(rej.opcode(), OP_REJECT, "answer to the bad Data-Out");
    assert_eq!(rej.bhs[2], 0x04, "Reject reason: protocol error");
    assert_eq!(&rej.data[..48], &pdu.encode(false, false)[..48], "the Reject carries the rejected header");
    match s.recv_raw() {
        Err(_) => {}
        Ok(p) => panic!("connection still open after the protocol error: opcode {:#04x}", p.opcode()),
    }
}

/// A session past the power-on UNIT ATTENTION, so raw commands get their real answer.
fn login(t: &Target, opts: &LoginOptions) -> Session {
    let mut s = t.login(opts);
    s.test_unit_ready(0).unwrap().check().unwrap();
    s
}

fn read_back(t: &Target, lba: u32, len: u32) -> Vec<u8> {
    let mut s = login(t, &LoginOptions::default());
    let r = s.read10(0, lba, (len / BS) as u16, BS).unwrap().check().unwrap();
    s.logout().unwrap();
    r.data
}

#[test]
fn overlapping_data_out_is_refused_and_nothing_is_written() {
    let t = start();
    // An earlier write leaves 0xAB in a pooled buffer of the size the next write uses.
    let mut s = login(&t, &solicited_only());
    s.write10(0, 1000, &vec![0xAB; 65536], BS).unwrap().check().unwrap();
    // The case: both halves of a 64 KiB R2T sent at offset 0 (DataSN 0 and 1).
    let (itt, ttt) = write_until_r2t(&mut s, 0, 65536);
    let first = s.raw_data_out(0, itt, ttt, 0, 0, false, &[0x11; 32768]);
    let second = s.raw_data_out(0, itt, ttt, 1, 0, true, &[0x22; 32768]);
    s.send(&first).unwrap();
    s.send(&second).unwrap();
    assert_rejected_and_closed(&mut s, &second);
    let back = read_back(&t, 0, 65536);
    assert!(
        back.iter().all(|&b| b == 0),
        "LBAs 0-127 must stay unwritten (first non-zero at {:?})",
        back.iter().position(|&b| b != 0)
    );
}

#[test]
fn data_sn_out_of_sequence_fails_the_command_once_its_sequence_ends() {
    let t = start();
    let mut s = login(&t, &solicited_only());
    // libiscsi's iSCSIDataSnInvalid shapes: DataSN 0 twice, then 1 before 0, then 27 alone.
    for (lba, sns) in [(8u32, [0u32, 0]), (24, [1, 0])] {
        let (itt, ttt) = write_until_r2t(&mut s, lba, 8192);
        s.send(&s.raw_data_out(0, itt, ttt, sns[0], 0, false, &[0x33; 4096])).unwrap();
        s.send(&s.raw_data_out(0, itt, ttt, sns[1], 4096, true, &[0x44; 4096])).unwrap();
        assert_protocol_crc_error(&mut s, itt);
    }
    let (itt, ttt) = write_until_r2t(&mut s, 40, 512);
    s.send(&s.raw_data_out(0, itt, ttt, 27, 0, true, &[0x55; 512])).unwrap();
    assert_protocol_crc_error(&mut s, itt);
    // At ERL 0 no retransmission exists; the session goes on and nothing was written.
    s.test_unit_ready(0).unwrap().check().unwrap();
    s.logout().unwrap();
    assert!(read_back(&t, 8, 40 * 512).iter().all(|&b| b == 0), "a failed write left data behind");
}

/// The command ends with CHECK CONDITION, ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR.
fn assert_protocol_crc_error(s: &mut Session, itt: u32) {
    let rsp = s.recv().unwrap();
    assert_eq!(rsp.opcode(), OP_SCSI_RESP, "a SCSI Response, not a Reject or a close");
    assert_eq!(rsp.itt(), itt);
    assert_eq!(rsp.bhs[3], STATUS_CHECK_CONDITION);
    let r = Response { status: rsp.bhs[3], sense: rsp.data[2..].to_vec(), ..Default::default() };
    assert_eq!(r.sense_key(), Some(0x0B), "ABORTED COMMAND");
    assert_eq!(r.asc_ascq(), Some((0x47, 0x05)), "PROTOCOL SERVICE CRC ERROR");
}

#[test]
fn gap_and_missing_final_are_refused() {
    let t = start();
    // A gap: the second PDU skips 4 KiB.
    let mut s = login(&t, &solicited_only());
    let (itt, ttt) = write_until_r2t(&mut s, 64, 16384);
    s.send(&s.raw_data_out(0, itt, ttt, 0, 0, false, &[0x55; 4096])).unwrap();
    let bad = s.raw_data_out(0, itt, ttt, 1, 8192, false, &[0x55; 8192]);
    s.send(&bad).unwrap();
    assert_rejected_and_closed(&mut s, &bad);
    // The whole range in one PDU but without F: the sequence's end must carry it.
    let mut s = login(&t, &solicited_only());
    let (itt, ttt) = write_until_r2t(&mut s, 64, 4096);
    let bad = s.raw_data_out(0, itt, ttt, 0, 0, false, &[0x66; 4096]);
    s.send(&bad).unwrap();
    assert_rejected_and_closed(&mut s, &bad);
    assert!(read_back(&t, 64, 16384).iter().all(|&b| b == 0), "a refused write left data behind");
}

#[test]
fn unsolicited_overrun_is_refused() {
    let t = start();
    // InitialR2T=No, no immediate data: up to FirstBurstLength (64 KiB) may come unsolicited.
    let opts = LoginOptions { immediate_data: false, initial_r2t: false, ..Default::default() };
    let mut s = login(&t, &opts);
    let (itt, cmd) = s.raw_command(0, &write10_cdb(128, 16), 8192, true, false, &[]).unwrap();
    s.send(&cmd).unwrap();
    // 12 KiB of unsolicited data for an 8 KiB write.
    let bad = s.raw_data_out(0, itt, 0xffff_ffff, 0, 0, true, &[0x77; 12288]);
    s.send(&bad).unwrap();
    assert_rejected_and_closed(&mut s, &bad);
    assert!(read_back(&t, 128, 8192).iter().all(|&b| b == 0), "the refused write left data behind");
}

#[test]
fn well_formed_writes_still_complete_after_refusals() {
    let t = start();
    let mut s = login(&t, &solicited_only());
    let (itt, ttt) = write_until_r2t(&mut s, 0, 8192);
    let bad = s.raw_data_out(0, itt, ttt, 0, 512, true, &[1; 7680]);
    s.send(&bad).unwrap();
    assert_rejected_and_closed(&mut s, &bad);
    // A fresh session writes in many small PDUs (MaxRecvDataSegmentLength 512 on our side is
    // irrelevant to Data-Out; the target's 256 KiB applies) and in one.
    let mut s = login(
        &t,
        &LoginOptions { immediate_data: true, initial_r2t: false, first_burst_length: 8192, ..Default::default() },
    );
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let data = &data[..(data.len() / BS as usize) * BS as usize];
    s.write10(0, 2000, data, BS).unwrap().check().unwrap();
    let r = s.read10(0, 2000, (data.len() / BS as usize) as u16, BS).unwrap().check().unwrap();
    assert!(r.data == data, "round trip of a multi-R2T write");
    s.logout().unwrap();
}

#[test]
fn pipelined_writes_and_reads_complete() {
    let t = start();
    let mut s = login(&t, &LoginOptions::default());
    let mut itts = Vec::new();
    for i in 0..32u32 {
        let data = vec![i as u8 + 1; 65536];
        itts.push(s.submit(0, &write10_cdb(i * 128, 128), Some(&data), 0).unwrap());
    }
    assert!(s.in_flight() > 1, "commands were in flight together");
    for _ in 0..32 {
        let (itt, r) = s.next_completion().unwrap();
        assert!(itts.contains(&itt));
        r.check().unwrap();
    }
    for i in 0..32u32 {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&(i * 128).to_be_bytes());
        cdb[7..9].copy_from_slice(&128u16.to_be_bytes());
        s.submit(0, &cdb, None, 65536).unwrap();
    }
    let mut seen = 0;
    while s.in_flight() > 0 {
        let (_, r) = s.next_completion().unwrap();
        let r = r.check().unwrap();
        assert_eq!(r.data.len(), 65536);
        assert!(r.data.iter().all(|&b| b == r.data[0]) && (1..=32).contains(&r.data[0]), "read back a whole write");
        seen += 1;
    }
    assert_eq!(seen, 32);
    std::thread::sleep(Duration::from_millis(1));
    s.logout().unwrap();
}
