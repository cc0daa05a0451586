//! Several R2Ts outstanding at once (MaxOutstandingR2T > 1), on one WRITE and across WRITEs,
//! answered in any order: each sequence is checked on its own, the write starts once every
//! byte has come, and what lands is what was sent.

use super::*;

const K: u32 = 1024;

/// The R2Ts among `pdus`, checked to be R2Ts for `itt`.
fn r2ts(pdus: &[Pdu], itt: u32) -> Vec<Pdu> {
    let v: Vec<Pdu> = pdus.iter().filter(|p| p.opcode() == opcode::R2T && p.itt() == itt).cloned().collect();
    assert!(v.iter().all(|p| p.ttt() != RESERVED_TAG), "an R2T carries a Target Transfer Tag");
    v
}

/// Answers `r2t` with the bytes of `data` it asks for, in PDUs of `pdu` bytes (DataSN from 0,
/// F on the last).
fn answer(rig: &mut Rig, c: usize, lun: u64, r2t: &Pdu, data: &[u8], pdu: u32) {
    let (start, len) = (r2t.buffer_offset(), r2t.word44());
    let mut off = 0;
    let mut sn = 0;
    while off < len {
        let n = pdu.min(len - off);
        let at = start + off;
        let hdr = data_out(lun, r2t.itt(), r2t.ttt(), sn, at, off + n == len);
        assert!(rig.send(c, &hdr, &data[at as usize..(at + n) as usize]), "Data-Out not read");
        off += n;
        sn += 1;
    }
}

fn final_response(rig: &mut Rig, c: usize, itt: u32, r2t_count: u32) {
    let rsp = rig.recv_one(c);
    assert_eq!((rsp.opcode(), rsp.itt()), (opcode::SCSI_RESPONSE, itt));
    assert_eq!((rsp.response(), rsp.status()), (0, status::GOOD), "the write completed");
    assert_eq!(rsp.sn36(), r2t_count, "ExpDataSN counts the R2Ts sent");
}

#[test]
fn outstanding_r2ts_of_one_write_are_answered_out_of_order() {
    outstanding_r2ts_answered_out_of_order(usize::MAX);
}

#[test]
fn outstanding_r2ts_answered_out_of_order_in_small_receives() {
    // 7000-byte receives: each 32 KiB Data-Out segment goes straight into the task's buffer.
    outstanding_r2ts_answered_out_of_order(7000);
}

fn outstanding_r2ts_answered_out_of_order(piece: usize) {
    let mut rig = Rig::new();
    rig.piece = piece;
    let keys = Keys { max_outstanding_r2t: 4, max_burst: 64 * K, ..solicited_only() };
    let c = rig.logged_in(ISID_A, &keys);
    let data = pattern(7, 256 * K as usize);
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    rig.send(c, &command(itt, sn, FILE_LUN, &write10(100, 512), 256 * K, Dir::Write, true), &[]);
    let r = r2ts(&rig.recv(c), itt);
    let asked: Vec<(u32, u32, u32)> = r.iter().map(|p| (p.sn36(), p.buffer_offset(), p.word44())).collect();
    assert_eq!(asked, [(0, 0, 64 * K), (1, 64 * K, 64 * K), (2, 128 * K, 64 * K), (3, 192 * K, 64 * K)]);
    let mut ttts: Vec<u32> = r.iter().map(Pdu::ttt).collect();
    ttts.sort_unstable();
    ttts.dedup();
    assert_eq!(ttts.len(), 4, "each outstanding R2T has its own Target Transfer Tag");

    for (i, &which) in [2usize, 0, 3, 1].iter().enumerate() {
        assert!(rig.pending_io().is_empty(), "the write started before all its data came");
        answer(&mut rig, c, FILE_LUN, &r[which], &data, 32 * K);
        if i < 3 {
            assert!(rig.recv(c).is_empty(), "nothing is due while sequences are missing");
        }
    }
    let io = rig.pending_io();
    assert_eq!(io.len(), 1, "one write of the whole buffer");
    assert_eq!((io[0].1.offset, io[0].1.len), (100 * 512, 256 * K));
    assert!(matches!(io[0].1.kind, IoKind::Write { .. }));
    assert!(rig.recv(c).is_empty(), "answered before the store acknowledged the write");
    rig.complete_io(0);
    final_response(&mut rig, c, itt, 4);
    assert_eq!(rig.read_lun(FILE_LUN, 100 * 512, data.len()), data, "the store holds what was sent");
}

#[test]
fn r2ts_beyond_max_outstanding_follow_as_sequences_complete() {
    let mut rig = Rig::new();
    let keys = Keys { max_outstanding_r2t: 2, max_burst: 64 * K, ..solicited_only() };
    let c = rig.logged_in(ISID_A, &keys);
    let data = pattern(9, 256 * K as usize);
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    rig.send(c, &command(itt, sn, RAM_LUN, &write10(0, 512), 256 * K, Dir::Write, true), &[]);
    let first = r2ts(&rig.recv(c), itt);
    assert_eq!(first.iter().map(Pdu::buffer_offset).collect::<Vec<_>>(), [0, 64 * K], "MaxOutstandingR2T=2");
    // The second sequence ends first: its room goes to the third R2T.
    answer(&mut rig, c, RAM_LUN, &first[1], &data, 16 * K);
    let third = r2ts(&rig.recv(c), itt);
    assert_eq!(third.iter().map(|p| (p.sn36(), p.buffer_offset())).collect::<Vec<_>>(), [(2, 128 * K)]);
    answer(&mut rig, c, RAM_LUN, &first[0], &data, 16 * K);
    let fourth = r2ts(&rig.recv(c), itt);
    assert_eq!(fourth.iter().map(|p| (p.sn36(), p.buffer_offset())).collect::<Vec<_>>(), [(3, 192 * K)]);
    answer(&mut rig, c, RAM_LUN, &fourth[0], &data, 64 * K);
    assert!(rig.recv(c).is_empty(), "answered with a sequence missing");
    answer(&mut rig, c, RAM_LUN, &third[0], &data, 64 * K);
    final_response(&mut rig, c, itt, 4);
    assert_eq!(rig.read_lun(RAM_LUN, 0, data.len()), data);
}

#[test]
fn r2ts_of_two_writes_interleave_and_each_write_gets_its_own_data() {
    let mut rig = Rig::new();
    let keys = Keys { max_outstanding_r2t: 2, max_burst: 32 * K, first_burst: 32 * K, ..solicited_only() };
    let c = rig.logged_in(ISID_A, &keys);
    let (a, b) = (pattern(1, 64 * K as usize), pattern(2, 64 * K as usize));
    let (ia, sa) = (rig.next_itt(c), rig.take_cmd_sn(c));
    let (ib, sb) = (rig.next_itt(c), rig.take_cmd_sn(c));
    rig.send(c, &command(ia, sa, FILE_LUN, &write10(0, 128), 64 * K, Dir::Write, true), &[]);
    rig.send(c, &command(ib, sb, FILE_LUN, &write10(1000, 128), 64 * K, Dir::Write, true), &[]);
    let out = rig.recv(c);
    let (ra, rb) = (r2ts(&out, ia), r2ts(&out, ib));
    assert_eq!((ra.len(), rb.len()), (2, 2), "both writes have both their R2Ts out");
    // PDU by PDU, alternating between the writes and their sequences, later ones first.
    let order = [(&rb[1], &b), (&ra[0], &a), (&rb[0], &b), (&ra[1], &a)];
    for half in 0..2u32 {
        for (r2t, data) in order {
            let at = r2t.buffer_offset() + half * 16 * K;
            let hdr = data_out(FILE_LUN, r2t.itt(), r2t.ttt(), half, at, half == 1);
            assert!(rig.send(c, &hdr, &data[at as usize..(at + 16 * K) as usize]));
        }
    }
    assert!(rig.recv(c).is_empty());
    let io = rig.pending_io();
    let mut offsets: Vec<u64> = io.iter().map(|(_, r)| r.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, [0, 1000 * 512], "both writes started");
    // The store finishes the second write first.
    rig.complete_io(rig.io_at(1000 * 512));
    final_response(&mut rig, c, ib, 2);
    rig.complete_io(rig.io_at(0));
    final_response(&mut rig, c, ia, 2);
    assert_eq!(rig.read_lun(FILE_LUN, 0, a.len()), a);
    assert_eq!(rig.read_lun(FILE_LUN, 1000 * 512, b.len()), b);
}
