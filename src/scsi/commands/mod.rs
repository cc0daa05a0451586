//! Command execution: dispatch by operation code, LUN and unit attention rules (SAM-5 / SPC-4).
//!
//! [`execute`] answers everything it can at once; hot-path reads, writes and flushes come back
//! as byte ranges for the transport, and commands that carry a parameter list come back as
//! [`Disposition::DataOut`] and finish in [`execute_data_out`].

mod block;
mod info;
mod inquiry;
mod mode;
mod reserve;
pub(crate) mod sanitize;
pub(crate) mod xcopy;

use super::cdb::{self, op, sa};
use super::{Disposition, Lun, LunTable, Nexus, Request, Sense};

pub use block::{
    MAX_ATOMIC_BLOCKS, MAX_CAW_BLOCKS, MAX_TRANSFER_BLOCKS, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME_BLOCKS,
};

/// A command's outcome before it becomes a [`Disposition`]: errors are sense data.
type Res = Result<Disposition, Sense>;

/// Executes a command from its CDB. Data-In goes to `data_in` (cut to the allocation length).
pub fn execute(req: &Request, table: &LunTable, nexus: &mut Nexus, data_in: &mut [u8]) -> Disposition {
    run(req, table, nexus, data_in).unwrap_or_else(Disposition::Check)
}

/// Finishes a command that asked for Data-Out with [`Disposition::DataOut`], once `data_out`
/// holds the bytes it asked for.
pub fn execute_data_out(
    req: &Request,
    table: &LunTable,
    nexus: &mut Nexus,
    data_out: &[u8],
    data_in: &mut [u8],
) -> Disposition {
    // Nothing here produces Data-In or touches unit attentions: those were settled when the
    // command started.
    let _ = data_in;
    run_data_out(req, table, nexus, data_out).unwrap_or_else(Disposition::Check)
}

/// Runs the work of a command that returned [`Disposition::Offload`], on a worker thread (it
/// may block on the backing store): `data_out` holds its Data-Out (empty when it has none),
/// Data-In goes to `data_in` (at least 64 bytes, whatever the command's R bit). The checks of the first phase are repeated (they are cheap and
/// keep each work function whole).
pub fn execute_offloaded(req: &Request, lun: &Lun, data_out: &[u8], data_in: &mut [u8]) -> Disposition {
    run_offloaded(req, lun, data_out, data_in).unwrap_or_else(Disposition::Check)
}

fn run_offloaded(req: &Request, lun: &Lun, data_out: &[u8], data_in: &mut [u8]) -> Res {
    let cdb = checked_cdb(req)?;
    match cdb[0] {
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => block::write_same_work(cdb, lun, data_out),
        op::UNMAP => block::unmap_work(cdb, lun, data_out),
        op::COMPARE_AND_WRITE => block::compare_and_write_work(cdb, lun, data_out),
        op::ORWRITE_16 => block::orwrite_work(cdb, lun, data_out),
        op::WRITE_ATOMIC_16 => block::write_atomic_work(cdb, lun, data_out),
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => block::verify_work(cdb, lun, data_out),
        op::SANITIZE => sanitize::work(cdb, lun, data_out),
        op::PERSISTENT_RESERVE_OUT => reserve::prout_persist(lun, data_out),
        op::SERVICE_ACTION_IN_16 if cdb::service_action(cdb) == Some(sa::GET_LBA_STATUS) => {
            info::get_lba_status(cdb, lun, data_in)
        }
        _ => Err(Sense::invalid_opcode()),
    }
}

/// Checks the CDB's length and control byte; returns it cut to the opcode's length.
fn checked_cdb<'a>(req: &Request<'a>) -> Result<&'a [u8], Sense> {
    let cdb = req.cdb;
    let opcode = *cdb.first().ok_or_else(Sense::invalid_opcode)?;
    let len = cdb::cdb_len(opcode).ok_or_else(Sense::invalid_opcode)?;
    if cdb.len() < len {
        // Only possible with a truncated extended CDB: the opcode promises more bytes.
        return Err(Sense::invalid_field_in_cdb(0, 7));
    }
    let cdb = &cdb[..len];
    // NACA (ACA is not supported); LINK is obsolete and rejected too.
    if cdb[len - 1] & 0x04 != 0 {
        return Err(Sense::invalid_field_in_cdb(len as u16 - 1, 2));
    }
    if cdb[len - 1] & 0x01 != 0 {
        return Err(Sense::invalid_field_in_cdb(len as u16 - 1, 0));
    }
    Ok(cdb)
}

fn run(req: &Request, table: &LunTable, nexus: &mut Nexus, data_in: &mut [u8]) -> Res {
    let cdb = checked_cdb(req)?;
    let opcode = cdb[0];
    nexus.expand(table);
    if opcode == op::REPORT_LUNS {
        return info::report_luns(cdb, table, nexus, data_in);
    }
    let Some(lun) = req.lun.and_then(|id| table.get(id)) else {
        return match opcode {
            op::INQUIRY => inquiry::inquiry(cdb, None, data_in),
            op::REQUEST_SENSE => info::sense_data(cdb, &Sense::lun_not_supported(), data_in),
            _ => Err(Sense::lun_not_supported()),
        };
    };
    nexus.sync(lun);
    // SBC-3 4.11: while a SANITIZE runs only INQUIRY, REPORT LUNS (above) and REQUEST SENSE
    // (which reports this) are served.
    if let Some(busy) = lun.sanitize.in_progress() {
        return match opcode {
            op::INQUIRY => inquiry::inquiry(cdb, Some(lun), data_in),
            op::REQUEST_SENSE => info::sense_data(cdb, &busy, data_in),
            _ => Err(busy),
        };
    }
    if !matches!(opcode, op::INQUIRY | op::REQUEST_SENSE) {
        if let Some((asc, ascq)) = nexus.take(lun.id) {
            return Err(Sense::unit_attention(asc, ascq));
        }
    }
    if let Err(conflict) = reserve::check(cdb, lun, nexus) {
        return Ok(conflict);
    }
    // One branch on fixed LUNs; a removable one also loads its medium flag.
    if !lun.medium_present() && needs_medium(opcode) {
        return Err(Sense::medium_not_present());
    }
    match opcode {
        op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => block::read(cdb, lun),
        op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => block::write(cdb, lun),
        op::WRITE_VERIFY_10 | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16 => block::write_verify(cdb, lun),
        op::SYNC_CACHE_10 | op::SYNC_CACHE_16 => block::sync_cache(cdb, lun),
        op::TEST_UNIT_READY => Ok(Disposition::Good),
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => block::verify(cdb, lun),
        op::PRE_FETCH_10 | op::PRE_FETCH_16 => block::prefetch(cdb, lun),
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => block::write_same(cdb, lun, req.expected_len),
        op::UNMAP => block::unmap(cdb, lun),
        op::COMPARE_AND_WRITE => block::compare_and_write(cdb, lun, req.expected_len),
        op::ORWRITE_16 => block::orwrite(cdb, lun),
        op::WRITE_ATOMIC_16 => block::write_atomic(cdb, lun),
        op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => info::read_defect_data(cdb, data_in),
        op::EXTENDED_COPY => xcopy::extended_copy(cdb),
        op::RECEIVE_COPY_RESULTS => xcopy::receive_copy_results(cdb, lun, nexus, data_in),
        op::REQUEST_SENSE => info::request_sense(cdb, lun, nexus, data_in),
        op::INQUIRY => inquiry::inquiry(cdb, Some(lun), data_in),
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => mode::mode_sense(cdb, lun, data_in),
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => mode::select(cdb),
        op::START_STOP_UNIT => start_stop_unit(cdb, lun),
        op::PERSISTENT_RESERVE_IN => reserve::prin(cdb, lun, data_in),
        op::PERSISTENT_RESERVE_OUT => reserve::prout(cdb, req.expected_len),
        op::RESERVE_6 | op::RESERVE_10 | op::RELEASE_6 | op::RELEASE_10 => reserve::legacy(cdb, lun, nexus),
        op::PREVENT_ALLOW => prevent_allow(cdb, lun, nexus),
        op::SANITIZE => sanitize::sanitize(cdb, lun),
        op::READ_CAPACITY_10 => info::read_capacity_10(cdb, lun, data_in),
        op::SERVICE_ACTION_IN_16 => match cdb::service_action(cdb) {
            Some(sa::READ_CAPACITY_16) => info::read_capacity_16(cdb, lun, data_in),
            Some(sa::GET_LBA_STATUS) => info::get_lba_status_check(cdb, lun),
            _ => Err(Sense::invalid_field_in_cdb(1, 4)),
        },
        op::MAINTENANCE_IN => match cdb::service_action(cdb) {
            Some(sa::REPORT_SUPPORTED_OPCODES) => info::report_supported_opcodes(cdb, data_in),
            Some(sa::REPORT_SUPPORTED_TMFS) => info::report_supported_tmfs(cdb, data_in),
            _ => Err(Sense::invalid_field_in_cdb(1, 4)),
        },
        _ => Err(Sense::invalid_opcode()),
    }
}

fn run_data_out(req: &Request, table: &LunTable, nexus: &Nexus, data_out: &[u8]) -> Res {
    let cdb = checked_cdb(req)?;
    let lun = req.lun.and_then(|id| table.get(id)).ok_or_else(Sense::lun_not_supported)?;
    match cdb[0] {
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => mode::select_data(cdb, lun, nexus, data_out),
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => block::write_same_data(cdb, lun, data_out),
        op::UNMAP => block::unmap_data(cdb, lun, data_out),
        op::COMPARE_AND_WRITE => block::compare_and_write_data(cdb, lun, data_out),
        op::ORWRITE_16 => block::orwrite_data(cdb, lun, data_out),
        op::WRITE_ATOMIC_16 => block::write_atomic_data(cdb, lun, data_out),
        op::EXTENDED_COPY => xcopy::extended_copy_data(cdb, lun, table, nexus, data_out),
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => block::verify_data(cdb, lun, data_out),
        op::PERSISTENT_RESERVE_OUT => reserve::prout_data(cdb, lun, nexus, data_out),
        op::SANITIZE => sanitize::sanitize_data(cdb, lun, data_out),
        _ => Err(Sense::invalid_opcode()),
    }
}

/// Commands that access the medium (or its capacity) and so fail with NOT READY, MEDIUM NOT
/// PRESENT while a removable LUN's medium is out; the rest (INQUIRY, MODE SENSE, reservations,
/// START STOP UNIT, PREVENT ALLOW ...) work without it.
fn needs_medium(opcode: u8) -> bool {
    matches!(
        opcode,
        op::TEST_UNIT_READY
            | op::READ_6
            | op::READ_10
            | op::READ_12
            | op::READ_16
            | op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::WRITE_VERIFY_10
            | op::WRITE_VERIFY_12
            | op::WRITE_VERIFY_16
            | op::VERIFY_10
            | op::VERIFY_12
            | op::VERIFY_16
            | op::SYNC_CACHE_10
            | op::SYNC_CACHE_16
            | op::PRE_FETCH_10
            | op::PRE_FETCH_16
            | op::WRITE_SAME_10
            | op::WRITE_SAME_16
            | op::UNMAP
            | op::COMPARE_AND_WRITE
            | op::ORWRITE_16
            | op::WRITE_ATOMIC_16
            | op::READ_CAPACITY_10
            | op::SERVICE_ACTION_IN_16
            | op::READ_DEFECT_DATA_10
            | op::READ_DEFECT_DATA_12
    )
}

/// START STOP UNIT (SBC-3 5.25). Power conditions have nothing to do on an image, so they are
/// accepted; a POWER CONDITION other than START_VALID (0h) makes the device server ignore
/// START and LOEJ. On a removable LUN, LOEJ=1 loads (START=1) or ejects (START=0) the
/// medium, refused with MEDIUM REMOVAL PREVENTED while a nexus prevents removal; on a fixed
/// LUN there is nothing to load or eject.
fn start_stop_unit(cdb: &[u8], lun: &Lun) -> Res {
    let power_condition = cdb[4] >> 4;
    // POWER CONDITION values above 0Bh are reserved (SBC-3 table 99).
    if power_condition > 0x0B {
        return Err(Sense::invalid_field_in_cdb(4, 7));
    }
    let (loej, start) = (cdb[4] & 0x02 != 0, cdb[4] & 0x01 != 0);
    if lun.removable && power_condition == 0 && loej {
        lun.medium.load_eject(start).map_err(|_| Sense::medium_removal_prevented())?;
    }
    Ok(Disposition::Good)
}

/// PREVENT ALLOW MEDIUM REMOVAL (SPC-4 6.15): on a removable LUN PREVENT=1 holds the medium
/// for this I_T nexus until it sends PREVENT=0, ends, or a reset; on a fixed LUN there is
/// nothing to hold. Values 2 and 3 are for media changers.
fn prevent_allow(cdb: &[u8], lun: &Lun, nexus: &Nexus) -> Res {
    let prevent = cdb[4] & 0x03;
    if prevent > 1 {
        return Err(Sense::invalid_field_in_cdb(4, 1));
    }
    if lun.removable {
        lun.medium.set_prevent(nexus.inbox(), prevent == 1);
    }
    Ok(Disposition::Good)
}

/// Finishes a Data-In response of `full` bytes built at the start of `buf`: cut to the
/// allocation length and the buffer.
fn data_in(buf: &[u8], full: usize, alloc: usize) -> Res {
    Ok(Disposition::DataIn(full.min(alloc).min(buf.len())))
}

/// Range check for a command touching `blocks` blocks from `lba`.
fn check_range(lun: &Lun, lba: u64, blocks: u64) -> Result<(), Sense> {
    match lba.checked_add(blocks) {
        Some(end) if end <= lun.num_blocks() => Ok(()),
        _ => Err(Sense::lba_out_of_range()),
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use crate::backing::Backing;
    use crate::scsi::SenseKey;
    use std::sync::Arc;

    pub const BLOCKS: u64 = 1024;

    pub fn lun(id: u64, read_only: bool) -> Arc<Lun> {
        Arc::new(Lun::new(
            id,
            &format!("lun{id}"),
            None,
            Backing::new_mem(BLOCKS * 512).unwrap(),
            read_only,
            "iqn.test:t",
        ))
    }

    /// A table with a writable LUN 0 and a read-only LUN 1, and a session past its power-on
    /// unit attentions.
    pub fn setup() -> (LunTable, Nexus) {
        let t = LunTable::new(vec![lun(0, false), lun(1, true)]);
        let mut n = Nexus::new();
        n.take(0);
        n.take(1);
        (t, n)
    }

    pub fn req(cdb: &[u8], lun: u64) -> Request<'_> {
        Request { cdb, lun: Some(lun), expected_len: 0, read: false, write: false }
    }

    /// Runs a command, with its offloaded work (if any) inline.
    pub fn exec(t: &LunTable, n: &mut Nexus, cdb: &[u8], lun: u64, buf: &mut [u8]) -> Disposition {
        let r = req(cdb, lun);
        match execute(&r, t, n, buf) {
            Disposition::Offload { .. } => execute_offloaded(&r, t.get(lun).expect("lun"), &[], buf),
            other => other,
        }
    }

    /// Runs a command that takes `data` as Data-Out through both phases.
    pub fn exec_out(t: &LunTable, n: &mut Nexus, cdb: &[u8], lun: u64, data: &[u8]) -> Disposition {
        let mut buf = vec![0u8; 65536];
        let r = Request { cdb, lun: Some(lun), expected_len: data.len() as u32, read: false, write: true };
        match execute(&r, t, n, &mut buf) {
            Disposition::DataOut { len } => {
                assert_eq!(len as usize, data.len(), "Data-Out length");
                match execute_data_out(&r, t, n, data, &mut buf) {
                    Disposition::Offload { .. } => execute_offloaded(&r, t.get(lun).expect("lun"), data, &mut buf),
                    other => other,
                }
            }
            Disposition::Offload { .. } => execute_offloaded(&r, t.get(lun).expect("lun"), &[], &mut buf),
            other => other,
        }
    }

    pub fn check(d: Disposition) -> (SenseKey, u8, u8) {
        match d {
            Disposition::Check(s) => (s.key, s.asc, s.ascq),
            other => panic!("expected CHECK CONDITION, got {other:?}"),
        }
    }

    pub fn sense(d: Disposition) -> Sense {
        match d {
            Disposition::Check(s) => s,
            other => panic!("expected CHECK CONDITION, got {other:?}"),
        }
    }

    pub fn cdb16(opcode: u8, flags: u8, lba: u64, len: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = opcode;
        c[1] = flags;
        cdb::put64(&mut c, 2, lba);
        cdb::put32(&mut c, 10, len);
        c
    }

    pub fn cdb10(opcode: u8, flags: u8, lba: u32, len: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = opcode;
        c[1] = flags;
        cdb::put32(&mut c, 2, lba);
        cdb::put16(&mut c, 7, len);
        c
    }

    pub fn cdb12(opcode: u8, flags: u8, lba: u32, len: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = opcode;
        c[1] = flags;
        cdb::put32(&mut c, 2, lba);
        cdb::put32(&mut c, 6, len);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use crate::scsi::SenseKey;

    #[test]
    fn unit_attention_blocks_all_but_inquiry_report_luns_request_sense() {
        let t = LunTable::new(vec![lun(0, false)]);
        let mut n = Nexus::new();
        let mut buf = vec![0u8; 65536];
        let inq = [op::INQUIRY, 0, 0, 0, 96, 0];
        assert_eq!(exec(&t, &mut n, &inq, 0, &mut buf), Disposition::DataIn(96));
        let rl = [op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(exec(&t, &mut n, &rl, 0, &mut buf), Disposition::DataIn(16));
        let tur = [0u8; 6];
        assert_eq!(check(exec(&t, &mut n, &tur, 0, &mut buf)), (SenseKey::UnitAttention, 0x29, 0x00));
        assert_eq!(exec(&t, &mut n, &tur, 0, &mut buf), Disposition::Good);

        n.lun_reset(t.get(0).unwrap());
        n.luns_changed();
        let rs = [op::REQUEST_SENSE, 0, 0, 0, 252, 0];
        assert_eq!(exec(&t, &mut n, &rs, 0, &mut buf), Disposition::DataIn(18));
        assert_eq!((buf[2], buf[12], buf[13]), (0x06, 0x29, 0x03));
        assert_eq!(check(exec(&t, &mut n, &tur, 0, &mut buf)), (SenseKey::UnitAttention, 0x3F, 0x0E));
        assert_eq!(exec(&t, &mut n, &tur, 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut n, &rs, 0, &mut buf), Disposition::DataIn(18));
        assert_eq!((buf[2], buf[12], buf[13]), (0, 0, 0));
    }

    #[test]
    fn report_luns_clears_reported_luns_changed() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        n.luns_changed();
        let rl = [op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(exec(&t, &mut n, &rl, 5, &mut buf), Disposition::DataIn(24));
        assert_eq!(exec(&t, &mut n, &[0u8; 6], 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut n, &[0u8; 6], 1, &mut buf), Disposition::Good);
    }

    #[test]
    fn missing_lun() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        let inq = [op::INQUIRY, 0, 0, 0, 36, 0];
        assert_eq!(exec(&t, &mut n, &inq, 9, &mut buf), Disposition::DataIn(36));
        assert_eq!(buf[0], 0x7F);
        let r = Request { cdb: &inq, lun: None, expected_len: 36, read: true, write: false };
        assert_eq!(execute(&r, &t, &mut n, &mut buf), Disposition::DataIn(36));
        assert_eq!(buf[0], 0x7F);
        let rs = [op::REQUEST_SENSE, 0, 0, 0, 18, 0];
        assert_eq!(exec(&t, &mut n, &rs, 9, &mut buf), Disposition::DataIn(18));
        assert_eq!((buf[2], buf[12]), (0x05, 0x25));
        assert_eq!(check(exec(&t, &mut n, &[0u8; 6], 9, &mut buf)), (SenseKey::IllegalRequest, 0x25, 0));
        let rd = cdb10(op::READ_10, 0, 0, 1);
        let r = Request { cdb: &rd, lun: None, expected_len: 512, read: true, write: false };
        assert_eq!(check(execute(&r, &t, &mut n, &mut buf)), (SenseKey::IllegalRequest, 0x25, 0));
        let r = Request { cdb: &rd, lun: Some(9), expected_len: 512, read: false, write: true };
        assert_eq!(check(execute_data_out(&r, &t, &mut n, &[], &mut buf)), (SenseKey::IllegalRequest, 0x25, 0));
    }

    #[test]
    fn unknown_and_malformed_cdbs() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 65536];
        assert_eq!(check(exec(&t, &mut n, &[0x02, 0, 0, 0, 0, 0], 0, &mut buf)), (SenseKey::IllegalRequest, 0x20, 0));
        assert_eq!(check(exec(&t, &mut n, &[0x7F; 16], 0, &mut buf)), (SenseKey::IllegalRequest, 0x20, 0));
        assert_eq!(check(exec(&t, &mut n, &[0xC0; 16], 0, &mut buf)), (SenseKey::IllegalRequest, 0x20, 0));
        assert_eq!(check(exec(&t, &mut n, &[], 0, &mut buf)), (SenseKey::IllegalRequest, 0x20, 0));
        let s = sense(exec(&t, &mut n, &[op::READ_16, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, &mut buf));
        assert_eq!((s.asc, s.specific), (0x24, Some([0x4F, 0, 0])));
        let s = sense(exec(&t, &mut n, &[0, 0, 0, 0, 0, 0x04], 0, &mut buf));
        assert_eq!((s.asc, s.specific), (0x24, Some([0x4A, 0, 5])), "NACA");
        let sai = cdb16(op::SERVICE_ACTION_IN_16, 0x11, 0, 32);
        assert_eq!(sense(exec(&t, &mut n, &sai, 0, &mut buf)).asc, 0x24);
        let mut mi = [0u8; 12];
        mi[0] = op::MAINTENANCE_IN;
        mi[1] = 0x05;
        assert_eq!(sense(exec(&t, &mut n, &mi, 0, &mut buf)).asc, 0x24);
        // A 16-byte BHS CDB is longer than a 6-byte command needs: that is fine.
        assert_eq!(exec(&t, &mut n, &[0u8; 16], 0, &mut buf), Disposition::Good);
    }

    #[test]
    fn start_stop_and_prevent_allow() {
        let (t, mut n) = setup();
        let mut buf = vec![0u8; 256];
        for b4 in [0u8, 1, 2, 3] {
            assert_eq!(exec(&t, &mut n, &[op::START_STOP_UNIT, 1, 0, 0, b4, 0], 0, &mut buf), Disposition::Good);
        }
        assert_eq!(sense(exec(&t, &mut n, &[op::START_STOP_UNIT, 0, 0, 0, 0xC0, 0], 0, &mut buf)).asc, 0x24);
        assert_eq!(exec(&t, &mut n, &[op::PREVENT_ALLOW, 0, 0, 0, 1, 0], 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut n, &[op::PREVENT_ALLOW, 0, 0, 0, 0, 0], 0, &mut buf), Disposition::Good);
        assert_eq!(sense(exec(&t, &mut n, &[op::PREVENT_ALLOW, 0, 0, 0, 2, 0], 0, &mut buf)).asc, 0x24);
        // A fixed LUN has nothing to eject: LOEJ leaves it ready, and INQUIRY says RMB=0.
        assert_eq!(exec(&t, &mut n, &[op::START_STOP_UNIT, 0, 0, 0, 0x02, 0], 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut n, &[0u8; 6], 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut n, &[op::INQUIRY, 0, 0, 0, 36, 0], 0, &mut buf), Disposition::DataIn(36));
        assert_eq!(buf[1], 0);
    }

    /// A removable LUN and two sessions past their power-on unit attentions.
    fn removable() -> (LunTable, Nexus, Nexus) {
        let l = Lun::new(0, "iso", None, crate::backing::Backing::new_mem(BLOCKS * 512).unwrap(), true, "iqn.t:t");
        let t = LunTable::new(vec![std::sync::Arc::new(l.with_removable(true))]);
        let (mut a, mut b) = (Nexus::new(), Nexus::new());
        a.take(0);
        b.take(0);
        (t, a, b)
    }

    const EJECT: [u8; 6] = [op::START_STOP_UNIT, 0, 0, 0, 0x02, 0];
    const LOAD: [u8; 6] = [op::START_STOP_UNIT, 0, 0, 0, 0x03, 0];
    const PREVENT: [u8; 6] = [op::PREVENT_ALLOW, 0, 0, 0, 1, 0];
    const ALLOW: [u8; 6] = [op::PREVENT_ALLOW, 0, 0, 0, 0, 0];
    const PREVENTED: (SenseKey, u8, u8) = (SenseKey::IllegalRequest, 0x53, 0x02);
    const NO_MEDIUM: (SenseKey, u8, u8) = (SenseKey::NotReady, 0x3A, 0x00);

    #[test]
    fn removable_lun_ejects_and_loads_its_medium() {
        let (t, mut a, _) = removable();
        let mut buf = vec![0u8; 4096];
        assert_eq!(exec(&t, &mut a, &[op::INQUIRY, 0, 0, 0, 36, 0], 0, &mut buf), Disposition::DataIn(36));
        assert_eq!(buf[1], 0x80, "RMB");
        assert_eq!(exec(&t, &mut a, &EJECT, 0, &mut buf), Disposition::Good);
        let medium_cmds: [&[u8]; 6] = [
            &[0u8; 6],
            &cdb10(op::READ_10, 0, 0, 1),
            &cdb16(op::WRITE_16, 0, 0, 1),
            &cdb10(op::READ_CAPACITY_10, 0, 0, 0),
            &cdb16(op::SERVICE_ACTION_IN_16, 0x12, 0, 32),
            &cdb10(op::SYNC_CACHE_10, 0, 0, 0),
        ];
        for c in medium_cmds {
            assert_eq!(check(exec(&t, &mut a, c, 0, &mut buf)), NO_MEDIUM, "{c:02x?}");
        }
        // What does not touch the medium still works.
        assert_eq!(exec(&t, &mut a, &[op::INQUIRY, 0, 0, 0, 36, 0], 0, &mut buf), Disposition::DataIn(36));
        assert!(matches!(
            exec(&t, &mut a, &[op::MODE_SENSE_6, 0, 0x3F, 0, 255, 0], 0, &mut buf),
            Disposition::DataIn(_)
        ));
        // Ejecting an ejected medium, and a power condition with LOEJ, change nothing.
        assert_eq!(exec(&t, &mut a, &EJECT, 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut a, &[op::START_STOP_UNIT, 0, 0, 0, 0x13, 0], 0, &mut buf), Disposition::Good);
        assert_eq!(check(exec(&t, &mut a, &[0u8; 6], 0, &mut buf)), NO_MEDIUM);
        assert_eq!(exec(&t, &mut a, &LOAD, 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut a, &[0u8; 6], 0, &mut buf), Disposition::Good);
        assert_eq!(
            exec(&t, &mut a, &cdb10(op::READ_10, 0, 0, 1), 0, &mut buf),
            Disposition::Read { offset: 0, len: 512 }
        );
        // LOEJ=0 (START alone) neither loads nor ejects.
        assert_eq!(exec(&t, &mut a, &[op::START_STOP_UNIT, 0, 0, 0, 0x00, 0], 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut a, &[0u8; 6], 0, &mut buf), Disposition::Good);
    }

    #[test]
    fn prevention_is_per_nexus_and_ends_with_allow_nexus_loss_or_reset() {
        let (t, mut a, mut b) = removable();
        let mut buf = vec![0u8; 256];
        assert_eq!(exec(&t, &mut a, &PREVENT, 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut b, &PREVENT, 0, &mut buf), Disposition::Good);
        // Either nexus is refused, loading and ejecting alike, while one holds the medium.
        assert_eq!(check(exec(&t, &mut b, &EJECT, 0, &mut buf)), PREVENTED);
        assert_eq!(exec(&t, &mut a, &ALLOW, 0, &mut buf), Disposition::Good);
        assert_eq!(check(exec(&t, &mut a, &EJECT, 0, &mut buf)), PREVENTED, "b still prevents");
        drop(b); // I_T nexus loss
        assert_eq!(exec(&t, &mut a, &EJECT, 0, &mut buf), Disposition::Good);
        assert_eq!(exec(&t, &mut a, &PREVENT, 0, &mut buf), Disposition::Good);
        assert_eq!(check(exec(&t, &mut a, &LOAD, 0, &mut buf)), PREVENTED);
        a.lun_reset(t.get(0).unwrap());
        assert_eq!(check(exec(&t, &mut a, &LOAD, 0, &mut buf)).0, SenseKey::UnitAttention);
        assert_eq!(exec(&t, &mut a, &LOAD, 0, &mut buf), Disposition::Good, "the reset ended the prevention");
        assert_eq!(exec(&t, &mut a, &PREVENT, 0, &mut buf), Disposition::Good);
        a.target_reset(&t);
        a.take(0);
        assert_eq!(exec(&t, &mut a, &EJECT, 0, &mut buf), Disposition::Good);
    }
}
