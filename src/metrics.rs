//! Prometheus metrics: the optional `metrics_listen` HTTP endpoint serving `/metrics`.
//!
//! What the reactors record (operations, bytes and latency histograms per LUN and per
//! reactor, connections) is collected on each scrape the way `get_stats` collects it, and
//! encoded with `prometheus-client` (OpenMetrics text). Events outside the data path — login
//! failures, protocol errors, uploads — are counted here in process-wide counters: they are rare,
//! so a mutex per event costs nothing that matters.
//!
//! The server is one thread answering one request at a time: `GET /metrics` (and `/`), with a
//! bounded request (8 KiB) and 5 s read and write timeouts, so a stuck client cannot hold it.

use crate::iscsi::stats::{OpStats, ReactorStats};
use crate::target::Target;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics_listen {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("cannot start the metrics thread: {0}")]
    Thread(std::io::Error),
}

/// Longest request head read; anything longer is answered 431.
const MAX_REQUEST: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Latency histogram bucket bounds, in seconds (Prometheus' default spread, finer below 1 ms).
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Upload duration bucket bounds, in seconds.
const UPLOAD_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];
const QUANTILES: &[(f64, &str)] = &[(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (0.999, "0.999")];

// ---- counters of events outside the data path ----

static LOGIN_FAILURES: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());
static PROTOCOL_ERRORS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());
static UPLOADS: Mutex<Uploads> = Mutex::new(Uploads::new());

struct Uploads {
    /// By result: `uploaded`, `skipped`, `failed`.
    results: BTreeMap<&'static str, u64>,
    bytes: u64,
    /// Per-bucket counts of durations (one more for +Inf), and their sum in seconds.
    buckets: [u64; UPLOAD_BUCKETS.len() + 1],
    seconds: f64,
}

impl Uploads {
    const fn new() -> Self {
        Self { results: BTreeMap::new(), bytes: 0, buckets: [0; UPLOAD_BUCKETS.len() + 1], seconds: 0.0 }
    }
}

fn bump(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
    *map.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
}

/// The label of a login failure's status class and detail (RFC 7143 §11.13.5).
pub fn login_failure_reason(class: u8, detail: u8) -> &'static str {
    match (class, detail) {
        (1, _) => "redirect",
        (2, 0x01) => "authentication_failed",
        (2, 0x02) => "forbidden",
        (2, 0x03) => "target_not_found",
        (2, 0x04) => "target_removed",
        (2, 0x05) => "unsupported_version",
        (2, 0x06) => "too_many_connections",
        (2, 0x07) => "missing_parameter",
        (2, 0x08) => "cannot_include_in_session",
        (2, 0x09) => "session_type_not_supported",
        (2, 0x0A) => "session_does_not_exist",
        (2, 0x0B) => "invalid_during_login",
        (2, _) => "initiator_error",
        (3, 0x01) => "service_unavailable",
        (3, 0x02) => "out_of_resources",
        (3, _) => "target_error",
        _ => "other",
    }
}

/// Counts a refused login by its status class and detail.
pub fn login_failed(class: u8, detail: u8) {
    bump(&LOGIN_FAILURES, login_failure_reason(class, detail));
}

/// The label of a Reject reason code (RFC 7143 §11.17.1).
pub fn reject_kind(reason: u8) -> &'static str {
    use crate::protocol::pdu::reject::*;
    match reason {
        DATA_DIGEST_ERROR => "reject_data_digest",
        SNACK_REJECT => "reject_snack",
        PROTOCOL_ERROR => "reject_protocol_error",
        COMMAND_NOT_SUPPORTED => "reject_command_not_supported",
        IMMEDIATE_COMMAND_REJECT => "reject_immediate_command",
        TASK_IN_PROGRESS => "reject_task_in_progress",
        INVALID_DATA_ACK => "reject_invalid_data_ack",
        INVALID_PDU_FIELD => "reject_invalid_pdu_field",
        OUT_OF_RESOURCES => "reject_out_of_resources",
        WAITING_FOR_LOGOUT => "reject_waiting_for_logout",
        _ => "reject_other",
    }
}

/// Counts a protocol error: `reject_*` (see [`reject_kind`]), `header_digest`, `data_digest`,
/// `data_too_long`, `non_login_pdu_during_login`.
pub fn protocol_error(kind: &'static str) {
    bump(&PROTOCOL_ERRORS, kind);
}

/// Counts a finished upload (`upload_image` / `import_image`): its result (`uploaded`,
/// `skipped`, `failed`), the bytes received and how long it took.
pub fn upload_done(result: &'static str, bytes: u64, took: Duration) {
    let mut u = UPLOADS.lock().unwrap_or_else(|e| e.into_inner());
    *u.results.entry(result).or_default() += 1;
    u.bytes += bytes;
    let secs = took.as_secs_f64();
    let i = UPLOAD_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(UPLOAD_BUCKETS.len());
    u.buckets[i] += 1;
    u.seconds += secs;
}

/// Counts an `upload_image` / `import_image` by its answer: `None` failed, `skipped: true`
/// skipped, otherwise uploaded.
pub fn upload_finished(answer: Option<&serde_json::Value>, bytes: u64, took: Duration) {
    let result = match answer {
        None => "failed",
        Some(v) if v["skipped"] == serde_json::Value::Bool(true) => "skipped",
        Some(_) => "uploaded",
    };
    upload_done(result, bytes, took);
}

// ---- the snapshot encoded on each scrape ----

/// One histogram: per-bucket (not cumulative) counts with their upper bounds, the sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
struct Hist {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

/// Buckets [`LATENCY_BUCKETS`] (seconds) from a latency histogram in nanoseconds.
fn latency_hist(o: &OpStats) -> Hist {
    let h = &o.latency_ns;
    let mut counts = vec![0u64; LATENCY_BUCKETS.len() + 1];
    let mut sum = 0.0;
    for v in h.iter_recorded() {
        let secs = v.value_iterated_to() as f64 / 1e9;
        let n = v.count_at_value();
        sum += secs * n as f64;
        let i = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        counts[i] += n;
    }
    // prometheus-client writes an upper bound of f64::MAX as +Inf.
    let bounds = LATENCY_BUCKETS.iter().copied().chain([f64::MAX]);
    Hist { buckets: bounds.zip(counts).collect(), sum, count: h.len() }
}

/// One labelled read or write series.
#[derive(Debug)]
struct OpSeries {
    labels: Vec<(&'static str, String)>,
    ops: u64,
    bytes: u64,
    latency: Hist,
    quantiles: Vec<(&'static str, f64)>,
}

impl OpSeries {
    fn new(mut labels: Vec<(&'static str, String)>, op: &'static str, o: &OpStats) -> Self {
        labels.push(("op", op.to_owned()));
        let q = |p: f64| if o.ops == 0 { 0.0 } else { o.latency_ns.value_at_quantile(p) as f64 / 1e9 };
        let mut quantiles: Vec<(&'static str, f64)> = QUANTILES.iter().map(|(p, name)| (*name, q(*p))).collect();
        quantiles.push(("1", if o.ops == 0 { 0.0 } else { o.latency_ns.max() as f64 / 1e9 }));
        Self { labels, ops: o.ops, bytes: o.bytes, latency: latency_hist(o), quantiles }
    }
}

/// Everything one scrape reports, gathered before encoding.
#[derive(Debug)]
struct Snapshot {
    luns: Vec<OpSeries>,
    reactors: Vec<OpSeries>,
    connections: Vec<(usize, u64)>,
    sessions: Vec<(&'static str, u64)>,
    lun_count: u64,
    login_failures: Vec<(&'static str, u64)>,
    protocol_errors: Vec<(&'static str, u64)>,
    upload_results: Vec<(&'static str, u64)>,
    upload_bytes: u64,
    upload_durations: Hist,
}

impl Snapshot {
    fn take(target: &Target) -> Self {
        let shared = target.shared();
        let (table, _) = shared.lun_table();
        let reactors: Vec<ReactorStats> = shared.collect_stats();
        let mut per_lun: BTreeMap<u64, (OpStats, OpStats)> = table.iter().map(|l| (l.id, Default::default())).collect();
        let mut reactor_series = Vec::new();
        let mut connections = Vec::new();
        for r in &reactors {
            let (mut read, mut write) = (OpStats::default(), OpStats::default());
            for (id, s) in &r.luns {
                let e = per_lun.entry(*id).or_default();
                e.0.merge(&s.read);
                e.1.merge(&s.write);
                read.merge(&s.read);
                write.merge(&s.write);
            }
            let labels = vec![("reactor", r.reactor.to_string())];
            reactor_series.push(OpSeries::new(labels.clone(), "read", &read));
            reactor_series.push(OpSeries::new(labels, "write", &write));
            connections.push((r.reactor, r.connections as u64));
        }
        let mut luns = Vec::new();
        for (id, (read, write)) in &per_lun {
            let name = table.get(*id).map_or_else(String::new, |l| l.name.clone());
            let labels = vec![("lun_id", id.to_string()), ("name", name)];
            luns.push(OpSeries::new(labels.clone(), "read", read));
            luns.push(OpSeries::new(labels, "write", write));
        }
        let sessions = shared.sessions();
        let discovery = sessions.iter().filter(|s| s.discovery).count() as u64;
        let copy = |m: &Mutex<BTreeMap<&'static str, u64>>| -> Vec<(&'static str, u64)> {
            m.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (*k, *v)).collect()
        };
        let u = UPLOADS.lock().unwrap_or_else(|e| e.into_inner());
        let bounds = UPLOAD_BUCKETS.iter().copied().chain([f64::MAX]);
        let upload_durations = Hist {
            buckets: bounds.zip(u.buckets.iter().copied()).collect(),
            sum: u.seconds,
            count: u.buckets.iter().sum(),
        };
        Self {
            luns,
            reactors: reactor_series,
            connections,
            sessions: vec![("normal", sessions.len() as u64 - discovery), ("discovery", discovery)],
            lun_count: table.iter().count() as u64,
            login_failures: copy(&LOGIN_FAILURES),
            protocol_errors: copy(&PROTOCOL_ERRORS),
            upload_results: u.results.iter().map(|(k, v)| (*k, *v)).collect(),
            upload_bytes: u.bytes,
            upload_durations,
        }
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn labels_of<'a>(v: &'a [(&'static str, String)]) -> Labels<'a> {
    v.iter().map(|(k, s)| (*k, s.as_str())).collect()
}

/// Encodes one metric family: a descriptor, then one sample set per label set.
fn family<'a, T: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Labels<'a>, T)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in series {
        if labels.is_empty() {
            // No `{}` after the name.
            metric.encode(m)?;
            return Ok(());
        }
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn histograms<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, &'a Hist)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in series {
        if labels.is_empty() {
            return m.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None);
        }
        m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
    }
    Ok(())
}

fn op_families(enc: &mut DescriptorEncoder, what: &str, series: &[OpSeries]) -> Result<(), std::fmt::Error> {
    fn of(s: &OpSeries) -> Labels<'_> {
        labels_of(&s.labels)
    }
    family(
        enc,
        &format!("uringtgt_{what}_ops"),
        &format!("SCSI reads and writes completed, per {what}"),
        MetricType::Counter,
        series.iter().map(|s| (of(s), ConstCounter::new(s.ops))),
    )?;
    family(
        enc,
        &format!("uringtgt_{what}_bytes"),
        &format!("Bytes read and written, per {what}"),
        MetricType::Counter,
        series.iter().map(|s| (of(s), ConstCounter::new(s.bytes))),
    )?;
    histograms(
        enc,
        &format!("uringtgt_{what}_latency_seconds"),
        &format!("Command latency from the backing store's submission to its completion, per {what}"),
        series.iter().map(|s| (of(s), &s.latency)),
    )?;
    let quantiles = series.iter().flat_map(|s| {
        s.quantiles.iter().map(move |(q, v)| {
            let mut l = of(s);
            l.push(("quantile", q));
            (l, ConstGauge::new(*v))
        })
    });
    family(
        enc,
        &format!("uringtgt_{what}_latency_quantile_seconds"),
        &format!("Latency quantiles since start (exact, from the HDR histograms; 1 is the maximum), per {what}"),
        MetricType::Gauge,
        quantiles,
    )
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        op_families(&mut enc, "lun", &self.luns)?;
        op_families(&mut enc, "reactor", &self.reactors)?;
        let reactor_ids: Vec<String> = self.connections.iter().map(|(r, _)| r.to_string()).collect();
        family(
            &mut enc,
            "uringtgt_reactor_connections",
            "Open iSCSI connections, per reactor",
            MetricType::Gauge,
            self.connections
                .iter()
                .zip(&reactor_ids)
                .map(|((_, n), id)| (vec![("reactor", id.as_str())], ConstGauge::new(*n as i64))),
        )?;
        let total: u64 = self.connections.iter().map(|(_, n)| n).sum();
        family(
            &mut enc,
            "uringtgt_connections",
            "Open iSCSI connections",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(total as i64))],
        )?;
        family(
            &mut enc,
            "uringtgt_sessions",
            "Logged-in sessions, by type",
            MetricType::Gauge,
            self.sessions.iter().map(|(t, n)| (vec![("type", *t)], ConstGauge::new(*n as i64))),
        )?;
        family(
            &mut enc,
            "uringtgt_luns",
            "Exported LUNs",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(self.lun_count as i64))],
        )?;
        family(
            &mut enc,
            "uringtgt_login_failures",
            "Refused logins, by reason (the login status)",
            MetricType::Counter,
            self.login_failures.iter().map(|(r, n)| (vec![("reason", *r)], ConstCounter::new(*n))),
        )?;
        family(
            &mut enc,
            "uringtgt_protocol_errors",
            "Protocol errors, by kind (Rejects sent, digest errors, oversized PDUs)",
            MetricType::Counter,
            self.protocol_errors.iter().map(|(k, n)| (vec![("kind", *k)], ConstCounter::new(*n))),
        )?;
        family(
            &mut enc,
            "uringtgt_uploads",
            "Image uploads and imports, by result",
            MetricType::Counter,
            self.upload_results.iter().map(|(r, n)| (vec![("result", *r)], ConstCounter::new(*n))),
        )?;
        family(
            &mut enc,
            "uringtgt_upload_bytes",
            "Bytes received by image uploads",
            MetricType::Counter,
            [(vec![], ConstCounter::new(self.upload_bytes))],
        )?;
        histograms(
            &mut enc,
            "uringtgt_upload_duration_seconds",
            "How long image uploads and imports took",
            [(vec![], &self.upload_durations)],
        )
    }
}

/// The `/metrics` body: every metric, in the OpenMetrics text format.
pub fn render(target: &Target) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot::take(target)));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

// ---- the HTTP endpoint ----

/// The running endpoint; [`MetricsServer::stop`] closes it.
pub struct MetricsServer {
    listener: Arc<TcpListener>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `/metrics` from a thread.
    pub fn start(addr: &str, target: Arc<Target>) -> Result<Self, MetricsError> {
        let bind_err = |source| MetricsError::Bind { addr: addr.to_owned(), source };
        let listener = Arc::new(TcpListener::bind(addr).map_err(bind_err)?);
        let local = listener.local_addr().map_err(bind_err)?;
        let l = listener.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in l.incoming() {
                    match conn {
                        Ok(stream) => {
                            if let Err(e) = serve(stream, &target) {
                                log::debug!("metrics: {e}");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e)
                            if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ECONNABORTED)) =>
                        {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(_) => return, // shut down
                    }
                }
            })
            .map_err(MetricsError::Thread)?;
        Ok(Self { listener, addr: local, thread: Some(thread) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        // SAFETY: shutting down our own listening socket wakes the blocked accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Metrics { head: bool },
    NotFound,
    MethodNotAllowed,
    Bad,
}

/// Parses the request line of a request head (`GET /metrics HTTP/1.1`).
fn parse_request(head: &[u8]) -> Request {
    let Some(line) = head.split(|b| *b == b'\n').next().and_then(|l| std::str::from_utf8(l).ok()) else {
        return Request::Bad;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Request::Bad;
    }
    let path = target.split('?').next().unwrap_or("");
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::MethodNotAllowed,
    };
    match path {
        "/metrics" | "/" => Request::Metrics { head },
        _ => Request::NotFound,
    }
}

/// Answers one request, then closes gently: unread request bytes left in the socket would make
/// the close a reset, which can destroy the answer before the client reads it.
fn serve(mut stream: TcpStream, target: &Target) -> std::io::Result<()> {
    answer(&mut stream, target)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let _ = std::io::copy(&mut (&mut stream).take(64 * 1024), &mut std::io::sink());
    Ok(())
}

/// Reads the request head (bounded, with a timeout) and answers it; one request per connection.
fn answer(stream: &mut TcpStream, target: &Target) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut n = 0;
    let complete = loop {
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || buf[..n].windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if n == buf.len() {
            break false;
        }
        match stream.read(&mut buf[n..])? {
            0 => return Ok(()),
            k => n += k,
        }
    };
    let (status, body) = if !complete {
        ("431 Request Header Fields Too Large", String::from("request head over 8 KiB\n"))
    } else {
        match parse_request(&buf[..n]) {
            Request::Metrics { head } => {
                let body = render(target);
                let (len, body) = (body.len(), if head { String::new() } else { body });
                let hdr = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
                     Content-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(hdr.as_bytes())?;
                return stream.write_all(body.as_bytes());
            }
            Request::NotFound => ("404 Not Found", String::from("only /metrics is served\n")),
            Request::MethodNotAllowed => ("405 Method Not Allowed", String::from("only GET and HEAD\n")),
            Request::Bad => ("400 Bad Request", String::from("bad request line\n")),
        }
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_parsed() {
        assert_eq!(parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Request::Metrics { head: false });
        assert_eq!(parse_request(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"), Request::Metrics { head: true });
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Request::Metrics { head: false });
        assert_eq!(parse_request(b"GET /other HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"), Request::MethodNotAllowed);
        assert_eq!(parse_request(b"GET /metrics\r\n\r\n"), Request::Bad);
        assert_eq!(parse_request(b"GET /metrics SPDY/3\r\n\r\n"), Request::Bad);
        assert_eq!(parse_request(b"\xff\xfe\r\n\r\n"), Request::Bad);
    }

    #[test]
    fn latency_buckets_come_from_the_hdr_histogram() {
        let mut o = OpStats::default();
        for ns in [30_000u64, 40_000, 2_000_000, 20_000_000_000] {
            o.latency_ns.record(ns).unwrap();
            o.ops += 1;
        }
        let h = latency_hist(&o);
        assert_eq!(h.count, 4);
        assert_eq!(h.buckets.len(), LATENCY_BUCKETS.len() + 1);
        let at = |bound: f64| h.buckets.iter().find(|(b, _)| *b == bound).unwrap().1;
        assert_eq!(at(0.000_05), 2, "30 and 40 µs");
        assert_eq!(at(0.002_5), 1, "2 ms");
        assert_eq!(at(f64::MAX), 1, "20 s is above the last bound");
        assert_eq!(h.buckets.iter().map(|(_, n)| n).sum::<u64>(), 4);
        // 3 significant digits: each value is within 0.1% of what was recorded.
        assert!((h.sum - 20.00207).abs() < 0.03, "{}", h.sum);
    }

    #[test]
    fn login_and_reject_labels() {
        assert_eq!(login_failure_reason(2, 1), "authentication_failed");
        assert_eq!(login_failure_reason(2, 0x0A), "session_does_not_exist");
        assert_eq!(login_failure_reason(3, 2), "out_of_resources");
        assert_eq!(login_failure_reason(2, 0x55), "initiator_error");
        assert_eq!(reject_kind(crate::protocol::pdu::reject::PROTOCOL_ERROR), "reject_protocol_error");
        assert_eq!(reject_kind(0x77), "reject_other");
    }

    #[test]
    fn uploads_are_bucketed_by_duration() {
        let before = UPLOADS.lock().unwrap().buckets;
        upload_done("uploaded", 1000, Duration::from_millis(700));
        let after = UPLOADS.lock().unwrap().buckets;
        let i = UPLOAD_BUCKETS.iter().position(|b| *b == 1.0).unwrap();
        assert_eq!(after[i], before[i] + 1);
    }
}
