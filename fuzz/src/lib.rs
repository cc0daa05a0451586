//! The fuzz targets' harnesses, and the encoders the seed generator (`examples/seeds.rs`) uses
//! to write inputs in each harness's format. Each `run` takes libFuzzer's bytes; a panic or an
//! abort is a finding.

pub mod login;
/// Real initiators' login keys, shared with the crate's login unit tests.
#[path = "../../src/protocol/login_peers.rs"]
pub mod login_peers;
pub mod pdu;
pub mod rpc;
pub mod scsi;
pub mod text;

/// Reads a fuzz input front to back; running out yields zeros / empty slices, never a panic.
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A u16 length, then that many bytes.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}

/// Appends a u16 length and the bytes ([`Cursor::chunk`]'s format).
pub fn put_chunk(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&b[..n]);
}

/// `key=value\0` pairs.
pub fn kv(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

/// The target name every harness serves.
pub const TARGET: &str = "iqn.2024-06.dev.jumpstarter:fuzz";
