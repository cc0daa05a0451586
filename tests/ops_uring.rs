//! Item 12 of issue 13: where io_uring is switched off, the target says which cause it is and
//! the fix; the shipped seccomp profile allows the io_uring calls.

mod common;

use common::initiator::{LoginOptions, Session};
use common::Target;
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// Bytes of a recognisable pattern.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8).collect()
}

/// Waits until the session's reactor serves LUN `lun` again after `add_lun`.
fn wait_for_lun(s: &mut Session, lun: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !common::past_ua(|| s.test_unit_ready(lun).unwrap()).is_good() {
        assert!(Instant::now() < deadline, "LUN {lun} never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn file_luns_go_through_fixed_buffers_and_a_new_image_reads_its_own_bytes() {
    let t = Target::start(&["--lun", "name=disk,size_mb=4"]);
    let lun = t.lun("disk");
    let mut s = t.login(&LoginOptions::default());
    // 4 KiB and 64 KiB buffers are registered; 512 KiB ones are larger than the pool registers.
    for (lba, len, seed) in [(0u32, 4096usize, 1u8), (64, 64 << 10, 2), (1024, 512 << 10, 3), (8, 4096, 4)] {
        let data = pattern(seed, len);
        assert!(s.write10(lun, lba, &data, 512).unwrap().is_good(), "write at {lba}");
        let r = s.read10(lun, lba, (len / 512) as u16, 512).unwrap();
        assert!(r.is_good() && r.data == data, "read at {lba} differs from what was written");
    }
    let stats = t.control().ok("get_stats", json!(null));
    let fixed: Vec<u64> = stats["reactors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["buffers"]["fixed_bytes"].as_u64().expect("fixed_bytes"))
        .collect();
    assert!(fixed.iter().all(|&b| b <= 8 << 20), "over the fixed-buffer cap: {fixed:?}");
    if !t.stderr_text().contains("fixed buffers unavailable") {
        assert!(fixed.iter().sum::<u64>() >= 4096, "no buffer was registered: {stats}");
    }
    // The LUN's file leaves the ring's fixed-file table with it: the image added under the
    // same LUN number (and likely the same descriptor number) serves its own bytes.
    let other = pattern(9, 1 << 20);
    std::fs::write(t.root().join("other.img"), &other).unwrap();
    let mut c = t.control();
    c.ok("remove_lun", json!({"name": "disk"}));
    c.ok("add_lun", json!({"name": "other", "file_path": "other.img", "lun_id": lun}));
    wait_for_lun(&mut s, lun);
    common::assert_lun_holds(&mut s, lun, &other);
    let data = pattern(5, 8192);
    assert!(s.write10(lun, 16, &data, 512).unwrap().is_good());
    let on_disk = std::fs::read(t.root().join("other.img")).unwrap();
    assert!(on_disk[16 * 512..16 * 512 + 8192] == data[..], "the write reached another file");
}
