//! `remove_lun` while a command still holds the LUN's store past the drain timeout (10 s).
//!
//! The holder is a real one: a 16 MiB READ whose initiator reads its Data-In only a trickle
//! at a time, so the data waits in the target's transmit queue and the task keeps the store
//! until the last byte is sent (as with a slow or stuck reader). The trickle keeps the TCP
//! window moving, so the kernel does not give up on the connection meanwhile. The removal must
//! fail rather than report success while the READ can still touch the store, leave the LUN
//! fenced, fail again when retried while the READ still runs, and succeed when retried after.

mod common;

use common::initiator::{get_u32, LoginOptions, Pdu, OP_DATA_IN};
use common::{past_ua, Target};
use serde_json::json;
use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BS: u32 = 512;
/// The largest READ the target takes (MAXIMUM TRANSFER LENGTH, 32768 blocks).
const READ_BLOCKS: u32 = 32768;
const READ_LEN: usize = (READ_BLOCKS * BS) as usize;
/// The trickle: 16 KiB every 100 ms, some 3.5 MiB over the two drain timeouts of the test.
const TRICKLE: usize = 16 << 10;

fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// Reads `stream` a trickle at a time until `stop`; returns the bytes read.
fn trickle_reader(mut stream: TcpStream, stop: Arc<AtomicBool>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; TRICKLE];
        while !stop.load(Ordering::Relaxed) {
            let n = stream.read(&mut buf).expect("reading the held READ's Data-In");
            assert!(n > 0, "the target closed the holder's connection");
            got.extend_from_slice(&buf[..n]);
            std::thread::sleep(Duration::from_millis(100));
        }
        got
    })
}

/// Reads the rest of the READ's Data-In (after the `head` bytes already read) and returns its
/// data and status.
fn finish_read(mut stream: TcpStream, head: Vec<u8>, itt: u32) -> (Vec<u8>, u8) {
    let mut data = vec![0u8; READ_LEN];
    let mut wire = std::io::Cursor::new(head).chain(&mut stream);
    loop {
        let pdu = Pdu::read_from(&mut wire, false, false).unwrap();
        assert_eq!((pdu.opcode(), pdu.itt()), (OP_DATA_IN, itt), "only the READ's Data-In is outstanding");
        let off = get_u32(&pdu.bhs, 40) as usize;
        data[off..off + pdu.data.len()].copy_from_slice(&pdu.data);
        if pdu.flags() & 0x01 != 0 {
            return (data, pdu.bhs[3]);
        }
    }
}

/// `remove_lun`: an error that names the LUN, the one command holding it and the timeout,
/// after waiting that long.
fn assert_remove_fails_busy(c: &mut common::Control) {
    let started = Instant::now();
    let r = c.call("remove_lun", json!({"name": "disk0"}));
    let waited = started.elapsed();
    let err = r.get("error").unwrap_or_else(|| panic!("remove_lun reported success while a READ holds the LUN: {r}"));
    assert_eq!(err["code"], -32603, "{r}");
    let msg = err["message"].as_str().unwrap();
    assert_eq!(
        msg,
        "LUN \"disk0\" is out of the table, but 1 command(s) still use its store after 10 s; the store is closed \
         when they end (remove_lun \"disk0\" waits for them again)"
    );
    assert!(waited >= Duration::from_secs(9), "remove_lun answered after {waited:?}, before the drain timeout");
}

#[test]
fn remove_lun_held_past_the_drain_timeout_fails_keeps_the_lun_fenced_and_succeeds_when_retried() {
    let t = Target::start(&[
        "--lun",
        "name=disk0,file_path=disk0.img,size_mb=32,lun_id=0",
        "--lun",
        "name=keep,backing=mem,size_mb=1,lun_id=1",
    ]);
    let mut holder = t.login(&LoginOptions::default());
    holder.test_unit_ready(0).unwrap(); // past the power-on unit attention
    let pattern: Vec<u8> = (0..READ_LEN).map(|i| (i / BS as usize) as u8 ^ (i % 251) as u8).collect();
    holder.write16(0, 0, &pattern, BS).unwrap().check().unwrap();

    // The READ is in the target's hands once its first Data-In bytes arrive.
    let itt = holder.submit(0, &read16(0, READ_BLOCKS), None, READ_LEN as u32).unwrap();
    let stream = holder.stream_clone();
    let mut first = [0u8; 1];
    assert_eq!(stream.peek(&mut first).unwrap(), 1);
    assert_eq!(first[0] & 0x3f, OP_DATA_IN, "the READ's Data-In comes first");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = trickle_reader(stream.try_clone().unwrap(), stop.clone());

    let mut c = t.control();
    assert_remove_fails_busy(&mut c);

    // Fenced meanwhile: not listed, not reported, new commands to it fail; the other LUN
    // is untouched.
    let names: Vec<String> =
        c.ok("list_luns", json!({})).as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap().into()).collect();
    assert_eq!(names, ["keep"]);
    let mut other = t.login(&LoginOptions::default());
    let rsp = past_ua(|| other.read10(0, 0, 8, BS).unwrap());
    assert_eq!((rsp.sense_key(), rsp.asc_ascq()), (Some(0x05), Some((0x25, 0x00))), "LOGICAL UNIT NOT SUPPORTED");
    assert_eq!(other.report_luns().unwrap(), [1]);
    past_ua(|| other.read10(1, 0, 8, BS).unwrap()).check().unwrap();

    // Retried while the READ still runs: waited for again, and the same error (not "no LUN").
    assert_remove_fails_busy(&mut c);

    // The reader catches up: the READ, started before the removal, completes with its data.
    stop.store(true, Ordering::Relaxed);
    let head = reader.join().unwrap();
    eprintln!("read {} KiB of the held READ's {} KiB while removals timed out", head.len() >> 10, READ_LEN >> 10);
    assert!(head.len() < READ_LEN / 2, "the READ was not held: {} bytes read meanwhile", head.len());
    let (data, status) = finish_read(stream, head, itt);
    assert_eq!(status, 0, "the held READ's status");
    assert!(data == pattern, "the held READ returned other data");

    // Its store let go, the retry succeeds, and only once.
    let started = Instant::now();
    assert_eq!(c.ok("remove_lun", json!({"name": "disk0"})), json!({"removed": "disk0"}));
    assert!(started.elapsed() < Duration::from_secs(5), "the retry waited {:?}", started.elapsed());
    assert_eq!(c.err_code("remove_lun", json!({"name": "disk0"})), -32001, "removed twice");
    // The image stays, with its data.
    let img = std::fs::read(t.root().join("disk0.img")).unwrap();
    assert!(img[..READ_LEN] == pattern[..], "the image lost its data");
}
