//! Writes the committed seed corpora, fuzz/seeds/<target>/, from the PDUs, login sequences,
//! CDBs and control requests real peers send (libiscsi, open-iscsi, `uringtgt ctl`).
//! Run from fuzz/: `cargo run --example seeds` (it replaces the seed files it writes).

use std::path::Path;
use uringtgt_fuzz::{kv, login, login_peers, pdu, scsi, text, TARGET};

const INITIATOR: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test";
const ISID: [u8; 6] = [0x80, 0x12, 0x34, 0x56, 0, 0];

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new("seeds").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

/// libiscsi's login: security stage with AuthMethod=None, then the operational stage.
fn libiscsi_login(session: &str, hd: &str, dd: &str) -> Vec<(u8, Vec<u8>)> {
    let mut first = vec![("InitiatorName", INITIATOR), ("SessionType", session)];
    if session == "Normal" {
        first.push(("TargetName", TARGET));
    }
    first.push(("AuthMethod", "None"));
    let mut second = vec![("HeaderDigest", hd), ("DataDigest", dd)];
    if session == "Normal" {
        second.extend([
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("MaxConnections", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("MaxOutstandingR2T", "1"),
        ]);
    }
    second.extend([
        ("MaxRecvDataSegmentLength", "262144"),
        ("DefaultTime2Wait", "2"),
        ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"),
        ("OFMarker", "No"),
        ("ErrorRecoveryLevel", "0"),
    ]);
    vec![(0x80 | 1, kv(&first)), (0x80 | (1 << 2) | 3, kv(&second))]
}

/// open-iscsi's login: security stage, then operational with its usual offers.
fn open_iscsi_login() -> Vec<(u8, Vec<u8>)> {
    let first = kv(&[
        ("InitiatorName", "iqn.2004-10.com.ubuntu:01:abcd1234"),
        ("InitiatorAlias", "rig"),
        ("TargetName", TARGET),
        ("SessionType", "Normal"),
        ("AuthMethod", "None"),
    ]);
    let second = kv(login_peers::OPEN_ISCSI_OPERATIONAL);
    vec![(0x80 | 1, first), (0x80 | (1 << 2) | 3, second)]
}

fn cdb(bytes: &[u8]) -> Vec<u8> {
    bytes.to_vec()
}

/// CDBs libiscsi's test suite and the Linux sd driver send, with their transfer lengths.
fn cdbs() -> Vec<(&'static str, Vec<u8>, u32, u8, Vec<u8>)> {
    // (name, cdb, edtl, flags R=1 W=2, data-out)
    let block = vec![0xA5u8; 4096];
    let unmap = {
        let mut p = vec![0u8; 24];
        p[1] = 22;
        p[3] = 16;
        p[8..16].copy_from_slice(&8u64.to_be_bytes());
        p[16..20].copy_from_slice(&8u32.to_be_bytes());
        p
    };
    let mode_select = {
        // Caching mode page with WCE off, 6-byte header.
        let mut p = vec![0u8; 4 + 20];
        p[4] = 0x08;
        p[5] = 0x12;
        p
    };
    let prout_register = {
        let mut p = vec![0u8; 24];
        p[8..16].copy_from_slice(&0x1234u64.to_be_bytes());
        p
    };
    let caw = {
        let mut p = vec![0u8; 1024];
        p[512..].fill(0x5A);
        p
    };
    vec![
        ("tur", cdb(&[0x00, 0, 0, 0, 0, 0]), 0, 0, vec![]),
        ("inquiry", cdb(&[0x12, 0, 0, 0, 0x24, 0]), 36, 1, vec![]),
        ("inquiry-vpd00", cdb(&[0x12, 1, 0x00, 0, 0xFF, 0]), 255, 1, vec![]),
        ("inquiry-vpd80", cdb(&[0x12, 1, 0x80, 0, 0xFF, 0]), 255, 1, vec![]),
        ("inquiry-vpd83", cdb(&[0x12, 1, 0x83, 0, 0xFF, 0]), 255, 1, vec![]),
        ("inquiry-vpdb0", cdb(&[0x12, 1, 0xB0, 0, 0x40, 0]), 64, 1, vec![]),
        ("inquiry-vpdb2", cdb(&[0x12, 1, 0xB2, 0, 0x40, 0]), 64, 1, vec![]),
        ("read-capacity-10", cdb(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 8, 1, vec![]),
        ("read-capacity-16", cdb(&[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]), 32, 1, vec![]),
        ("get-lba-status", cdb(&[0x9E, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 24, 0, 0]), 24, 1, vec![]),
        ("report-luns", cdb(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]), 4096, 1, vec![]),
        ("mode-sense-6", cdb(&[0x1A, 0, 0x3F, 0, 0xFF, 0]), 255, 1, vec![]),
        ("mode-sense-10", cdb(&[0x5A, 0, 0x08, 0, 0, 0, 0, 0x01, 0, 0]), 256, 1, vec![]),
        ("request-sense", cdb(&[0x03, 0, 0, 0, 0xFC, 0]), 252, 1, vec![]),
        ("read-6", cdb(&[0x08, 0, 0, 0, 8, 0]), 4096, 1, vec![]),
        ("read-10", cdb(&[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]), 4096, 1, vec![]),
        ("read-12", cdb(&[0xA8, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]), 4096, 1, vec![]),
        ("read-16", cdb(&[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 8, 0, 0]), 4096, 1, vec![]),
        ("write-10", cdb(&[0x2A, 0, 0, 0, 0, 16, 0, 0, 8, 0]), 4096, 2, block.clone()),
        ("write-16-fua", cdb(&[0x8A, 0x08, 0, 0, 0, 0, 0, 0, 0, 24, 0, 0, 0, 8, 0, 0]), 4096, 2, block.clone()),
        ("write-verify-10", cdb(&[0x2E, 0, 0, 0, 0, 16, 0, 0, 8, 0]), 4096, 2, block.clone()),
        ("verify-10-bytchk", cdb(&[0x2F, 0x02, 0, 0, 0, 16, 0, 0, 8, 0]), 4096, 2, block.clone()),
        ("sync-cache-10", cdb(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]), 0, 0, vec![]),
        ("write-same-16-unmap", cdb(&[0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0, 0, 8, 0, 0]), 512, 2, vec![0; 512]),
        ("write-same-10", cdb(&[0x41, 0, 0, 0, 0, 40, 0, 0, 8, 0]), 512, 2, vec![0x11; 512]),
        ("unmap", cdb(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), 24, 2, unmap),
        ("compare-and-write", cdb(&[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 48, 0, 0, 0, 1, 0, 0]), 1024, 2, caw),
        ("orwrite-16", cdb(&[0x8B, 0, 0, 0, 0, 0, 0, 0, 0, 56, 0, 0, 0, 1, 0, 0]), 512, 2, vec![0x0F; 512]),
        ("prefetch-10", cdb(&[0x34, 0, 0, 0, 0, 0, 0, 0, 8, 0]), 0, 0, vec![]),
        ("mode-select-6", cdb(&[0x15, 0x10, 0, 0, 24, 0]), 24, 2, mode_select),
        ("prin-read-keys", cdb(&[0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]), 4096, 1, vec![]),
        ("prout-register", cdb(&[0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0]), 24, 2, prout_register),
        ("reserve-6", cdb(&[0x16, 0, 0, 0, 0, 0]), 0, 0, vec![]),
        ("release-6", cdb(&[0x17, 0, 0, 0, 0, 0]), 0, 0, vec![]),
        ("start-stop", cdb(&[0x1B, 0, 0, 0, 1, 0]), 0, 0, vec![]),
        ("prevent-allow", cdb(&[0x1E, 0, 0, 0, 1, 0]), 0, 0, vec![]),
        ("report-opcodes", cdb(&[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]), 4096, 1, vec![]),
        ("report-tmfs", cdb(&[0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]), 16, 1, vec![]),
    ]
}

/// TEST UNIT READY, which takes the power-on unit attention every session's first command gets.
fn tur(s: &mut Vec<u8>, itt: u32, cmd_sn: u32) {
    pdu::record(s, &pdu::scsi_bhs(0x80, 0, itt, 0, cmd_sn, &[0; 6], 0), &[], &[]);
}

fn pdu_seeds() {
    // A libiscsi session: login, then the commands iscsi-inq / iscsi-ls / a read-write test send.
    let mut cmd_sn = 1u32;
    let mut itt = 1u32;
    let mut s = vec![0u8, 0];
    for (flags, keys) in libiscsi_login("Normal", "None", "None") {
        pdu::record(&mut s, &pdu::login_bhs(flags, ISID, itt, cmd_sn, keys.len()), &[], &keys);
        itt += 1;
    }
    tur(&mut s, 0x1000, cmd_sn);
    cmd_sn += 1;
    let session_start = s.clone();
    let start_sn = cmd_sn;
    for (_, c, edtl, rw, data) in cdbs().iter().take(12) {
        let imm = if *rw == 2 { &data[..] } else { &[][..] };
        let flags = 0x80 | if *rw == 1 { 0x40 } else { 0 } | if *rw == 2 { 0x20 } else { 0 } | 1;
        pdu::record(&mut s, &pdu::scsi_bhs(flags, 0, itt, *edtl, cmd_sn, c, imm.len()), &[], imm);
        itt += 1;
        cmd_sn += 1;
    }
    // NOP-Out ping, SendTargets, logout.
    let nop = b"ping";
    pdu::record(&mut s, &pdu::bhs(0x40, 0x80, itt, 0xFFFF_FFFF, cmd_sn, 0, 0, nop.len()), &[], nop);
    itt += 1;
    let st = kv(&[("SendTargets", "")]);
    pdu::record(&mut s, &pdu::bhs(0x04, 0x80, itt, 0xFFFF_FFFF, cmd_sn, 0, 0, st.len()), &[], &st);
    itt += 1;
    cmd_sn += 1;
    pdu::record(&mut s, &pdu::bhs(0x06 | 0x40, 0x80, itt, 0, cmd_sn, 0, 0, 0), &[], &[]);
    write("pdu", "libiscsi-session", &s);

    // Every CDB after the harness's own login (with and without digests, CmdSN by the harness).
    for (i, (name, c, edtl, rw, data)) in cdbs().into_iter().enumerate() {
        let flags = pdu::FLAG_LOGIN
            | pdu::FLAG_AUTO_CMDSN
            | if i % 3 == 0 { pdu::FLAG_HEADER_DIGEST | pdu::FLAG_DATA_DIGEST } else { 0 };
        let mut s = vec![flags, 0xFF];
        let f = 0x80 | if rw == 1 { 0x40 } else { 0 } | if rw == 2 { 0x20 } else { 0 } | 1;
        let imm = if rw == 2 { &data[..] } else { &[][..] };
        tur(&mut s, 0x1000, 0);
        pdu::record(&mut s, &pdu::scsi_bhs(f, 0, 1, edtl, 0, &c, imm.len()), &[], imm);
        write("pdu", &format!("cdb-{name}"), &s);
    }

    // A write that needs an R2T (InitialR2T=Yes from libiscsi's login): command, then Data-Out
    // answering the R2T (TTT taken from it), in two sequences.
    let mut s = session_start.clone();
    s[0] = pdu::FLAG_AUTO_CMDSN | 1;
    let wr = [0x2A, 0, 0, 0, 0, 0, 0, 0, 128, 0];
    pdu::record(&mut s, &pdu::scsi_bhs(0xA1, 0, 100, 65536, 0, &wr, 0), &[], &[]);
    pdu::record(&mut s, &pdu::bhs(0x05, 0x00, 100, pdu::LAST_R2T, 0, 0, 0, 32768), &[], &[0x77; 512]);
    pdu::record(&mut s, &pdu::bhs(0x05, 0x80, 100, pdu::LAST_R2T, 0, 1, 32768, 32768), &[], &[0x78; 512]);
    let rd = [0x28, 0, 0, 0, 0, 0, 0, 0, 128, 0];
    pdu::record(&mut s, &pdu::scsi_bhs(0xC1, 0, 101, 65536, 0, &rd, 0), &[], &[]);
    write("pdu", "r2t-write-direct", &s);

    // Unsolicited Data-Out (open-iscsi: InitialR2T=No) after immediate data, with digests.
    let mut s = vec![pdu::FLAG_LOGIN | pdu::FLAG_AUTO_CMDSN | pdu::FLAG_HEADER_DIGEST | pdu::FLAG_DATA_DIGEST | 3, 7];
    let wr = [0x2A, 0, 0, 0, 0, 0, 0, 0, 16, 0];
    tur(&mut s, 0x1000, 0);
    pdu::record(&mut s, &pdu::scsi_bhs(0x21, 0, 5, 8192, 0, &wr, 4096), &[], &[1, 2, 3, 4]);
    pdu::record(&mut s, &pdu::bhs(0x05, 0x80, 5, 0xFFFF_FFFF, 0, 0, 4096, 4096), &[], &[5, 6, 7, 8]);
    write("pdu", "unsolicited-data-out-digests", &s);

    // A corrupted data digest on a command, then on a Data-Out.
    let mut s = vec![pdu::FLAG_LOGIN | pdu::FLAG_AUTO_CMDSN | pdu::FLAG_DATA_DIGEST | pdu::FLAG_CORRUPT_DATA, 1];
    let nop = b"0123456789";
    pdu::record(&mut s, &pdu::bhs(0x00, 0x80, 9, 0xFFFF_FFFF, 0, 0, 0, nop.len()), &[], nop);
    pdu::record(&mut s, &pdu::bhs(0x00, 0x80, 10, 0xFFFF_FFFF, 0, 0, 0, nop.len()), &[], nop);
    write("pdu", "bad-data-digest", &s);
    let mut s = vec![pdu::FLAG_LOGIN | pdu::FLAG_AUTO_CMDSN | pdu::FLAG_HEADER_DIGEST | pdu::FLAG_CORRUPT_HEADER, 2];
    pdu::record(&mut s, &pdu::bhs(0x00, 0x80, 9, 0xFFFF_FFFF, 0, 0, 0, 0), &[], &[]);
    pdu::record(&mut s, &pdu::bhs(0x00, 0x80, 10, 0xFFFF_FFFF, 0, 0, 0, 0), &[], &[]);
    write("pdu", "bad-header-digest", &s);

    // An extended CDB AHS (type 1) carrying a 32-byte CDB's tail.
    let mut s = vec![pdu::FLAG_LOGIN | pdu::FLAG_AUTO_CMDSN, 0xFF];
    let mut b = pdu::scsi_bhs(0xC1, 0, 3, 512, 0, &[0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0, 0x09, 0, 0, 0, 0, 0, 0], 0);
    b[4] = 5; // 20 bytes of AHS
    tur(&mut s, 0x1000, 0);
    let mut ahs = vec![0u8; 20];
    ahs[0..2].copy_from_slice(&17u16.to_be_bytes());
    ahs[2] = 1;
    pdu::record(&mut s, &b, &ahs, &[]);
    write("pdu", "extended-cdb-ahs", &s);

    // Task management: ABORT TASK of a parked command, LUN RESET, out-of-order CmdSN.
    let mut s = session_start.clone();
    let rd = [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0];
    pdu::record(&mut s, &pdu::scsi_bhs(0xC1, 0, 50, 4096, start_sn + 1, &rd, 0), &[], &[]);
    let mut abort = pdu::bhs(0x02 | 0x40, 0x80 | 1, 51, 50, start_sn, 0, 0, 0);
    abort[32..36].copy_from_slice(&(start_sn + 1).to_be_bytes());
    pdu::record(&mut s, &abort, &[], &[]);
    pdu::record(&mut s, &pdu::bhs(0x02 | 0x40, 0x80 | 5, 52, 0xFFFF_FFFF, start_sn, 0, 0, 0), &[], &[]);
    write("pdu", "task-management", &s);

    // A discovery session: SendTargets=All, a multi-PDU text exchange.
    let mut s = vec![0u8, 0];
    for (flags, keys) in libiscsi_login("Discovery", "None", "None") {
        pdu::record(&mut s, &pdu::login_bhs(flags, ISID, 1, 1, keys.len()), &[], &keys);
    }
    let st = kv(&[("SendTargets", "All")]);
    pdu::record(&mut s, &pdu::bhs(0x04 | 0x40, 0x80, 7, 0xFFFF_FFFF, 1, 0, 0, st.len()), &[], &st);
    pdu::record(&mut s, &pdu::bhs(0x06 | 0x40, 0x80, 8, 0, 1, 0, 0, 0), &[], &[]);
    write("pdu", "discovery-sendtargets", &s);

    // open-iscsi login with digests offered, then a SCSI read.
    let mut s = vec![0u8, 0];
    for (flags, keys) in open_iscsi_login() {
        pdu::record(&mut s, &pdu::login_bhs(flags, ISID, 0, 0, keys.len()), &[], &keys);
    }
    tur(&mut s, 0x1000, 0);
    pdu::record(&mut s, &pdu::scsi_bhs(0xC1, 0, 2, 512, 1, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0), &[], &[]);
    write("pdu", "open-iscsi-session", &s);

    // Too long a data segment during login; a non-login PDU during login.
    let mut s = vec![0u8, 0];
    pdu::record(&mut s, &pdu::login_bhs(0x81, ISID, 0, 0, 9000), &[], b"InitiatorName=x\0");
    write("pdu", "login-too-long", &s);
    let mut s = vec![0u8, 0];
    pdu::record(&mut s, &pdu::scsi_bhs(0xC1, 0, 2, 512, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0), &[], &[]);
    write("pdu", "command-before-login", &s);
}

fn login_seeds() {
    let mut s = Vec::new();
    for (flags, keys) in libiscsi_login("Normal", "CRC32C,None", "CRC32C,None") {
        login::record(&mut s, flags, &keys);
    }
    write("login", "libiscsi-normal", &s);
    let mut s = Vec::new();
    for (flags, keys) in libiscsi_login("Discovery", "None", "None") {
        login::record(&mut s, flags, &keys);
    }
    write("login", "libiscsi-discovery", &s);
    let mut s = Vec::new();
    for (flags, keys) in open_iscsi_login() {
        login::record(&mut s, flags, &keys);
    }
    write("login", "open-iscsi", &s);
    // Straight to the operational stage, everything in one request (iPXE does this).
    let mut s = Vec::new();
    let names = [
        ("InitiatorName", "iqn.2010-04.org.ipxe:00000000-0000-0000-0000-000000000000"),
        ("TargetName", TARGET),
        ("SessionType", "Normal"),
    ];
    let keys = kv(&[&names[..], login_peers::IPXE_OPERATIONAL].concat());
    login::record(&mut s, 0x80 | (1 << 2) | 3, &keys);
    write("login", "ipxe-operational-only", &s);
    // A request text split over two PDUs (C bit), then the final one.
    let mut s = Vec::new();
    let (_, first) = &libiscsi_login("Normal", "None", "None")[0];
    login::record(&mut s, 0x40 | 1, &first[..20]);
    login::record(&mut s, 0x80 | 1, &first[20..]);
    write("login", "continued-request", &s);
    // The target declines to transit until its offers are answered (no declarations given).
    let mut s = Vec::new();
    login::record(&mut s, 0x80 | (1 << 2) | 3, &kv(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]));
    login::record(&mut s, 0x80 | (1 << 2) | 3, &kv(&[("MaxRecvDataSegmentLength", "65536")]));
    login::record(&mut s, 0x80 | (1 << 2) | 3, &[]);
    write("login", "offers-answered", &s);
    // CHAP offered where the target has no secret.
    let mut s = Vec::new();
    login::record(
        &mut s,
        0x01,
        &kv(&[("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "CHAP,None")]),
    );
    login::record(&mut s, 0x01, &kv(&[("CHAP_A", "5,7,8")]));
    write("login", "chap-offered", &s);
    // CHAP logins as libiscsi and open-iscsi make them (the target demands CHAP in the
    // harness's second run): AuthMethod, CHAP_A, then CHAP_N and the response (`auto`: the
    // harness computes it), with a challenge of the initiator's for mutual CHAP; then the
    // operational stage.
    let chap_login = |session: &str, algorithms: &str, user: &str, mutual: bool| {
        let mut s = Vec::new();
        let mut first = vec![("InitiatorName", INITIATOR), ("SessionType", session)];
        if session == "Normal" {
            first.push(("TargetName", TARGET));
        }
        first.push(("AuthMethod", "CHAP,None"));
        login::record(&mut s, 0x80 | 1, &kv(&first));
        login::record(&mut s, 0x80 | 1, &kv(&[("CHAP_A", algorithms)]));
        let mut r = kv(&[("CHAP_N", user)]);
        r.extend_from_slice(login::AUTO_RESPONSE);
        r.push(0);
        if mutual {
            r.extend(kv(&[("CHAP_I", "17"), ("CHAP_C", "0x0123456789abcdef0123456789abcdef")]));
        }
        login::record(&mut s, 0x80 | 1, &r);
        login::record(&mut s, 0x80 | (1 << 2) | 3, &kv(login_peers::OPEN_ISCSI_OPERATIONAL));
        s
    };
    write("login", "chap-md5", &chap_login("Normal", "5", login::CHAP_USER, false));
    write("login", "chap-sha256-mutual", &chap_login("Normal", "7,5", login::CHAP_USER, true));
    write("login", "chap-sha3-discovery", &chap_login("Discovery", "8,7,5", login::CHAP_USER, false));
    write("login", "chap-wrong-user", &chap_login("Normal", "5", "someone", false));
}

fn text_seeds() {
    let mut s = vec![1u8, 0, 0];
    text::record(&mut s, 0x80, &kv(&[("SendTargets", "All")]));
    write("text", "discovery-all", &s);
    let mut s = vec![0u8, 0, 0];
    text::record(&mut s, 0x80, &kv(&[("SendTargets", ""), ("MaxRecvDataSegmentLength", "512")]));
    text::record(&mut s, 0x80, &kv(&[("SendTargets", TARGET)]));
    write("text", "normal-sendtargets", &s);
    // A multi-PDU request (C=1, then continued under the target's TTT), and a long response
    // fetched in pieces with a tiny MaxRecvDataSegmentLength.
    let mut s = vec![1u8, 0, 0];
    let req = kv(&[("SendTargets", "All"), ("X-com.example.Key", "v"), ("HeaderDigest", "CRC32C")]);
    text::record(&mut s, 0x40, &req[..10]);
    text::record(&mut s, 0x81, &req[10..]);
    text::record(&mut s, 0x01, &[]);
    text::record(&mut s, 0x81, &[]);
    write("text", "multi-pdu", &s);
    let mut s = vec![0u8, 0, 0];
    text::record(&mut s, 0x80, b"MaxRecvDataSegmentLength=0x2000\0InitiatorAlias=a\0Bad=\0=\0k\0");
    write("text", "odd-values", &s);
}

fn scsi_seeds() {
    for (name, c, edtl, rw, data) in cdbs() {
        let mut s = Vec::new();
        // Clear the power-on unit attention first, as an initiator's TEST UNIT READY does.
        scsi::record(&mut s, 0, 0, 0, &[0, 0, 0, 0, 0, 0], &[]);
        scsi::record(&mut s, 0, rw, edtl, &c, &data);
        write("scsi", &name, &s);
    }
    let mut s = Vec::new();
    scsi::record(&mut s, 1, 0, 0, &[0, 0, 0, 0, 0, 0], &[]);
    scsi::record(&mut s, 1, 2, 512, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512]);
    scsi::record(&mut s, 0xFF, 1, 36, &[0x12, 0, 0, 0, 36, 0], &[]);
    scsi::record(&mut s, 3, 1, 252, &[0x03, 0, 0, 0, 252, 0], &[]);
    write("scsi", "read-only-and-missing-luns", &s);
}

fn rpc_seeds() {
    let lines = [
        r#"{"jsonrpc":"2.0","id":1,"method":"get_host"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"get_port"}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"get_target_iqn"}"#,
        r#"{"jsonrpc":"2.0","id":6,"method":"add_lun","params":{"name":"dut1","file_path":"dut1.img","size_mb":1}}"#,
        r#"{"jsonrpc":"2.0","id":7,"method":"add_lun","params":["scratch","",1,false,false,"mem",9]}"#,
        r#"{"jsonrpc":"2.0","id":8,"method":"remove_lun","params":{"name":"dut1"}}"#,
        r#"{"jsonrpc":"2.0","id":9,"method":"list_luns"}"#,
        r#"{"jsonrpc":"2.0","id":10,"method":"clear_all_luns"}"#,
        r#"{"jsonrpc":"2.0","id":11,"method":"get_stats"}"#,
        r#"{"jsonrpc":"2.0","id":12,"method":"list_sessions"}"#,
        r#"{"jsonrpc":"2.0","id":"i","method":"image_info","params":{"name":"dut1"}}"#,
        r#"{"jsonrpc":"2.0","id":4,"method":"stop"}"#,
        r#"{"jsonrpc":"2.0","id":5,"method":"start"}"#,
    ];
    write("rpc", "readme-examples", lines.join("\n").as_bytes());
    for (i, l) in lines.iter().enumerate() {
        write("rpc", &format!("line-{i:02}"), l.as_bytes());
    }
    let bad = [
        "garbage",
        r#"[{"jsonrpc":"2.0","id":1,"method":"get_host"}]"#,
        r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"add_lun","params":{"name":"../x","file_path":"/etc/passwd","size_mb":1}}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"add_lun","params":{"name":"a","lun_id":99999,"backing":"mem","size_mb":1}}"#,
        r#"{"jsonrpc":"2.0","method":"list_luns"}"#,
    ];
    write("rpc", "bad-requests", bad.join("\n").as_bytes());
}

fn main() {
    pdu_seeds();
    login_seeds();
    text_seeds();
    scsi_seeds();
    rpc_seeds();
}
