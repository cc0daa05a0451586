//! Item 11 of issue 13: dist/uringtgt.service passes `systemd-analyze verify` and keeps its
//! `systemd-analyze security` exposure score low, with the settings the README promises.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn unit_text() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/uringtgt.service")).unwrap()
}

/// The unit, with ExecStart pointing at the binary under test (verify checks that it exists),
/// written into `dir`.
fn unit_in(dir: &Path) -> std::path::PathBuf {
    let text = unit_text().replace("/usr/local/bin/uringtgt", env!("CARGO_BIN_EXE_uringtgt"));
    let path = dir.join("uringtgt.service");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !common::require_tool("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_in(dir.path());
    let out =
        common::run_with_timeout(Command::new("systemd-analyze").arg("verify").arg(&unit), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed: {stderr}");
    // verify also reports other units it loads; none of its complaints may name ours.
    assert!(!stderr.contains("uringtgt.service"), "{stderr}");
}

#[test]
fn the_unit_scores_at_most_2_in_systemd_analyze_security() {
    if !common::require_tool("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_in(dir.path());
    let out = common::run_with_timeout(
        Command::new("systemd-analyze").args(["security", "--offline=true", "--threshold=20"]).arg(&unit),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.contains("Overall exposure level")).expect("an overall score");
    let score: f64 = line.split(':').nth(1).and_then(|r| r.split_whitespace().next()).unwrap().parse().unwrap();
    assert!(score <= 2.0, "exposure {score} (README says 1.5): {line}");
    // The settings the README names are in effect, per systemd's own reading of the unit.
    for (setting, ok) in [
        ("NoNewPrivileges=", "✓"),
        ("PrivateDevices=", "✓"),
        ("ProtectSystem=", "✓"),
        ("RestrictNamespaces=~", "✓"),
        ("SystemCallArchitectures=", "✓"),
        ("User=/DynamicUser=", "✓"),
    ] {
        assert!(stdout.lines().any(|l| l.starts_with(ok) && l.contains(setting)), "{setting} not ✓:\n{stdout}");
    }
}

#[test]
fn the_unit_keeps_io_uring_and_binds_port_3260_unprivileged() {
    let text = unit_text();
    let values = |key: &str| -> Vec<String> {
        text.lines().filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).map(str::to_owned).collect()
    };
    assert_eq!(values("AmbientCapabilities"), ["CAP_NET_BIND_SERVICE"]);
    assert_eq!(values("CapabilityBoundingSet"), ["CAP_NET_BIND_SERVICE"]);
    assert_eq!(values("User"), ["uringtgt"]);
    assert_eq!(values("StateDirectory"), ["iscsi"]);
    assert_eq!(values("ReadWritePaths"), ["/var/lib/iscsi"]);
    assert_eq!(values("Restart"), ["on-failure"]);
    assert_eq!(values("RestrictAddressFamilies"), ["AF_INET AF_INET6 AF_UNIX"]);
    let filters = values("SystemCallFilter");
    let allow = filters.iter().find(|f| !f.starts_with('~')).expect("an allow list");
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allow.split_whitespace().any(|w| w == call), "{call} not allowed: {allow}");
    }
    // The deny list must not take back what the reactors use (core pinning is @resources).
    let deny = filters.iter().find(|f| f.starts_with('~')).expect("a deny list");
    assert!(!deny.contains("@resources") && !deny.contains("io_uring"), "{deny}");
    // The sysusers file creates the unit's user, with root_dir as its home.
    let sysusers = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/uringtgt.sysusers")).unwrap();
    let user = sysusers.lines().find(|l| l.starts_with("u ")).expect("a u line");
    assert!(user.split_whitespace().nth(1) == Some("uringtgt") && user.ends_with("/var/lib/iscsi"), "{user}");
}
