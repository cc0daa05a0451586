//! The `login` target: the login state machine ([`uringtgt::protocol::login::Login`]) fed a
//! whole sequence of Login Requests, as one connection would send them.
//!
//! Input: `record*`, each `flags, versions, isid_tsih, chunk`: `flags` is BHS byte 1 (T, C,
//! CSG, NSG); `versions` high nibble VersionMax, low nibble VersionMin; `isid_tsih` picks the
//! ISID's last byte and a TSIH (0 unless bit 7); `chunk` (u16 length, at most 8192 bytes used,
//! as the connection accepts during login) is the data segment.
//!
//! Each input runs twice: against a target without authentication (the default), and against
//! one that demands CHAP of every session, discovery included (with mutual CHAP when the input
//! holds a `CHAP_I=`). In a request, `CHAP_R=auto` stands for the right response to the
//! target's last challenge (the harness computes it with the configured secret), so inputs get
//! past authentication into the operational stage, as the pdu harness does with R2T tags.
//!
//! Checked after every step: the response's text parses with unique keys and fits one PDU,
//! its stage fields obey RFC 7143 §11.13, a failure ends the login for good, and a login that
//! reaches full feature phase carries limits the connection can use. With CHAP on, a login
//! reaches full feature phase only through CHAP, a challenge has the chosen digest's length,
//! and the target's mutual answer is the right one for the initiator's challenge.

use crate::{put_chunk, Cursor};
use std::sync::Arc;
use uringtgt::protocol::chap::{self, Algorithm, AuthConfig, Credentials, Secret};
use uringtgt::protocol::login::{AuthMethod, Login, LoginConfig, LoginOutcome, LoginRequest};
use uringtgt::protocol::text;

/// What the connection accepts per Login Request PDU.
const LOGIN_DSL: usize = 8192;
/// The CHAP users of the authenticated run.
pub const CHAP_USER: &str = "rig";
const CHAP_SECRET: &[u8] = b"fuzz-chap-secret";
const MUTUAL_USER: &str = "tgt";
const MUTUAL_SECRET: &[u8] = b"fuzz-mutual-secret";
/// Stands for the right CHAP response in a request.
pub const AUTO_RESPONSE: &[u8] = b"CHAP_R=auto";

/// One request of a `login` input.
pub fn record(out: &mut Vec<u8>, flags: u8, data: &[u8]) {
    out.extend_from_slice(&[flags, 0, 0]);
    put_chunk(out, data);
}

pub fn run(input: &[u8]) {
    run_with(input, AuthConfig::default());
    let mutual = input.windows(7).any(|w| w == b"CHAP_I=");
    let creds = |user: &str, secret: &[u8]| Credentials { username: user.into(), secret: Secret::new(secret) };
    let auth = AuthConfig {
        chap: Some(creds(CHAP_USER, CHAP_SECRET)),
        mutual: mutual.then(|| creds(MUTUAL_USER, MUTUAL_SECRET)),
        discovery: true,
    };
    run_with(input, auth);
}

/// The target's last challenge: digest, CHAP_I, CHAP_C.
type Challenge = (Algorithm, u8, Vec<u8>);

/// `data` with `CHAP_R=auto` replaced by the right response to `challenge`.
fn answer_challenge(data: &[u8], challenge: Option<&Challenge>) -> Option<Vec<u8>> {
    let at = data.windows(AUTO_RESPONSE.len()).position(|w| w == AUTO_RESPONSE)?;
    let (alg, id, c) = challenge?;
    let r = chap::to_hex(&alg.response(*id, &Secret::new(CHAP_SECRET), c));
    let mut out = data[..at].to_vec();
    out.extend_from_slice(b"CHAP_R=");
    out.extend_from_slice(r.as_bytes());
    out.extend_from_slice(&data[at + AUTO_RESPONSE.len()..]);
    out.truncate(LOGIN_DSL);
    Some(out)
}

fn declined(value: &str) -> bool {
    matches!(value, "NotUnderstood" | "Irrelevant" | "Reject")
}

fn get<'a>(pairs: &[(&str, &'a str)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| *k == key).map(|&(_, v)| v)
}

/// Checks the CHAP keys of a response to `request`; returns the challenge it makes, if any.
fn check_chap(
    request: &[(&str, &str)],
    response: &[(&str, &str)],
    auth: &AuthConfig,
    last: Option<&Challenge>,
) -> Option<Challenge> {
    // A CHAP key the target declines (sent out of turn) is no challenge and no answer.
    let offered = |key| get(response, key).filter(|v| !declined(v));
    if let Some(c) = offered("CHAP_C") {
        let alg = get(response, "CHAP_A").and_then(Algorithm::choose).expect("a challenge names its digest");
        let id = get(response, "CHAP_I").and_then(text::parse_number).expect("a challenge has an identifier");
        let c = chap::decode_binary(c).expect("the challenge is hex");
        assert_eq!(c.len(), alg.digest_len(), "a challenge shorter than the digest");
        return Some((alg, u8::try_from(id).expect("CHAP_I fits a byte"), c));
    }
    if let Some(r) = offered("CHAP_R") {
        // The target's answer to the initiator's challenge (mutual CHAP).
        let ours = auth.mutual.as_ref().expect("a CHAP_R without mutual credentials");
        assert_eq!(get(response, "CHAP_N"), Some(ours.username.as_str()));
        let id = get(request, "CHAP_I").and_then(text::parse_number).expect("answered CHAP_I");
        let c = get(request, "CHAP_C").and_then(chap::decode_binary).expect("answered CHAP_C");
        let (alg, ..) = last.expect("a mutual answer after the target's challenge");
        let want = alg.response(u8::try_from(id).unwrap(), &Secret::new(MUTUAL_SECRET), &c);
        assert_eq!(chap::decode_binary(r), Some(want), "wrong mutual CHAP response");
    }
    None
}

fn run_with(input: &[u8], auth: AuthConfig) {
    let cfg = LoginConfig {
        target_name: crate::TARGET.to_string(),
        addresses: vec!["127.0.0.1:3260,1".into()],
        auth: auth.clone(),
        ..LoginConfig::default()
    };
    let max_recv = cfg.max_recv_data_segment_length;
    let mut login = Login::new(Arc::new(cfg));
    let mut c = Cursor::new(input);
    let mut failed = false;
    let mut done = false;
    let mut itt = 0u32;
    let mut challenge: Option<Challenge> = None;
    while !c.is_empty() {
        let flags = c.u8();
        let versions = c.u8();
        let sel = c.u8();
        let chunk = c.chunk();
        let data = &chunk[..chunk.len().min(LOGIN_DSL)];
        let answered = answer_challenge(data, challenge.as_ref());
        let data = answered.as_deref().unwrap_or(data);
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
        if !auth.required(true) {
            // CHAP keys sent where no CHAP runs are only declined, never answered.
            let answered = pairs.iter().any(|(k, v)| k.starts_with("CHAP_") && !declined(v));
            assert!(!answered, "a CHAP key answered without CHAP configured: {pairs:?}");
        } else if let Ok(request) = text::parse(data) {
            if let Some(ch) = check_chap(&request, &pairs, &auth, challenge.as_ref()) {
                challenge = Some(ch);
            }
        }
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
                if auth.required(true) {
                    assert_eq!(login.auth_method(), Some(AuthMethod::Chap), "full feature phase without CHAP");
                }
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
