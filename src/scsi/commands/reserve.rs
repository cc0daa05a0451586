//! PERSISTENT RESERVE IN / OUT and RESERVE / RELEASE (6/10): CDB and parameter list handling
//! around the LUN's reservation state, and which commands reservations block.

use super::{data_in, Res};
use crate::scsi::cdb::{be16, be32, be64, op};
use crate::scsi::reservations::{self, Access, OutParams, PrError};
use crate::scsi::{status, Disposition, Lun, Nexus, Sense};
use std::sync::Arc;

/// Length of the basic PERSISTENT RESERVE OUT parameter list.
const PROUT_LEN: u32 = 24;

/// How reservations affect a command (SPC-4 table 61, SBC-3 table 13).
pub(super) fn access(cdb: &[u8]) -> Access {
    match cdb[0] {
        op::INQUIRY
        | op::REPORT_LUNS
        | op::REQUEST_SENSE
        | op::PERSISTENT_RESERVE_IN
        | op::MAINTENANCE_IN
        | op::TEST_UNIT_READY
        | op::READ_CAPACITY_10 => Access::Always,
        // READ CAPACITY(16) is allowed; GET LBA STATUS reads the medium's state.
        op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1F == crate::scsi::cdb::sa::READ_CAPACITY_16 => Access::Always,
        op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PRE_FETCH_10
        | op::PRE_FETCH_16
        | op::READ_DEFECT_DATA_10
        | op::READ_DEFECT_DATA_12
        | op::RECEIVE_COPY_RESULTS
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10
        | op::SERVICE_ACTION_IN_16 => Access::Read,
        op::PERSISTENT_RESERVE_OUT => Access::ReserveOut,
        op::RESERVE_6 | op::RESERVE_10 | op::RELEASE_6 | op::RELEASE_10 => Access::Legacy,
        _ => Access::Write,
    }
}

/// The reservation check every command passes: free unless some reservation exists (or the
/// command touches reservations itself).
pub(super) fn check(cdb: &[u8], lun: &Lun, nexus: &Nexus) -> Result<(), Disposition> {
    let a = access(cdb);
    if !lun.pr.active() && !matches!(a, Access::Legacy) {
        return Ok(());
    }
    if lun.pr.conflicts(nexus.identity(), a) {
        return Err(Disposition::Status(status::RESERVATION_CONFLICT));
    }
    Ok(())
}

fn pr_result(r: Result<(), PrError>) -> Res {
    match r {
        Ok(()) => Ok(Disposition::Good),
        Err(PrError::Conflict) => Ok(Disposition::Status(status::RESERVATION_CONFLICT)),
        Err(PrError::Check(s)) => Err(s),
    }
}

/// PERSISTENT RESERVE IN.
pub(super) fn prin(cdb: &[u8], lun: &Lun, buf: &mut [u8]) -> Res {
    let alloc = usize::from(be16(cdb, 7));
    let n = match cdb[1] & 0x1F {
        0 => lun.pr.with(|st| st.read_keys(buf)),
        1 => lun.pr.with(|st| st.read_reservation(buf)),
        2 => lun.pr.with(|st| st.report_capabilities(buf)),
        3 => lun.pr.with(|st| st.read_full_status(buf)),
        _ => return Err(Sense::invalid_field_in_cdb(1, 4)),
    };
    data_in(buf, n, alloc)
}

/// PERSISTENT RESERVE OUT: asks for its parameter list.
pub(super) fn prout(cdb: &[u8], expected_len: u32) -> Res {
    let len = prout_check(cdb)?;
    if expected_len < len {
        return Err(Sense::parameter_list_length_error());
    }
    Ok(Disposition::DataOut { len })
}

fn prout_check(cdb: &[u8]) -> Result<u32, Sense> {
    let len = be32(cdb, 5);
    if cdb[1] & 0x1F == reservations::out_sa::REGISTER_AND_IGNORE + 1 {
        // REGISTER AND MOVE is not supported.
        return Err(Sense::invalid_field_in_cdb(1, 4));
    }
    if len != PROUT_LEN {
        return Err(Sense::parameter_list_length_error());
    }
    Ok(len)
}

pub(super) fn prout_data(cdb: &[u8], lun: &Lun, nexus: &Nexus, data: &[u8]) -> Res {
    prout_check(cdb)?;
    let data = data.get(..PROUT_LEN as usize).ok_or_else(Sense::parameter_list_length_error)?;
    if data[20] & 0x08 != 0 {
        // SPEC_I_PT: registering other initiator ports is not supported (SIP_C = 0).
        return Err(Sense::invalid_field_in_param_list(20, 3));
    }
    let params = OutParams { key: be64(data, 0), sa_key: be64(data, 8), aptpl: data[20] & 0x01 != 0 };
    let me = nexus.identity();
    let (notices, persist) = match lun.pr.out(me, cdb[1] & 0x1F, cdb[2], &params) {
        Ok(n) => n,
        Err(e) => return pr_result(Err(e)),
    };
    let preempted: Vec<Arc<str>> = notices
        .iter()
        .filter(|(_, ua)| *ua == crate::scsi::nexus::ua::REGISTRATIONS_PREEMPTED)
        .map(|(who, _)| who.clone())
        .collect();
    for (who, ua) in notices {
        lun.sessions.post(lun.id, ua, |i| i.identity == who);
    }
    let outcome = if cdb[1] & 0x1F == reservations::out_sa::PREEMPT_AND_ABORT && !preempted.is_empty() {
        // The preempted I_T nexuses' tasks on this LUN are aborted (SPC-4 5.13.11.2.5).
        Disposition::AbortNexuses(preempted)
    } else {
        Disposition::Good
    };
    if persist {
        // APTPL: the sidecar is written on a worker, and the command completes after it.
        lun.pr.stash(data, outcome);
        return Ok(Disposition::Offload { lock: None });
    }
    Ok(outcome)
}

/// The worker half of a PERSISTENT RESERVE OUT under APTPL: makes the sidecar follow the
/// change [`prout_data`] made, then completes the command as that decided.
pub(super) fn prout_persist(lun: &Lun, data: &[u8]) -> Res {
    let outcome = lun.pr.take_stashed(data).unwrap_or(Disposition::Good);
    if let Err(e) = lun.pr.persist() {
        log::error!("LUN {} '{}': persistent reservations not saved: {e}", lun.id, lun.name);
        return Err(reservations::persist_failed());
    }
    Ok(outcome)
}

/// RESERVE(6/10) and RELEASE(6/10) (SPC-2): whole-LUN reservations only.
pub(super) fn legacy(cdb: &[u8], lun: &Lun, nexus: &Nexus) -> Res {
    let reserve = matches!(cdb[0], op::RESERVE_6 | op::RESERVE_10);
    if cdb[0] == op::RESERVE_10 || cdb[0] == op::RELEASE_10 {
        // 3RDPTY and LONGID (third-party reservations) are not supported.
        if cdb[1] & 0x12 != 0 {
            return Err(Sense::invalid_field_in_cdb(1, 4));
        }
    } else if cdb[1] & 0x01 != 0 {
        // Extent reservations (obsolete).
        return Err(Sense::invalid_field_in_cdb(1, 0));
    }
    if reserve {
        pr_result(lun.pr.with(|st| st.legacy_reserve(nexus.inbox())))
    } else {
        lun.pr.with(|st| st.legacy_release(nexus.identity()));
        Ok(Disposition::Good)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::scsi::cdb::{op, put32};
    use crate::scsi::nexus::ua;
    use crate::scsi::reservations::pr_type;
    use crate::scsi::{status, Disposition, LunTable, Nexus, SenseKey};

    const CONFLICT: Disposition = Disposition::Status(status::RESERVATION_CONFLICT);

    fn prout(sa: u8, ty: u8, key: u64, sa_key: u64) -> ([u8; 10], Vec<u8>) {
        let mut c = [op::PERSISTENT_RESERVE_OUT, sa, ty, 0, 0, 0, 0, 0, 0, 0];
        put32(&mut c, 5, 24);
        let mut d = vec![0u8; 24];
        d[..8].copy_from_slice(&key.to_be_bytes());
        d[8..16].copy_from_slice(&sa_key.to_be_bytes());
        (c, d)
    }

    fn out(t: &LunTable, n: &mut Nexus, sa: u8, ty: u8, key: u64, sa_key: u64) -> Disposition {
        let (c, d) = prout(sa, ty, key, sa_key);
        exec_out(t, n, &c, 0, &d)
    }

    fn prin(t: &LunTable, n: &mut Nexus, sa: u8, buf: &mut [u8]) -> Disposition {
        exec(t, n, &[op::PERSISTENT_RESERVE_IN, sa, 0, 0, 0, 0, 0, 0x40, 0, 0], 0, buf)
    }

    fn two() -> (LunTable, Nexus, Nexus) {
        let (t, mut a) = setup();
        let mut b = Nexus::new();
        b.take(0);
        b.take(1);
        // Both sessions have used the LUN.
        assert_eq!(exec(&t, &mut a, &[0u8; 6], 0, &mut [0; 8]), Disposition::Good);
        assert_eq!(exec(&t, &mut b, &[0u8; 6], 0, &mut [0; 8]), Disposition::Good);
        (t, a, b)
    }

    #[test]
    fn reservation_blocks_other_sessions_io() {
        let (t, mut a, mut b) = two();
        let mut buf = [0u8; 64];
        let rd = cdb10(op::READ_10, 0, 1, 1);
        let wr = cdb10(op::WRITE_10, 0, 1, 1);
        assert_eq!(out(&t, &mut a, 6, 0, 0, 0xA), Disposition::Good);
        assert!(!t.get(0).unwrap().pr.active(), "registrations alone block nothing");
        assert_eq!(out(&t, &mut a, 1, pr_type::EXCLUSIVE_ACCESS, 0xA, 0), Disposition::Good);
        assert!(t.get(0).unwrap().pr.active());
        assert!(matches!(exec(&t, &mut a, &rd, 0, &mut buf), Disposition::Read { .. }));
        assert!(matches!(exec(&t, &mut a, &wr, 0, &mut buf), Disposition::Write { .. }));
        assert_eq!(exec(&t, &mut b, &rd, 0, &mut buf), CONFLICT);
        assert_eq!(exec(&t, &mut b, &wr, 0, &mut buf), CONFLICT);
        assert_eq!(exec(&t, &mut b, &[0u8; 6], 0, &mut buf), Disposition::Good, "TEST UNIT READY passes");
        assert_eq!(prin(&t, &mut b, 1, &mut buf), Disposition::DataIn(24));
        assert_eq!((buf[15], buf[21]), (0xA, pr_type::EXCLUSIVE_ACCESS));
        // Another LUN is not affected.
        assert!(matches!(exec(&t, &mut b, &rd, 1, &mut buf), Disposition::Read { .. }));
        // b registers and preempts a: a hears REGISTRATIONS PREEMPTED.
        assert_eq!(out(&t, &mut b, 6, 0, 0, 0xB), Disposition::Good);
        assert_eq!(out(&t, &mut b, 4, pr_type::WRITE_EXCLUSIVE, 0xB, 0xA), Disposition::Good);
        assert_eq!(check(exec(&t, &mut a, &rd, 0, &mut buf)), (SenseKey::UnitAttention, 0x2A, 0x05));
        assert_eq!(exec(&t, &mut a, &rd, 0, &mut buf), Disposition::Read { offset: 512, len: 512 });
        assert_eq!(exec(&t, &mut a, &wr, 0, &mut buf), CONFLICT);
        assert_eq!(prin(&t, &mut a, 0, &mut buf), Disposition::DataIn(16));
        assert_eq!(&buf[..8], &[0, 0, 0, 3, 0, 0, 0, 8]);
        // CLEAR by b: a is no longer registered, so it hears nothing; the LUN is free.
        assert_eq!(out(&t, &mut b, 3, 0, 0xB, 0), Disposition::Good);
        assert!(!t.get(0).unwrap().pr.active());
        assert!(matches!(exec(&t, &mut a, &wr, 0, &mut buf), Disposition::Write { .. }));
    }

    #[test]
    fn clear_tells_other_registrants() {
        let (t, mut a, mut b) = two();
        let mut buf = [0u8; 64];
        assert_eq!(out(&t, &mut a, 6, 0, 0, 1), Disposition::Good);
        assert_eq!(out(&t, &mut b, 6, 0, 0, 2), Disposition::Good);
        assert_eq!(out(&t, &mut a, 3, 0, 1, 0), Disposition::Good);
        assert_eq!(check(exec(&t, &mut b, &[0u8; 6], 0, &mut buf)), (SenseKey::UnitAttention, 0x2A, 0x03));
        assert_eq!(exec(&t, &mut a, &[0u8; 6], 0, &mut buf), Disposition::Good);
        let _ = ua::RESERVATIONS_PREEMPTED;
    }

    #[test]
    fn prin_and_prout_field_checks() {
        let (t, mut a, _) = two();
        let mut buf = [0u8; 64];
        for sa in 0..4 {
            assert!(matches!(prin(&t, &mut a, sa, &mut buf), Disposition::DataIn(_)), "sa {sa}");
        }
        for sa in 4..0x20 {
            assert_eq!(sense(prin(&t, &mut a, sa, &mut buf)).asc, 0x24, "sa {sa}");
        }
        assert_eq!(prin(&t, &mut a, 2, &mut buf), Disposition::DataIn(8));
        assert_eq!(&buf[..2], &[0, 8]);
        // Wrong parameter list length, REGISTER AND MOVE, SPEC_I_PT, APTPL.
        let (mut c, d) = prout(0, 0, 0, 1);
        put32(&mut c, 5, 20);
        assert_eq!(check(exec_out(&t, &mut a, &c, 0, &d[..20])), (SenseKey::IllegalRequest, 0x1A, 0));
        let (c, d) = prout(7, 0, 0, 1);
        assert_eq!(sense(exec_out(&t, &mut a, &c, 0, &d)).asc, 0x24);
        let (c, mut d) = prout(6, 0, 0, 1);
        d[20] = 0x08;
        assert_eq!(sense(exec_out(&t, &mut a, &c, 0, &d)).asc, 0x26);
        d[20] = 0x01;
        assert_eq!(sense(exec_out(&t, &mut a, &c, 0, &d)).asc, 0x26);
        // ALL_TG_PT is fine: there is one target port.
        d[20] = 0x04;
        assert_eq!(exec_out(&t, &mut a, &c, 0, &d), Disposition::Good);
        assert_eq!(out(&t, &mut a, 0, 0, 9, 2), CONFLICT, "wrong key");
    }

    #[test]
    fn reserve_6_and_release_6() {
        let (t, mut a, mut b) = two();
        let mut buf = vec![0u8; 4096];
        let (res, rel) = ([op::RESERVE_6, 0, 0, 0, 0, 0], [op::RELEASE_6, 0, 0, 0, 0, 0]);
        assert_eq!(exec(&t, &mut a, &res, 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut b, &res, 0, &mut buf), CONFLICT);
        assert_eq!(exec(&t, &mut b, &cdb10(op::READ_10, 0, 0, 1), 0, &mut buf), CONFLICT);
        assert_eq!(exec(&t, &mut b, &[op::INQUIRY, 0, 0, 0, 36, 0], 0, &mut buf), Disposition::DataIn(36));
        assert_eq!(exec(&t, &mut b, &rel, 0, &mut buf), Disposition::Good, "not the holder: no effect");
        assert_eq!(exec(&t, &mut b, &cdb10(op::WRITE_10, 0, 0, 1), 0, &mut buf), CONFLICT);
        // A LUN reset ends it, and both sessions hear of the reset.
        b.lun_reset(t.get(0).unwrap());
        assert_eq!(check(exec(&t, &mut a, &[0u8; 6], 0, &mut buf)), (SenseKey::UnitAttention, 0x29, 0x03));
        assert_eq!(check(exec(&t, &mut b, &[0u8; 6], 0, &mut buf)), (SenseKey::UnitAttention, 0x29, 0x03));
        assert_eq!(
            exec(&t, &mut b, &cdb10(op::READ_10, 0, 0, 1), 0, &mut buf),
            Disposition::Read { offset: 0, len: 512 }
        );
        assert_eq!(sense(exec(&t, &mut a, &[op::RESERVE_6, 1, 0, 0, 0, 0], 0, &mut buf)).asc, 0x24);
        // With persistent registrations RESERVE and RELEASE conflict.
        assert_eq!(out(&t, &mut a, 6, 0, 0, 1), Disposition::Good);
        assert_eq!(exec(&t, &mut a, &res, 0, &mut buf), CONFLICT);
        assert_eq!(exec(&t, &mut b, &rel, 0, &mut buf), CONFLICT);
    }

    #[test]
    fn session_end_releases_reserve_6() {
        let (t, mut a, mut b) = two();
        let mut buf = [0u8; 64];
        assert_eq!(exec(&t, &mut b, &[op::RESERVE_6, 0, 0, 0, 0, 0], 0, &mut buf), Disposition::Good);
        let rd = cdb10(op::READ_10, 0, 0, 1);
        assert_eq!(exec(&t, &mut a, &rd, 0, &mut buf), CONFLICT);
        drop(b);
        assert_eq!(exec(&t, &mut a, &rd, 0, &mut buf), Disposition::Read { offset: 0, len: 512 });
    }

    /// A table with LUN 0 over an image file in `dir`, and two sessions that have used it.
    fn file_lun(dir: &std::path::Path) -> (LunTable, Nexus, Nexus) {
        use crate::backing::Backing;
        let image = dir.join("disk.img");
        if !image.exists() {
            std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        }
        let backing = Backing::open_file(&image, false).unwrap();
        let lun = crate::scsi::Lun::new(0, "disk", Some(image), backing, false, "iqn.test:t");
        let t = LunTable::new(vec![std::sync::Arc::new(lun)]);
        let (mut a, mut b) = (Nexus::new(), Nexus::new());
        a.set_identity("iqn.test:a", [0x80, 0, 0, 0, 0, 1]);
        b.set_identity("iqn.test:b", [0x80, 0, 0, 0, 0, 2]);
        for n in [&mut a, &mut b] {
            n.take(0);
            assert_eq!(exec(&t, n, &[0u8; 6], 0, &mut [0; 8]), Disposition::Good);
        }
        (t, a, b)
    }

    fn out_aptpl(t: &LunTable, n: &mut Nexus, sa: u8, ty: u8, key: u64, sa_key: u64) -> Disposition {
        let (c, mut d) = prout(sa, ty, key, sa_key);
        d[20] = 0x01;
        exec_out(t, n, &c, 0, &d)
    }

    #[test]
    fn aptpl_changes_are_written_by_the_worker_half_and_survive_a_new_lun() {
        use crate::scsi::{execute_data_out, Request};
        let dir = tempfile::tempdir().unwrap();
        let side = crate::scsi::reservations::sidecar_path(&dir.path().join("disk.img"));
        let (t, mut a, mut b) = file_lun(dir.path());
        let mut buf = [0u8; 64];
        assert_eq!(prin(&t, &mut a, 2, &mut buf), Disposition::DataIn(8));
        assert_eq!((buf[2] & 1, buf[3] & 1), (1, 0), "PTPL_C, not PTPL_A");
        // The reactor half changes the state and hands the write to a worker.
        let (c, mut d) = prout(0, 0, 0, 0xA);
        d[20] = 0x01;
        let r = Request { cdb: &c, lun: Some(0), expected_len: 24, read: false, write: true };
        assert_eq!(execute_data_out(&r, &t, &mut a, &d, &mut buf), Disposition::Offload { lock: None });
        assert!(!side.exists(), "nothing written on the reactor");
        assert_eq!(crate::scsi::execute_offloaded(&r, t.get(0).unwrap(), &d, &mut buf), Disposition::Good);
        assert!(side.exists());
        assert_eq!(out_aptpl(&t, &mut b, 6, 0, 0, 0xB), Disposition::Good);
        assert_eq!(out(&t, &mut a, 1, pr_type::WRITE_EXCLUSIVE, 0xA, 0), Disposition::Good);
        assert_eq!(prin(&t, &mut a, 2, &mut buf), Disposition::DataIn(8));
        assert_eq!(buf[3] & 1, 1, "PTPL_A");
        // PREEMPT AND ABORT still aborts the preempted nexus after the write.
        let d = out(&t, &mut b, 5, pr_type::EXCLUSIVE_ACCESS, 0xB, 0xA);
        assert_eq!(d, Disposition::AbortNexuses(vec![a.identity().clone()]));

        // The same image opened again (a restart, or add_lun replacing it) has it all back.
        drop(t);
        let (t, mut a, mut b) = file_lun(dir.path());
        assert_eq!(prin(&t, &mut a, 0, &mut buf), Disposition::DataIn(16));
        assert_eq!(&buf[8..16], &0xBu64.to_be_bytes(), "only b's key is left");
        assert_eq!(prin(&t, &mut a, 1, &mut buf), Disposition::DataIn(24));
        assert_eq!((buf[15], buf[21]), (0xB, pr_type::EXCLUSIVE_ACCESS));
        assert_eq!(exec(&t, &mut a, &cdb10(op::READ_10, 0, 0, 1), 0, &mut buf), CONFLICT);
        assert!(matches!(exec(&t, &mut b, &cdb10(op::READ_10, 0, 0, 1), 0, &mut buf), Disposition::Read { .. }));
        // APTPL=0 in b's next REGISTER ends persistence: the sidecar goes.
        assert_eq!(out(&t, &mut b, 0, 0, 0xB, 0xC), Disposition::Good);
        assert!(!side.exists());
        assert_eq!(prin(&t, &mut a, 2, &mut buf), Disposition::DataIn(8));
        assert_eq!((buf[2] & 1, buf[3] & 1), (1, 0));
    }

    #[test]
    fn ram_luns_refuse_aptpl() {
        let (t, mut a, _) = two();
        let mut buf = [0u8; 64];
        assert_eq!(prin(&t, &mut a, 2, &mut buf), Disposition::DataIn(8));
        assert_eq!((buf[2] & 1, buf[3] & 1), (0, 0), "no PTPL_C on a RAM LUN");
        assert_eq!(
            check(out_aptpl(&t, &mut a, 0, 0, 0, 1)),
            (SenseKey::IllegalRequest, 0x26, 0x00),
            "INVALID FIELD IN PARAMETER LIST"
        );
        assert_eq!(prin(&t, &mut a, 0, &mut buf), Disposition::DataIn(8), "not registered");
    }
}
