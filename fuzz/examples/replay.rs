//! Runs one target's harness on input files without libFuzzer, e.g. to trace a seed:
//! `PDU_TRACE=1 cargo run --example replay -- pdu seeds/pdu/libiscsi-session`.

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().expect("usage: replay TARGET FILE...");
    for f in args {
        let data = std::fs::read(&f).expect("read input");
        eprintln!("== {f}");
        match target.as_str() {
            "pdu" => uringtgt_fuzz::pdu::run(&data),
            "login" => uringtgt_fuzz::login::run(&data),
            "text" => uringtgt_fuzz::text::run(&data),
            "scsi" => uringtgt_fuzz::scsi::run(&data),
            "rpc" => uringtgt_fuzz::rpc::run(&data),
            t => panic!("no target {t}"),
        }
    }
}
