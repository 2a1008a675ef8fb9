//! `cargo run --release -p outpost-hil --bin bench -- NAME`: runs one benchmark and prints,
//! as its last line, one JSON object with its figures. Every figure that matters is a ratio
//! against a baseline measured in the same run (the machine is shared and noisy).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first() else {
        eprintln!(
            "usage: bench NAME [ARGS...]; NAME is one of: {}",
            outpost_hil::benches::NAMES.join(", ")
        );
        return ExitCode::from(2);
    };
    match outpost_hil::benches::run(name, &args[1..]) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench {name}: {e}");
            ExitCode::FAILURE
        }
    }
}
