//! Bounded resources, measured on the real binary over real sockets: memory of sockets that
//! never log in, of a peer that stops reading, of many login/logout cycles; open descriptors;
//! the Data-Out timeout; what survives a `kill -9` in the middle of FUA writes; and the
//! reactor's buffer budget.

mod common;

use common::initiator::{get_u32, LoginOptions, Response, Session, OP_R2T, OP_SCSI_RESP, STATUS_CHECK_CONDITION};
use common::Target;
use serde_json::{json, Value};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const BS: u32 = 512;
const MIB: u64 = 1 << 20;

/// A target with a 64 MiB file LUN and the given YAML `limits` block (may be empty).
fn start(limits: &str) -> (Target, tempfile::TempDir) {
    start_with_config(&if limits.is_empty() { String::from("{}\n") } else { format!("limits:\n{limits}") })
}

/// A target with a 64 MiB file LUN and the YAML configuration `yaml`.
fn start_with_config(yaml: &str) -> (Target, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("limits.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let t = Target::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--lun",
        "name=disk0,file_path=disk0.img,size_mb=64,lun_id=0",
    ]);
    (t, dir)
}

fn status_field(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn rss(t: &Target) -> u64 {
    status_field(t.pid().expect("a spawned target"), "VmRSS:")
}

fn fds(t: &Target) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", t.pid().unwrap())).unwrap().count()
}

fn login(t: &Target, opts: &LoginOptions) -> Session {
    let mut s = t.login(opts);
    s.test_unit_ready(0).unwrap().check().unwrap();
    s
}

fn cdb10(op: u8, lba: u32, blocks: u16, flags: u8) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = op;
    cdb[1] = flags;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// Waits up to `within` for `cond`.
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

#[test]
fn sockets_that_never_log_in_hold_little_memory() {
    let (t, _cfg) = start("");
    let before = rss(&t);
    let socks: Vec<TcpStream> = (0..400).map(|_| TcpStream::connect(t.addr()).unwrap()).collect();
    assert!(eventually(Duration::from_secs(10), || fds(&t) >= 400), "the target accepted the sockets");
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss(&t).saturating_sub(before);
    eprintln!("400 idle sockets before login: RSS +{} KiB", grown / 1024);
    // 512 KiB each before the fix (200 MiB); 16 KiB each now.
    assert!(grown < 32 * MIB, "400 sockets before login grew RSS by {} MiB", grown / MIB);
    drop(socks);
}

#[test]
fn a_peer_that_stops_reading_is_bounded_and_dropped() {
    let (t, _cfg) = start("  max_tx_queue_kib: 8192\n  tx_stall_timeout_secs: 3\n");
    let fds_idle = fds(&t);
    let mut s = login(&t, &LoginOptions::default());
    // Warm the pool and the page cache a little, then measure from there.
    s.read10(0, 0, 2048, BS).unwrap().check().unwrap();
    let before = rss(&t);
    // 120 READs of 1 MiB, never reading the answers: 120 MiB of Data-In if nothing held back.
    for i in 0..120u32 {
        s.submit(0, &cdb10(0x28, (i % 64) * 2048, 2048, 0), None, 1 << 20).unwrap();
    }
    let mut peak = 0;
    let dropped = eventually(Duration::from_secs(15), || {
        peak = peak.max(rss(&t));
        fds(&t) <= fds_idle
    });
    let grown = peak.saturating_sub(before);
    eprintln!("non-reading peer: RSS peak +{} MiB, dropped: {dropped}", grown / MIB);
    assert!(grown < 64 * MIB, "RSS grew by {} MiB for a peer that does not read", grown / MIB);
    assert!(dropped, "the stalled connection was not dropped (fds {} > {fds_idle})", fds(&t));
    let log = t.stderr_text();
    assert_eq!(log.matches("not reading requests until it drains").count(), 1, "the limit is logged once:\n{log}");
    assert!(log.contains("transmit queue stalled"), "the drop is logged");
    // Other sessions are unaffected.
    let mut s2 = login(&t, &LoginOptions::default());
    s2.read10(0, 0, 8, BS).unwrap().check().unwrap();
    s2.logout().unwrap();
}

#[test]
fn a_write_whose_data_never_comes_is_aborted() {
    let (t, _cfg) = start("  dataout_timeout_secs: 2\n");
    let opts = LoginOptions { immediate_data: false, initial_r2t: true, ..Default::default() };
    let mut s = login(&t, &opts);
    let (itt, cmd) = s.raw_command(0, &cdb10(0x2a, 100, 16, 0), 8192, true, true, &[]).unwrap();
    s.send(&cmd).unwrap();
    let r2t = s.recv().unwrap();
    assert_eq!(r2t.opcode(), OP_R2T);
    let started = Instant::now();
    let rsp = s.recv().unwrap();
    let waited = started.elapsed();
    assert_eq!(rsp.opcode(), OP_SCSI_RESP, "the stalled write is answered");
    assert_eq!(rsp.itt(), itt);
    assert_eq!(rsp.bhs[3], STATUS_CHECK_CONDITION);
    let r = Response { status: rsp.bhs[3], sense: rsp.data[2..].to_vec(), ..Default::default() };
    assert_eq!(
        (r.sense_key(), r.asc_ascq()),
        (Some(0x0B), Some((0x4B, 0x06))),
        "ABORTED COMMAND, INITIATOR RESPONSE TIMEOUT"
    );
    assert!(waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10), "aborted after {waited:?}");
    // Its data arriving late is dropped, and the session goes on.
    s.send(&s.raw_data_out(0, itt, r2t.ttt(), 0, get_u32(&r2t.bhs, 40), true, &[0xEE; 8192])).unwrap();
    let back = s.read10(0, 100, 16, BS).unwrap().check().unwrap();
    assert!(back.data.iter().all(|&b| b == 0), "late Data-Out reached the disk");
    s.logout().unwrap();
    assert_eq!(t.stderr_text().matches("aborting the command").count(), 1, "logged once");
}

#[test]
fn ten_thousand_login_cycles_keep_memory_and_fds_flat() {
    let (t, _cfg) = start("");
    let cycle = || {
        let s = t.login(&LoginOptions::default());
        s.logout().unwrap();
    };
    // Warm-up: the allocator and the reactors reach their steady state.
    for _ in 0..500 {
        cycle();
    }
    std::thread::sleep(Duration::from_millis(200));
    let (rss0, fds0) = (rss(&t), fds(&t));
    let started = Instant::now();
    for _ in 0..10_000 {
        cycle();
    }
    let took = started.elapsed();
    assert!(eventually(Duration::from_secs(5), || fds(&t) <= fds0), "fds {} after, {fds0} before", fds(&t));
    let (rss1, fds1) = (rss(&t), fds(&t));
    eprintln!(
        "10000 login/logout cycles in {took:?}: RSS {} -> {} KiB, fds {fds0} -> {fds1}",
        rss0 / 1024,
        rss1 / 1024
    );
    assert!(rss1 < rss0 + 8 * MIB, "RSS grew from {} to {} KiB", rss0 / 1024, rss1 / 1024);
}

#[test]
fn acknowledged_fua_writes_survive_kill_9() {
    let (mut t, _cfg) = start("");
    let mut s = login(&t, &LoginOptions::default());
    // 4 KiB FUA writes, 16 in flight, each block stamped with its own number.
    let block =
        |i: u32| -> Vec<u8> { (0..4096u32).map(|b| (i.wrapping_mul(31).wrapping_add(b / 4)) as u8 | 1).collect() };
    let mut lba_of = std::collections::HashMap::new();
    let mut acked = Vec::new();
    let started = Instant::now();
    let mut next = 0u32;
    let mut killed = false;
    loop {
        while !killed && s.in_flight() < 16 {
            let itt = s.submit(0, &cdb10(0x2a, next * 8, 8, 0x08), Some(&block(next)), 0).unwrap();
            lba_of.insert(itt, next);
            next += 1;
        }
        if !killed && started.elapsed() > Duration::from_millis(500) && acked.len() > 50 {
            t.kill9();
            killed = true;
        }
        match s.next_completion() {
            Ok((itt, r)) => {
                let i = lba_of[&itt];
                r.check().unwrap_or_else(|e| panic!("FUA write {i}: {e}"));
                acked.push(i);
            }
            Err(_) if killed => break,
            Err(e) => panic!("before the kill: {e}"),
        }
    }
    eprintln!("{} FUA writes acknowledged, {} sent, before kill -9", acked.len(), next);
    assert!(acked.len() > 50);
    t.respawn();
    let mut s = login(&t, &LoginOptions::default());
    for &i in &acked {
        let r = s.read10(0, i * 8, 8, BS).unwrap().check().unwrap();
        assert!(r.data == block(i), "acknowledged FUA write {i} lost by kill -9");
    }
    s.logout().unwrap();
}

// ---- The reactor's buffer budget (`limits.buffer_memory_mib`) ----
// With the budget held by one session's 16 MiB READ that its initiator does not read, another
// session's READ waits (and completes, with the right data, once the memory comes back), its
// WRITE with immediate data is answered TASK SET FULL with nothing stored, `get_stats` shows
// it, and every byte is given back at the end. A session that asks for the whole budget and
// reads none of its data holds only its share (a quarter), and other sessions go on.

const TASK_SET_FULL: u8 = 0x28;

/// The one reactor's `buffers` object from `get_stats`.
fn buffers(t: &Target) -> Value {
    let stats = t.control().ok("get_stats", json!(null));
    stats["reactors"][0]["buffers"].clone()
}

/// One reactor with a `mib` MiB buffer budget and a 64 MiB file LUN.
fn start_budget(mib: u32) -> (Target, tempfile::TempDir) {
    start_with_config(&format!("reactors: 1\nlimits:\n  buffer_memory_mib: {mib}\n"))
}

#[test]
fn commands_past_the_buffer_budget_wait_or_get_task_set_full_and_memory_comes_back() {
    let (t, _cfg) = start_budget(16);
    let b0 = buffers(&t);
    assert_eq!(b0["limit_bytes"], 16 * MIB, "{b0}");
    let mut a = login(&t, &LoginOptions::default());
    let mut b = login(&t, &LoginOptions::default());
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    b.write10(0, 8, &pattern, BS).unwrap().check().unwrap();

    // A's 16 MiB READ takes the whole budget; A does not read its Data-In, so the buffer
    // stays held while the target's sends wait for the socket.
    let big = a.submit(0, &cdb10(0x28, 2048, 32768, 0), None, 16 << 20).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || buffers(&t)["in_use_bytes"] == 16 * MIB),
        "A's read never held the budget: {}",
        buffers(&t)
    );

    // B's READ waits for memory; its WRITE with immediate data has nowhere to put the data.
    let read = b.submit(0, &cdb10(0x28, 8, 8, 0), None, 4096).unwrap();
    assert!(eventually(Duration::from_secs(5), || buffers(&t)["waiting"] == 1), "{}", buffers(&t));
    let write = b.submit(0, &cdb10(0x2A, 100, 8, 0), Some(&[0xAB; 4096]), 0).unwrap();
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
    let (t, _cfg) = start_budget(64);
    let mut a = login(&t, &LoginOptions::default());
    let mut b = login(&t, &LoginOptions::default());
    // A asks for the whole budget in four 16 MiB READs and reads none of its Data-In: one
    // runs, three wait for A's own memory, and the rest of the budget stays free for others.
    let mut reads: Vec<u32> =
        (0..4).map(|i| a.submit(0, &cdb10(0x28, i * 32768, 32768, 0), None, 16 << 20).unwrap()).collect();
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
