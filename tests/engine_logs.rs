//! A peer cannot make the target's log grow without bound: protocol errors are counted per
//! connection and logged at most once a second, with the count of those not logged.

mod common;

use common::initiator::{LoginOptions, Pdu, OP_REJECT};
use common::Target;
use std::io::Write;
use std::time::{Duration, Instant};

const BAD_PDUS: usize = 10_000;

#[test]
fn ten_thousand_bad_pdus_log_a_few_lines() {
    let t = Target::start(&["--lun", "name=ram0,backing=mem,size_mb=8,lun_id=0"]);
    let mut s = t.login(&LoginOptions::default());
    // Opcode 0x1c is reserved: each such PDU is rejected ("command not supported") and the
    // connection goes on.
    let mut bad = Pdu::new(0x1c);
    bad.bhs[1] = 0x80;
    let one = bad.encode(false, false);
    let mut w = s.stream_clone();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let all: Vec<u8> = one.iter().copied().cycle().take(one.len() * BAD_PDUS).collect();
        w.write_all(&all).expect("send the bad PDUs");
    });
    for i in 0..BAD_PDUS {
        let p = s.recv_raw().unwrap_or_else(|e| panic!("Reject {i}: {e}"));
        assert_eq!(p.opcode(), OP_REJECT, "answer {i}");
        assert_eq!(p.bhs[2], 0x05, "reason: command not supported");
    }
    writer.join().unwrap();
    let took = started.elapsed();
    // The session still works, then ends (the end reports what was not logged).
    s.nop(b"still here").unwrap();
    s.logout().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let log = t.stderr_text();
    let warn: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    eprintln!("{BAD_PDUS} bad PDUs in {took:?}: {} warning lines:\n{}", warn.len(), warn.join("\n"));
    // One line a second at most, plus the summary at the end of the connection.
    let bound = 2 + took.as_secs() as usize;
    assert!(!warn.is_empty(), "protocol errors are logged at all");
    assert!(warn.len() <= bound.min(30), "{} warning lines for {BAD_PDUS} bad PDUs in {took:?}", warn.len());
    let total: u64 = warn
        .iter()
        .find_map(|l| l.split(" in all)").next().filter(|_| l.contains(" in all)"))?.rsplit('(').next()?.parse().ok())
        .expect("a summary line with the total");
    assert_eq!(total, BAD_PDUS as u64, "every protocol error counted");
}
