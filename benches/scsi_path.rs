//! The in-process SCSI command path on a `mem` LUN: BHS → CDB → `scsi::execute` → backing
//! read/write → Data-In header, per operation, without sockets or a ring. READ, WRITE and
//! TEST UNIT READY are the hot path and must not allocate (the bench panics if they do).

mod support;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use support::{check_allocs, CountingAlloc};
use uringtgt::backing::Backing;
use uringtgt::protocol::pdu::{opcode, Bhs, BhsBuf};
use uringtgt::scsi::cdb::{self, op};
use uringtgt::scsi::lun::{decode_lun, encode_lun};
use uringtgt::scsi::{execute, Disposition, Lun, LunTable, Nexus, Request};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const LUN_BYTES: u64 = 64 << 20;
const IO_BYTES: u32 = 4096;

/// What one command needs, built once: the LUN table, the session's SCSI state, a scratch
/// buffer for synchronous Data-In and the I/O buffer the backing reads into / writes from.
struct Path {
    table: LunTable,
    nexus: Nexus,
    scratch: Vec<u8>,
    io: Vec<u8>,
    /// The next command may end in CHECK CONDITION (the power-on unit attention).
    expect_check: bool,
}

impl Path {
    fn new() -> Self {
        let backing = Backing::new_mem(LUN_BYTES).expect("mem LUN");
        let lun = Lun::new(0, "ram0", None, backing, false, "iqn.2024-06.dev.jumpstarter:bench");
        Self {
            table: LunTable::new(vec![Arc::new(lun)]),
            nexus: Nexus::new(),
            scratch: vec![0; 64 << 10],
            io: vec![0x5a; IO_BYTES as usize],
            expect_check: true,
        }
    }

    /// Runs one SCSI Command PDU header through the path the reactor takes and returns the
    /// reply header: parse, execute, move the data, build Data-In (reads) or a response.
    fn command(&mut self, raw: &[u8; 48]) -> [u8; 48] {
        let bhs = Bhs::new(raw);
        let req = Request {
            cdb: bhs.cdb(),
            lun: decode_lun(bhs.lun()),
            expected_len: bhs.expected_data_len(),
            read: bhs.read_bit(),
            write: bhs.write_bit(),
        };
        let disp = execute(&req, &self.table, &mut self.nexus, &mut self.scratch);
        let lun = self.table.get(0).expect("LUN 0");
        let (len, status) = match disp {
            Disposition::Good => (0, 0),
            Disposition::DataIn(n) => (n as u32, 0),
            Disposition::Read { offset, len } => {
                lun.backing.read_at(&mut self.io[..len as usize], offset).expect("mem read");
                (len, 0)
            }
            Disposition::Write { offset, len, fua } => {
                lun.backing.write_at(&self.io[..len as usize], offset, fua).expect("mem write");
                (0, 0)
            }
            // Only the unit attention a new session owes (see `scsi`); anything else is a bug.
            Disposition::Check(sense) if self.expect_check => {
                self.expect_check = false;
                black_box(sense);
                (0, 2)
            }
            other => panic!("unexpected disposition {other:?}"),
        };
        let mut reply = BhsBuf::new(if len > 0 { opcode::DATA_IN } else { opcode::SCSI_RESPONSE });
        reply.flags(0x80 | u8::from(len > 0)).byte(3, status).data_len(len).itt(bhs.itt()).stat_sn(bhs.exp_stat_sn());
        reply.0
    }
}

/// A SCSI Command PDU header for LUN 0 with `cdb` and the R/W bits and length it implies.
fn command_bhs(cdb: &[u8], read: bool, write: bool, len: u32) -> [u8; 48] {
    let mut b = BhsBuf::new(opcode::SCSI_COMMAND);
    b.flags(0x80 | (u8::from(read) << 6) | (u8::from(write) << 5) | 0x01).lun(encode_lun(0)).itt(1).ttt(len);
    let mut raw = b.0;
    raw[32..32 + cdb.len()].copy_from_slice(cdb);
    raw
}

fn rw10(opcode: u8, lba: u32) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = opcode;
    cdb::put32(&mut c, 2, lba);
    c[7..9].copy_from_slice(&((IO_BYTES / 512) as u16).to_be_bytes());
    c
}

fn scsi(c: &mut Criterion) {
    let cases: [(&str, [u8; 48], bool); 4] = [
        ("read10_4k", command_bhs(&rw10(op::READ_10, 2048), true, false, IO_BYTES), true),
        ("write10_4k", command_bhs(&rw10(op::WRITE_10, 4096), false, true, IO_BYTES), true),
        ("test_unit_ready", command_bhs(&[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], false, false, 0), true),
        ("inquiry", command_bhs(&[op::INQUIRY, 0, 0, 0, 96, 0], true, false, 96), false),
    ];
    let mut path = Path::new();
    // The first command of a session reports the power-on unit attention; that is session
    // set-up, not the steady state measured here.
    path.command(&cases[2].1);
    for (name, raw, hot) in &cases {
        check_allocs(name, *hot, || {
            black_box(path.command(black_box(raw)));
        });
    }
    let mut g = c.benchmark_group("scsi_mem");
    for (name, raw, _) in &cases {
        if name.ends_with("_4k") {
            g.throughput(Throughput::Bytes(u64::from(IO_BYTES)));
        } else {
            g.throughput(Throughput::Elements(1));
        }
        g.bench_function(*name, |b| b.iter(|| path.command(black_box(raw))));
    }
    g.finish();
}

criterion_group!(benches, scsi);
criterion_main!(benches);
