//! CmdSN ordering (RFC 7143 §4.2.2.1): commands that arrive ahead of ExpCmdSN wait for the gap
//! to fill, then run in CmdSN order.

use super::*;

/// READ(10) of 8 blocks at `lba`.
fn read8(itt: u32, sn: u32, lun: u64, lba: u32) -> [u8; BHS_LEN] {
    command(itt, sn, lun, &read10(lba, 8), 4096, Dir::Read, true)
}

#[test]
fn commands_ahead_of_exp_cmd_sn_wait_for_the_gap_then_run_in_cmd_sn_order() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &Keys::default());
    for (lun, lba, seed) in [(RAM_LUN, 0u32, 1), (FILE_LUN, 8, 2), (RAM_LUN, 16, 3), (RAM_LUN, 24, 4)] {
        rig.write_lun(lun, u64::from(lba) * 512, &pattern(seed, 4096));
    }
    let base = rig.take_cmd_sn(c);
    for _ in 0..3 {
        rig.take_cmd_sn(c);
    }
    // base+3, base+2 and base+1 (a file read) arrive first: all held, nothing reaches the store.
    rig.send(c, &read8(0x13, base + 3, RAM_LUN, 24), &[]);
    rig.send(c, &read8(0x12, base + 2, RAM_LUN, 16), &[]);
    rig.send(c, &read8(0x11, base + 1, FILE_LUN, 8), &[]);
    assert!(rig.recv(c).is_empty(), "commands past a CmdSN gap are answered");
    assert!(rig.pending_io().is_empty(), "a held command started its I/O");
    let nop = rig.ping(c);
    assert_eq!(nop.exp_cmd_sn(), base, "ExpCmdSN moved past a gap");
    let stat_sn = nop.stat_sn() + 1;

    // The gap fills: base runs, then the held ones in CmdSN order.
    rig.send(c, &read8(0x10, base, RAM_LUN, 0), &[]);
    let out = rig.recv(c);
    let statuses: Vec<&Pdu> = out.iter().filter(|p| p.has_status()).collect();
    let order: Vec<u32> = statuses.iter().map(|p| p.itt()).collect();
    assert_eq!(order, [0x10, 0x12, 0x13], "RAM reads answered in CmdSN order (the file read waits for its I/O)");
    // Each status carries the ExpCmdSN of when it was built: base+1 after base ran, and so on.
    let exp: Vec<u32> = statuses.iter().map(|p| p.exp_cmd_sn()).collect();
    assert_eq!(exp, [base + 1, base + 3, base + 4]);
    let sns: Vec<u32> = statuses.iter().map(|p| p.stat_sn()).collect();
    assert_eq!(sns, [stat_sn, stat_sn + 1, stat_sn + 2], "StatSN counts statuses in the order sent");
    for (itt, seed) in [(0x10, 1), (0x12, 3), (0x13, 4)] {
        assert_eq!(data_in_of(&out, itt).0, pattern(seed, 4096), "Data-In of ITT {itt:#x}");
    }

    // The file read was started when its turn came; it completes whenever the store does.
    let io = rig.pending_io();
    assert_eq!(io.len(), 1);
    assert_eq!((io[0].1.kind, io[0].1.offset, io[0].1.len), (IoKind::Read, 8 * 512, 4096));
    rig.complete_io(0);
    let out = rig.recv(c);
    let (data, st) = data_in_of(&out, 0x11);
    assert_eq!(data, pattern(2, 4096));
    assert_eq!((st.status(), st.exp_cmd_sn(), st.stat_sn()), (status::GOOD, base + 4, stat_sn + 3));
}

#[test]
fn a_cmd_sn_taken_twice_or_already_past_is_ignored() {
    let mut rig = Rig::new();
    let c = rig.logged_in(ISID_A, &Keys::default());
    let base = rig.take_cmd_sn(c);
    rig.take_cmd_sn(c);
    // base+1 twice while base is missing: the second copy is not a second command.
    rig.send(c, &read8(0x21, base + 1, RAM_LUN, 0), &[]);
    rig.send(c, &read8(0x22, base + 1, RAM_LUN, 0), &[]);
    rig.send(c, &read8(0x20, base, RAM_LUN, 0), &[]);
    let order: Vec<u32> = rig.recv(c).iter().filter(|p| p.has_status()).map(Pdu::itt).collect();
    assert_eq!(order, [0x20, 0x21]);
    // A CmdSN below ExpCmdSN is outside the window: silently ignored.
    rig.send(c, &read8(0x23, base, RAM_LUN, 0), &[]);
    assert!(rig.recv(c).is_empty(), "a stale CmdSN was answered");
    assert_eq!(rig.ping(c).exp_cmd_sn(), base + 2);
    assert!(!rig.gone(c));
}
