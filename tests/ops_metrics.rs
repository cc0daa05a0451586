//! Issue 13's metrics: the `metrics_listen` Prometheus endpoint, scraped and parsed, and
//! `ctl stats --watch`.

mod common;

use common::initiator::{LoginOptions, Session};
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The endpoint address, from the target's log line `metrics on http://ADDR/metrics`.
fn metrics_addr(t: &common::Target) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = t.stderr_text();
        if let Some(rest) = log.split("metrics on http://").nth(1) {
            return rest.split('/').next().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no metrics line in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `request` and returns the status line, the headers and the body.
fn http(addr: &str, request: &[u8]) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("a header/body separator");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

/// Parses the text format: `name{labels} value` per sample line, comments skipped. Every
/// sample line must parse, and the exposition must end with `# EOF`.
fn scrape(addr: &str) -> HashMap<String, f64> {
    let (status, headers, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("Content-Type: application/openmetrics-text"), "{headers}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    let mut out = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let v = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        assert!(out.insert(series.to_owned(), v).is_none(), "duplicate series {series}");
    }
    out
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| {
        let mut names: Vec<&String> = m.keys().collect();
        names.sort();
        panic!("no series {series}; have:\n{names:#?}")
    })
}

#[test]
fn metrics_endpoint_reports_io_sessions_failures_and_uploads() {
    let t = common::Target::start(&["--metrics-listen", "127.0.0.1:0", "--lun", "name=r,backing=mem,size_mb=4"]);
    let addr = metrics_addr(&t);
    let read_ops = r#"uringtgt_lun_ops_total{lun_id="0",name="r",op="read"}"#;
    let read_bytes = r#"uringtgt_lun_bytes_total{lun_id="0",name="r",op="read"}"#;
    let write_ops = r#"uringtgt_lun_ops_total{lun_id="0",name="r",op="write"}"#;
    let before = scrape(&addr);
    assert_eq!(get(&before, read_ops), 0.0);
    assert_eq!(get(&before, r#"uringtgt_sessions{type="normal"}"#), 0.0);
    assert_eq!(get(&before, "uringtgt_connections"), 0.0);
    assert_eq!(get(&before, "uringtgt_luns"), 1.0);

    let mut s = t.login(&LoginOptions::default());
    assert!(s.write10(0, 0, &[7u8; 4096], 512).unwrap().is_good());
    for lba in [0, 8, 16] {
        assert!(s.read10(0, lba, 8, 512).unwrap().is_good());
    }
    let after = scrape(&addr);
    assert_eq!(get(&after, read_ops), 3.0);
    assert_eq!(get(&after, read_bytes), 3.0 * 4096.0);
    assert_eq!(get(&after, write_ops), 1.0);
    assert_eq!(get(&after, r#"uringtgt_sessions{type="normal"}"#), 1.0);
    assert_eq!(get(&after, "uringtgt_connections"), 1.0);
    // The latency histogram counts every read; its +Inf bucket is cumulative.
    let lat = r#"uringtgt_lun_latency_seconds_count{lun_id="0",name="r",op="read"}"#;
    assert_eq!(get(&after, lat), 3.0);
    let inf = r#"uringtgt_lun_latency_seconds_bucket{le="+Inf",lun_id="0",name="r",op="read"}"#;
    let inf = after.get(inf).copied().unwrap_or_else(|| {
        // Label order is the encoder's: look the bucket up by its parts.
        after
            .iter()
            .find(|(k, _)| {
                k.starts_with("uringtgt_lun_latency_seconds_bucket{")
                    && k.contains(r#"le="+Inf""#)
                    && k.contains(r#"op="read""#)
            })
            .map(|(_, v)| *v)
            .expect("a +Inf bucket")
    });
    assert_eq!(inf, 3.0);
    let max = r#"uringtgt_lun_latency_quantile_seconds{lun_id="0",name="r",op="read",quantile="1"}"#;
    assert!(get(&after, max) > 0.0);
    let reactor_reads: f64 = after
        .iter()
        .filter(|(k, _)| k.starts_with("uringtgt_reactor_ops_total{") && k.contains(r#"op="read""#))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(reactor_reads, 3.0);

    // A login to a target that does not exist is counted by its reason.
    let wrong = Session::login(&t.addr(), "iqn.2024-06.dev.jumpstarter:nosuch", &LoginOptions::default());
    assert!(wrong.is_err());
    let failures: f64 =
        scrape(&addr).iter().filter(|(k, _)| k.starts_with("uringtgt_login_failures_total{")).map(|(_, v)| v).sum();
    assert_eq!(failures, 1.0);

    // An upload is counted with its bytes.
    let image = vec![0x5Au8; 64 * 1024];
    let r = t.control().upload(json!({"name": "up", "size": image.len()}), &image);
    assert!(r.get("error").is_none(), "{r}");
    let m = scrape(&addr);
    assert_eq!(get(&m, r#"uringtgt_uploads_total{result="uploaded"}"#), 1.0);
    assert_eq!(get(&m, "uringtgt_upload_bytes_total"), image.len() as f64);
    assert_eq!(get(&m, "uringtgt_upload_duration_seconds_count"), 1.0);
    drop(s);
}

#[test]
fn metrics_endpoint_answers_only_get_metrics() {
    let t = common::Target::start(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_addr(&t);
    assert_eq!(http(&addr, b"GET /other HTTP/1.1\r\n\r\n").0, "HTTP/1.1 404 Not Found");
    assert_eq!(http(&addr, b"POST /metrics HTTP/1.1\r\n\r\n").0, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(http(&addr, b"garbage\r\n\r\n").0, "HTTP/1.1 400 Bad Request");
    let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 10_000));
    assert_eq!(http(&addr, &big).0, "HTTP/1.1 431 Request Header Fields Too Large");
    let (status, headers, body) = http(&addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("Content-Length: ") && body.is_empty(), "{headers}");
    // A client that sends nothing does not keep others out for longer than the timeout.
    let _idle = TcpStream::connect(&addr).unwrap();
    let started = Instant::now();
    let m = scrape(&addr);
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    assert_eq!(get(&m, "uringtgt_luns"), 0.0);
}

#[test]
fn a_bad_metrics_listen_is_refused_at_start() {
    let root = tempfile::tempdir().unwrap();
    let out = common::run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_uringtgt"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-listen", "localhost"])
            .arg("--root-dir")
            .arg(root.path()),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics_listen: not an ADDRESS:PORT: \"localhost\""), "{err}");
}

fn ctl_stats(t: &common::Target, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
    cmd.arg("ctl").arg("--socket").arg(t.control_socket()).args(["stats", "--watch"]).args(extra);
    cmd
}

#[test]
fn stats_watch_refreshes_every_second_until_count() {
    let t = common::Target::start(&["--lun", "name=r,backing=mem,size_mb=4"]);
    let started = Instant::now();
    let out = common::run_with_timeout(&mut ctl_stats(&t, &["--count", "3"]), Duration::from_secs(30));
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let headers: Vec<&str> = stdout.lines().filter(|l| l.starts_with("--- refresh ")).collect();
    assert_eq!(headers.len(), 3, "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("WHAT")).count(), 3, "a table each time:\n{stdout}");
    assert!(stdout.contains("lun 0 r"), "{stdout}");
    // Three refreshes are two intervals of a second apart.
    assert!(took >= Duration::from_millis(1900), "{took:?}");
}

#[test]
fn stats_watch_exits_cleanly_on_sigint() {
    let t = common::Target::start(&["--lun", "name=r,backing=mem,size_mb=4"]);
    let mut child = ctl_stats(&t, &["--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut refreshes = 0;
    let mut json_lines = 0;
    while refreshes < 2 {
        let line = lines.next().expect("output until SIGINT").unwrap();
        if line.starts_with("--- refresh ") {
            refreshes += 1;
        } else {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert!(v["luns"].is_array(), "{v}");
            json_lines += 1;
        }
    }
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "stats --watch ignored SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "exit status after SIGINT: {status:?}");
    assert!(json_lines >= 1);
}
