//! A small blocking iSCSI initiator (RFC 7143) for the end-to-end tests.
//!
//! It runs one task at a time on one connection (ErrorRecoveryLevel=0, MaxConnections=1) and checks
//! what the target sends strictly: digests, DataSN order, buffer offsets, segment lengths and R2T
//! bounds, so a protocol slip in the target fails the test that triggered it.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Socket timeout: a target that stops answering fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub const BHS_LEN: usize = 48;
const RESERVED_TAG: u32 = 0xffff_ffff;

// Initiator opcodes (RFC 7143 11.2.1.2).
pub const OP_NOP_OUT: u8 = 0x00;
pub const OP_SCSI_CMD: u8 = 0x01;
pub const OP_LOGIN_REQ: u8 = 0x03;
pub const OP_TEXT_REQ: u8 = 0x04;
pub const OP_DATA_OUT: u8 = 0x05;
pub const OP_LOGOUT_REQ: u8 = 0x06;
// Target opcodes.
pub const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RESP: u8 = 0x21;
pub const OP_LOGIN_RESP: u8 = 0x23;
pub const OP_TEXT_RESP: u8 = 0x24;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RESP: u8 = 0x26;
pub const OP_R2T: u8 = 0x31;
pub const OP_ASYNC: u8 = 0x32;
pub const OP_REJECT: u8 = 0x3f;

const FLAG_FINAL: u8 = 0x80;
const FLAG_IMMEDIATE: u8 = 0x40;

pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("login failed: status class {class:#04x} detail {detail:#04x}")]
    Login { class: u8, detail: u8 },
    #[error("header digest mismatch on opcode {0:#04x}")]
    HeaderDigest(u8),
    #[error("data digest mismatch on opcode {0:#04x}")]
    DataDigest(u8),
    #[error("target sent Reject, reason {0:#04x}")]
    Reject(u8),
    #[error("the target's mutual CHAP response is wrong")]
    MutualChap,
}

pub type Result<T> = std::result::Result<T, Error>;

fn proto<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Protocol(msg.into()))
}

// Big-endian field helpers: header fields are read and written at byte offsets, never through
// packed structs.
pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
pub fn get_u24(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([0, b[off], b[off + 1], b[off + 2]])
}
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
pub fn put_u24(b: &mut [u8], off: usize, v: u32) {
    assert!(v < 1 << 24, "24-bit field overflow: {v}");
    b[off..off + 3].copy_from_slice(&v.to_be_bytes()[1..]);
}
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// iSCSI digests are CRC32C, sent least significant byte first (RFC 7143 13.1, RFC 3720 B.4).
pub fn digest(parts: &[&[u8]]) -> [u8; 4] {
    let crc = parts.iter().fold(0u32, |crc, p| crc32c::crc32c_append(crc, p));
    crc.to_le_bytes()
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Single-level LUN addressing (SAM-5 4.7): peripheral method for ids < 256, flat space above.
pub fn encode_lun(lun: u16) -> u64 {
    if lun < 256 {
        (lun as u64) << 48
    } else {
        ((0x4000 | (lun as u64 & 0x3fff)) << 48) & 0xffff_0000_0000_0000
    }
}

/// One PDU: the 48-byte BHS, any AHS and the data segment without padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

impl Pdu {
    pub fn new(opcode: u8) -> Self {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        Pdu { bhs, ahs: Vec::new(), data: Vec::new() }
    }
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn itt(&self) -> u32 {
        get_u32(&self.bhs, 16)
    }
    pub fn ttt(&self) -> u32 {
        get_u32(&self.bhs, 20)
    }
    pub fn stat_sn(&self) -> u32 {
        get_u32(&self.bhs, 24)
    }
    pub fn exp_cmd_sn(&self) -> u32 {
        get_u32(&self.bhs, 28)
    }
    pub fn max_cmd_sn(&self) -> u32 {
        get_u32(&self.bhs, 32)
    }
    pub fn data_segment_length(&self) -> u32 {
        get_u24(&self.bhs, 5)
    }

    /// Serialises with padding and the negotiated digests; fills TotalAHSLength and
    /// DataSegmentLength from the buffers.
    pub fn encode(&self, header_digest: bool, data_digest: bool) -> Vec<u8> {
        assert!(self.ahs.len().is_multiple_of(4), "AHS must be a multiple of 4 bytes");
        let mut bhs = self.bhs;
        bhs[4] = (self.ahs.len() / 4) as u8;
        put_u24(&mut bhs, 5, self.data.len() as u32);
        let mut out = Vec::with_capacity(BHS_LEN + self.ahs.len() + pad4(self.data.len()) + 8);
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&self.ahs);
        if header_digest {
            let d = digest(&[&out]);
            out.extend_from_slice(&d);
        }
        if !self.data.is_empty() {
            let start = out.len();
            out.extend_from_slice(&self.data);
            out.resize(start + pad4(self.data.len()), 0);
            if data_digest {
                let d = digest(&[&out[start..]]);
                out.extend_from_slice(&d);
            }
        }
        out
    }

    /// Reads one PDU, verifying the digests that are in force.
    pub fn read_from(r: &mut impl Read, header_digest: bool, data_digest: bool) -> Result<Pdu> {
        let mut bhs = [0u8; BHS_LEN];
        r.read_exact(&mut bhs)?;
        let mut ahs = vec![0u8; bhs[4] as usize * 4];
        r.read_exact(&mut ahs)?;
        if header_digest {
            let mut d = [0u8; 4];
            r.read_exact(&mut d)?;
            if d != digest(&[&bhs, &ahs]) {
                return Err(Error::HeaderDigest(bhs[0] & 0x3f));
            }
        }
        let len = get_u24(&bhs, 5) as usize;
        let mut data = vec![0u8; pad4(len)];
        r.read_exact(&mut data)?;
        if data_digest && len > 0 {
            let mut d = [0u8; 4];
            r.read_exact(&mut d)?;
            if d != digest(&[&data]) {
                return Err(Error::DataDigest(bhs[0] & 0x3f));
            }
        }
        data.truncate(len);
        Ok(Pdu { bhs, ahs, data })
    }
}

/// Parses `key=value\0` text (RFC 7143 6.1); a trailing NUL is optional.
pub fn parse_keys(data: &[u8]) -> Result<Vec<(String, String)>> {
    let mut keys = Vec::new();
    for item in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let s = std::str::from_utf8(item).map_err(|_| Error::Protocol("text key is not UTF-8".into()))?;
        match s.split_once('=') {
            Some((k, v)) => keys.push((k.to_string(), v.to_string())),
            None => return proto(format!("text item without '=': {s:?}")),
        }
    }
    Ok(keys)
}

pub fn encode_keys(keys: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in keys {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// What the initiator offers at login.
#[derive(Clone, Debug)]
pub struct LoginOptions {
    pub initiator_name: String,
    /// Start in the security stage with AuthMethod=None instead of going straight to operational.
    pub security_stage: bool,
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    /// A fixed ISID (to test session reinstatement); by default each session gets its own.
    pub isid: Option<[u8; 6]>,
    /// Authenticate with CHAP in the security stage (implies `security_stage`).
    pub chap: Option<ChapLogin>,
    /// The local address to connect from (e.g. 127.0.0.2 for ACL tests).
    pub bind: Option<IpAddr>,
}

/// CHAP credentials of the test initiator.
#[derive(Clone, Debug)]
pub struct ChapLogin {
    pub username: String,
    pub secret: Vec<u8>,
    /// The CHAP_A list offered, e.g. "5" or "7,5".
    pub algorithms: String,
    /// Mutual CHAP: the target's expected name and secret; we challenge it and check its answer.
    pub target: Option<(String, Vec<u8>)>,
}

impl ChapLogin {
    pub fn new(username: &str, secret: &str) -> Self {
        ChapLogin { username: username.into(), secret: secret.into(), algorithms: "5".into(), target: None }
    }

    pub fn mutual(mut self, username: &str, secret: &str) -> Self {
        self.target = Some((username.into(), secret.into()));
        self
    }
}

/// The CHAP response H(id || secret || challenge) of RFC 1994 for CHAP_A `alg`.
fn chap_response(alg: &str, id: u8, secret: &[u8], challenge: &[u8]) -> Result<Vec<u8>> {
    fn run<D: sha2::Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        let mut d = D::new();
        d.update([id]);
        d.update(secret);
        d.update(challenge);
        d.finalize().to_vec()
    }
    Ok(match alg {
        "5" => run::<md5::Md5>(id, secret, challenge),
        "7" => run::<sha2::Sha256>(id, secret, challenge),
        "8" => run::<sha3::Sha3_256>(id, secret, challenge),
        _ => return proto(format!("target chose unknown CHAP_A={alg}")),
    })
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    let body = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).ok_or(Error::Protocol(format!("not hex: {s}")))?;
    if body.len() % 2 != 0 {
        return proto(format!("odd hex length: {s}"));
    }
    (0..body.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&body[i..i + 2], 16).map_err(|_| Error::Protocol(format!("bad hex: {s}"))))
        .collect()
}

impl Default for LoginOptions {
    fn default() -> Self {
        LoginOptions {
            initiator_name: "iqn.2024-06.dev.jumpstarter:uringtgt-tests".to_string(),
            security_stage: true,
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 262144,
            max_burst_length: 262144,
            first_burst_length: 65536,
            immediate_data: true,
            initial_r2t: false,
            isid: None,
            chap: None,
            bind: None,
        }
    }
}

impl LoginOptions {
    /// Every byte of a write solicited by R2T (InitialR2T=Yes, ImmediateData=No): the tests that
    /// leave a WRITE waiting for its Data-Out while other PDUs arrive.
    pub fn solicited_only() -> Self {
        LoginOptions { immediate_data: false, initial_r2t: true, ..LoginOptions::default() }
    }
}

/// The operational parameters in force after login.
#[derive(Clone, Debug)]
pub struct Negotiated {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The target's declared MaxRecvDataSegmentLength: the most we may put in one PDU.
    pub target_max_recv_data_segment_length: u32,
    /// Ours: the most the target may put in one PDU to us.
    pub our_max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub tsih: u16,
    /// Every key the target sent during login, in order.
    pub target_keys: Vec<(String, String)>,
}

impl Negotiated {
    pub fn key(&self, name: &str) -> Option<&str> {
        self.target_keys.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Result of one SCSI command.
#[derive(Clone, Debug, Default)]
pub struct Response {
    pub status: u8,
    /// iSCSI response code (0 = command completed at target).
    pub response: u8,
    pub sense: Vec<u8>,
    /// Data-In bytes, as many as the target sent.
    pub data: Vec<u8>,
    pub residual_overflow: bool,
    pub residual_underflow: bool,
    pub residual_count: u32,
    /// PDU counts, so tests can check that small segment lengths really split the transfer.
    pub data_in_pdus: u32,
    pub data_out_pdus: u32,
    pub r2ts: u32,
}

impl Response {
    pub fn is_good(&self) -> bool {
        self.response == 0 && self.status == STATUS_GOOD
    }
    /// Sense key, from fixed (0x70/0x71) or descriptor (0x72/0x73) format.
    pub fn sense_key(&self) -> Option<u8> {
        match self.sense.first().map(|b| b & 0x7f) {
            Some(0x70 | 0x71) if self.sense.len() > 2 => Some(self.sense[2] & 0x0f),
            Some(0x72 | 0x73) if self.sense.len() > 1 => Some(self.sense[1] & 0x0f),
            _ => None,
        }
    }
    /// (ASC, ASCQ).
    pub fn asc_ascq(&self) -> Option<(u8, u8)> {
        match self.sense.first().map(|b| b & 0x7f) {
            Some(0x70 | 0x71) if self.sense.len() > 13 => Some((self.sense[12], self.sense[13])),
            Some(0x72 | 0x73) if self.sense.len() > 3 => Some((self.sense[2], self.sense[3])),
            _ => None,
        }
    }
    /// Ok if GOOD, otherwise an error naming status and sense.
    pub fn check(self) -> Result<Response> {
        if self.is_good() {
            Ok(self)
        } else {
            proto(format!(
                "command failed: response {:#x} status {:#x} sense key {:?} asc/ascq {:?}",
                self.response,
                self.status,
                self.sense_key(),
                self.asc_ascq()
            ))
        }
    }
}

static ISID_COUNTER: AtomicU16 = AtomicU16::new(0);

/// A logged-in session on one connection.
pub struct Session {
    stream: TcpStream,
    pub negotiated: Negotiated,
    header_digest: bool,
    data_digest: bool,
    isid: [u8; 6],
    cmd_sn: u32,
    exp_stat_sn: u32,
    max_cmd_sn: u32,
    next_itt: u32,
    /// NOP-Ins from the target that we answered, for tests that want to see the pings.
    pub nops_answered: u32,
    pub retry_unit_attention: bool,
    /// (ASC, ASCQ) of every UNIT ATTENTION retried.
    pub unit_attentions: Vec<(u8, u8)>,
    /// The CHAP_A the target chose, once it did.
    pub chap_alg: String,
    /// Pipelined commands in flight, by ITT (see [`Session::submit`]).
    inflight: std::collections::HashMap<u32, InFlight>,
    /// Pipelined commands that completed while [`Session::submit`] waited for the window.
    completed: std::collections::VecDeque<(u32, Response)>,
}

/// A pipelined command waiting for its data and status.
struct InFlight {
    lun_field: u64,
    out: Vec<u8>,
    data_in: Vec<u8>,
    data_in_end: usize,
    exp_data_sn: u32,
    resp: Response,
}

/// Connection and timeout settings; `bind` picks the local address.
fn connect(addr: &str, bind: Option<IpAddr>) -> Result<TcpStream> {
    let stream = match bind {
        None => TcpStream::connect(addr)?,
        Some(local) => connect_from(addr.parse().map_err(|_| Error::Protocol(format!("bad address {addr}")))?, local)?,
    };
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A TCP connection from `local` (std cannot bind before connecting).
fn connect_from(peer: SocketAddr, local: IpAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let (SocketAddr::V4(peer), IpAddr::V4(local)) = (peer, local) else {
        return Err(std::io::Error::other("only IPv4 is supported"));
    };
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket(2) call; the descriptor is owned by the TcpStream below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns; the stream closes it on drop.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (l, p) = (sin(local, 0), sin(*peer.ip(), peer.port()));
    // SAFETY: l and p are valid sockaddr_in values of `len` bytes, alive for the calls.
    if unsafe { libc::bind(fd, (&l as *const libc::sockaddr_in).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::connect(fd, (&p as *const libc::sockaddr_in).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

impl Session {
    /// The CmdSN the target expects next, from the answer to an immediate NOP-Out (which takes
    /// no CmdSN of its own), for tests that drive a session by hand from here on.
    pub fn exp_cmd_sn_by_nop(&mut self) -> u32 {
        let mut nop = Pdu::new(OP_NOP_OUT);
        nop.bhs[0] |= 0x40;
        nop.bhs[1] = 0x80;
        put_u32(&mut nop.bhs, 16, 0x7000);
        put_u32(&mut nop.bhs, 20, RESERVED_TAG);
        self.send(&nop).unwrap();
        let r = self.recv().unwrap();
        assert_eq!((r.opcode(), r.itt()), (OP_NOP_IN, 0x7000), "the next PDU is the NOP-In");
        r.exp_cmd_sn()
    }

    /// Logs in to a normal session on `target`.
    pub fn login(addr: &str, target: &str, opts: &LoginOptions) -> Result<Session> {
        Self::login_inner(addr, Some(target), opts)
    }

    /// Logs in to a discovery session.
    pub fn login_discovery(addr: &str, opts: &LoginOptions) -> Result<Session> {
        Self::login_inner(addr, None, opts)
    }

    fn login_inner(addr: &str, target: Option<&str>, opts: &LoginOptions) -> Result<Session> {
        let stream = connect(addr, opts.bind)?;
        // Random-qualifier ISID (type 0b10), unique per session in this process so that two open
        // sessions are never mistaken for a reinstatement.
        let n = ISID_COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        let pid = std::process::id().to_be_bytes();
        let isid = opts.isid.unwrap_or([0x80, pid[1], pid[2], pid[3], n[0], n[1]]);
        let mut s = Session::unlogged(stream, opts, isid);
        s.do_login(target, opts)?;
        Ok(s)
    }

    fn do_login(&mut self, target: Option<&str>, opts: &LoginOptions) -> Result<()> {
        let mut leading = vec![("InitiatorName", opts.initiator_name.clone())];
        match target {
            Some(t) => {
                leading.push(("SessionType", "Normal".to_string()));
                leading.push(("TargetName", t.to_string()));
            }
            None => leading.push(("SessionType", "Discovery".to_string())),
        }
        // Asking for a digest still lists None as a fallback, so the target's choice is visible.
        let digest_key = |on: bool| if on { "CRC32C,None" } else { "None" }.to_string();
        let mut operational = vec![
            ("HeaderDigest", digest_key(opts.header_digest)),
            ("DataDigest", digest_key(opts.data_digest)),
            ("MaxRecvDataSegmentLength", opts.max_recv_data_segment_length.to_string()),
            ("ErrorRecoveryLevel", "0".to_string()),
        ];
        if target.is_some() {
            operational.extend([
                ("MaxConnections", "1".to_string()),
                ("InitialR2T", yes_no(opts.initial_r2t)),
                ("ImmediateData", yes_no(opts.immediate_data)),
                ("MaxBurstLength", opts.max_burst_length.to_string()),
                ("FirstBurstLength", opts.first_burst_length.to_string()),
                ("DefaultTime2Wait", "0".to_string()),
                ("DefaultTime2Retain", "0".to_string()),
                ("MaxOutstandingR2T", "1".to_string()),
                ("DataPDUInOrder", "Yes".to_string()),
                ("DataSequenceInOrder", "Yes".to_string()),
            ]);
        }

        let mut stage: u8 = if opts.security_stage || opts.chap.is_some() { 0 } else { 1 };
        // CHAP (RFC 7143 §12.1.3): AuthMethod, then CHAP_A, then CHAP_N/CHAP_R; T=1 only
        // with the response.
        let mut chap_keys: Vec<(&str, String)> = Vec::new();
        let mut chap_done = opts.chap.is_none();
        let mut our_challenge: Option<(u8, Vec<u8>)> = None;
        let mut sent_operational = false;
        let mut first = true;
        let itt = self.alloc_itt();
        let mut target_keys = Vec::new();
        for _round in 0..8 {
            let mut keys = Vec::new();
            if first {
                keys.extend(leading.iter().cloned());
            }
            if stage == 0 && first {
                let method = if opts.chap.is_some() { "CHAP" } else { "None" };
                keys.push(("AuthMethod", method.to_string()));
            }
            if stage == 0 {
                keys.append(&mut chap_keys);
            }
            if stage == 1 && !sent_operational {
                keys.extend(operational.iter().cloned());
                sent_operational = true;
            }
            first = false;
            let nsg = if stage == 0 { 1 } else { 3 };
            let mut req = Pdu::new(OP_LOGIN_REQ);
            req.bhs[0] |= FLAG_IMMEDIATE;
            // T=1: we are ready to move on (in the security stage only once CHAP is answered).
            let ready = stage != 0 || chap_done || keys.iter().any(|(k, _)| *k == "CHAP_R");
            req.bhs[1] = (u8::from(ready) << 7) | (stage << 2) | nsg;
            req.bhs[8..14].copy_from_slice(&self.isid);
            put_u16(&mut req.bhs, 14, 0); // TSIH 0: a new session
            put_u32(&mut req.bhs, 16, itt);
            put_u16(&mut req.bhs, 20, 0); // CID
            put_u32(&mut req.bhs, 24, self.cmd_sn);
            put_u32(&mut req.bhs, 28, self.exp_stat_sn);
            req.data = encode_keys(&keys);
            self.send(&req)?;

            let resp = self.recv_raw()?;
            if resp.opcode() != OP_LOGIN_RESP {
                return proto(format!("expected Login Response, got opcode {:#04x}", resp.opcode()));
            }
            let (class, detail) = (resp.bhs[36], resp.bhs[37]);
            if class != 0 {
                return Err(Error::Login { class, detail });
            }
            if resp.itt() != itt {
                return proto("Login Response ITT mismatch");
            }
            if resp.flags() & 0x40 != 0 {
                return proto("Login Response continuation (C bit) is not supported by the test initiator");
            }
            self.exp_stat_sn = resp.stat_sn().wrapping_add(1);
            self.update_window(&resp);
            let keys = parse_keys(&resp.data)?;
            for (k, v) in &keys {
                if v == "Reject" || v == "Irrelevant" || v == "NotUnderstood" {
                    // Tolerated for keys the target does not handle; an essential key being refused
                    // will show up as a wrong value below.
                    eprintln!("initiator: target answered {k}={v}");
                }
            }
            if let (0, Some(chap)) = (stage, &opts.chap) {
                let get = |name: &str| keys.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
                if let Some(c) = get("CHAP_C") {
                    let alg = get("CHAP_A").ok_or(Error::Protocol("CHAP_C without CHAP_A".into()))?;
                    let id: u8 = get("CHAP_I")
                        .and_then(|i| i.parse().ok())
                        .ok_or(Error::Protocol("CHAP_C without a usable CHAP_I".into()))?;
                    let r = chap_response(&alg, id, &chap.secret, &unhex(&c)?)?;
                    chap_keys.push(("CHAP_N", chap.username.clone()));
                    chap_keys.push(("CHAP_R", hex(&r)));
                    if chap.target.is_some() {
                        let ours: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(31) ^ id).collect();
                        let our_id = id.wrapping_add(1);
                        chap_keys.push(("CHAP_I", our_id.to_string()));
                        chap_keys.push(("CHAP_C", hex(&ours)));
                        our_challenge = Some((our_id, ours));
                    }
                    self.chap_alg = alg;
                } else if get("AuthMethod").as_deref() == Some("CHAP") {
                    chap_keys.push(("CHAP_A", chap.algorithms.clone()));
                } else if let Some(r) = get("CHAP_R") {
                    let (Some((name, secret)), Some((id, c))) = (&chap.target, &our_challenge) else {
                        return proto("target sent CHAP_R unasked");
                    };
                    if get("CHAP_N").as_deref() != Some(name.as_str()) {
                        return proto(format!("target's CHAP_N {:?} is not {name:?}", get("CHAP_N")));
                    }
                    if unhex(&r)? != chap_response(&self.chap_alg, *id, secret, c)? {
                        return Err(Error::MutualChap);
                    }
                    chap_done = true;
                } else if resp.flags() & 0x80 != 0 {
                    if chap.target.is_some() {
                        return proto("target moved on without answering our CHAP challenge");
                    }
                    chap_done = true;
                }
            }
            target_keys.extend(keys);
            let transit = resp.flags() & 0x80 != 0;
            let csg = (resp.flags() >> 2) & 3;
            let tnsg = resp.flags() & 3;
            if csg != stage {
                return proto(format!("Login Response CSG {csg} while we are in stage {stage}"));
            }
            if transit {
                if tnsg == 3 {
                    self.negotiated.tsih = get_u16(&resp.bhs, 14);
                    if self.negotiated.tsih == 0 {
                        return proto("final Login Response with TSIH 0");
                    }
                    self.apply_keys(&target_keys, opts)?;
                    return Ok(());
                }
                if tnsg <= stage {
                    return proto(format!("Login Response moves backwards to stage {tnsg}"));
                }
                stage = tnsg;
            }
        }
        proto("login did not complete in 8 round trips")
    }

    fn apply_keys(&mut self, keys: &[(String, String)], opts: &LoginOptions) -> Result<()> {
        let n = &mut self.negotiated;
        n.target_keys = keys.to_vec();
        // RFC 7143 defaults (combined with our offer) for keys the target did not answer.
        n.header_digest = false;
        n.data_digest = false;
        n.max_burst_length = opts.max_burst_length.min(262144);
        n.first_burst_length = opts.first_burst_length.min(65536);
        n.immediate_data = opts.immediate_data;
        n.initial_r2t = true;
        let num = |k: &str, v: &str| -> Result<u32> {
            v.parse::<u32>().map_err(|_| Error::Protocol(format!("bad numeric value {k}={v}")))
        };
        for (k, v) in keys {
            match k.as_str() {
                "HeaderDigest" | "DataDigest" => {
                    let on = match v.as_str() {
                        "CRC32C" => true,
                        "None" => false,
                        _ => return proto(format!("unexpected {k}={v}")),
                    };
                    let offered = if k == "HeaderDigest" { opts.header_digest } else { opts.data_digest };
                    if on && !offered {
                        return proto(format!("target chose {k}={v}, which we did not offer"));
                    }
                    if k == "HeaderDigest" {
                        n.header_digest = on;
                    } else {
                        n.data_digest = on;
                    }
                }
                "MaxRecvDataSegmentLength" => {
                    let v = num(k, v)?;
                    if !(512..=16_777_215).contains(&v) {
                        return proto(format!("MaxRecvDataSegmentLength={v} out of range"));
                    }
                    n.target_max_recv_data_segment_length = v;
                }
                "MaxBurstLength" => {
                    let v = num(k, v)?;
                    if v > opts.max_burst_length {
                        return proto(format!("MaxBurstLength={v} above our offer"));
                    }
                    n.max_burst_length = v;
                }
                "FirstBurstLength" => {
                    let v = num(k, v)?;
                    if v > opts.first_burst_length {
                        return proto(format!("FirstBurstLength={v} above our offer"));
                    }
                    n.first_burst_length = v;
                }
                "ImmediateData" => {
                    let yes = v == "Yes";
                    if yes && !opts.immediate_data {
                        return proto("ImmediateData=Yes although we offered No (result is AND)");
                    }
                    n.immediate_data = yes;
                }
                "InitialR2T" => {
                    let yes = v == "Yes";
                    if !yes && opts.initial_r2t {
                        return proto("InitialR2T=No although we offered Yes (result is OR)");
                    }
                    n.initial_r2t = yes;
                }
                _ => {}
            }
        }
        if n.first_burst_length > n.max_burst_length {
            return proto("FirstBurstLength exceeds MaxBurstLength");
        }
        self.header_digest = n.header_digest;
        self.data_digest = n.data_digest;
        Ok(())
    }

    fn alloc_itt(&mut self) -> u32 {
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1);
        if self.next_itt == RESERVED_TAG {
            self.next_itt = 1;
        }
        itt
    }

    fn update_window(&mut self, pdu: &Pdu) {
        // Serial-number arithmetic (RFC 1982): take MaxCmdSN only if it moves forward.
        let m = pdu.max_cmd_sn();
        if (m.wrapping_sub(self.max_cmd_sn) as i32) > 0 {
            self.max_cmd_sn = m;
        }
    }

    pub fn send(&mut self, pdu: &Pdu) -> Result<()> {
        let bytes = pdu.encode(self.header_digest, self.data_digest);
        self.stream.write_all(&bytes)?;
        Ok(())
    }

    /// A second handle on the connection's socket (to write from another thread while this
    /// one reads).
    pub fn stream_clone(&self) -> TcpStream {
        self.stream.try_clone().expect("clone the session's socket")
    }

    /// The next PDU as it arrives: no ping answering, a Reject returned rather than an error.
    pub fn recv_raw(&mut self) -> Result<Pdu> {
        Pdu::read_from(&mut self.stream, self.header_digest, self.data_digest)
    }

    /// Next PDU for us, answering target pings (NOP-In with a TTT) on the way.
    pub fn recv(&mut self) -> Result<Pdu> {
        loop {
            let pdu = self.recv_raw()?;
            if pdu.data_segment_length() > self.negotiated.our_max_recv_data_segment_length {
                return proto(format!(
                    "opcode {:#04x}: data segment {} exceeds our MaxRecvDataSegmentLength {}",
                    pdu.opcode(),
                    pdu.data_segment_length(),
                    self.negotiated.our_max_recv_data_segment_length
                ));
            }
            if !self.handle_unsolicited(&pdu)? {
                return Ok(pdu);
            }
        }
    }

    /// Handles PDUs the target sends on its own; false when `pdu` belongs to a task.
    fn handle_unsolicited(&mut self, pdu: &Pdu) -> Result<bool> {
        match pdu.opcode() {
            OP_NOP_IN if pdu.itt() == RESERVED_TAG => {
                // Unsolicited: StatSN is not advanced (RFC 7143 11.19).
                self.update_window(pdu);
                if pdu.ttt() != RESERVED_TAG {
                    self.answer_nop(pdu)?;
                }
                Ok(true)
            }
            OP_ASYNC => {
                self.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
                self.update_window(pdu);
                eprintln!("initiator: async message event {}", pdu.bhs[36]);
                Ok(true)
            }
            OP_REJECT => Err(Error::Reject(pdu.bhs[2])),
            _ => Ok(false),
        }
    }

    /// Stays idle for `dur` while answering the target's pings; any other PDU is an error.
    pub fn idle(&mut self, dur: Duration) -> Result<()> {
        let deadline = Instant::now() + dur;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            // Wait for the first byte with a short timeout, then read the PDU with the normal one
            // so a timeout can never split a PDU.
            self.stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let mut b = [0u8; 1];
            let r = self.stream.peek(&mut b);
            self.stream.set_read_timeout(Some(IO_TIMEOUT))?;
            match r {
                Ok(0) => return proto("target closed the idle connection"),
                Ok(_) => {
                    let pdu = self.recv_raw()?;
                    if !self.handle_unsolicited(&pdu)? {
                        return proto(format!("unexpected opcode {:#04x} on an idle connection", pdu.opcode()));
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Ok(())
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn answer_nop(&mut self, nop_in: &Pdu) -> Result<()> {
        let mut out = Pdu::new(OP_NOP_OUT);
        out.bhs[0] |= FLAG_IMMEDIATE;
        out.bhs[1] = FLAG_FINAL;
        out.bhs[8..16].copy_from_slice(&nop_in.bhs[8..16]);
        put_u32(&mut out.bhs, 16, RESERVED_TAG);
        put_u32(&mut out.bhs, 20, nop_in.ttt());
        put_u32(&mut out.bhs, 24, self.cmd_sn); // immediate: not advanced
        put_u32(&mut out.bhs, 28, self.exp_stat_sn);
        out.data = nop_in.data.clone();
        self.nops_answered += 1;
        self.send(&out)
    }

    /// Our own ping: NOP-Out with an ITT, answered by a NOP-In echoing the data.
    pub fn nop(&mut self, ping: &[u8]) -> Result<()> {
        let itt = self.alloc_itt();
        let mut out = Pdu::new(OP_NOP_OUT);
        out.bhs[0] |= FLAG_IMMEDIATE;
        out.bhs[1] = FLAG_FINAL;
        put_u32(&mut out.bhs, 16, itt);
        put_u32(&mut out.bhs, 20, RESERVED_TAG);
        put_u32(&mut out.bhs, 24, self.cmd_sn);
        put_u32(&mut out.bhs, 28, self.exp_stat_sn);
        out.data = ping.to_vec();
        self.send(&out)?;
        let resp = self.recv()?;
        if resp.opcode() != OP_NOP_IN || resp.itt() != itt {
            return proto(format!("expected NOP-In for ITT {itt}, got opcode {:#04x}", resp.opcode()));
        }
        self.exp_stat_sn = resp.stat_sn().wrapping_add(1);
        self.update_window(&resp);
        if resp.data != ping {
            return proto("NOP-In did not echo the ping data");
        }
        Ok(())
    }

    fn take_cmd_sn(&mut self) -> Result<u32> {
        // One command at a time, so a closed window means the target never reopened it.
        if (self.max_cmd_sn.wrapping_sub(self.cmd_sn) as i32) < 0 {
            return proto(format!("command window closed: CmdSN {} > MaxCmdSN {}", self.cmd_sn, self.max_cmd_sn));
        }
        let sn = self.cmd_sn;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        Ok(sn)
    }

    /// SendTargets=All in this (discovery) session: (target name, addresses).
    pub fn send_targets(&mut self) -> Result<Vec<(String, Vec<String>)>> {
        let mut text = Vec::new();
        let mut ttt = RESERVED_TAG;
        let mut payload = encode_keys(&[("SendTargets", "All".to_string())]);
        let itt = self.alloc_itt();
        loop {
            let mut req = Pdu::new(OP_TEXT_REQ);
            req.bhs[1] = FLAG_FINAL;
            put_u32(&mut req.bhs, 16, itt);
            put_u32(&mut req.bhs, 20, ttt);
            let sn = self.take_cmd_sn()?;
            put_u32(&mut req.bhs, 24, sn);
            put_u32(&mut req.bhs, 28, self.exp_stat_sn);
            req.data = std::mem::take(&mut payload);
            self.send(&req)?;
            let resp = self.recv()?;
            if resp.opcode() != OP_TEXT_RESP || resp.itt() != itt {
                return proto(format!("expected Text Response, got opcode {:#04x}", resp.opcode()));
            }
            self.exp_stat_sn = resp.stat_sn().wrapping_add(1);
            self.update_window(&resp);
            text.extend_from_slice(&resp.data);
            let fin = resp.flags() & FLAG_FINAL != 0;
            let cont = resp.flags() & 0x40 != 0;
            if fin && !cont {
                break;
            }
            // More to come: an empty request with the target's TTT asks for it.
            ttt = resp.ttt();
        }
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for (k, v) in parse_keys(&text)? {
            match k.as_str() {
                "TargetName" => out.push((v, Vec::new())),
                "TargetAddress" => match out.last_mut() {
                    Some(t) => t.1.push(v),
                    None => return proto("TargetAddress before any TargetName"),
                },
                _ => {}
            }
        }
        Ok(out)
    }

    /// Runs one SCSI command: `data_out` for writes, `expected_in` bytes for reads. A UNIT ATTENTION
    /// (e.g. power on/reset on a new I_T nexus) is recorded and the command retried, as initiators
    /// do, unless `retry_unit_attention` is off.
    pub fn command(&mut self, lun: u16, cdb: &[u8], data_out: Option<&[u8]>, expected_in: u32) -> Result<Response> {
        let mut tries = 0;
        loop {
            let r = self.command_once(lun, cdb, data_out, expected_in)?;
            if !self.retry_unit_attention || r.status != STATUS_CHECK_CONDITION || r.sense_key() != Some(0x06) {
                return Ok(r);
            }
            self.unit_attentions.push(r.asc_ascq().unwrap_or_default());
            tries += 1;
            if tries > 4 {
                return proto("UNIT ATTENTION still pending after 4 retries");
            }
        }
    }

    fn command_once(&mut self, lun: u16, cdb: &[u8], data_out: Option<&[u8]>, expected_in: u32) -> Result<Response> {
        assert!(cdb.len() <= 16, "CDBs longer than 16 bytes need an AHS");
        assert!(data_out.is_none() || expected_in == 0, "bidirectional commands are not supported");
        let out = data_out.unwrap_or(&[]);
        let edtl = if data_out.is_some() { out.len() as u32 } else { expected_in };
        let itt = self.alloc_itt();
        let lun_field = encode_lun(lun);
        let n = self.negotiated.clone();
        let mrdsl = n.target_max_recv_data_segment_length as usize;

        // Unsolicited data: immediate data in the command PDU, then Data-Out without an R2T
        // (InitialR2T=No), together at most FirstBurstLength.
        let unsolicited_limit = if data_out.is_some() {
            let mut lim = 0;
            if n.immediate_data {
                lim = out.len().min(n.first_burst_length as usize).min(mrdsl);
            }
            if !n.initial_r2t {
                lim = out.len().min(n.first_burst_length as usize);
            }
            lim
        } else {
            0
        };
        let immediate_len = if n.immediate_data { unsolicited_limit.min(mrdsl) } else { 0 };

        let mut cmd = Pdu::new(OP_SCSI_CMD);
        let unsolicited_data_out = unsolicited_limit > immediate_len;
        cmd.bhs[1] = 0x01; // ATTR: simple
        if !unsolicited_data_out {
            cmd.bhs[1] |= FLAG_FINAL;
        }
        if data_out.is_some() {
            cmd.bhs[1] |= 0x20; // W
        } else if expected_in > 0 {
            cmd.bhs[1] |= 0x40; // R
        }
        put_u64(&mut cmd.bhs, 8, lun_field);
        put_u32(&mut cmd.bhs, 16, itt);
        put_u32(&mut cmd.bhs, 20, edtl);
        let sn = self.take_cmd_sn()?;
        put_u32(&mut cmd.bhs, 24, sn);
        put_u32(&mut cmd.bhs, 28, self.exp_stat_sn);
        cmd.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        cmd.data = out[..immediate_len].to_vec();
        self.send(&cmd)?;

        let mut resp = Response::default();
        if unsolicited_data_out {
            resp.data_out_pdus +=
                self.send_data_out(itt, lun_field, RESERVED_TAG, out, immediate_len, unsolicited_limit, mrdsl)?;
        }

        let mut data_in = vec![0u8; expected_in as usize];
        let mut data_in_end = 0usize; // bytes received so far; Data-In must arrive in order
        let mut exp_data_sn = 0u32;
        let mut exp_r2t_sn = 0u32;
        let mut r2t_seen_end = unsolicited_limit; // data already sent or requested
        loop {
            let pdu = self.recv()?;
            match pdu.opcode() {
                OP_DATA_IN => {
                    if pdu.itt() != itt {
                        return proto(format!("Data-In for ITT {:#x}, expected {itt:#x}", pdu.itt()));
                    }
                    if data_out.is_some() {
                        return proto("Data-In for a write command");
                    }
                    let data_sn = get_u32(&pdu.bhs, 36);
                    if data_sn != exp_data_sn {
                        return proto(format!("Data-In DataSN {data_sn}, expected {exp_data_sn}"));
                    }
                    exp_data_sn += 1;
                    let off = get_u32(&pdu.bhs, 40) as usize;
                    // DataPDUInOrder=Yes and DataSequenceInOrder=Yes: offsets must be contiguous.
                    if off != data_in_end {
                        return proto(format!("Data-In buffer offset {off}, expected {data_in_end}"));
                    }
                    let end = off + pdu.data.len();
                    if end > data_in.len() {
                        return proto(format!("Data-In to offset {end} beyond expected length {expected_in}"));
                    }
                    data_in[off..end].copy_from_slice(&pdu.data);
                    data_in_end = end;
                    resp.data_in_pdus += 1;
                    self.update_window(&pdu);
                    let flags = pdu.flags();
                    if flags & 0x01 != 0 {
                        // S bit: status rides on this final Data-In, no SCSI Response follows.
                        if flags & FLAG_FINAL == 0 {
                            return proto("Data-In with S bit but without F bit");
                        }
                        self.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
                        resp.status = pdu.bhs[3];
                        resp.residual_overflow = flags & 0x04 != 0;
                        resp.residual_underflow = flags & 0x02 != 0;
                        resp.residual_count = get_u32(&pdu.bhs, 44);
                        data_in.truncate(data_in_end);
                        resp.data = data_in;
                        return Ok(resp);
                    }
                }
                OP_R2T => {
                    if pdu.itt() != itt {
                        return proto(format!("R2T for ITT {:#x}, expected {itt:#x}", pdu.itt()));
                    }
                    if data_out.is_none() {
                        return proto("R2T for a command without Data-Out");
                    }
                    let r2t_sn = get_u32(&pdu.bhs, 36);
                    if r2t_sn != exp_r2t_sn {
                        return proto(format!("R2TSN {r2t_sn}, expected {exp_r2t_sn}"));
                    }
                    exp_r2t_sn += 1;
                    let off = get_u32(&pdu.bhs, 40) as usize;
                    let len = get_u32(&pdu.bhs, 44) as usize;
                    if len == 0 || len > n.max_burst_length as usize {
                        return proto(format!("R2T desired length {len} not in 1..=MaxBurstLength"));
                    }
                    if off + len > out.len() {
                        return proto(format!("R2T for {off}+{len} beyond the {} bytes of the command", out.len()));
                    }
                    if off < unsolicited_limit {
                        return proto(format!("R2T at offset {off} asks again for unsolicited data"));
                    }
                    r2t_seen_end = r2t_seen_end.max(off + len);
                    self.update_window(&pdu);
                    resp.r2ts += 1;
                    resp.data_out_pdus += self.send_data_out(itt, lun_field, pdu.ttt(), out, off, off + len, mrdsl)?;
                }
                OP_SCSI_RESP => {
                    if pdu.itt() != itt {
                        return proto(format!("SCSI Response for ITT {:#x}, expected {itt:#x}", pdu.itt()));
                    }
                    self.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
                    self.update_window(&pdu);
                    let flags = pdu.flags();
                    resp.response = pdu.bhs[2];
                    resp.status = pdu.bhs[3];
                    resp.residual_overflow = flags & 0x04 != 0;
                    resp.residual_underflow = flags & 0x02 != 0;
                    resp.residual_count = get_u32(&pdu.bhs, 44);
                    let exp_data_sn_field = get_u32(&pdu.bhs, 36);
                    // RFC 7143 11.4.8 wants the Data-In count here, but tgtd sends 0; only a
                    // non-zero value is checked.
                    if data_out.is_none() && exp_data_sn_field != 0 && exp_data_sn_field != exp_data_sn {
                        return proto(format!(
                            "SCSI Response ExpDataSN {exp_data_sn_field}, but {exp_data_sn} Data-In were sent"
                        ));
                    }
                    if pdu.data.len() >= 2 {
                        let sense_len = get_u16(&pdu.data, 0) as usize;
                        if 2 + sense_len > pdu.data.len() {
                            return proto("SenseLength beyond the data segment");
                        }
                        resp.sense = pdu.data[2..2 + sense_len].to_vec();
                    }
                    if data_out.is_some() && resp.is_good() && r2t_seen_end < out.len() && !resp.residual_underflow {
                        return proto(format!(
                            "write completed GOOD after {r2t_seen_end} of {} bytes without underflow",
                            out.len()
                        ));
                    }
                    data_in.truncate(data_in_end);
                    resp.data = data_in;
                    return Ok(resp);
                }
                op => return proto(format!("unexpected opcode {op:#04x} during a command")),
            }
        }
    }

    /// Sends `out[from..to]` as one Data-Out sequence, each PDU at most `mrdsl` bytes.
    #[allow(clippy::too_many_arguments)]
    fn send_data_out(
        &mut self,
        itt: u32,
        lun: u64,
        ttt: u32,
        out: &[u8],
        from: usize,
        to: usize,
        mrdsl: usize,
    ) -> Result<u32> {
        let mut off = from;
        let mut data_sn = 0u32;
        while off < to {
            let len = (to - off).min(mrdsl);
            let mut pdu = Pdu::new(OP_DATA_OUT);
            if off + len == to {
                pdu.bhs[1] = FLAG_FINAL;
            }
            put_u64(&mut pdu.bhs, 8, lun);
            put_u32(&mut pdu.bhs, 16, itt);
            put_u32(&mut pdu.bhs, 20, ttt);
            put_u32(&mut pdu.bhs, 28, self.exp_stat_sn);
            put_u32(&mut pdu.bhs, 36, data_sn);
            put_u32(&mut pdu.bhs, 40, off as u32);
            pdu.data = out[off..off + len].to_vec();
            self.send(&pdu)?;
            data_sn += 1;
            off += len;
        }
        Ok(data_sn)
    }

    // ---- raw PDUs, for tests that break the protocol on purpose ----

    /// A SCSI Command PDU with the next ITT and CmdSN (advanced): W set when `edtl` > 0 and
    /// `write`, F as given, `immediate` as its data segment. Returns (ITT, PDU); nothing is sent.
    pub fn raw_command(
        &mut self,
        lun: u16,
        cdb: &[u8],
        edtl: u32,
        write: bool,
        final_bit: bool,
        immediate: &[u8],
    ) -> Result<(u32, Pdu)> {
        let itt = self.alloc_itt();
        let mut cmd = Pdu::new(OP_SCSI_CMD);
        cmd.bhs[1] = 0x01 | if final_bit { FLAG_FINAL } else { 0 };
        if edtl > 0 {
            cmd.bhs[1] |= if write { 0x20 } else { 0x40 };
        }
        put_u64(&mut cmd.bhs, 8, encode_lun(lun));
        put_u32(&mut cmd.bhs, 16, itt);
        put_u32(&mut cmd.bhs, 20, edtl);
        let sn = self.take_cmd_sn()?;
        put_u32(&mut cmd.bhs, 24, sn);
        put_u32(&mut cmd.bhs, 28, self.exp_stat_sn);
        cmd.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        cmd.data = immediate.to_vec();
        Ok((itt, cmd))
    }

    /// A Data-Out PDU with exactly the fields given.
    #[allow(clippy::too_many_arguments)]
    pub fn raw_data_out(
        &self,
        lun: u16,
        itt: u32,
        ttt: u32,
        data_sn: u32,
        offset: u32,
        final_bit: bool,
        data: &[u8],
    ) -> Pdu {
        let mut pdu = Pdu::new(OP_DATA_OUT);
        pdu.bhs[1] = if final_bit { FLAG_FINAL } else { 0 };
        put_u64(&mut pdu.bhs, 8, encode_lun(lun));
        put_u32(&mut pdu.bhs, 16, itt);
        put_u32(&mut pdu.bhs, 20, ttt);
        put_u32(&mut pdu.bhs, 28, self.exp_stat_sn);
        put_u32(&mut pdu.bhs, 36, data_sn);
        put_u32(&mut pdu.bhs, 40, offset);
        pdu.data = data.to_vec();
        pdu
    }

    // ---- pipelining: many commands in flight ----

    /// Commands submitted with [`Self::submit`] whose status has not been taken yet.
    pub fn in_flight(&self) -> usize {
        self.inflight.len() + self.completed.len()
    }

    /// Sends a command without waiting for it (waiting only while the target's CmdSN window
    /// is closed) and returns its ITT; [`Self::next_completion`] gives its response. Writes
    /// send immediate and unsolicited data as negotiated and answer R2Ts as they come.
    pub fn submit(&mut self, lun: u16, cdb: &[u8], data_out: Option<&[u8]>, expected_in: u32) -> Result<u32> {
        assert!(data_out.is_none() || expected_in == 0, "bidirectional commands are not supported");
        while (self.max_cmd_sn.wrapping_sub(self.cmd_sn) as i32) < 0 {
            if self.inflight.is_empty() {
                return proto(format!("command window closed: CmdSN {} > MaxCmdSN {}", self.cmd_sn, self.max_cmd_sn));
            }
            let done = self.pump()?;
            self.completed.extend(done);
        }
        let out = data_out.unwrap_or(&[]).to_vec();
        let n = self.negotiated.clone();
        let mrdsl = n.target_max_recv_data_segment_length as usize;
        let first_burst = out.len().min(n.first_burst_length as usize);
        let immediate = if n.immediate_data { first_burst.min(mrdsl) } else { 0 };
        let unsolicited = if n.initial_r2t { immediate } else { first_burst };
        let edtl = if data_out.is_some() { out.len() as u32 } else { expected_in };
        if cdb.len() > 16 {
            return proto("CDBs longer than 16 bytes need an AHS");
        }
        let (itt, cmd) =
            self.raw_command(lun, cdb, edtl, data_out.is_some(), unsolicited == immediate, &out[..immediate])?;
        self.send(&cmd)?;
        let lun_field = encode_lun(lun);
        if unsolicited > immediate {
            self.send_data_out(itt, lun_field, RESERVED_TAG, &out, immediate, unsolicited, mrdsl)?;
        }
        let resp = Response::default();
        let data_in = vec![0u8; expected_in as usize];
        self.inflight.insert(itt, InFlight { lun_field, out, data_in, data_in_end: 0, exp_data_sn: 0, resp });
        Ok(itt)
    }

    /// Waits for the next pipelined command to complete: (ITT, response).
    pub fn next_completion(&mut self) -> Result<(u32, Response)> {
        loop {
            if let Some(c) = self.completed.pop_front() {
                return Ok(c);
            }
            if self.inflight.is_empty() {
                return proto("no command in flight");
            }
            if let Some(c) = self.pump()? {
                return Ok(c);
            }
        }
    }

    /// Handles one PDU for the pipelined commands; Some when it completed one.
    fn pump(&mut self) -> Result<Option<(u32, Response)>> {
        let pdu = self.recv()?;
        let itt = pdu.itt();
        let Some(f) = self.inflight.get_mut(&itt) else {
            return proto(format!("opcode {:#04x} for ITT {itt:#x}, which is not in flight", pdu.opcode()));
        };
        match pdu.opcode() {
            OP_DATA_IN => {
                let data_sn = get_u32(&pdu.bhs, 36);
                let off = get_u32(&pdu.bhs, 40) as usize;
                if data_sn != f.exp_data_sn || off != f.data_in_end || off + pdu.data.len() > f.data_in.len() {
                    return proto(format!("Data-In DataSN {data_sn} offset {off} out of order or too long"));
                }
                f.exp_data_sn += 1;
                f.data_in[off..off + pdu.data.len()].copy_from_slice(&pdu.data);
                f.data_in_end += pdu.data.len();
                f.resp.data_in_pdus += 1;
                self.update_window(&pdu);
                if pdu.flags() & 0x01 != 0 {
                    let mut f = self.inflight.remove(&itt).expect("present");
                    self.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
                    f.resp.status = pdu.bhs[3];
                    f.resp.residual_overflow = pdu.flags() & 0x04 != 0;
                    f.resp.residual_underflow = pdu.flags() & 0x02 != 0;
                    f.resp.residual_count = get_u32(&pdu.bhs, 44);
                    f.data_in.truncate(f.data_in_end);
                    f.resp.data = f.data_in;
                    return Ok(Some((itt, f.resp)));
                }
                Ok(None)
            }
            OP_R2T => {
                let (off, len) = (get_u32(&pdu.bhs, 40) as usize, get_u32(&pdu.bhs, 44) as usize);
                if off + len > f.out.len() {
                    return proto(format!("R2T for {off}+{len} beyond the {} bytes of the command", f.out.len()));
                }
                f.resp.r2ts += 1;
                let (lun_field, out) = (f.lun_field, std::mem::take(&mut f.out));
                self.update_window(&pdu);
                let mrdsl = self.negotiated.target_max_recv_data_segment_length as usize;
                let sent = self.send_data_out(itt, lun_field, pdu.ttt(), &out, off, off + len, mrdsl);
                let f = self.inflight.get_mut(&itt).expect("present");
                f.out = out;
                f.resp.data_out_pdus += sent?;
                Ok(None)
            }
            OP_SCSI_RESP => {
                let mut f = self.inflight.remove(&itt).expect("present");
                self.exp_stat_sn = pdu.stat_sn().wrapping_add(1);
                self.update_window(&pdu);
                f.resp.response = pdu.bhs[2];
                f.resp.status = pdu.bhs[3];
                f.resp.residual_overflow = pdu.flags() & 0x04 != 0;
                f.resp.residual_underflow = pdu.flags() & 0x02 != 0;
                f.resp.residual_count = get_u32(&pdu.bhs, 44);
                if pdu.data.len() >= 2 {
                    let sense_len = get_u16(&pdu.data, 0) as usize;
                    f.resp.sense = pdu.data[2..(2 + sense_len).min(pdu.data.len())].to_vec();
                }
                f.data_in.truncate(f.data_in_end);
                f.resp.data = f.data_in;
                Ok(Some((itt, f.resp)))
            }
            op => proto(format!("unexpected opcode {op:#04x} for a pipelined command")),
        }
    }

    pub fn test_unit_ready(&mut self, lun: u16) -> Result<Response> {
        self.command(lun, &[0u8; 6], None, 0)
    }

    pub fn inquiry(&mut self, lun: u16, evpd: Option<u8>, alloc: u16) -> Result<Response> {
        let mut cdb = [0u8; 6];
        cdb[0] = 0x12;
        if let Some(page) = evpd {
            cdb[1] = 0x01;
            cdb[2] = page;
        }
        put_u16(&mut cdb, 3, alloc);
        self.command(lun, &cdb, None, alloc as u32)
    }

    /// (number of blocks, block size).
    pub fn read_capacity16(&mut self, lun: u16) -> Result<(u64, u32)> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10; // service action READ CAPACITY (16)
        put_u32(&mut cdb, 10, 32);
        let r = self.command(lun, &cdb, None, 32)?.check()?;
        if r.data.len() < 12 {
            return proto(format!("READ CAPACITY (16) returned {} bytes", r.data.len()));
        }
        Ok((get_u64(&r.data, 0) + 1, get_u32(&r.data, 8)))
    }

    /// The LUN ids from REPORT LUNS.
    pub fn report_luns(&mut self) -> Result<Vec<u16>> {
        let mut cdb = [0u8; 12];
        cdb[0] = 0xa0;
        let alloc = 4096u32;
        put_u32(&mut cdb, 6, alloc);
        let r = self.command(0, &cdb, None, alloc)?.check()?;
        if r.data.len() < 8 {
            return proto("REPORT LUNS shorter than its header");
        }
        let list_len = get_u32(&r.data, 0) as usize;
        let end = (8 + list_len).min(r.data.len());
        Ok(r.data[8..end]
            .chunks_exact(8)
            .map(|e| {
                let addr = get_u16(e, 0);
                if addr >> 14 == 1 {
                    addr & 0x3fff
                } else {
                    addr & 0xff
                }
            })
            .collect())
    }

    pub fn sync_cache(&mut self, lun: u16) -> Result<Response> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x35;
        self.command(lun, &cdb, None, 0)
    }

    pub fn read10(&mut self, lun: u16, lba: u32, blocks: u16, block_size: u32) -> Result<Response> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        put_u32(&mut cdb, 2, lba);
        put_u16(&mut cdb, 7, blocks);
        self.command(lun, &cdb, None, blocks as u32 * block_size)
    }

    pub fn write10(&mut self, lun: u16, lba: u32, data: &[u8], block_size: u32) -> Result<Response> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        put_u32(&mut cdb, 2, lba);
        put_u16(&mut cdb, 7, (data.len() as u32 / block_size) as u16);
        self.command(lun, &cdb, Some(data), 0)
    }

    pub fn read16(&mut self, lun: u16, lba: u64, blocks: u32, block_size: u32) -> Result<Response> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        put_u64(&mut cdb, 2, lba);
        put_u32(&mut cdb, 10, blocks);
        self.command(lun, &cdb, None, blocks * block_size)
    }

    pub fn write16(&mut self, lun: u16, lba: u64, data: &[u8], block_size: u32) -> Result<Response> {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x8a;
        put_u64(&mut cdb, 2, lba);
        put_u32(&mut cdb, 10, data.len() as u32 / block_size);
        self.command(lun, &cdb, Some(data), 0)
    }

    /// Logout (close the session) and wait for the response.
    pub fn logout(mut self) -> Result<()> {
        let itt = self.alloc_itt();
        let mut req = Pdu::new(OP_LOGOUT_REQ);
        req.bhs[0] |= FLAG_IMMEDIATE;
        req.bhs[1] = FLAG_FINAL; // reason 0: close the session
        put_u32(&mut req.bhs, 16, itt);
        put_u32(&mut req.bhs, 24, self.cmd_sn);
        put_u32(&mut req.bhs, 28, self.exp_stat_sn);
        self.send(&req)?;
        let resp = self.recv()?;
        if resp.opcode() != OP_LOGOUT_RESP || resp.itt() != itt {
            return proto(format!("expected Logout Response, got opcode {:#04x}", resp.opcode()));
        }
        if resp.bhs[2] != 0 {
            return proto(format!("Logout Response code {}", resp.bhs[2]));
        }
        Ok(())
    }
}

/// One Login Request of a login replayed as a real initiator sends it: the stage it is sent
/// in, whether it asks to move on (T) and to which stage, and its keys, exactly.
#[derive(Debug, Clone)]
pub struct LoginStep {
    pub csg: u8,
    pub nsg: u8,
    pub transit: bool,
    pub keys: Vec<(String, String)>,
}

impl LoginStep {
    pub fn new(csg: u8, nsg: u8, keys: &[(&str, &str)]) -> Self {
        let keys = keys.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        LoginStep { csg, nsg, transit: true, keys }
    }
}

/// What the target answered to one Login Request of a scripted login.
#[derive(Debug, Clone)]
pub struct LoginAnswer {
    pub csg: u8,
    pub nsg: u8,
    pub transit: bool,
    pub keys: Vec<(String, String)>,
}

/// The value an initiator offered for `key`, if it sent one.
fn offered<'a>(steps: &'a [LoginStep], key: &str) -> Option<&'a str> {
    steps.iter().flat_map(|s| &s.keys).find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

impl Session {
    /// Logs in sending exactly `steps` (one Login Request each, with that initiator's own
    /// ISID and keys, nothing added), and returns the session with what was negotiated and
    /// every Login Response's keys. The target must answer each step without asking for
    /// more (as the replayed initiators expect) and end the last in full feature phase.
    pub fn login_scripted(addr: &str, isid: [u8; 6], steps: &[LoginStep]) -> Result<(Session, Vec<LoginAnswer>)> {
        let num = |key: &str, default: u32| -> Result<u32> {
            offered(steps, key)
                .map_or(Ok(default), |v| v.parse().map_err(|_| Error::Protocol(format!("script offers {key}={v}"))))
        };
        // The offer, as the common login describes one, for checking the answers.
        let opts = LoginOptions {
            initiator_name: offered(steps, "InitiatorName").unwrap_or_default().to_string(),
            header_digest: offered(steps, "HeaderDigest").is_some_and(|v| v.contains("CRC32C")),
            data_digest: offered(steps, "DataDigest").is_some_and(|v| v.contains("CRC32C")),
            max_recv_data_segment_length: num("MaxRecvDataSegmentLength", 8192)?,
            max_burst_length: num("MaxBurstLength", 262144)?,
            first_burst_length: num("FirstBurstLength", 65536)?,
            immediate_data: offered(steps, "ImmediateData") != Some("No"),
            initial_r2t: offered(steps, "InitialR2T") != Some("No"),
            isid: Some(isid),
            ..LoginOptions::default()
        };
        let mut s = Session::login_inner_unlogged(addr, &opts)?;
        let itt = s.alloc_itt();
        let mut answers = Vec::new();
        let mut all_keys = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let mut req = Pdu::new(OP_LOGIN_REQ);
            req.bhs[0] |= FLAG_IMMEDIATE;
            req.bhs[1] = (u8::from(step.transit) << 7) | (step.csg << 2) | step.nsg;
            req.bhs[8..14].copy_from_slice(&isid);
            put_u32(&mut req.bhs, 16, itt);
            put_u32(&mut req.bhs, 24, s.cmd_sn);
            put_u32(&mut req.bhs, 28, s.exp_stat_sn);
            let keys: Vec<(&str, String)> = step.keys.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            req.data = encode_keys(&keys);
            s.send(&req)?;
            let resp = s.recv_raw()?;
            if resp.opcode() != OP_LOGIN_RESP {
                return proto(format!("step {i}: expected Login Response, got opcode {:#04x}", resp.opcode()));
            }
            if resp.bhs[36] != 0 {
                return Err(Error::Login { class: resp.bhs[36], detail: resp.bhs[37] });
            }
            s.exp_stat_sn = resp.stat_sn().wrapping_add(1);
            s.update_window(&resp);
            let flags = resp.flags();
            let answer = LoginAnswer {
                csg: (flags >> 2) & 3,
                nsg: flags & 3,
                transit: flags & 0x80 != 0,
                keys: parse_keys(&resp.data)?,
            };
            all_keys.extend(answer.keys.iter().cloned());
            let done = answer.transit && answer.nsg == 3;
            let expected = (step.csg, step.transit, step.nsg);
            if (answer.csg, answer.transit, answer.nsg) != expected && !done {
                return proto(format!("step {i}: target answered {answer:?} to {expected:?}"));
            }
            answers.push(answer);
            if done {
                if i + 1 != steps.len() {
                    return proto(format!("target ended the login at step {i} of {}", steps.len()));
                }
                s.negotiated.tsih = get_u16(&resp.bhs, 14);
                s.apply_keys(&all_keys, &opts)?;
                return Ok((s, answers));
            }
        }
        proto("the script ended before the target reached full feature phase")
    }

    /// A connected session that has not logged in yet, with the ISID of `opts`.
    fn login_inner_unlogged(addr: &str, opts: &LoginOptions) -> Result<Session> {
        let isid = opts.isid.expect("a scripted login has its initiator's ISID");
        Ok(Session::unlogged(connect(addr, opts.bind)?, opts, isid))
    }

    /// A session on `stream` before its login: nothing negotiated yet (RFC 7143 defaults).
    fn unlogged(stream: TcpStream, opts: &LoginOptions, isid: [u8; 6]) -> Session {
        Session {
            stream,
            negotiated: Negotiated {
                header_digest: false,
                data_digest: false,
                target_max_recv_data_segment_length: 8192,
                our_max_recv_data_segment_length: opts.max_recv_data_segment_length,
                max_burst_length: 262144,
                first_burst_length: 65536,
                immediate_data: true,
                initial_r2t: true,
                tsih: 0,
                target_keys: Vec::new(),
            },
            header_digest: false,
            data_digest: false,
            isid,
            cmd_sn: 1,
            exp_stat_sn: 0,
            max_cmd_sn: 1,
            next_itt: 1,
            nops_answered: 0,
            retry_unit_attention: true,
            unit_attentions: Vec::new(),
            chap_alg: String::new(),
            inflight: std::collections::HashMap::new(),
            completed: std::collections::VecDeque::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_rfc3720_vectors() {
        // RFC 3720 B.4: 32 bytes of zeros and 32 bytes of 0xff, bytes as sent on the wire.
        assert_eq!(digest(&[&[0u8; 32]]), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(digest(&[&[0xffu8; 32]]), [0x43, 0xab, 0xa8, 0x62]);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(digest(&[&inc]), [0x4e, 0x79, 0xdd, 0x46]);
        // Split input digests the same as contiguous input.
        assert_eq!(digest(&[&inc[..5], &inc[5..]]), digest(&[&inc]));
    }

    #[test]
    fn field_helpers_are_big_endian() {
        let mut b = [0u8; 16];
        put_u24(&mut b, 1, 0x123456);
        put_u32(&mut b, 4, 0xdeadbeef);
        put_u64(&mut b, 8, 0x0102030405060708);
        assert_eq!(&b[1..4], &[0x12, 0x34, 0x56]);
        assert_eq!(get_u24(&b, 1), 0x123456);
        assert_eq!(get_u32(&b, 4), 0xdeadbeef);
        assert_eq!(get_u64(&b, 8), 0x0102030405060708);
        assert_eq!(get_u16(&b, 4), 0xdead);
    }

    #[test]
    fn pdu_encode_pads_and_digests() {
        let mut p = Pdu::new(OP_SCSI_CMD);
        put_u32(&mut p.bhs, 16, 7);
        p.data = vec![1, 2, 3, 4, 5];
        let plain = p.encode(false, false);
        assert_eq!(plain.len(), 48 + 8);
        assert_eq!(get_u24(&plain, 5), 5);
        assert_eq!(&plain[53..56], &[0, 0, 0]);

        let dig = p.encode(true, true);
        assert_eq!(dig.len(), 48 + 4 + 8 + 4);
        assert_eq!(&dig[48..52], &digest(&[&dig[..48]]));
        assert_eq!(&dig[60..64], &digest(&[&dig[52..60]]));

        // An empty data segment carries no data digest.
        let empty = Pdu::new(OP_NOP_OUT).encode(true, true);
        assert_eq!(empty.len(), 52);
    }

    #[test]
    fn pdu_round_trip_and_digest_check() {
        let mut p = Pdu::new(OP_DATA_IN);
        p.bhs[1] = 0x81;
        put_u32(&mut p.bhs, 40, 4096);
        p.ahs = vec![0, 1, 2, 3];
        p.data = (0..13).collect();
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let bytes = p.encode(hd, dd);
            let back = Pdu::read_from(&mut &bytes[..], hd, dd).unwrap();
            assert_eq!(back.opcode(), OP_DATA_IN);
            assert_eq!(back.bhs[4], 1);
            assert_eq!(back.ahs, p.ahs);
            assert_eq!(back.data, p.data);
            assert_eq!(get_u32(&back.bhs, 40), 4096);
        }
        let mut bytes = p.encode(true, true);
        bytes[10] ^= 1;
        assert!(matches!(Pdu::read_from(&mut &bytes[..], true, true), Err(Error::HeaderDigest(_))));
        let mut bytes = p.encode(true, true);
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        assert!(matches!(Pdu::read_from(&mut &bytes[..], true, true), Err(Error::DataDigest(_))));
    }

    #[test]
    fn text_keys_round_trip() {
        let enc = encode_keys(&[("HeaderDigest", "CRC32C,None".to_string()), ("MaxBurstLength", "512".to_string())]);
        assert_eq!(enc, b"HeaderDigest=CRC32C,None\0MaxBurstLength=512\0");
        let keys = parse_keys(b"A=1\0B=x=y\0").unwrap();
        assert_eq!(keys, vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]);
        assert!(parse_keys(b"novalue\0").is_err());
    }

    #[test]
    fn lun_encoding() {
        assert_eq!(encode_lun(0), 0);
        assert_eq!(encode_lun(1), 0x0001_0000_0000_0000);
        assert_eq!(encode_lun(300), 0x412c_0000_0000_0000);
    }

    #[test]
    fn sense_parsing() {
        let mut fixed = vec![0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x05;
        fixed[12] = 0x21;
        let r = Response { status: STATUS_CHECK_CONDITION, sense: fixed, ..Default::default() };
        assert_eq!(r.sense_key(), Some(5));
        assert_eq!(r.asc_ascq(), Some((0x21, 0)));
        let r = Response { sense: vec![0x72, 0x07, 0x27, 0x00, 0, 0, 0, 0], ..Default::default() };
        assert_eq!(r.sense_key(), Some(7));
        assert_eq!(r.asc_ascq(), Some((0x27, 0)));
        assert_eq!(Response { sense: vec![0x70, 0], ..Default::default() }.sense_key(), None);
    }
}
