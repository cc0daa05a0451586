//! The `uringtgt` binary's configuration error paths: each must exit non-zero with one line
//! naming the problem, before the target opens any socket.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary; a run that would serve instead of failing is killed, not waited on forever.
fn run(args: &[&str]) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_uringtgt"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn uringtgt");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("uringtgt {args:?} did not exit: it accepted a configuration it should refuse");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    Outcome { code: status.code(), stdout, stderr }
}

/// Writes `yaml` as a config whose root_dir is inside `dir`, so nothing touches /var/lib.
fn config(dir: &Path, yaml: &str) -> String {
    let path = dir.join("uringtgt.yaml");
    std::fs::write(&path, format!("root_dir: {}\n{yaml}", dir.join("root").display())).unwrap();
    path.display().to_string()
}

fn assert_refused(out: &Outcome, needle: &str) {
    assert_eq!(out.code, Some(1), "stderr: {}", out.stderr);
    assert!(out.stderr.starts_with("uringtgt: "), "stderr: {}", out.stderr);
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "one line expected: {}", out.stderr);
    assert!(out.stderr.contains(needle), "stderr lacks {needle:?}: {}", out.stderr);
}

#[test]
fn unknown_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "port: 3260\nprot: 3261\n");
    let out = run(&["serve", "--config", &cfg]);
    assert_refused(&out, "unknown field `prot`");
    assert!(out.stderr.contains("line 3"), "{}", out.stderr);
    assert!(!dir.path().join("root").exists(), "root_dir created for a refused config");
}

#[test]
fn unknown_key_in_exporter_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exporter.yaml");
    std::fs::write(
        &path,
        "export:\n  storage:\n    type: jumpstarter_driver_iscsi.driver.ISCSI\n    config:\n      target_nmae: x\n",
    )
    .unwrap();
    let out = run(&["serve", "--config", path.to_str().unwrap()]);
    assert_refused(&out, "export.storage.config: unknown field `target_nmae`");
}

#[test]
fn bad_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "port: 70000\n");
    assert_refused(&run(&["serve", "--config", &cfg]), "port: invalid value: integer `70000`");
    // From the flag, clap refuses it with its usage error.
    let out = run(&["serve", "--config", &cfg, "--port", "99999"]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("--port"), "{}", out.stderr);
}

#[test]
fn absolute_file_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "luns:\n  - {name: a, size_mb: 1}\n  - {name: b, file_path: /etc/passwd}\n");
    assert_refused(
        &run(&["serve", "--config", &cfg]),
        "luns[1].file_path: absolute paths are not allowed: /etc/passwd",
    );
    let cfg = config(dir.path(), "");
    assert_refused(
        &run(&["serve", "--config", &cfg, "--lun", "name=x,file_path=../x.img,size_mb=1"]),
        "file_path: '..' is not allowed",
    );
}

#[test]
fn missing_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let out = run(&["serve", "--config", missing.to_str().unwrap()]);
    assert_refused(&out, &format!("{}: read config: ", missing.display()));
}

#[test]
fn help_lists_serve_and_its_flags() {
    let out = run(&["--help"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("serve"), "{}", out.stdout);
    let out = run(&["serve", "--help"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for flag in ["--config", "--host", "--port", "--root-dir", "--reactors", "--cpus", "--poll-mode", "--lun"] {
        assert!(out.stdout.contains(flag), "serve --help lacks {flag}: {}", out.stdout);
    }
}
