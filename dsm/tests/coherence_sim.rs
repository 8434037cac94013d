//! Many thousands of random schedules of the coherence protocol, with
//! delays, reordering across links, node crashes and partitions. A failure prints
//! `SEED=<n>`; replay it with `cargo run -p dsm --bin dsm-sim -- --seed <n>`.

use dsm::coherence::sim;

fn seed_count() -> u64 {
    std::env::var("DSM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

#[test]
fn random_schedules_keep_every_invariant() {
    let count = seed_count();
    match sim::run_seeds(0, count) {
        Ok(r) => {
            // Coverage that must not vanish unnoticed: runs of fresh pages
            // granted at once.
            assert!(
                count < 1000 || r.fresh_runs > 0,
                "no fresh run in {count} seeds"
            );
            println!(
            "{count} seeds: {} steps, {} messages, {} reads, {} writes, {} crashes, {} partitions, {} SIGBUS, {} fresh runs of {} pages",
            r.steps, r.messages, r.reads, r.writes, r.crashes, r.partitions, r.poisoned, r.fresh_runs, r.fresh_run_pages
            )
        }
        Err(failure) => panic!("{failure}"),
    }
}
