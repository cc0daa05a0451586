//! Item 12 of issue 13: where io_uring is switched off, the target says which cause it is and
//! the fix; the shipped seccomp profile allows the io_uring calls.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

/// A classic-BPF seccomp filter that makes io_uring_setup fail with EPERM, as Docker's and
/// containerd's default profiles do, and allows everything else.
fn deny_io_uring_setup() -> [libc::sock_filter; 4] {
    let stmt = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let nr_offset = 0; // offsetof(struct seccomp_data, nr)
    [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, nr_offset),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

#[test]
fn a_seccomp_filter_is_named_with_the_profile_fix() {
    let root = tempfile::tempdir().unwrap();
    let filter = deny_io_uring_setup();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
    cmd.args(["serve", "--host", "127.0.0.1", "--port", "0", "--root-dir"]).arg(root.path());
    // SAFETY: only async-signal-safe calls (prctl) between fork and exec; `prog` points at the
    // closure's own copy of the filter, alive during both calls.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = common::run_with_timeout(&mut cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr.lines().last().unwrap_or_default();
    assert!(line.starts_with("uringtgt: cannot create an io_uring: Operation not permitted"), "{stderr}");
    assert!(line.contains("a seccomp filter denies the io_uring system calls (Seccomp: 2"), "{stderr}");
    assert!(line.contains("--security-opt seccomp=dist/seccomp-uringtgt.json"), "{stderr}");
    // Nothing was started: no control socket left behind.
    assert!(!root.path().join("uringtgt.sock").exists());
}

#[test]
fn the_probe_checks_the_reactors_ops_at_start() {
    let t = common::Target::start(&["--log-level", "uringtgt=debug", "--lun", "name=r,backing=mem,size_mb=1"]);
    let log = t.stderr_text();
    assert!(log.contains("io_uring: the kernel supports all 7 operations the reactors use"), "{log}");
}

#[test]
fn the_seccomp_profile_is_the_default_plus_io_uring() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/seccomp-uringtgt.json")).unwrap();
    let p: serde_json::Value = serde_json::from_str(&text).expect("dist/seccomp-uringtgt.json is JSON");
    // Deny by default with EPERM, like the default profile.
    assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(p["defaultErrnoRet"], 1);
    assert!(p["archMap"].as_array().unwrap().iter().any(|a| a["architecture"] == "SCMP_ARCH_X86_64"));
    let groups = p["syscalls"].as_array().unwrap();
    // Allowed unconditionally: no argument filter, no capability or architecture condition.
    let allowed = |name: &str| {
        groups.iter().any(|g| {
            g["action"] == "SCMP_ACT_ALLOW"
                && g.get("args").is_none()
                && g.get("includes").is_none()
                && g.get("excludes").is_none()
                && g["names"].as_array().unwrap().iter().any(|n| n == name)
        })
    };
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed(call), "{call} is not allowed");
    }
    // What the target itself needs beyond io_uring, and what any program needs.
    for call in ["eventfd2", "accept4", "sendmsg", "openat", "fdatasync", "exit_group", "rt_sigtimedwait"] {
        assert!(allowed(call), "{call} is missing");
    }
    // Still the default's restrictions: namespaces and mounts need CAP_SYS_ADMIN.
    assert!(!allowed("mount") && !allowed("unshare") && !allowed("setns"));
    assert!(!allowed("socket"), "socket is allowed only with an argument filter (no AF_VSOCK)");
}
