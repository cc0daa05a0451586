//! ABORT TASK and LOGICAL UNIT RESET while data is moving either way: a WRITE waiting for its
//! Data-Out, a WRITE whose store write is in flight, a READ whose file read is in flight. The
//! response waits for the I/O of every task it aborted; an aborted task sends nothing more and
//! its late Data-Out is dropped without reaching the store.

use super::*;

/// Sends WRITE(10) of `len` bytes at `lba` of the file LUN with no data; returns (ITT, CmdSN,
/// TTT of its R2T).
fn write_waiting_for_data(rig: &mut Rig, c: usize, lba: u32, len: u32) -> (u32, u32, u32) {
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    rig.send(c, &command(itt, sn, FILE_LUN, &write10(lba, (len / BS) as u16), len, Dir::Write, true), &[]);
    let r2t = rig.recv_one(c);
    assert_eq!((r2t.opcode(), r2t.itt()), (opcode::R2T, itt));
    (itt, sn, r2t.ttt())
}

/// Sends READ(10) of `len` bytes at `lba` of the file LUN; returns (ITT, CmdSN) once its file
/// read is pending.
fn read_in_flight(rig: &mut Rig, c: usize, lba: u32, len: u32) -> (u32, u32) {
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    let pending = rig.pending_io().len();
    rig.send(c, &command(itt, sn, FILE_LUN, &read10(lba, (len / BS) as u16), len, Dir::Read, true), &[]);
    assert!(rig.recv(c).is_empty(), "a file read answered before its I/O");
    assert_eq!(rig.pending_io().len(), pending + 1, "the read's I/O is pending");
    (itt, sn)
}

fn abort_task(rig: &mut Rig, c: usize, rtt: u32, ref_cmd_sn: u32) -> u32 {
    let itt = rig.next_itt(c);
    let sn = rig.slots[c].cmd_sn;
    assert!(rig.send(c, &tmf(ABORT_TASK, FILE_LUN, itt, sn, rtt, ref_cmd_sn), &[]));
    itt
}

fn assert_tmf_complete(pdus: &[Pdu], itt: u32) {
    let ops: Vec<(u8, u32)> = pdus.iter().map(|p| (p.opcode(), p.itt())).collect();
    assert_eq!(ops, [(opcode::TASK_MGMT_RESPONSE, itt)], "only the TMF response");
    assert_eq!(pdus[0].response(), TMF_COMPLETE, "function complete");
}

#[test]
fn abort_task_of_a_write_waiting_for_data_out_answers_at_once_and_drops_its_data() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &solicited_only());
    let (itt, sn, ttt) = write_waiting_for_data(&mut rig, c, 0, 4096);
    let tmf_itt = abort_task(&mut rig, c, itt, sn);
    assert_tmf_complete(&rig.recv(c), tmf_itt);
    // The initiator's Data-Out was already on its way: dropped, not a protocol error.
    assert!(rig.send(c, &data_out(FILE_LUN, itt, ttt, 0, 0, true), &[0xAB; 4096]));
    assert!(rig.recv(c).is_empty(), "data of an aborted task was answered");
    assert!(rig.pending_io().is_empty(), "data of an aborted task went to the store");
    assert!(!rig.gone(c));
    assert!(rig.read_lun(FILE_LUN, 0, 4096).iter().all(|&b| b == 0));
    assert_eq!(rig.ping(c).exp_cmd_sn(), sn + 1, "the session goes on");
}

#[test]
fn abort_task_of_a_read_in_flight_answers_after_its_io_and_sends_no_data() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &Keys::default());
    rig.write_lun(FILE_LUN, 0, &pattern(5, 65536));
    let (itt, sn) = read_in_flight(&mut rig, c, 0, 65536);
    let tmf_itt = abort_task(&mut rig, c, itt, sn);
    assert!(rig.recv(c).is_empty(), "ABORT TASK answered while the task's read is in flight");
    // The read lands in the task's buffer, which the connection kept for it.
    rig.complete_io(0);
    assert_tmf_complete(&rig.recv(c), tmf_itt);
    assert_eq!(rig.slots[c].conn.work_inflight(), 0);
    // The ITT is free again: a new read under it gets its data.
    let sn = rig.take_cmd_sn(c);
    rig.send(c, &command(itt, sn, RAM_LUN, &read10(0, 8), 4096, Dir::Read, true), &[]);
    let (_, st) = data_in_of(&rig.recv(c), itt);
    assert_eq!(st.status(), status::GOOD);
}

#[test]
fn abort_task_of_a_write_in_flight_answers_once_the_write_has_landed() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &Keys::default());
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    // ImmediateData=Yes: all 4 KiB come with the command, and the write starts at once.
    rig.send(c, &command(itt, sn, FILE_LUN, &write10(8, 8), 4096, Dir::Write, true), &[0xCD; 4096]);
    assert_eq!(rig.pending_io().len(), 1);
    let tmf_itt = abort_task(&mut rig, c, itt, sn);
    assert!(rig.recv(c).is_empty(), "ABORT TASK answered while the task's write is in flight");
    rig.complete_io(0);
    // Answered only now; the write itself gets no status.
    assert_tmf_complete(&rig.recv(c), tmf_itt);
}

#[test]
fn lun_reset_aborts_every_sessions_transfers_and_answers_after_the_io_in_flight() {
    let mut rig = Rig::new();
    let a = rig.logged_in(ISID_A, &solicited_only());
    let b = rig.logged_in(ISID_B, &solicited_only());
    rig.write_lun(FILE_LUN, 1 << 20, &pattern(3, 8192));
    // On the file LUN, each session has a WRITE waiting for Data-Out and a READ in flight.
    let (wa, _, ttt_a) = write_waiting_for_data(&mut rig, a, 0, 4096);
    read_in_flight(&mut rig, a, 2048, 8192);
    let (wb, _, ttt_b) = write_waiting_for_data(&mut rig, b, 16, 4096);
    read_in_flight(&mut rig, b, 2048, 8192);
    // And session B has a read on the RAM LUN, which the reset does not touch.
    let (ram_itt, ram_sn) = (rig.next_itt(b), rig.take_cmd_sn(b));

    let tmf_itt = rig.next_itt(a);
    let sn = rig.slots[a].cmd_sn;
    assert!(rig.send(a, &tmf(LOGICAL_UNIT_RESET, FILE_LUN, tmf_itt, sn, RESERVED_TAG, 0), &[]));
    assert!(rig.recv(a).is_empty(), "LUN RESET answered while A's read is in flight");
    assert!(rig.recv(b).is_empty(), "B was told of the abort (TAS=0: silently)");
    rig.send(b, &command(ram_itt, ram_sn, RAM_LUN, &read10(0, 8), 4096, Dir::Read, true), &[]);
    assert_eq!(data_in_of(&rig.recv(b), ram_itt).1.status(), status::GOOD, "another LUN's command runs");

    let (io_a, io_b): (Vec<usize>, Vec<usize>) = (0..2).partition(|&i| rig.pending_io()[i].0 == a);
    assert_eq!((io_a.len(), io_b.len()), (1, 1));
    // B's read completes first: nothing for B, and A still waits for its own read.
    rig.complete_io(io_b[0]);
    assert!(rig.recv(b).is_empty(), "Data-In of an aborted read was sent");
    assert!(rig.recv(a).is_empty());
    rig.complete_io(0);
    assert_tmf_complete(&rig.recv(a), tmf_itt);
    for (c, itt, ttt) in [(a, wa, ttt_a), (b, wb, ttt_b)] {
        // Late Data-Out of the aborted writes is dropped.
        assert!(rig.send(c, &data_out(FILE_LUN, itt, ttt, 0, 0, true), &[0xAB; 4096]));
        assert!(rig.recv(c).is_empty());
    }
    assert!(rig.pending_io().is_empty(), "aborted data went to the store");
    assert!(rig.read_lun(FILE_LUN, 0, 16 * 512 + 4096).iter().all(|&x| x == 0));
    // Both sessions learn of the reset from a unit attention, and go on.
    for c in [a, b] {
        let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
        let rsp = rig.command_response(c, &command(itt, sn, FILE_LUN, &TEST_UNIT_READY, 0, Dir::None, true), &[]);
        assert_eq!(rsp.status(), status::CHECK_CONDITION);
        let (key, asc, _) = rsp.sense();
        assert_eq!((key, asc), (0x06, 0x29), "UNIT ATTENTION: reset occurred");
        assert!(!rig.gone(c));
    }
}

#[test]
fn lun_reset_answers_only_after_another_sessions_write_in_flight_has_landed() {
    let mut rig = Rig::new();
    let a = rig.logged_in(ISID_A, &Keys::default());
    let b = rig.logged_in(ISID_B, &Keys::default());
    // B's write has all its data (immediate) and its store write is in flight.
    let (itt, sn) = (rig.next_itt(b), rig.take_cmd_sn(b));
    rig.send(b, &command(itt, sn, FILE_LUN, &write10(0, 8), 4096, Dir::Write, true), &[0x0B; 4096]);
    assert_eq!(rig.pending_io().len(), 1);
    let tmf_itt = rig.next_itt(a);
    let sn = rig.slots[a].cmd_sn;
    assert!(rig.send(a, &tmf(LOGICAL_UNIT_RESET, FILE_LUN, tmf_itt, sn, RESERVED_TAG, 0), &[]));
    // Once A hears "function complete" it may write the same blocks; B's old write must not
    // land after that, so the answer waits for it.
    assert!(rig.recv(a).is_empty(), "LUN RESET answered while another session's write is in flight");
    rig.complete_io(0);
    assert_tmf_complete(&rig.recv(a), tmf_itt);
    assert!(rig.recv(b).is_empty(), "the aborted write got a status");
}
