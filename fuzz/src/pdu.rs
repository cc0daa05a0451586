//! The `pdu` target: a whole connection ([`uringtgt::iscsi::conn::Conn`]) fed a byte stream
//! the way the reactor feeds it (into `rx_space`, then `on_recv`), with a RAM LUN behind it.
//! It covers the BHS/AHS/data framing, header and data digests, the direct Data-Out receive,
//! login, and every full-feature PDU down to `scsi::execute`. Commands the target offloads
//! (WRITE SAME, UNMAP, COMPARE AND WRITE, ...) run on an inline pool: each job runs inside its
//! submission, and the harness hands its completion back to the connection after the receive,
//! as the reactor does, so a run is reproducible.
//!
//! The harness plays an initiator's framing layer: the input holds PDUs without digests or
//! padding, and the harness adds padding and, once the login response says they are on,
//! CRC32C digests (correct, except one it may be told to corrupt), so the fuzzer reaches the
//! code behind the digest checks. Everything the target sends is parsed back and checked:
//! lengths as declared, digests right.
//!
//! Input: `flags, k, record*`.
//! - `flags` bits 0-1: how the wire bytes are cut into receives (0: one PDU per receive; 1:
//!   pieces of 1-64 bytes; 2: pieces of 1-4096 bytes; 3: after login, every PDU in one stream
//!   cut into pieces of 1-4096 bytes). Bit 2/3: corrupt the header/data digest of PDU number
//!   `k`. Bit 4: the harness first logs in itself (a normal session, HeaderDigest per bit 5,
//!   DataDigest per bit 6). Bit 7: the harness numbers CmdSN of non-immediate commands.
//! - `k`: the PDU to corrupt, and the seed of the piece sizes.
//! - `record`: a 48-byte BHS, its AHS (`bhs[4] * 4` bytes), a u16 length `n` and `n` bytes; the
//!   data segment is those bytes repeated to the BHS's DataSegmentLength (zeros when `n` is 0).
//!   A Data-Out whose TTT is `FFFFFFFE` gets the TTT and ITT of the target's last R2T.

use crate::{put_chunk, Cursor};
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::Instant;
use uringtgt::backing::Backing;
use uringtgt::offload::{Completion, Pool};
use uringtgt::protocol::digest;
use uringtgt::protocol::login::LoginConfig;
use uringtgt::protocol::pdu::{opcode, pad_len, Bhs, BHS_LEN};
use uringtgt::backing::pool::BufPool;
use uringtgt::iscsi::conn::{Conn, ConnEnv, IoReq};
use uringtgt::iscsi::stats::Stats;
use uringtgt::scsi::{Lun, LunRefs, LunTable};
use uringtgt::session::Shared;

/// The connection's view of the harness's reactor-side state, as the reactor builds it per
/// event (a macro, so that `self.conn` stays borrowable beside it).
macro_rules! conn_env {
    ($h:ident) => {
        ConnEnv {
            luns: &$h.luns,
            lun_refs: &$h.lun_refs,
            pool: &mut $h.pool,
            scratch: &mut $h.scratch,
            io: &mut $h.io,
            shared: &$h.shared,
            stats: &mut $h.stats,
            reactor: 0,
            now: Instant::now(),
        }
    };
}

pub const FLAG_CORRUPT_HEADER: u8 = 0x04;
pub const FLAG_CORRUPT_DATA: u8 = 0x08;
pub const FLAG_LOGIN: u8 = 0x10;
pub const FLAG_HEADER_DIGEST: u8 = 0x20;
pub const FLAG_DATA_DIGEST: u8 = 0x40;
pub const FLAG_AUTO_CMDSN: u8 = 0x80;
/// TTT value a record uses to mean "the TTT of the last R2T".
pub const LAST_R2T: u32 = 0xFFFF_FFFE;
/// Data segments larger than this are not filled in (the target refuses far smaller ones).
const MAX_FILL: usize = 1 << 20;
const SCRATCH: usize = 256 * 1024;

/// One PDU of a `pdu` input: header (BHS and AHS) and the data bytes to repeat.
pub fn record(out: &mut Vec<u8>, bhs: &[u8; BHS_LEN], ahs: &[u8], data: &[u8]) {
    out.extend_from_slice(bhs);
    out.extend_from_slice(ahs);
    put_chunk(out, data);
}

/// The keys of the harness's own login (flag bit 4), as open-iscsi sends them, in one request.
pub fn login_keys(header_digest: bool, data_digest: bool) -> Vec<u8> {
    let hd = if header_digest { "CRC32C,None" } else { "None" };
    let dd = if data_digest { "CRC32C,None" } else { "None" };
    let mut keys = vec![
        ("InitiatorName", "iqn.2004-10.com.ubuntu:01:fuzz"),
        ("InitiatorAlias", "fuzz"),
        ("TargetName", crate::TARGET),
        ("SessionType", "Normal"),
    ];
    keys.extend(crate::login_peers::OPEN_ISCSI_OPERATIONAL.iter().map(|&(k, v)| match k {
        "HeaderDigest" => (k, hd),
        "DataDigest" => (k, dd),
        _ => (k, v),
    }));
    crate::kv(&keys)
}

/// A Login Request BHS: `flags` is byte 1 (T, C, CSG, NSG).
pub fn login_bhs(flags: u8, isid: [u8; 6], itt: u32, cmd_sn: u32, data_len: usize) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = opcode::LOGIN_REQUEST | 0x40;
    b[1] = flags;
    b[5..8].copy_from_slice(&(data_len as u32).to_be_bytes()[1..]);
    b[8..14].copy_from_slice(&isid);
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    b
}

/// A SCSI Command BHS.
pub fn scsi_bhs(flags: u8, lun: u16, itt: u32, edtl: u32, cmd_sn: u32, cdb: &[u8], data_len: usize) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = opcode::SCSI_COMMAND;
    b[1] = flags;
    b[5..8].copy_from_slice(&(data_len as u32).to_be_bytes()[1..]);
    b[8..10].copy_from_slice(&lun.to_be_bytes());
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&edtl.to_be_bytes());
    b[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    b[32..32 + cdb.len().min(16)].copy_from_slice(&cdb[..cdb.len().min(16)]);
    b
}

/// Any other request BHS: opcode (with the I bit), flags, ITT, word 20 (TTT...), CmdSN, and
/// bytes 36..48 (DataSN, buffer offset).
pub fn bhs(
    op: u8,
    flags: u8,
    itt: u32,
    word20: u32,
    cmd_sn: u32,
    data_sn: u32,
    offset: u32,
    data_len: usize,
) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = op;
    b[1] = flags;
    b[5..8].copy_from_slice(&(data_len as u32).to_be_bytes()[1..]);
    b[16..20].copy_from_slice(&itt.to_be_bytes());
    b[20..24].copy_from_slice(&word20.to_be_bytes());
    b[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    b[36..40].copy_from_slice(&data_sn.to_be_bytes());
    b[40..44].copy_from_slice(&offset.to_be_bytes());
    b
}

/// The harness's shared state: a target with a writable 256 KiB RAM LUN 0 and a read-only
/// 16 KiB RAM LUN 1, fresh for every input so runs are reproducible, and the receiver of its
/// offloaded jobs' completions.
fn target() -> (Shared, Arc<LunTable>, Receiver<Completion>) {
    let lun = |id, size, ro| {
        Arc::new(Lun::new(id, &format!("ram{id}"), None, Backing::new_mem(size).unwrap(), ro, crate::TARGET))
    };
    let table = LunTable::new(vec![lun(0, 256 << 10, false), lun(1, 16 << 10, true)]);
    let login = LoginConfig {
        target_name: crate::TARGET.to_string(),
        addresses: vec!["127.0.0.1:3260,1".into()],
        ..LoginConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let pool = Pool::inline(move |done| tx.send(done).expect("the harness holds the receiver"));
    (Shared::new(login, table.clone()).with_offload(pool), Arc::new(table), rx)
}

/// `PDU_TRACE=1` prints every PDU the target sends (for reading a crash or a seed).
fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("PDU_TRACE").is_some())
}

struct Rng(u32);

impl Rng {
    fn next(&mut self, max: usize) -> usize {
        // xorshift32: deterministic piece sizes from the input's seed.
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        1 + self.0 as usize % max
    }
}

/// What the harness learnt from the target's responses.
#[derive(Default)]
struct Peer {
    /// Bytes sent by the target, not yet parsed into PDUs.
    out: Vec<u8>,
    full_feature: bool,
    header_digest: bool,
    data_digest: bool,
    last_r2t: Option<(u32, u32)>,
}

impl Peer {
    /// Parses whole PDUs the target sent and checks their framing.
    fn parse(&mut self) {
        loop {
            let Some(b) = Bhs::parse(&self.out) else { return };
            let hd = if self.header_digest { 4 } else { 0 };
            let header_len = BHS_LEN + b.ahs_len();
            let dlen = b.data_len() as usize;
            let dd = if self.data_digest && dlen > 0 { 4 } else { 0 };
            let total = header_len + hd + dlen + pad_len(dlen) + dd;
            if self.out.len() < total {
                return;
            }
            let pdu = &self.out[..total];
            assert_eq!(b.ahs_len(), 0, "the target sends no AHS");
            if hd > 0 {
                let wire = digest::from_wire(pdu[header_len..header_len + 4].try_into().unwrap());
                assert_eq!(wire, digest::header(&pdu[..header_len]), "bad header digest sent");
            }
            let data_at = header_len + hd;
            let data = &pdu[data_at..data_at + dlen];
            let pad = &pdu[data_at + dlen..data_at + dlen + pad_len(dlen)];
            assert!(pad.iter().all(|&x| x == 0), "non-zero padding sent");
            if dd > 0 {
                let at = total - 4;
                let wire = digest::from_wire(pdu[at..].try_into().unwrap());
                assert_eq!(wire, digest::data(&[data, pad]), "bad data digest sent");
            }
            let b = Bhs::new(pdu[..BHS_LEN].try_into().unwrap());
            if trace() {
                eprintln!(
                    "target sent opcode {:#04x} flags {:#04x} itt {:#x} bytes 36..40 {:02x?} data {dlen}",
                    b.opcode(),
                    b.flags(),
                    b.itt(),
                    &pdu[36..40]
                );
            }
            match b.opcode() {
                opcode::LOGIN_RESPONSE => {
                    assert!(dlen <= 8192, "login response data of {dlen} bytes");
                    let pairs = uringtgt::protocol::text::parse(data).expect("login response text parses");
                    let done = b.login_transit() && b.login_nsg() == 3 && pdu[36] == 0;
                    if done {
                        self.full_feature = true;
                        for (k, v) in pairs {
                            match k {
                                "HeaderDigest" => self.header_digest = v == "CRC32C",
                                "DataDigest" => self.data_digest = v == "CRC32C",
                                _ => {}
                            }
                        }
                    }
                }
                opcode::R2T => self.last_r2t = Some((b.itt(), b.ttt())),
                _ => {}
            }
            // Digests (when just turned on) apply from the next PDU on.
            self.out.drain(..total);
        }
    }
}

/// Sends what the connection queued, as a completed `sendmsg` would, and hands back the
/// task slots whose last PDU went out.
fn drain_tx(conn: &mut Conn, peer: &mut Peer, pool: &mut BufPool) {
    while let Some(msg) = conn.tx.prepare() {
        let mut sent = 0;
        // SAFETY: the queue's msghdr and its iovecs stay valid until `complete`.
        unsafe {
            let m = &*msg;
            for i in 0..m.msg_iovlen {
                let iov = &*m.msg_iov.add(i);
                let part = std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len);
                peer.out.extend_from_slice(part);
                sent += iov.iov_len;
            }
        }
        let mut released = Vec::new();
        conn.tx.complete(sent, |s| released.push(s));
        for s in released {
            conn.release_sent(s, pool);
        }
        peer.parse();
    }
}

/// Builds the wire form of one record: padding, and digests when on.
fn wire(hdr: &[u8], data: &[u8], hd: bool, dd: bool, bad_hd: bool, bad_dd: bool) -> Vec<u8> {
    let mut w = Vec::with_capacity(hdr.len() + data.len() + 12);
    w.extend_from_slice(hdr);
    if hd {
        let mut crc = digest::header(hdr);
        if bad_hd {
            crc ^= 1;
        }
        w.extend_from_slice(&digest::to_wire(crc));
    }
    w.extend_from_slice(data);
    let pad = [0u8; 3];
    let pad = &pad[..pad_len(data.len())];
    w.extend_from_slice(pad);
    if dd && !data.is_empty() {
        let mut crc = digest::data(&[data, pad]);
        if bad_dd {
            crc ^= 1;
        }
        w.extend_from_slice(&digest::to_wire(crc));
    }
    w
}

struct Harness {
    shared: Shared,
    offloaded: Receiver<Completion>,
    luns: Arc<LunTable>,
    lun_refs: LunRefs,
    conn: Conn,
    pool: BufPool,
    scratch: Vec<u8>,
    io: Vec<IoReq>,
    stats: Stats,
    peer: Peer,
    rng: Rng,
    mode: u8,
}

impl Harness {
    /// Receives `bytes` through rx_space/on_recv in pieces; false once the connection closes.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut at = 0;
        while at < bytes.len() {
            if self.conn.closing || self.conn.wants_close() {
                return false;
            }
            let (ptr, space) = self.conn.rx_space();
            assert!(space > 0, "no receive space on an open connection");
            let piece = match self.mode {
                0 => bytes.len() - at,
                1 => self.rng.next(64),
                _ => self.rng.next(4096),
            };
            let n = piece.min(space).min(bytes.len() - at);
            // SAFETY: rx_space hands out `space` writable bytes at `ptr`; n <= space.
            unsafe { std::ptr::copy_nonoverlapping(bytes[at..].as_ptr(), ptr, n) };
            at += n;
            let mut env = conn_env!(self);
            self.conn.on_recv(n, &mut env);
            // Offloaded jobs ran inside the receive; their completions reach the connection
            // now, as the reactor's message loop brings them (one may let queued commands
            // start, and offload again).
            while let Ok(done) = self.offloaded.try_recv() {
                assert_eq!(done.route.conn, self.conn.slot, "completion routed to another connection");
                self.conn.offload_done(done.route.task, done.output, &mut env);
            }
            assert_eq!(self.conn.work_inflight(), 0, "work left in flight with RAM LUNs and an inline pool");
            assert!(self.io.is_empty(), "RAM LUNs need no ring I/O");
            drain_tx(&mut self.conn, &mut self.peer, &mut self.pool);
        }
        !(self.conn.closing || self.conn.wants_close())
    }

    fn finish(mut self) {
        drain_tx(&mut self.conn, &mut self.peer, &mut self.pool);
        self.conn.close("fuzz input done");
        assert_eq!(self.conn.work_inflight(), 0);
        let mut env = conn_env!(self);
        self.conn.teardown(&mut env);
        assert!(self.shared.sessions().is_empty(), "a session outlived its connection");
    }
}

pub fn run(input: &[u8]) {
    let mut c = Cursor::new(input);
    let flags = c.u8();
    let k = c.u8();
    let (shared, luns, offloaded) = target();
    let peer_addr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let conn = Conn::new(peer_addr, Some("127.0.0.1:3260".parse().unwrap()), 1, &shared, Instant::now());
    let mut h = Harness {
        shared,
        offloaded,
        lun_refs: LunRefs::new(&luns),
        luns,
        conn,
        pool: BufPool::default(),
        scratch: vec![0u8; SCRATCH],
        io: Vec::new(),
        stats: Stats::default(),
        peer: Peer::default(),
        rng: Rng(0x9E37_79B9 ^ u32::from(k).wrapping_mul(0x0101_0101)),
        mode: flags & 3,
    };
    let mut cmd_sn: Option<u32> = None;
    let mut batch: Vec<u8> = Vec::new();
    let mut pdu_index = 0u8;
    let mut own_login = None;
    if flags & FLAG_LOGIN != 0 {
        let keys = login_keys(flags & FLAG_HEADER_DIGEST != 0, flags & FLAG_DATA_DIGEST != 0);
        let b = login_bhs(0x80 | (1 << 2) | 3, [0x40, 0, 0x01, 0x37, 0, 0], 0, 1, keys.len());
        own_login = Some((b.to_vec(), keys));
    }
    loop {
        let (mut hdr, data) = match own_login.take() {
            Some(r) => r,
            None => {
                if c.is_empty() {
                    break;
                }
                let mut hdr = c.bytes(BHS_LEN).to_vec();
                hdr.resize(BHS_LEN, 0);
                let ahs = c.bytes(usize::from(hdr[4]) * 4);
                hdr.extend_from_slice(ahs);
                let seed = c.chunk();
                let dlen = u32::from_be_bytes([0, hdr[5], hdr[6], hdr[7]]) as usize;
                let data = if dlen > MAX_FILL {
                    seed.to_vec()
                } else if seed.is_empty() {
                    vec![0u8; dlen]
                } else {
                    seed.iter().copied().cycle().take(dlen).collect()
                };
                (hdr, data)
            }
        };
        let op = hdr[0] & 0x3F;
        if op == opcode::LOGIN_REQUEST && cmd_sn.is_none() {
            cmd_sn = Some(u32::from_be_bytes(hdr[24..28].try_into().unwrap()));
        }
        let ordered = matches!(
            op,
            opcode::SCSI_COMMAND
                | opcode::NOP_OUT
                | opcode::TASK_MGMT_REQUEST
                | opcode::TEXT_REQUEST
                | opcode::LOGOUT_REQUEST
        );
        if flags & FLAG_AUTO_CMDSN != 0 && h.peer.full_feature && ordered && hdr[0] & 0x40 == 0 {
            let sn = cmd_sn.unwrap_or(0);
            hdr[24..28].copy_from_slice(&sn.to_be_bytes());
            cmd_sn = Some(sn.wrapping_add(1));
        }
        if op == opcode::DATA_OUT && hdr[20..24] == LAST_R2T.to_be_bytes() {
            if let Some((itt, ttt)) = h.peer.last_r2t {
                hdr[16..20].copy_from_slice(&itt.to_be_bytes());
                hdr[20..24].copy_from_slice(&ttt.to_be_bytes());
            }
        }
        let corrupt = pdu_index == k;
        pdu_index = pdu_index.wrapping_add(1);
        let (hd, dd) = if h.peer.full_feature { (h.peer.header_digest, h.peer.data_digest) } else { (false, false) };
        let (bad_hd, bad_dd) = (corrupt && flags & FLAG_CORRUPT_HEADER != 0, corrupt && flags & FLAG_CORRUPT_DATA != 0);
        let w = wire(&hdr, &data, hd, dd, bad_hd, bad_dd);
        if h.mode == 3 && h.peer.full_feature {
            // Digest state is settled after login: the rest goes out as one stream.
            batch.extend_from_slice(&w);
            continue;
        }
        if !h.feed(&w) {
            break;
        }
    }
    if !batch.is_empty() {
        h.feed(&batch);
    }
    h.finish();
}
