//! The README stays true: its shell examples in "Connecting" and "Control plane" (and the JSON
//! request lines) run against a started demo target, and the shipped Jumpstarter exporter
//! example starts as shipped (also when its iSCSI driver is nested under `children:`).
//!
//! The demo's fixed port and root_dir are swapped for free ones so the test can run beside a
//! user's demo; everything else runs exactly as written. Lines that cannot run here are skipped
//! by the list in [`SKIPPED`], each with its reason.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{require_tool, run_with_timeout, Control, Target};

const README: &str = include_str!("../README.md");

/// Example lines that cannot run on a test machine, and why.
const SKIPPED: &[(&str, &str)] = &[
    ("iscsiadm ", "open-iscsi needs root and the kernel initiator"),
    ("qemu-system-x86_64 ", "boots a VM"),
    ("qemu-img ", "needs QEMU's iscsi block module (qemu-block-extra), not a test dependency"),
    ("https://ci.example/", "needs the network"),
    ("https://lab.internal/", "needs the network"),
    ("/dev/sdb", "needs a block device in block_device_allowlist"),
    ("trace-session ", "needs the TSIH of a session still logged in (tests/ops_trace.rs runs it)"),
];

/// The text of `## title` up to the next `## ` heading.
fn section(title: &str) -> &'static str {
    let start = README.find(&format!("\n## {title}\n")).unwrap_or_else(|| panic!("README has no section {title}"));
    let rest = &README[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    &rest[..end]
}

/// The bodies of the fenced blocks of `lang` in `text`.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&fence) {
        let body = &rest[i + fence.len()..];
        let end = body.find("```").expect("unterminated code block");
        out.push(body[..end].to_owned());
        rest = &body[end + 3..];
    }
    out
}

/// The block with the lines of [`SKIPPED`] left out (a `\` continuation belongs to its line).
fn runnable(block: &str) -> String {
    let mut out = String::new();
    let mut logical = String::new();
    for line in block.lines() {
        logical.push_str(line);
        logical.push('\n');
        if line.ends_with('\\') {
            continue;
        }
        if let Some((_, why)) = SKIPPED.iter().find(|(pat, _)| logical.contains(pat)) {
            eprintln!("skipping ({why}): {}", logical.trim());
        } else {
            out.push_str(&logical);
        }
        logical.clear();
    }
    out
}

struct Demo {
    target: Target,
    config: PathBuf,
    port: u16,
}

/// The shipped demo configuration, on a free port and a temporary root_dir.
fn start_demo(work: &Path) -> Demo {
    let shipped = include_str!("../examples/demo.yaml");
    assert!(shipped.contains("root_dir: /tmp/uringtgt-demo\n") && shipped.contains("port: 3260\n"));
    // The harness passes --root-dir and --port 0; the file keeps every other key.
    let target = Target::start(&["--config", &write_config(work, shipped, "/unused", 0).to_string_lossy()]);
    let root = target.root().to_string_lossy().into_owned();
    let config = write_config(work, shipped, &root, target.port);
    Demo { port: target.port, target, config }
}

fn write_config(work: &Path, shipped: &str, root: &str, port: u16) -> PathBuf {
    let text = shipped
        .replace("root_dir: /tmp/uringtgt-demo\n", &format!("root_dir: {root}\n"))
        .replace("port: 3260\n", &format!("port: {port}\n"));
    let path = work.join("demo.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `script` with bash -e in `work`, the demo's paths and port swapped in, `uringtgt` on
/// PATH; panics with the output when it fails.
fn run_script(demo: &Demo, work: &Path, script: &str) -> String {
    let script = script
        .replace("/tmp/uringtgt-demo", &demo.target.root().to_string_lossy())
        .replace("127.0.0.1:3260", &format!("127.0.0.1:{}", demo.port))
        .replace("iqn.2024-06.dev.jumpstarter:demo", &demo.target.iqn)
        .replace("examples/demo.yaml", &demo.config.to_string_lossy());
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_uringtgt")).parent().unwrap().to_owned();
    let path = std::env::join_paths(
        std::iter::once(bin_dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let mut cmd = Command::new("bash");
    cmd.args(["-e", "-o", "pipefail", "-x", "-c", &script]).current_dir(work).env("PATH", path);
    let o = run_with_timeout(&mut cmd, Duration::from_secs(120));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "README example failed: {}\n{script}\n--- stdout ---\n{out}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn gzip_file(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap();
}

#[test]
fn readme_connecting_and_control_plane_examples_run_as_written() {
    for tool in ["socat", "iscsi-ls", "iscsi-inq"] {
        if !require_tool(tool) {
            return;
        }
    }
    let work = tempfile::tempdir().unwrap();
    let demo = start_demo(work.path());
    // The files the examples name: disk.img.gz in the working directory, and one under root_dir
    // for import-image.
    let img: Vec<u8> = (0..(1u32 << 20) + 1000).map(|i| (i / 7) as u8 | 1).collect();
    gzip_file(&work.path().join("disk.img.gz"), &img);
    gzip_file(&demo.target.root().join("disk.img.gz"), &img);

    let connecting = blocks(section("Connecting"), "sh");
    assert!(!connecting.is_empty());
    for b in &connecting {
        let out = run_script(&demo, work.path(), &runnable(b));
        assert!(out.contains(&demo.target.iqn), "{out}");
    }
    assert!(section("Connecting").contains("sanboot iscsi:"), "the iPXE script");
    assert!(section("Connecting").contains("7.8 MiB"), "the iPXE geometry note");

    let control = section("Control plane");
    let sh = blocks(control, "sh");
    assert!(sh.len() >= 3, "{sh:?}");
    let mut outputs = String::new();
    for b in &sh {
        outputs.push_str(&run_script(&demo, work.path(), &runnable(b)));
    }
    // What the README's sample outputs promise.
    assert!(
        outputs.contains(", uploaded\n") && outputs.contains("skipped: identical image already in place"),
        "{outputs}"
    );
    assert!(outputs.contains("name: demo\npath: "), "ctl image-info: {outputs}");

    // The JSON request lines, one by one on one connection.
    let mut c = Control::connect(&demo.target.control_socket());
    for line in blocks(control, "json").iter().flat_map(|b| b.lines().map(str::to_owned).collect::<Vec<_>>()) {
        let r = c.raw(line.as_bytes());
        assert!(r.get("error").is_none() && r.get("result").is_some(), "{line}: {r}");
    }
}

#[test]
fn shipped_exporter_example_starts_and_nested_children_are_found() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/jumpstarter-exporter.yaml");
    // As shipped, with only the root directory and port overridden (by the harness).
    let t = Target::start(&["--config", shipped]);
    let luns = t.control().ok("list_luns", serde_json::Value::Null);
    assert_eq!(luns[0]["name"], "disk0", "{luns}");
    assert_eq!(luns[0]["size"], 64 << 20, "{luns}");
    drop(t);

    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("nested.yaml");
    std::fs::write(
        &nested,
        "apiVersion: jumpstarter.dev/v1alpha1\nkind: ExporterConfig\nexport:\n  dut:\n    \
         type: jumpstarter_driver_composite.driver.Composite\n    children:\n      power:\n        \
         type: jumpstarter_driver_power.driver.MockPower\n      storage:\n        \
         type: jumpstarter_driver_iscsi.driver.ISCSI\n        config:\n          \
         luns:\n            - {name: nested, backing: mem, size_mb: 1}\n",
    )
    .unwrap();
    let t = Target::start(&["--config", nested.to_str().unwrap()]);
    let luns = t.control().ok("list_luns", serde_json::Value::Null);
    assert_eq!(luns[0]["name"], "nested", "{luns}");
}

/// The Security section's "CHAP in a minute" block, pasted into a shell as it stands (on a
/// free port and a temporary directory): the right secret logs in, none is refused.
#[test]
fn readme_chap_in_a_minute_runs_as_written() {
    if !require_tool("iscsi-inq") {
        return;
    }
    let block = blocks(section("Security"), "sh")
        .into_iter()
        .find(|b| b.contains("--chap-user rig"))
        .expect("the CHAP in a minute block");
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let script = block
        .replace("/tmp/uringtgt-chap", &dir.path().to_string_lossy())
        .replace("--port 3260", &format!("--port {port}"))
        .replace("127.0.0.1:3260", &format!("127.0.0.1:{port}"));
    // Not -e: the last line is meant to fail. The target started in the background goes last.
    let script = format!("{script}\nkill $!\n");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_uringtgt")).parent().unwrap().to_owned();
    let path = std::env::join_paths(
        std::iter::once(bin_dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let mut cmd = Command::new("bash");
    cmd.args(["-x", "-c", &script]).env("PATH", path);
    let o = run_with_timeout(&mut cmd, Duration::from_secs(60));
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("Vendor:URINGTGT"), "the login with the secret failed:\n{out}\n{err}");
    let refused = format!("{out}{err}");
    assert_eq!(refused.matches("Authentication failure").count(), 1, "the login without it:\n{refused}");
}
