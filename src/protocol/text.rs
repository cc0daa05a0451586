//! iSCSI text keys (RFC 7143 §6.1, §13): the `key=value\0` data segment of Login and Text PDUs,
//! SendTargets (Appendix C) and full-feature-phase Text Request negotiation (§11.10, §11.11).

use super::login::SessionType;

/// Longest key name (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest single value unless a key says otherwise (RFC 7143 §6.1).
pub const MAX_VALUE_LEN: usize = 255;
/// Longest value of the keys allowed to exceed 255 bytes: binary CHAP challenges/responses
/// and lists such as TargetAddress whose individual items are each at most 255 bytes.
pub const MAX_LONG_VALUE_LEN: usize = 8192;
/// Target Transfer Tag meaning "no transfer in progress".
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Cap on accumulated multi-PDU request text, so a peer cannot grow our buffer forever.
pub const MAX_TEXT_LEN: usize = 64 * 1024;

/// Constants a responder answers with (RFC 7143 §6.2).
pub const REJECT: &str = "Reject";
pub const IRRELEVANT: &str = "Irrelevant";
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text pair without '='")]
    MissingEquals,
    #[error("empty key name")]
    EmptyKey,
    #[error("key name of {0} bytes exceeds 63")]
    KeyTooLong(usize),
    #[error("value of {key} is {len} bytes, over its limit of {max}")]
    ValueTooLong { key: String, len: usize, max: usize },
    #[error("text is not UTF-8")]
    NotUtf8,
    #[error("key or value contains NUL or '=' in the key")]
    BadCharacter,
    #[error("key {0} appears more than once")]
    DuplicateKey(String),
    #[error("text of {0} bytes exceeds the accepted total")]
    TooLong(usize),
    #[error("text request out of sequence: {0}")]
    Sequence(&'static str),
}

/// How much a value of `key` may hold, and whether the limit is per comma-separated item.
fn value_limit(key: &str) -> (usize, bool) {
    match key {
        "TargetAddress" | "AuthMethod" | "HeaderDigest" | "DataDigest" | "TaskReporting" => (MAX_LONG_VALUE_LEN, true),
        _ if key.starts_with("CHAP_")
            || key.starts_with("SRP_")
            || key.starts_with("KRB_")
            || key.starts_with("SPKM_") =>
        {
            (MAX_LONG_VALUE_LEN, false)
        }
        _ => (MAX_VALUE_LEN, false),
    }
}

fn check_pair(key: &str, value: &str) -> Result<(), TextError> {
    if key.is_empty() {
        return Err(TextError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(TextError::KeyTooLong(key.len()));
    }
    let (max, per_item) = value_limit(key);
    let too_long = |len: usize, max: usize| TextError::ValueTooLong { key: key.to_string(), len, max };
    if value.len() > max {
        return Err(too_long(value.len(), max));
    }
    if per_item {
        if let Some(item) = value.split(',').find(|i| i.len() > MAX_VALUE_LEN) {
            return Err(too_long(item.len(), MAX_VALUE_LEN));
        }
    }
    Ok(())
}

/// Parses a text data segment into pairs borrowing from `data`, in order.
/// A missing final NUL and empty pairs (stray NUL padding) are tolerated.
pub fn parse(data: &[u8]) -> Result<Vec<(&str, &str)>, TextError> {
    let mut pairs = Vec::new();
    for raw in data.split(|&b| b == 0) {
        if raw.is_empty() {
            continue;
        }
        let text = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (key, value) = text.split_once('=').ok_or(TextError::MissingEquals)?;
        check_pair(key, value)?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Like [`parse`], and fails on a key given twice (RFC 7143 §6.2: no key may be re-declared).
pub fn parse_unique(data: &[u8]) -> Result<Vec<(&str, &str)>, TextError> {
    let pairs = parse(data)?;
    for (i, (key, _)) in pairs.iter().enumerate() {
        if pairs[..i].iter().any(|(k, _)| k == key) {
            return Err(TextError::DuplicateKey(key.to_string()));
        }
    }
    Ok(pairs)
}

/// Appends one `key=value\0` pair.
pub fn push_pair(out: &mut Vec<u8>, key: &str, value: &str) -> Result<(), TextError> {
    if key.contains(['=', '\0']) || value.contains('\0') {
        return Err(TextError::BadCharacter);
    }
    check_pair(key, value)?;
    out.reserve(key.len() + value.len() + 2);
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
    Ok(())
}

/// Encodes pairs into a data segment.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Result<Vec<u8>, TextError> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        push_pair(&mut out, k.as_ref(), v.as_ref())?;
    }
    Ok(out)
}

/// Where a key may be negotiated (the "Use" of RFC 7143 §13).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyUse {
    /// Login only (LO and IO keys, and the security keys).
    Login,
    /// Login and full feature phase.
    All,
    /// Full feature phase only.
    FullFeatureOnly,
}

/// The use of a standard key, `None` for keys RFC 7143 does not define.
pub fn key_use(key: &str) -> Option<KeyUse> {
    Some(match key {
        "HeaderDigest"
        | "DataDigest"
        | "MaxConnections"
        | "InitiatorName"
        | "TargetName"
        | "SessionType"
        | "InitialR2T"
        | "ImmediateData"
        | "MaxBurstLength"
        | "FirstBurstLength"
        | "DefaultTime2Wait"
        | "DefaultTime2Retain"
        | "MaxOutstandingR2T"
        | "DataPDUInOrder"
        | "DataSequenceInOrder"
        | "ErrorRecoveryLevel"
        | "AuthMethod"
        | "TargetPortalGroupTag"
        | "IFMarker"
        | "OFMarker"
        | "OFMarkInt"
        | "IFMarkInt"
        | "TaskReporting"
        | "iSCSIProtocolLevel" => KeyUse::Login,
        "MaxRecvDataSegmentLength" | "InitiatorAlias" | "TargetAlias" | "TargetAddress" => KeyUse::All,
        "SendTargets" => KeyUse::FullFeatureOnly,
        _ if key.starts_with("CHAP_") => KeyUse::Login,
        _ => return None,
    })
}

/// The SendTargets response data (RFC 7143 Appendix C) for our single target.
/// `All` lists every target, an iSCSI name lists that target if it is ours, an empty value
/// lists the session's target. `addresses` are already formatted `host:port,tpgt`.
pub fn send_targets(request_value: &str, target_name: &str, addresses: &[String]) -> Result<Vec<u8>, TextError> {
    let mut out = Vec::new();
    // No target name: the initiator may not see the target (ACLs).
    if target_name.is_empty() {
        return Ok(out);
    }
    if request_value == "All" || request_value.is_empty() || request_value == target_name {
        push_pair(&mut out, "TargetName", target_name)?;
        for addr in addresses {
            push_pair(&mut out, "TargetAddress", addr)?;
        }
    }
    Ok(out)
}

/// A response being handed out in PDU-sized pieces.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    data: Vec<u8>,
    off: usize,
}

impl Chunks {
    pub(crate) fn new(data: Vec<u8>) -> Self {
        Chunks { data, off: 0 }
    }

    /// The next piece of at most `max` bytes, and whether it is the last one.
    /// Pairs may span PDU boundaries (RFC 7143 §6.1), so bytes are split anywhere.
    pub(crate) fn next(&mut self, max: usize) -> (Vec<u8>, bool) {
        let end = self.data.len().min(self.off + max.max(1));
        let piece = self.data[self.off..end].to_vec();
        self.off = end;
        (piece, self.off == self.data.len())
    }
}

/// The header fields of a Text Request the negotiator needs.
#[derive(Clone, Copy, Debug)]
pub struct TextRequest<'a> {
    pub final_bit: bool,
    pub cont: bool,
    pub itt: u32,
    pub ttt: u32,
    pub data: &'a [u8],
}

/// The header fields and data of the Text Response to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextResponse {
    pub final_bit: bool,
    pub cont: bool,
    pub ttt: u32,
    pub data: Vec<u8>,
}

/// Full-feature-phase Text Request handling for one connection: SendTargets, the few keys
/// that may be renegotiated there, and multi-PDU requests and responses.
#[derive(Debug)]
pub struct TextNegotiator {
    session_type: SessionType,
    target_name: String,
    addresses: Vec<String>,
    max_xmit: u32,
    /// ITT of the exchange in progress, if any.
    itt: Option<u32>,
    /// TTT handed to the initiator for the exchange in progress.
    ttt: u32,
    next_ttt: u32,
    request: Vec<u8>,
    response: Option<Chunks>,
}

impl TextNegotiator {
    /// `max_xmit` is the initiator's MaxRecvDataSegmentLength from login.
    pub fn new(session_type: SessionType, target_name: &str, addresses: &[String], max_xmit: u32) -> Self {
        TextNegotiator {
            session_type,
            target_name: target_name.to_string(),
            addresses: addresses.to_vec(),
            max_xmit,
            itt: None,
            ttt: RESERVED_TAG,
            next_ttt: 1,
            request: Vec::new(),
            response: None,
        }
    }

    /// The largest data segment we may send, updated when the initiator re-declares its
    /// MaxRecvDataSegmentLength in a Text Request.
    pub fn max_xmit_data_segment_length(&self) -> u32 {
        self.max_xmit
    }

    /// One Text Request in, one Text Response out. An error means the request was out of
    /// sequence or malformed: the caller answers with a Reject PDU.
    pub fn step(&mut self, req: &TextRequest) -> Result<TextResponse, TextError> {
        if req.cont && req.final_bit {
            return Err(TextError::Sequence("C and F both set"));
        }
        if req.ttt == RESERVED_TAG {
            // A new exchange; one in progress is abandoned (RFC 7143 §11.10.4).
            self.reset();
            self.itt = Some(req.itt);
        } else if self.itt != Some(req.itt) || req.ttt != self.ttt {
            return Err(TextError::Sequence("unknown target transfer tag"));
        }
        if self.response.is_some() {
            if !req.data.is_empty() || req.cont {
                return Err(TextError::Sequence("data while our response is pending"));
            }
            return Ok(self.emit(req.final_bit));
        }
        if self.request.len() + req.data.len() > MAX_TEXT_LEN {
            return Err(TextError::TooLong(self.request.len() + req.data.len()));
        }
        self.request.extend_from_slice(req.data);
        if req.cont {
            let ttt = self.new_ttt();
            return Ok(TextResponse { final_bit: false, cont: false, ttt, data: Vec::new() });
        }
        let request = std::mem::take(&mut self.request);
        let answer = self.answer(&request)?;
        self.response = Some(Chunks::new(answer));
        Ok(self.emit(req.final_bit))
    }

    /// The next piece of the pending response, at most `max` bytes, and whether it is the last.
    pub fn next_chunk(&mut self, max: usize) -> (Vec<u8>, bool) {
        match self.response.as_mut() {
            Some(chunks) => {
                let (piece, last) = chunks.next(max);
                if last {
                    self.response = None;
                }
                (piece, last)
            }
            None => (Vec::new(), true),
        }
    }

    fn reset(&mut self) {
        self.itt = None;
        self.ttt = RESERVED_TAG;
        self.request.clear();
        self.response = None;
    }

    fn new_ttt(&mut self) -> u32 {
        self.ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        self.ttt
    }

    fn emit(&mut self, initiator_final: bool) -> TextResponse {
        let (data, last) = self.next_chunk(self.max_xmit as usize);
        if last && initiator_final {
            self.reset();
            return TextResponse { final_bit: true, cont: false, ttt: RESERVED_TAG, data };
        }
        // F=1 only answers F=1 (RFC 7143 §11.11.1); otherwise the exchange goes on under a TTT.
        let ttt = self.new_ttt();
        TextResponse { final_bit: false, cont: !last, ttt, data }
    }

    fn answer(&mut self, request: &[u8]) -> Result<Vec<u8>, TextError> {
        let mut out = Vec::new();
        for (key, value) in parse_unique(request)? {
            match key {
                "SendTargets" => {
                    // `All` is for discovery sessions only; an empty value names the
                    // session's target, which a discovery session has none of (Appendix C).
                    let allowed = match self.session_type {
                        SessionType::Discovery => !value.is_empty(),
                        SessionType::Normal => value != "All",
                    };
                    if allowed {
                        out.extend(send_targets(value, &self.target_name, &self.addresses)?);
                    } else {
                        push_pair(&mut out, key, REJECT)?;
                    }
                }
                "MaxRecvDataSegmentLength" => match parse_number(value) {
                    Some(n) if (512..=16_777_215).contains(&n) => self.max_xmit = n as u32,
                    _ => push_pair(&mut out, key, REJECT)?,
                },
                // Declarative, nothing to answer.
                "InitiatorAlias" => {}
                _ => {
                    let answer = match key_use(key) {
                        None => NOT_UNDERSTOOD,
                        // Target-declared keys, and keys fixed at login (RFC 7143 §13).
                        Some(_) => REJECT,
                    };
                    push_pair(&mut out, key, answer)?;
                }
            }
        }
        Ok(out)
    }
}

/// A numerical value (RFC 7143 §6.1): decimal, or hexadecimal with a `0x` prefix.
pub fn parse_number(value: &str) -> Option<u64> {
    if let Some(hex) = value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    } else {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        value.parse().ok()
    }
}

/// A boolean value: exactly `Yes` or `No`.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

pub fn bool_str(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IQN: &str = "iqn.2024-06.dev.jumpstarter:target1";

    fn addrs() -> Vec<String> {
        vec!["127.0.0.1:3260,1".to_string(), "[::1]:3260,1".to_string()]
    }

    fn pairs_of(data: &[u8]) -> Vec<(String, String)> {
        parse(data).unwrap().into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parse_pairs_in_order() {
        let p = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0").unwrap();
        assert_eq!(p, vec![("InitiatorName", "iqn.x"), ("SessionType", "Normal")]);
    }

    #[test]
    fn parse_tolerates_missing_final_nul_and_padding() {
        assert_eq!(parse(b"A=1\0B=2").unwrap(), vec![("A", "1"), ("B", "2")]);
        assert_eq!(parse(b"A=1\0\0\0").unwrap(), vec![("A", "1")]);
        assert!(parse(b"").unwrap().is_empty());
    }

    #[test]
    fn parse_keeps_equals_inside_value() {
        assert_eq!(parse(b"X-a=b=c\0").unwrap(), vec![("X-a", "b=c")]);
        assert_eq!(parse(b"SendTargets=\0").unwrap(), vec![("SendTargets", "")]);
    }

    #[test]
    fn parse_rejects_malformed() {
        assert_eq!(parse(b"NoEquals\0"), Err(TextError::MissingEquals));
        assert_eq!(parse(b"=v\0"), Err(TextError::EmptyKey));
        assert_eq!(parse(b"A=\xff\xfe\0"), Err(TextError::NotUtf8));
        let long_key = format!("{}=1", "K".repeat(64));
        assert_eq!(parse(long_key.as_bytes()), Err(TextError::KeyTooLong(64)));
        let ok_key = format!("{}=1", "K".repeat(63));
        assert!(parse(ok_key.as_bytes()).is_ok());
    }

    #[test]
    fn value_limits_depend_on_key() {
        let v256 = "a".repeat(256);
        let alias = format!("InitiatorAlias={v256}");
        let r = parse(alias.as_bytes());
        assert!(matches!(r, Err(TextError::ValueTooLong { len: 256, max: 255, .. })));
        assert!(parse(format!("InitiatorAlias={}", "a".repeat(255)).as_bytes()).is_ok());
        // Binary CHAP values may be long.
        let chap = format!("CHAP_C=0x{}", "ab".repeat(2000));
        assert!(parse(chap.as_bytes()).is_ok());
        let chap = format!("CHAP_C=0x{}", "ab".repeat(4096));
        assert!(matches!(parse(chap.as_bytes()), Err(TextError::ValueTooLong { max: 8192, .. })));
        // Lists may be long, but each item stays within 255.
        let list = vec!["10.0.0.1:3260,1"; 40].join(",");
        assert!(list.len() > 255);
        assert!(parse(format!("TargetAddress={list}").as_bytes()).is_ok());
        assert!(parse(format!("TargetAddress={v256}").as_bytes()).is_err());
    }

    #[test]
    fn parse_unique_finds_duplicates() {
        assert_eq!(parse_unique(b"A=1\0B=2\0A=3\0"), Err(TextError::DuplicateKey("A".into())));
        assert!(parse_unique(b"A=1\0B=2\0").is_ok());
    }

    #[test]
    fn encode_round_trips() {
        let data = encode(&[("HeaderDigest", "None"), ("MaxRecvDataSegmentLength", "262144")]).unwrap();
        assert_eq!(data, b"HeaderDigest=None\0MaxRecvDataSegmentLength=262144\0");
        assert_eq!(
            pairs_of(&data),
            vec![("HeaderDigest".into(), "None".into()), ("MaxRecvDataSegmentLength".into(), "262144".into())]
        );
        assert_eq!(encode(&[("A=B", "1")]), Err(TextError::BadCharacter));
        assert_eq!(encode(&[("A", "1\0x")]), Err(TextError::BadCharacter));
    }

    #[test]
    fn numbers_and_booleans() {
        assert_eq!(parse_number("262144"), Some(262144));
        assert_eq!(parse_number("0x200"), Some(512));
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number("12a"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_bool("Yes"), Some(true));
        assert_eq!(parse_bool("No"), Some(false));
        assert_eq!(parse_bool("yes"), None);
    }

    #[test]
    fn send_targets_all() {
        let data = send_targets("All", IQN, &addrs()).unwrap();
        assert_eq!(
            pairs_of(&data),
            vec![
                ("TargetName".into(), IQN.into()),
                ("TargetAddress".into(), "127.0.0.1:3260,1".into()),
                ("TargetAddress".into(), "[::1]:3260,1".into()),
            ]
        );
    }

    #[test]
    fn send_targets_by_name_and_empty() {
        assert_eq!(send_targets(IQN, IQN, &addrs()).unwrap(), send_targets("All", IQN, &addrs()).unwrap());
        assert!(send_targets("iqn.other:t", IQN, &addrs()).unwrap().is_empty());
        assert_eq!(send_targets("", IQN, &addrs()).unwrap(), send_targets("All", IQN, &addrs()).unwrap());
    }

    fn req(data: &[u8]) -> TextRequest<'_> {
        TextRequest { final_bit: true, cont: false, itt: 7, ttt: RESERVED_TAG, data }
    }

    #[test]
    fn negotiator_discovery_send_targets() {
        let mut n = TextNegotiator::new(SessionType::Discovery, IQN, &addrs(), 8192);
        let r = n.step(&req(b"SendTargets=All\0")).unwrap();
        assert!(r.final_bit && !r.cont);
        assert_eq!(r.ttt, RESERVED_TAG);
        assert_eq!(r.data, send_targets("All", IQN, &addrs()).unwrap());
        // No logged-in target in a discovery session.
        let r = n.step(&req(b"SendTargets=\0")).unwrap();
        assert_eq!(r.data, b"SendTargets=Reject\0");
    }

    #[test]
    fn negotiator_normal_send_targets() {
        let mut n = TextNegotiator::new(SessionType::Normal, IQN, &addrs(), 8192);
        let r = n.step(&req(b"SendTargets=\0")).unwrap();
        assert_eq!(r.data, send_targets("", IQN, &addrs()).unwrap());
        let r = n.step(&req(b"SendTargets=All\0")).unwrap();
        assert_eq!(r.data, b"SendTargets=Reject\0");
    }

    #[test]
    fn negotiator_answers_operational_keys() {
        let mut n = TextNegotiator::new(SessionType::Normal, IQN, &addrs(), 8192);
        let r = n
            .step(&req(b"MaxBurstLength=4096\0X-foo=1\0Bogus=2\0InitiatorAlias=h\0MaxRecvDataSegmentLength=65536\0"))
            .unwrap();
        assert_eq!(
            pairs_of(&r.data),
            vec![
                ("MaxBurstLength".into(), "Reject".into()),
                ("X-foo".into(), "NotUnderstood".into()),
                ("Bogus".into(), "NotUnderstood".into()),
            ]
        );
        assert_eq!(n.max_xmit_data_segment_length(), 65536);
        let r = n.step(&req(b"MaxRecvDataSegmentLength=100\0")).unwrap();
        assert_eq!(r.data, b"MaxRecvDataSegmentLength=Reject\0");
        assert_eq!(n.max_xmit_data_segment_length(), 65536);
        assert_eq!(n.step(&req(b"A=1\0A=1\0")), Err(TextError::DuplicateKey("A".into())));
    }

    #[test]
    fn negotiator_accumulates_continued_request() {
        let mut n = TextNegotiator::new(SessionType::Discovery, IQN, &addrs(), 8192);
        let first = TextRequest { final_bit: false, cont: true, itt: 9, ttt: RESERVED_TAG, data: b"SendTar" };
        let r = n.step(&first).unwrap();
        assert!(!r.final_bit && !r.cont && r.data.is_empty());
        assert_ne!(r.ttt, RESERVED_TAG);
        let second = TextRequest { final_bit: true, cont: false, itt: 9, ttt: r.ttt, data: b"gets=All\0" };
        let r = n.step(&second).unwrap();
        assert!(r.final_bit);
        assert_eq!(r.data, send_targets("All", IQN, &addrs()).unwrap());
    }

    #[test]
    fn negotiator_splits_long_response() {
        let many: Vec<String> = (0..100).map(|i| format!("10.0.{}.{}:3260,1", i / 250, i % 250)).collect();
        let full = send_targets("All", IQN, &many).unwrap();
        assert!(full.len() > 1024);
        let mut n = TextNegotiator::new(SessionType::Discovery, IQN, &many, 512);
        let mut r = n.step(&req(b"SendTargets=All\0")).unwrap();
        let mut got = Vec::new();
        let mut pdus = 1;
        while !r.final_bit {
            assert!(r.cont && r.data.len() == 512);
            assert_ne!(r.ttt, RESERVED_TAG);
            got.extend_from_slice(&r.data);
            r = n.step(&TextRequest { final_bit: true, cont: false, itt: 7, ttt: r.ttt, data: b"" }).unwrap();
            pdus += 1;
        }
        got.extend_from_slice(&r.data);
        assert!(!r.cont && r.ttt == RESERVED_TAG);
        assert_eq!(got, full);
        assert_eq!(pdus, full.len().div_ceil(512));
    }

    #[test]
    fn negotiator_rejects_out_of_sequence() {
        let mut n = TextNegotiator::new(SessionType::Discovery, IQN, &addrs(), 32);
        assert!(n.step(&TextRequest { final_bit: true, cont: false, itt: 1, ttt: 5, data: b"" }).is_err());
        let r = n.step(&req(b"SendTargets=All\0")).unwrap();
        assert!(r.cont);
        // Data in a follow-up while our answer is still pending.
        let bad = TextRequest { final_bit: true, cont: false, itt: 7, ttt: r.ttt, data: b"A=1\0" };
        assert!(n.step(&bad).is_err());
        // A new request (reserved TTT) abandons the old exchange.
        let r = n.step(&req(b"X-a=1\0")).unwrap();
        assert!(r.final_bit);
        assert_eq!(r.data, b"X-a=NotUnderstood\0");
    }

    #[test]
    fn negotiator_keeps_exchange_open_without_final() {
        let mut n = TextNegotiator::new(SessionType::Normal, IQN, &addrs(), 8192);
        // F=0, C=0: the initiator means to go on, so our answer may not carry F=1.
        let first = TextRequest { final_bit: false, cont: false, itt: 3, ttt: RESERVED_TAG, data: b"X-a=1\0" };
        let r = n.step(&first).unwrap();
        assert!(!r.final_bit && !r.cont);
        assert_ne!(r.ttt, RESERVED_TAG);
        assert_eq!(r.data, b"X-a=NotUnderstood\0");
        let next = TextRequest { final_bit: true, cont: false, itt: 3, ttt: r.ttt, data: b"SendTargets=\0" };
        let r = n.step(&next).unwrap();
        assert!(r.final_bit && r.ttt == RESERVED_TAG);
        assert_eq!(r.data, send_targets("", IQN, &addrs()).unwrap());
        // The exchange is closed: its tag is no longer valid.
        assert!(n.step(&TextRequest { final_bit: true, cont: false, itt: 3, ttt: 1, data: b"" }).is_err());
    }

    #[test]
    fn next_chunk_hands_out_pieces() {
        let mut n = TextNegotiator::new(SessionType::Discovery, IQN, &addrs(), 8);
        assert_eq!(n.next_chunk(8), (Vec::new(), true));
        let r = n.step(&req(b"SendTargets=All\0")).unwrap();
        let mut got = r.data;
        loop {
            let (piece, last) = n.next_chunk(8);
            assert!(piece.len() <= 8);
            got.extend(piece);
            if last {
                break;
            }
        }
        assert_eq!(got, send_targets("All", IQN, &addrs()).unwrap());
    }
}
