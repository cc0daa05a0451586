//! Access control against the real binary: CHAP and mutual CHAP (the test initiator and
//! libiscsi's tools), initiator and network ACLs, discovery authentication, secret handling.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::initiator::{ChapLogin, Error, LoginOptions, Session};
use common::{require_tool, run_with_timeout, Target};

const SECRET: &str = "rig-secret-0123";
const MUTUAL_SECRET: &str = "tgt-secret-4567";
const INITIATOR: &str = "iqn.2024-06.dev.jumpstarter:uringtgt-tests";

/// Writes `yaml` (and the secret files it may name) to a fresh directory; returns the config path.
fn config(dir: &Path, yaml: &str) -> PathBuf {
    for (name, secret) in [("chap.secret", SECRET), ("mutual.secret", MUTUAL_SECRET)] {
        let p = dir.join(name);
        std::fs::write(&p, format!("{secret}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let path = dir.join("uringtgt.yaml");
    std::fs::write(&path, yaml.replace("$DIR", &dir.display().to_string())).unwrap();
    path
}

/// A target with one RAM LUN and the given access-control YAML.
fn start(yaml: &str) -> (Target, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), yaml);
    let t = Target::start(&["--config", cfg.to_str().unwrap(), "--lun", "name=ram0,backing=mem,size_mb=8,lun_id=0"]);
    (t, dir)
}

const CHAP: &str = "auth:\n  chap: {username: rig, secret_file: $DIR/chap.secret}\n";
const MUTUAL: &str = "auth:\n  chap: {username: rig, secret_file: $DIR/chap.secret}\n  \
                      mutual_chap: {username: tgt, secret_file: $DIR/mutual.secret}\n";

fn chap(user: &str, secret: &str) -> LoginOptions {
    LoginOptions { chap: Some(ChapLogin::new(user, secret)), ..Default::default() }
}

fn login_status(t: &Target, opts: &LoginOptions) -> Option<(u8, u8)> {
    match Session::login(&t.addr(), &t.iqn, opts) {
        Ok(_) => None,
        Err(Error::Login { class, detail }) => Some((class, detail)),
        Err(e) => panic!("login with {opts:?}: {e}"),
    }
}

fn write_and_read_back(s: &mut Session, seed: u8) {
    let data: Vec<u8> = (0..8192u32).map(|i| (i as u8).wrapping_mul(seed)).collect();
    let w = common::past_ua(|| s.write10(0, 16, &data, 512).unwrap());
    assert!(w.is_good(), "{w:?}");
    let r = common::past_ua(|| s.read10(0, 16, 16, 512).unwrap());
    assert!(r.is_good() && r.data == data, "read back differs");
}

#[test]
fn chap_login_with_each_algorithm_reads_back_written_data() {
    let (t, _dir) = start(CHAP);
    for (offer, chosen) in [("5", "5"), ("7,5", "7"), ("5,7,8", "8")] {
        let mut opts = chap("rig", SECRET);
        opts.chap.as_mut().unwrap().algorithms = offer.into();
        let mut s = t.login(&opts);
        assert_eq!(s.chap_alg, chosen, "CHAP_A offered {offer}");
        write_and_read_back(&mut s, chosen.parse().unwrap());
        s.logout().unwrap();
    }
}

#[test]
fn chap_failures_are_authentication_failures_after_a_delay() {
    let (t, _dir) = start(CHAP);
    let cases = [
        ("wrong secret", chap("rig", "not-the-secret-9")),
        ("wrong user", chap("someone", SECRET)),
        ("no secret (AuthMethod=None)", LoginOptions::default()),
        ("no security stage", LoginOptions { security_stage: false, ..Default::default() }),
        ("asks for mutual CHAP, none configured", {
            let mut o = chap("rig", SECRET);
            o.chap = o.chap.map(|c| c.mutual("tgt", MUTUAL_SECRET));
            o
        }),
    ];
    for (what, opts) in &cases {
        let started = Instant::now();
        assert_eq!(login_status(&t, opts), Some((2, 1)), "{what}");
        // The answer is held back ~1 s (at a reactor tick); generous upper bound for a busy machine.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "{what}: refused after {took:?}");
    }
    // One log line per refusal, naming the initiator and the reason, never the secrets.
    let log = t.stderr_text();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("refused")).collect();
    assert_eq!(refusals.len(), cases.len(), "{log}");
    assert!(refusals.iter().all(|l| l.contains(INITIATOR)), "{log}");
    assert!(refusals[0].contains("wrong CHAP response"), "{log}");
    assert!(refusals[1].contains("unknown CHAP user"), "{log}");
    assert!(!log.contains(SECRET) && !log.contains("not-the-secret-9") && !log.contains(MUTUAL_SECRET), "{log}");
    // The target keeps serving the right credentials.
    t.login(&chap("rig", SECRET)).logout().unwrap();
}

#[test]
fn mutual_chap_both_directions() {
    let (t, _dir) = start(MUTUAL);
    let right = ChapLogin::new("rig", SECRET).mutual("tgt", MUTUAL_SECRET);
    let mut s = t.login(&LoginOptions { chap: Some(right), ..Default::default() });
    write_and_read_back(&mut s, 3);
    s.logout().unwrap();
    // The mutual (target's) secret used in the initiator's direction.
    let swapped = ChapLogin::new("rig", MUTUAL_SECRET).mutual("tgt", MUTUAL_SECRET);
    assert_eq!(login_status(&t, &LoginOptions { chap: Some(swapped), ..Default::default() }), Some((2, 1)));
    // The initiator expects another target secret: the target's answer does not verify.
    let wrong_target = ChapLogin::new("rig", SECRET).mutual("tgt", SECRET);
    match Session::login(&t.addr(), &t.iqn, &LoginOptions { chap: Some(wrong_target), ..Default::default() }) {
        Err(Error::MutualChap) => {}
        other => panic!("expected the target's answer to fail verification, got {:?}", other.map(|_| ())),
    }
    // Mutual CHAP configured, the initiator does not ask: refused (the target must prove itself).
    assert_eq!(login_status(&t, &chap("rig", SECRET)), Some((2, 1)));
}

#[test]
fn libiscsi_chap_and_mutual_chap() {
    if !require_tool("iscsi-inq") {
        return;
    }
    let (t, _dir) = start(MUTUAL);
    let inq = |userinfo: &str, target: Option<(&str, &str)>| {
        let url = format!("iscsi://{userinfo}{}/{}/0", t.addr(), t.iqn);
        let mut cmd = Command::new("iscsi-inq");
        cmd.arg(&url);
        if let Some((user, secret)) = target {
            cmd.env("LIBISCSI_CHAP_TARGET_USERNAME", user).env("LIBISCSI_CHAP_TARGET_PASSWORD", secret);
        }
        let o = run_with_timeout(&mut cmd, Duration::from_secs(30));
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
    };
    let (ok, out) = inq(&format!("rig%{SECRET}@"), Some(("tgt", MUTUAL_SECRET)));
    assert!(ok && out.contains("DIRECT_ACCESS"), "{out}");
    for (userinfo, target) in [
        (format!("rig%{MUTUAL_SECRET}@"), Some(("tgt", MUTUAL_SECRET))),
        (format!("other%{SECRET}@"), Some(("tgt", MUTUAL_SECRET))),
        (String::new(), None),
        // No target credentials: libiscsi does not challenge, which a mutual target refuses.
        (format!("rig%{SECRET}@"), None),
    ] {
        let (ok, out) = inq(&userinfo, target);
        assert!(!ok && out.contains("Authentication failure"), "{userinfo} {target:?}: {out}");
    }
    // libiscsi checks the target's answer: a wrong target secret fails on its side.
    let (ok, out) = inq(&format!("rig%{SECRET}@"), Some(("tgt", "not-the-target-0")));
    assert!(!ok && out.contains("Invalid CHAP_R response from the target"), "{out}");
}

#[test]
fn libiscsi_chap_login_without_mutual() {
    if !require_tool("iscsi-inq") {
        return;
    }
    let (t, _dir) = start(CHAP);
    let url = format!("iscsi://rig%{SECRET}@{}/{}/0", t.addr(), t.iqn);
    let o = run_with_timeout(Command::new("iscsi-inq").arg(&url), Duration::from_secs(30));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Discovery needs no credentials without `discovery: true`.
    let o = run_with_timeout(Command::new("iscsi-ls").arg(t.portal_url()), Duration::from_secs(30));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains(&t.iqn), "{out}");
}

#[test]
fn discovery_auth() {
    let (t, _dir) = start(&format!("{CHAP}  discovery: true\n"));
    match Session::login_discovery(&t.addr(), &LoginOptions::default()) {
        Err(Error::Login { class: 2, detail: 1 }) => {}
        other => panic!("discovery without credentials: {:?}", other.map(|_| ())),
    }
    let mut s = Session::login_discovery(&t.addr(), &chap("rig", SECRET)).unwrap();
    let targets = s.send_targets().unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].0, t.iqn);
}

#[test]
fn acl_refusals_are_authorization_failures() {
    let (t, _dir) = start(&format!("allowed_initiators: [{INITIATOR}]\nallowed_networks: [127.0.0.1/32]\n"));
    let mut s = t.login(&LoginOptions::default());
    write_and_read_back(&mut s, 5);
    let other = LoginOptions { initiator_name: "iqn.2024-06.dev.example:intruder".into(), ..Default::default() };
    assert_eq!(login_status(&t, &other), Some((2, 2)));
    let from_outside = LoginOptions { bind: Some("127.0.0.2".parse().unwrap()), ..Default::default() };
    assert_eq!(login_status(&t, &from_outside), Some((2, 2)));
    // Discovery from outside the ACL logs in but is not shown the target.
    let mut d = Session::login_discovery(&t.addr(), &other).unwrap();
    assert!(d.send_targets().unwrap().is_empty());
    let mut d = Session::login_discovery(&t.addr(), &LoginOptions::default()).unwrap();
    assert_eq!(d.send_targets().unwrap().len(), 1);
    let log = t.stderr_text();
    assert!(log.contains("not in allowed_initiators") && log.contains("127.0.0.2 not in allowed_networks"), "{log}");
}

#[test]
fn acl_flags_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), "");
    let secret = dir.path().join("chap.secret");
    let t = Target::start(&[
        "--chap-user",
        "rig",
        "--chap-secret-file",
        secret.to_str().unwrap(),
        "--allow-initiator",
        INITIATOR,
        "--allow-network",
        "127.0.0.0/30",
        "--lun",
        "name=ram0,backing=mem,size_mb=8",
    ]);
    t.login(&chap("rig", SECRET)).logout().unwrap();
    assert_eq!(login_status(&t, &chap("rig", "not-the-secret-9")), Some((2, 1)));
    let other = LoginOptions { initiator_name: "iqn.2024-06.dev.example:intruder".into(), ..chap("rig", SECRET) };
    assert_eq!(login_status(&t, &other), Some((2, 2)));
}

/// Runs `uringtgt serve` with a config that must be refused; returns its stderr.
fn refused_at_start(yaml: &str, prepare: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), yaml);
    prepare(dir.path());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
    cmd.args(["serve", "--host", "127.0.0.1", "--port", "0", "--root-dir"]).arg(dir.path()).arg("--config").arg(&cfg);
    let o = run_with_timeout(&mut cmd, Duration::from_secs(20));
    assert!(!o.status.success(), "{yaml} was accepted");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_secrets_are_refused_at_start_without_showing_them() {
    let e = refused_at_start(CHAP, |d| {
        std::fs::set_permissions(d.join("chap.secret"), std::fs::Permissions::from_mode(0o644)).unwrap()
    });
    assert!(e.contains("auth.chap.secret_file") && e.contains("0644") && e.contains("0600"), "{e}");
    let e = refused_at_start("auth:\n  chap: {username: rig, secret: short-11byt}\n", |_| {});
    assert!(e.contains("auth.chap.secret") && e.contains("at least 12") && !e.contains("short-11byt"), "{e}");
    let e = refused_at_start("auth:\n  chap: {username: rig, secret: rig-secret-0123, colour: red}\n", |_| {});
    assert!(e.contains("colour"), "{e}");
    let e = refused_at_start(
        "auth:\n  chap: {username: rig, secret_file: $DIR/chap.secret}\n  \
                              mutual_chap: {username: tgt, secret: rig-secret-0123}\n",
        |_| {},
    );
    assert!(e.contains("auth.mutual_chap") && e.contains("differ") && !e.contains(SECRET), "{e}");
    let e = refused_at_start("allowed_networks: [10.0.0.0/33]\n", |_| {});
    assert!(e.contains("allowed_networks[0]"), "{e}");
    // --help never shows a secret (there is no flag that takes one, only a file).
    let o = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_uringtgt")).args(["serve", "--help"]),
        Duration::from_secs(10),
    );
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("--chap-secret-file") && !help.contains("--chap-secret "), "{help}");
}

#[test]
fn max_sessions_per_initiator_refuses_with_out_of_resources() {
    let (t, _dir) = start("max_sessions_per_initiator: 1\n");
    let first = t.login(&LoginOptions::default());
    // A second session (another ISID) of the same initiator: 3/2, out of resources.
    assert_eq!(login_status(&t, &LoginOptions::default()), Some((3, 2)));
    // Another initiator is not affected; reinstating the same ISID is not a second session.
    let other = LoginOptions { initiator_name: "iqn.2024-06.dev.example:other".into(), ..Default::default() };
    t.login(&other).logout().unwrap();
    first.logout().unwrap();
    t.login(&LoginOptions::default()).logout().unwrap();
}

#[test]
fn max_connections_closes_extra_connections_at_once() {
    use std::io::Read;
    let (t, _dir) = start("max_connections: 2\n");
    let a = t.login(&LoginOptions::default());
    let b = t.login(&LoginOptions::default());
    let mut extra = std::net::TcpStream::connect(t.addr()).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1];
    // Closed by the target without a byte (EOF or reset), long before the 10 s timeout.
    let started = Instant::now();
    let n = extra.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Closing a connection frees its place.
    a.logout().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let c = loop {
        match Session::login(&t.addr(), &t.iqn, &LoginOptions::default()) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no room after a logout: {e}"),
        }
    };
    drop((b, c));
    assert!(t.stderr_text().contains("connection closed: max_connections (2) open"), "{}", t.stderr_text());
}
