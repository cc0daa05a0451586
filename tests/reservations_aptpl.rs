//! Persistent reservations with APTPL (persist through power loss) against the real binary:
//! registrations and the reservation survive a crash and restart of the target, and a
//! `remove_lun` + `add_lun` of the same image; a RAM LUN refuses APTPL.

mod common;

use common::initiator::{LoginOptions, Response, Session, STATUS_CHECK_CONDITION};
use common::Target;
use serde_json::json;
use std::time::{Duration, Instant};

const RESERVATION_CONFLICT: u8 = 0x18;
const WRITE_EXCLUSIVE: u8 = 1;
const PR_IN: u8 = 0x5E;
const PR_OUT: u8 = 0x5F;

fn login(t: &Target, name: &str, isid_tail: u8) -> Session {
    let opts = LoginOptions {
        initiator_name: format!("iqn.2024-06.dev.jumpstarter:{name}"),
        isid: Some([0x80, 0, 0, 0, 0x12, isid_tail]),
        ..LoginOptions::default()
    };
    t.login(&opts)
}

fn pr_out(s: &mut Session, lun: u16, sa: u8, ty: u8, key: u64, sa_key: u64, aptpl: bool) -> Response {
    let cdb = [PR_OUT, sa, ty, 0, 0, 0, 0, 0, 24, 0];
    let mut d = [0u8; 24];
    d[..8].copy_from_slice(&key.to_be_bytes());
    d[8..16].copy_from_slice(&sa_key.to_be_bytes());
    d[20] = u8::from(aptpl);
    s.command(lun, &cdb, Some(&d), 0).unwrap()
}

fn pr_in(s: &mut Session, lun: u16, sa: u8) -> Vec<u8> {
    let r = s.command(lun, &[PR_IN, sa, 0, 0, 0, 0, 0, 0x10, 0, 0], None, 4096).unwrap();
    assert!(r.is_good(), "PERSISTENT RESERVE IN {sa}: {r:?}");
    r.data
}

/// READ KEYS: (generation, keys).
fn read_keys(s: &mut Session, lun: u16) -> (u32, Vec<u64>) {
    let d = pr_in(s, lun, 0);
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    let keys = d[8..8 + len].chunks(8).map(|k| u64::from_be_bytes(k.try_into().unwrap())).collect();
    (u32::from_be_bytes(d[..4].try_into().unwrap()), keys)
}

/// READ RESERVATION: (key, type) of the reservation, if any.
fn read_reservation(s: &mut Session, lun: u16) -> Option<(u64, u8)> {
    let d = pr_in(s, lun, 1);
    (u32::from_be_bytes(d[4..8].try_into().unwrap()) == 16)
        .then(|| (u64::from_be_bytes(d[8..16].try_into().unwrap()), d[21] & 0x0F))
}

/// REPORT CAPABILITIES: (PTPL_C, PTPL_A).
fn ptpl_bits(s: &mut Session, lun: u16) -> (bool, bool) {
    let d = pr_in(s, lun, 2);
    (d[2] & 1 != 0, d[3] & 1 != 0)
}

/// Waits until the session's reactor has taken the LUN table `add_lun` published (it does so
/// between commands, on a message; a command racing it still sees the old table).
fn wait_for_lun(s: &mut Session, lun: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = s.test_unit_ready(lun).unwrap();
        if r.is_good() {
            return;
        }
        assert!(Instant::now() < deadline, "LUN {lun} never came back: {r:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The holder writes; another initiator's write conflicts but it may read.
fn assert_write_exclusive_held(holder: &mut Session, other: &mut Session, lun: u16) {
    let block = vec![0x5Au8; 512];
    assert!(holder.write10(lun, 3, &block, 512).unwrap().is_good());
    assert_eq!(other.write10(lun, 3, &block, 512).unwrap().status, RESERVATION_CONFLICT);
    let r = other.read10(lun, 3, 1, 512).unwrap();
    assert!(r.is_good() && r.data == block, "{r:?}");
}

#[test]
fn aptpl_registrations_and_reservation_survive_a_crash_and_restart() {
    let mut t = Target::start(&["--lun", "name=disk,size_mb=4"]);
    let lun = t.lun("disk");
    let side = t.root().join(".disk.img.pr");
    {
        let mut a = login(&t, "host-a", 1);
        assert_eq!(ptpl_bits(&mut a, lun), (true, false), "PTPL_C on a file LUN");
        assert!(pr_out(&mut a, lun, 0, 0, 0, 0xAAAA, true).is_good());
        let mut b = login(&t, "host-b", 2);
        assert!(pr_out(&mut b, lun, 6, 0, 0, 0xBBBB, true).is_good());
        assert!(pr_out(&mut a, lun, 1, WRITE_EXCLUSIVE, 0xAAAA, 0, false).is_good());
        assert_eq!(ptpl_bits(&mut a, lun), (true, true), "PTPL_A");
        assert!(side.exists(), "sidecar beside the image");
        // A crash: no chance to write anything more.
        t.kill9();
    }
    t.respawn();
    let mut b = login(&t, "host-b", 2);
    let (generation, mut keys) = read_keys(&mut b, lun);
    keys.sort();
    assert_eq!(keys, vec![0xAAAA, 0xBBBB]);
    assert_eq!(generation, 2, "two registrations");
    assert_eq!(read_reservation(&mut b, lun), Some((0xAAAA, WRITE_EXCLUSIVE)));
    assert_eq!(ptpl_bits(&mut b, lun), (true, true));
    // The same initiator port (name and ISID) is the holder again.
    let mut a = login(&t, "host-a", 1);
    assert_write_exclusive_held(&mut a, &mut b, lun);
    // Turning APTPL off: the next restart forgets them all.
    assert!(pr_out(&mut b, lun, 0, 0, 0xBBBB, 0xBBB0, false).is_good());
    assert!(!side.exists(), "APTPL=0 removes the sidecar");
    drop((a, b));
    t.restart();
    let mut b = login(&t, "host-b", 2);
    assert_eq!(read_keys(&mut b, lun).1, Vec::<u64>::new());
    assert_eq!(read_reservation(&mut b, lun), None);
    assert_eq!(ptpl_bits(&mut b, lun), (true, false));
}

#[test]
fn aptpl_reservation_survives_remove_and_add_of_the_same_image() {
    let t = Target::start(&["--lun", "name=disk,size_mb=4"]);
    let lun = t.lun("disk");
    let mut a = login(&t, "host-a", 1);
    let mut b = login(&t, "host-b", 2);
    assert!(pr_out(&mut a, lun, 0, 0, 0, 0xA, true).is_good());
    assert!(pr_out(&mut a, lun, 1, WRITE_EXCLUSIVE, 0xA, 0, false).is_good());
    let mut c = t.control();
    c.ok("remove_lun", json!({"name": "disk"}));
    let r = b.test_unit_ready(lun).unwrap();
    assert_eq!(r.status, STATUS_CHECK_CONDITION, "LUN gone: {r:?}");
    let added = c.ok("add_lun", json!({"name": "disk", "file_path": "disk.img", "lun_id": lun}));
    assert_eq!(added["lun_id"], u64::from(lun));
    wait_for_lun(&mut b, lun);
    assert_eq!(read_keys(&mut b, lun).1, vec![0xA]);
    assert_eq!(read_reservation(&mut b, lun), Some((0xA, WRITE_EXCLUSIVE)));
    assert_write_exclusive_held(&mut a, &mut b, lun);
    // Replacing it in place (add_lun of the name in use) keeps them too.
    c.ok("add_lun", json!({"name": "disk", "file_path": "disk.img"}));
    // An in-place replacement gives sessions no unit attention to wait for, and a WRITE that
    // meets the table swap waiting for its data is failed (fenced, LUN NOT SUPPORTED): let the
    // reactors take the new table first (they do on a wake-up message, within microseconds).
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(read_reservation(&mut b, lun), Some((0xA, WRITE_EXCLUSIVE)));
    assert_write_exclusive_held(&mut a, &mut b, lun);
}

#[test]
fn without_aptpl_a_restart_forgets_reservations() {
    let mut t = Target::start(&["--lun", "name=disk,size_mb=4"]);
    let lun = t.lun("disk");
    let mut a = login(&t, "host-a", 1);
    assert!(pr_out(&mut a, lun, 0, 0, 0, 0xA, false).is_good());
    assert!(pr_out(&mut a, lun, 1, WRITE_EXCLUSIVE, 0xA, 0, false).is_good());
    assert!(!t.root().join(".disk.img.pr").exists());
    drop(a);
    t.restart();
    let mut b = login(&t, "host-b", 2);
    assert_eq!(read_keys(&mut b, lun).1, Vec::<u64>::new());
    assert!(b.write10(lun, 0, &[1u8; 512], 512).unwrap().is_good());
}

#[test]
fn a_corrupt_sidecar_is_logged_and_the_lun_starts_without_reservations() {
    let mut t = Target::start(&["--lun", "name=disk,size_mb=4"]);
    let lun = t.lun("disk");
    let mut a = login(&t, "host-a", 1);
    assert!(a.write10(lun, 0, &[7u8; 512], 512).unwrap().is_good());
    drop(a);
    let side = t.root().join(".disk.img.pr");
    std::fs::write(&side, b"{\"version\": 1, \"generation\": ").unwrap();
    t.restart();
    assert!(t.stderr_text().contains(".disk.img.pr"), "not logged:\n{}", t.stderr_text());
    let mut b = login(&t, "host-b", 2);
    assert_eq!(read_keys(&mut b, lun).1, Vec::<u64>::new());
    let r = b.read10(lun, 0, 1, 512).unwrap();
    assert!(r.is_good() && r.data == vec![7u8; 512], "image intact: {r:?}");
    assert!(b.write10(lun, 1, &[8u8; 512], 512).unwrap().is_good());
    // The next APTPL registration replaces the damaged file.
    assert!(pr_out(&mut b, lun, 0, 0, 0, 0xB, true).is_good());
    assert!(std::fs::read_to_string(&side).unwrap().contains("host-b"));
}

#[test]
fn a_ram_lun_refuses_aptpl() {
    let t = Target::start(&["--lun", "name=ram,backing=mem,size_mb=4"]);
    let lun = t.lun("ram");
    let mut a = login(&t, "host-a", 1);
    assert_eq!(ptpl_bits(&mut a, lun), (false, false));
    let r = pr_out(&mut a, lun, 0, 0, 0, 0xA, true);
    assert_eq!((r.status, r.sense_key(), r.asc_ascq()), (STATUS_CHECK_CONDITION, Some(5), Some((0x26, 0))));
    assert!(pr_out(&mut a, lun, 0, 0, 0, 0xA, false).is_good(), "without APTPL it registers");
}
