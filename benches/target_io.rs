//! The whole receive → parse → execute → respond path of a running target: an in-process
//! `Target` (one reactor, a RAM LUN, 127.0.0.1 port 0) driven over loopback TCP by a minimal
//! raw initiator on the bench thread, 4 KiB READ(10) and WRITE(10) at QD1 and pipelined QD8.
//! Criterion reports the time per I/O; before each benchmark a counted pass of its own prints
//! the heap allocations per I/O of the whole process (the target's hot path must do none: the
//! bench panics otherwise; the initiator here allocates nothing per I/O either) and the system
//! calls per I/O of each thread, from kernel tracepoint counters (`support/syscalls.rs`).
//! perf/README.md ("The target's I/O path in-process") says how to read the numbers.

// The micro-benches' per-call allocation check is not used here: this bench counts per I/O.
#[allow(dead_code)]
mod support;
#[path = "support/syscalls.rs"]
mod syscalls;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::{allocations, CountingAlloc};
use uringtgt::config::Config;
use uringtgt::target::Target;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const IO_BYTES: usize = 4096;
const LUN_MIB: u64 = 64;
/// 4 KiB blocks of the LUN; commands address them in 512-byte LBAs.
const LUN_BLOCKS: u64 = (LUN_MIB << 20) / IO_BYTES as u64;
/// I/Os of the counted pass (after a warm-up of as many).
const COUNTED_IOS: u64 = 20_000;
const QD_MAX: usize = 8;
const RESERVED_TAG: u32 = 0xffff_ffff;

const OP_NOP_OUT: u8 = 0x00;
const OP_SCSI_CMD: u8 = 0x01;
const OP_LOGIN_REQ: u8 = 0x03;
const OP_NOP_IN: u8 = 0x20;
const OP_SCSI_RESP: u8 = 0x21;
const OP_LOGIN_RESP: u8 = 0x23;
const OP_DATA_IN: u8 = 0x25;

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn data_len(bhs: &[u8]) -> usize {
    (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7])
}

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Read,
    Write,
}

/// A logged-in session with every buffer it needs allocated up front: one Data-Out-free
/// WRITE (the 4 KiB go as immediate data) or READ per command, at most [`QD_MAX`] in flight.
struct Initiator {
    sock: TcpStream,
    cmd_sn: u32,
    exp_stat_sn: u32,
    /// A SCSI Command PDU: header and, for writes, 4 KiB of immediate data.
    cmd: Vec<u8>,
    /// The header being received, and a data segment buffer as large as we declared.
    rx_bhs: [u8; 48],
    rx_data: Vec<u8>,
    /// Next ITT; the LBA of a command is derived from it.
    itt: u32,
    /// Target NOP-In pings answered (a pass longer than 5 s without traffic gets some).
    pings: u64,
}

impl Initiator {
    fn login(addr: std::net::SocketAddr, target: &str) -> Self {
        let sock = TcpStream::connect(addr).expect("connect to the target");
        sock.set_nodelay(true).expect("TCP_NODELAY");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        let mut s = Self {
            sock,
            cmd_sn: 1,
            exp_stat_sn: 0,
            cmd: vec![0; 48 + IO_BYTES],
            rx_bhs: [0; 48],
            rx_data: vec![0; 256 << 10],
            itt: 1,
            pings: 0,
        };
        // Leading keys and AuthMethod=None in the security stage, then the operational stage;
        // ImmediateData=Yes so a 4 KiB write needs no R2T round trip.
        let stages: [(u8, &[(&str, &str)]); 2] = [
            (
                0,
                &[
                    ("InitiatorName", "iqn.2024-06.dev.jumpstarter:bench"),
                    ("SessionType", "Normal"),
                    ("TargetName", target),
                    ("AuthMethod", "None"),
                ],
            ),
            (
                1,
                &[
                    ("HeaderDigest", "None"),
                    ("DataDigest", "None"),
                    ("MaxRecvDataSegmentLength", "262144"),
                    ("ErrorRecoveryLevel", "0"),
                    ("MaxConnections", "1"),
                    ("InitialR2T", "No"),
                    ("ImmediateData", "Yes"),
                    ("MaxBurstLength", "262144"),
                    ("FirstBurstLength", "65536"),
                    ("DefaultTime2Wait", "0"),
                    ("DefaultTime2Retain", "0"),
                    ("MaxOutstandingR2T", "1"),
                    ("DataPDUInOrder", "Yes"),
                    ("DataSequenceInOrder", "Yes"),
                ],
            ),
        ];
        for (stage, keys) in stages {
            let text: Vec<u8> = keys.iter().flat_map(|(k, v)| format!("{k}={v}\0").into_bytes()).collect();
            let mut pdu = vec![0u8; 48 + text.len().div_ceil(4) * 4];
            pdu[0] = OP_LOGIN_REQ | 0x40;
            pdu[1] = 0x80 | (stage << 2) | if stage == 0 { 1 } else { 3 };
            pdu[5..8].copy_from_slice(&(text.len() as u32).to_be_bytes()[1..]);
            pdu[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0x4b, 0x1d]);
            put_u32(&mut pdu, 16, 0x4000);
            put_u32(&mut pdu, 24, s.cmd_sn);
            put_u32(&mut pdu, 28, s.exp_stat_sn);
            pdu[48..48 + text.len()].copy_from_slice(&text);
            s.sock.write_all(&pdu).expect("send Login Request");
            let n = s.recv();
            let b = s.rx_bhs;
            assert_eq!(b[0] & 0x3f, OP_LOGIN_RESP, "expected a Login Response");
            assert_eq!((b[36], b[37]), (0, 0), "login refused: {:?}", String::from_utf8_lossy(&s.rx_data[..n]));
            assert!(b[1] & 0x80 != 0, "the target did not move on from login stage {stage}");
            let answers = String::from_utf8_lossy(&s.rx_data[..n]).into_owned();
            if stage == 1 {
                assert!(answers.contains("ImmediateData=Yes"), "the bench needs ImmediateData=Yes: {answers}");
                let mrdsl = answers
                    .split('\0')
                    .find_map(|kv| kv.strip_prefix("MaxRecvDataSegmentLength="))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(8192);
                assert!(mrdsl >= IO_BYTES, "the target takes at most {mrdsl} bytes per PDU");
            }
            s.exp_stat_sn = get_u32(&b, 24).wrapping_add(1);
            s.cmd_sn = get_u32(&b, 28);
        }
        s
    }

    /// Receives one PDU into `rx_bhs` / `rx_data`; returns its data segment length.
    fn recv(&mut self) -> usize {
        self.sock.read_exact(&mut self.rx_bhs).expect("receive a PDU header");
        assert_eq!(self.rx_bhs[4], 0, "unexpected AHS");
        let n = data_len(&self.rx_bhs);
        let padded = n.div_ceil(4) * 4;
        assert!(padded <= self.rx_data.len(), "data segment of {n} bytes exceeds what we declared");
        self.sock.read_exact(&mut self.rx_data[..padded]).expect("receive a data segment");
        n
    }

    /// Sends one READ(10) or WRITE(10) of 4 KiB; the LBA walks the LUN pseudo-randomly.
    fn send_cmd(&mut self, dir: Dir) {
        let itt = self.itt;
        self.itt = self.itt.wrapping_add(1) & 0x7fff_ffff;
        // A multiplicative hash of the ITT spreads the I/Os over the whole LUN.
        let lba = (u64::from(itt).wrapping_mul(0x9e37_79b9) % LUN_BLOCKS * 8) as u32;
        let b = &mut self.cmd[..48];
        b.fill(0);
        b[0] = OP_SCSI_CMD;
        // F, R or W, task attribute SIMPLE.
        b[1] = 0x80 | if dir == Dir::Read { 0x40 } else { 0x20 } | 0x01;
        if dir == Dir::Write {
            b[5..8].copy_from_slice(&(IO_BYTES as u32).to_be_bytes()[1..]);
        }
        put_u32(b, 16, itt);
        put_u32(b, 20, IO_BYTES as u32);
        put_u32(b, 24, self.cmd_sn);
        put_u32(b, 28, self.exp_stat_sn);
        b[32] = if dir == Dir::Read { 0x28 } else { 0x2a };
        put_u32(b, 34, lba);
        b[39..41].copy_from_slice(&((IO_BYTES / 512) as u16).to_be_bytes());
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        let len = if dir == Dir::Write { 48 + IO_BYTES } else { 48 };
        self.sock.write_all(&self.cmd[..len]).expect("send a SCSI Command");
    }

    /// Waits for the end of one command (Data-In with status, or SCSI Response), answering
    /// target pings meanwhile; returns its SCSI status.
    fn complete_one(&mut self) -> u8 {
        loop {
            let n = self.recv();
            let b = self.rx_bhs;
            match b[0] & 0x3f {
                OP_DATA_IN if b[1] & 0x01 != 0 => break,
                OP_DATA_IN => {}
                OP_SCSI_RESP => {
                    assert_eq!(b[2], 0, "iSCSI response {:#04x} (target failure)", b[2]);
                    break;
                }
                OP_NOP_IN if get_u32(&b, 20) != RESERVED_TAG => self.answer_ping(n),
                op => panic!("unexpected PDU, opcode {op:#04x}"),
            }
        }
        self.exp_stat_sn = get_u32(&self.rx_bhs, 24).wrapping_add(1);
        self.rx_bhs[3]
    }

    /// Answers a target NOP-In ping (RFC 7143 §11.18), echoing its TTT, LUN and data.
    fn answer_ping(&mut self, n: usize) {
        let mut out = [0u8; 48];
        out[0] = OP_NOP_OUT | 0x40;
        out[1] = 0x80;
        out[5..8].copy_from_slice(&self.rx_bhs[5..8]);
        out[8..16].copy_from_slice(&self.rx_bhs[8..16]);
        put_u32(&mut out, 16, RESERVED_TAG);
        put_u32(&mut out, 20, get_u32(&self.rx_bhs, 20));
        put_u32(&mut out, 24, self.cmd_sn);
        // A ping's StatSN is the next one and is not advanced (§11.19).
        put_u32(&mut out, 28, get_u32(&self.rx_bhs, 24));
        self.sock.write_all(&out).expect("answer a NOP-In");
        self.sock.write_all(&self.rx_data[..n.div_ceil(4) * 4]).expect("answer a NOP-In");
        self.pings += 1;
    }

    /// `ios` commands, at most `qd` in flight: the pipeline is kept full until the last.
    fn run(&mut self, dir: Dir, qd: usize, ios: u64) {
        let mut sent = 0;
        let mut done = 0;
        while done < ios {
            while sent < ios && sent - done < qd as u64 {
                self.send_cmd(dir);
                sent += 1;
            }
            let status = self.complete_one();
            assert_eq!(
                status,
                0,
                "a {} ended with SCSI status {status:#04x}",
                if dir == Dir::Read { "READ" } else { "WRITE" }
            );
            done += 1;
        }
    }
}

/// The reactor's `poll_mode`: `TARGET_IO_POLL=busy` in the environment, else `adaptive`.
fn poll_mode() -> &'static str {
    match std::env::var("TARGET_IO_POLL").as_deref() {
        Ok("busy") => "busy",
        Ok("adaptive") | Err(_) => "adaptive",
        Ok(other) => panic!("TARGET_IO_POLL={other}: adaptive or busy"),
    }
}

fn start_target(root: &std::path::Path) -> Target {
    // One reactor; with two CPUs or more it gets CPU 0 and the initiator (this thread) CPU 1.
    let cpus =
        if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 { "cpus: [0]" } else { "reactors: 1" };
    let yaml = format!(
        "root_dir: {}\nhost: 127.0.0.1\nport: 0\n{cpus}\npoll_mode: {}\ntarget_name: bench\n\
         control_socket: {}/ctl.sock\nluns:\n  - name: ram0\n    backing: mem\n    size_mb: {LUN_MIB}\n",
        root.display(),
        poll_mode(),
        root.display()
    );
    let cfg = Config::from_yaml_str(&yaml).expect("bench config");
    let target = Target::start(&cfg).expect("target starts");
    if cpus == "cpus: [0]" {
        let _ = core_affinity::set_for_current(core_affinity::CoreId { id: 1 });
    }
    target
}

/// The counted pass: allocations and system calls per I/O over [`COUNTED_IOS`] I/Os.
fn count_pass(name: &str, init: &mut Initiator, dir: Dir, qd: usize) {
    init.run(dir, qd, COUNTED_IOS); // warm-up: first-use allocations are not per I/O
    let mut counters = syscalls::Counters::open();
    let sys_before = counters.as_mut().ok().map(|c| c.read());
    let allocs_before = allocations();
    let t = Instant::now();
    init.run(dir, qd, COUNTED_IOS);
    let elapsed = t.elapsed();
    let allocs = allocations() - allocs_before;
    let per_io = |n: u64| n as f64 / COUNTED_IOS as f64;
    println!(
        "{name}: {COUNTED_IOS} I/Os in {:.1} ms ({:.1} µs each); allocations/IO {} ({allocs} in the whole process)",
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / COUNTED_IOS as f64,
        per_io(allocs)
    );
    match (counters, sys_before) {
        (Ok(mut c), Some(before)) => {
            let d = syscalls::delta(&before, &c.read());
            for (thread, [sys, enter, sqes]) in d.iter().filter(|(_, n)| n.iter().any(|&x| x > 0)) {
                println!(
                    "{name}:   thread {thread:<16} syscalls/IO {:.2}  io_uring_enter/IO {:.2}  io_uring requests/IO {:.2}",
                    per_io(*sys),
                    per_io(*enter),
                    per_io(*sqes)
                );
            }
        }
        (Err(why), _) => println!("{name}:   syscalls/IO not counted: {why}"),
        (Ok(_), None) => unreachable!("counters that opened were read"),
    }
    assert_eq!(allocs, 0, "{name}: the I/O path allocated {allocs} times in {COUNTED_IOS} I/Os");
}

fn bench(c: &mut Criterion) {
    let root = tempfile::tempdir().expect("root_dir");
    let target = start_target(root.path());
    let mut init = Initiator::login(target.local_addr(), target.iqn());

    // A written block must read back; the session's first command may meet the power-on unit
    // attention (CHECK CONDITION) and is then sent again. The same ITT means the same LBA.
    init.cmd[48..].fill(0xa5);
    for attempt in 0..2 {
        init.send_cmd(Dir::Write);
        match init.complete_one() {
            0 => break,
            0x02 if attempt == 0 => {}
            status => panic!("the first WRITE ended with SCSI status {status:#04x}"),
        }
        init.itt -= 1;
    }
    init.itt -= 1;
    init.send_cmd(Dir::Read);
    assert_eq!(init.complete_one(), 0, "READ of the written block failed");
    assert!(init.rx_data[..IO_BYTES].iter().all(|&x| x == 0xa5), "a written block did not read back");

    // Each poll mode has a group of its own, so criterion never compares one with the other.
    let group = if poll_mode() == "busy" { "target_io_busy" } else { "target_io" };
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    for (dir, what) in [(Dir::Read, "read"), (Dir::Write, "write")] {
        for qd in [1, QD_MAX] {
            let name = format!("{what}-4k-qd{qd}");
            count_pass(&format!("{group}/{name}"), &mut init, dir, qd);
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    init.run(dir, qd, iters);
                    t.elapsed()
                })
            });
        }
    }
    g.finish();
    if init.pings > 0 {
        println!("target_io: answered {} target NOP-In pings", init.pings);
    }
    drop(init);
    target.stop();
}

criterion_group!(benches, bench);
criterion_main!(benches);
