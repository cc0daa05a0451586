//! Image upload over the real control socket, against the real binary: a gz image uploaded,
//! exported and read back byte-exact through an initiator; an identical upload skipped; bad
//! input refused with the previous image still serving; `uringtgt ctl upload`.

mod common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::initiator::{LoginOptions, Session};
use common::{assert_lun_holds, run_with_timeout, Control, Target};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Application error codes (src/control/rpc.rs).
const INVALID_PARAMS: i64 = -32602;
const BAD_UPLOAD: i64 = -32009;
const DIGEST_MISMATCH: i64 = -32010;
const IMAGE_NOT_FOUND: i64 = -32011;

/// 1 MiB + 1000 bytes: not a whole number of blocks, so a cut tail would show.
const IMAGE_LEN: usize = (1 << 20) + 1000;

/// Data with a zero run in the middle (written as a hole) and a non-zero tail.
fn image(seed: u8) -> Vec<u8> {
    let mut v: Vec<u8> = (0..IMAGE_LEN).map(|i| ((i / 7) as u8).wrapping_mul(13).wrapping_add(seed) | 1).collect();
    v[200_000..400_000].fill(0);
    v
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn upload_params(name: &str, size: usize, compression: &str, sha256: Option<&str>) -> Value {
    let mut p = json!({"name": name, "size": size, "compression": compression});
    if let Some(d) = sha256 {
        p["sha256"] = json!(d);
    }
    p
}

fn error_code(resp: &Value) -> i64 {
    assert!(resp["error"]["message"].is_string(), "{resp}");
    resp["error"]["code"].as_i64().unwrap()
}

#[test]
fn gz_upload_reads_back_exact_and_repeat_is_skipped() {
    let t = Target::start(&["--reactors", "2"]);
    let mut c = t.control();
    assert_eq!(error_code(&c.call("image_info", json!({"name": "disk"}))), IMAGE_NOT_FOUND);
    let img = image(1);
    let gz = gzip(&img);
    let digest = sha256_hex(&img);
    let r = c.upload(upload_params("disk", gz.len(), "gz", Some(&digest)), &gz);
    let res = &r["result"];
    assert_eq!(res["skipped"], false, "{r}");
    assert_eq!((res["bytes"].clone(), res["sha256"].clone()), (json!(IMAGE_LEN), json!(digest)));
    assert_eq!(res["iqn"], json!(t.iqn));
    assert_eq!(res["address"], json!(t.addr()));
    let lun = res["lun_id"].as_u64().unwrap() as u16;
    let info = c.ok("image_info", json!({"name": "disk"}));
    assert_eq!(info["sha256"], json!(digest));
    assert_eq!(info["size"], json!((IMAGE_LEN as u64).next_multiple_of(512)));

    let mut s = t.login(&LoginOptions::default());
    assert_lun_holds(&mut s, lun, &img);

    // The same bytes again: drained, not written; the LUN is left alone.
    let start = Instant::now();
    let r = c.upload(upload_params("disk", gz.len(), "gz", Some(&digest)), &gz);
    assert_eq!(r["result"]["skipped"], true, "{r}");
    // A conditional upload: no bytes at all.
    let r = c.upload(upload_params("disk", 0, "gz", Some(&digest)), &[]);
    assert_eq!(r["result"]["skipped"], true, "{r}");
    assert_eq!(r["result"]["lun_id"], json!(lun));
    assert!(start.elapsed() < Duration::from_secs(2), "skips took {:?}", start.elapsed());
    // No unit attention: the very same LUN still serves.
    let r = s.test_unit_ready(lun).unwrap();
    assert!(r.is_good(), "{r:?}");

    // force: written again, and a new image replaces the old one under the same LUN id.
    let img2 = image(2);
    let r = c.upload(json!({"name": "disk", "size": img2.len(), "compression": "none", "force": true}), &img2);
    assert_eq!(r["result"]["skipped"], false, "{r}");
    assert_eq!(r["result"]["lun_id"], json!(lun));
    assert_lun_holds(&mut s, lun, &img2);
    // A conditional upload of a digest no longer in place is refused.
    assert_eq!(error_code(&c.upload(upload_params("disk", 0, "gz", Some(&digest)), &[])), DIGEST_MISMATCH);
    // The connection still serves requests.
    assert_eq!(c.ok("list_luns", Value::Null).as_array().unwrap().len(), 1);
}

#[test]
fn bad_uploads_leave_the_old_image_serving() {
    let t = Target::start(&["--reactors", "2"]);
    let mut c = t.control();
    let old = image(3);
    let old_digest = sha256_hex(&old);
    let r = c.upload(upload_params("disk", old.len(), "none", Some(&old_digest)), &old);
    let lun = r["result"]["lun_id"].as_u64().unwrap_or_else(|| panic!("{r}")) as u16;
    let mut s = t.login(&LoginOptions::default());
    assert_lun_holds(&mut s, lun, &old);
    let new = image(4);
    let gz = gzip(&new);
    let still_old = |s: &mut Session, c: &mut Control, what: &str| {
        assert_lun_holds(s, lun, &old);
        assert_eq!(c.ok("image_info", json!({"name": "disk"}))["sha256"], json!(old_digest), "after {what}");
        let left: Vec<String> = std::fs::read_dir(t.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "temp files left after {what}: {left:?}");
    };

    let half = &gz[..gz.len() / 2];
    let r = c.upload(upload_params("disk", half.len(), "gz", None), half);
    assert_eq!(error_code(&r), BAD_UPLOAD, "truncated gz: {r}");
    still_old(&mut s, &mut c, "a truncated gz");

    let mut corrupt = gz.clone();
    corrupt[gz.len() / 2..gz.len() / 2 + 64].fill(0x55);
    let r = c.upload(upload_params("disk", corrupt.len(), "gz", None), &corrupt);
    assert_eq!(error_code(&r), BAD_UPLOAD, "corrupt gz: {r}");
    still_old(&mut s, &mut c, "a corrupt gz");

    let wrong = sha256_hex(b"something else");
    let r = c.upload(upload_params("disk", gz.len(), "gz", Some(&wrong)), &gz);
    assert_eq!(error_code(&r), DIGEST_MISMATCH, "{r}");
    still_old(&mut s, &mut c, "a digest mismatch");

    for bad in ["a/b", "../disk", ".hidden"] {
        let r = c.upload(upload_params(bad, new.len(), "none", None), &new);
        assert_eq!(error_code(&r), INVALID_PARAMS, "name {bad:?}: {r}");
    }
    let r = c.upload(json!({"name": "disk", "size": new.len(), "compression": "lz4"}), &new);
    assert_eq!(error_code(&r), INVALID_PARAMS, "{r}");
    // The bytes of refused requests were drained: the connection is still in step.
    still_old(&mut s, &mut c, "bad names");

    // Fewer bytes than announced, then the client goes away.
    let mut d = t.control();
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": "upload_image",
                     "params": upload_params("disk", new.len(), "none", None)});
    d.send(format!("{req}\n").as_bytes());
    d.send(&new[..new.len() / 2]);
    d.shutdown_write();
    let r = d.read_response();
    assert_eq!(error_code(&r), BAD_UPLOAD, "short upload: {r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("announced"), "{r}");
    still_old(&mut s, &mut c, "a short upload");

    // Bytes beyond the compressed stream, inside the announced size.
    let mut long = gz.clone();
    long.extend_from_slice(b"junk");
    let r = c.upload(upload_params("disk", long.len(), "gz", None), &long);
    assert_eq!(error_code(&r), BAD_UPLOAD, "trailing data: {r}");
    still_old(&mut s, &mut c, "trailing data");
}

#[test]
fn import_image_from_a_server_local_file() {
    let t = Target::start(&["--reactors", "1"]);
    let mut c = t.control();
    let img = image(5);
    let src = t.root().join("incoming.img.gz");
    std::fs::write(&src, gzip(&img)).unwrap();
    let r = c.ok("import_image", json!({"name": "local", "src_path": src, "sha256": sha256_hex(&img)}));
    assert_eq!((r["skipped"].clone(), r["bytes"].clone()), (json!(false), json!(IMAGE_LEN)));
    let mut s = t.login(&LoginOptions::default());
    assert_lun_holds(&mut s, r["lun_id"].as_u64().unwrap() as u16, &img);
    let r = c.ok("import_image", json!({"name": "local", "src_path": src, "sha256": sha256_hex(&img)}));
    assert_eq!(r["skipped"], true);
    assert_eq!(error_code(&c.call("import_image", json!({"name": "x", "src_path": "missing.gz"}))), -32003);
}

/// `uringtgt ctl upload FILE EXTRA...` against `t`; asserts success, returns stdout.
fn ctl_upload(t: &Target, file: &std::path::Path, extra: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
    cmd.arg("ctl").arg("--socket").arg(t.control_socket()).arg("upload").arg(file).args(extra);
    let o = run_with_timeout(&mut cmd, Duration::from_secs(60));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{cmd:?}: {}\n{out}", String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn ctl_upload_prints_the_lun_and_skips_a_repeat() {
    let t = Target::start(&["--reactors", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let img = image(6);
    let file = dir.path().join("fw.img.gz");
    std::fs::write(&file, gzip(&img)).unwrap();
    let ctl = |extra: &[&str]| ctl_upload(&t, &file, extra);
    let out = ctl(&[]);
    let first = out.lines().next().unwrap();
    assert_eq!(first, format!("{} {} 0", t.addr(), t.iqn), "{out}");
    assert!(out.contains("fw: 1049576 bytes") && out.contains("uploaded"), "{out}");
    let mut s = t.login(&LoginOptions::default());
    assert_lun_holds(&mut s, 0, &img);
    let start = Instant::now();
    let out = ctl(&[]);
    assert!(out.contains("skipped"), "{out}");
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    let out = ctl(&["--force", "--name", "fw2", "--read-only"]);
    assert!(out.contains("uploaded") && out.starts_with(&format!("{} {} 1", t.addr(), t.iqn)), "{out}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uringtgt"));
    cmd.arg("ctl").arg("--socket").arg(t.control_socket()).args(["upload", "--name", "a/b"]).arg(&file);
    let o = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(!o.status.success());
}

#[test]
fn ctl_upload_of_raw_files_skips_only_an_identical_image() {
    // A raw file is hashed locally only when the target holds a same-named image of its size;
    // every other upload streams at once. Each outcome must still be right.
    let t = Target::start(&["--reactors", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("raw.img");
    let ctl = |extra: &[&str]| ctl_upload(&t, &file, extra);
    let first = image(7);
    std::fs::write(&file, &first).unwrap();
    let out = ctl(&[]);
    assert!(out.contains("uploaded") && out.contains(&sha256_hex(&first)), "first upload: {out}");
    assert!(ctl(&[]).contains("skipped"), "identical repeat");
    // Same size, other bytes: hashed, found different, sent and verified.
    let mut changed = first.clone();
    changed[12345] ^= 0xFF;
    std::fs::write(&file, &changed).unwrap();
    let out = ctl(&[]);
    assert!(out.contains("uploaded") && out.contains(&sha256_hex(&changed)), "same size, changed: {out}");
    // Another size: streamed without a local pass.
    let longer = [changed.as_slice(), &image(8)[..4096]].concat();
    std::fs::write(&file, &longer).unwrap();
    let out = ctl(&[]);
    assert!(out.contains("uploaded") && out.contains(&sha256_hex(&longer)), "another size: {out}");
    // --force sends an identical image again.
    assert!(ctl(&["--force"]).contains("uploaded"), "forced repeat");
    let mut s = t.login(&LoginOptions::default());
    assert_lun_holds(&mut s, 0, &longer);
}
