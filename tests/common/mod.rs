//! Harness for the end-to-end tests: runs the real `uringtgt` binary on 127.0.0.1 with an ephemeral
//! port and a temporary root directory, and kills it when the test ends.
//!
//! External-target override (for checking the tests themselves against another target, e.g. tgtd):
//!
//! ```text
//! URINGTGT_TEST_EXTERNAL='127.0.0.1:3261/iqn.2024-06.dev.jumpstarter:t1,disk0=1,ram0=2' \
//!     cargo test --test e2e_data -- --test-threads=1
//! ```
//!
//! When set, `Target::start` spawns nothing: it connects to HOST:PORT/IQN and maps each LUN name to
//! the given LUN id (names not listed are an error). The LUN sizes must match what the test asks
//! for, `restart()` only reconnects (persistence is not exercised) and tests must run one at a
//! time because they share the external LUNs. Unset (the normal case), it has no effect.

#![allow(dead_code)]

pub mod initiator;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use initiator::{LoginOptions, Session};

pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(5);
pub const EXTERNAL_ENV: &str = "URINGTGT_TEST_EXTERNAL";

pub struct Target {
    child: Option<Child>,
    root: tempfile::TempDir,
    logs: tempfile::TempDir,
    extra_args: Vec<String>,
    pub host: String,
    pub port: u16,
    pub iqn: String,
    luns: Vec<(String, u16)>,
    external: bool,
}

/// LUN names and ids from `--lun` specs; a spec without `lun_id` gets its position among the specs.
fn luns_from_args(args: &[String]) -> Vec<(String, u16)> {
    let specs: Vec<&String> = args.windows(2).filter(|w| w[0] == "--lun").map(|w| &w[1]).collect();
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut name = None;
            let mut id = i as u16;
            for kv in spec.split(',') {
                match kv.split_once('=') {
                    Some(("name", v)) => name = Some(v.to_string()),
                    Some(("lun_id", v)) => id = v.parse().expect("lun_id must be a number"),
                    _ => {}
                }
            }
            (name.unwrap_or_else(|| panic!("--lun spec without name: {spec}")), id)
        })
        .collect()
}

impl Target {
    /// Starts the target with `serve --host 127.0.0.1 --port 0 --root-dir <tmp> --target-name t1`
    /// followed by `args` (the `--lun` specs and any other flags).
    pub fn start(args: &[&str]) -> Target {
        let extra_args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let root = tempfile::tempdir().expect("root tempdir");
        let logs = tempfile::tempdir().expect("log tempdir");
        if let Ok(ext) = std::env::var(EXTERNAL_ENV) {
            return Self::external(&ext, extra_args, root, logs);
        }
        let mut t = Target {
            child: None,
            root,
            logs,
            luns: luns_from_args(&extra_args),
            extra_args,
            host: "127.0.0.1".to_string(),
            port: 0,
            iqn: String::new(),
            external: false,
        };
        t.spawn();
        t
    }

    fn external(spec: &str, extra_args: Vec<String>, root: tempfile::TempDir, logs: tempfile::TempDir) -> Target {
        let mut parts = spec.split(',');
        let portal_iqn = parts.next().unwrap();
        let (portal, iqn) = portal_iqn.split_once('/').unwrap_or_else(|| panic!("{EXTERNAL_ENV}: no /IQN in {spec}"));
        let (host, port) = portal.rsplit_once(':').expect("HOST:PORT");
        let luns = parts
            .map(|kv| {
                let (n, id) = kv.split_once('=').unwrap_or_else(|| panic!("{EXTERNAL_ENV}: bad LUN map {kv}"));
                (n.to_string(), id.parse().expect("LUN id"))
            })
            .collect();
        eprintln!("using external target {portal} {iqn} (ignoring {extra_args:?})");
        Target {
            child: None,
            root,
            logs,
            extra_args,
            host: host.to_string(),
            port: port.parse().expect("port"),
            iqn: iqn.to_string(),
            luns,
            external: true,
        }
    }

    fn stderr_path(&self) -> PathBuf {
        self.logs.path().join("stderr.log")
    }

    /// What the target has written to stderr (its log) so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let stderr = File::create(self.stderr_path()).expect("stderr log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0", "--root-dir"])
            .arg(self.root.path())
            .args(["--target-name", "t1"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let mut stdout_log = File::create(self.logs.path().join("stdout.log")).expect("stdout log");
        // Keeps draining stdout after readiness so the target never blocks on a full pipe.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(stdout_log, "{line}");
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some((port, iqn)) = parse_ready_line(&line) {
                        self.port = port;
                        self.iqn = iqn;
                        return;
                    }
                }
                Err(e) => {
                    let status = self.child.as_mut().unwrap().try_wait().ok().flatten();
                    self.stop();
                    panic!(
                        "target not ready ({e:?}, exit status {status:?}) with {:?}\n--- stderr ---\n{}",
                        self.extra_args,
                        self.stderr_text()
                    );
                }
            }
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within the grace period.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            eprintln!("target ignored SIGTERM for {STOP_GRACE:?}; killing it");
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    /// Stops and starts the target on the same root directory (the port may change).
    pub fn restart(&mut self) {
        if self.external {
            return;
        }
        self.stop();
        self.spawn();
    }

    /// The target process's id (None for an external target).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, no grace: a crash, for tests of what survives one. `restart` starts it again.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the target again after [`Self::kill9`], on the same root directory.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "respawn after kill9 only");
        self.spawn();
    }

    pub fn is_external(&self) -> bool {
        self.external
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn portal_url(&self) -> String {
        format!("iscsi://{}", self.addr())
    }

    pub fn url(&self, lun: u16) -> String {
        format!("iscsi://{}/{}/{}", self.addr(), self.iqn, lun)
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The LUN id of the `--lun` spec called `name`.
    pub fn lun(&self, name: &str) -> u16 {
        self.luns.iter().find(|(n, _)| n == name).map(|(_, id)| *id).unwrap_or_else(|| panic!("no LUN named {name}"))
    }

    /// The default control socket, `<root_dir>/uringtgt.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.root().join("uringtgt.sock")
    }

    /// A control-plane client on the default socket.
    pub fn control(&self) -> Control {
        Control::connect(&self.control_socket())
    }

    pub fn login(&self, opts: &LoginOptions) -> Session {
        Session::login(&self.addr(), &self.iqn, opts)
            .unwrap_or_else(|e| panic!("login to {} {} with {opts:?}: {e}", self.addr(), self.iqn))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() && !self.external {
            eprintln!("--- target stderr ---\n{}", self.stderr_text());
        }
    }
}

/// A JSON-RPC client on a control socket, for tests: every call returns the whole response.
pub struct Control {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    next_id: u64,
}

impl Control {
    pub fn connect(path: &Path) -> Control {
        let writer = std::os::unix::net::UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connecting to control socket {}: {e}", path.display()));
        writer.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let reader = BufReader::new(writer.try_clone().unwrap());
        Control { reader, writer, next_id: 1 }
    }

    /// Sends one raw line (a newline is appended) and returns the parsed response line.
    pub fn raw(&mut self, line: &[u8]) -> serde_json::Value {
        self.writer.write_all(line).unwrap();
        self.writer.write_all(b"\n").unwrap();
        self.read_response()
    }

    pub fn read_response(&mut self) -> serde_json::Value {
        let mut resp = String::new();
        let n = self.reader.read_line(&mut resp).expect("reading a control response");
        assert!(n > 0, "control socket closed without answering");
        serde_json::from_str(&resp).unwrap_or_else(|e| panic!("response is not JSON ({e}): {resp}"))
    }

    /// Calls `method` and returns the whole response (checked to answer this request).
    pub fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let req = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let resp = self.raw(req.to_string().as_bytes());
        assert_eq!(resp["jsonrpc"], "2.0", "{resp}");
        assert_eq!(resp["id"], id, "{resp}");
        resp
    }

    /// Sends an `upload_image` request line followed by `payload`, and returns the whole
    /// response.
    pub fn upload(&mut self, params: serde_json::Value, payload: &[u8]) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let req = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "upload_image", "params": params});
        let mut line = req.to_string().into_bytes();
        line.push(b'\n');
        // One write: the server's line reader buffers the first payload bytes with the line.
        line.extend_from_slice(payload);
        self.writer.write_all(&line).unwrap();
        let resp = self.read_response();
        assert_eq!(resp["id"], id, "{resp}");
        resp
    }

    /// Writes raw bytes (no newline).
    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Half-closes the connection: the server reads end-of-stream.
    pub fn shutdown_write(&mut self) {
        self.writer.shutdown(std::net::Shutdown::Write).unwrap();
    }

    /// Calls `method`, expecting success; returns the result.
    pub fn ok(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let resp = self.call(method, params.clone());
        assert!(resp.get("error").is_none(), "{method} {params}: {resp}");
        resp["result"].clone()
    }

    /// Calls `method`, expecting an error; returns its code.
    pub fn err_code(&mut self, method: &str, params: serde_json::Value) -> i64 {
        let resp = self.call(method, params.clone());
        let code = resp["error"]["code"].as_i64();
        assert!(code.is_some() && resp["error"]["message"].is_string(), "{method} {params}: {resp}");
        code.unwrap()
    }
}

/// `listening on 127.0.0.1:PORT IQN` → (PORT, IQN).
pub fn parse_ready_line(line: &str) -> Option<(u16, String)> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let (addr, iqn) = rest.trim().split_once(' ')?;
    let port = addr.strip_prefix("127.0.0.1:")?.parse().ok()?;
    let iqn = iqn.trim();
    (!iqn.is_empty() && !iqn.contains(' ')).then(|| (port, iqn.to_string()))
}

/// Whether `name` is on PATH. Missing tools fail the test in CI (CI=true) and skip it elsewhere.
pub fn require_tool(name: &str) -> bool {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file())).unwrap_or(false);
    if found {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("required tool {name} is not installed (apt-get install libiscsi-bin)");
    }
    eprintln!("SKIPPED: {name} is not installed (apt-get install libiscsi-bin)");
    false
}

/// Runs a command to completion with a deadline, killing it (and failing) when it overruns.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let so = String::from_utf8_lossy(&out_t.join().unwrap()).into_owned();
            panic!("{cmd:?} did not finish within {timeout:?}; output so far:\n{so}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
}

/// Runs a tool and returns its stdout, failing with both streams when it exits non-zero.
pub fn tool_output(cmd: &mut Command) -> String {
    let o = run_with_timeout(cmd, Duration::from_secs(60));
    let so = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{cmd:?} failed: {}\n{so}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    so
}

/// A command, repeated while it reports a unit attention (LUN table changed, capacity changed).
pub fn past_ua(mut cmd: impl FnMut() -> initiator::Response) -> initiator::Response {
    for _ in 0..4 {
        let r = cmd();
        if r.status == initiator::STATUS_CHECK_CONDITION && r.sense_key() == Some(0x06) {
            continue;
        }
        return r;
    }
    panic!("unit attention repeated");
}

/// The whole LUN is `want` followed by zeros up to the next whole 512-byte block.
pub fn assert_lun_holds(s: &mut Session, lun: u16, want: &[u8]) {
    const BS: u32 = 512;
    let r = past_ua(|| s.test_unit_ready(lun).unwrap());
    assert!(r.is_good(), "{r:?}");
    let (n, bs) = s.read_capacity16(lun).unwrap();
    assert_eq!(bs, BS);
    assert_eq!(n * u64::from(BS), (want.len() as u64).next_multiple_of(u64::from(BS)), "LUN size");
    let mut got = Vec::new();
    let mut lba = 0u64;
    while lba < n {
        let count = (n - lba).min(128) as u16;
        let r = past_ua(|| s.read10(lun, lba as u32, count, BS).unwrap());
        assert!(r.is_good(), "read at {lba}: {r:?}");
        got.extend_from_slice(&r.data);
        lba += u64::from(count);
    }
    assert!(got[..want.len()] == *want, "LUN data differs from the image");
    assert!(got[want.len()..].iter().all(|&b| b == 0), "tail past the image is not zero");
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    #[test]
    fn ready_line() {
        assert_eq!(
            parse_ready_line("listening on 127.0.0.1:40123 iqn.2024-06.dev.jumpstarter:t1"),
            Some((40123, "iqn.2024-06.dev.jumpstarter:t1".to_string()))
        );
        assert_eq!(parse_ready_line("listening on 127.0.0.1:x iqn"), None);
        assert_eq!(parse_ready_line("starting"), None);
    }

    #[test]
    fn lun_specs() {
        let args: Vec<String> = ["--lun", "name=a,file_path=a.img,size_mb=1", "--lun", "name=b,backing=mem,lun_id=5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(luns_from_args(&args), vec![("a".to_string(), 0), ("b".to_string(), 5)]);
    }
}
