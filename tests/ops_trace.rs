//! Item 3 of issue 13: protocol tracing, one log line per PDU, switched on per initiator at
//! start (`--trace-initiator`) or per session through the control socket (`trace_session`).

mod common;

use common::initiator::LoginOptions;
use serde_json::json;
use std::time::{Duration, Instant};

const TRACED: &str = "iqn.2024-06.dev.jumpstarter:traced";
const UNTRACED: &str = "iqn.2024-06.dev.jumpstarter:untraced";

fn opts(initiator: &str) -> LoginOptions {
    LoginOptions { initiator_name: initiator.to_owned(), ..LoginOptions::default() }
}

/// The trace lines of the target's log so far.
fn trace_lines(t: &common::Target) -> Vec<String> {
    t.stderr_text().lines().filter(|l| l.contains("uringtgt::trace]")).map(str::to_owned).collect()
}

/// Waits until a trace line contains every one of `parts` (log lines are written as the PDUs
/// go, but the test reads the file from another process).
fn wait_for_line(t: &common::Target, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = trace_lines(t).into_iter().find(|l| parts.iter().all(|p| l.contains(p))) {
            return l;
        }
        assert!(Instant::now() < deadline, "no trace line with {parts:?}; trace lines:\n{}", trace_lines(t).join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tsih_of(t: &common::Target, initiator: &str) -> u64 {
    let sessions = t.control().ok("list_sessions", json!({}));
    let s = sessions.as_array().unwrap().iter().find(|s| s["initiator"] == initiator).expect("session listed");
    s["tsih"].as_u64().unwrap()
}

#[test]
fn trace_initiator_traces_login_and_read_of_that_initiator_only() {
    let t = common::Target::start(&["--trace-initiator", TRACED, "--lun", "name=r,backing=mem,size_mb=4"]);
    let mut traced = t.login(&opts(TRACED));
    let mut untraced = t.login(&opts(UNTRACED));
    let tsih = tsih_of(&t, TRACED);
    let other = tsih_of(&t, UNTRACED);
    assert!(traced.read10(0, 16, 2, 512).unwrap().is_good());
    assert!(untraced.read10(0, 16, 2, 512).unwrap().is_good());

    // The login, keys included: the first request (TSIH 0 until the session is registered).
    let login = wait_for_line(&t, &["<- Login-Request", "keys:", &format!("InitiatorName={TRACED}")]);
    assert!(login.contains("SessionType=Normal") || login.contains("TargetName="), "{login}");
    let rsp = wait_for_line(&t, &["-> Login-Response", "status 0000", "keys:"]);
    assert!(rsp.contains("cmdsn") || rsp.contains("statsn"), "{rsp}");
    // The final login response carries the TSIH the session got.
    wait_for_line(&t, &["-> Login-Response", " T ", &format!(" tsih {tsih}")]);
    // The READ: command with LUN, CDB, LBA and length; the data and its status.
    let cmd = wait_for_line(&t, &[&format!("tsih {tsih} <- SCSI-Command"), "cdb READ(10) lba 16 blocks 2"]);
    assert!(cmd.contains(" lun 0 ") && cmd.contains("edtl 1024 R") && cmd.contains(" cmdsn "), "{cmd}");
    let data = wait_for_line(&t, &[&format!("tsih {tsih} -> Data-In"), "len 1024"]);
    assert!(data.contains("status GOOD") || trace_lines(&t).iter().any(|l| l.contains("-> SCSI-Response")), "{data}");

    // Nothing of the other initiator.
    let lines = trace_lines(&t);
    assert!(!lines.iter().any(|l| l.contains(UNTRACED) || l.contains(&format!(" tsih {other} "))), "{lines:#?}");
}

#[test]
fn trace_session_switches_one_running_session_on_and_off() {
    let t = common::Target::start(&["--lun", "name=r,backing=mem,size_mb=4"]);
    let mut s = t.login(&opts(TRACED));
    let mut quiet = t.login(&opts(UNTRACED));
    let tsih = tsih_of(&t, TRACED);
    let other = tsih_of(&t, UNTRACED);
    assert!(s.read10(0, 3, 1, 512).unwrap().is_good());
    // Off by default at log level info: not a single trace line.
    std::thread::sleep(Duration::from_millis(200));
    assert!(trace_lines(&t).is_empty(), "{:#?}", trace_lines(&t));

    let mut c = t.control();
    let r = c.ok("trace_session", json!({"tsih": tsih}));
    assert_eq!(r, json!({"tsih": tsih, "initiator": TRACED, "trace": true}));
    assert!(s.read10(0, 7, 1, 512).unwrap().is_good());
    assert!(quiet.read10(0, 7, 1, 512).unwrap().is_good());
    let cmd = wait_for_line(&t, &[&format!("tsih {tsih} <- SCSI-Command"), "cdb READ(10) lba 7 blocks 1"]);
    assert!(cmd.contains("edtl 512 R"), "{cmd}");
    wait_for_line(&t, &[&format!("tsih {tsih} -> Data-In"), "len 512"]);
    // The CDB of a command that fails shows with its sense: READ beyond the end (4 MiB LUN).
    let past_end = s.read10(0, 8192, 1, 512).unwrap();
    assert!(!past_end.is_good());
    let rsp = wait_for_line(&t, &[&format!("tsih {tsih} -> SCSI-Response"), "status CHECK CONDITION"]);
    assert!(rsp.contains("sense ILLEGAL REQUEST asc 0x21 ascq 0x00"), "{rsp}");

    let r = c.ok("trace_session", json!({"tsih": tsih, "enable": false}));
    assert_eq!(r["trace"], false);
    assert!(s.read10(0, 9, 1, 512).unwrap().is_good());
    std::thread::sleep(Duration::from_millis(200));
    let lines = trace_lines(&t);
    assert!(!lines.iter().any(|l| l.contains("lba 9 ")), "traced after trace_session off: {lines:#?}");
    assert!(!lines.iter().any(|l| l.contains(&format!(" tsih {other} "))), "{lines:#?}");
    // An unknown TSIH is an error naming it.
    let resp = c.call("trace_session", json!({"tsih": 999}));
    assert_eq!(resp["error"]["code"], -32602, "{resp}");
    assert!(resp["error"]["message"].as_str().unwrap().contains("TSIH 999"), "{resp}");
}

#[test]
fn ctl_trace_session_prints_the_switch() {
    let t = common::Target::start(&["--lun", "name=r,backing=mem,size_mb=4"]);
    let _s = t.login(&opts(TRACED));
    let tsih = tsih_of(&t, TRACED).to_string();
    let sock = t.control_socket();
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_uringtgt"));
        cmd.arg("ctl").arg("--socket").arg(&sock).arg("trace-session").arg(&tsih).args(extra);
        common::tool_output(&mut cmd)
    };
    assert_eq!(run(&[]), format!("session {tsih} ({TRACED}): trace on\n"));
    assert_eq!(run(&["--off"]), format!("session {tsih} ({TRACED}): trace off\n"));
}
