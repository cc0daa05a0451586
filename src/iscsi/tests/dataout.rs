//! Data-Out refused as `iscsi::dataout` decides (the ring-free twins of tests/engine_dataout.rs):
//! an overlap, a gap, an over-run or a missing F bit is rejected with "protocol error" and ends
//! the connection (ERL 0); a DataSN out of sequence fails the command with PROTOCOL SERVICE
//! CRC ERROR once its sequence ends and keeps the session. Either way nothing is written.

use super::*;

/// Sends WRITE(10) of `len` bytes at `lba` of the file LUN with no data and returns (ITT, TTT)
/// of the one R2T that asks for all of it.
fn write_until_r2t(rig: &mut Rig, c: usize, lba: u32, len: u32) -> (u32, u32) {
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    rig.send(c, &command(itt, sn, FILE_LUN, &write10(lba, (len / BS) as u16), len, Dir::Write, true), &[]);
    let r2t = rig.recv_one(c);
    assert_eq!((r2t.opcode(), r2t.itt()), (opcode::R2T, itt));
    assert_eq!((r2t.buffer_offset(), r2t.word44()), (0, len));
    (itt, r2t.ttt())
}

/// Sends a Data-Out that must be refused: the answer is a Reject ("protocol error") carrying
/// its header, then the connection ends and its session with it.
fn send_refused(rig: &mut Rig, c: usize, hdr: [u8; BHS_LEN], data: &[u8]) {
    let sessions = rig.sessions();
    rig.send(c, &hdr, data);
    let rej = rig.recv_one(c);
    assert_eq!(rej.opcode(), opcode::REJECT);
    assert_eq!(rej.response(), 0x04, "Reject reason: protocol error");
    let mut sent = hdr;
    sent[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    assert_eq!(rej.data, sent, "the Reject carries the refused header");
    assert!(rig.gone(c), "the connection outlived a protocol error");
    assert_eq!(rig.sessions(), sessions - 1, "its session ended with it");
}

fn assert_untouched(rig: &Rig, lba: u32, len: usize) {
    let back = rig.read_lun(FILE_LUN, u64::from(lba) * 512, len);
    assert!(
        back.iter().all(|&b| b == 0),
        "refused data reached the store at byte {:?}",
        back.iter().position(|&b| b != 0)
    );
}

#[test]
fn overlapping_data_out_is_refused_and_nothing_is_written() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &solicited_only());
    // An earlier write leaves 0xAB in a pooled buffer of the size the next write takes.
    let (itt, ttt) = write_until_r2t(&mut rig, c, 1000, 65536);
    rig.send(c, &data_out(FILE_LUN, itt, ttt, 0, 0, true), &[0xAB; 65536]);
    rig.complete_io(0);
    assert_eq!(rig.recv_one(c).status(), status::GOOD);
    // Both halves of a 64 KiB R2T at offset 0 (DataSN 0 and 1).
    let (itt, ttt) = write_until_r2t(&mut rig, c, 0, 65536);
    rig.send(c, &data_out(FILE_LUN, itt, ttt, 0, 0, false), &[0x11; 32768]);
    send_refused(&mut rig, c, data_out(FILE_LUN, itt, ttt, 1, 0, true), &[0x22; 32768]);
    assert!(rig.pending_io().is_empty(), "a write started");
    assert_untouched(&rig, 0, 65536);
}

#[test]
fn a_gap_in_data_out_is_refused() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &solicited_only());
    let (itt, ttt) = write_until_r2t(&mut rig, c, 64, 16384);
    rig.send(c, &data_out(FILE_LUN, itt, ttt, 0, 0, false), &[0x55; 4096]);
    // The second PDU skips 4 KiB.
    send_refused(&mut rig, c, data_out(FILE_LUN, itt, ttt, 1, 8192, true), &[0x55; 8192]);
    assert!(rig.pending_io().is_empty());
    assert_untouched(&rig, 64, 16384);
}

#[test]
fn a_sequence_without_its_final_bit_is_refused() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &solicited_only());
    let (itt, ttt) = write_until_r2t(&mut rig, c, 64, 4096);
    send_refused(&mut rig, c, data_out(FILE_LUN, itt, ttt, 0, 0, false), &[0x66; 4096]);
    assert!(rig.pending_io().is_empty());
    assert_untouched(&rig, 64, 4096);
}

#[test]
fn data_out_past_its_r2t_is_refused() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &solicited_only());
    let (itt, ttt) = write_until_r2t(&mut rig, c, 64, 4096);
    send_refused(&mut rig, c, data_out(FILE_LUN, itt, ttt, 0, 0, true), &[0x67; 8192]);
    assert!(rig.pending_io().is_empty());
    assert_untouched(&rig, 64, 8192);
}

#[test]
fn unsolicited_data_out_past_the_command_is_refused() {
    let mut rig = Rig::new();
    // InitialR2T=No, no immediate data: up to FirstBurstLength may come unsolicited.
    let c = rig.logged_in(ISID_A, &Keys { initial_r2t: false, immediate_data: false, ..Keys::default() });
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    rig.send(c, &command(itt, sn, FILE_LUN, &write10(128, 16), 8192, Dir::Write, false), &[]);
    assert!(rig.recv(c).is_empty(), "the unsolicited data was solicited again");
    // 12 KiB of unsolicited data for an 8 KiB write.
    send_refused(&mut rig, c, data_out(FILE_LUN, itt, RESERVED_TAG, 0, 0, true), &[0x77; 12288]);
    assert!(rig.pending_io().is_empty());
    assert_untouched(&rig, 128, 12288);
}

/// The command ends with CHECK CONDITION, ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR, its
/// ExpDataSN counting its one R2T.
fn assert_protocol_crc_error(rig: &mut Rig, c: usize, itt: u32) {
    let rsp = rig.recv_one(c);
    assert_eq!((rsp.opcode(), rsp.itt()), (opcode::SCSI_RESPONSE, itt), "a SCSI Response, not a Reject");
    assert_eq!(rsp.status(), status::CHECK_CONDITION);
    assert_eq!(rsp.sense(), (0x0B, 0x47, 0x05));
    assert_eq!(rsp.sn36(), 1);
}

#[test]
fn a_data_sn_out_of_sequence_fails_the_command_once_its_sequence_ends() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &solicited_only());
    // libiscsi's iSCSIDataSnInvalid shapes: DataSN 0 twice, then 1 before 0.
    for (lba, sns) in [(8u32, [0u32, 0]), (24, [1, 0])] {
        let (itt, ttt) = write_until_r2t(&mut rig, c, lba, 8192);
        rig.send(c, &data_out(FILE_LUN, itt, ttt, sns[0], 0, false), &[0x33; 4096]);
        assert!(rig.recv(c).is_empty(), "failed before its sequence ended");
        rig.send(c, &data_out(FILE_LUN, itt, ttt, sns[1], 4096, true), &[0x44; 4096]);
        assert_protocol_crc_error(&mut rig, c, itt);
    }
    // DataSN 27 alone, F set: the sequence has ended, the command fails at once.
    let (itt, ttt) = write_until_r2t(&mut rig, c, 40, 512);
    rig.send(c, &data_out(FILE_LUN, itt, ttt, 27, 0, true), &[0x55; 512]);
    assert_protocol_crc_error(&mut rig, c, itt);
    // At ERL 0 no retransmission exists; the session goes on and nothing was written.
    assert!(rig.pending_io().is_empty(), "a failed command's data was written");
    rig.clear_unit_attention(c, FILE_LUN);
    assert!(!rig.gone(c));
    assert_untouched(&rig, 8, 40 * 512);
}
