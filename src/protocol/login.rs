//! Login phase (RFC 7143 §6.3, §11.12, §11.13) and the login keys (§13): one Login Request
//! in, one Login Response out, with the stage machine, text negotiation, and multi-PDU text.
//! ISID/TSIH and connection bookkeeping belong to the session layer; this only echoes them.

use std::collections::HashSet;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;

use super::acl::Acl;
use super::chap::{self, AuthConfig, ChapError, ChapKeys};
use super::text::{self, Chunks, TextError, IRRELEVANT, MAX_TEXT_LEN, NOT_UNDERSTOOD, REJECT};

/// Real initiators' login keys, shared with the fuzz seeds.
#[cfg(test)]
#[path = "login_peers.rs"]
mod peers;

/// Login stages (CSG/NSG values).
pub const STAGE_SECURITY: u8 = 0;
pub const STAGE_OPERATIONAL: u8 = 1;
pub const STAGE_FULL_FEATURE: u8 = 3;

/// Login data segments are limited by the default MaxRecvDataSegmentLength: the declared
/// values only take effect in full feature phase.
pub const LOGIN_MAX_DATA: usize = 8192;

/// RFC 7143 defaults of the keys, used when a key is never negotiated.
const DEFAULT_MAX_RECV_DSL: u32 = 8192;
const DEFAULT_MAX_BURST: u32 = 262_144;
const DEFAULT_FIRST_BURST: u32 = 65_536;
const DEFAULT_TIME2WAIT: u32 = 2;
const DEFAULT_TIME2RETAIN: u32 = 20;
/// Our side of DefaultTime2Wait/Retain: the defaults; with ErrorRecoveryLevel 0 they only
/// matter to the initiator's reconnect timing.
const OUR_TIME2WAIT: u32 = DEFAULT_TIME2WAIT;
const OUR_TIME2RETAIN: u32 = DEFAULT_TIME2RETAIN;
/// iSCSIProtocolLevel (RFC 7144): 1 is RFC 7143.
const OUR_PROTOCOL_LEVEL: u64 = 1;

const LENGTH_RANGE: RangeInclusive<u64> = 512..=16_777_215;
const COUNT_RANGE: RangeInclusive<u64> = 1..=65_535;
const TIME_RANGE: RangeInclusive<u64> = 0..=3600;

/// Login status classes and details (RFC 7143 §11.13.5).
pub mod status {
    pub const SUCCESS: (u8, u8) = (0, 0);
    pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
    pub const AUTH_FAILURE: (u8, u8) = (2, 1);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (2, 2);
    pub const NOT_FOUND: (u8, u8) = (2, 3);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
    pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
    pub const SESSION_TYPE_UNSUPPORTED: (u8, u8) = (2, 9);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (2, 0x0b);
}

#[derive(Clone)]
pub struct LoginConfig {
    pub target_name: String,
    pub target_alias: Option<String>,
    pub portal_group_tag: u16,
    /// `host:port,tpgt` entries for TargetAddress/SendTargets.
    pub addresses: Vec<String>,
    /// What we accept per PDU; we declare it.
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub immediate_data: bool,
    /// false: we allow unsolicited data.
    pub initial_r2t: bool,
    /// Whether CRC32C may be selected.
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u32,
    pub error_recovery_level: u32,
    /// CHAP credentials; the default demands none.
    pub auth: AuthConfig,
    /// Who may log in; the default allows everyone.
    pub acl: Acl,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            target_name: "iqn.2024-06.dev.jumpstarter:target1".to_string(),
            target_alias: None,
            portal_group_tag: 1,
            addresses: Vec::new(),
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1 << 20,
            first_burst_length: 256 << 10,
            max_outstanding_r2t: 16,
            immediate_data: true,
            initial_r2t: false,
            header_digest: true,
            data_digest: true,
            max_connections: 1,
            error_recovery_level: 0,
            auth: AuthConfig::default(),
            acl: Acl::default(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SessionType {
    Normal,
    Discovery,
}

#[derive(Clone, Debug)]
pub struct Negotiated {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub target_name: Option<String>,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Ours: the largest data segment the initiator may send us.
    pub max_recv_data_segment_length: u32,
    /// The initiator's declared MaxRecvDataSegmentLength: the largest we may send.
    pub max_xmit_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub error_recovery_level: u32,
    pub max_connections: u32,
    pub ifmarker: bool,
    pub ofmarker: bool,
    /// How the initiator authenticated: `None`, or e.g. `CHAP SHA-256, mutual`.
    pub auth: String,
    /// The initiator passes the ACLs. Only a discovery session can end its login without:
    /// it then is not shown the target.
    pub authorized: bool,
}

impl Negotiated {
    /// The values in force if nothing is negotiated: RFC defaults combined with our limits
    /// by each key's result function.
    fn initial(cfg: &LoginConfig) -> Self {
        let max_burst_length = DEFAULT_MAX_BURST.min(cfg.max_burst_length);
        Negotiated {
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            initiator_alias: None,
            target_name: None,
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: cfg.max_recv_data_segment_length,
            max_xmit_data_segment_length: DEFAULT_MAX_RECV_DSL,
            max_burst_length,
            first_burst_length: DEFAULT_FIRST_BURST.min(cfg.first_burst_length).min(max_burst_length),
            immediate_data: cfg.immediate_data,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait: DEFAULT_TIME2WAIT.max(OUR_TIME2WAIT),
            default_time2retain: DEFAULT_TIME2RETAIN.min(OUR_TIME2RETAIN),
            error_recovery_level: 0,
            max_connections: 1,
            ifmarker: false,
            ofmarker: false,
            auth: "None".to_string(),
            authorized: true,
        }
    }

    /// Name/value pairs for display (list_sessions).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let yn = |b: bool| text::bool_str(b).to_string();
        let digest = |b: bool| if b { "CRC32C" } else { "None" }.to_string();
        let session_type = match self.session_type {
            SessionType::Normal => "Normal",
            SessionType::Discovery => "Discovery",
        };
        let mut v = vec![("SessionType", session_type.to_string()), ("InitiatorName", self.initiator_name.clone())];
        if let Some(alias) = &self.initiator_alias {
            v.push(("InitiatorAlias", alias.clone()));
        }
        if let Some(name) = &self.target_name {
            v.push(("TargetName", name.clone()));
        }
        v.extend([
            ("HeaderDigest", digest(self.header_digest)),
            ("DataDigest", digest(self.data_digest)),
            ("MaxRecvDataSegmentLength", self.max_recv_data_segment_length.to_string()),
            ("MaxXmitDataSegmentLength", self.max_xmit_data_segment_length.to_string()),
            ("MaxBurstLength", self.max_burst_length.to_string()),
            ("FirstBurstLength", self.first_burst_length.to_string()),
            ("ImmediateData", yn(self.immediate_data)),
            ("InitialR2T", yn(self.initial_r2t)),
            ("MaxOutstandingR2T", self.max_outstanding_r2t.to_string()),
            ("DataPDUInOrder", yn(self.data_pdu_in_order)),
            ("DataSequenceInOrder", yn(self.data_sequence_in_order)),
            ("DefaultTime2Wait", self.default_time2wait.to_string()),
            ("DefaultTime2Retain", self.default_time2retain.to_string()),
            ("ErrorRecoveryLevel", self.error_recovery_level.to_string()),
            ("MaxConnections", self.max_connections.to_string()),
            ("IFMarker", yn(self.ifmarker)),
            ("OFMarker", yn(self.ofmarker)),
        ]);
        v
    }
}

pub struct LoginRequest<'a> {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: &'a [u8],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LoginOutcome {
    /// Send the response, wait for the next request.
    Continue,
    /// The response has T=1 NSG=3: the connection enters full feature phase.
    FullFeature,
    /// A non-zero status: send it, then close the connection.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("bad login text: {0}")]
    Text(#[from] TextError),
    #[error("initiator supports versions {min}..={max}, we only 0")]
    UnsupportedVersion { min: u8, max: u8 },
    #[error("C and T bits both set")]
    ContinueWithTransit,
    #[error("request in stage {got}, expected {expected}")]
    WrongStage { expected: u8, got: u8 },
    #[error("transition from stage {csg} to {nsg} is not allowed")]
    BadTransition { csg: u8, nsg: u8 },
    #[error("login request carries data while our response is still being sent")]
    DataDuringResponse,
    #[error("key {0} negotiated more than once")]
    DuplicateKey(String),
    #[error("key {0} is only allowed in the first login request")]
    NotInFirstRequest(String),
    #[error("InitiatorName missing from the first login request")]
    MissingInitiatorName,
    #[error("TargetName missing from the first login request of a normal session")]
    MissingTargetName,
    #[error("no target named {0}")]
    TargetNotFound(String),
    #[error("unknown SessionType {0}")]
    BadSessionType(String),
    #[error("invalid value {value:?} for {key}")]
    BadValue { key: String, value: String },
    #[error("no acceptable authentication method in {0:?}")]
    AuthFailed(String),
    #[error("CHAP: {0}")]
    Chap(#[from] ChapError),
    #[error("authentication required: {0}")]
    AuthRequired(&'static str),
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    #[error("login already finished")]
    Finished,
}

impl LoginError {
    /// The status class and detail reported to the initiator.
    pub fn status(&self) -> (u8, u8) {
        match self {
            LoginError::UnsupportedVersion { .. } => status::UNSUPPORTED_VERSION,
            LoginError::MissingInitiatorName | LoginError::MissingTargetName => status::MISSING_PARAMETER,
            LoginError::TargetNotFound(_) => status::NOT_FOUND,
            LoginError::BadSessionType(_) => status::SESSION_TYPE_UNSUPPORTED,
            LoginError::AuthFailed(_) | LoginError::Chap(_) | LoginError::AuthRequired(_) => status::AUTH_FAILURE,
            LoginError::NotAuthorized(_) => status::AUTHORIZATION_FAILURE,
            LoginError::Finished => status::INVALID_DURING_LOGIN,
            _ => status::INITIATOR_ERROR,
        }
    }
}

/// Authentication methods (RFC 7143 §12.1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AuthMethod {
    None,
    Chap,
}

impl AuthMethod {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "None" => Some(AuthMethod::None),
            "CHAP" => Some(AuthMethod::Chap),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            AuthMethod::None => "None",
            AuthMethod::Chap => "CHAP",
        }
    }
}

/// A response too long for one Login Response PDU.
struct PendingResponse {
    chunks: Chunks,
    transit: bool,
    nsg: u8,
}

pub struct Login {
    cfg: Arc<LoginConfig>,
    neg: Negotiated,
    /// The CSG the next request must carry; `None` before the first request.
    stage: Option<u8>,
    /// The first complete request (with the names) has been handled.
    started: bool,
    /// Request text accumulated over C=1 PDUs.
    request: Vec<u8>,
    response: Option<PendingResponse>,
    /// Keys the initiator has offered or declared in this login.
    seen: HashSet<String>,
    /// Keys we offered and await an answer to.
    offered: Vec<&'static str>,
    auth: Option<AuthMethod>,
    /// The CHAP exchange, once AuthMethod=CHAP is agreed.
    chap: Option<chap::Exchange>,
    /// The initiator's address, for `allowed_networks`.
    peer: Option<IpAddr>,
    declared_max_recv: bool,
    declared_target_info: bool,
    finished: bool,
    error: Option<LoginError>,
}

impl Login {
    pub fn new(cfg: Arc<LoginConfig>) -> Self {
        let neg = Negotiated::initial(&cfg);
        Login {
            cfg,
            neg,
            stage: None,
            started: false,
            request: Vec::new(),
            response: None,
            seen: HashSet::new(),
            offered: Vec::new(),
            auth: None,
            chap: None,
            peer: None,
            declared_max_recv: false,
            declared_target_info: false,
            finished: false,
            error: None,
        }
    }

    /// A login from `peer`, which `allowed_networks` is checked against.
    pub fn with_peer(cfg: Arc<LoginConfig>, peer: IpAddr) -> Self {
        let mut login = Self::new(cfg);
        login.peer = Some(peer);
        login
    }

    /// One Login Request in, one Login Response out.
    pub fn step(&mut self, req: &LoginRequest) -> (LoginResponse, LoginOutcome) {
        match self.try_step(req) {
            Ok(r) => r,
            Err(e) => {
                let (status_class, status_detail) = e.status();
                self.error = Some(e);
                self.finished = true;
                let rsp = LoginResponse {
                    transit: false,
                    cont: false,
                    csg: req.csg,
                    nsg: 0,
                    status_class,
                    status_detail,
                    data: Vec::new(),
                };
                (rsp, LoginOutcome::Failed)
            }
        }
    }

    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// Why the login failed, for the log.
    pub fn error(&self) -> Option<&LoginError> {
        self.error.as_ref()
    }

    /// The authentication method agreed on, if AuthMethod was negotiated.
    pub fn auth_method(&self) -> Option<AuthMethod> {
        self.auth
    }

    fn try_step(&mut self, req: &LoginRequest) -> Result<(LoginResponse, LoginOutcome), LoginError> {
        if self.finished {
            return Err(LoginError::Finished);
        }
        if req.version_min > 0 {
            return Err(LoginError::UnsupportedVersion { min: req.version_min, max: req.version_max });
        }
        if req.cont && req.transit {
            return Err(LoginError::ContinueWithTransit);
        }
        match self.stage {
            Some(expected) if expected != req.csg => {
                return Err(LoginError::WrongStage { expected, got: req.csg });
            }
            None if req.csg != STAGE_SECURITY && req.csg != STAGE_OPERATIONAL => {
                return Err(LoginError::WrongStage { expected: STAGE_SECURITY, got: req.csg });
            }
            _ => self.stage = Some(req.csg),
        }
        // Only forward: 0→1, 0→3, 1→3.
        if req.transit && !(req.nsg > req.csg && (req.nsg == STAGE_OPERATIONAL || req.nsg == STAGE_FULL_FEATURE)) {
            return Err(LoginError::BadTransition { csg: req.csg, nsg: req.nsg });
        }

        if let Some(pending) = self.response.as_mut() {
            // The initiator fetches the rest of our text with empty requests.
            if req.cont || !req.data.is_empty() {
                return Err(LoginError::DataDuringResponse);
            }
            let (data, last) = pending.chunks.next(LOGIN_MAX_DATA);
            if !last {
                return Ok(self.reply(req, false, true, data));
            }
            let transit = pending.transit && req.transit && req.nsg == pending.nsg;
            self.response = None;
            return Ok(self.reply(req, transit, false, data));
        }

        let total = self.request.len() + req.data.len();
        if total > MAX_TEXT_LEN {
            return Err(TextError::TooLong(total).into());
        }
        self.request.extend_from_slice(req.data);
        if req.cont {
            return Ok(self.reply(req, false, false, Vec::new()));
        }
        let request = std::mem::take(&mut self.request);
        let (data, transit) = self.negotiate(req, &request)?;
        if data.len() > LOGIN_MAX_DATA {
            let mut chunks = Chunks::new(data);
            let (first, _) = chunks.next(LOGIN_MAX_DATA);
            self.response = Some(PendingResponse { chunks, transit, nsg: req.nsg });
            return Ok(self.reply(req, false, true, first));
        }
        Ok(self.reply(req, transit, false, data))
    }

    /// Builds a successful response and moves to the next stage when transiting.
    fn reply(&mut self, req: &LoginRequest, transit: bool, cont: bool, data: Vec<u8>) -> (LoginResponse, LoginOutcome) {
        let mut outcome = LoginOutcome::Continue;
        if transit {
            self.stage = Some(req.nsg);
            if req.nsg == STAGE_FULL_FEATURE {
                self.finished = true;
                outcome = LoginOutcome::FullFeature;
            }
        }
        let (status_class, status_detail) = status::SUCCESS;
        // NSG is reserved unless T is set.
        let nsg = if transit { req.nsg } else { 0 };
        (LoginResponse { transit, cont, csg: req.csg, nsg, status_class, status_detail, data }, outcome)
    }

    /// Negotiates one complete request text; returns our text and whether we agree to transit.
    fn negotiate(&mut self, req: &LoginRequest, request: &[u8]) -> Result<(Vec<u8>, bool), LoginError> {
        let pairs = text::parse(request)?;
        let first = !self.started;
        if first {
            self.identify(&pairs)?;
            self.started = true;
        }
        let security = req.csg == STAGE_SECURITY;
        let required = self.cfg.auth.required(self.neg.session_type == SessionType::Discovery);
        if first && required && !security {
            return Err(LoginError::AuthRequired("the login skipped the security stage"));
        }
        let mut answers: Vec<(&str, String)> = Vec::new();
        let mut chap_keys = ChapKeys::default();
        for &(key, value) in &pairs {
            if let Some(i) = self.offered.iter().position(|k| *k == key) {
                self.offered.swap_remove(i);
                self.seen.insert(key.to_string());
                self.take_answer(key, value)?;
                continue;
            }
            if !self.seen.insert(key.to_string()) {
                return Err(LoginError::DuplicateKey(key.to_string()));
            }
            // The CHAP keys of this request go to the exchange together, after the loop.
            if security && self.chap.is_some() && chap_keys.take(key, value) {
                continue;
            }
            if let Some(answer) = self.answer_key(key, value, req.csg, first)? {
                answers.push((key, answer));
            }
        }
        if let (true, Some(x)) = (security, self.chap.as_mut()) {
            let chap_answer = x.step(&chap_keys, &self.cfg.auth)?;
            answers.extend(chap_answer);
            if x.done() {
                let alg = x.algorithm().map_or("", chap::Algorithm::name);
                let mutual = if self.cfg.auth.mutual.is_some() { ", mutual" } else { "" };
                self.neg.auth = format!("CHAP {alg}{mutual}");
            }
        }
        // FirstBurstLength must not exceed MaxBurstLength (RFC 7143 §13.14).
        if self.neg.first_burst_length > self.neg.max_burst_length {
            self.neg.first_burst_length = self.neg.max_burst_length;
            if let Some(a) = answers.iter_mut().find(|(k, v)| *k == "FirstBurstLength" && v.as_str() != IRRELEVANT) {
                a.1 = self.neg.first_burst_length.to_string();
            }
        }

        let normal = self.neg.session_type == SessionType::Normal;
        let mut out = text::encode(&answers)?;
        if normal && !self.declared_target_info {
            // TargetPortalGroupTag goes in the first response of a normal session (§13.9).
            self.declared_target_info = true;
            if let Some(alias) = &self.cfg.target_alias {
                text::push_pair(&mut out, "TargetAlias", alias)?;
            }
            text::push_pair(&mut out, "TargetPortalGroupTag", &self.cfg.portal_group_tag.to_string())?;
        }
        let mut transit = req.transit;
        if security && transit {
            // Leaving the security stage needs a finished exchange when one is required or
            // was started.
            match &self.chap {
                Some(x) if !x.done() => transit = false,
                None if required => return Err(LoginError::AuthRequired("no CHAP exchange before leaving security")),
                _ => {}
            }
        }
        if transit && req.nsg == STAGE_FULL_FEATURE {
            if !self.declared_max_recv {
                self.declared_max_recv = true;
                text::push_pair(
                    &mut out,
                    "MaxRecvDataSegmentLength",
                    &self.cfg.max_recv_data_segment_length.to_string(),
                )?;
            }
            if normal && self.offer_needed(&mut out)? {
                // The initiator must answer our offers before the login may complete.
                transit = false;
            }
        }
        if !self.offered.is_empty() {
            transit = false;
        }
        Ok((out, transit))
    }

    /// The names and session type of the first request (RFC 7143 §6.3.1).
    fn identify(&mut self, pairs: &[(&str, &str)]) -> Result<(), LoginError> {
        let find = |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|&(_, v)| v);
        let initiator = find("InitiatorName").filter(|v| !v.is_empty()).ok_or(LoginError::MissingInitiatorName)?;
        self.neg.initiator_name = initiator.to_string();
        self.neg.session_type = match find("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(other) => return Err(LoginError::BadSessionType(other.to_string())),
        };
        let target = find("TargetName");
        if self.neg.session_type == SessionType::Normal {
            let target = target.ok_or(LoginError::MissingTargetName)?;
            if target != self.cfg.target_name {
                return Err(LoginError::TargetNotFound(target.to_string()));
            }
        }
        // A discovery session is not bound to a target, so its TargetName is only recorded.
        self.neg.target_name = target.map(str::to_string);
        if let Err(why) = self.cfg.acl.check(initiator, self.peer) {
            // Discovery goes on, but will not list the target (RFC 7143 §12.1: authorization
            // is the target's business; SendTargets only shows what the initiator may use).
            if self.neg.session_type == SessionType::Normal {
                return Err(LoginError::NotAuthorized(why));
            }
            self.neg.authorized = false;
        }
        Ok(())
    }

    /// Our answer to one offered or declared key; `None` when nothing is answered.
    fn answer_key(&mut self, key: &str, value: &str, csg: u8, first: bool) -> Result<Option<String>, LoginError> {
        let discovery = self.neg.session_type == SessionType::Discovery;
        let session_only = matches!(
            key,
            "MaxConnections"
                | "InitialR2T"
                | "ImmediateData"
                | "MaxBurstLength"
                | "FirstBurstLength"
                | "MaxOutstandingR2T"
                | "DataPDUInOrder"
                | "DataSequenceInOrder"
                | "TaskReporting"
                | "iSCSIProtocolLevel"
        );
        if discovery && session_only {
            return Ok(Some(IRRELEVANT.to_string()));
        }
        let cfg = Arc::clone(&self.cfg);
        let reject = || Ok(Some(REJECT.to_string()));
        let bad_value = || LoginError::BadValue { key: key.to_string(), value: value.to_string() };
        let answer = match key {
            "InitiatorName" | "TargetName" | "SessionType" => {
                if first {
                    return Ok(None);
                }
                return Err(LoginError::NotInFirstRequest(key.to_string()));
            }
            "InitiatorAlias" => {
                self.neg.initiator_alias = Some(value.to_string());
                return Ok(None);
            }
            // Only the target declares these.
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => return reject(),
            // Full feature phase only.
            "SendTargets" => return reject(),
            "AuthMethod" => {
                if csg != STAGE_SECURITY {
                    return Ok(Some(IRRELEVANT.to_string()));
                }
                // The first of the initiator's list that we take (RFC 7143 §6.2.1): None unless
                // authentication is required, CHAP when credentials are configured.
                let required = self.cfg.auth.required(discovery);
                let has_chap = self.cfg.auth.chap.is_some();
                let acceptable = |m: &AuthMethod| match m {
                    AuthMethod::None => !required,
                    AuthMethod::Chap => has_chap,
                };
                let chosen = value.split(',').filter_map(AuthMethod::from_name).find(acceptable);
                let chosen = chosen.ok_or_else(|| LoginError::AuthFailed(value.to_string()))?;
                self.auth = Some(chosen);
                if chosen == AuthMethod::Chap {
                    self.chap = Some(chap::Exchange::new());
                }
                chosen.name().to_string()
            }
            // No CHAP (or other) exchange was selected.
            _ if key.starts_with("CHAP_") => IRRELEVANT.to_string(),
            "HeaderDigest" | "DataDigest" => {
                let allow_crc = if key == "HeaderDigest" { cfg.header_digest } else { cfg.data_digest };
                let chosen = value.split(',').find(|v| *v == "None" || (allow_crc && *v == "CRC32C"));
                let Some(chosen) = chosen else { return reject() };
                let crc = chosen == "CRC32C";
                if key == "HeaderDigest" {
                    self.neg.header_digest = crc;
                } else {
                    self.neg.data_digest = crc;
                }
                chosen.to_string()
            }
            "MaxRecvDataSegmentLength" => {
                // Declarative: the initiator's value limits what we send; a value outside the
                // range leaves us no usable limit, so the login fails.
                let n = number(value, LENGTH_RANGE).ok_or_else(bad_value)?;
                self.neg.max_xmit_data_segment_length = n;
                if self.declared_max_recv {
                    return Ok(None);
                }
                self.declared_max_recv = true;
                cfg.max_recv_data_segment_length.to_string()
            }
            "MaxBurstLength" => {
                let Some(n) = number(value, LENGTH_RANGE) else { return reject() };
                self.neg.max_burst_length = n.min(cfg.max_burst_length);
                self.neg.max_burst_length.to_string()
            }
            "FirstBurstLength" => {
                let Some(n) = number(value, LENGTH_RANGE) else { return reject() };
                self.neg.first_burst_length = n.min(cfg.first_burst_length);
                self.neg.first_burst_length.to_string()
            }
            "MaxOutstandingR2T" => {
                let Some(n) = number(value, COUNT_RANGE) else { return reject() };
                self.neg.max_outstanding_r2t = n.min(cfg.max_outstanding_r2t);
                self.neg.max_outstanding_r2t.to_string()
            }
            "MaxConnections" => {
                let Some(n) = number(value, COUNT_RANGE) else { return reject() };
                self.neg.max_connections = n.min(cfg.max_connections);
                self.neg.max_connections.to_string()
            }
            "DefaultTime2Wait" => {
                let Some(n) = number(value, TIME_RANGE) else { return reject() };
                self.neg.default_time2wait = n.max(OUR_TIME2WAIT);
                self.neg.default_time2wait.to_string()
            }
            "DefaultTime2Retain" => {
                let Some(n) = number(value, TIME_RANGE) else { return reject() };
                self.neg.default_time2retain = n.min(OUR_TIME2RETAIN);
                self.neg.default_time2retain.to_string()
            }
            "ErrorRecoveryLevel" => {
                let Some(n) = number(value, 0..=2) else { return reject() };
                self.neg.error_recovery_level = n.min(cfg.error_recovery_level);
                self.neg.error_recovery_level.to_string()
            }
            "iSCSIProtocolLevel" => {
                let Some(n) = text::parse_number(value).filter(|n| *n <= 31) else { return reject() };
                n.min(OUR_PROTOCOL_LEVEL).to_string()
            }
            "InitialR2T" => {
                let Some(b) = text::parse_bool(value) else { return reject() };
                self.neg.initial_r2t = b || cfg.initial_r2t;
                text::bool_str(self.neg.initial_r2t).to_string()
            }
            "ImmediateData" => {
                let Some(b) = text::parse_bool(value) else { return reject() };
                self.neg.immediate_data = b && cfg.immediate_data;
                text::bool_str(self.neg.immediate_data).to_string()
            }
            // Result function OR (RFC 7143 §13.19, §13.20) with our Yes: always Yes, so we
            // never have to reorder data.
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                if text::parse_bool(value).is_none() {
                    return reject();
                }
                if key == "DataPDUInOrder" {
                    self.neg.data_pdu_in_order = true;
                } else {
                    self.neg.data_sequence_in_order = true;
                }
                "Yes".to_string()
            }
            // Markers are obsolete (RFC 7143 §13.25); AND with our No.
            "IFMarker" | "OFMarker" => {
                if text::parse_bool(value).is_none() {
                    return reject();
                }
                "No".to_string()
            }
            "IFMarkInt" | "OFMarkInt" => REJECT.to_string(),
            "TaskReporting" => {
                if !value.split(',').any(|v| v == "RFC3720") {
                    return reject();
                }
                "RFC3720".to_string()
            }
            // Unknown, private (X-) and registered extension (X#) keys.
            _ => NOT_UNDERSTOOD.to_string(),
        };
        Ok(Some(answer))
    }

    /// Offers the keys the initiator left at a default we cannot honour (RFC 7143 §6.2:
    /// the target may offer keys). Returns whether anything was offered.
    fn offer_needed(&mut self, out: &mut Vec<u8>) -> Result<bool, LoginError> {
        let cfg = Arc::clone(&self.cfg);
        let mut offers: Vec<(&'static str, String)> = Vec::new();
        if cfg.max_burst_length < DEFAULT_MAX_BURST {
            offers.push(("MaxBurstLength", cfg.max_burst_length.to_string()));
        }
        if cfg.first_burst_length < DEFAULT_FIRST_BURST {
            offers.push(("FirstBurstLength", cfg.first_burst_length.to_string()));
        }
        if !cfg.immediate_data {
            offers.push(("ImmediateData", "No".to_string()));
        }
        let mut any = false;
        for (key, value) in offers {
            if self.seen.contains(key) {
                continue;
            }
            text::push_pair(out, key, &value)?;
            self.offered.push(key);
            any = true;
        }
        Ok(any)
    }

    /// Applies the initiator's answer to one of our offers.
    fn take_answer(&mut self, key: &str, value: &str) -> Result<(), LoginError> {
        let cfg = Arc::clone(&self.cfg);
        let bad_value = || LoginError::BadValue { key: key.to_string(), value: value.to_string() };
        // Reject leaves the default, which our initial values already combined with ours.
        if value == REJECT || value == IRRELEVANT {
            return Ok(());
        }
        match key {
            "MaxBurstLength" => {
                let n = number(value, LENGTH_RANGE).ok_or_else(bad_value)?;
                self.neg.max_burst_length = n.min(cfg.max_burst_length);
            }
            "FirstBurstLength" => {
                let n = number(value, LENGTH_RANGE).ok_or_else(bad_value)?;
                self.neg.first_burst_length = n.min(cfg.first_burst_length);
            }
            "ImmediateData" => {
                let b = text::parse_bool(value).ok_or_else(bad_value)?;
                self.neg.immediate_data = b && cfg.immediate_data;
            }
            _ => return Err(bad_value()),
        }
        Ok(())
    }
}

/// A numerical value within `range`.
fn number(value: &str, range: RangeInclusive<u64>) -> Option<u32> {
    text::parse_number(value).filter(|n| range.contains(n)).and_then(|n| u32::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IQN: &str = "iqn.2024-06.dev.jumpstarter:target1";
    const INITIATOR: &str = "iqn.1994-05.com.redhat:abc";

    fn login() -> Login {
        Login::new(Arc::new(LoginConfig::default()))
    }

    fn login_with(f: impl FnOnce(&mut LoginConfig)) -> Login {
        let mut cfg = LoginConfig::default();
        f(&mut cfg);
        Login::new(Arc::new(cfg))
    }

    fn req(csg: u8, transit: bool, nsg: u8, data: &[u8]) -> LoginRequest<'_> {
        LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0x02, 0x3d, 0, 0],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
            data,
        }
    }

    fn text_of(pairs: &[(&str, &str)]) -> Vec<u8> {
        text::encode(pairs).unwrap()
    }

    fn get(data: &[u8], key: &str) -> Option<String> {
        text::parse(data).unwrap().into_iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
    }

    fn security_text() -> Vec<u8> {
        text_of(&[
            ("InitiatorName", INITIATOR),
            ("InitiatorAlias", "host1"),
            ("SessionType", "Normal"),
            ("TargetName", IQN),
            ("AuthMethod", "None"),
        ])
    }

    /// Runs the security stage and expects to be in the operational stage afterwards.
    fn through_security(l: &mut Login) {
        let data = security_text();
        let (rsp, out) = l.step(&req(0, true, 1, &data));
        assert_eq!(out, LoginOutcome::Continue);
        assert!(rsp.transit && rsp.nsg == 1 && rsp.csg == 0);
        assert_eq!((rsp.status_class, rsp.status_detail), (0, 0));
    }

    fn assert_failed(r: (LoginResponse, LoginOutcome), status: (u8, u8)) {
        assert_eq!(r.1, LoginOutcome::Failed);
        assert_eq!((r.0.status_class, r.0.status_detail), status);
        assert!(!r.0.transit);
    }

    #[test]
    fn open_iscsi_login() {
        let mut l = login();
        let data = security_text();
        let (rsp, out) = l.step(&req(0, true, 1, &data));
        assert_eq!(out, LoginOutcome::Continue);
        assert!(rsp.transit && rsp.nsg == 1);
        assert_eq!(get(&rsp.data, "AuthMethod").as_deref(), Some("None"));
        assert_eq!(get(&rsp.data, "TargetPortalGroupTag").as_deref(), Some("1"));
        assert_eq!(l.auth_method(), Some(AuthMethod::None));

        let data = text_of(peers::OPEN_ISCSI_OPERATIONAL);
        let (rsp, out) = l.step(&req(1, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        assert!(rsp.transit && rsp.csg == 1 && rsp.nsg == 3 && !rsp.cont);
        // Every key answered in the order offered, each as offered except MaxBurstLength,
        // lowered to the target's 1 MiB.
        let expect: Vec<(&str, &str)> = peers::OPEN_ISCSI_OPERATIONAL
            .iter()
            .map(|&(k, v)| (k, if k == "MaxBurstLength" { "1048576" } else { v }))
            .collect();
        let got = text::parse(&rsp.data).unwrap();
        assert_eq!(got, expect);
        let n = l.negotiated();
        assert_eq!(n.session_type, SessionType::Normal);
        assert_eq!(n.initiator_name, INITIATOR);
        assert_eq!(n.initiator_alias.as_deref(), Some("host1"));
        assert_eq!(n.target_name.as_deref(), Some(IQN));
        assert!(!n.header_digest && !n.data_digest);
        assert!(n.immediate_data && !n.initial_r2t);
        assert_eq!(n.max_burst_length, 1 << 20);
        assert_eq!(n.first_burst_length, 262144);
        assert_eq!(n.max_recv_data_segment_length, 262144);
        assert_eq!(n.max_xmit_data_segment_length, 262144);
        assert_eq!((n.default_time2wait, n.default_time2retain), (2, 0));
        assert_eq!((n.error_recovery_level, n.max_connections, n.max_outstanding_r2t), (0, 1, 1));
        assert!(!n.ifmarker && !n.ofmarker && n.data_pdu_in_order && n.data_sequence_in_order);
        // Login is over: further requests are refused.
        assert_failed(l.step(&req(3, false, 0, b"")), status::INVALID_DURING_LOGIN);
    }

    #[test]
    fn libiscsi_login() {
        let mut l = login();
        let data = text_of(&[
            ("InitiatorName", "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-ls"),
            ("TargetName", IQN),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ]);
        let (rsp, _) = l.step(&req(0, true, 1, &data));
        assert!(rsp.transit && rsp.nsg == 1);
        let data = text_of(&[
            ("HeaderDigest", "None,CRC32C"),
            ("DataDigest", "None"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "262144"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ]);
        let (rsp, out) = l.step(&req(1, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        assert_eq!(get(&rsp.data, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(get(&rsp.data, "InitialR2T").as_deref(), Some("Yes"));
        assert_eq!(get(&rsp.data, "ImmediateData").as_deref(), Some("Yes"));
        assert_eq!(get(&rsp.data, "MaxBurstLength").as_deref(), Some("262144"));
        assert_eq!(get(&rsp.data, "FirstBurstLength").as_deref(), Some("262144"));
        assert_eq!(get(&rsp.data, "DataPDUInOrder").as_deref(), Some("Yes"));
        let n = l.negotiated();
        assert!(n.initial_r2t && n.immediate_data && !n.header_digest);
        assert_eq!((n.max_burst_length, n.first_burst_length), (262144, 262144));
        assert_eq!(n.max_xmit_data_segment_length, 262144);
        // Defaults for what libiscsi never offered.
        assert_eq!((n.default_time2wait, n.default_time2retain, n.max_outstanding_r2t), (2, 20, 1));
    }

    #[test]
    fn ipxe_login() {
        let mut l = login();
        let data = text_of(&[
            ("InitiatorName", "iqn.2010-04.org.ipxe:00000000"),
            ("TargetName", IQN),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ]);
        let (rsp, _) = l.step(&req(0, true, 1, &data));
        assert!(rsp.transit && rsp.nsg == 1);
        assert_eq!(get(&rsp.data, "AuthMethod").as_deref(), Some("None"));
        let data = text_of(peers::IPXE_OPERATIONAL);
        let (rsp, out) = l.step(&req(1, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        assert_eq!(get(&rsp.data, "ImmediateData").as_deref(), Some("No"));
        assert_eq!(get(&rsp.data, "InitialR2T").as_deref(), Some("Yes"));
        assert_eq!(get(&rsp.data, "MaxRecvDataSegmentLength").as_deref(), Some("262144"));
        assert_eq!(get(&rsp.data, "DefaultTime2Wait").as_deref(), Some("2"));
        let n = l.negotiated();
        assert!(!n.immediate_data && n.initial_r2t);
        assert_eq!(n.max_xmit_data_segment_length, 8192);
        assert_eq!(n.first_burst_length, 65536);
    }

    #[test]
    fn numeric_min_and_max() {
        let mut l = login();
        through_security(&mut l);
        let data = text_of(&[
            ("MaxBurstLength", "4096"),
            ("FirstBurstLength", "0x100000"),
            ("MaxOutstandingR2T", "64"),
            ("MaxConnections", "8"),
            ("DefaultTime2Retain", "60"),
            ("DefaultTime2Wait", "10"),
            ("ErrorRecoveryLevel", "2"),
            ("iSCSIProtocolLevel", "2"),
        ]);
        let (rsp, _) = l.step(&req(1, false, 0, &data));
        assert_eq!(get(&rsp.data, "MaxBurstLength").as_deref(), Some("4096"));
        // min(offered, ours) = 256 KiB, then clamped to MaxBurstLength.
        assert_eq!(get(&rsp.data, "FirstBurstLength").as_deref(), Some("4096"));
        assert_eq!(get(&rsp.data, "MaxOutstandingR2T").as_deref(), Some("16"));
        assert_eq!(get(&rsp.data, "MaxConnections").as_deref(), Some("1"));
        assert_eq!(get(&rsp.data, "DefaultTime2Retain").as_deref(), Some("20"));
        assert_eq!(get(&rsp.data, "DefaultTime2Wait").as_deref(), Some("10"));
        assert_eq!(get(&rsp.data, "ErrorRecoveryLevel").as_deref(), Some("0"));
        assert_eq!(get(&rsp.data, "iSCSIProtocolLevel").as_deref(), Some("1"));
        let n = l.negotiated();
        assert_eq!((n.max_burst_length, n.first_burst_length, n.max_outstanding_r2t), (4096, 4096, 16));
        assert_eq!((n.default_time2wait, n.default_time2retain, n.error_recovery_level), (10, 20, 0));
    }

    #[test]
    fn first_burst_below_max_burst_is_kept() {
        let mut l = login();
        through_security(&mut l);
        let data = text_of(&[("FirstBurstLength", "8192"), ("MaxBurstLength", "65536")]);
        let (rsp, _) = l.step(&req(1, false, 0, &data));
        assert_eq!(get(&rsp.data, "FirstBurstLength").as_deref(), Some("8192"));
        assert_eq!(get(&rsp.data, "MaxBurstLength").as_deref(), Some("65536"));
    }

    #[test]
    fn boolean_and_or() {
        let mut l = login_with(|c| {
            c.initial_r2t = true;
            c.immediate_data = false;
        });
        through_security(&mut l);
        let data = text_of(&[
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("DataPDUInOrder", "No"),
            ("DataSequenceInOrder", "No"),
            ("IFMarker", "Yes"),
            ("OFMarker", "No"),
        ]);
        let (rsp, _) = l.step(&req(1, false, 0, &data));
        assert_eq!(get(&rsp.data, "InitialR2T").as_deref(), Some("Yes"));
        assert_eq!(get(&rsp.data, "ImmediateData").as_deref(), Some("No"));
        assert_eq!(get(&rsp.data, "DataPDUInOrder").as_deref(), Some("Yes"));
        assert_eq!(get(&rsp.data, "DataSequenceInOrder").as_deref(), Some("Yes"));
        assert_eq!(get(&rsp.data, "IFMarker").as_deref(), Some("No"));
        assert_eq!(get(&rsp.data, "OFMarker").as_deref(), Some("No"));
        let n = l.negotiated();
        assert!(n.initial_r2t && !n.immediate_data && n.data_pdu_in_order && n.data_sequence_in_order);

        // With our defaults the initiator's values decide.
        let mut l = login();
        through_security(&mut l);
        let data = text_of(&[("InitialR2T", "Yes"), ("ImmediateData", "No")]);
        let (rsp, _) = l.step(&req(1, false, 0, &data));
        assert_eq!(get(&rsp.data, "InitialR2T").as_deref(), Some("Yes"));
        assert_eq!(get(&rsp.data, "ImmediateData").as_deref(), Some("No"));
    }

    #[test]
    fn digest_list_selection() {
        let mut l = login();
        through_security(&mut l);
        let data = text_of(&[("HeaderDigest", "CRC32C,None"), ("DataDigest", "Foo,CRC32C")]);
        let (rsp, _) = l.step(&req(1, false, 0, &data));
        assert_eq!(get(&rsp.data, "HeaderDigest").as_deref(), Some("CRC32C"));
        assert_eq!(get(&rsp.data, "DataDigest").as_deref(), Some("CRC32C"));
        assert!(l.negotiated().header_digest && l.negotiated().data_digest);

        let mut l = login_with(|c| {
            c.header_digest = false;
            c.data_digest = false;
        });
        through_security(&mut l);
        let data = text_of(&[("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C")]);
        let (rsp, _) = l.step(&req(1, false, 0, &data));
        assert_eq!(get(&rsp.data, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(get(&rsp.data, "DataDigest").as_deref(), Some("Reject"));
        assert!(!l.negotiated().header_digest && !l.negotiated().data_digest);
    }

    #[test]
    fn unknown_and_private_keys_not_understood() {
        let mut l = login();
        through_security(&mut l);
        let data = text_of(&[("X-com.example.foo", "1"), ("X#org.example.bar", "2"), ("Frobnicate", "Yes")]);
        let (rsp, _) = l.step(&req(1, false, 0, &data));
        let got = text::parse(&rsp.data).unwrap();
        assert_eq!(
            got,
            vec![
                ("X-com.example.foo", "NotUnderstood"),
                ("X#org.example.bar", "NotUnderstood"),
                ("Frobnicate", "NotUnderstood")
            ]
        );
    }

    #[test]
    fn invalid_values_rejected() {
        let mut l = login();
        through_security(&mut l);
        let data = text_of(&[
            ("MaxBurstLength", "100"),
            ("FirstBurstLength", "16777216"),
            ("ErrorRecoveryLevel", "3"),
            ("DefaultTime2Wait", "3601"),
            ("MaxOutstandingR2T", "0"),
            ("ImmediateData", "Maybe"),
            ("MaxConnections", "many"),
            ("OFMarkInt", "2048~8192"),
            ("TaskReporting", "FastAbort"),
            ("TargetPortalGroupTag", "5"),
            ("SendTargets", "All"),
        ]);
        let (rsp, out) = l.step(&req(1, false, 0, &data));
        assert_eq!(out, LoginOutcome::Continue);
        for (k, v) in text::parse(&rsp.data).unwrap() {
            assert!(v == "Reject" || k == "TargetPortalGroupTag", "{k}={v}");
        }
        assert_eq!(text::parse(&rsp.data).unwrap().iter().filter(|(_, v)| *v == "Reject").count(), 11);
        // Rejected keys keep their defaults.
        let n = l.negotiated();
        assert_eq!((n.max_burst_length, n.first_burst_length, n.error_recovery_level), (262144, 65536, 0));
        assert!(n.immediate_data);
    }

    #[test]
    fn task_reporting_selects_rfc3720() {
        let mut l = login();
        through_security(&mut l);
        let data = text_of(&[("TaskReporting", "FastAbort,RFC3720")]);
        let (rsp, _) = l.step(&req(1, false, 0, &data));
        assert_eq!(get(&rsp.data, "TaskReporting").as_deref(), Some("RFC3720"));
    }

    #[test]
    fn max_recv_data_segment_length_out_of_range_fails() {
        for bad in ["511", "16777216", "abc"] {
            let mut l = login();
            through_security(&mut l);
            let data = text_of(&[("MaxRecvDataSegmentLength", bad)]);
            assert_failed(l.step(&req(1, true, 3, &data)), status::INITIATOR_ERROR);
            assert!(matches!(l.error(), Some(LoginError::BadValue { .. })));
        }
    }

    #[test]
    fn max_recv_declared_once() {
        let mut l = login();
        // Straight from security to full feature: we must still declare ours.
        let mut data = security_text();
        data.extend(text_of(&[("MaxRecvDataSegmentLength", "65536")]));
        let (rsp, out) = l.step(&req(0, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        let got = text::parse(&rsp.data).unwrap();
        assert_eq!(got.iter().filter(|(k, _)| *k == "MaxRecvDataSegmentLength").count(), 1);
        assert_eq!(get(&rsp.data, "MaxRecvDataSegmentLength").as_deref(), Some("262144"));
        assert_eq!(l.negotiated().max_xmit_data_segment_length, 65536);

        let mut l = login();
        let data = security_text();
        let (rsp, out) = l.step(&req(0, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        assert_eq!(get(&rsp.data, "MaxRecvDataSegmentLength").as_deref(), Some("262144"));
        assert_eq!(l.negotiated().max_xmit_data_segment_length, 8192);
    }

    #[test]
    fn duplicate_key_in_one_request() {
        let mut l = login();
        through_security(&mut l);
        let data = text_of(&[("MaxBurstLength", "4096"), ("MaxBurstLength", "8192")]);
        assert_failed(l.step(&req(1, true, 3, &data)), status::INITIATOR_ERROR);
        assert_eq!(l.error(), Some(&LoginError::DuplicateKey("MaxBurstLength".into())));
    }

    #[test]
    fn duplicate_key_across_requests() {
        let mut l = login();
        through_security(&mut l);
        let data = text_of(&[("ImmediateData", "Yes")]);
        let (_, out) = l.step(&req(1, false, 0, &data));
        assert_eq!(out, LoginOutcome::Continue);
        assert_failed(l.step(&req(1, true, 3, &data)), status::INITIATOR_ERROR);
        // The names may only come in the first request.
        let mut l = login();
        through_security(&mut l);
        let data = text_of(&[("SessionType", "Discovery")]);
        assert_failed(l.step(&req(1, true, 3, &data)), status::INITIATOR_ERROR);
    }

    #[test]
    fn bad_transitions() {
        let data = security_text();
        // Backwards, to itself, to the reserved stage 2.
        for (csg, nsg) in [(1, 0), (1, 1), (0, 0), (0, 2), (1, 2)] {
            let mut l = login();
            assert_failed(l.step(&req(csg, true, nsg, &data)), status::INITIATOR_ERROR);
            assert_eq!(l.error(), Some(&LoginError::BadTransition { csg, nsg }));
        }
        // A login cannot start in full feature phase.
        let mut l = login();
        assert_failed(l.step(&req(3, false, 0, &data)), status::INITIATOR_ERROR);
        // C and T together.
        let mut l = login();
        let mut r = req(0, true, 1, &data);
        r.cont = true;
        assert_failed(l.step(&r), status::INITIATOR_ERROR);
        assert_eq!(l.error(), Some(&LoginError::ContinueWithTransit));
        // After moving to the operational stage, going back to security is an error.
        let mut l = login();
        through_security(&mut l);
        assert_failed(l.step(&req(0, true, 1, b"")), status::INITIATOR_ERROR);
        assert_eq!(l.error(), Some(&LoginError::WrongStage { expected: 1, got: 0 }));
    }

    #[test]
    fn stays_in_stage_without_transit() {
        let mut l = login();
        let data = security_text();
        let (rsp, out) = l.step(&req(0, false, 0, &data));
        assert_eq!(out, LoginOutcome::Continue);
        assert!(!rsp.transit && rsp.csg == 0 && rsp.nsg == 0);
        // Still stage 0; the operational stage is not reached yet.
        let (rsp, _) = l.step(&req(0, true, 1, b""));
        assert!(rsp.transit && rsp.nsg == 1);
        // TPGT was sent once, in the first response.
        assert!(get(&rsp.data, "TargetPortalGroupTag").is_none());
        let (rsp, out) = l.step(&req(1, false, 0, b""));
        assert!(!rsp.transit && out == LoginOutcome::Continue);
        let (rsp, out) = l.step(&req(1, true, 3, b""));
        assert!(rsp.transit && rsp.nsg == 3 && out == LoginOutcome::FullFeature);
    }

    #[test]
    fn skip_security_stage() {
        let mut l = login();
        let mut data = text_of(&[("InitiatorName", INITIATOR), ("TargetName", IQN)]);
        data.extend(text_of(&[("MaxRecvDataSegmentLength", "131072"), ("ImmediateData", "Yes")]));
        let (rsp, out) = l.step(&req(1, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        assert_eq!(get(&rsp.data, "TargetPortalGroupTag").as_deref(), Some("1"));
        assert_eq!(l.auth_method(), None);
        assert_eq!(l.negotiated().session_type, SessionType::Normal);
        assert_eq!(l.negotiated().max_xmit_data_segment_length, 131072);
    }

    #[test]
    fn operational_keys_in_security_stage_are_negotiated() {
        let mut l = login();
        let mut data = security_text();
        data.extend(text_of(&[("HeaderDigest", "CRC32C"), ("MaxBurstLength", "65536")]));
        let (rsp, _) = l.step(&req(0, true, 1, &data));
        assert_eq!(get(&rsp.data, "HeaderDigest").as_deref(), Some("CRC32C"));
        assert_eq!(get(&rsp.data, "MaxBurstLength").as_deref(), Some("65536"));
        // AuthMethod outside the security stage has no effect.
        let mut l = login();
        let data =
            text_of(&[("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "CHAP"), ("CHAP_A", "5")]);
        let (rsp, out) = l.step(&req(1, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        assert_eq!(l.auth_method(), None);
        assert_eq!(get(&rsp.data, "AuthMethod").as_deref(), Some("Irrelevant"));
        assert_eq!(get(&rsp.data, "CHAP_A").as_deref(), Some("Irrelevant"));
    }

    #[test]
    fn missing_initiator_name() {
        let mut l = login();
        let data = text_of(&[("TargetName", IQN), ("AuthMethod", "None")]);
        assert_failed(l.step(&req(0, true, 1, &data)), status::MISSING_PARAMETER);
        let mut l = login();
        let data = text_of(&[("SessionType", "Discovery")]);
        assert_failed(l.step(&req(0, true, 1, &data)), status::MISSING_PARAMETER);
    }

    #[test]
    fn target_name_checks() {
        let mut l = login();
        let data = text_of(&[("InitiatorName", INITIATOR), ("SessionType", "Normal")]);
        assert_failed(l.step(&req(0, true, 1, &data)), status::MISSING_PARAMETER);
        assert_eq!(l.error(), Some(&LoginError::MissingTargetName));
        let mut l = login();
        let data = text_of(&[("InitiatorName", INITIATOR), ("TargetName", "iqn.2024-06.dev.other:t")]);
        assert_failed(l.step(&req(0, true, 1, &data)), status::NOT_FOUND);
        let mut l = login();
        let data = text_of(&[("InitiatorName", INITIATOR), ("TargetName", IQN), ("SessionType", "Boot")]);
        assert_failed(l.step(&req(0, true, 1, &data)), status::SESSION_TYPE_UNSUPPORTED);
    }

    #[test]
    fn unsupported_version() {
        let mut l = login();
        let data = security_text();
        let mut r = req(0, true, 1, &data);
        r.version_min = 1;
        r.version_max = 2;
        assert_failed(l.step(&r), status::UNSUPPORTED_VERSION);
    }

    #[test]
    fn auth_method_selection() {
        let mut l = login();
        let data = text_of(&[("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "CHAP,None")]);
        let (rsp, _) = l.step(&req(0, true, 1, &data));
        assert_eq!(get(&rsp.data, "AuthMethod").as_deref(), Some("None"));
        assert_eq!(l.auth_method(), Some(AuthMethod::None));

        let mut l = login();
        let data = text_of(&[("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "CHAP")]);
        assert_failed(l.step(&req(0, true, 1, &data)), status::AUTH_FAILURE);
        let mut l = login();
        let data = text_of(&[("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "SRP,KRB5")]);
        assert_failed(l.step(&req(0, false, 0, &data)), status::AUTH_FAILURE);
    }

    #[test]
    fn discovery_session() {
        let mut l = login();
        let data = text_of(&[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("TargetName", "iqn.whatever:t"),
            ("AuthMethod", "None"),
        ]);
        let (rsp, out) = l.step(&req(0, true, 1, &data));
        assert_eq!(out, LoginOutcome::Continue);
        assert!(rsp.transit);
        assert!(get(&rsp.data, "TargetPortalGroupTag").is_none());
        let data = text_of(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "32768"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxBurstLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "Yes"),
            ("MaxConnections", "1"),
            ("MaxOutstandingR2T", "1"),
        ]);
        let (rsp, out) = l.step(&req(1, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        for key in ["MaxBurstLength", "ImmediateData", "InitialR2T", "MaxConnections", "MaxOutstandingR2T"] {
            assert_eq!(get(&rsp.data, key).as_deref(), Some("Irrelevant"), "{key}");
        }
        assert_eq!(get(&rsp.data, "HeaderDigest").as_deref(), Some("None"));
        assert_eq!(get(&rsp.data, "DefaultTime2Retain").as_deref(), Some("0"));
        assert_eq!(get(&rsp.data, "MaxRecvDataSegmentLength").as_deref(), Some("262144"));
        let n = l.negotiated();
        assert_eq!(n.session_type, SessionType::Discovery);
        assert_eq!(n.max_xmit_data_segment_length, 32768);
        assert_eq!(n.max_burst_length, 262144);
        assert!(n.pairs().contains(&("SessionType", "Discovery".to_string())));
    }

    #[test]
    fn discovery_without_target_name() {
        let mut l = login();
        let data = text_of(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]);
        let (_, out) = l.step(&req(1, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        assert_eq!(l.negotiated().target_name, None);
    }

    #[test]
    fn continued_request_is_accumulated() {
        let mut l = login();
        let data = security_text();
        let (a, rest) = data.split_at(10);
        let (b, c) = rest.split_at(rest.len() / 2);
        for part in [a, b] {
            let mut r = req(0, false, 0, part);
            r.cont = true;
            let (rsp, out) = l.step(&r);
            assert_eq!(out, LoginOutcome::Continue);
            assert!(rsp.data.is_empty() && !rsp.transit && !rsp.cont && rsp.csg == 0);
            assert_eq!(rsp.status_class, 0);
        }
        let (rsp, out) = l.step(&req(0, true, 1, c));
        assert_eq!(out, LoginOutcome::Continue);
        assert!(rsp.transit && rsp.nsg == 1);
        assert_eq!(get(&rsp.data, "AuthMethod").as_deref(), Some("None"));
        assert_eq!(l.negotiated().initiator_name, INITIATOR);
    }

    #[test]
    fn long_response_is_split() {
        let mut l = login();
        through_security(&mut l);
        // 500 private keys, each answered NotUnderstood: far over 8 KiB of answers.
        let keys: Vec<String> = (0..500).map(|i| format!("X-org.example.key{i:04}")).collect();
        let mut data = Vec::new();
        for k in &keys {
            text::push_pair(&mut data, k, "1").unwrap();
        }
        data.extend(text_of(&[("ImmediateData", "Yes")]));
        // The request also arrives in two PDUs.
        let (a, b) = data.split_at(LOGIN_MAX_DATA);
        let mut r = req(1, false, 0, a);
        r.cont = true;
        let (rsp, _) = l.step(&r);
        assert!(rsp.data.is_empty());
        let (mut rsp, mut out) = l.step(&req(1, true, 3, b));
        let mut got = Vec::new();
        let mut pdus = 1;
        while rsp.cont {
            assert_eq!(out, LoginOutcome::Continue);
            assert!(!rsp.transit && rsp.data.len() == LOGIN_MAX_DATA);
            got.extend_from_slice(&rsp.data);
            (rsp, out) = l.step(&req(1, true, 3, b""));
            pdus += 1;
        }
        got.extend_from_slice(&rsp.data);
        assert!(pdus >= 2);
        assert_eq!(out, LoginOutcome::FullFeature);
        assert!(rsp.transit && rsp.nsg == 3);
        let answers = text::parse(&got).unwrap();
        assert_eq!(answers.iter().filter(|(_, v)| *v == "NotUnderstood").count(), 500);
        assert_eq!(answers[0], (keys[0].as_str(), "NotUnderstood"));
        assert!(answers.contains(&("ImmediateData", "Yes")));
    }

    #[test]
    fn data_while_response_pending_fails() {
        let mut l = login();
        through_security(&mut l);
        let mut data = Vec::new();
        for i in 0..500 {
            text::push_pair(&mut data, &format!("X-org.example.k{i:05}"), "1").unwrap();
        }
        let mut r = req(1, false, 0, &data[..LOGIN_MAX_DATA]);
        r.cont = true;
        l.step(&r);
        let (rsp, _) = l.step(&req(1, false, 0, &data[LOGIN_MAX_DATA..]));
        assert!(rsp.cont);
        assert_failed(l.step(&req(1, false, 0, b"A=1\0")), status::INITIATOR_ERROR);
        assert_eq!(l.error(), Some(&LoginError::DataDuringResponse));
    }

    #[test]
    fn target_offers_keys_below_defaults() {
        let mut l = login_with(|c| {
            c.max_burst_length = 65536;
            c.first_burst_length = 16384;
            c.immediate_data = false;
        });
        through_security(&mut l);
        // The initiator offers FirstBurstLength itself but leaves the rest at defaults.
        let data = text_of(&[("FirstBurstLength", "8192")]);
        let (rsp, out) = l.step(&req(1, true, 3, &data));
        assert_eq!(out, LoginOutcome::Continue);
        assert!(!rsp.transit);
        assert_eq!(get(&rsp.data, "FirstBurstLength").as_deref(), Some("8192"));
        assert_eq!(get(&rsp.data, "MaxBurstLength").as_deref(), Some("65536"));
        assert_eq!(get(&rsp.data, "ImmediateData").as_deref(), Some("No"));
        let data = text_of(&[("MaxBurstLength", "65536"), ("ImmediateData", "No")]);
        let (rsp, out) = l.step(&req(1, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        assert!(rsp.data.is_empty());
        let n = l.negotiated();
        assert_eq!((n.max_burst_length, n.first_burst_length), (65536, 8192));
        assert!(!n.immediate_data);
    }

    #[test]
    fn target_alias_declared() {
        let mut l = login_with(|c| c.target_alias = Some("disk0".into()));
        let data = security_text();
        let (rsp, _) = l.step(&req(0, true, 1, &data));
        assert_eq!(get(&rsp.data, "TargetAlias").as_deref(), Some("disk0"));
    }

    #[test]
    fn failed_login_stays_failed() {
        let mut l = login();
        assert_failed(l.step(&req(0, true, 1, b"garbage\0")), status::INITIATOR_ERROR);
        assert_eq!(l.error(), Some(&LoginError::Text(TextError::MissingEquals)));
        let data = security_text();
        assert_failed(l.step(&req(0, true, 1, &data)), status::INVALID_DURING_LOGIN);
    }

    fn chap_login(mutual: bool) -> Login {
        login_with(|c| {
            c.auth = AuthConfig {
                chap: Some(chap::Credentials { username: "rig".into(), secret: chap::Secret::new("initiator-secret") }),
                mutual: mutual.then(|| chap::Credentials {
                    username: "tgt".into(),
                    secret: chap::Secret::new("target-secret-1"),
                }),
                discovery: true,
            }
        })
    }

    /// Offers CHAP and MD5; returns the target's CHAP_I and CHAP_C.
    fn chap_start(l: &mut Login, session: &str) -> (u8, Vec<u8>) {
        let data = text_of(&[
            ("InitiatorName", INITIATOR),
            ("SessionType", session),
            ("TargetName", IQN),
            ("AuthMethod", "CHAP,None"),
        ]);
        let (rsp, out) = l.step(&req(0, false, 0, &data));
        assert_eq!(out, LoginOutcome::Continue);
        assert_eq!(get(&rsp.data, "AuthMethod").as_deref(), Some("CHAP"));
        let (rsp, out) = l.step(&req(0, true, 1, &text_of(&[("CHAP_A", "5")])));
        assert_eq!(out, LoginOutcome::Continue);
        assert!(!rsp.transit, "no transit before the response is checked");
        assert_eq!(get(&rsp.data, "CHAP_A").as_deref(), Some("5"));
        let id = get(&rsp.data, "CHAP_I").unwrap().parse().unwrap();
        (id, chap::decode_binary(&get(&rsp.data, "CHAP_C").unwrap()).unwrap())
    }

    fn chap_response(id: u8, secret: &str, challenge: &[u8]) -> String {
        chap::to_hex(&chap::Algorithm::Md5.response(id, &chap::Secret::new(secret), challenge))
    }

    #[test]
    fn chap_login_succeeds_with_the_right_secret() {
        let mut l = chap_login(false);
        let (id, c) = chap_start(&mut l, "Normal");
        let r = chap_response(id, "initiator-secret", &c);
        let (rsp, out) = l.step(&req(0, true, 1, &text_of(&[("CHAP_N", "rig"), ("CHAP_R", &r)])));
        assert_eq!(out, LoginOutcome::Continue);
        assert!(rsp.transit && rsp.nsg == 1);
        assert_eq!(l.negotiated().auth, "CHAP MD5");
        let (_, out) = l.step(&req(1, true, 3, b""));
        assert_eq!(out, LoginOutcome::FullFeature);
        assert_eq!(l.auth_method(), Some(AuthMethod::Chap));
    }

    #[test]
    fn chap_login_failures_are_authentication_failures() {
        let mut l = chap_login(false);
        let (id, c) = chap_start(&mut l, "Normal");
        let r = chap_response(id, "wrong-secret-xx", &c);
        let r = l.step(&req(0, true, 1, &text_of(&[("CHAP_N", "rig"), ("CHAP_R", &r)])));
        assert!(r.0.data.is_empty());
        assert_failed(r, status::AUTH_FAILURE);
        assert!(matches!(l.error(), Some(LoginError::Chap(ChapError::WrongResponse(_)))));
        // No CHAP_R at all.
        let mut l = chap_login(false);
        chap_start(&mut l, "Normal");
        assert_failed(l.step(&req(0, true, 1, &text_of(&[("CHAP_N", "rig")]))), status::AUTH_FAILURE);
        // AuthMethod=None only, or skipping the security stage.
        let mut l = chap_login(false);
        let data = security_text();
        assert_failed(l.step(&req(0, true, 1, &data)), status::AUTH_FAILURE);
        let mut l = chap_login(false);
        let data = text_of(&[("InitiatorName", INITIATOR), ("TargetName", IQN)]);
        assert_failed(l.step(&req(1, true, 3, &data)), status::AUTH_FAILURE);
        // Security stage left without any AuthMethod.
        let mut l = chap_login(false);
        let data = text_of(&[("InitiatorName", INITIATOR), ("TargetName", IQN)]);
        assert_failed(l.step(&req(0, true, 1, &data)), status::AUTH_FAILURE);
        // A mutual challenge to a target without mutual credentials.
        let mut l = chap_login(false);
        let (id, c) = chap_start(&mut l, "Normal");
        let r = chap_response(id, "initiator-secret", &c);
        let data = text_of(&[("CHAP_N", "rig"), ("CHAP_R", &r), ("CHAP_I", "9"), ("CHAP_C", "0x0102030405060708")]);
        assert_failed(l.step(&req(0, true, 1, &data)), status::AUTH_FAILURE);
    }

    #[test]
    fn mutual_chap_login() {
        let mut l = chap_login(true);
        let (id, c) = chap_start(&mut l, "Normal");
        let r = chap_response(id, "initiator-secret", &c);
        let ours = [9u8; 16];
        let data = text_of(&[("CHAP_N", "rig"), ("CHAP_R", &r), ("CHAP_I", "9"), ("CHAP_C", &chap::to_hex(&ours))]);
        let (rsp, out) = l.step(&req(0, true, 1, &data));
        assert_eq!(out, LoginOutcome::Continue);
        assert!(rsp.transit);
        assert_eq!(get(&rsp.data, "CHAP_N").as_deref(), Some("tgt"));
        assert_eq!(get(&rsp.data, "CHAP_R"), Some(chap_response(9, "target-secret-1", &ours)));
        assert_eq!(l.negotiated().auth, "CHAP MD5, mutual");
    }

    #[test]
    fn discovery_auth_follows_the_discovery_switch() {
        // discovery: true: AuthMethod=None is refused, CHAP works.
        let mut l = chap_login(false);
        let data = text_of(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")]);
        assert_failed(l.step(&req(0, true, 1, &data)), status::AUTH_FAILURE);
        let mut l = chap_login(false);
        let (id, c) = chap_start(&mut l, "Discovery");
        let r = chap_response(id, "initiator-secret", &c);
        let (rsp, _) = l.step(&req(0, true, 1, &text_of(&[("CHAP_N", "rig"), ("CHAP_R", &r)])));
        assert!(rsp.transit);
        // discovery: false: no credentials needed.
        let mut l = login_with(|c| {
            c.auth.chap =
                Some(chap::Credentials { username: "rig".into(), secret: chap::Secret::new("initiator-secret") })
        });
        let (rsp, _) = l.step(&req(0, true, 1, &data));
        assert!(rsp.transit && rsp.status_class == 0);
        assert_eq!(l.negotiated().auth, "None");
    }

    #[test]
    fn acl_refuses_with_authorization_failure() {
        let acl = |c: &mut LoginConfig| {
            c.acl = Acl { initiators: vec![INITIATOR.into()], networks: vec!["127.0.0.1/32".parse().unwrap()] }
        };
        let mut cfg = LoginConfig::default();
        acl(&mut cfg);
        let cfg = Arc::new(cfg);
        let ok = |ip: &str| Login::with_peer(cfg.clone(), ip.parse().unwrap());
        let mut l = ok("127.0.0.1");
        through_security(&mut l);
        let mut l = ok("127.0.0.2");
        assert_failed(l.step(&req(0, true, 1, &security_text())), status::AUTHORIZATION_FAILURE);
        let mut l = ok("127.0.0.1");
        let data = text_of(&[("InitiatorName", "iqn.2000-01.com.example:other"), ("TargetName", IQN)]);
        assert_failed(l.step(&req(0, true, 1, &data)), status::AUTHORIZATION_FAILURE);
        // Discovery logs in, but is marked as not authorized for the target.
        let mut l = ok("127.0.0.2");
        let data = text_of(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]);
        let (_, out) = l.step(&req(1, true, 3, &data));
        assert_eq!(out, LoginOutcome::FullFeature);
        assert!(!l.negotiated().authorized);
    }

    #[test]
    fn negotiated_pairs_cover_fields() {
        let mut l = login();
        through_security(&mut l);
        l.step(&req(1, true, 3, &text_of(&[("MaxRecvDataSegmentLength", "65536")])));
        let pairs = l.negotiated().pairs();
        let get = |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("InitiatorName"), Some(INITIATOR));
        assert_eq!(get("TargetName"), Some(IQN));
        assert_eq!(get("MaxXmitDataSegmentLength"), Some("65536"));
        assert_eq!(get("MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(get("InitialR2T"), Some("Yes"));
        assert_eq!(get("HeaderDigest"), Some("None"));
        assert_eq!(pairs.len(), 21);
    }
}
