//! Replay coherence-simulator seeds: `dsm-sim --seed N` or
//! `dsm-sim --from N --count K`.

use dsm::coherence::sim;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (first, count) = match (value("--seed"), value("--from"), value("--count")) {
        (Some(seed), _, _) => (seed, 1),
        (None, from, count) => (from.unwrap_or(0), count.unwrap_or(10_000)),
    };
    match sim::run_seeds(first, count) {
        Ok(r) => {
            println!(
                "seeds {first}..{}: ok ({} steps, {} crashes, {} SIGBUS)",
                first + count,
                r.steps,
                r.crashes,
                r.poisoned
            );
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("{failure}");
            ExitCode::FAILURE
        }
    }
}
