//! The `login` target: the login state machine ([`uringtgt::protocol::login::Login`]) fed a
//! whole sequence of Login Requests, as one connection would send them.
//!
//! Input: `record*`, each `flags, versions, isid_tsih, chunk`: `flags` is BHS byte 1 (T, C,
//! CSG, NSG); `versions` high nibble VersionMax, low nibble VersionMin; `isid_tsih` picks the
//! ISID's last byte and a TSIH (0 unless bit 7); `chunk` (u16 length, at most 8192 bytes used,
//! as the connection accepts during login) is the data segment.
//!
//! Checked after every step: the response's text parses with unique keys and fits one PDU,
//! its stage fields obey RFC 7143 §11.13, a failure ends the login for good, and a login that
//! reaches full feature phase carries limits the connection can use.

use crate::{put_chunk, Cursor};
use std::sync::Arc;
use uringtgt::protocol::login::{Login, LoginConfig, LoginOutcome, LoginRequest};
use uringtgt::protocol::text;

/// What the connection accepts per Login Request PDU.
const LOGIN_DSL: usize = 8192;

/// One request of a `login` input.
pub fn record(out: &mut Vec<u8>, flags: u8, data: &[u8]) {
    out.extend_from_slice(&[flags, 0, 0]);
    put_chunk(out, data);
}

pub fn run(input: &[u8]) {
    let cfg = LoginConfig {
        target_name: crate::TARGET.to_string(),
        addresses: vec!["127.0.0.1:3260,1".into()],
        ..LoginConfig::default()
    };
    let max_recv = cfg.max_recv_data_segment_length;
    let mut login = Login::new(Arc::new(cfg));
    let mut c = Cursor::new(input);
    let mut failed = false;
    let mut done = false;
    let mut itt = 0u32;
    while !c.is_empty() {
        let flags = c.u8();
        let versions = c.u8();
        let sel = c.u8();
        let chunk = c.chunk();
        let data = &chunk[..chunk.len().min(LOGIN_DSL)];
        let req = LoginRequest {
            transit: flags & 0x80 != 0,
            cont: flags & 0x40 != 0,
            csg: (flags >> 2) & 3,
            nsg: flags & 3,
            version_max: versions >> 4,
            version_min: versions & 0x0F,
            isid: [0x40, 0, 0x01, 0x37, 0, sel & 0x7F],
            tsih: if sel & 0x80 != 0 { u16::from(sel & 0x7F) } else { 0 },
            itt,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
            data,
        };
        itt = itt.wrapping_add(1);
        let (rsp, outcome) = login.step(&req);
        assert!(rsp.data.len() <= LOGIN_DSL, "response of {} bytes in one PDU", rsp.data.len());
        let pairs = text::parse_unique(&rsp.data).expect("response text parses with unique keys");
        assert!(!(rsp.transit && rsp.cont), "T and C both set in a response");
        assert_eq!(rsp.csg, req.csg, "response CSG differs from the request's");
        if failed || done {
            assert!(matches!(outcome, LoginOutcome::Failed), "a finished login answered again");
        }
        match outcome {
            LoginOutcome::Failed => {
                assert_ne!(rsp.status_class, 0, "a failure with success status");
                assert!(login.error().is_some());
                failed = true;
            }
            LoginOutcome::Continue => {
                assert_eq!(rsp.status_class, 0);
                assert!(!(rsp.transit && rsp.nsg == 3), "transit to full feature without finishing");
            }
            LoginOutcome::FullFeature => {
                assert_eq!(rsp.status_class, 0);
                assert!(rsp.transit && rsp.nsg == 3);
                let n = login.negotiated();
                assert!(!n.initiator_name.is_empty());
                assert!(
                    (512..=(1 << 24) - 1).contains(&n.max_xmit_data_segment_length),
                    "MaxXmitDSL {}",
                    n.max_xmit_data_segment_length
                );
                assert_eq!(n.max_recv_data_segment_length, max_recv);
                assert!(
                    n.max_burst_length >= 512 && n.first_burst_length >= 512,
                    "bursts {} {}",
                    n.max_burst_length,
                    n.first_burst_length
                );
                assert!(n.first_burst_length <= n.max_burst_length, "FirstBurstLength above MaxBurstLength");
                assert!(n.max_outstanding_r2t >= 1);
                assert_eq!(n.error_recovery_level, 0);
                assert_eq!(n.max_connections, 1);
                assert!(!n.ifmarker && !n.ofmarker);
                let _ = n.pairs();
                done = true;
            }
        }
        let _ = pairs;
    }
}
