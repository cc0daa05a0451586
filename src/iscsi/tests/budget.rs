//! The reactor's buffer budget (`limits.buffer_memory_mib`): commands that find it spent wait
//! in order and start when room comes back, writes whose data is already arriving are answered
//! TASK SET FULL with nothing stored, waiting tasks abort at once, and every byte is given back.

use super::*;

const MIB: u32 = 1 << 20;

/// A rig whose reactor may hold 16 MiB of task buffers (the least allowed).
fn rig_with_16_mib() -> Rig {
    Rig::with_limits(ConnLimits { buffer_memory_mib: 16, ..ConnLimits::default() })
}

/// Sends READ(10) of `len` bytes at `lba` of the file LUN; returns its ITT.
fn file_read(rig: &mut Rig, c: usize, lba: u32, len: u32) -> u32 {
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    rig.send(c, &command(itt, sn, FILE_LUN, &read10(lba, (len / BS) as u16), len, Dir::Read, true), &[]);
    itt
}

/// Holds the whole budget: two 8 MiB file reads whose I/O the store has not completed.
fn spend_the_budget(rig: &mut Rig, c: usize) -> [u32; 2] {
    let held = [file_read(rig, c, 0, 8 * MIB), file_read(rig, c, 0, 8 * MIB)];
    assert_eq!(rig.pending_io().len(), 2);
    assert_eq!(rig.pool.stats().reserved, u64::from(16 * MIB));
    held
}

fn assert_all_given_back(rig: &Rig) {
    let s = rig.pool.stats();
    assert_eq!((s.reserved, s.waiting), (0, 0), "buffer memory still charged after every task ended");
}

#[test]
fn reads_wait_in_order_for_buffer_memory_and_start_when_it_comes_back() {
    let mut rig = rig_with_16_mib();
    let c = rig.logged_in(ISID_A, &Keys::default());
    rig.write_lun(FILE_LUN, 1 << 20, &pattern(9, 8192));
    let held = spend_the_budget(&mut rig, c);
    let first = file_read(&mut rig, c, 2048, 4096);
    let second = file_read(&mut rig, c, 2056, 4096);
    assert!(rig.recv(c).is_empty(), "a read without buffer memory was answered");
    assert_eq!(rig.pending_io().len(), 2, "a read without buffer memory reached the store");
    assert_eq!(rig.pool.stats().waiting, 2);

    // The first held read completes and its Data-In goes out: its 8 MiB come back, and both
    // waiting reads start, in the order they came.
    rig.complete_io(0);
    assert_eq!(data_in_of(&rig.recv(c), held[0]).1.status(), status::GOOD);
    let offsets: Vec<u64> = rig.pending_io().iter().skip(1).map(|(_, r)| r.offset).collect();
    assert_eq!(offsets, [(1 << 20), (1 << 20) + 4096], "the waiting reads did not start in order");
    while !rig.pending_io().is_empty() {
        rig.complete_io(0);
    }
    let pdus = rig.recv(c);
    let (data, st) = data_in_of(&pdus, first);
    assert_eq!((st.status(), &data[..]), (status::GOOD, &pattern(9, 8192)[..4096]));
    let (data, st) = data_in_of(&pdus, second);
    assert_eq!((st.status(), &data[..]), (status::GOOD, &pattern(9, 8192)[4096..]));
    assert_eq!(data_in_of(&pdus, held[1]).1.status(), status::GOOD);
    assert_all_given_back(&rig);
    assert_eq!(rig.pool.stats().waits, 2);
}

#[test]
fn a_write_whose_data_is_arriving_gets_task_set_full_and_stores_nothing() {
    let mut rig = rig_with_16_mib();
    let c = rig.logged_in(ISID_A, &Keys::default());
    spend_the_budget(&mut rig, c);
    // ImmediateData=Yes: the data comes with the command and has nowhere to go.
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    let rsp =
        rig.command_response(c, &command(itt, sn, FILE_LUN, &write10(4096, 8), 4096, Dir::Write, true), &[0xAB; 4096]);
    assert_eq!(rsp.status(), status::TASK_SET_FULL);
    assert_eq!(rig.pending_io().len(), 2, "the refused write reached the store");
    assert_eq!(rig.pool.stats().refused, 1);
    for _ in 0..2 {
        rig.complete_io(0);
    }
    assert!(rig.read_lun(FILE_LUN, 4096 * 512, 4096).iter().all(|&b| b == 0), "a refused write was stored");
    // Retried once the memory is back, it is stored.
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    rig.send(c, &command(itt, sn, FILE_LUN, &write10(4096, 8), 4096, Dir::Write, true), &[0xAB; 4096]);
    rig.complete_io(0);
    assert_eq!(rig.recv(c).iter().find(|p| p.itt() == itt).map(Pdu::status), Some(status::GOOD));
    assert_eq!(rig.read_lun(FILE_LUN, 4096 * 512, 4096), [0xAB; 4096]);
    assert_all_given_back(&rig);
}

#[test]
fn a_write_without_data_yet_waits_for_memory_before_its_r2t() {
    let mut rig = rig_with_16_mib();
    let c = rig.logged_in(ISID_A, &solicited_only());
    spend_the_budget(&mut rig, c);
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    rig.send(c, &command(itt, sn, FILE_LUN, &write10(64, 8), 4096, Dir::Write, true), &[]);
    assert!(rig.recv(c).is_empty(), "an R2T was sent with no buffer to receive its data");
    rig.complete_io(0);
    let pdus = rig.recv(c);
    let r2t = pdus.iter().find(|p| p.opcode() == opcode::R2T).expect("the R2T once memory came back");
    assert_eq!((r2t.itt(), r2t.buffer_offset(), r2t.word44()), (itt, 0, 4096));
    rig.send(c, &data_out(FILE_LUN, itt, r2t.ttt(), 0, 0, true), &pattern(4, 4096));
    let write = rig.pending_io().iter().position(|(_, r)| r.offset == 64 * 512).expect("the write's I/O");
    rig.complete_io(write);
    assert_eq!(rig.recv(c).iter().find(|p| p.itt() == itt).map(Pdu::status), Some(status::GOOD));
    assert_eq!(rig.read_lun(FILE_LUN, 64 * 512, 4096), pattern(4, 4096));
    rig.complete_io(0);
    assert_all_given_back(&rig);
}

#[test]
fn new_commands_queue_behind_waiting_ones_instead_of_overtaking() {
    let mut rig = rig_with_16_mib();
    let a = rig.logged_in(ISID_A, &Keys::default());
    let b = rig.logged_in(ISID_B, &Keys::default());
    // 12 MiB held; A's 8 MiB read does not fit and waits.
    file_read(&mut rig, a, 0, 8 * MIB);
    file_read(&mut rig, a, 0, 4 * MIB);
    file_read(&mut rig, a, 0, 8 * MIB);
    assert_eq!(rig.pool.stats().waiting, 1);
    // B's 4 KiB read would fit in the 4 MiB left, but A waits first: B waits too.
    let small = file_read(&mut rig, b, 0, 4096);
    assert_eq!(rig.pool.stats().waiting, 2);
    assert_eq!(rig.pending_io().len(), 2, "a new command overtook a waiting one");
    // The 4 MiB read ends: A's 8 MiB read starts (the budget is full again), B still waits.
    rig.complete_io(1);
    assert_eq!(rig.pool.stats().waiting, 1);
    let sizes: Vec<u32> = rig.pending_io().iter().map(|(_, r)| r.len).collect();
    assert_eq!(sizes, [8 * MIB, 8 * MIB]);
    // An 8 MiB read ends: B's read starts.
    rig.complete_io(0);
    assert_eq!(rig.pool.stats().waiting, 0);
    assert_eq!(rig.pending_io().last().map(|(c, r)| (*c, r.len)), Some((b, 4096)));
    while !rig.pending_io().is_empty() {
        rig.complete_io(0);
    }
    assert_eq!(data_in_of(&rig.recv(b), small).1.status(), status::GOOD);
    assert_all_given_back(&rig);
}

#[test]
fn abort_task_of_a_command_waiting_for_memory_answers_at_once() {
    let mut rig = rig_with_16_mib();
    let c = rig.logged_in(ISID_A, &Keys::default());
    spend_the_budget(&mut rig, c);
    let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
    rig.send(c, &command(itt, sn, FILE_LUN, &read10(0, 8), 4096, Dir::Read, true), &[]);
    assert_eq!(rig.pool.stats().waiting, 1);
    let tmf_itt = rig.next_itt(c);
    let tmf_sn = rig.slots[c].cmd_sn;
    rig.send(c, &tmf(ABORT_TASK, FILE_LUN, tmf_itt, tmf_sn, itt, sn), &[]);
    let pdus = rig.recv(c);
    assert_eq!(pdus.len(), 1);
    assert_eq!(
        (pdus[0].opcode(), pdus[0].itt(), pdus[0].response()),
        (opcode::TASK_MGMT_RESPONSE, tmf_itt, TMF_COMPLETE)
    );
    assert_eq!(rig.pool.stats().waiting, 0);
    for _ in 0..2 {
        rig.complete_io(0);
    }
    assert!(rig.pending_io().is_empty(), "the aborted read started once memory came back");
    assert!(rig.recv(c).iter().all(|p| p.itt() != itt), "the aborted read was answered");
    assert_all_given_back(&rig);
}

#[test]
fn a_connection_lost_with_commands_waiting_gives_everything_back() {
    let mut rig = rig_with_16_mib();
    let c = rig.logged_in(ISID_A, &Keys::default());
    spend_the_budget(&mut rig, c);
    file_read(&mut rig, c, 0, 4096);
    rig.slots[c].conn.close("peer closed");
    rig.settle();
    assert!(!rig.gone(c), "torn down while its I/O was in flight");
    while !rig.pending_io().is_empty() {
        rig.complete_io(0);
    }
    assert!(rig.gone(c));
    assert_all_given_back(&rig);
}

#[test]
fn a_connection_past_its_share_waits_while_others_go_on() {
    // 64 MiB per reactor: a quarter, 16 MiB, per connection.
    let mut rig = Rig::with_limits(ConnLimits { buffer_memory_mib: 64, ..ConnLimits::default() });
    let a = rig.logged_in(ISID_A, &Keys::default());
    let b = rig.logged_in(ISID_B, &Keys::default());
    spend_the_budget(&mut rig, a);
    // A holds its share; its next read waits although the budget has 48 MiB left.
    let late = file_read(&mut rig, a, 0, 4096);
    assert_eq!((rig.pool.stats().waiting, rig.pending_io().len()), (1, 2));
    // B is not held up behind A.
    let other = file_read(&mut rig, b, 8, 4096);
    assert_eq!(rig.pool.stats().waiting, 1, "B waited behind a connection over its own share");
    let i = rig.pending_io().iter().position(|(c, _)| *c == b).expect("B's read started");
    rig.complete_io(i);
    assert_eq!(data_in_of(&rig.recv(b), other).1.status(), status::GOOD);
    // One of A's reads ends: A's waiting read starts.
    rig.complete_io(0);
    assert_eq!(rig.pool.stats().waiting, 0);
    while !rig.pending_io().is_empty() {
        rig.complete_io(0);
    }
    assert_eq!(data_in_of(&rig.recv(a), late).1.status(), status::GOOD);
    assert_all_given_back(&rig);
}

#[test]
fn a_command_waiting_for_memory_on_a_removed_lun_is_failed_not_started() {
    let mut rig = rig_with_16_mib();
    let c = rig.logged_in(ISID_A, &Keys::default());
    let held = spend_the_budget(&mut rig, c);
    let itt = file_read(&mut rig, c, 0, 4096);
    rig.remove_lun(FILE_LUN);
    let rsp = rig.recv_one(c);
    assert_eq!((rsp.opcode(), rsp.itt(), rsp.status()), (opcode::SCSI_RESPONSE, itt, status::CHECK_CONDITION));
    assert_eq!(rsp.sense(), (0x05, 0x25, 0x00), "LOGICAL UNIT NOT SUPPORTED");
    assert_eq!(rig.pool.stats().waiting, 0);
    // The reads in flight end with their I/O; nothing else reaches the old store.
    rig.complete_io(0);
    rig.complete_io(0);
    assert!(rig.pending_io().is_empty(), "the fenced read started once memory came back");
    let pdus = rig.recv(c);
    for h in held {
        assert!(pdus.iter().any(|p| p.itt() == h && p.has_status()), "a read in flight got no status");
    }
    assert_all_given_back(&rig);
}
