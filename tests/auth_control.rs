//! Access control through the control plane: get_auth/set_auth take effect on the next login
//! without dropping sessions, list_sessions shows the auth method, control_socket_group.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use common::initiator::{ChapLogin, Error, LoginOptions, Session};
use common::{run_with_timeout, Target};
use serde_json::json;

const OLD: &str = "old-secret-0123";
const NEW: &str = "new-secret-4567";

fn secret_file(dir: &std::path::Path, name: &str, secret: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, secret).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn chap(user: &str, secret: &str) -> LoginOptions {
    LoginOptions { chap: Some(ChapLogin::new(user, secret)), ..Default::default() }
}

fn status(t: &Target, opts: &LoginOptions) -> Option<(u8, u8)> {
    match Session::login(&t.addr(), &t.iqn, opts) {
        Ok(_) => None,
        Err(Error::Login { class, detail }) => Some((class, detail)),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn set_auth_applies_to_new_logins_and_keeps_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let old = secret_file(dir.path(), "old.secret", OLD);
    let t = Target::start(&[
        "--chap-user",
        "rig",
        "--chap-secret-file",
        old.to_str().unwrap(),
        "--lun",
        "name=ram0,backing=mem,size_mb=4,lun_id=0",
    ]);
    let mut ctl = t.control();
    assert_eq!(ctl.ok("get_auth", json!(null))["chap"], json!({"username": "rig"}));
    let mut s = t.login(&chap("rig", OLD));
    let sessions = ctl.ok("list_sessions", json!(null));
    assert_eq!(sessions[0]["auth"], "CHAP MD5", "{sessions}");

    // New credentials, sent inline; the answer and the log never show them.
    let r = ctl.ok("set_auth", json!({"chap": {"username": "lease42", "secret": NEW}}));
    assert_eq!(r["chap"], json!({"username": "lease42"}));
    assert!(!r.to_string().contains(NEW));
    assert_eq!(status(&t, &chap("rig", OLD)), Some((2, 1)));
    t.login(&chap("lease42", NEW)).logout().unwrap();
    // The session logged in with the old credentials still works.
    let w = common::past_ua(|| s.write10(0, 0, &[9u8; 512], 512).unwrap());
    assert!(w.is_good(), "{w:?}");
    assert_eq!(common::past_ua(|| s.read10(0, 0, 1, 512).unwrap()).data, vec![9u8; 512]);

    // Bad credentials are refused and change nothing.
    let code = ctl.err_code("set_auth", json!({"chap": {"username": "x", "secret": "short"}}));
    assert_eq!(code, -32602);
    let code = ctl.err_code("set_auth", json!({"chap": {"username": "x", "secret": NEW, "typo": 1}}));
    assert_eq!(code, -32602);
    t.login(&chap("lease42", NEW)).logout().unwrap();

    // ctl set-auth with a secret file; ctl get-auth prints no secret.
    let newer = secret_file(dir.path(), "newer.secret", "newer-secret-89");
    let ctl_run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
        cmd.arg("ctl").arg("--socket").arg(t.control_socket()).args(args);
        let o = run_with_timeout(&mut cmd, Duration::from_secs(30));
        assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    ctl_run(&["set-auth", "--chap-user", "lease43", "--chap-secret-file", newer.to_str().unwrap()]);
    let shown = ctl_run(&["get-auth"]);
    assert!(shown.contains("lease43") && !shown.contains("newer-secret-89"), "{shown}");
    t.login(&chap("lease43", "newer-secret-89")).logout().unwrap();
    // Turned off: demo mode.
    ctl_run(&["set-auth"]);
    let mut open = t.login(&LoginOptions::default());
    assert_eq!(
        ctl.ok("list_sessions", json!(null)).as_array().unwrap().iter().filter(|x| x["auth"] == "None").count(),
        1
    );
    open.test_unit_ready(0).unwrap();
    s.logout().unwrap();
    let log = t.stderr_text();
    assert!(!log.contains(NEW) && !log.contains(OLD) && !log.contains("newer-secret-89"), "{log}");
}

#[test]
fn control_socket_group_owns_the_socket() {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // As root any group works (1 is "daemon" or "bin"); otherwise our own group.
    let want = if uid == 0 { 1 } else { gid };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, format!("control_socket_group: \"{want}\"\n")).unwrap();
    let t = Target::start(&["--config", cfg.to_str().unwrap()]);
    let meta = std::fs::metadata(t.control_socket()).unwrap();
    assert_eq!(meta.gid(), want);
    assert_eq!(meta.mode() & 0o777, 0o660);
    drop(t);
    // An unknown group stops the start with a clear error.
    std::fs::write(&cfg, "control_socket_group: no-such-group-uringtgt\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
    cmd.args(["serve", "--host", "127.0.0.1", "--port", "0", "--root-dir"]).arg(dir.path()).arg("--config").arg(&cfg);
    let o = run_with_timeout(&mut cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("control_socket_group \"no-such-group-uringtgt\": no such group"),
        "{err}"
    );
}
