//! Byte-exact data integrity through the test initiator: many transfer sizes and offsets, every
//! combination of ImmediateData / InitialR2T / digests and three MaxRecvDataSegmentLength values,
//! on a file LUN and a memory LUN; persistence across sessions and restarts; EOL and residuals.

mod common;

use common::initiator::{LoginOptions, Response, Session, STATUS_CHECK_CONDITION};
use common::Target;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

const BS: u32 = 512;
const LUN_MB: u64 = 64;
const LUN_BLOCKS: u64 = LUN_MB * 1024 * 1024 / BS as u64;
const SIZES: [u32; 7] = [1, 7, 8, 255, 256, 1024, 2048];

fn rng(test: &str) -> StdRng {
    // Seed from URINGTGT_TEST_SEED to replay a failure; printed either way.
    let seed = std::env::var("URINGTGT_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: URINGTGT_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

fn start_two_luns() -> Target {
    Target::start(&[
        "--lun",
        "name=disk0,file_path=disk0.img,size_mb=64,lun_id=0",
        "--lun",
        "name=ram0,backing=mem,size_mb=64,lun_id=1",
    ])
}

/// Panics with the first differing offset rather than dumping megabytes.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} (block {}): got {:#04x}, want {:#04x}", i / 512, got[i], want[i]);
    }
}

fn write(s: &mut Session, lun: u16, lba: u64, data: &[u8], use10: bool) -> Response {
    let r = if use10 { s.write10(lun, lba as u32, data, BS) } else { s.write16(lun, lba, data, BS) };
    r.unwrap_or_else(|e| panic!("WRITE lun {lun} lba {lba} len {}: {e}", data.len()))
        .check()
        .unwrap_or_else(|e| panic!("WRITE lun {lun} lba {lba} len {}: {e}", data.len()))
}

fn read(s: &mut Session, lun: u16, lba: u64, blocks: u32, use10: bool) -> Response {
    let r = if use10 { s.read10(lun, lba as u32, blocks as u16, BS) } else { s.read16(lun, lba, blocks, BS) };
    r.unwrap_or_else(|e| panic!("READ lun {lun} lba {lba} blocks {blocks}: {e}"))
        .check()
        .unwrap_or_else(|e| panic!("READ lun {lun} lba {lba} blocks {blocks}: {e}"))
}

/// Writes random data at every size, at LBA 0, an odd LBA and the end of the LUN (rotating so each
/// size meets each position across variants), and reads it back.
fn round_trips(s: &mut Session, lun: u16, rng: &mut StdRng, rotate: usize, label: &str) {
    let n = s.negotiated.clone();
    for (i, &blocks) in SIZES.iter().enumerate() {
        let lba = match (i + rotate) % 3 {
            0 => 0,
            1 => 2 * (rng.next_u64() % (LUN_BLOCKS / 4)) + 1,
            _ => LUN_BLOCKS - blocks as u64,
        };
        let use10 = (i + rotate).is_multiple_of(2);
        let data = random_bytes(rng, (blocks * BS) as usize);
        let w = write(s, lun, lba, &data, use10);
        let len = data.len() as u32;
        // Unsolicited data is at most FirstBurstLength; R2Ts cover the rest in bursts of at most
        // MaxBurstLength, so large writes need several R2Ts.
        if len > n.first_burst_length {
            let min_r2ts = (len - n.first_burst_length).div_ceil(n.max_burst_length);
            assert!(w.r2ts >= min_r2ts, "{label}: {len}-byte write took {} R2Ts, expected >= {min_r2ts}", w.r2ts);
        }
        if n.initial_r2t && !n.immediate_data {
            assert!(w.r2ts >= 1, "{label}: write without unsolicited data completed without an R2T");
        }

        let r = read(s, lun, lba, blocks, !use10);
        assert!(!r.residual_overflow && !r.residual_underflow, "{label}: unexpected residual on exact read");
        assert_same(&format!("{label}: lun {lun} lba {lba} blocks {blocks}"), &r.data, &data);
    }
}

fn variants(mrdsl: u32) {
    let t = start_two_luns();
    let mut rng = rng(&format!("variants_mrdsl_{mrdsl}"));
    let mut rotate = 0;
    for digests in [false, true] {
        for immediate_data in [true, false] {
            for initial_r2t in [true, false] {
                let opts = LoginOptions {
                    header_digest: digests,
                    data_digest: digests,
                    max_recv_data_segment_length: mrdsl,
                    immediate_data,
                    initial_r2t,
                    max_burst_length: 262144,
                    first_burst_length: 65536,
                    // Both login paths get exercised.
                    security_stage: rotate % 2 == 0,
                    ..Default::default()
                };
                let mut s = t.login(&opts);
                let n = &s.negotiated;
                assert_eq!((n.header_digest, n.data_digest), (digests, digests), "digest negotiation");
                let label = format!(
                    "mrdsl={mrdsl} digests={digests} ImmediateData={} InitialR2T={} target MRDSL={} FBL={} MBL={}",
                    n.immediate_data,
                    n.initial_r2t,
                    n.target_max_recv_data_segment_length,
                    n.first_burst_length,
                    n.max_burst_length
                );
                eprintln!("{label}");
                for name in ["disk0", "ram0"] {
                    round_trips(&mut s, t.lun(name), &mut rng, rotate, &format!("{label} {name}"));
                    rotate += 1;
                }
                s.logout().expect("logout");
            }
        }
    }
}

#[test]
fn variants_mrdsl_512() {
    variants(512);
}

#[test]
fn variants_mrdsl_8192() {
    variants(8192);
}

#[test]
fn variants_mrdsl_262144() {
    variants(262144);
}

#[test]
fn unaligned_lbas_and_end_of_lun() {
    let t = start_two_luns();
    let mut rng = rng("unaligned_lbas_and_end_of_lun");
    let mut s = t.login(&LoginOptions::default());
    for name in ["disk0", "ram0"] {
        let lun = t.lun(name);
        assert_eq!(s.read_capacity16(lun).unwrap(), (LUN_BLOCKS, BS), "{name} capacity");
        for lba in [1, 3, 4095, 4097, LUN_BLOCKS - 1, LUN_BLOCKS - 7, LUN_BLOCKS - 2048] {
            let blocks = (LUN_BLOCKS - lba).min(300) as u32;
            let data = random_bytes(&mut rng, (blocks * BS) as usize);
            write(&mut s, lun, lba, &data, false);
            let r = read(&mut s, lun, lba, blocks, false);
            assert_same(&format!("{name} lba {lba}"), &r.data, &data);
        }
        // Neighbours of a write stay untouched.
        let before = read(&mut s, lun, 9999, 1, false).data;
        let after = read(&mut s, lun, 10001, 1, false).data;
        let data = random_bytes(&mut rng, BS as usize);
        write(&mut s, lun, 10000, &data, true);
        let r = read(&mut s, lun, 9999, 3, false);
        assert_same(&format!("{name} neighbours"), &r.data, &[before, data, after].concat());
    }
    s.logout().unwrap();
}

#[test]
fn second_session_and_restart() {
    let mut t = start_two_luns();
    let mut rng = rng("second_session_and_restart");
    let (disk, ram) = (t.lun("disk0"), t.lun("ram0"));
    let mut a = t.login(&LoginOptions::default());
    let mut written = Vec::new();
    for (lba, blocks) in [(0u64, 8u32), (777, 255), (LUN_BLOCKS - 2048, 2048)] {
        let data = random_bytes(&mut rng, (blocks * BS) as usize);
        write(&mut a, disk, lba, &data, false);
        write(&mut a, ram, lba, &data, false);
        written.push((lba, blocks, data));
    }
    // A second session, opened while the first is still logged in, sees the data.
    let opts_b = LoginOptions {
        header_digest: true,
        data_digest: true,
        max_recv_data_segment_length: 8192,
        ..Default::default()
    };
    let mut b = t.login(&opts_b);
    for (lba, blocks, data) in &written {
        for lun in [disk, ram] {
            let r = read(&mut b, lun, *lba, *blocks, false);
            assert_same(&format!("session 2 lun {lun} lba {lba}"), &r.data, data);
        }
    }
    // The first session still works after the second logged in.
    a.test_unit_ready(disk).unwrap().check().expect("session 1 still alive");
    a.sync_cache(disk).unwrap().check().expect("SYNCHRONIZE CACHE");
    b.logout().unwrap();
    a.logout().unwrap();

    t.restart();
    let mut c = t.login(&LoginOptions::default());
    for (lba, blocks, data) in &written {
        let r = read(&mut c, disk, *lba, *blocks, true);
        assert_same(&format!("after restart lba {lba}"), &r.data, data);
    }
    c.logout().unwrap();
}

#[test]
fn read_beyond_end_is_illegal_request() {
    let t = start_two_luns();
    let mut s = t.login(&LoginOptions::default());
    for name in ["disk0", "ram0"] {
        let lun = t.lun(name);
        for (lba, blocks) in [(LUN_BLOCKS - 1, 2u32), (LUN_BLOCKS, 1), (u64::MAX - 1, 1)] {
            let r = s.read16(lun, lba, blocks, BS).unwrap();
            assert_eq!(r.status, STATUS_CHECK_CONDITION, "{name} READ(16) lba {lba} x{blocks}: status");
            assert_eq!(r.sense_key(), Some(0x05), "{name} lba {lba}: sense key ILLEGAL REQUEST");
            assert_eq!(r.asc_ascq().map(|a| a.0), Some(0x21), "{name} lba {lba}: ASC LBA OUT OF RANGE");
        }
        let r = s.read10(lun, (LUN_BLOCKS - 4) as u32, 8, BS).unwrap();
        assert_eq!((r.status, r.sense_key()), (STATUS_CHECK_CONDITION, Some(0x05)), "{name} READ(10) past end");
        // The session is still usable afterwards.
        s.test_unit_ready(lun).unwrap().check().unwrap();
    }
    s.logout().unwrap();
}

#[test]
fn read_residuals() {
    let t = start_two_luns();
    let mut rng = rng("read_residuals");
    let mut s = t.login(&LoginOptions::default());
    let lun = t.lun("disk0");
    let data = random_bytes(&mut rng, 8 * BS as usize);
    write(&mut s, lun, 100, &data, false);
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&100u32.to_be_bytes());
    cdb[7..9].copy_from_slice(&8u16.to_be_bytes());

    // Expected length larger than the 4096 bytes the CDB asks for: underflow.
    let r = s.command(lun, &cdb, None, 8192).unwrap();
    assert!(r.is_good(), "underflow read status {:#x}", r.status);
    assert!(r.residual_underflow && !r.residual_overflow, "underflow flags: {r:?}");
    assert_eq!(r.residual_count, 4096, "underflow residual");
    assert_same("underflow data", &r.data, &data);

    // Expected length smaller than the transfer: overflow, only 2048 bytes sent.
    let r = s.command(lun, &cdb, None, 2048).unwrap();
    assert!(r.is_good(), "overflow read status {:#x}", r.status);
    assert!(r.residual_overflow && !r.residual_underflow, "overflow flags: {r:?}");
    assert_eq!(r.residual_count, 2048, "overflow residual");
    assert_same("overflow data", &r.data, &data[..2048]);

    // Exact length: no residual.
    let r = s.command(lun, &cdb, None, 4096).unwrap();
    assert!(r.is_good() && !r.residual_overflow && !r.residual_underflow && r.residual_count == 0, "{r:?}");
    s.logout().unwrap();
}

#[test]
fn discovery_and_nop() {
    let t = start_two_luns();
    let mut d = Session::login_discovery(&t.addr(), &LoginOptions::default()).expect("discovery login");
    let targets = d.send_targets().expect("SendTargets");
    let (_, addrs) = targets
        .iter()
        .find(|(name, _)| *name == t.iqn)
        .unwrap_or_else(|| panic!("{} not in SendTargets answer {targets:?}", t.iqn));
    assert!(
        addrs.iter().any(|a| a.starts_with(&format!("{},", t.addr())) || *a == t.addr()),
        "no address {} in {addrs:?}",
        t.addr()
    );
    d.logout().unwrap();

    let mut s = t.login(&LoginOptions { header_digest: true, ..Default::default() });
    s.nop(b"ping-data").expect("NOP-Out ping");
    s.nop(&[]).expect("NOP-Out without data");
    s.test_unit_ready(t.lun("ram0")).unwrap().check().unwrap();
    s.logout().unwrap();
}

#[test]
fn idle_session_survives_target_pings() {
    let t = start_two_luns();
    let mut rng = rng("idle_session_survives_target_pings");
    let mut s = t.login(&LoginOptions { header_digest: true, data_digest: true, ..Default::default() });
    let data = random_bytes(&mut rng, 4096);
    write(&mut s, t.lun("ram0"), 64, &data, false);
    // The target pings after 5 s without traffic (checked once a second): 8 s of silence
    // must bring at least one NOP-In, answered as it arrives, and the session stays usable.
    s.idle(std::time::Duration::from_secs(8)).expect("idle connection");
    assert!(s.nops_answered >= 1, "no NOP-In ping in 8 s of idling (interval 5 s)");
    let r = read(&mut s, t.lun("ram0"), 64, 8, false);
    assert_same("after idle", &r.data, &data);
    s.logout().unwrap();
}

#[test]
fn login_with_same_isid_reinstates_the_session() {
    let t = start_two_luns();
    let opts = LoginOptions { isid: Some([0x80, 0x12, 0x34, 0x56, 0x78, 0x9A]), ..Default::default() };
    let mut old = t.login(&opts);
    old.test_unit_ready(t.lun("ram0")).unwrap().check().unwrap();
    // A second login with the same initiator name and ISID replaces the first session
    // (RFC 7143 §6.3.5): the old connection is closed, the new one works.
    let mut new = t.login(&opts);
    new.test_unit_ready(t.lun("ram0")).unwrap().check().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if old.test_unit_ready(t.lun("ram0")).is_err() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the reinstated session's old connection still answers");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    new.test_unit_ready(t.lun("ram0")).unwrap().check().unwrap();
    new.logout().unwrap();
}
