//! Issue 13's upload items against the real binary: an identical re-upload without a client
//! digest (a URL, a raw `upload_image` without `sha256`) is skipped after the target hashed it,
//! leaving the LUN and its sessions alone; an empty upload is -32009 "empty image"; a first
//! upload logs no INFO line about the `image_info` that found nothing; a truncated compressed
//! upload's error names the file; `remove_created_on_close` keeps uploaded images.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::thread;
use std::time::Duration;

use common::initiator::{LoginOptions, STATUS_CHECK_CONDITION};
use common::{past_ua, run_with_timeout, Target};
use serde_json::json;

const BAD_UPLOAD: i64 = -32009;

/// Not a whole number of blocks, with a zero run: as real images are.
fn image(seed: u8) -> Vec<u8> {
    let mut v: Vec<u8> = (0..300_000usize).map(|i| ((i / 3) as u8).wrapping_mul(11).wrapping_add(seed) | 1).collect();
    v[100_000..150_000].fill(0);
    v
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Serves `body` with a Content-Length on 127.0.0.1 to every GET, whatever the path.
fn http_server(body: Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(&body));
        }
    });
    port
}

fn ctl(t: &Target, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
    cmd.arg("ctl").arg("--socket").arg(t.control_socket()).args(args);
    for var in ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(var);
    }
    run_with_timeout(&mut cmd, Duration::from_secs(60))
}

fn ok_stdout(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}\n{out}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    out
}

/// A TEST UNIT READY that must be GOOD at once: a unit attention would be a CHECK CONDITION.
fn assert_no_unit_attention(s: &mut common::initiator::Session, lun: u16, what: &str) {
    let r = s.test_unit_ready(lun).unwrap();
    assert!(r.status != STATUS_CHECK_CONDITION && r.is_good(), "{what}: unit attention or error: {r:?}");
}

#[test]
fn identical_url_and_raw_reuploads_are_skipped_without_a_client_digest() {
    let t = Target::start(&["--reactors", "1"]);
    let img = image(5);
    let port = http_server(gzip(&img));
    let url = format!("http://127.0.0.1:{port}/web.img.gz");

    // URL upload: the client sends no sha256 (it never hashes a URL).
    let first = ok_stdout(&ctl(&t, &["upload", &url]));
    assert!(first.ends_with(", uploaded\n"), "{first}");
    let lun: u16 = first.split_whitespace().nth(2).unwrap().parse().unwrap();
    let mut s = t.login(&LoginOptions::default());
    past_ua(|| s.test_unit_ready(lun).unwrap());
    let second = ok_stdout(&ctl(&t, &["upload", &url]));
    assert!(second.ends_with(", skipped: identical image already in place\n"), "{second}");
    assert_eq!(second.lines().next(), first.lines().next(), "same portal, IQN and LUN");
    assert_no_unit_attention(&mut s, lun, "after a skipped URL upload");

    // A raw upload_image of the same bytes twice, without sha256.
    let mut c = t.control();
    let raw = image(6);
    let params = json!({"name": "raw", "size": raw.len()});
    let r = c.upload(params.clone(), &raw);
    assert_eq!(r["result"]["skipped"], false, "{r}");
    let raw_lun = r["result"]["lun_id"].as_u64().unwrap() as u16;
    past_ua(|| s.test_unit_ready(raw_lun).unwrap());
    let inode = |name: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(t.root().join(name)).unwrap());
    let before = inode("raw.img");
    let r = c.upload(params.clone(), &raw);
    assert_eq!(r["result"]["skipped"], true, "{r}");
    assert_eq!(r["result"]["lun_id"], json!(raw_lun), "{r}");
    assert_eq!(inode("raw.img"), before, "the image file was not replaced");
    assert_no_unit_attention(&mut s, raw_lun, "after a skipped raw upload");
    assert_no_unit_attention(&mut s, lun, "the other LUN");

    // Other bytes are not skipped; force is never skipped.
    let r = c.upload(json!({"name": "raw", "size": raw.len(), "force": true}), &raw);
    assert_eq!(r["result"]["skipped"], false, "{r}");
    let other = image(7);
    let r = c.upload(json!({"name": "raw", "size": other.len()}), &other);
    assert_eq!(r["result"]["skipped"], false, "{r}");

    let log = t.stderr_text();
    let replaced: Vec<&str> = log.lines().filter(|l| l.contains("replaced")).collect();
    // Exactly the two deliberate re-writes replaced the LUN; the skips did not.
    assert_eq!(replaced.len(), 2, "{replaced:#?}");
    assert!(replaced.iter().all(|l| l.contains("'raw'")), "{replaced:#?}");
    s.logout().unwrap();
}

#[test]
fn an_empty_upload_is_an_empty_image_error() {
    let t = Target::start(&["--reactors", "1"]);
    let mut c = t.control();
    for params in [json!({"name": "e", "size": 0}), json!({"name": "e", "size": 0, "compression": "none"})] {
        let r = c.upload(params, &[]);
        assert_eq!(r["error"]["code"], json!(BAD_UPLOAD), "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("empty image"), "{r}");
    }
    // Through ctl, from an empty file, also with an image of that name in place.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("e.img");
    std::fs::write(&empty, b"").unwrap();
    for _ in 0..2 {
        let o = ctl(&t, &["upload", empty.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("empty image") && !err.contains("no image with sha256"), "{err}");
        c.upload(json!({"name": "e", "size": 4}), b"abcd");
    }
    // The connection still serves, and a gz that holds 0 bytes is the same error.
    let r = c.upload(json!({"name": "z", "size": gzip(b"").len(), "compression": "gz"}), &gzip(b""));
    assert!(r["error"]["message"].as_str().unwrap().contains("empty image"), "{r}");
}

#[test]
fn first_upload_logs_no_image_info_failure_and_errors_name_the_file() {
    let t = Target::start(&["--reactors", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let img = image(8);
    let file = dir.path().join("first.img");
    std::fs::write(&file, &img).unwrap();
    ok_stdout(&ctl(&t, &["upload", file.to_str().unwrap()]));
    let log = t.stderr_text();
    assert!(!log.contains("image_info failed"), "{log}");

    // A truncated gz: the error names the local file it came from.
    let gz = gzip(&image(9));
    let cut = dir.path().join("cut.img.gz");
    std::fs::write(&cut, &gz[..gz.len() / 2]).unwrap();
    let o = ctl(&t, &["upload", cut.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with(&format!("uringtgt: {}: gz stream is corrupt or truncated", cut.display())), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn remove_created_on_close_keeps_uploaded_images() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.yaml");
    std::fs::write(&cfg, "remove_created_on_close: true\n").unwrap();
    let mut t = Target::start(&["--reactors", "1", "--config", cfg.to_str().unwrap()]);
    let mut c = t.control();
    c.ok("add_lun", json!({"name": "scratch", "size_mb": 1}));
    let img = image(10);
    let r = c.upload(json!({"name": "up", "size": img.len()}), &img);
    assert_eq!(r["result"]["skipped"], false, "{r}");
    drop(c);
    assert!(t.root().join("scratch.img").exists() && t.root().join("up.img").exists());
    // restart() stops with SIGTERM first.
    t.restart();
    assert!(!t.root().join("scratch.img").exists(), "a created image is removed on close");
    assert_eq!(std::fs::read(t.root().join("up.img")).unwrap()[..img.len()], img[..], "an uploaded image stays");
    let info = t.control().ok("image_info", json!({"name": "up"}));
    assert!(info["sha256"].is_string(), "its digest too, for the next run's skip: {info}");
}
