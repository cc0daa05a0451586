//! Protocol tracing: one log line per PDU, for finding out what an initiator did.
//!
//! A connection holds a [`Switch`]; while it is off, a PDU costs one load and one branch and
//! nothing is formatted. It is on for every connection when the `uringtgt::trace` log target is
//! enabled at `trace` (`--log-level trace`), for sessions of the initiators named by
//! `trace_initiators` / `--trace-initiator` (switched on at their first login PDU), and for one
//! session on demand through the control method `trace_session`. Lines go to the log target
//! [`TARGET`] at INFO, so a session switched on by hand shows at the default log level.
//!
//! The formatting here reads raw header bytes through [`Bhs`]: it needs nothing from the
//! connection but the bytes it sent or received.

use super::pdu::{opcode, Bhs, BHS_LEN, RESERVED_TAG};
use crate::scsi::cdb;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// The log target of trace lines.
pub const TARGET: &str = "uringtgt::trace";

/// Login keys whose values are never logged.
const SECRET_KEYS: &[&str] = &["CHAP_R", "CHAP_C"];

/// Initiator names whose sessions are traced from their first login PDU.
static INITIATORS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Sets the initiators traced from login on (`trace_initiators`, `--trace-initiator`).
pub fn set_initiators(names: &[String]) {
    *INITIATORS.write().unwrap_or_else(|e| e.into_inner()) = names.iter().map(|n| n.to_lowercase()).collect();
}

/// Whether every connection is traced (the `uringtgt::trace` target enabled at `trace`).
pub fn all_enabled() -> bool {
    log::log_enabled!(target: TARGET, log::Level::Trace)
}

/// A connection's trace switch, shared with its session entry so the control plane can flip it.
#[derive(Debug, Clone, Default)]
pub struct Switch(Arc<AtomicBool>);

impl Switch {
    /// A switch, on when every connection is traced.
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(all_enabled())))
    }

    #[inline]
    pub fn on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }

    /// Looks at a Login Request's keys: a traced initiator's name switches the trace on.
    pub fn login_pdu(&self, data: &[u8]) {
        if self.on() {
            return;
        }
        let wanted = INITIATORS.read().unwrap_or_else(|e| e.into_inner());
        if wanted.is_empty() {
            return;
        }
        let name = keys(data).find(|(k, _)| *k == "InitiatorName").map(|(_, v)| v.to_lowercase());
        if name.is_some_and(|n| wanted.contains(&n)) {
            self.set(true);
        }
    }
}

/// Which way a PDU went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Received from the initiator.
    In,
    /// Sent to the initiator.
    Out,
}

/// Logs one PDU. `data` is its data segment when at hand (login, text, sense, reject) and may
/// be empty; `data_len` is the segment's length either way.
#[cold]
pub fn pdu(dir: Dir, peer: SocketAddr, tsih: u16, bhs: &[u8; BHS_LEN], data: &[u8], data_len: usize) {
    log::info!(target: TARGET, "{peer} tsih {tsih} {}", format_pdu(dir, bhs, data, data_len));
}

/// The key=value pairs of a text or login data segment (NUL-separated).
fn keys(data: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    data.split(|b| *b == 0).filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('='))
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        opcode::NOP_OUT => "NOP-Out",
        opcode::SCSI_COMMAND => "SCSI-Command",
        opcode::TASK_MGMT_REQUEST => "Task-Mgmt-Request",
        opcode::LOGIN_REQUEST => "Login-Request",
        opcode::TEXT_REQUEST => "Text-Request",
        opcode::DATA_OUT => "Data-Out",
        opcode::LOGOUT_REQUEST => "Logout-Request",
        opcode::SNACK_REQUEST => "SNACK-Request",
        opcode::NOP_IN => "NOP-In",
        opcode::SCSI_RESPONSE => "SCSI-Response",
        opcode::TASK_MGMT_RESPONSE => "Task-Mgmt-Response",
        opcode::LOGIN_RESPONSE => "Login-Response",
        opcode::TEXT_RESPONSE => "Text-Response",
        opcode::DATA_IN => "Data-In",
        opcode::LOGOUT_RESPONSE => "Logout-Response",
        opcode::R2T => "R2T",
        opcode::ASYNC_MESSAGE => "Async-Message",
        opcode::REJECT => "Reject",
        _ => "Unknown-Opcode",
    }
}

fn cdb_name(op: u8) -> Option<&'static str> {
    use cdb::op::*;
    Some(match op {
        TEST_UNIT_READY => "TEST UNIT READY",
        REQUEST_SENSE => "REQUEST SENSE",
        READ_6 => "READ(6)",
        WRITE_6 => "WRITE(6)",
        INQUIRY => "INQUIRY",
        MODE_SELECT_6 => "MODE SELECT(6)",
        RESERVE_6 => "RESERVE(6)",
        RELEASE_6 => "RELEASE(6)",
        MODE_SENSE_6 => "MODE SENSE(6)",
        START_STOP_UNIT => "START STOP UNIT",
        PREVENT_ALLOW => "PREVENT ALLOW MEDIUM REMOVAL",
        READ_CAPACITY_10 => "READ CAPACITY(10)",
        READ_10 => "READ(10)",
        WRITE_10 => "WRITE(10)",
        WRITE_VERIFY_10 => "WRITE AND VERIFY(10)",
        VERIFY_10 => "VERIFY(10)",
        PRE_FETCH_10 => "PRE-FETCH(10)",
        SYNC_CACHE_10 => "SYNCHRONIZE CACHE(10)",
        WRITE_SAME_10 => "WRITE SAME(10)",
        UNMAP => "UNMAP",
        MODE_SELECT_10 => "MODE SELECT(10)",
        RESERVE_10 => "RESERVE(10)",
        RELEASE_10 => "RELEASE(10)",
        MODE_SENSE_10 => "MODE SENSE(10)",
        PERSISTENT_RESERVE_IN => "PERSISTENT RESERVE IN",
        PERSISTENT_RESERVE_OUT => "PERSISTENT RESERVE OUT",
        READ_16 => "READ(16)",
        COMPARE_AND_WRITE => "COMPARE AND WRITE",
        WRITE_16 => "WRITE(16)",
        ORWRITE_16 => "ORWRITE(16)",
        WRITE_VERIFY_16 => "WRITE AND VERIFY(16)",
        VERIFY_16 => "VERIFY(16)",
        PRE_FETCH_16 => "PRE-FETCH(16)",
        SYNC_CACHE_16 => "SYNCHRONIZE CACHE(16)",
        WRITE_SAME_16 => "WRITE SAME(16)",
        SERVICE_ACTION_IN_16 => "SERVICE ACTION IN(16)",
        REPORT_LUNS => "REPORT LUNS",
        MAINTENANCE_IN => "MAINTENANCE IN",
        READ_12 => "READ(12)",
        WRITE_12 => "WRITE(12)",
        WRITE_VERIFY_12 => "WRITE AND VERIFY(12)",
        VERIFY_12 => "VERIFY(12)",
        _ => return None,
    })
}

fn status_name(status: u8) -> &'static str {
    use crate::scsi::status::*;
    match status {
        GOOD => "GOOD",
        CHECK_CONDITION => "CHECK CONDITION",
        CONDITION_MET => "CONDITION MET",
        BUSY => "BUSY",
        RESERVATION_CONFLICT => "RESERVATION CONFLICT",
        TASK_SET_FULL => "TASK SET FULL",
        TASK_ABORTED => "TASK ABORTED",
        _ => "status",
    }
}

const SENSE_KEYS: [&str; 16] = [
    "NO SENSE",
    "RECOVERED ERROR",
    "NOT READY",
    "MEDIUM ERROR",
    "HARDWARE ERROR",
    "ILLEGAL REQUEST",
    "UNIT ATTENTION",
    "DATA PROTECT",
    "BLANK CHECK",
    "VENDOR SPECIFIC",
    "COPY ABORTED",
    "ABORTED COMMAND",
    "RESERVED",
    "VOLUME OVERFLOW",
    "MISCOMPARE",
    "COMPLETED",
];

/// Sense key, ASC and ASCQ of a SCSI Response's data segment (a 2-byte length, then fixed or
/// descriptor format sense data).
fn sense_of(data: &[u8]) -> Option<(u8, u8, u8)> {
    let sense = data.get(2..)?;
    match sense.first()? & 0x7F {
        0x70 | 0x71 => Some((sense.get(2)? & 0x0F, *sense.get(12)?, *sense.get(13)?)),
        0x72 | 0x73 => Some((sense.get(1)? & 0x0F, *sense.get(2)?, *sense.get(3)?)),
        _ => None,
    }
}

/// The 8-byte LUN field as a LUN number (peripheral and flat addressing).
fn lun_of(lun: [u8; 8]) -> u16 {
    u16::from_be_bytes([lun[0] & 0x3F, lun[1]])
}

fn tag(t: u32) -> String {
    if t == RESERVED_TAG {
        "-".to_owned()
    } else {
        format!("{t:#x}")
    }
}

/// One PDU as one line: direction, opcode, tags and sequence numbers, then what its opcode
/// carries (CDB, status and sense, login keys with secrets masked).
pub fn format_pdu(dir: Dir, bytes: &[u8; BHS_LEN], data: &[u8], data_len: usize) -> String {
    let b = Bhs::new(bytes);
    let op = b.opcode();
    let mut s = String::with_capacity(160);
    let arrow = if dir == Dir::In { "<-" } else { "->" };
    let _ = write!(s, "{arrow} {} itt {}", opcode_name(op), tag(b.itt()));
    // Initiator PDUs carry CmdSN and ExpStatSN; target PDUs StatSN, ExpCmdSN and MaxCmdSN at
    // the same offsets (24, 28, 32).
    let (w24, w28, w32) = (cdb::be32(bytes, 24), cdb::be32(bytes, 28), cdb::be32(bytes, 32));
    match dir {
        Dir::In => {
            let _ = write!(s, " cmdsn {w24} expstatsn {w28}");
        }
        Dir::Out => {
            let _ = write!(s, " statsn {w24} expcmdsn {w28} maxcmdsn {w32}");
        }
    }
    match op {
        opcode::SCSI_COMMAND => {
            let cdb = b.cdb();
            let _ = write!(s, " lun {}", lun_of(b.lun()));
            match cdb_name(cdb[0]) {
                Some(name) => {
                    let _ = write!(s, " cdb {name}");
                }
                None => {
                    let _ = write!(s, " cdb {:#04x}", cdb[0]);
                }
            }
            if let Some(d) = cdb::decode_block(cdb) {
                let _ = write!(s, " lba {} blocks {}", d.lba, d.blocks);
            }
            let rw = match (b.read_bit(), b.write_bit()) {
                (true, true) => " RW",
                (true, false) => " R",
                (false, true) => " W",
                (false, false) => "",
            };
            let _ = write!(s, " edtl {}{rw}", b.expected_data_len());
        }
        opcode::SCSI_RESPONSE => {
            let status = bytes[3];
            let _ = write!(s, " response {:#x} status {}", bytes[2], status_name(status));
            if let Some((key, asc, ascq)) = sense_of(data) {
                let _ = write!(s, " sense {} asc {asc:#04x} ascq {ascq:#04x}", SENSE_KEYS[usize::from(key)]);
            }
            let residual = cdb::be32(bytes, 44);
            if bytes[1] & 0x06 != 0 {
                let kind = if bytes[1] & 0x02 != 0 { "under" } else { "over" };
                let _ = write!(s, " residual {kind} {residual}");
            }
        }
        opcode::DATA_OUT | opcode::DATA_IN => {
            let _ = write!(
                s,
                " lun {} ttt {} datasn {} offset {} len {data_len}",
                lun_of(b.lun()),
                tag(b.ttt()),
                b.data_sn(),
                b.buffer_offset()
            );
            if op == opcode::DATA_IN && bytes[1] & 0x01 != 0 {
                let _ = write!(s, " status {}", status_name(bytes[3]));
            }
            if bytes[1] & 0x80 != 0 {
                s.push_str(" F");
            }
        }
        opcode::R2T => {
            let _ = write!(
                s,
                " lun {} ttt {} r2tsn {} offset {} len {}",
                lun_of(b.lun()),
                tag(b.ttt()),
                b.data_sn(),
                b.buffer_offset(),
                cdb::be32(bytes, 44)
            );
        }
        opcode::TASK_MGMT_REQUEST => {
            let _ = write!(s, " function {} ref-itt {}", b.tmf_function(), tag(b.ttt()));
        }
        opcode::TASK_MGMT_RESPONSE => {
            let _ = write!(s, " response {}", bytes[2]);
        }
        opcode::LOGIN_REQUEST | opcode::LOGIN_RESPONSE => {
            let isid: String = b.isid().iter().map(|x| format!("{x:02x}")).collect();
            let _ = write!(
                s,
                " csg {} nsg {}{} isid {isid} tsih {}",
                b.login_csg(),
                b.login_nsg(),
                if b.login_transit() { " T" } else { "" },
                b.tsih()
            );
            if op == opcode::LOGIN_RESPONSE {
                let _ = write!(s, " status {:02x}{:02x}", bytes[36], bytes[37]);
            }
            push_keys(&mut s, data);
        }
        opcode::TEXT_REQUEST | opcode::TEXT_RESPONSE => push_keys(&mut s, data),
        opcode::LOGOUT_REQUEST => {
            let _ = write!(s, " reason {}", b.logout_reason());
        }
        opcode::LOGOUT_RESPONSE => {
            let _ = write!(s, " response {}", bytes[2]);
        }
        opcode::REJECT => {
            let _ = write!(s, " reason {:#04x}", bytes[2]);
            if let Some(hdr) = data.get(..BHS_LEN) {
                let _ = write!(
                    s,
                    " of {} itt {}",
                    opcode_name(hdr[0] & 0x3F),
                    tag(u32::from_be_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]))
                );
            }
        }
        opcode::NOP_OUT | opcode::NOP_IN => {
            let _ = write!(s, " ttt {} len {data_len}", tag(b.ttt()));
        }
        _ => {
            let _ = write!(s, " len {data_len}");
        }
    }
    s
}

/// ` keys: K=V K=V`, with the values of [`SECRET_KEYS`] masked.
fn push_keys(s: &mut String, data: &[u8]) {
    let mut first = true;
    for (k, v) in keys(data) {
        s.push_str(if first { " keys:" } else { "" });
        first = false;
        let v = if SECRET_KEYS.contains(&k) { "***" } else { v };
        let _ = write!(s, " {k}={v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pdu::BhsBuf;

    fn put32(b: &mut [u8; BHS_LEN], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn a_read_command_shows_lun_cdb_lba_and_length() {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode::SCSI_COMMAND;
        b[1] = 0x80 | 0x40; // final, read
        b[9] = 2; // LUN 2
        put32(&mut b, 16, 7); // ITT
        put32(&mut b, 20, 4096); // EDTL
        put32(&mut b, 24, 11); // CmdSN
        put32(&mut b, 28, 5); // ExpStatSN
        b[32] = cdb::op::READ_10;
        b[32 + 2..32 + 6].copy_from_slice(&1234u32.to_be_bytes());
        b[32 + 7..32 + 9].copy_from_slice(&8u16.to_be_bytes());
        let line = format_pdu(Dir::In, &b, &[], 0);
        assert_eq!(
            line,
            "<- SCSI-Command itt 0x7 cmdsn 11 expstatsn 5 lun 2 cdb READ(10) lba 1234 blocks 8 edtl 4096 R"
        );
    }

    #[test]
    fn unknown_cdbs_show_their_opcode() {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode::SCSI_COMMAND;
        b[32] = 0xC5;
        assert!(format_pdu(Dir::In, &b, &[], 0).contains(" cdb 0xc5 edtl 0"));
    }

    #[test]
    fn a_check_condition_shows_status_and_fixed_sense() {
        let mut h = BhsBuf::new(opcode::SCSI_RESPONSE);
        h.flags(0x80).byte(3, crate::scsi::status::CHECK_CONDITION).itt(9).stat_sn(3).exp_cmd_sn(4).max_cmd_sn(131);
        let mut sense = vec![0u8, 18, 0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00, 0, 0, 0, 0];
        sense.truncate(20);
        let line = format_pdu(Dir::Out, &h.0, &sense, sense.len());
        assert_eq!(
            line,
            "-> SCSI-Response itt 0x9 statsn 3 expcmdsn 4 maxcmdsn 131 response 0x0 status CHECK CONDITION \
             sense ILLEGAL REQUEST asc 0x24 ascq 0x00"
        );
    }

    #[test]
    fn descriptor_sense_and_residuals() {
        let mut h = BhsBuf::new(opcode::SCSI_RESPONSE);
        h.flags(0x80 | 0x02).byte(3, 2).itt(1).word44(512);
        let sense = [0u8, 8, 0x72, 0x06, 0x3F, 0x0E, 0, 0, 0, 0];
        let line = format_pdu(Dir::Out, &h.0, &sense, sense.len());
        assert!(line.ends_with("sense UNIT ATTENTION asc 0x3f ascq 0x0e residual under 512"), "{line}");
    }

    #[test]
    fn data_in_shows_offset_length_and_status() {
        let mut h = BhsBuf::new(opcode::DATA_IN);
        h.flags(0x81).itt(7).ttt(RESERVED_TAG).buffer_offset(8192).sn36(2);
        let line = format_pdu(Dir::Out, &h.0, &[], 4096);
        assert!(line.contains("Data-In itt 0x7"), "{line}");
        assert!(line.ends_with("lun 0 ttt - datasn 2 offset 8192 len 4096 status GOOD F"), "{line}");
    }

    #[test]
    fn login_keys_are_listed_and_chap_values_masked() {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode::LOGIN_REQUEST | 0x40;
        b[1] = 0x80 | 0x01; // transit, CSG 0, NSG 1
        b[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
        let data = b"InitiatorName=iqn.x:y\0AuthMethod=CHAP\0CHAP_N=user\0CHAP_R=0xdeadbeef\0CHAP_C=0x1234\0";
        let line = format_pdu(Dir::In, &b, data, data.len());
        assert!(
            line.starts_with("<- Login-Request itt 0x0 cmdsn 0 expstatsn 0 csg 0 nsg 1 T isid 80123456789a tsih 0"),
            "{line}"
        );
        assert!(
            line.ends_with("keys: InitiatorName=iqn.x:y AuthMethod=CHAP CHAP_N=user CHAP_R=*** CHAP_C=***"),
            "{line}"
        );
        assert!(!line.contains("deadbeef") && !line.contains("0x1234"), "{line}");
    }

    #[test]
    fn login_response_shows_its_status() {
        let mut h = BhsBuf::new(opcode::LOGIN_RESPONSE);
        h.byte(36, 2).byte(37, 1);
        let line = format_pdu(Dir::Out, &h.0, b"", 0);
        assert!(line.contains("status 0201"), "{line}");
    }

    #[test]
    fn a_reject_names_the_rejected_pdu() {
        let mut h = BhsBuf::new(opcode::REJECT);
        h.byte(2, 0x04).itt(RESERVED_TAG);
        let mut rejected = [0u8; BHS_LEN];
        rejected[0] = opcode::TEXT_REQUEST;
        put32(&mut rejected, 16, 0x42);
        let line = format_pdu(Dir::Out, &h.0, &rejected, BHS_LEN);
        assert!(line.contains("Reject itt - "), "{line}");
        assert!(line.ends_with("reason 0x04 of Text-Request itt 0x42"), "{line}");
    }

    #[test]
    fn the_initiator_list_switches_a_login_on() {
        let s = Switch(Arc::new(AtomicBool::new(false)));
        set_initiators(&["iqn.2024-06.test:Traced".to_owned()]);
        s.login_pdu(b"InitiatorName=iqn.2024-06.test:other\0");
        assert!(!s.on());
        s.login_pdu(b"SessionType=Normal\0InitiatorName=iqn.2024-06.test:traced\0");
        assert!(s.on(), "names compare case-insensitively, as iSCSI names do");
        set_initiators(&[]);
        let s2 = s.clone();
        s.set(false);
        assert!(!s2.on(), "clones share the switch (the session table holds one)");
    }
}
