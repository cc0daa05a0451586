//! Compression formats, their streaming decoders, and the byte-counting reader between the
//! source and the decoder.

use super::ImageError;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, Read};
use std::path::Path;
use std::rc::Rc;
use std::str::FromStr;

/// How an image source is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    #[serde(alias = "raw")]
    None,
    #[serde(alias = "gzip")]
    Gz,
    Xz,
    #[serde(alias = "bzip2")]
    Bz2,
    #[serde(alias = "zst")]
    Zstd,
}

impl Compression {
    pub const ALL: [Compression; 5] =
        [Compression::None, Compression::Gz, Compression::Xz, Compression::Bz2, Compression::Zstd];

    /// From the last extension of a file name: `.gz`, `.xz`, `.bz2`, `.zst`/`.zstd` (any case);
    /// anything else is [`Compression::None`].
    pub fn from_extension(path: &Path) -> Compression {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        match ext.as_str() {
            "gz" | "gzip" => Compression::Gz,
            "xz" => Compression::Xz,
            "bz2" => Compression::Bz2,
            "zst" | "zstd" => Compression::Zstd,
            _ => Compression::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gz => "gz",
            Compression::Xz => "xz",
            Compression::Bz2 => "bz2",
            Compression::Zstd => "zstd",
        }
    }

    /// Wraps `src` in this format's decoder. Concatenated streams (`pigz`, `pxz`, `pbzip2`,
    /// `zstd -T`, `cat a.gz b.gz`) decode as one, like the command-line tools do.
    pub(crate) fn decoder<'a, R: Read + 'a>(self, src: R) -> Result<Box<dyn Read + 'a>, io::Error> {
        Ok(match self {
            Compression::None => Box::new(src),
            Compression::Gz => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::with_capacity(BUF, src))),
            Compression::Xz => {
                Box::new(liblzma::read::XzDecoder::new_multi_decoder(io::BufReader::with_capacity(BUF, src)))
            }
            Compression::Bz2 => Box::new(bzip2::read::MultiBzDecoder::new(io::BufReader::with_capacity(BUF, src))),
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::with_buffer(io::BufReader::with_capacity(BUF, src))?)
            }
        })
    }
}

/// Read size from the source: large enough that a socket or file read is not per-packet.
const BUF: usize = 256 << 10;

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, ImageError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" | "raw" | "" => Compression::None,
            "gz" | "gzip" => Compression::Gz,
            "xz" => Compression::Xz,
            "bz2" | "bzip2" => Compression::Bz2,
            "zst" | "zstd" => Compression::Zstd,
            _ => return Err(ImageError::InvalidCompression(s.to_owned())),
        })
    }
}

/// What the [`WireReader`] saw, shared with the importer after the decoder consumed it.
#[derive(Default)]
pub(crate) struct WireState {
    /// Bytes read from the source.
    pub bytes: Cell<u64>,
    /// The source's own error, kept so it is not mistaken for a decoder error.
    pub error: RefCell<Option<io::Error>>,
    /// The source ended (returned 0) before the limit.
    pub eof: Cell<bool>,
}

/// Reads the source, counting bytes and never asking for more than `limit` of them: a socket
/// is not read past the upload, so the next request on it stays intact.
pub(crate) struct WireReader<R> {
    inner: R,
    limit: Option<u64>,
    state: Rc<WireState>,
}

impl<R: Read> WireReader<R> {
    pub fn new(inner: R, limit: Option<u64>) -> (Self, Rc<WireState>) {
        let state = Rc::new(WireState::default());
        (Self { inner, limit, state: state.clone() }, state)
    }

    /// Reads past the limit: whether the source holds more than announced.
    pub fn probe(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

impl<R: Read> Read for WireReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let done = self.state.bytes.get();
        let want = match self.limit {
            Some(limit) => buf.len().min(usize::try_from(limit - done).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        if want == 0 {
            return Ok(0);
        }
        loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => {
                    self.state.eof.set(true);
                    return Ok(0);
                }
                Ok(n) => {
                    self.state.bytes.set(done + n as u64);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let copy = io::Error::new(e.kind(), e.to_string());
                    *self.state.error.borrow_mut() = Some(e);
                    return Err(copy);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_and_names() {
        let ext = |p: &str| Compression::from_extension(Path::new(p));
        assert_eq!(ext("a.img.gz"), Compression::Gz);
        assert_eq!(ext("a.img.XZ"), Compression::Xz);
        assert_eq!(ext("a.bz2"), Compression::Bz2);
        assert_eq!(ext("a.zst"), Compression::Zstd);
        assert_eq!(ext("a.zstd"), Compression::Zstd);
        assert_eq!(ext("a.img"), Compression::None);
        assert_eq!(ext("gz"), Compression::None);
        for c in Compression::ALL {
            assert_eq!(c.as_str().parse::<Compression>().unwrap(), c);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{c}\""));
            assert_eq!(serde_json::from_str::<Compression>(&json).unwrap(), c);
        }
        assert_eq!("gzip".parse::<Compression>().unwrap(), Compression::Gz);
        assert_eq!(serde_json::from_str::<Compression>("\"zst\"").unwrap(), Compression::Zstd);
        let e = "lz4".parse::<Compression>().unwrap_err().to_string();
        assert!(e.contains("\"lz4\" is not one of"), "{e}");
    }

    #[test]
    fn wire_reader_stops_at_the_limit() {
        let data = [1u8; 100];
        let mut src = &data[..];
        let (mut r, st) = WireReader::new(&mut src, Some(60));
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!((out.len(), st.bytes.get(), st.eof.get()), (60, 60, false));
        // The rest is still in the source.
        assert_eq!(src.len(), 40);
    }
}
