//! The `rpc` target: the control plane's JSON-RPC request parser
//! ([`uringtgt::control::rpc::parse_request`], `decode_params`, `response`) and the methods
//! behind it ([`uringtgt::control::methods::call`]) on a running target (127.0.0.1, port 0, a
//! temporary root_dir), one request per input line as the control socket reads them.
//!
//! Methods that would move lots of data are left out (`upload_image`, `import_image`) and
//! `add_lun` is called only up to 8 MiB; every other method runs. The LUNs and image files an
//! input creates are removed after it, so inputs do not depend on each other.
//!
//! Checked: a parsed request has an object, array or null `params`; every answer is one line
//! of JSON-RPC 2.0 with the request's id and either a result or an error with a documented code.

use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::OnceLock;
use uringtgt::config::Config;
use uringtgt::control::{methods, rpc};
use uringtgt::target::Target;

const CODES: &[i64] = &[
    rpc::PARSE_ERROR,
    rpc::INVALID_REQUEST,
    rpc::METHOD_NOT_FOUND,
    rpc::INVALID_PARAMS,
    rpc::INTERNAL_ERROR,
    rpc::LUN_NOT_FOUND,
    rpc::LUN_CONFLICT,
    rpc::PATH_REJECTED,
    rpc::IO_ERROR,
    rpc::NO_SPACE,
    rpc::BAD_IMAGE,
    rpc::PORTAL_ERROR,
    rpc::BUSY,
    rpc::BAD_UPLOAD,
    rpc::DIGEST_MISMATCH,
    rpc::IMAGE_NOT_FOUND,
];

struct Fixture {
    target: Target,
    root: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("uringtgt-fuzz-rpc-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("root_dir");
        let yaml = format!("root_dir: {}\nhost: 127.0.0.1\nport: 0\nreactors: 1\ntarget_name: fuzz\n", root.display());
        let cfg = Config::from_yaml_str(&yaml).expect("fuzz config");
        let target = Target::start(&cfg).expect("target starts");
        Fixture { target, root }
    })
}

/// `add_lun`'s size_mb (named or third positional), when it is a number.
fn size_mb(params: &Value) -> u64 {
    let v = match params {
        Value::Object(o) => o.get("size_mb"),
        Value::Array(a) => a.get(2),
        _ => None,
    };
    v.and_then(Value::as_u64).unwrap_or(0)
}

fn check_answer(line: &str, id: &Value) {
    assert!(!line.contains('\n'), "a response spans lines");
    let v: Value = serde_json::from_str(line).expect("response is JSON");
    assert_eq!(v["jsonrpc"], json!("2.0"));
    assert_eq!(&v["id"], id);
    match (v.get("result"), v.get("error")) {
        (Some(_), None) => {}
        (None, Some(e)) => {
            let code = e["code"].as_i64().expect("error code");
            assert!(CODES.contains(&code), "undocumented error code {code}");
            assert!(e["message"].is_string());
        }
        _ => panic!("neither result nor error: {line}"),
    }
}

pub fn run(input: &[u8]) {
    let f = fixture();
    for line in input.split(|&b| b == b'\n') {
        if line.len() > rpc::MAX_LINE {
            continue; // the server refuses these before parsing
        }
        let (id, result) = match rpc::parse_request(line) {
            Err((id, e)) => (Some(id), Err(e)),
            Ok(req) => {
                assert!(matches!(req.params, Value::Null | Value::Object(_) | Value::Array(_)));
                let result = match req.method.as_str() {
                    "upload_image" | "import_image" => Err(rpc::RpcError::invalid_params("not fuzzed")),
                    "add_lun" if size_mb(&req.params) > 8 => Err(rpc::RpcError::invalid_params("not fuzzed")),
                    m => methods::call(&f.target, m, req.params),
                };
                (req.id, result)
            }
        };
        let answer = rpc::response(id.as_ref().unwrap_or(&Value::Null), result);
        check_answer(&answer, id.as_ref().unwrap_or(&Value::Null));
    }
    f.target.clear_luns();
    if !f.target.portal_open() {
        let _ = f.target.start_portal();
    }
    if let Ok(dir) = std::fs::read_dir(&f.root) {
        for e in dir.flatten() {
            let p = e.path();
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}
