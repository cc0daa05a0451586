//! Protocol-layer micro-benchmarks: BHS parse and encode, login text keys, CRC32C digests and
//! CDB decoding. Each also checks how often it allocates (zero on the I/O path).

mod support;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use support::{check_allocs, CountingAlloc};
use uringtgt::protocol::pdu::{opcode, Bhs, BhsBuf};
use uringtgt::protocol::{digest, text};
use uringtgt::scsi::cdb;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// A SCSI Command PDU header as an initiator sends it: READ(10) of 8 blocks at LBA 0x1000.
fn scsi_read_bhs() -> [u8; 48] {
    let mut b = BhsBuf::new(opcode::SCSI_COMMAND);
    b.flags(0x80 | 0x40 | 0x01).itt(0x1234).ttt(4096).stat_sn(7).exp_cmd_sn(9);
    let mut bytes = b.0;
    bytes[32..42].copy_from_slice(&[cdb::op::READ_10, 0, 0, 0, 0x10, 0, 0, 0, 8, 0]);
    bytes
}

/// Reads every field the reactor looks at when a SCSI Command arrives.
fn parse_scsi_command(raw: &[u8]) -> u64 {
    let bhs = Bhs::parse(raw).expect("48 bytes");
    u64::from(bhs.opcode())
        ^ u64::from(bhs.final_bit())
        ^ u64::from(bhs.read_bit())
        ^ u64::from(bhs.write_bit())
        ^ bhs.ahs_len() as u64
        ^ u64::from(bhs.data_len())
        ^ u64::from_be_bytes(bhs.lun())
        ^ u64::from(bhs.itt())
        ^ u64::from(bhs.expected_data_len())
        ^ u64::from(bhs.cmd_sn())
        ^ u64::from(bhs.exp_stat_sn())
        ^ u64::from(bhs.cdb()[0])
}

/// Builds the Data-In header that carries a read's data with status (the common reply).
fn encode_data_in(itt: u32, len: u32, sn: u32) -> [u8; 48] {
    let mut b = BhsBuf::new(opcode::DATA_IN);
    b.flags(0x80 | 0x01)
        .data_len(len)
        .itt(itt)
        .ttt(0xFFFF_FFFF)
        .stat_sn(sn)
        .exp_cmd_sn(sn + 1)
        .max_cmd_sn(sn + 64)
        .sn36(0)
        .buffer_offset(0)
        .word44(0);
    b.0
}

/// The keys of a typical operational-stage login request (as libiscsi sends them).
const LOGIN_KEYS: &[u8] = b"InitiatorName=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test\0\
SessionType=Normal\0TargetName=iqn.2024-06.dev.jumpstarter:bench\0HeaderDigest=None\0\
DataDigest=None\0InitialR2T=Yes\0ImmediateData=Yes\0MaxBurstLength=262144\0\
FirstBurstLength=65536\0MaxRecvDataSegmentLength=262144\0MaxConnections=1\0\
DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0DefaultTime2Wait=2\0DefaultTime2Retain=0\0\
IFMarker=No\0OFMarker=No\0ErrorRecoveryLevel=0\0MaxOutstandingR2T=1\0";

fn bhs(c: &mut Criterion) {
    let raw = scsi_read_bhs();
    check_allocs("bhs_parse", true, || {
        black_box(parse_scsi_command(black_box(&raw)));
    });
    check_allocs("bhs_encode_data_in", true, || {
        black_box(encode_data_in(black_box(7), black_box(4096), black_box(3)));
    });
    let mut g = c.benchmark_group("bhs");
    g.bench_function("parse_scsi_command", |b| b.iter(|| parse_scsi_command(black_box(&raw))));
    g.bench_function("encode_data_in", |b| b.iter(|| encode_data_in(black_box(7), black_box(4096), black_box(3))));
    g.finish();
}

fn text_keys(c: &mut Criterion) {
    // Login is not the I/O path: report, do not fail, when it allocates.
    check_allocs("text_parse_login", false, || {
        black_box(text::parse(black_box(LOGIN_KEYS)).expect("valid keys"));
    });
    let mut g = c.benchmark_group("text");
    g.throughput(Throughput::Bytes(LOGIN_KEYS.len() as u64));
    g.bench_function("parse_login_keys", |b| b.iter(|| text::parse(black_box(LOGIN_KEYS)).expect("valid keys")));
    g.finish();
}

fn crc32c(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    // 48 B: a header digest; 8 KiB and 256 KiB: data digests of typical PDU sizes.
    for size in [48usize, 8 << 10, 256 << 10] {
        let buf: Vec<u8> = (0..size).map(|i| (i * 31) as u8).collect();
        check_allocs(&format!("crc32c_{size}"), true, || {
            black_box(digest::data(&[black_box(&buf)]));
        });
        g.throughput(Throughput::Bytes(size as u64));
        if size == 48 {
            g.bench_with_input(BenchmarkId::new("header", size), &buf, |b, buf| {
                b.iter(|| digest::header(black_box(buf)))
            });
        } else {
            g.bench_with_input(BenchmarkId::new("data", size), &buf, |b, buf| {
                b.iter(|| digest::data(&[black_box(buf)]))
            });
        }
    }
    g.finish();
}

fn cdb_decode(c: &mut Criterion) {
    let read10 = [cdb::op::READ_10, 0, 0, 0, 0x10, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0];
    let mut write16 = [0u8; 16];
    write16[0] = cdb::op::WRITE_16;
    cdb::put64(&mut write16, 2, 0x1234_5678);
    cdb::put32(&mut write16, 10, 256);
    let decode = |c: &[u8]| {
        let len = cdb::cdb_len(c[0]).expect("known opcode");
        cdb::decode_block(&c[..len]).expect("block command")
    };
    check_allocs("cdb_decode", true, || {
        black_box(decode(black_box(&read10)));
    });
    let mut g = c.benchmark_group("cdb");
    g.bench_function("decode_read10", |b| b.iter(|| decode(black_box(&read10))));
    g.bench_function("decode_write16", |b| b.iter(|| decode(black_box(&write16))));
    g.finish();
}

criterion_group!(benches, bhs, text_keys, crc32c, cdb_decode);
criterion_main!(benches);
