//! Client-side helpers: opening an image source (a local file or an HTTP(S) URL), digesting
//! it the way the server will, and counting progress while it streams.

use super::decompress::WireReader;
use super::writer::read_full;
use super::{Compression, ImageError};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use ureq::tls::{PemItem, RootCerts, TlsConfig};

/// A source to upload: its bytes, their count (when known) and compression.
pub struct Source {
    pub reader: Box<dyn Read + Send>,
    /// Bytes on the wire; `None` when unknown (the upload then needs it another way).
    pub len: Option<u64>,
    pub compression: Compression,
}

/// Connecting, and waiting for the response head; the body has no overall deadline (multi-GiB).
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `spec` is an HTTP(S) URL rather than a local path.
pub fn is_url(spec: &str) -> bool {
    let lower = spec.get(..8).unwrap_or(spec).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// Parses a `--header 'Name: value'`: the name an HTTP token, the value free of control
/// characters (a CR or LF would inject headers), surrounding blanks trimmed.
pub fn parse_header(spec: &str) -> Result<(String, String), ImageError> {
    let bad = |reason: &'static str| ImageError::BadHeader { header: spec.to_owned(), reason };
    let (name, value) = spec.split_once(':').ok_or_else(|| bad("expected 'Name: value'"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(bad("empty header name"));
    }
    // RFC 9110 token characters.
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !name.chars().all(tchar) {
        return Err(bad("the name may hold only letters, digits and !#$%&'*+-.^_`|~"));
    }
    let value = value.trim_matches([' ', '\t']);
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(bad("control characters in the value"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// How to fetch a URL source; a local file takes none of it.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Extra request headers (see [`parse_header`]).
    pub headers: Vec<(String, String)>,
    /// A PEM file of CA certificates: an https:// server's certificate must chain to one of
    /// them, instead of to the built-in Mozilla roots (as curl's `--cacert`). A lab CI's
    /// artifact server usually has a private CA.
    pub ca_file: Option<PathBuf>,
}

/// Opens a local file or an HTTP(S) URL (fetched as `fetch` says, which only URLs take);
/// compression from the file name's or URL path's extension.
pub fn open_source(spec: &str, fetch: &FetchOptions) -> Result<Source, ImageError> {
    if is_url(spec) {
        return open_url(spec, fetch);
    }
    let url_only = |what: &str| ImageError::BadSource {
        path: spec.into(),
        reason: format!("{what} applies to HTTP(S) sources only"),
    };
    if !fetch.headers.is_empty() {
        return Err(url_only("--header"));
    }
    if fetch.ca_file.is_some() {
        return Err(url_only("--cacert"));
    }
    let path = PathBuf::from(spec);
    let bad = |reason: String| ImageError::BadSource { path: path.clone(), reason };
    let file = File::open(&path).map_err(|e| bad(format!("open: {e}")))?;
    let meta = file.metadata().map_err(|e| bad(format!("stat: {e}")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let reader = Named { name: spec.to_owned(), inner: file, done: 0, len: meta.len() };
    Ok(Source { reader: Box::new(reader), len: Some(meta.len()), compression: Compression::from_extension(&path) })
}

/// GETs `url` and hands back its body unread: it streams straight into the upload, no temp
/// copy. The upload announces its byte count first, so a body without Content-Length
/// (chunked) is refused rather than spooled.
fn open_url(url: &str, fetch: &FetchOptions) -> Result<Source, ImageError> {
    let http = |reason: String| ImageError::Http { url: url.to_owned(), reason };
    // Read before any request: a bad file fails fast, whatever the URL.
    let roots = fetch.ca_file.as_deref().map(load_ca_file).transpose()?;
    let tls = TlsConfig::builder().root_certs(roots.clone().unwrap_or(RootCerts::WebPki)).build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        // Statuses are turned into errors below, with the reason phrase.
        .http_status_as_error(false)
        .timeout_connect(Some(HTTP_CONNECT_TIMEOUT))
        .timeout_recv_response(Some(HTTP_RESPONSE_TIMEOUT))
        .tls_config(tls)
        .build()
        .into();
    let mut req = agent.get(url);
    for (name, value) in &fetch.headers {
        req = req.header(name, value);
    }
    // ureq without its gzip feature sends no Accept-Encoding: the body is the file as stored.
    let resp = req.call().map_err(|e| {
        // Without ureq's "io: " prefix: "Connection refused (os error 111)".
        let msg = match e {
            ureq::Error::Io(e) => e.to_string(),
            e => e.to_string(),
        };
        if msg.contains("certificate") {
            let trusted = match &fetch.ca_file {
                Some(f) => format!("the CAs in {}", f.display()),
                None => "the built-in Mozilla roots; for a private CA pass --cacert FILE or set SSL_CERT_FILE".into(),
            };
            return http(format!("{msg} (trusted: {trusted})"));
        }
        http(msg)
    })?;
    let status = resp.status();
    if status.as_u16() >= 400 {
        return Err(http(format!("HTTP {status}")));
    }
    if !status.is_success() {
        return Err(http(format!("unexpected HTTP {status}")));
    }
    let (_, body) = resp.into_parts();
    let len = body.content_length().ok_or_else(|| {
        http(
            "the server sent no Content-Length (a chunked body); the upload must announce its size up \
              front and no temp copy is made, so serve the file with a Content-Length"
                .into(),
        )
    })?;
    let reader = Named { name: url.to_owned(), inner: body.into_reader(), done: 0, len };
    Ok(Source {
        reader: Box::new(reader),
        len: Some(len),
        compression: Compression::from_extension(Path::new(super::base_name(url))),
    })
}

/// The CA certificates of a PEM file, as the only roots an https:// server may chain to.
fn load_ca_file(path: &Path) -> Result<RootCerts, ImageError> {
    let bad = |reason: String| ImageError::BadCaFile { path: path.to_owned(), reason };
    let pem = std::fs::read(path).map_err(|e| bad(format!("read: {e}")))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let PemItem::Certificate(c) = item.map_err(|e| bad(format!("not a PEM file: {e}")))? {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(RootCerts::Specific(Arc::new(certs)))
}

/// A reader whose errors name their source (the path or URL) and how far it got, so a failure
/// mid-upload says what broke and where (a bare "Peer disconnected" says neither).
struct Named<R> {
    name: String,
    inner: R,
    /// Bytes read so far, and the total announced (file size, Content-Length).
    done: u64,
    len: u64,
}

impl<R: Read> Read for Named<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.done += n as u64;
                Ok(n)
            }
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("{}: broke off after {} of {} bytes: {e}", self.name, self.done, self.len),
            )),
        }
    }
}

/// The uncompressed size and SHA-256 of an image source: what the server's sidecar records, so
/// a client can ask [`super::image_info`] whether sending it can be skipped.
pub fn digest_image(src: impl Read, compression: Compression) -> Result<(u64, [u8; 32]), ImageError> {
    let (mut wire, state) = WireReader::new(src, None);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let err = |e: io::Error, state: &super::decompress::WireState| match state.error.borrow_mut().take() {
        Some(source) => ImageError::Source { offset: state.bytes.get(), source },
        None => ImageError::Decompress { compression, offset: state.bytes.get(), source: e },
    };
    let mut decoder = compression.decoder(&mut wire).map_err(|e| err(e, &state))?;
    loop {
        let n = read_full(&mut decoder, &mut buf).map_err(|e| err(e, &state))?;
        hasher.update(&buf[..n]);
        total += n as u64;
        if n < buf.len() {
            return Ok((total, hasher.finalize().into()));
        }
    }
}

/// [`digest_image`] of a local file, compression from its extension.
pub fn digest_file(path: &Path) -> Result<(u64, [u8; 32]), ImageError> {
    let file =
        File::open(path).map_err(|e| ImageError::BadSource { path: path.to_owned(), reason: format!("open: {e}") })?;
    digest_image(file, Compression::from_extension(path))
}

/// Calls `on_progress(total bytes so far)` as bytes are read: drives a progress bar.
pub struct Progress<R, F> {
    inner: R,
    done: u64,
    on_progress: F,
}

impl<R: Read, F: FnMut(u64)> Progress<R, F> {
    pub fn new(inner: R, on_progress: F) -> Self {
        Self { inner, done: 0, on_progress }
    }
}

impl<R: Read, F: FnMut(u64)> Read for Progress<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.on_progress)(self.done);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn digest_matches_the_import() {
        let dir = tempfile::tempdir().unwrap();
        let image: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
        let path = dir.path().join("x.img.gz");
        let mut e = flate2::write::GzEncoder::new(File::create(&path).unwrap(), flate2::Compression::fast());
        e.write_all(&image).unwrap();
        e.finish().unwrap();
        let (bytes, digest) = digest_file(&path).unwrap();
        let src = open_source(path.to_str().unwrap(), &FetchOptions::default()).unwrap();
        assert_eq!(src.compression, Compression::Gz);
        let mut seen = 0;
        let opts = super::super::ImportOptions {
            compression: Some(src.compression),
            expected_size: src.len,
            ..Default::default()
        };
        let r = super::super::import_image(dir.path(), "x", Progress::new(src.reader, |n| seen = n), &opts).unwrap();
        assert_eq!((r.bytes, r.sha256), (bytes, digest));
        assert_eq!(seen, std::fs::metadata(&path).unwrap().len());
        assert!(open_source(dir.path().to_str().unwrap(), &FetchOptions::default()).is_err());
        let h = FetchOptions { headers: vec![("X-A".to_owned(), "b".to_owned())], ..Default::default() };
        assert!(matches!(open_source(path.to_str().unwrap(), &h), Err(ImageError::BadSource { .. })));
        let ca = FetchOptions { ca_file: Some(path.clone()), ..Default::default() };
        let e = open_source(path.to_str().unwrap(), &ca).err().unwrap().to_string();
        assert!(e.contains("--cacert applies to HTTP(S) sources only"), "{e}");
    }

    #[test]
    fn headers_parse_or_are_refused() {
        assert_eq!(parse_header("X-Token: abc").unwrap(), ("X-Token".into(), "abc".into()));
        assert_eq!(parse_header("Authorization:Bearer a:b ").unwrap(), ("Authorization".into(), "Bearer a:b".into()));
        assert_eq!(parse_header("X-Empty:").unwrap(), ("X-Empty".into(), String::new()));
        for bad in ["no colon", ": v", "X Token: v", "X-A: a\r\nX-B: b", "Ä: v"] {
            let e = parse_header(bad).unwrap_err();
            assert!(
                matches!(e, ImageError::BadHeader { .. }) && e.to_string().contains(&format!("{bad:?}")),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn ca_files_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        for (file, want) in [(&missing, "read: "), (&empty, "holds no PEM certificate")] {
            let fetch = FetchOptions { ca_file: Some(file.clone()), ..Default::default() };
            // Refused before any connection: nothing listens on port 1.
            let e = open_source("https://127.0.0.1:1/x.img", &fetch).err().unwrap();
            let msg = e.to_string();
            assert!(matches!(e, ImageError::BadCaFile { .. }) && msg.contains(want), "{msg}");
            assert!(msg.starts_with(&format!("--cacert {}: ", file.display())), "{msg}");
        }
    }

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url("http://h/x") && is_url("HTTPS://h/x") && !is_url("httpx") && !is_url("/tmp/http:/x"));
    }
}
