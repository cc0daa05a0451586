//! The reactor's buffer budget (`limits.buffer_memory_mib`) on the real binary: with the
//! budget held by one session's 16 MiB READ that its initiator does not read, another
//! session's READ waits (and completes, with the right data, once the memory comes back), its
//! WRITE with immediate data is answered TASK SET FULL with nothing stored, `get_stats` shows
//! it, and every byte is given back at the end. A session that asks for the whole budget and
//! reads none of its data holds only its share (a quarter), and other sessions go on.

mod common;

use common::initiator::{LoginOptions, Session};
use common::Target;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const BS: u32 = 512;
const MIB: u64 = 1 << 20;
const TASK_SET_FULL: u8 = 0x28;

fn cdb10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = op;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// The one reactor's `buffers` object from `get_stats`.
fn buffers(t: &Target) -> Value {
    let stats = t.control().ok("get_stats", json!(null));
    stats["reactors"][0]["buffers"].clone()
}

fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

fn login(t: &Target) -> Session {
    let mut s = t.login(&LoginOptions::default());
    s.test_unit_ready(0).unwrap().check().unwrap();
    s
}

/// One reactor with a `mib` MiB buffer budget and a 64 MiB file LUN.
fn start(mib: u32) -> (Target, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("budget.yaml");
    std::fs::write(&cfg, format!("reactors: 1\nlimits:\n  buffer_memory_mib: {mib}\n")).unwrap();
    let t = Target::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--lun",
        "name=disk0,file_path=disk0.img,size_mb=64,lun_id=0",
    ]);
    (t, dir)
}

#[test]
fn commands_past_the_buffer_budget_wait_or_get_task_set_full_and_memory_comes_back() {
    let (t, _cfg) = start(16);
    let b0 = buffers(&t);
    assert_eq!(b0["limit_bytes"], 16 * MIB, "{b0}");
    let mut a = login(&t);
    let mut b = login(&t);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    b.write10(0, 8, &pattern, BS).unwrap().check().unwrap();

    // A's 16 MiB READ takes the whole budget; A does not read its Data-In, so the buffer
    // stays held while the target's sends wait for the socket.
    let big = a.submit(0, &cdb10(0x28, 2048, 32768), None, 16 << 20).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || buffers(&t)["in_use_bytes"] == 16 * MIB),
        "A's read never held the budget: {}",
        buffers(&t)
    );

    // B's READ waits for memory; its WRITE with immediate data has nowhere to put the data.
    let read = b.submit(0, &cdb10(0x28, 8, 8), None, 4096).unwrap();
    assert!(eventually(Duration::from_secs(5), || buffers(&t)["waiting"] == 1), "{}", buffers(&t));
    let write = b.submit(0, &cdb10(0x2A, 100, 8), Some(&[0xAB; 4096]), 0).unwrap();
    let (itt, rsp) = b.next_completion().unwrap();
    assert_eq!((itt, rsp.status), (write, TASK_SET_FULL), "the write with immediate data");
    let s = buffers(&t);
    assert_eq!((s["waiting"].as_u64(), s["task_set_full"].as_u64()), (Some(1), Some(1)), "{s}");

    // A reads its data: the memory comes back and B's read runs, with the data written.
    let (itt, rsp) = a.next_completion().unwrap();
    assert_eq!(itt, big);
    assert!(rsp.is_good() && rsp.data.len() == 16 << 20, "A's 16 MiB read: status {:#x}", rsp.status);
    let (itt, rsp) = b.next_completion().unwrap();
    assert_eq!(itt, read);
    assert!(rsp.is_good(), "B's waiting read: status {:#x}", rsp.status);
    assert_eq!(rsp.data, pattern[..4096], "B's waiting read returned other bytes");

    // The refused write stored nothing; retried, it is stored.
    let back = b.read10(0, 100, 8, BS).unwrap().check().unwrap();
    assert!(back.data.iter().all(|&x| x == 0), "a write answered TASK SET FULL was stored");
    b.write10(0, 100, &[0xAB; 4096], BS).unwrap().check().unwrap();
    assert_eq!(b.read10(0, 100, 8, BS).unwrap().check().unwrap().data, [0xAB; 4096]);
    a.logout().unwrap();
    b.logout().unwrap();

    assert!(
        eventually(Duration::from_secs(5), || buffers(&t)["in_use_bytes"] == 0),
        "buffer memory still charged after every command ended: {}",
        buffers(&t)
    );
    let s = buffers(&t);
    assert_eq!((s["waiting"].as_u64(), s["waits"].as_u64()), (Some(0), Some(1)), "{s}");
    assert!(s["cached_bytes"].as_u64().unwrap() <= 16 * MIB, "more cached than the budget: {s}");
    let log = t.stderr_text();
    assert_eq!(log.matches("limits.buffer_memory_mib").count(), 1, "logged once per connection:\n{log}");
}

#[test]
fn a_session_that_does_not_read_its_data_holds_only_its_share() {
    // 64 MiB: a quarter, 16 MiB, per connection.
    let (t, _cfg) = start(64);
    let mut a = login(&t);
    let mut b = login(&t);
    // A asks for the whole budget in four 16 MiB READs and reads none of its Data-In: one
    // runs, three wait for A's own memory, and the rest of the budget stays free for others.
    let mut reads: Vec<u32> =
        (0..4).map(|i| a.submit(0, &cdb10(0x28, i * 32768, 32768), None, 16 << 20).unwrap()).collect();
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = buffers(&t);
            s["in_use_bytes"] == 16 * MIB && s["waiting"] == 3
        }),
        "A took more than its share: {}",
        buffers(&t)
    );
    for i in 0..50 {
        b.read10(0, i * 8, 8, BS).unwrap().check().unwrap();
    }
    let s = buffers(&t);
    assert_eq!((s["in_use_bytes"].as_u64(), s["waiting"].as_u64()), (Some(16 * MIB), Some(3)), "{s}");
    // A reads its data: its reads run one after another.
    while !reads.is_empty() {
        let (itt, r) = a.next_completion().unwrap();
        assert!(r.is_good() && r.data.len() == 16 << 20, "A's read {itt:#x}: status {:#x}", r.status);
        assert_eq!(itt, reads.remove(0), "A's reads ran out of order");
    }
    a.logout().unwrap();
    b.logout().unwrap();
    assert!(eventually(Duration::from_secs(5), || buffers(&t)["in_use_bytes"] == 0), "{}", buffers(&t));
}
