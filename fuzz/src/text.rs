//! The `text` target: the text key parser and encoder ([`uringtgt::protocol::text`]) and the
//! full-feature-phase Text Request negotiator, fed a sequence of requests.
//!
//! Input: `mode, max_xmit, record*`. Every record's data also goes through `parse`,
//! `parse_unique`, `parse_number` and `parse_bool`, and what parses must encode back to text
//! that parses to the same pairs. `mode` bit 0 makes the session a discovery session.
//! Each record is `flags, chunk`: bit 7 F, bit 6 C, bit 0 "continue the exchange" (the TTT the
//! target handed out, else a new exchange), bits 1-3 pick the ITT.
//! Checked: a response never exceeds the initiator's MaxRecvDataSegmentLength and parses.

use crate::{put_chunk, Cursor};
use uringtgt::protocol::login::SessionType;
use uringtgt::protocol::text::{self, TextNegotiator, TextRequest, RESERVED_TAG};

pub fn record(out: &mut Vec<u8>, flags: u8, data: &[u8]) {
    out.push(flags);
    put_chunk(out, data);
}

fn check_parsers(data: &[u8]) {
    if let Ok(pairs) = text::parse(data) {
        if let Ok(encoded) = text::encode(&pairs) {
            assert_eq!(text::parse(&encoded).expect("encoded text parses"), pairs, "parse/encode round trip");
        }
        let unique = text::parse_unique(data);
        let dup = pairs.iter().enumerate().any(|(i, (k, _))| pairs[..i].iter().any(|(k2, _)| k2 == k));
        assert_eq!(unique.is_err(), dup, "parse_unique disagrees on duplicates");
        for (k, v) in &pairs {
            let _ = text::key_use(k);
            if let Some(n) = text::parse_number(v) {
                assert_eq!(text::parse_number(&n.to_string()), Some(n), "{v:?}");
            }
            let _ = text::parse_bool(v);
        }
    }
}

pub fn run(input: &[u8]) {
    let mut c = Cursor::new(input);
    let mode = c.u8();
    // The initiator's MaxRecvDataSegmentLength: 512 to 16 MiB - 1, as login allows.
    let max_xmit = (512 + u32::from(c.u16()) * 16).min((1 << 24) - 1);
    let session = if mode & 1 != 0 { SessionType::Discovery } else { SessionType::Normal };
    let addresses = vec!["127.0.0.1:3260,1".to_string(), "[::1]:3260,1".to_string()];
    let mut neg = TextNegotiator::new(session, crate::TARGET, &addresses, max_xmit);
    let mut ttt = RESERVED_TAG;
    while !c.is_empty() {
        let flags = c.u8();
        let data = c.chunk();
        check_parsers(data);
        let req = TextRequest {
            final_bit: flags & 0x80 != 0,
            cont: flags & 0x40 != 0,
            itt: u32::from((flags >> 1) & 7),
            ttt: if flags & 1 != 0 { ttt } else { RESERVED_TAG },
            data,
        };
        match neg.step(&req) {
            Ok(rsp) => {
                let limit = neg.max_xmit_data_segment_length();
                assert!((512..1 << 24).contains(&limit), "MaxXmitDSL renegotiated to {limit}");
                assert!(rsp.data.len() <= limit as usize, "response of {} bytes", rsp.data.len());
                assert!(!(rsp.final_bit && rsp.cont), "F and C both set");
                if rsp.cont || !rsp.final_bit {
                    assert_ne!(rsp.ttt, RESERVED_TAG, "a partial response without a TTT");
                }
                ttt = rsp.ttt;
            }
            Err(_) => ttt = RESERVED_TAG,
        }
    }
    let (piece, _) = neg.next_chunk(max_xmit as usize);
    assert!(piece.len() <= max_xmit as usize);
}
