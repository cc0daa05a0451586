//! The target as seen by libiscsi's command-line tools (Debian libiscsi-bin): discovery and LUN
//! listing, INQUIRY pages, READ CAPACITY (16); plus write protection through the test initiator.

mod common;

use std::process::Command;

use common::initiator::{LoginOptions, STATUS_CHECK_CONDITION};
use common::{require_tool, tool_output, Target};

const BS: u64 = 512;
const DISK_BYTES: u64 = 64 << 20;
const RAM_BYTES: u64 = 32 << 20;

fn start() -> Target {
    Target::start(&[
        "--lun",
        "name=disk0,file_path=disk0.img,size_mb=64,lun_id=0",
        "--lun",
        "name=ram0,backing=mem,size_mb=32,lun_id=1",
        "--lun",
        "name=ro0,backing=mem,size_mb=8,read_only=true,lun_id=2",
    ])
}

/// iscsi-ls prints READ CAPACITY (10)'s last LBA times the block size, divided by 1024 while above
/// 1024 (libiscsi utils/iscsi-ls.c), e.g. "63M" for 64 MiB.
fn iscsi_ls_size(bytes: u64) -> String {
    let mut size = (bytes / BS - 1) * BS;
    let units = [' ', 'k', 'M', 'G', 'T'];
    let mut i = 0;
    while i < 4 && size > 1024 {
        size /= 1024;
        i += 1;
    }
    format!("{size}{}", units[i])
}

/// "Lun:N    Type:TYPE (Size:S)" lines of `iscsi-ls -s` under the target `iqn`: (lun, type, size).
fn parse_iscsi_ls(out: &str, iqn: &str) -> Option<Vec<(u16, String, Option<String>)>> {
    let mut in_target = false;
    let mut found = false;
    let mut luns = Vec::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("Target:") {
            in_target = rest.split_whitespace().next() == Some(iqn);
            found |= in_target;
            continue;
        }
        let Some(rest) = line.strip_prefix("Lun:") else { continue };
        if !in_target {
            continue;
        }
        let mut it = rest.split_whitespace();
        let lun = it.next()?.parse().ok()?;
        let ty = it.next()?.strip_prefix("Type:")?.to_string();
        let size = rest.split_once("(Size:").and_then(|(_, s)| s.split_once(')')).map(|(s, _)| s.to_string());
        luns.push((lun, ty, size));
    }
    found.then_some(luns)
}

/// `Key:value` lines of iscsi-inq / iscsi-readcapacity16 output.
fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
}

#[test]
fn iscsi_ls_lists_target_and_luns() {
    if !require_tool("iscsi-ls") {
        return;
    }
    let t = start();
    let out = tool_output(Command::new("iscsi-ls").args(["-s", &t.portal_url()]));
    println!("{out}");
    let luns = parse_iscsi_ls(&out, &t.iqn).unwrap_or_else(|| panic!("target {} not listed:\n{out}", t.iqn));
    for (name, bytes) in [("disk0", DISK_BYTES), ("ram0", RAM_BYTES)] {
        let id = t.lun(name);
        let (_, ty, size) = luns.iter().find(|l| l.0 == id).unwrap_or_else(|| panic!("LUN {id} ({name}) not listed"));
        assert_eq!(ty, "DIRECT_ACCESS", "LUN {id} type");
        assert_eq!(size.as_deref(), Some(iscsi_ls_size(bytes).as_str()), "LUN {id} ({name}) size");
    }
    // REPORT LUNS through our initiator agrees with what iscsi-ls walked.
    let mut s = t.login(&LoginOptions::default());
    let mut reported = s.report_luns().expect("REPORT LUNS");
    reported.sort_unstable();
    let mut listed: Vec<u16> = luns.iter().map(|l| l.0).collect();
    listed.sort_unstable();
    assert_eq!(reported, listed, "REPORT LUNS vs iscsi-ls");
    s.logout().unwrap();
}

#[test]
fn iscsi_inq_standard_and_vpd() {
    if !require_tool("iscsi-inq") {
        return;
    }
    let t = start();
    for name in ["disk0", "ram0"] {
        let url = t.url(t.lun(name));
        let std_inq = tool_output(Command::new("iscsi-inq").arg(&url));
        assert_eq!(field(&std_inq, "Peripheral Device Type"), Some("DIRECT_ACCESS"), "{name}:\n{std_inq}");
        assert_eq!(field(&std_inq, "Peripheral Qualifier"), Some("CONNECTED"), "{name}:\n{std_inq}");
        assert!(field(&std_inq, "Vendor").is_some_and(|v| !v.trim().is_empty()), "{name}: vendor\n{std_inq}");
        assert!(field(&std_inq, "Product").is_some_and(|v| !v.trim().is_empty()), "{name}: product\n{std_inq}");

        // This libiscsi's popt parses --pagecode as decimal: 0x80 must be given as 128.
        let pages = tool_output(Command::new("iscsi-inq").args(["-e", "1", &url]));
        for p in ["0x80", "0x83"] {
            assert!(
                pages.lines().any(|l| l.starts_with(&format!("Page:{p} "))),
                "{name}: VPD {p} not supported:\n{pages}"
            );
        }
        let serial = tool_output(Command::new("iscsi-inq").args(["-e", "1", "-c", "128", &url]));
        let sn = field(&serial, "Unit Serial Number").unwrap_or_else(|| panic!("{name}: no serial:\n{serial}"));
        assert!(!sn.trim_matches(|c| c == '[' || c == ']' || c == ' ').is_empty(), "{name}: empty serial {sn:?}");

        let ids = tool_output(Command::new("iscsi-inq").args(["-e", "1", "-c", "131", &url]));
        assert!(ids.contains("DEVICE_IDENTIFICATION"), "{name}:\n{ids}");
        assert!(
            ids.lines().any(|l| l.starts_with("Designator Type:") && l.contains("NAA")),
            "{name}: no NAA designator:\n{ids}"
        );
    }
}

#[test]
fn iscsi_readcapacity16_sizes() {
    if !require_tool("iscsi-readcapacity16") {
        return;
    }
    let t = start();
    for (name, bytes) in [("disk0", DISK_BYTES), ("ram0", RAM_BYTES)] {
        let out = tool_output(Command::new("iscsi-readcapacity16").arg(t.url(t.lun(name))));
        assert_eq!(field(&out, "LOGICAL BLOCK LENGTH IN BYTES"), Some("512"), "{name}:\n{out}");
        let last_lba = (bytes / BS - 1).to_string();
        assert_eq!(field(&out, "RETURNED LOGICAL BLOCK ADDRESS"), Some(last_lba.as_str()), "{name}:\n{out}");
        assert_eq!(field(&out, "Total size"), Some(bytes.to_string().as_str()), "{name}:\n{out}");
    }
}

#[test]
fn read_only_lun_refuses_writes() {
    let t = start();
    let mut s = t.login(&LoginOptions::default());
    let lun = t.lun("ro0");
    let before = s.read16(lun, 0, 8, 512).unwrap().check().expect("READ on a read-only LUN").data;
    let data = vec![0xa5u8; 4096];
    for use10 in [false, true] {
        let r = if use10 { s.write10(lun, 0, &data, 512) } else { s.write16(lun, 0, &data, 512) }.unwrap();
        assert_eq!(r.status, STATUS_CHECK_CONDITION, "WRITE({}) status", if use10 { 10 } else { 16 });
        assert_eq!(r.sense_key(), Some(0x07), "sense key DATA PROTECT");
        assert_eq!(r.asc_ascq().map(|a| a.0), Some(0x27), "ASC WRITE PROTECTED");
    }
    let after = s.read16(lun, 0, 8, 512).unwrap().check().unwrap().data;
    assert_eq!(before, after, "read-only LUN content changed");
    // A writable LUN on the same session still accepts writes.
    s.write16(t.lun("ram0"), 0, &data, 512).unwrap().check().expect("WRITE on writable LUN");
    s.logout().unwrap();
}

#[test]
fn iscsi_ls_size_formula() {
    // Values observed from iscsi-ls against tgtd for 64 MiB and 32 MiB LUNs.
    assert_eq!(iscsi_ls_size(64 << 20), "63M");
    assert_eq!(iscsi_ls_size(32 << 20), "31M");
    assert_eq!(iscsi_ls_size(256 << 20), "255M");
}
