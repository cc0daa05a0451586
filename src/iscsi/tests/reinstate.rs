//! Session reinstatement fences the old connection's I/O: a login with the same initiator name
//! and ISID is answered only once the old connection has been torn down, which waits for the
//! backing I/O it has in flight (`Shared::register_session` closes it through `Msg::Close`;
//! its teardown sends `Msg::Fenced`). tests/fencing.rs covers the same over sockets.

use super::*;

#[test]
fn a_reinstating_login_is_answered_only_after_the_old_connections_write_has_landed() {
    let mut rig = Rig::new();
    let old = rig.logged_in(ISID_A, &Keys::default());
    // A write whose data all came (immediate) and whose store write is in flight, and one that
    // waits for the rest of its data (InitialR2T=Yes: solicited by an R2T).
    let (w1, sn) = (rig.next_itt(old), rig.take_cmd_sn(old));
    rig.send(old, &command(w1, sn, FILE_LUN, &write10(0, 8), 4096, Dir::Write, true), &[0x5A; 4096]);
    let (w2, sn) = (rig.next_itt(old), rig.take_cmd_sn(old));
    rig.send(old, &command(w2, sn, FILE_LUN, &write10(64, 16), 8192, Dir::Write, true), &[0x6B; 4096]);
    let r2t = rig.recv_one(old);
    assert_eq!((r2t.opcode(), r2t.itt()), (opcode::R2T, w2));
    assert_eq!(rig.pending_io().len(), 1);
    assert_eq!(rig.sessions(), 1);

    // The same initiator logs in again with the same ISID on a new connection.
    let new = rig.connect();
    assert!(rig.login_request(new, ISID_A, &Keys::default()).is_none(), "login answered before the old I/O ended");
    assert!(rig.slots[old].conn.closing, "the old connection was not told to close");
    assert!(!rig.gone(old), "the old connection went with its write in flight");
    assert!(rig.recv(old).is_empty(), "the closing connection sent more");
    assert_eq!(rig.sessions(), 1, "the new session replaced the old one");

    // The store completes the old write: only then is the old connection gone and the new
    // login answered.
    rig.complete_io(0);
    assert!(rig.gone(old));
    assert!(rig.recv(old).is_empty(), "a status for the old write after the reinstatement");
    let rsp = rig.recv_one(new);
    assert_login_accepted(&rsp);
    assert_ne!(rsp.bhs().tsih(), 0);
    assert_eq!(rsp.bhs().isid(), ISID_A);
    assert_eq!(rig.read_lun(FILE_LUN, 0, 4096), vec![0x5A; 4096], "the old write landed before the answer");
    assert!(rig.read_lun(FILE_LUN, 64 * 512, 8192).iter().all(|&b| b == 0), "half a write reached the store");

    // The new session works: it sees what the old one wrote.
    rig.clear_unit_attention(new, FILE_LUN);
    let (itt, sn) = (rig.next_itt(new), rig.take_cmd_sn(new));
    rig.send(new, &command(itt, sn, FILE_LUN, &read10(0, 8), 4096, Dir::Read, true), &[]);
    rig.complete_io(0);
    assert_eq!(data_in_of(&rig.recv(new), itt).0, vec![0x5A; 4096]);
}

#[test]
fn a_reinstating_login_of_an_idle_session_is_answered_at_once() {
    let mut rig = Rig::new();
    let old = rig.logged_in(ISID_A, &Keys::default());
    let new = rig.connect();
    let rsp = rig.login_request(new, ISID_A, &Keys::default()).expect("answered once the idle connection is gone");
    assert_login_accepted(&rsp);
    assert!(rig.gone(old));
    // Another ISID is another session: nothing is closed for it.
    let other = rig.connect();
    assert_login_accepted(&rig.login_request(other, ISID_B, &Keys::default()).expect("a login response"));
    assert!(!rig.gone(new));
    assert_eq!(rig.sessions(), 2);
}
