//! The CmdSN window (MaxCmdSN, sized by `limits.max_cmds_per_session`) under a slow store:
//! commands whose I/O has not completed hold it shut, commands beyond it are ignored (RFC 7143
//! §4.2.2.1: silently), and completions open it again.

use super::*;

fn rig_with_window(window: u32) -> Rig {
    Rig::with_limits(ConnLimits { max_cmds_per_session: window, ..ConnLimits::default() })
}

fn file_read(itt: u32, sn: u32, lba: u32) -> [u8; BHS_LEN] {
    command(itt, sn, FILE_LUN, &read10(lba, 8), 4096, Dir::Read, true)
}

#[test]
fn max_cmd_sn_holds_while_the_store_is_slow_and_completions_open_the_window() {
    const WINDOW: u32 = 4;
    let mut rig = rig_with_window(WINDOW);
    let c = rig.logged_in(ISID_A, &Keys::default());
    let base = rig.slots[c].cmd_sn;
    let nop = rig.ping(c);
    assert_eq!((nop.exp_cmd_sn(), nop.max_cmd_sn()), (base, base + WINDOW - 1), "an idle session's window");

    // WINDOW reads whose I/O the store holds: the window is used up, not moved.
    let mut itts = Vec::new();
    for i in 0..WINDOW {
        let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
        rig.send(c, &file_read(itt, sn, i * 8), &[]);
        itts.push(itt);
    }
    assert_eq!(rig.pending_io().len(), WINDOW as usize);
    assert!(rig.recv(c).is_empty());
    let nop = rig.ping(c);
    assert_eq!((nop.exp_cmd_sn(), nop.max_cmd_sn()), (base + WINDOW, base + WINDOW - 1), "window shut");

    // A command beyond MaxCmdSN is ignored: no answer, no I/O, ExpCmdSN stays.
    let late_itt = rig.next_itt(c);
    rig.send(c, &file_read(late_itt, base + WINDOW, 64), &[]);
    rig.send(c, &command(late_itt + 1, base + WINDOW, RAM_LUN, &TEST_UNIT_READY, 0, Dir::None, true), &[]);
    assert!(rig.recv(c).is_empty(), "a command beyond MaxCmdSN was answered");
    assert_eq!(rig.pending_io().len(), WINDOW as usize, "a command beyond MaxCmdSN reached the store");
    assert_eq!(rig.ping(c).exp_cmd_sn(), base + WINDOW);

    // The store completes the third read first: its status comes, and the window opens by one.
    rig.complete_io(2);
    let (_, st) = data_in_of(&rig.recv(c), itts[2]);
    assert_eq!(st.status(), status::GOOD);
    let nop = rig.ping(c);
    assert_eq!(nop.max_cmd_sn(), base + WINDOW, "a completed command frees its place in the window");
    // Now the command that was ignored is accepted.
    rig.send(c, &file_read(late_itt, base + WINDOW, 64), &[]);
    assert_eq!(rig.pending_io().len(), WINDOW as usize);
    // The rest complete in any order; each completion opens the window by one.
    for (n, i) in [2usize, 0, 1, 0].into_iter().enumerate() {
        rig.complete_io(i);
        assert!(rig.recv(c).iter().any(Pdu::has_status));
        let nop = rig.ping(c);
        assert_eq!(nop.max_cmd_sn(), base + WINDOW + 1 + n as u32);
    }
    assert!(rig.pending_io().is_empty());
    let nop = rig.ping(c);
    assert_eq!((nop.exp_cmd_sn(), nop.max_cmd_sn()), (base + WINDOW + 1, base + 2 * WINDOW), "window whole again");
}

#[test]
fn the_status_of_the_only_command_a_window_of_one_allows_opens_it_again() {
    let mut rig = rig_with_window(1);
    let c = rig.logged_in(ISID_A, &Keys::default());
    for i in 0..3u32 {
        let (itt, sn) = (rig.next_itt(c), rig.take_cmd_sn(c));
        rig.send(c, &file_read(itt, sn, i * 8), &[]);
        assert!(rig.recv(c).is_empty());
        rig.complete_io(0);
        let (_, st) = data_in_of(&rig.recv(c), itt);
        // Nothing else may come for a long time (the next NOP-In is 5 s away): the status
        // itself must let the initiator send its next command.
        assert_eq!(st.exp_cmd_sn(), sn + 1);
        assert_eq!(st.max_cmd_sn(), sn + 1, "the status of read {i} leaves the window shut");
    }
}
