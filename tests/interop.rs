//! Interoperability with the initiators uringtgt serves, replayed against the real binary: each
//! test logs in with exactly the Login Requests that initiator sends (its ISID format, its
//! stages, its key set and values, read from its source), checks the negotiated answers it
//! depends on, then runs its first command sequence (REPORT LUNS, the INQUIRY VPD walk,
//! READ CAPACITY, MODE SENSE of the caching page, a READ and a WRITE of its usual shape) and
//! checks the fields it reads.
//!
//! - open-iscsi (the Linux kernel initiator): iscsid's login (usr/login.c) with the iscsid.conf
//!   defaults, then the SCSI scan and sd probe of the kernel.
//! - iPXE `sanboot`: src/net/tcp/iscsi.c's two Login Requests (no discovery, InitialR2T=Yes,
//!   ImmediateData=No, MaxRecvDataSegmentLength=8192), then src/drivers/block/scsi.c's TEST
//!   UNIT READY, READ CAPACITY(10) and READ(10)/WRITE(10).
//! - QEMU's iscsi block driver through libiscsi: lib/login.c's single operational-stage Login
//!   Request, then block/iscsi.c's probe.
//! - The UEFI (EDK2 IScsiDxe) initiator: IScsiProto.c's Login Requests, whose operational
//!   answer it accepts only if every key in it is one it consumes, then ScsiDiskDxe's probe.

mod common;
#[path = "../src/protocol/login_peers.rs"]
mod login_peers;

use common::initiator::{LoginAnswer, LoginStep, Response, Session};
use common::Target;
use std::collections::BTreeSet;

const BS: usize = 512;
const DISK_MB: usize = 16;
const INQUIRY: u8 = 0x12;
const MODE_SENSE_6: u8 = 0x1A;
const MODE_SENSE_10: u8 = 0x5A;
const READ_CAPACITY_10: u8 = 0x25;
const CACHING_PAGE: u8 = 0x08;

/// A target with a file LUN 0 and a RAM LUN 1, as a boot or test rig has them.
fn target() -> Target {
    Target::start(&[
        "--lun",
        &format!("name=disk,size_mb={DISK_MB},lun_id=0"),
        "--lun",
        "name=ram,backing=mem,size_mb=4,lun_id=1",
    ])
}

fn key<'a>(answers: &'a [LoginAnswer], name: &str) -> Option<&'a str> {
    answers.iter().flat_map(|a| &a.keys).find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// No key of any answer was refused or misunderstood: iPXE treats `Reject` as fatal, and
/// every initiator here would lose the key's value.
fn assert_nothing_refused(answers: &[LoginAnswer]) {
    for (k, v) in answers.iter().flat_map(|a| &a.keys) {
        assert!(!matches!(v.as_str(), "Reject" | "NotUnderstood" | "Irrelevant"), "target answered {k}={v}");
    }
}

fn num(answers: &[LoginAnswer], name: &str) -> u32 {
    let v = key(answers, name).unwrap_or_else(|| panic!("no {name} in {answers:?}"));
    v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a number"))
}

fn good(r: Response, what: &str) -> Response {
    assert!(r.is_good(), "{what}: {r:?}");
    r
}

/// The answers every initiator here relies on, in the form it reads them.
struct Probe {
    blocks: u64,
}

impl Probe {
    /// REPORT LUNS lists both LUNs (peripheral addressing).
    fn report_luns(s: &mut Session, alloc: u32) {
        let mut cdb = [0u8; 12];
        cdb[0] = 0xA0;
        cdb[6..10].copy_from_slice(&alloc.to_be_bytes());
        let r = good(s.command(0, &cdb, None, alloc).unwrap(), "REPORT LUNS");
        let len = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
        assert_eq!(len, 16, "two LUNs");
        assert_eq!(&r.data[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&r.data[16..24], &[0, 1, 0, 0, 0, 0, 0, 0]);
    }

    /// Standard INQUIRY: a direct-access block device of SPC-3 or later (Linux only asks
    /// for VPD pages and READ CAPACITY(16) from SPC-3 devices), response format 2.
    fn inquiry(s: &mut Session, alloc: u8) {
        let r = good(s.command(0, &[INQUIRY, 0, 0, 0, alloc, 0], None, u32::from(alloc)).unwrap(), "INQUIRY");
        assert_eq!(r.data.len(), usize::from(alloc));
        assert_eq!(r.data[0], 0x00, "connected direct-access block device");
        assert!(r.data[2] >= 5, "VERSION {} below SPC-3", r.data[2]);
        assert_eq!(r.data[3] & 0x0F, 2, "RESPONSE DATA FORMAT");
        assert!(r.data[4] >= 31, "ADDITIONAL LENGTH");
        assert!(r.data[8..36].iter().all(|c| (0x20..0x7F).contains(c)), "vendor/product/revision are ASCII");
    }

    fn vpd(s: &mut Session, page: u8, alloc: u16) -> Vec<u8> {
        let cdb = [INQUIRY, 1, page, (alloc >> 8) as u8, alloc as u8, 0];
        let r = good(s.command(0, &cdb, None, u32::from(alloc)).unwrap(), "INQUIRY VPD");
        assert_eq!(r.data[1], page, "page code");
        let len = usize::from(u16::from_be_bytes([r.data[2], r.data[3]]));
        assert_eq!(r.data.len(), (4 + len).min(usize::from(alloc)), "page {page:#04x} length");
        r.data
    }

    /// The VPD walk: the supported pages, then each of `pages` the initiator reads.
    fn vpd_walk(s: &mut Session, pages: &[u8]) {
        let d = Self::vpd(s, 0x00, 255);
        let listed = &d[4..];
        assert!(listed.windows(2).all(|w| w[0] < w[1]), "ascending: {listed:?}");
        for p in pages {
            assert!(listed.contains(p), "page {p:#04x} not listed in {listed:?}");
            let d = Self::vpd(s, *p, 255);
            match p {
                0x80 => {
                    let serial = &d[4..];
                    assert!(!serial.is_empty() && serial.iter().all(|c| (0x20..0x7F).contains(c)), "{d:?}");
                }
                0x83 => {
                    // An NAA designator of the LUN (association 0): what multipath and
                    // /dev/disk/by-id key on.
                    let mut at = 4;
                    let mut naa = false;
                    while at + 4 <= d.len() {
                        let (ty, assoc, len) = (d[at + 1] & 0x0F, (d[at + 1] >> 4) & 3, usize::from(d[at + 3]));
                        naa |= ty == 3 && assoc == 0 && len >= 8;
                        at += 4 + len;
                    }
                    assert!(naa, "no NAA designator: {d:?}");
                }
                0xB0 => {
                    assert_eq!(d.len(), 64, "block limits page length 3Ch");
                    let max = u32::from_be_bytes(d[8..12].try_into().unwrap());
                    let opt = u32::from_be_bytes(d[12..16].try_into().unwrap());
                    assert!(max >= 128, "MAXIMUM TRANSFER LENGTH {max}");
                    assert!(opt > 0 && opt <= max, "OPTIMAL TRANSFER LENGTH {opt}");
                }
                0xB1 => assert_eq!(u16::from_be_bytes([d[4], d[5]]), 1, "non-rotating medium"),
                0xB2 => assert!(d[5] & 0x80 != 0, "LBPU: UNMAP is what discard maps to"),
                _ => {}
            }
        }
    }

    /// READ CAPACITY(16): the LUN's size in 512-byte blocks, 4 KiB physical blocks, and
    /// LBPME (thin provisioning) as the block provisioning page says.
    fn read_capacity_16(s: &mut Session) -> Probe {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9E;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let r = good(s.command(0, &cdb, None, 32).unwrap(), "READ CAPACITY(16)");
        let blocks = u64::from_be_bytes(r.data[..8].try_into().unwrap()) + 1;
        assert_eq!(blocks, (DISK_MB << 20) as u64 / BS as u64);
        assert_eq!(u32::from_be_bytes(r.data[8..12].try_into().unwrap()), BS as u32);
        assert_eq!(r.data[13] & 0x0F, 3, "LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT");
        assert!(r.data[14] & 0x80 != 0, "LBPME");
        Probe { blocks }
    }

    /// READ CAPACITY(10), which iPXE and UEFI send first.
    fn read_capacity_10(s: &mut Session) -> Probe {
        let r = good(s.command(0, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, 8).unwrap(), "RC(10)");
        let last = u32::from_be_bytes(r.data[..4].try_into().unwrap());
        assert_ne!(last, u32::MAX, "fits READ CAPACITY(10)");
        assert_eq!(u32::from_be_bytes(r.data[4..8].try_into().unwrap()), BS as u32);
        Probe { blocks: u64::from(last) + 1 }
    }

    /// MODE SENSE(6) of the caching page: write cache enabled (the initiator then sends
    /// SYNCHRONIZE CACHE), DPOFUA (it may send FUA writes), not write-protected.
    fn mode_sense_6_caching(s: &mut Session) {
        let r = good(s.command(0, &[MODE_SENSE_6, 0x08, CACHING_PAGE, 0, 0xFF, 0], None, 255).unwrap(), "MS(6)");
        assert_eq!(usize::from(r.data[0]) + 1, r.data.len(), "MODE DATA LENGTH");
        assert_eq!(r.data[2] & 0x80, 0, "WP");
        assert_eq!(r.data[2] & 0x10, 0x10, "DPOFUA");
        let page = &r.data[4 + usize::from(r.data[3])..];
        Self::caching_page(page);
    }

    /// MODE SENSE(10) of the caching page, as libiscsi and SCSI-3 hosts ask for it.
    fn mode_sense_10_caching(s: &mut Session) {
        let cdb = [MODE_SENSE_10, 0x08, CACHING_PAGE, 0, 0, 0, 0, 0x01, 0x00, 0];
        let r = good(s.command(0, &cdb, None, 256).unwrap(), "MS(10)");
        assert_eq!(usize::from(u16::from_be_bytes([r.data[0], r.data[1]])) + 2, r.data.len());
        assert_eq!(r.data[3] & 0x90, 0x10, "DPOFUA, not WP");
        let bd_len = usize::from(u16::from_be_bytes([r.data[6], r.data[7]]));
        Self::caching_page(&r.data[8 + bd_len..]);
    }

    fn caching_page(page: &[u8]) {
        assert_eq!(page[0] & 0x3F, CACHING_PAGE, "{page:?}");
        assert_eq!(page[1], 0x12, "caching page length");
        assert_eq!(page[2] & 0x04, 0x04, "WCE");
        assert_eq!(page[2] & 0x01, 0, "RCD: reads are cached");
    }

    /// A WRITE then a READ of the same blocks, with the 10-byte CDBs of a small disk.
    fn write_read(&self, s: &mut Session, lba: u32, blocks: u16, seed: u8) -> (Response, Response) {
        assert!(u64::from(lba) + u64::from(blocks) <= self.blocks);
        let data: Vec<u8> = (0..usize::from(blocks) * BS).map(|i| (i as u8).wrapping_mul(seed) ^ seed).collect();
        let w = good(s.write10(0, lba, &data, BS as u32).unwrap(), "WRITE(10)");
        let r = good(s.read10(0, lba, blocks, BS as u32).unwrap(), "READ(10)");
        assert!(r.data == data, "read back differs at LBA {lba}");
        (w, r)
    }
}

/// open-iscsi's operational keys (the ones the login unit tests and fuzz seeds use) with its
/// header digest setting.
fn open_iscsi_operational(header_digest: &str) -> Vec<(&str, &str)> {
    let keys = login_peers::OPEN_ISCSI_OPERATIONAL.iter().copied();
    keys.map(|(k, v)| if k == "HeaderDigest" { (k, header_digest) } else { (k, v) }).collect()
}

/// The open-iscsi Login Requests: the security stage (AuthMethod=None) then the operational
/// keys of iscsid.conf's defaults, in usr/login.c's order.
fn open_iscsi_login(t: &Target, header_digest: &str) -> (Session, Vec<LoginAnswer>) {
    let iqn = t.iqn.clone();
    let steps = [
        LoginStep::new(
            0,
            1,
            &[
                ("InitiatorName", "iqn.2004-10.com.ubuntu:01:5b3ed2a7c9f1"),
                ("InitiatorAlias", "rig-host"),
                ("TargetName", &iqn),
                ("SessionType", "Normal"),
                ("AuthMethod", "None"),
            ],
        ),
        LoginStep::new(1, 3, &open_iscsi_operational(header_digest)),
    ];
    // open-iscsi's ISID: OUI format 0x00023d (Linux-iSCSI), then the session number.
    Session::login_scripted(&t.addr(), [0x00, 0x02, 0x3d, 0x00, 0x00, 0x01], &steps).unwrap()
}

#[test]
fn open_iscsi_gets_immediate_unsolicited_data_and_the_linux_scan_answers() {
    let t = target();
    let (mut s, answers) = open_iscsi_login(&t, "None,CRC32C");
    assert_nothing_refused(&answers);
    assert!(key(&answers[..1], "TargetPortalGroupTag").is_some(), "TPGT in the first answer");
    // The first value the target supports from the initiator's list: None.
    assert_eq!(key(&answers, "HeaderDigest"), Some("None"));
    assert_eq!(key(&answers, "DataDigest"), Some("None"));
    assert_eq!(key(&answers, "ImmediateData"), Some("Yes"));
    assert_eq!(key(&answers, "InitialR2T"), Some("No"));
    assert_eq!(key(&answers, "IFMarker"), Some("No"));
    assert_eq!(key(&answers, "OFMarker"), Some("No"));
    assert_eq!(num(&answers, "MaxConnections"), 1);
    let (mbl, fbl) = (num(&answers, "MaxBurstLength"), num(&answers, "FirstBurstLength"));
    assert!((262144..=16776192).contains(&mbl), "MaxBurstLength={mbl}");
    assert!((65536..=262144).contains(&fbl) && fbl <= mbl, "FirstBurstLength={fbl}");
    let mrdsl = s.negotiated.target_max_recv_data_segment_length;
    assert!(mrdsl >= 8192, "target MaxRecvDataSegmentLength {mrdsl}");
    assert!(s.negotiated.immediate_data && !s.negotiated.initial_r2t);

    // scsi_scan.c: REPORT LUNS to LUN 0, INQUIRY 36 then the VPD pages; sd.c: READ
    // CAPACITY(16), MODE SENSE(6) (write protect and caching), the block limits, device
    // characteristics and provisioning pages; then the partition scan (4 KiB at LBA 0).
    Probe::report_luns(&mut s, 4096);
    Probe::inquiry(&mut s, 36);
    Probe::vpd_walk(&mut s, &[0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    let probe = Probe::read_capacity_16(&mut s);
    Probe::mode_sense_6_caching(&mut s);
    good(s.read10(0, 0, 8, BS as u32).unwrap(), "partition scan");
    // A page-cache writeback: 4 KiB as immediate data, no R2T.
    let (w, _) = probe.write_read(&mut s, 2048, 8, 3);
    assert_eq!(w.r2ts, 0, "4 KiB fits the immediate data");
    // A 512 KiB writeback: the first burst unsolicited, the rest solicited.
    let (w, r) = probe.write_read(&mut s, 4096, 1024, 5);
    assert!(w.r2ts >= 1, "beyond FirstBurstLength the target asks for the rest");
    assert!(r.data_in_pdus >= 2, "Data-In cut to our 256 KiB segments");
    good(s.sync_cache(0).unwrap(), "SYNCHRONIZE CACHE");
    s.logout().unwrap();
}

#[test]
fn open_iscsi_asking_for_header_digests_gets_them() {
    let t = target();
    let (mut s, answers) = open_iscsi_login(&t, "CRC32C,None");
    assert_nothing_refused(&answers);
    assert_eq!(key(&answers, "HeaderDigest"), Some("CRC32C"));
    assert!(s.negotiated.header_digest && !s.negotiated.data_digest);
    // Every PDU from here on carries a header digest the test initiator checks.
    Probe::report_luns(&mut s, 4096);
    let probe = Probe::read_capacity_16(&mut s);
    probe.write_read(&mut s, 100, 64, 7);
    s.logout().unwrap();
}

#[test]
fn ipxe_sanboot_login_is_never_refused_and_gets_small_solicited_pdus() {
    let t = target();
    let iqn = t.iqn.clone();
    let steps = [
        LoginStep::new(
            0,
            1,
            &[
                ("InitiatorName", "iqn.2010-04.org.ipxe:00000000-0000-0000-0000-525400123456"),
                ("TargetName", &iqn),
                ("SessionType", "Normal"),
                ("AuthMethod", "None"),
            ],
        ),
        LoginStep::new(1, 3, login_peers::IPXE_OPERATIONAL),
    ];
    // iPXE's ISID: IANA enterprise number format (type 01b), Fen Systems' number 10019.
    let (mut s, answers) = Session::login_scripted(&t.addr(), [0x40, 0x00, 0x27, 0x23, 0x00, 0x01], &steps).unwrap();
    // iPXE fails the boot on any "Reject" (iscsi_handle_string).
    assert_nothing_refused(&answers);
    assert_ne!(key(&answers, "InitialR2T"), Some("No"));
    assert_ne!(key(&answers, "ImmediateData"), Some("Yes"));
    assert!(s.negotiated.initial_r2t && !s.negotiated.immediate_data);
    assert_eq!(key(&answers, "HeaderDigest").unwrap_or("None"), "None");

    // scsi.c: TEST UNIT READY (retried past the power-on unit attention), READ CAPACITY(10);
    // INT 13h: the MBR, then a run of sectors; a write from the booted OS's INT 13h path.
    good(s.test_unit_ready(0).unwrap(), "TEST UNIT READY");
    let probe = Probe::read_capacity_10(&mut s);
    assert_eq!(probe.blocks, (DISK_MB << 20) as u64 / BS as u64);
    good(s.read10(0, 0, 1, BS as u32).unwrap(), "MBR");
    // 32 KiB read: every Data-In within iPXE's 8192-byte segments (the test initiator
    // refuses larger ones), so at least 4 of them.
    let (w, r) = probe.write_read(&mut s, 63, 64, 9);
    assert!(r.data_in_pdus >= 4, "{} Data-In PDUs", r.data_in_pdus);
    assert!(w.r2ts >= 1, "all Data-Out solicited");
    s.logout().unwrap();
}

#[test]
fn qemu_libiscsi_single_pdu_login_and_block_driver_probe() {
    let t = target();
    let iqn = t.iqn.clone();
    // Without CHAP libiscsi starts in the operational stage and sends everything at once.
    let steps = [LoginStep::new(
        1,
        3,
        &[
            ("InitiatorName", "iqn.2008-11.org.linux-kvm"),
            ("TargetName", &iqn),
            ("SessionType", "Normal"),
            ("HeaderDigest", "None,CRC32C"),
            ("DataDigest", "None"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("MaxConnections", "1"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ],
    )];
    // libiscsi's random ISID: type 10b.
    let (mut s, answers) = Session::login_scripted(&t.addr(), [0x80, 0x12, 0x34, 0x56, 0x00, 0x00], &steps).unwrap();
    assert_nothing_refused(&answers);
    // libiscsi reads these and nothing else: a CRC32C here would switch its digests on.
    assert_eq!(key(&answers, "HeaderDigest"), Some("None"));
    assert_eq!(key(&answers, "InitialR2T"), Some("No"));
    assert_eq!(key(&answers, "ImmediateData"), Some("Yes"));
    assert!(num(&answers, "FirstBurstLength") <= 262144);
    assert!(num(&answers, "MaxBurstLength") <= 262144);
    assert!(key(&answers, "MaxRecvDataSegmentLength").is_some(), "libiscsi assumes 8192 without it");

    // block/iscsi.c: TEST UNIT READY, INQUIRY, the supported VPD pages, READ CAPACITY(16),
    // block limits and provisioning pages, MODE SENSE for WP and DPOFUA; then guest I/O.
    good(s.test_unit_ready(0).unwrap(), "TEST UNIT READY");
    Probe::inquiry(&mut s, 36);
    Probe::vpd_walk(&mut s, &[0xB0, 0xB2]);
    let probe = Probe::read_capacity_16(&mut s);
    Probe::mode_sense_6_caching(&mut s);
    Probe::mode_sense_10_caching(&mut s);
    Probe::report_luns(&mut s, 16384);
    // A virtio request: 128 KiB, within the first burst, then a flush.
    let (w, _) = probe.write_read(&mut s, 8192, 256, 11);
    assert_eq!(w.r2ts, 0, "128 KiB fits FirstBurstLength: all unsolicited");
    good(s.sync_cache(0).unwrap(), "flush");
    s.logout().unwrap();
}

#[test]
fn uefi_edk2_gets_exactly_the_operational_keys_it_consumes() {
    let t = target();
    let iqn = t.iqn.clone();
    let steps = [
        LoginStep::new(
            0,
            1,
            &[
                ("InitiatorName", "iqn.2017-01.org.tianocore:edk2-uefi"),
                ("SessionType", "Normal"),
                ("TargetName", &iqn),
                ("AuthMethod", "None"),
            ],
        ),
        LoginStep::new(
            1,
            3,
            &[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("ErrorRecoveryLevel", "0"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "65536"),
                ("MaxConnections", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "20"),
                ("MaxOutstandingR2T", "1"),
            ],
        ),
    ];
    // EDK2's ISID: OUI format, then a random qualifier.
    let (mut s, answers) = Session::login_scripted(&t.addr(), [0x00, 0x00, 0xaa, 0x01, 0x5e, 0x11], &steps).unwrap();
    assert_nothing_refused(&answers);
    // IScsiCheckOpParams fails the login unless the operational answer holds each key it
    // needs and no key it does not consume.
    let op: Vec<&(String, String)> = answers[1..].iter().flat_map(|a| &a.keys).collect();
    let names: BTreeSet<&str> = op.iter().map(|(k, _)| k.as_str()).collect();
    let required = [
        "HeaderDigest",
        "DataDigest",
        "ErrorRecoveryLevel",
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "MaxConnections",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "MaxOutstandingR2T",
    ];
    let consumed = [
        "MaxRecvDataSegmentLength",
        "DataPDUInOrder",
        "DataSequenceInOrder",
        "SessionType",
        "TargetAlias",
        "TargetPortalGroupTag",
    ];
    for k in required {
        assert!(names.contains(k), "{k} missing from the operational answer {op:?}");
    }
    for k in &names {
        assert!(required.contains(k) || consumed.contains(k), "EDK2 would refuse the login over {k}: {op:?}");
    }
    assert_eq!(key(&answers[1..], "HeaderDigest"), Some("None"));
    assert_eq!(key(&answers[1..], "DataDigest"), Some("None"));
    assert!(num(&answers[1..], "ErrorRecoveryLevel") <= 2);
    assert!((1..=65535).contains(&num(&answers[1..], "MaxConnections")));
    assert!((1..=65535).contains(&num(&answers[1..], "MaxOutstandingR2T")));
    assert!(num(&answers[1..], "DefaultTime2Wait") <= 3600);
    assert!(num(&answers[1..], "DefaultTime2Retain") <= 3600);

    // ScsiDiskDxe: INQUIRY, the supported VPD pages and block limits, TEST UNIT READY, READ
    // CAPACITY(10) then (16); the boot manager reads the GPT; a variable store write.
    Probe::inquiry(&mut s, 96);
    Probe::vpd_walk(&mut s, &[0xB0]);
    good(s.test_unit_ready(0).unwrap(), "TEST UNIT READY");
    Probe::read_capacity_10(&mut s);
    let probe = Probe::read_capacity_16(&mut s);
    good(s.read10(0, 0, 1, BS as u32).unwrap(), "protective MBR");
    good(s.read10(0, 1, 1, BS as u32).unwrap(), "GPT header");
    let (w, _) = probe.write_read(&mut s, 34, 1, 13);
    assert_eq!(w.r2ts, 0, "one block as immediate data");
    s.logout().unwrap();
}
