//! CHAP for iSCSI logins (RFC 7143 §12.1.3 over RFC 1994): the target's side of one exchange,
//! with the digests MD5 (CHAP_A 5), SHA-256 (7) and SHA3-256 (8), and mutual CHAP.
//!
//! The exchange is plain data: the login state machine feeds it the initiator's CHAP keys and
//! sends back what it answers. Secrets live in [`Secret`], which never prints its bytes.

use sha2::Digest;
use std::fmt;

/// Shortest secret accepted: RFC 7143 §12.1.3 asks for at least 96 bits (12 bytes) of
/// randomness, and open-iscsi and Windows refuse shorter ones.
pub const MIN_SECRET_LEN: usize = 12;
/// Longest secret accepted: LIO's limit (`MAX_CHAP_SECRET_LEN`). Windows and the UEFI
/// initiator stop at 16 bytes, so secrets meant for them must be 12 to 16 bytes.
pub const MAX_SECRET_LEN: usize = 255;
/// The longest challenge we accept from an initiator (RFC 7143 §12.1.3 sets no limit; LIO
/// takes 1024 bytes).
const MAX_CHALLENGE_LEN: usize = 1024;

/// A CHAP secret. Its `Debug` and `Display` print `<redacted>`, so it can sit in structs that
/// get logged or printed without leaking.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes, for the digest only.
    fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A CHAP name and secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub secret: Secret,
}

/// What a target demands and offers at login.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// The initiator must prove these (CHAP); `None`: no authentication (demo mode).
    pub chap: Option<Credentials>,
    /// The target proves these to the initiator (mutual CHAP); the initiator must ask.
    pub mutual: Option<Credentials>,
    /// Discovery sessions authenticate too.
    pub discovery: bool,
}

impl AuthConfig {
    /// Whether a session of this kind must authenticate.
    pub fn required(&self, discovery: bool) -> bool {
        self.chap.is_some() && (!discovery || self.discovery)
    }
}

/// CHAP digest algorithms (IANA PPP authentication algorithm numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Md5 = 5,
    Sha256 = 7,
    Sha3_256 = 8,
}

impl Algorithm {
    /// Ours, most preferred first.
    const PREFERENCE: [Algorithm; 3] = [Algorithm::Sha3_256, Algorithm::Sha256, Algorithm::Md5];

    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha3_256 => "SHA3-256",
        }
    }

    /// Digest length in bytes: also the length of our challenges.
    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Md5 => 16,
            Algorithm::Sha256 | Algorithm::Sha3_256 => 32,
        }
    }

    /// Our pick from the initiator's `CHAP_A` list (values it lists that we do not know are
    /// skipped, RFC 7143 §12.1.3).
    pub fn choose(offer: &str) -> Option<Algorithm> {
        let offered: Vec<&str> = offer.split(',').map(str::trim).collect();
        Self::PREFERENCE.into_iter().find(|a| offered.iter().any(|o| text_number(o) == Some(u64::from(a.number()))))
    }

    /// The CHAP response `H(id || secret || challenge)` (RFC 1994 §4.1).
    pub fn response(self, id: u8, secret: &Secret, challenge: &[u8]) -> Vec<u8> {
        fn run<D: Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
            let mut d = D::new();
            d.update([id]);
            d.update(secret);
            d.update(challenge);
            d.finalize().to_vec()
        }
        match self {
            Algorithm::Md5 => run::<md5::Md5>(id, secret.expose(), challenge),
            Algorithm::Sha256 => run::<sha2::Sha256>(id, secret.expose(), challenge),
            Algorithm::Sha3_256 => run::<sha3::Sha3_256>(id, secret.expose(), challenge),
        }
    }
}

/// Why a CHAP exchange failed. The initiator only ever learns "authentication failure"; the
/// reason goes to the log, and none of them carries a secret or a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChapError {
    #[error("no CHAP algorithm in common (offered CHAP_A={0:?}; we take 8, 7, 5)")]
    NoAlgorithm(String),
    #[error("{0} arrived out of sequence")]
    OutOfSequence(&'static str),
    #[error("{0} missing")]
    Missing(&'static str),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("unknown CHAP user {0:?}")]
    WrongUser(String),
    #[error("wrong CHAP response (wrong secret) from user {0:?}")]
    WrongResponse(String),
    #[error("the initiator's challenge equals ours (reflection)")]
    Reflection,
    #[error("the initiator asks the target to authenticate (mutual CHAP), which is not configured")]
    MutualNotConfigured,
    #[error("mutual CHAP is configured but the initiator did not send CHAP_I and CHAP_C")]
    MutualRequired,
    #[error("the OS random generator failed: {0}")]
    Random(String),
}

#[derive(Debug)]
enum State {
    /// AuthMethod=CHAP agreed; the initiator's CHAP_A comes next.
    AwaitAlgorithm,
    /// We sent CHAP_A, CHAP_I, CHAP_C; CHAP_N and CHAP_R come next.
    AwaitResponse { alg: Algorithm, id: u8, challenge: Vec<u8> },
    /// The initiator proved its identity.
    Done,
}

/// The CHAP keys of one initiator request.
#[derive(Debug, Default)]
pub struct ChapKeys<'a> {
    pub a: Option<&'a str>,
    pub n: Option<&'a str>,
    pub r: Option<&'a str>,
    pub i: Option<&'a str>,
    pub c: Option<&'a str>,
}

impl<'a> ChapKeys<'a> {
    /// Takes a `CHAP_*` pair; `false` for a key CHAP does not have.
    pub fn take(&mut self, key: &str, value: &'a str) -> bool {
        let slot = match key {
            "CHAP_A" => &mut self.a,
            "CHAP_N" => &mut self.n,
            "CHAP_R" => &mut self.r,
            "CHAP_I" => &mut self.i,
            "CHAP_C" => &mut self.c,
            _ => return false,
        };
        *slot = Some(value);
        true
    }

    pub fn is_empty(&self) -> bool {
        self.a.is_none() && self.n.is_none() && self.r.is_none() && self.i.is_none() && self.c.is_none()
    }
}

/// The target's side of one CHAP exchange.
#[derive(Debug)]
pub struct Exchange {
    state: State,
    algorithm: Option<Algorithm>,
}

impl Default for Exchange {
    fn default() -> Self {
        Self::new()
    }
}

impl Exchange {
    pub fn new() -> Self {
        Exchange { state: State::AwaitAlgorithm, algorithm: None }
    }

    /// The initiator has proved its identity (and, with mutual CHAP, got our answer).
    pub fn done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The digest agreed on, once CHAP_A was answered.
    pub fn algorithm(&self) -> Option<Algorithm> {
        self.algorithm
    }

    /// Handles the CHAP keys of one request; returns the pairs to answer with.
    pub fn step(&mut self, keys: &ChapKeys, auth: &AuthConfig) -> Result<Vec<(&'static str, String)>, ChapError> {
        self.step_with(keys, auth, fill_random)
    }

    fn step_with(
        &mut self,
        keys: &ChapKeys,
        auth: &AuthConfig,
        random: impl Fn(&mut [u8]) -> Result<(), ChapError>,
    ) -> Result<Vec<(&'static str, String)>, ChapError> {
        let creds = auth.chap.as_ref().ok_or(ChapError::Missing("target CHAP credentials"))?;
        match &self.state {
            State::AwaitAlgorithm => {
                for (k, v) in [("CHAP_N", keys.n), ("CHAP_R", keys.r), ("CHAP_I", keys.i), ("CHAP_C", keys.c)] {
                    if v.is_some() {
                        return Err(ChapError::OutOfSequence(k));
                    }
                }
                // The initiator may send CHAP_A in the request after AuthMethod was agreed.
                let Some(offer) = keys.a else { return Ok(Vec::new()) };
                let alg = Algorithm::choose(offer).ok_or_else(|| ChapError::NoAlgorithm(offer.to_string()))?;
                let mut id = [0u8; 1];
                let mut challenge = vec![0u8; alg.digest_len()];
                random(&mut id)?;
                random(&mut challenge)?;
                let answer = vec![
                    ("CHAP_A", alg.number().to_string()),
                    ("CHAP_I", id[0].to_string()),
                    ("CHAP_C", to_hex(&challenge)),
                ];
                self.algorithm = Some(alg);
                self.state = State::AwaitResponse { alg, id: id[0], challenge };
                Ok(answer)
            }
            State::AwaitResponse { alg, id, challenge } => {
                let (alg, id) = (*alg, *id);
                if keys.a.is_some() {
                    return Err(ChapError::OutOfSequence("CHAP_A"));
                }
                let name = keys.n.ok_or(ChapError::Missing("CHAP_N"))?;
                let response =
                    decode_binary(keys.r.ok_or(ChapError::Missing("CHAP_R"))?).ok_or(ChapError::Malformed("CHAP_R"))?;
                // The initiator's challenge to us, checked before any answer is computed.
                let mutual = match (keys.i, keys.c) {
                    (None, None) => None,
                    (Some(i), Some(c)) => {
                        let i =
                            text_number(i).and_then(|n| u8::try_from(n).ok()).ok_or(ChapError::Malformed("CHAP_I"))?;
                        let c = decode_binary(c)
                            .filter(|c| !c.is_empty() && c.len() <= MAX_CHALLENGE_LEN)
                            .ok_or(ChapError::Malformed("CHAP_C"))?;
                        if c == *challenge {
                            return Err(ChapError::Reflection);
                        }
                        Some((i, c))
                    }
                    (None, Some(_)) => return Err(ChapError::Missing("CHAP_I")),
                    (Some(_), None) => return Err(ChapError::Missing("CHAP_C")),
                };
                // Compare the whole response even for an unknown name: the timing does not
                // tell which of the two was wrong.
                let expected = alg.response(id, &creds.secret, challenge);
                let response_ok = constant_time_eq(&expected, &response);
                if name != creds.username {
                    return Err(ChapError::WrongUser(printable(name)));
                }
                if !response_ok {
                    return Err(ChapError::WrongResponse(printable(name)));
                }
                let answer = match (mutual, &auth.mutual) {
                    (Some(_), None) => return Err(ChapError::MutualNotConfigured),
                    (None, Some(_)) => return Err(ChapError::MutualRequired),
                    (None, None) => Vec::new(),
                    (Some((i, c)), Some(ours)) => {
                        vec![("CHAP_N", ours.username.clone()), ("CHAP_R", to_hex(&alg.response(i, &ours.secret, &c)))]
                    }
                };
                self.state = State::Done;
                Ok(answer)
            }
            State::Done => {
                if keys.is_empty() {
                    Ok(Vec::new())
                } else {
                    Err(ChapError::OutOfSequence("CHAP key after authentication"))
                }
            }
        }
    }
}

/// Fills `buf` from the OS CSPRNG (getrandom(2)).
fn fill_random(buf: &mut [u8]) -> Result<(), ChapError> {
    getrandom::getrandom(buf).map_err(|e| ChapError::Random(e.to_string()))
}

/// At most 64 characters of a name from the wire, for the log.
fn printable(s: &str) -> String {
    s.chars().take(64).map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A decimal or `0x` hex number (RFC 7143 §6.1 numerical values).
fn text_number(s: &str) -> Option<u64> {
    super::text::parse_number(s)
}

/// `0x` + lower-case hex: how we send binary values.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A binary value (RFC 7143 §6.1): `0x`/`0X` hex (an odd digit count gets a leading zero) or
/// `0b`/`0B` base64.
pub fn decode_binary(s: &str) -> Option<Vec<u8>> {
    let (prefix, body) = (s.get(..2)?, &s[2..]);
    match prefix {
        "0x" | "0X" => {
            if body.is_empty() || !body.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let padded = if !body.len().is_multiple_of(2) { format!("0{body}") } else { body.to_string() };
            (0..padded.len()).step_by(2).map(|i| u8::from_str_radix(&padded[i..i + 2], 16).ok()).collect()
        }
        "0b" | "0B" => decode_base64(body),
        _ => None,
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let body = s.trim_end_matches('=');
    if s.is_empty() || !s.len().is_multiple_of(4) || s.len() - body.len() > 2 {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (k, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * k);
        }
        let bytes = acc.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, secret: &str) -> Credentials {
        Credentials { username: user.into(), secret: Secret::new(secret.as_bytes()) }
    }

    fn auth(mutual: bool) -> AuthConfig {
        AuthConfig {
            chap: Some(creds("rig", "initiator-secret")),
            mutual: mutual.then(|| creds("tgt", "target-secret-1")),
            discovery: false,
        }
    }

    fn keys<'a>(pairs: &[(&str, &'a str)]) -> ChapKeys<'a> {
        let mut k = ChapKeys::default();
        for (key, v) in pairs {
            assert!(k.take(key, v));
        }
        k
    }

    fn get<'a>(answer: &'a [(&'static str, String)], key: &str) -> &'a str {
        answer.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str()).unwrap()
    }

    /// Runs CHAP_A and returns (exchange, algorithm, id, challenge).
    fn started(a: &str, auth: &AuthConfig) -> (Exchange, Algorithm, u8, Vec<u8>) {
        let mut x = Exchange::new();
        let answer = x.step(&keys(&[("CHAP_A", a)]), auth).unwrap();
        let alg = match get(&answer, "CHAP_A") {
            "5" => Algorithm::Md5,
            "7" => Algorithm::Sha256,
            "8" => Algorithm::Sha3_256,
            other => panic!("{other}"),
        };
        let id: u8 = get(&answer, "CHAP_I").parse().unwrap();
        let challenge = decode_binary(get(&answer, "CHAP_C")).unwrap();
        (x, alg, id, challenge)
    }

    #[test]
    fn rfc1994_md5_known_answer() {
        // MD5(0x01 || "secret" || 16 bytes of 0x00..0x0f), as computed by
        // Python hashlib.md5(bytes([1]) + b"secret" + bytes(range(16))).
        let challenge: Vec<u8> = (0..16).collect();
        let r = Algorithm::Md5.response(1, &Secret::new("secret"), &challenge);
        assert_eq!(to_hex(&r), "0x740e86463bda3a4d7017d6e0fba0699d");
    }

    #[test]
    fn algorithm_preference_and_lengths() {
        assert_eq!(Algorithm::choose("5"), Some(Algorithm::Md5));
        assert_eq!(Algorithm::choose("5,7"), Some(Algorithm::Sha256));
        assert_eq!(Algorithm::choose("7,5,8"), Some(Algorithm::Sha3_256));
        assert_eq!(Algorithm::choose("0x5"), Some(Algorithm::Md5));
        assert_eq!(Algorithm::choose("6,128"), None);
        for (a, n) in [("5", 16), ("7", 32), ("8", 32)] {
            let (_, alg, _, c) = started(a, &auth(false));
            assert_eq!((alg.digest_len(), c.len()), (n, n));
            assert_eq!(alg.response(0, &Secret::new("x"), b"y").len(), n);
        }
    }

    #[test]
    fn right_response_authenticates_each_algorithm() {
        for a in ["5", "7", "8"] {
            let cfg = auth(false);
            let (mut x, alg, id, c) = started(a, &cfg);
            let r = to_hex(&alg.response(id, &Secret::new("initiator-secret"), &c));
            let answer = x.step(&keys(&[("CHAP_N", "rig"), ("CHAP_R", &r)]), &cfg).unwrap();
            assert!(answer.is_empty());
            assert!(x.done());
        }
    }

    #[test]
    fn challenges_are_fresh() {
        let cfg = auth(false);
        let a = started("5", &cfg).3;
        let b = started("5", &cfg).3;
        assert_ne!(a, b);
        assert!(a.iter().any(|&b| b != 0));
    }

    #[test]
    fn wrong_secret_and_wrong_user_fail() {
        let cfg = auth(false);
        let (mut x, alg, id, c) = started("5", &cfg);
        let r = to_hex(&alg.response(id, &Secret::new("not-the-secret!"), &c));
        let e = x.step(&keys(&[("CHAP_N", "rig"), ("CHAP_R", &r)]), &cfg).unwrap_err();
        assert_eq!(e, ChapError::WrongResponse("rig".into()));
        assert!(!x.done());

        let (mut x, alg, id, c) = started("5", &cfg);
        let r = to_hex(&alg.response(id, &Secret::new("initiator-secret"), &c));
        let e = x.step(&keys(&[("CHAP_N", "someone"), ("CHAP_R", &r)]), &cfg).unwrap_err();
        assert_eq!(e, ChapError::WrongUser("someone".into()));
        // The error text names neither secret nor response.
        assert!(!e.to_string().contains("initiator-secret"));
    }

    #[test]
    fn missing_and_malformed_keys_fail() {
        let cfg = auth(false);
        let (mut x, ..) = started("5", &cfg);
        assert_eq!(x.step(&keys(&[("CHAP_N", "rig")]), &cfg).unwrap_err(), ChapError::Missing("CHAP_R"));
        let (mut x, ..) = started("5", &cfg);
        assert_eq!(
            x.step(&keys(&[("CHAP_N", "rig"), ("CHAP_R", "zz")]), &cfg).unwrap_err(),
            ChapError::Malformed("CHAP_R")
        );
        let mut x = Exchange::new();
        assert_eq!(x.step(&keys(&[("CHAP_A", "3")]), &cfg).unwrap_err(), ChapError::NoAlgorithm("3".into()));
        let mut x = Exchange::new();
        assert_eq!(
            x.step(&keys(&[("CHAP_N", "rig"), ("CHAP_R", "0x00")]), &cfg).unwrap_err(),
            ChapError::OutOfSequence("CHAP_N")
        );
        // Nothing yet: waiting for CHAP_A is fine.
        let mut x = Exchange::new();
        assert!(x.step(&ChapKeys::default(), &cfg).unwrap().is_empty());
    }

    #[test]
    fn mutual_chap_answers_the_initiator() {
        let cfg = auth(true);
        let (mut x, alg, id, c) = started("7", &cfg);
        let r = to_hex(&alg.response(id, &Secret::new("initiator-secret"), &c));
        let answer = x
            .step(&keys(&[("CHAP_N", "rig"), ("CHAP_R", &r), ("CHAP_I", "77"), ("CHAP_C", "0x0102030405")]), &cfg)
            .unwrap();
        assert_eq!(get(&answer, "CHAP_N"), "tgt");
        let want = alg.response(77, &Secret::new("target-secret-1"), &[1, 2, 3, 4, 5]);
        assert_eq!(decode_binary(get(&answer, "CHAP_R")).unwrap(), want);
        assert!(x.done());
    }

    #[test]
    fn mutual_mismatches_fail() {
        // Asked to authenticate without mutual credentials.
        let cfg = auth(false);
        let (mut x, alg, id, c) = started("5", &cfg);
        let r = to_hex(&alg.response(id, &Secret::new("initiator-secret"), &c));
        let k = keys(&[("CHAP_N", "rig"), ("CHAP_R", &r), ("CHAP_I", "1"), ("CHAP_C", "0xaabb")]);
        assert_eq!(x.step(&k, &cfg).unwrap_err(), ChapError::MutualNotConfigured);
        // Mutual configured, the initiator does not ask.
        let cfg = auth(true);
        let (mut x, alg, id, c) = started("5", &cfg);
        let r = to_hex(&alg.response(id, &Secret::new("initiator-secret"), &c));
        assert_eq!(x.step(&keys(&[("CHAP_N", "rig"), ("CHAP_R", &r)]), &cfg).unwrap_err(), ChapError::MutualRequired);
        // Half a challenge.
        let (mut x, ..) = started("5", &cfg);
        let k = keys(&[("CHAP_N", "rig"), ("CHAP_R", "0x00"), ("CHAP_C", "0xaabb")]);
        assert_eq!(x.step(&k, &cfg).unwrap_err(), ChapError::Missing("CHAP_I"));
    }

    #[test]
    fn reflected_challenge_is_refused() {
        let cfg = auth(true);
        let (mut x, alg, id, c) = started("5", &cfg);
        let r = to_hex(&alg.response(id, &Secret::new("initiator-secret"), &c));
        let id_s = id.to_string();
        let c_s = to_hex(&c);
        let k = keys(&[("CHAP_N", "rig"), ("CHAP_R", &r), ("CHAP_I", &id_s), ("CHAP_C", &c_s)]);
        assert_eq!(x.step(&k, &cfg).unwrap_err(), ChapError::Reflection);
        // Also when the reflected challenge comes base64-encoded.
        let (mut x, alg, id, c) = started("5", &cfg);
        let r = to_hex(&alg.response(id, &Secret::new("initiator-secret"), &c));
        let b64 = format!("0b{}", encode_base64(&c));
        let k = keys(&[("CHAP_N", "rig"), ("CHAP_R", &r), ("CHAP_I", "3"), ("CHAP_C", &b64)]);
        assert_eq!(x.step(&k, &cfg).unwrap_err(), ChapError::Reflection);
    }

    #[test]
    fn random_failure_is_an_error() {
        let mut x = Exchange::new();
        let e = x
            .step_with(&keys(&[("CHAP_A", "5")]), &auth(false), |_| Err(ChapError::Random("no entropy".into())))
            .unwrap_err();
        assert_eq!(e, ChapError::Random("no entropy".into()));
    }

    fn encode_base64(b: &[u8]) -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in b.chunks(3) {
            let mut v = [0u8; 3];
            v[..chunk.len()].copy_from_slice(chunk);
            let n = u32::from_be_bytes([0, v[0], v[1], v[2]]);
            for k in 0..4 {
                if k <= chunk.len() {
                    s.push(T[(n >> (18 - 6 * k) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0a0B"), Some(vec![10, 11]));
        assert_eq!(decode_binary("0XabC"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("0xgg"), None);
        assert_eq!(decode_binary("abcd"), None);
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0bAQ=="), Some(vec![1]));
        assert_eq!(decode_binary("0bAQ="), None);
        assert_eq!(decode_binary("0bA*=="), None);
        for len in 0..40u8 {
            let v: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37)).collect();
            if !v.is_empty() {
                assert_eq!(decode_binary(&format!("0b{}", encode_base64(&v))), Some(v.clone()));
            }
            assert_eq!(decode_binary(&to_hex(&v)).unwrap_or_default(), v);
        }
    }

    #[test]
    fn secrets_never_print() {
        let c = creds("rig", "initiator-secret");
        let cfg = AuthConfig { chap: Some(c.clone()), mutual: Some(c), discovery: true };
        let shown = format!("{cfg:?} {}", Secret::new("initiator-secret"));
        assert!(!shown.contains("initiator-secret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
