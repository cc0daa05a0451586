//! Issue 13 item 7 against the real binary: the addresses a device can be handed. On a specific
//! bind, `get_host`, `get_portals` and SendTargets name that address; on a wildcard bind
//! (`0.0.0.0`, inside a network namespace of our own with a second address and a default
//! route) they name the default-route interface's address (127.0.0.1 without a default route),
//! never `0.0.0.0`, and `get_portals` and SendTargets list every interface's address.

mod common;

use std::process::Command;
use std::time::Duration;

use common::initiator::{LoginOptions, Session};
use common::{require_tool, run_with_timeout, Target};
use serde_json::{json, Value};

#[test]
fn a_specific_bind_reports_and_sends_its_own_address() {
    let t = Target::start(&["--reactors", "1", "--lun", "name=m,backing=mem,size_mb=1"]);
    let mut c = t.control();
    assert_eq!(c.ok("get_host", Value::Null), json!("127.0.0.1"));
    assert_eq!(c.ok("get_portals", Value::Null), json!([t.addr()]));
    let mut d = Session::login_discovery(&t.addr(), &LoginOptions::default()).expect("discovery login");
    let targets = d.send_targets().expect("SendTargets");
    assert_eq!(targets, vec![(t.iqn.clone(), vec![format!("{},1", t.addr())])]);
    d.logout().unwrap();
    let mut s = t.login(&LoginOptions::default());
    let sessions = c.ok("list_sessions", Value::Null);
    assert_eq!(sessions[0]["portal"], json!(t.addr()), "{sessions}");
    s.test_unit_ready(0).unwrap();
    s.logout().unwrap();
    // Where it listens is logged at start.
    assert!(t.stderr_text().contains(&format!("portal addresses: {}", t.addr())), "{}", t.stderr_text());
}

/// Runs the target on `0.0.0.0` in a new user and network namespace whose loopback also holds
/// 10.9.0.1/24 (and, with `route`, a default route through it), and reports what `ctl` and
/// `iscsi-ls` (SendTargets) see, as `key=value` lines.
fn wildcard_in_netns(route: bool) -> Vec<(String, String)> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("boot.img");
    std::fs::write(&img, vec![7u8; 4096]).unwrap();
    let script = r#"
set -e
ip link set lo up
ip addr add 10.9.0.1/24 dev lo
if [ "$ROUTE" = 1 ]; then ip route add default via 10.9.0.2 dev lo; fi
"$BIN" serve --host 0.0.0.0 --port 0 --root-dir "$ROOT" --reactors 1 --target-name t1 \
  --lun name=m,backing=mem,size_mb=1 >"$ROOT/out" 2>"$ROOT/err" &
pid=$!
i=0
until grep -q listening "$ROOT/out" 2>/dev/null; do i=$((i+1)); [ $i -lt 200 ] || exit 9; sleep 0.05; done
S="--socket=$ROOT/uringtgt.sock"
echo "host=$("$BIN" ctl $S get-host)"
"$BIN" ctl $S get-portals | sed 's/^/portal=/'
port=$("$BIN" ctl $S get-port)
iscsi-ls iscsi://127.0.0.1:$port | sed 's/^/ls=/'
"$BIN" ctl $S serve "$IMG" | head -1 | sed 's/^/serve=/'
grep -o 'portal addresses: .*' "$ROOT/err" | sed 's/^/log=/'
kill $pid
wait $pid || true
"#;
    let mut cmd = Command::new("unshare");
    cmd.args(["-rn", "sh", "-c", script])
        .env("BIN", env!("CARGO_BIN_EXE_uringtgt"))
        .env("ROOT", dir.path())
        .env("IMG", &img)
        .env("ROUTE", if route { "1" } else { "0" });
    let o = run_with_timeout(&mut cmd, Duration::from_secs(60));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = std::fs::read_to_string(dir.path().join("err")).unwrap_or_default();
    assert!(o.status.success(), "{}\n{out}\n{}\n--- target ---\n{err}", o.status, String::from_utf8_lossy(&o.stderr));
    out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

fn values<'a>(kv: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    kv.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

#[test]
fn a_wildcard_bind_reports_the_default_route_address_and_lists_every_portal() {
    if !require_tool("unshare") || !require_tool("ip") || !require_tool("iscsi-ls") {
        return;
    }
    let kv = wildcard_in_netns(true);
    assert_eq!(values(&kv, "host"), ["10.9.0.1"], "{kv:?}");
    let portals = values(&kv, "portal");
    assert_eq!(portals.len(), 2, "{kv:?}");
    let port = portals[0].rsplit_once(':').unwrap().1;
    assert_eq!(portals, [format!("10.9.0.1:{port}"), format!("127.0.0.1:{port}")], "{kv:?}");
    // SendTargets (through libiscsi): one TargetAddress per portal, never 0.0.0.0.
    let ls = values(&kv, "ls");
    for p in &portals {
        assert!(ls.iter().any(|l| l.contains(&format!("Portal:{p},1"))), "{p} not in {ls:?}");
    }
    assert!(ls.iter().all(|l| !l.contains("0.0.0.0")), "{ls:?}");
    assert_eq!(values(&kv, "serve"), [format!("10.9.0.1:{port} iqn.2024-06.dev.jumpstarter:t1")], "{kv:?}");
    let log = values(&kv, "log");
    assert_eq!(log, [format!("portal addresses: 10.9.0.1:{port} 127.0.0.1:{port}")], "{kv:?}");

    // No default route: 127.0.0.1 is what a script gets.
    let kv = wildcard_in_netns(false);
    assert_eq!(values(&kv, "host"), ["127.0.0.1"], "{kv:?}");
    assert_eq!(values(&kv, "portal")[0].rsplit_once(':').unwrap().0, "127.0.0.1", "{kv:?}");
}
