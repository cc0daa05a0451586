//! Imports one image file the way an upload does (used by perf/upload-bench):
//! `image_import ROOT_DIR NAME FILE [none|gz|xz|bz2|zstd]`; prints bytes, seconds and sha256.

use std::time::Instant;
use uringtgt::images::{import_image, Compression, ImportOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, root, name, file, rest @ ..] = &args[..] else {
        return Err("usage: image_import ROOT_DIR NAME FILE [COMPRESSION]".into());
    };
    let compression: Compression = rest.first().map_or(Ok(Compression::None), |c| c.parse())?;
    let src = std::fs::File::open(file)?;
    let size = src.metadata()?.len();
    let opts = ImportOptions { compression: Some(compression), expected_size: Some(size), ..Default::default() };
    let start = Instant::now();
    // A socket read, not a file one: the wire path reads through the same `impl Read`.
    let r = import_image(root.as_ref(), name, src, &opts)?;
    println!("{} {:.3} {}", r.bytes, start.elapsed().as_secs_f64(), r.sha256_hex());
    Ok(())
}
