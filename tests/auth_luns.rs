//! Per-initiator LUN maps against the real binary: each initiator sees only its LUNs (and the
//! unmapped ones) in REPORT LUNS and commands, and LUN changes raise REPORTED LUNS DATA HAS
//! CHANGED only on the sessions whose view changed.

mod common;

use std::process::Command;
use std::time::Duration;

use common::initiator::{LoginOptions, Session};
use common::{past_ua, run_with_timeout, Target};
use serde_json::json;

const A: &str = "iqn.2024-06.dev.example:dut-a";
const B: &str = "iqn.2024-06.dev.example:dut-b";
const LUNS_CHANGED: (u8, u8) = (0x3F, 0x0E);

/// One reactor: once one session has seen a LUN change, the other has too (the table is
/// picked up between commands, per reactor).
fn start() -> Target {
    Target::start(&[
        "--reactors",
        "1",
        "--lun",
        "name=shared,backing=mem,size_mb=4,lun_id=0",
        "--lun",
        &format!("name=dut1,file_path=dut1.img,size_mb=4,lun_id=1,initiator={A}"),
        "--lun",
        &format!("name=dut2,file_path=dut2.img,size_mb=4,lun_id=2,initiator={B}"),
    ])
}

fn login(t: &Target, name: &str) -> Session {
    let mut s = t.login(&LoginOptions { initiator_name: name.into(), ..Default::default() });
    // Past the POWER ON unit attention of every visible LUN.
    for lun in s.report_luns().unwrap() {
        assert!(past_ua(|| s.test_unit_ready(lun).unwrap()).is_good());
    }
    s.unit_attentions.clear();
    s
}

/// Reads one block of `lun` without retrying unit attentions; returns (ASC, ASCQ) of a
/// CHECK CONDITION, or None when GOOD.
fn read_once(s: &mut Session, lun: u16) -> Option<(u8, u8)> {
    s.retry_unit_attention = false;
    let r = s.read10(lun, 0, 1, 512).unwrap();
    s.retry_unit_attention = true;
    if r.is_good() {
        None
    } else {
        Some(r.asc_ascq().expect("sense data"))
    }
}

/// Reads until the LUN change reaches `s` (bounded): the change is published to the reactor
/// asynchronously, so the first read may still run on the old table.
fn wait_luns_changed(s: &mut Session, lun: u16) {
    for _ in 0..100 {
        match read_once(s, lun) {
            Some(ua) if ua == LUNS_CHANGED => return,
            Some(other) => panic!("unexpected sense {other:?}"),
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    panic!("no REPORTED LUNS DATA HAS CHANGED on LUN {lun}");
}

#[test]
fn each_initiator_sees_only_its_luns() {
    let t = start();
    let mut a = login(&t, A);
    let mut b = login(&t, B);
    let mut other = login(&t, "iqn.2024-06.dev.example:unmapped");
    assert_eq!(a.report_luns().unwrap(), vec![0, 1]);
    assert_eq!(b.report_luns().unwrap(), vec![0, 2]);
    assert_eq!(other.report_luns().unwrap(), vec![0]);
    // Another initiator's LUN does not exist for this one: LOGICAL UNIT NOT SUPPORTED.
    assert_eq!(read_once(&mut a, 2), Some((0x25, 0x00)));
    assert_eq!(read_once(&mut b, 1), Some((0x25, 0x00)));
    assert_eq!(read_once(&mut a, 1), None);
    // list_luns shows the maps.
    let luns = t.control().ok("list_luns", json!(null));
    assert_eq!(luns[1]["initiators"], json!([A]));
    assert!(luns[0].get("initiators").is_none(), "{luns}");
}

#[test]
fn replacing_one_initiators_lun_leaves_the_others_undisturbed() {
    let t = start();
    let mut a = login(&t, A);
    let mut b = login(&t, B);
    let mut ctl = t.control();
    for round in 0..10u8 {
        // Re-upload b's image (another content each time) mapped to b.
        let image = vec![round.wrapping_add(1); 4 << 20];
        let r = ctl.upload(json!({"name": "dut2", "size": image.len(), "force": true, "initiators": [B]}), &image);
        assert!(r.get("error").is_none(), "{r}");
        // b is told, and then reads the new image.
        wait_luns_changed(&mut b, 2);
        // By now the reactor has the new table: a keeps reading its LUN without any unit
        // attention.
        assert_eq!(read_once(&mut a, 1), None, "round {round}");
        let data = past_ua(|| b.read10(2, 0, 1, 512).unwrap()).data;
        assert!(data.iter().all(|&x| x == round.wrapping_add(1)), "round {round}");
    }
    // A LUN added (and removed) for b only: a is not disturbed; an unmapped LUN reaches both.
    ctl.ok("add_lun", json!({"name": "b2", "backing": "mem", "size_mb": 1, "initiators": [B]}));
    wait_luns_changed(&mut b, 2);
    assert_eq!(read_once(&mut a, 1), None);
    ctl.ok("remove_lun", json!({"name": "b2"}));
    wait_luns_changed(&mut b, 2);
    assert_eq!(read_once(&mut a, 1), None);
    ctl.ok("add_lun", json!({"name": "all", "backing": "mem", "size_mb": 1}));
    wait_luns_changed(&mut a, 1);
    assert_eq!(b.report_luns().unwrap().len(), 3);
    // Bad initiator names are refused.
    assert_eq!(
        ctl.err_code("add_lun", json!({"name": "x", "backing": "mem", "size_mb": 1, "initiators": [""]})),
        -32602
    );
}

#[test]
fn ctl_maps_luns_to_initiators() {
    let t = start();
    let ctl = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
        cmd.arg("ctl").arg("--socket").arg(t.control_socket()).args(args);
        let o = run_with_timeout(&mut cmd, Duration::from_secs(60));
        assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    ctl(&["add-lun", "scratch", "--backing", "mem", "--size-mb", "1", "--initiator", A, "--initiator", B]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fw.img");
    std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
    ctl(&["upload", file.to_str().unwrap(), "--initiator", B]);
    let luns: serde_json::Value = serde_json::from_str(&ctl(&["list-luns", "--json"])).unwrap();
    let find = |name: &str| luns.as_array().unwrap().iter().find(|l| l["name"] == name).unwrap().clone();
    assert_eq!(find("scratch")["initiators"], json!([A, B]));
    assert_eq!(find("fw")["initiators"], json!([B]));
    let mut a = login(&t, A);
    let ids = a.report_luns().unwrap();
    assert!(ids.contains(&find("scratch")["lun_id"].as_u64().unwrap().try_into().unwrap()));
    assert!(!ids.contains(&find("fw")["lun_id"].as_u64().unwrap().try_into().unwrap()));
}

/// fio with the libiscsi engine, as perf/build-fio builds it (Debian's fio has no libiscsi).
/// Missing, it fails the test under CI=true (.ci/run builds it first) and skips it elsewhere.
fn fio() -> Option<std::path::PathBuf> {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("perf/cache/fio/fio");
    if bin.is_file() {
        return Some(bin);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{} is missing: build it with perf/build-fio (.ci/run does before the tests)", bin.display());
    }
    eprintln!("SKIPPED: {} is missing (build it with perf/build-fio)", bin.display());
    None
}

/// Writes of `lun` counted by the target so far.
fn writes(ctl: &mut common::Control, lun: u16) -> u64 {
    let stats = ctl.ok("get_stats", json!(null));
    let l = stats["luns"].as_array().unwrap().iter().find(|l| l["lun_id"] == lun);
    l.map_or(0, |l| l["write"]["ops"].as_u64().unwrap())
}

/// The case: fio's libiscsi engine stops at the first CHECK CONDITION (it does not
/// retry a unit attention), so a verify run on one initiator's disk shows that replacing
/// another initiator's image leaves it alone.
#[test]
fn a_fio_verify_run_keeps_going_while_another_initiators_image_is_replaced_ten_times() {
    let Some(fio) = fio() else { return };
    let t = start();
    let mut ctl = t.control();
    let dir = tempfile::tempdir().unwrap();
    let json_out = dir.path().join("fio.json");
    // fio splits file names on ':'; its libiscsi engine takes '\:' in the URL.
    let url = t.url(1).replace(':', "\\:");
    let runtime = 20;
    let mut child = Command::new(&fio)
        .current_dir(dir.path()) // where a failed verify leaves its state file
        .args(["--name=dut1-verify", "--ioengine=libiscsi", &format!("--initiator={A}")])
        .arg(format!("--filename={url}"))
        .args(["--rw=randwrite", "--bs=4k", "--iodepth=8", "--verify=crc32c", "--verify_backlog=256"])
        .args(["--verify_fatal=1", "--time_based", &format!("--runtime={runtime}")])
        .args(["--output-format=json", &format!("--output={}", json_out.display())])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("fio.err")).unwrap())
        .spawn()
        .expect("spawn fio");
    // Re-upload only once fio is writing, so every replacement happens under its I/O.
    let started = std::time::Instant::now();
    while writes(&mut ctl, 1) == 0 {
        assert!(child.try_wait().unwrap().is_none(), "fio ended before writing");
        assert!(started.elapsed() < Duration::from_secs(15), "fio wrote nothing in 15 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    for round in 0..10u8 {
        let image = vec![round.wrapping_add(1); 4 << 20];
        let r = ctl.upload(json!({"name": "dut2", "size": image.len(), "force": true, "initiators": [B]}), &image);
        assert!(r.get("error").is_none(), "round {round}: {r}");
    }
    let after_uploads = writes(&mut ctl, 1);
    assert!(
        child.try_wait().unwrap().is_none(),
        "fio ended during the re-uploads ({:?} after it started)",
        started.elapsed()
    );
    let status = wait_with_timeout(child, Duration::from_secs(runtime + 60));
    let err = std::fs::read_to_string(dir.path().join("fio.err")).unwrap_or_default();
    assert!(status.success(), "fio failed: {status}\n{err}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_out).unwrap()).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    let (written, verified) = (job["write"]["io_bytes"].as_u64().unwrap(), job["read"]["io_bytes"].as_u64().unwrap());
    assert!(written > 0 && verified > 0, "fio wrote {written} and verified {verified} bytes");
    // And it kept writing after the last re-upload.
    assert!(writes(&mut ctl, 1) > after_uploads, "no write after the last re-upload");
    eprintln!("fio wrote {written} bytes and read back {verified} to verify them across ten re-uploads");
}

/// Waits for a spawned child with a deadline, killing it when it overruns.
fn wait_with_timeout(mut child: std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{child:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
