//! `uringtgt ctl upload URL` and `uringtgt ctl serve` against the real binary: a gz image served
//! by a tiny HTTP server inside the test (127.0.0.1 only) is streamed to the target and reads
//! back byte-exact; HTTP failures exit non-zero naming the URL; `serve` prints `host:port iqn`;
//! over HTTPS, a server certified by a private CA is trusted through `--cacert` or
//! `SSL_CERT_FILE` and refused without.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::initiator::LoginOptions;
use common::{assert_lun_holds, run_with_timeout, Target};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};

/// Not a whole number of blocks, so a cut tail would show.
const IMAGE_LEN: usize = (1 << 20) + 1000;

fn image(seed: u8) -> Vec<u8> {
    let mut v: Vec<u8> = (0..IMAGE_LEN).map(|i| ((i / 5) as u8).wrapping_mul(29).wrapping_add(seed) | 1).collect();
    v[300_000..500_000].fill(0);
    v
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A one-thread HTTP/1.1 server on 127.0.0.1:0 answering GETs by path:
/// - `/disk.img.gz`: `body` with Content-Length;
/// - `/chunked.img`: `body` chunked, without Content-Length;
/// - `/broken.img.gz`: announces `body.len()` bytes, sends half, closes;
/// - anything else: 404.
///
/// Each request head (lower-cased) is sent on the returned channel.
fn http_server(body: Vec<u8>) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let head = answer(&mut conn, &body);
            if tx.send(head).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

fn answer(conn: &mut (impl Read + Write), body: &[u8]) -> String {
    // A GET has no body: nothing past the head is buffered away from the writes below.
    let mut reader = BufReader::new(&mut *conn);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let head = head.to_ascii_lowercase();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let path = path.split('?').next().unwrap_or("");
    drop(reader);
    let out = conn;
    // The client may have gone away: write errors are the test's to see, not the server's.
    let _ = match path {
        "/disk.img.gz" => {
            let h = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            out.write_all(h.as_bytes()).and_then(|()| out.write_all(body))
        }
        "/chunked.img" => {
            let h = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            let chunk = format!("{:x}\r\n", body.len());
            out.write_all(h.as_bytes())
                .and_then(|()| out.write_all(chunk.as_bytes()))
                .and_then(|()| out.write_all(body))
                .and_then(|()| out.write_all(b"\r\n0\r\n\r\n"))
        }
        "/broken.img.gz" => {
            let h = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            out.write_all(h.as_bytes()).and_then(|()| out.write_all(&body[..body.len() / 2]))
        }
        _ => out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"),
    };
    let _ = out.flush();
    head
}

/// `uringtgt ctl --socket <target's> ARGS`, without proxy settings that would send a
/// 127.0.0.1 request elsewhere, nor the caller's SSL_CERT_FILE.
fn ctl(t: &Target, args: &[&str]) -> Output {
    ctl_env(t, args, &[])
}

/// [`ctl`] with environment variables set.
fn ctl_env(t: &Target, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
    cmd.arg("ctl").arg("--socket").arg(t.control_socket()).args(args);
    for var in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "SSL_CERT_FILE"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    run_with_timeout(&mut cmd, Duration::from_secs(60))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp_files(t: &Target) -> Vec<String> {
    std::fs::read_dir(t.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn http_upload_streams_and_reads_back_exact() {
    let t = Target::start(&["--reactors", "1"]);
    let img = image(1);
    let (port, heads) = http_server(gzip(&img));
    // The query holds a '/' and another extension: compression and name come from the path.
    let url = format!("http://127.0.0.1:{port}/disk.img.gz?sig=a/b.txt");
    let o = ctl(&t, &["upload", &url, "--header", "X-Token: abc", "--header", "X-Other:two words "]);
    assert!(o.status.success(), "{}\n{}", stderr(&o), stdout(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().next(), Some(format!("{} {} 0", t.addr(), t.iqn).as_str()), "{out}");
    assert!(out.contains(&format!("disk: {IMAGE_LEN} bytes")) && out.contains("uploaded"), "{out}");
    let head = heads.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(head.starts_with("get /disk.img.gz?sig=a/b.txt http/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nx-token: abc\r\n") && head.contains("\r\nx-other: two words\r\n"), "{head}");
    let mut s = t.login(&LoginOptions::default());
    assert_lun_holds(&mut s, 0, &img);
    // The target computed the digest itself (no sha256 was sent): the next local upload of
    // the same image can be skipped against it.
    let mut c = t.control();
    let info = c.ok("image_info", json!({"name": "disk"}));
    let want: String = sha2_hex(&img);
    assert_eq!(info["sha256"], json!(want), "{info}");
}

fn sha2_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn http_failures_exit_non_zero_naming_the_url() {
    let t = Target::start(&["--reactors", "1"]);
    let img = image(2);
    let body_len = gzip(&img).len();
    let (port, _heads) = http_server(gzip(&img));
    let fails = |args: &[&str], want: &[&str]| {
        let o = ctl(&t, args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: {err:?} lacks {w:?}");
        }
        assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
    };

    let url = format!("http://127.0.0.1:{port}/missing.img");
    fails(&["upload", &url], &[&format!("uringtgt: {url}: "), "404"]);

    let url = format!("http://127.0.0.1:{port}/chunked.img");
    fails(&["upload", &url], &[&format!("uringtgt: {url}: "), "Content-Length"]);

    // Nobody listens on a port just freed.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{closed}/disk.img.gz");
    fails(&["upload", &url], &[&format!("uringtgt: {url}: ")]);

    let url = format!("http://127.0.0.1:{port}/disk.img.gz");
    fails(&["upload", &url, "--header", "no colon"], &["--header \"no colon\""]);
    fails(&["upload", &url, "--header", "X Bad: v"], &["--header"]);

    // The body breaks off half-way: the upload fails at once (not after the target's stall
    // timeout), naming the URL and how far it got, and leaves no temp file.
    let url = format!("http://127.0.0.1:{port}/broken.img.gz");
    let start = Instant::now();
    fails(&["upload", &url], &[&format!("uringtgt: {url}: broke off after "), &format!(" of {body_len} bytes")]);
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    let mut c = t.control();
    let luns = c.ok("list_luns", Value::Null);
    assert_eq!(luns, json!([]), "{luns}");
    // The target may still be unwinding the short upload: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !temp_files(&t).is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(temp_files(&t).is_empty(), "{:?}", temp_files(&t));
}

#[test]
fn ctl_serve_prints_the_portal_and_keeps_other_luns() {
    let t = Target::start(&["--reactors", "1", "--lun", "name=keep,size_mb=1,backing=mem"]);
    let dir = tempfile::tempdir().unwrap();
    let img = image(3);
    let file = dir.path().join("fw.img.gz");
    std::fs::write(&file, gzip(&img)).unwrap();
    let file = file.to_str().unwrap();
    let mut c = t.control();
    // serve opens a closed portal...
    c.ok("stop", Value::Null);
    let o = ctl(&t, &["serve", file]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, [format!("{} {}", t.addr(), t.iqn), "1".to_owned()], "{out}");
    assert!(t.addr().starts_with("127.0.0.1:"));
    // ...and leaves the LUNs it did not upload alone.
    let names: Vec<Value> =
        c.ok("list_luns", Value::Null).as_array().unwrap().iter().map(|l| l["name"].clone()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&json!("keep")) && names.contains(&json!("fw")), "{names:?}");
    let mut s = t.login(&LoginOptions::default());
    assert_lun_holds(&mut s, 1, &img);

    // Again with the portal open (start is idempotent), from a URL, under another name.
    let (port, _heads) = http_server(gzip(&img));
    let url = format!("http://127.0.0.1:{port}/disk.img.gz");
    let o = ctl(&t, &["serve", &url, "--name", "fw2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{} {}\n2\n", t.addr(), t.iqn));
}

/// A private CA and a server certificate it signed for 127.0.0.1, as a lab CI rig has.
struct LabPki {
    ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: PrivateKeyDer<'static>,
}

fn lab_pki(name: &str) -> LabPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, name);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    // An IP address subject alternative name: the URL's host is 127.0.0.1.
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = server.signed_by(&key, &ca_cert, &ca_key).unwrap();
    LabPki {
        ca_pem: ca_cert.pem(),
        server_cert: cert.der().clone(),
        server_key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    }
}

/// [`http_server`] over TLS on 127.0.0.1:0 with `pki`'s server certificate. A client that
/// refuses the certificate ends the handshake; the server goes on to the next connection.
fn https_server(body: Vec<u8>, pki: &LabPki) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pki.server_cert.clone()], pki.server_key.clone_key())
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { continue };
            let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config.clone()).unwrap(), tcp);
            answer(&mut tls, &body);
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    port
}

#[test]
fn https_trusts_a_private_ca_through_cacert_or_ssl_cert_file() {
    let t = Target::start(&["--reactors", "1"]);
    let img = image(4);
    let pki = lab_pki("uringtgt test lab CA");
    let port = https_server(gzip(&img), &pki);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("lab-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, lab_pki("another CA").ca_pem).unwrap();
    let url = format!("https://127.0.0.1:{port}/disk.img.gz");
    let fails = |o: Output, want: &[&str]| {
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        for w in want {
            assert!(err.contains(w), "{err:?} lacks {w:?}");
        }
    };

    // The built-in roots do not know the lab CA: refused, saying how to trust it.
    fails(ctl(&t, &["upload", &url]), &[&format!("uringtgt: {url}: "), "certificate", "--cacert FILE"]);
    // A CA that did not sign the server's certificate: refused, naming the file trusted.
    let o = ctl(&t, &["upload", &url, "--cacert", other_ca.to_str().unwrap()]);
    fails(o, &[&format!("uringtgt: {url}: "), "certificate", "other-ca.pem"]);
    // --cacert wins over SSL_CERT_FILE.
    let o = ctl_env(&t, &["upload", &url, "--cacert", other_ca.to_str().unwrap()], &[("SSL_CERT_FILE", &ca)]);
    fails(o, &["other-ca.pem"]);
    assert_eq!(t.control().ok("list_luns", Value::Null), json!([]));

    // Trusted through --cacert: streamed and read back exact.
    let o = ctl(&t, &["upload", &url, "--cacert", ca.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("disk: {IMAGE_LEN} bytes")), "{}", stdout(&o));
    let mut s = t.login(&LoginOptions::default());
    assert_lun_holds(&mut s, 0, &img);
    // Trusted through SSL_CERT_FILE, as curl and OpenSSL read it.
    let o = ctl_env(&t, &["upload", &url, "--name", "disk2"], &[("SSL_CERT_FILE", &ca)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("disk2: {IMAGE_LEN} bytes")), "{}", stdout(&o));

    // A local file: --cacert is refused, SSL_CERT_FILE (even a missing one) is not read.
    let file = dir.path().join("local.img.gz");
    std::fs::write(&file, gzip(&img)).unwrap();
    let file = file.to_str().unwrap();
    fails(ctl(&t, &["upload", file, "--cacert", ca.to_str().unwrap()]), &["--cacert applies to HTTP(S) sources only"]);
    let o = ctl_env(&t, &["upload", file], &[("SSL_CERT_FILE", Path::new("/nonexistent/ca.pem"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    // An unreadable --cacert fails before any request.
    fails(ctl(&t, &["upload", &url, "--cacert", "/nonexistent/ca.pem"]), &["--cacert /nonexistent/ca.pem: read: "]);
}
