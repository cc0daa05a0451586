//! The control plane over its real Unix socket, against the real binary: hot LUN add/remove
//! seen by initiators, error codes, concurrency, malformed input, `uringtgt ctl`, the socket file.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::initiator::{LoginOptions, Response, Session, STATUS_CHECK_CONDITION};
use common::{require_tool, run_with_timeout, tool_output, Control, Target};
use serde_json::{json, Value};

const BS: u32 = 512;
/// REPORTED LUNS DATA HAS CHANGED (a unit attention after every table change).
const LUNS_CHANGED: (u8, u8) = (0x3f, 0x0e);
/// LOGICAL UNIT NOT SUPPORTED.
const LU_NOT_SUPPORTED: (u8, u8) = (0x25, 0x00);

fn start() -> Target {
    Target::start(&["--reactors", "2"])
}

/// A command, repeated while it only reports the unit attention of a LUN table change.
fn past_ua(mut cmd: impl FnMut() -> Response) -> Response {
    for _ in 0..4 {
        let r = cmd();
        if r.status == STATUS_CHECK_CONDITION && r.asc_ascq() == Some(LUNS_CHANGED) {
            continue;
        }
        return r;
    }
    panic!("unit attention repeated");
}

fn read(s: &mut Session, lun: u16, lba: u32, blocks: u16) -> Vec<u8> {
    let r = past_ua(|| s.read10(lun, lba, blocks, BS).unwrap());
    assert!(r.is_good(), "read LUN {lun}: {r:?}");
    r.data
}

fn write(s: &mut Session, lun: u16, lba: u32, data: &[u8]) {
    let r = past_ua(|| s.write10(lun, lba, data, BS).unwrap());
    assert!(r.is_good(), "write LUN {lun}: {r:?}");
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn names(luns: &Value) -> Vec<String> {
    luns.as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn added_luns_get_their_own_ids_and_serve_io() {
    let t = start();
    let mut c = t.control();
    assert_eq!(c.ok("list_luns", Value::Null), json!([]));
    let a = c.ok("add_lun", json!({"name": "a", "file_path": "a.img", "size_mb": 4}));
    let img = std::fs::canonicalize(t.root().join("a.img")).unwrap();
    assert_eq!(
        a,
        json!({"name": "a", "path": img.display().to_string(), "size": 4 << 20, "lun_id": 0, "is_block": false,
               "read_only": false, "backing": "file"})
    );
    // Positional parameters, in the replaced driver's order, then the new ones.
    let b = c.ok("add_lun", json!(["b", null, 2, false, true, "mem"]));
    assert_eq!(
        (b["lun_id"].clone(), b["backing"].clone(), b["read_only"].clone()),
        (json!(1), json!("mem"), json!(true))
    );
    assert_eq!(b["path"], Value::Null);
    let luns = c.ok("list_luns", json!({}));
    assert_eq!(names(&luns), ["a", "b"]);

    if require_tool("iscsi-ls") {
        let out = tool_output(Command::new("iscsi-ls").args(["-s", &t.portal_url()]));
        assert!(out.contains("Lun:0") && out.contains("Lun:1"), "iscsi-ls:\n{out}");
    }
    if require_tool("iscsi-inq") {
        for lun in [0, 1] {
            let out = tool_output(Command::new("iscsi-inq").arg(t.url(lun)));
            assert!(out.contains("uringtgt") || out.contains("Vendor"), "iscsi-inq LUN {lun}:\n{out}");
        }
    }
    let mut s = t.login(&LoginOptions::default());
    assert_eq!(s.report_luns().unwrap(), vec![0, 1]);
    let data = pattern(1, 8 * BS as usize);
    write(&mut s, 0, 10, &data);
    assert_eq!(read(&mut s, 0, 10, 8), data);
    assert_eq!(read(&mut s, 1, 0, 8), vec![0u8; 8 * BS as usize]);
    // The image file holds the write.
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[10 * BS as usize..18 * BS as usize], &data[..]);

    // Re-adding a name replaces it in place: same id unless another is asked for.
    let a2 = c.ok("add_lun", json!({"name": "a", "file_path": "a.img", "size_mb": 8}));
    assert_eq!((a2["lun_id"].clone(), a2["size"].clone()), (json!(0), json!(8 << 20)));
    let a3 = c.ok("add_lun", json!({"name": "a", "file_path": "a.img", "lun_id": 7}));
    assert_eq!(a3["lun_id"], 7);
    assert_eq!(past_ua(|| s.test_unit_ready(7).unwrap()).status, 0);
    assert_eq!(s.report_luns().unwrap(), vec![1, 7]);
    assert_eq!(read(&mut s, 7, 10, 8), data, "data kept across the replacement");

    // The statistics saw that I/O.
    let stats = c.ok("get_stats", Value::Null);
    let total_writes: u64 =
        stats["reactors"].as_array().unwrap().iter().map(|r| r["write"]["ops"].as_u64().unwrap()).sum();
    assert!(total_writes >= 1, "{stats}");
    let b_stats = stats["luns"].as_array().unwrap().iter().find(|l| l["lun_id"] == 1).unwrap().clone();
    assert_eq!(b_stats["name"], "b");
    assert!(b_stats["read"]["ops"].as_u64().unwrap() >= 1, "{stats}");
    assert!(b_stats["read"]["latency_us"]["p99"].as_f64().unwrap() > 0.0, "{stats}");
    let sessions = c.ok("list_sessions", Value::Null);
    let normal: Vec<&Value> = sessions.as_array().unwrap().iter().filter(|s| s["discovery"] == false).collect();
    assert_eq!(normal.len(), 1, "{sessions}");
    assert_eq!(normal[0]["initiator"], LoginOptions::default().initiator_name);
    assert_eq!(normal[0]["isid"].as_str().unwrap().len(), 12);
    assert!(normal[0]["negotiated"].as_object().unwrap().contains_key("MaxBurstLength"), "{sessions}");
}

#[test]
fn removing_a_lun_under_io_leaves_the_others_and_completed_writes() {
    let t = start();
    let mut c = t.control();
    let keep =
        c.ok("add_lun", json!({"name": "keep", "backing": "mem", "size_mb": 4}))["lun_id"].as_u64().unwrap() as u16;
    let gone = c.ok("add_lun", json!({"name": "gone", "size_mb": 4}))["lun_id"].as_u64().unwrap() as u16;
    assert_ne!(keep, gone);

    // A completed write to the LUN about to go must be in its file afterwards.
    let mut w = t.login(&LoginOptions::default());
    let last = pattern(9, 16 * BS as usize);
    write(&mut w, gone, 100, &last);

    // One initiator reads the doomed LUN in a loop until it is told the LUN is gone.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut s = t.login(&LoginOptions::default());
        let (stop, last) = (stop.clone(), last.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut good = 0u32;
            while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
                let r = s.read10(gone, 100, 16, BS).expect("read on the doomed LUN");
                if r.is_good() {
                    assert_eq!(r.data, last, "a read of the doomed LUN returned wrong data");
                    good += 1;
                    continue;
                }
                assert_eq!(r.status, STATUS_CHECK_CONDITION, "{r:?}");
                match r.asc_ascq() {
                    Some(LUNS_CHANGED) => continue,
                    Some(LU_NOT_SUPPORTED) => return good,
                    other => panic!("unexpected sense {other:?}: {r:?}"),
                }
            }
            panic!("never saw LOGICAL UNIT NOT SUPPORTED ({good} good reads)");
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    // Meanwhile the other LUN takes writes before, during and after the removal.
    let mut written = BTreeMap::new();
    for i in 0..8u32 {
        let d = pattern(i as u8, 4 * BS as usize);
        write(&mut w, keep, i * 4, &d);
        written.insert(i * 4, d);
    }
    assert_eq!(c.ok("remove_lun", json!({"name": "gone"})), json!({"removed": "gone"}));
    for i in 8..16u32 {
        let d = pattern(i as u8, 4 * BS as usize);
        write(&mut w, keep, i * 4, &d);
        written.insert(i * 4, d);
    }
    let good = reader.join().expect("reader thread");
    stop.store(true, Ordering::SeqCst);
    assert!(good > 0, "the reader never read before the removal");
    for (lba, d) in &written {
        assert_eq!(&read(&mut w, keep, *lba, 4), d, "LUN keep, LBA {lba}");
    }
    let r = past_ua(|| w.read10(gone, 0, 1, BS).unwrap());
    assert_eq!(r.asc_ascq(), Some(LU_NOT_SUPPORTED), "{r:?}");
    assert_eq!(w.report_luns().unwrap(), vec![keep]);
    assert_eq!(names(&c.ok("list_luns", Value::Null)), ["keep"]);
    // The file stays, with the completed write.
    let file = std::fs::read(t.root().join("gone.img")).unwrap();
    assert_eq!(&file[100 * BS as usize..116 * BS as usize], &last[..]);
    // clear_all_luns empties the table; files stay.
    assert_eq!(c.ok("add_lun", json!({"name": "gone", "size_mb": 0}))["size"], 4 << 20);
    assert_eq!(c.ok("clear_all_luns", Value::Null), json!({"removed": ["keep", "gone"]}));
    assert_eq!(c.ok("list_luns", Value::Null), json!([]));
    assert!(t.root().join("gone.img").exists());
}

#[test]
fn every_error_has_its_code() {
    let t = start();
    let mut c = t.control();
    c.ok("add_lun", json!({"name": "a", "size_mb": 1, "lun_id": 3}));
    std::fs::write(t.root().join("odd.img"), vec![0u8; 1000]).unwrap();
    std::fs::write(t.root().join("big.img"), vec![0u8; 2 << 20]).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("x.img"), vec![0u8; 4096]).unwrap();
    std::os::unix::fs::symlink(outside.path().join("x.img"), t.root().join("esc.img")).unwrap();
    let cases = [
        ("remove_lun", json!({"name": "nope"}), -32001),
        ("add_lun", json!({"name": "b", "size_mb": 1, "lun_id": 3}), -32002),
        ("add_lun", json!({"name": "b", "file_path": "a.img"}), -32002),
        ("add_lun", json!({"name": "b", "file_path": "/etc/passwd"}), -32003),
        ("add_lun", json!({"name": "b", "file_path": "x/../../b.img", "size_mb": 1}), -32003),
        ("add_lun", json!({"name": "b", "file_path": "esc.img"}), -32003),
        ("add_lun", json!({"name": "b", "file_path": "/dev/null", "is_block": true}), -32003),
        ("add_lun", json!({"name": "b", "file_path": "new.img"}), -32006),
        ("add_lun", json!({"name": "b", "file_path": "odd.img"}), -32006),
        ("add_lun", json!({"name": "b", "file_path": "big.img", "size_mb": 1}), -32006),
        ("add_lun", json!({"name": "b", "size_mb": 1u64 << 30}), -32005),
        ("add_lun", json!({"name": "b", "backing": "mem", "size_mb": 1u64 << 30}), -32005),
        ("add_lun", json!({"name": "a b", "size_mb": 1}), -32602),
        ("add_lun", json!({"name": "../x", "size_mb": 1}), -32602),
        ("add_lun", json!({"size_mb": 1}), -32602),
        ("add_lun", json!({"name": "b", "size_mb": 1, "colour": "red"}), -32602),
        ("add_lun", json!({"name": "b", "size_mb": "big"}), -32602),
        ("add_lun", json!({"name": "b", "size_mb": 1, "lun_id": 16384}), -32602),
        ("add_lun", json!({"name": "b", "backing": "disk", "size_mb": 1}), -32602),
        ("add_lun", json!({"name": "b", "backing": "mem", "size_mb": 1, "file_path": "m.img"}), -32602),
        ("add_lun", json!({"name": "b", "backing": "mem"}), -32602),
        ("remove_lun", json!({}), -32602),
        ("list_luns", json!({"all": true}), -32602),
        ("format_disk", Value::Null, -32601),
    ];
    for (method, params, want) in cases {
        assert_eq!(c.err_code(method, params.clone()), want, "{method} {params}");
    }
    // Nothing was created, grown or left behind by the failures.
    assert!(!t.root().join("new.img").exists() && !t.root().join("b.img").exists());
    assert_eq!(std::fs::metadata(t.root().join("big.img")).unwrap().len(), 2 << 20);
    assert_eq!(names(&c.ok("list_luns", Value::Null)), ["a"]);
    // Malformed requests.
    let code = |v: Value| (v["id"].clone(), v["error"]["code"].clone());
    assert_eq!(code(c.raw(b"garbage")), (Value::Null, json!(-32700)));
    assert_eq!(code(c.raw(b"[1]")), (Value::Null, json!(-32600)));
    assert_eq!(code(c.raw(br#"{"jsonrpc":"1.0","id":5,"method":"list_luns"}"#)), (json!(5), json!(-32600)));
    assert_eq!(code(c.raw(br#"{"jsonrpc":"2.0","id":6,"method":"list_luns","params":3}"#)), (json!(6), json!(-32600)));
    // Idempotent portal control.
    assert_eq!(c.ok("start", Value::Null)["started"], false);
    assert_eq!(c.ok("stop", Value::Null), json!({"stopped": true}));
    assert_eq!(c.ok("stop", Value::Null), json!({"stopped": false}));
    assert!(Session::login(&t.addr(), &t.iqn, &LoginOptions::default()).is_err(), "portal closed");
    assert_eq!(c.ok("start", Value::Null), json!({"address": t.addr(), "started": true}));
    let mut s = t.login(&LoginOptions::default());
    assert_eq!(s.report_luns().unwrap(), vec![3], "LUNs survive stop");
    assert_eq!(c.ok("get_host", Value::Null), "127.0.0.1");
    assert_eq!(c.ok("get_port", Value::Null), t.port);
    assert_eq!(c.ok("get_target_iqn", Value::Null), t.iqn.as_str());
}

#[test]
fn stop_logs_sessions_out() {
    let t = start();
    let mut c = t.control();
    c.ok("add_lun", json!({"name": "m", "backing": "mem", "size_mb": 1}));
    let mut s = t.login(&LoginOptions::default());
    assert!(read(&mut s, 0, 0, 1).len() == BS as usize);
    c.ok("stop", Value::Null);
    assert!(s.read10(0, 0, 1, BS).is_err(), "the session was closed");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.ok("list_sessions", Value::Null).as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "sessions still listed after stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn concurrent_changes_leave_a_consistent_table() {
    let t = start();
    let sock = t.control_socket();
    const CLIENTS: usize = 4;
    const CALLS: usize = 50;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Control::connect(&sock);
                let mut mine = BTreeSet::new();
                for k in 0..CALLS {
                    let name = format!("c{i}-{}", k % 5);
                    match k % 3 {
                        0 | 1 if k % 4 != 3 => {
                            let l = c.ok("add_lun", json!({"name": name, "backing": "mem", "size_mb": 1}));
                            assert_eq!(l["name"], name.as_str());
                            mine.insert(name);
                        }
                        0 | 1 => {
                            let luns = c.ok("list_luns", Value::Null);
                            check_consistent(&luns);
                        }
                        _ => {
                            let resp = c.call("remove_lun", json!({"name": name}));
                            if mine.remove(&name) {
                                assert!(resp.get("error").is_none(), "{resp}");
                            } else {
                                assert_eq!(resp["error"]["code"], -32001, "{resp}");
                            }
                        }
                    }
                }
                mine
            })
        })
        .collect();
    // An initiator keeps asking for the table while it changes.
    let mut s = t.login(&LoginOptions::default());
    let mut expected = BTreeSet::new();
    for w in workers {
        while !w.is_finished() {
            let _ = s.report_luns();
        }
        expected.extend(w.join().expect("worker"));
    }
    let luns = t.control().ok("list_luns", Value::Null);
    check_consistent(&luns);
    assert_eq!(names(&luns).into_iter().collect::<BTreeSet<_>>(), expected);
    let mut ids: Vec<u16> = luns.as_array().unwrap().iter().map(|l| l["lun_id"].as_u64().unwrap() as u16).collect();
    ids.sort_unstable();
    assert_eq!(past_ua(|| s.test_unit_ready(ids[0]).unwrap()).status, 0);
    assert_eq!(s.report_luns().unwrap(), ids);
}

/// Names and LUN ids are unique; every entry is a whole LUN.
fn check_consistent(luns: &Value) {
    let luns = luns.as_array().unwrap();
    let names: BTreeSet<&str> = luns.iter().map(|l| l["name"].as_str().unwrap()).collect();
    let ids: BTreeSet<u64> = luns.iter().map(|l| l["lun_id"].as_u64().unwrap()).collect();
    assert_eq!((names.len(), ids.len()), (luns.len(), luns.len()), "{luns:?}");
    for l in luns {
        assert_eq!((l["size"].clone(), l["backing"].clone()), (json!(1 << 20), json!("mem")), "{l}");
    }
}

#[test]
fn bad_input_is_answered_and_harms_nothing() {
    let t = start();
    let mut other = t.control();
    other.ok("add_lun", json!({"name": "m", "backing": "mem", "size_mb": 1}));
    let mut c = t.control();
    // An over-long line is answered as soon as it passes the limit, then skipped to its end.
    let mut huge = vec![b'x'; (1 << 20) + 1];
    huge.extend_from_slice(br#"{"jsonrpc":"2.0","id":1,"method":"list_luns"}"#);
    let v = c.raw(&huge);
    assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (Value::Null, json!(-32600)), "{v}");
    // Meanwhile another client is served.
    assert_eq!(names(&other.ok("list_luns", Value::Null)), ["m"]);
    // Binary garbage, a blank line (ignored), then a good request on the same connection.
    let v = c.raw(b"\x00\xff\xfe{{{");
    assert_eq!(v["error"]["code"], -32700);
    let v = c.raw(b"\n{\"jsonrpc\":\"2.0\",\"id\":\"after\",\"method\":\"get_target_iqn\"}");
    assert_eq!((v["id"].clone(), v["result"].clone()), (json!("after"), json!(t.iqn)));
    // A notification gets no answer; the next request's answer comes next.
    c.raw_no_answer(br#"{"jsonrpc":"2.0","method":"get_port"}"#);
    assert_eq!(c.ok("get_port", Value::Null), t.port);
    // A client that hangs up mid-line harms nobody.
    {
        let mut half = std::os::unix::net::UnixStream::connect(t.control_socket()).unwrap();
        std::io::Write::write_all(&mut half, br#"{"jsonrpc":"2.0","id":1,"meth"#).unwrap();
    }
    // The target still serves both the control plane and initiators.
    let mut s = t.login(&LoginOptions::default());
    assert_eq!(read(&mut s, 0, 0, 2).len(), 2 * BS as usize);
    assert_eq!(names(&t.control().ok("list_luns", Value::Null)), ["m"]);
}

trait NoAnswer {
    fn raw_no_answer(&mut self, line: &[u8]);
}

impl NoAnswer for Control {
    /// Sends a notification: the target answers nothing (the next answer belongs to the next
    /// request, checked by the caller).
    fn raw_no_answer(&mut self, line: &[u8]) {
        let v = self.raw(&[line, b"\n{\"jsonrpc\":\"2.0\",\"id\":\"probe\",\"method\":\"get_host\"}"].concat());
        assert_eq!(v["id"], "probe", "the notification was answered: {v}");
    }
}

fn ctl(sock: &Path, args: &[&str]) -> (bool, String, String) {
    let o = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_uringtgt")).arg("ctl").arg("--socket").arg(sock).args(args),
        Duration::from_secs(30),
    );
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn ctl_command_line() {
    let t = start();
    let sock = t.control_socket();
    let (ok, out, err) = ctl(&sock, &["add-lun", "d", "d.img", "--size-mb", "4"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("LUN  NAME") && out.contains("\n0    d     file     4194304"), "{out}");
    let (ok, out, _) =
        ctl(&sock, &["add-lun", "r", "--backing", "mem", "--size-mb", "2", "--read-only", "--lun-id", "5"]);
    assert!(ok && out.contains("ro"), "{out}");
    let (ok, out, _) = ctl(&sock, &["list-luns", "--json"]);
    assert!(ok);
    let luns: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(names(&luns), ["d", "r"]);
    assert_eq!(luns[1]["lun_id"], 5);
    let (ok, out, _) = ctl(&sock, &["list-luns"]);
    assert!(ok && out.lines().count() == 3 && out.lines().any(|l| l.contains(" r ") && l.ends_with(" -")), "{out}");
    let (ok, out, err) = ctl(&sock, &["remove-lun", "nope"]);
    assert!(!ok && out.is_empty(), "{out}");
    assert_eq!(err.trim(), "uringtgt: no LUN named \"nope\"");
    let (ok, _, err) = ctl(&sock, &["add-lun", "x", "/etc/passwd"]);
    assert!(!ok && err.contains("absolute paths are not allowed"), "{err}");
    assert_eq!(ctl(&sock, &["get-port"]).1.trim(), t.port.to_string());
    assert_eq!(ctl(&sock, &["get-host"]).1.trim(), "127.0.0.1");
    assert_eq!(ctl(&sock, &["get-target-iqn"]).1.trim(), t.iqn);
    let mut s = t.login(&LoginOptions::default());
    write(&mut s, 0, 0, &pattern(3, BS as usize));
    let (ok, out, _) = ctl(&sock, &["sessions", "--json"]);
    let sessions: Value = serde_json::from_str(&out).unwrap();
    assert!(
        ok && sessions.as_array().unwrap().iter().any(|s| s["initiator"] == LoginOptions::default().initiator_name)
    );
    let (ok, out, _) = ctl(&sock, &["sessions"]);
    assert!(ok && out.contains(&LoginOptions::default().initiator_name), "{out}");
    let (ok, out, _) = ctl(&sock, &["stats", "--json"]);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert!(ok && stats["luns"][0]["write"]["ops"].as_u64().unwrap() >= 1, "{stats}");
    let (ok, out, _) = ctl(&sock, &["stats"]);
    assert!(ok && out.contains("lun 0 d") && out.contains("reactor 0"), "{out}");
    let budget = out.lines().skip_while(|l| !l.starts_with("REACTOR")).nth(1).unwrap_or_default().to_owned();
    assert!(budget.split_whitespace().nth(1) == Some("256.0"), "the reactor's buffer budget row: {out}");
    assert_eq!(ctl(&sock, &["stop"]).1.trim(), "portal closed");
    assert!(Session::login(&t.addr(), &t.iqn, &LoginOptions::default()).is_err());
    assert_eq!(ctl(&sock, &["start"]).1.trim(), format!("portal open on {}", t.addr()));
    t.login(&LoginOptions::default());
    assert_eq!(ctl(&sock, &["remove-lun", "r"]).1.trim(), "removed r");
    assert_eq!(ctl(&sock, &["clear-luns"]).1.trim(), "removed 1 LUN(s): d");
    // --config finds the socket through root_dir.
    let cfg = t.root().join("c.yaml");
    std::fs::write(&cfg, format!("root_dir: {}\n", t.root().display())).unwrap();
    let o = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_uringtgt")).args(["ctl", "--config"]).arg(&cfg).arg("list-luns"),
        Duration::from_secs(30),
    );
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "LUN  NAME  BACKING  SIZE  FLAGS  PATH");
    // No target there: a clear error.
    let (ok, _, err) = ctl(&t.root().join("none.sock"), &["list-luns"]);
    assert!(!ok && err.contains("none.sock: connect"), "{err}");
}

#[test]
fn socket_file_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    // Left behind by a crashed run: replaced.
    drop(UnixListener::bind(&sock).unwrap());
    let sock_arg = sock.to_str().unwrap();
    let t = Target::start(&["--control-socket", sock_arg]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o660);
    assert_eq!(Control::connect(&sock).ok("get_port", Value::Null), t.port);
    // A live socket: a second target refuses to start.
    let root2 = tempfile::tempdir().unwrap();
    let o = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_uringtgt"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--control-socket", sock_arg, "--root-dir"])
            .arg(root2.path()),
        Duration::from_secs(30),
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("another uringtgt is serving this control socket"), "{err}");
    assert_eq!(Control::connect(&sock).ok("get_port", Value::Null), t.port, "the first target is unharmed");
    // Removed on exit.
    drop(t);
    assert!(!sock.exists(), "socket left behind");
}
