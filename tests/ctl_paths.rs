//! Issue 13's path, `ctl` and message items against the real binary: `import_image` confined to
//! root_dir and `import_dirs`; relative paths in a config taken against its directory, so
//! `ctl --config` works from anywhere; `ctl image-info` and `ctl import-image`; one-line errors
//! that name the `--lun` flag and never double a LUN prefix; `--reactors` with `--cpus`; the
//! ISID printed alike in the log and `ctl sessions`; the INQUIRY product revision.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::initiator::LoginOptions;
use common::{parse_ready_line, run_with_timeout, Target};
use serde_json::json;

const PATH_REJECTED: i64 = -32003;

fn uringtgt(args: &[&str], cwd: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
    cmd.args(args).current_dir(cwd);
    run_with_timeout(&mut cmd, Duration::from_secs(60))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok_stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}\n{}\n{}", o.status, text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

/// A failure: exit status 1 and one `uringtgt: ...` line on stderr, which is returned.
fn one_line_failure(o: &Output) -> String {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with("uringtgt: ") && err.lines().count() == 1, "{err:?}");
    err
}

/// `uringtgt serve ARGS` in `cwd`, until its readiness line; stderr goes to `log`.
fn serve(args: &[&str], cwd: &Path, log: &Path) -> (Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_uringtgt"))
        .arg("serve")
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap_or_else(|| Ok(String::new())).unwrap();
    let Some((port, _)) = parse_ready_line(&line) else {
        let _ = child.kill();
        panic!("not ready: {line:?}\n{}", std::fs::read_to_string(log).unwrap_or_default());
    };
    std::thread::spawn(move || for _ in lines {});
    (child, port)
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
}

#[test]
fn import_image_reads_only_root_dir_and_import_dirs() {
    let allowed = tempfile::tempdir().unwrap();
    let cfg = allowed.path().join("t.yaml");
    std::fs::write(&cfg, format!("import_dirs: [{}]\n", allowed.path().join("imports").display())).unwrap();
    std::fs::create_dir(allowed.path().join("imports")).unwrap();
    let t = Target::start(&["--reactors", "1", "--config", cfg.to_str().unwrap()]);
    let mut c = t.control();
    for src in ["/etc/hostname", "/etc/passwd", "../../../../etc/hostname"] {
        let r = c.call("import_image", json!({"name": "leak", "src_path": src}));
        assert_eq!(r["error"]["code"], json!(PATH_REJECTED), "{src}: {r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("outside root_dir and import_dirs"), "{r}");
    }
    // A symlink inside root_dir that leads out is refused as well.
    std::os::unix::fs::symlink("/etc/hostname", t.root().join("link.img")).unwrap();
    let r = c.call("import_image", json!({"name": "leak", "src_path": "link.img"}));
    assert_eq!(r["error"]["code"], json!(PATH_REJECTED), "{r}");
    assert!(!t.root().join("leak.img").exists());

    // An allowed directory and root_dir itself work, through ctl import-image.
    let img: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 | 1).collect();
    let src = allowed.path().join("imports/base.img");
    std::fs::write(&src, &img).unwrap();
    let out = ok_stdout(&uringtgt(
        &["ctl", "--socket", t.control_socket().to_str().unwrap(), "import-image", src.to_str().unwrap()],
        allowed.path(),
    ));
    assert!(out.ends_with(", uploaded\n") && out.contains("base: 5000 bytes"), "{out}");
    std::fs::write(t.root().join("local.raw"), &img).unwrap();
    let out = ok_stdout(&uringtgt(
        &["ctl", "--socket", t.control_socket().to_str().unwrap(), "import-image", "local.raw", "--name", "dut2"],
        allowed.path(),
    ));
    assert!(out.contains("dut2: 5000 bytes"), "{out}");
    // Imported again unchanged: skipped.
    let out = ok_stdout(&uringtgt(
        &["ctl", "--socket", t.control_socket().to_str().unwrap(), "import-image", "local.raw", "--name", "dut2"],
        allowed.path(),
    ));
    assert!(out.ends_with("skipped: identical image already in place\n"), "{out}");

    // ctl image-info: lines, and --json.
    let sock = t.control_socket();
    let out = ok_stdout(&uringtgt(&["ctl", "--socket", sock.to_str().unwrap(), "image-info", "dut2"], allowed.path()));
    assert!(
        out.starts_with("name: dut2\npath: ") && out.contains("\nsize: 5120\nimage_bytes: 5000\nsha256: "),
        "{out}"
    );
    let out = ok_stdout(&uringtgt(
        &["ctl", "--socket", sock.to_str().unwrap(), "image-info", "dut2", "--json"],
        allowed.path(),
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["size"].clone(), v["image_bytes"].clone()), (json!(5120), json!(5000)), "{v}");
    let o = uringtgt(&["ctl", "--socket", sock.to_str().unwrap(), "image-info", "nope"], allowed.path());
    assert!(one_line_failure(&o).contains("no image named \"nope\""));
}

#[test]
fn relative_paths_are_taken_against_the_config_files_directory() {
    let top = tempfile::tempdir().unwrap();
    let conf_dir = top.path().join("etc");
    let elsewhere = top.path().join("elsewhere");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(
        conf_dir.join("t.yaml"),
        "root_dir: imgs\ncontrol_socket: run/ctl.sock\nhost: 127.0.0.1\nport: 0\nreactors: 1\n\
         luns:\n  - {name: d, size_mb: 1}\n",
    )
    .unwrap();
    let log = top.path().join("serve.log");
    // Started from another directory, with a relative --config.
    let (child, _) = serve(&["--config", "../etc/t.yaml"], &elsewhere, &log);
    let root = conf_dir.join("imgs");
    assert!(root.join("d.img").is_file(), "image created under the config's directory");
    assert!(conf_dir.join("run/ctl.sock").exists());
    assert!(!elsewhere.join("imgs").exists());
    let logged = std::fs::read_to_string(&log).unwrap();
    let want = format!("root_dir {}, control socket {}", root.display(), conf_dir.join("run/ctl.sock").display());
    assert!(logged.contains(&want), "{logged}");

    // ctl --config from a third directory finds the socket.
    let out = ok_stdout(&uringtgt(&["ctl", "--config", "etc/t.yaml", "list-luns"], top.path()));
    assert!(out.lines().nth(1).is_some_and(|l| l.contains(" d ") && l.contains(&root.display().to_string())), "{out}");
    let out =
        ok_stdout(&uringtgt(&["ctl", "--config", conf_dir.join("t.yaml").to_str().unwrap(), "get-port"], &elsewhere));
    assert!(out.trim().parse::<u16>().is_ok_and(|p| p > 0), "{out}");
    stop(child);

    // A relative --root-dir flag is the working directory's, printed absolute.
    let log2 = top.path().join("serve2.log");
    let (child, _) =
        serve(&["--host", "127.0.0.1", "--port", "0", "--reactors", "1", "--root-dir", "flagroot"], &elsewhere, &log2);
    let logged = std::fs::read_to_string(&log2).unwrap();
    assert!(logged.contains(&format!("root_dir {}", elsewhere.join("flagroot").display())), "{logged}");
    stop(child);
}

#[test]
fn command_line_errors_are_one_line_and_name_their_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let base = ["serve", "--host", "127.0.0.1", "--port", "0", "--root-dir", d];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        one_line_failure(&uringtgt(&args, dir.path()))
    };
    let err = run(&["--lun", "name=a,size_mb=1", "--lun", "name=a,size_mb=2"]);
    assert_eq!(
        err.trim_end(),
        "uringtgt: --lun name=a,size_mb=2: name: \"a\" is already the name of --lun name=a,size_mb=1"
    );
    assert!(!err.contains("luns["), "{err}");
    let err =
        run(&["--lun", "name=b,lun_id=3,backing=mem,size_mb=1", "--lun", "name=c,lun_id=3,backing=mem,size_mb=1"]);
    assert!(
        err.contains("--lun name=c,lun_id=3,backing=mem,size_mb=1: lun_id: 3 is already the lun_id of --lun name=b"),
        "{err}"
    );

    let err = run(&["--reactors", "2", "--cpus", "0"]);
    assert!(err.starts_with("uringtgt: --reactors: cannot be combined with --cpus"), "{err}");

    // A LUN that cannot open: its name once, not `LUN x: lun x: ...`.
    let err = run(&["--lun", "name=missing"]);
    assert!(err.contains("lun missing: ") && !err.to_lowercase().contains("lun missing: lun missing"), "{err}");
    std::fs::write(dir.path().join("odd.img"), vec![1u8; 1000]).unwrap();
    let err = run(&["--lun", "name=odd"]);
    assert_eq!(err.to_lowercase().matches("lun odd").count(), 1, "{err}");
}

#[test]
fn isid_prints_alike_and_inquiry_revision_is_clean() {
    let t = Target::start(&["--reactors", "1", "--lun", "name=m,backing=mem,size_mb=1"]);
    let isid = [0x80, 0x12, 0x34, 0x56, 0x78, 0x9a];
    let mut s = t.login(&LoginOptions { isid: Some(isid), ..Default::default() });
    let sessions =
        ok_stdout(&uringtgt(&["ctl", "--socket", t.control_socket().to_str().unwrap(), "sessions"], t.root()));
    assert!(sessions.contains("80123456789a"), "{sessions}");
    assert!(sessions.lines().next().unwrap().contains("PORTAL"), "{sessions}");
    assert!(sessions.contains(&t.addr()), "the portal column shows the address connected to: {sessions}");
    let log = t.stderr_text();
    assert!(log.contains("ISID 80123456789a"), "{log}");

    let r = s.inquiry(0, None, 96).unwrap();
    assert!(r.is_good(), "{r:?}");
    let rev = &r.data[32..36];
    let version = env!("CARGO_PKG_VERSION");
    let want = format!("{:<4}", version[..version.len().min(4)].trim_end_matches('.'));
    assert_eq!(text(rev), want, "{:?}", text(rev));
    assert!(!text(rev).trim_end().ends_with('.'), "{:?}", text(rev));
    s.logout().unwrap();
}
