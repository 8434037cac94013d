//! `sem-bench`: SysV semaphore operations through two `dsmd` on loopback,
//! beside the kernel's own semaphores. Prints a table, then (last line) one
//! JSON object.
//!
//! * local: uncontended P+V by a process on node 1, set homed on node 1;
//! * remote: the same by a process on node 2, set homed on node 1. After a
//!   few operations node 1 lends the set to node 2 (its only user), which
//!   then serves them from its own shared memory; the same figure with
//!   lending off (`--sem-lend-after 0`) is shown too;
//! * hand-off: a mutex passed back and forth between a process on node 1
//!   and one on node 2, set homed on node 1. The mutex is a baton of two
//!   semaphores (each process takes its own and gives the other's), so
//!   every release hands it to a process already waiting for it.
//!
//! The daemons are this binary again (`--daemon`), one per CPU, as in
//! `dsm-bench`; `/dev/cpu_dma_latency` is held at 0 when possible.

use dsm::bench::{hold_low_latency, pin_to_node, start_daemons, stats, stop, unpin, Stats};
use semaphore::{SemBuf, SemSet, Semaphores};
use std::time::{Duration, Instant};

const PV_ROUNDS: usize = 20_000;
const HANDOFF_ROUNDS: usize = 5_000;

const P: [SemBuf; 1] = sop(0, -1);
const V: [SemBuf; 1] = sop(0, 1);

/// Something that can do a `semop` on semaphore 0 of a set.
trait Semop {
    fn semop(&self, sops: &[SemBuf]);
}

impl Semop for SemSet {
    fn semop(&self, sops: &[SemBuf]) {
        if let Err(e) = self.op(sops) {
            eprintln!("sem-bench: semop: {e}");
            std::process::exit(1);
        }
    }
}

/// A kernel SysV set (the reference).
struct KernelSet(i32);

impl KernelSet {
    fn new() -> KernelSet {
        // SAFETY: semget takes plain integers.
        let id = unsafe { libc::semget(libc::IPC_PRIVATE, 3, 0o600) };
        if id < 0 {
            eprintln!(
                "sem-bench: kernel semget: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
        KernelSet(id)
    }
}

impl Semop for KernelSet {
    fn semop(&self, sops: &[SemBuf]) {
        let mut raw: Vec<libc::sembuf> = sops.iter().map(|s| libc::sembuf::from(*s)).collect();
        // SAFETY: `raw` is a valid array of raw.len() sembufs.
        if unsafe { libc::semop(self.0, raw.as_mut_ptr(), raw.len()) } < 0 {
            eprintln!(
                "sem-bench: kernel semop: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
}

impl Drop for KernelSet {
    fn drop(&mut self) {
        // SAFETY: removing the set this benchmark created.
        unsafe { libc::semctl(self.0, 0, libc::IPC_RMID) };
    }
}

/// Time uncontended P+V pairs (the semaphore starts at 1).
fn time_pv(set: &dyn Semop, rounds: usize) -> Vec<Duration> {
    set.semop(&V);
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            set.semop(&P);
            set.semop(&V);
            t.elapsed()
        })
        .collect()
}

const fn sop(num: u16, op: i16) -> [SemBuf; 1] {
    [SemBuf { num, op, flags: 0 }]
}

/// Semaphore 2 is the start gate.
const GATE: u16 = 2;

/// Take the baton `me`, hand over the other one, `rounds` times.
fn pass_baton(set: &dyn Semop, me: u16, rounds: usize) {
    for _ in 0..rounds {
        set.semop(&sop(me, -1));
        set.semop(&sop(1 - me, 1));
    }
}

/// A process on the other side takes baton 1 (`other` starts it); this one
/// takes baton 0. Returns hand-offs per second.
fn handoffs(set: &dyn Semop, other: impl FnOnce() -> std::process::Child) -> f64 {
    let mut child = other();
    set.semop(&sop(GATE, -1)); // the other process is ready
    let t = Instant::now();
    set.semop(&sop(0, 1));
    pass_baton(set, 0, HANDOFF_ROUNDS);
    let status = child.wait();
    let elapsed = t.elapsed();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("sem-bench: the other process failed");
        std::process::exit(1);
    }
    (2 * HANDOFF_ROUNDS) as f64 / elapsed.as_secs_f64()
}

/// The other process of the hand-off.
fn other_side(set: &dyn Semop, rounds: usize) {
    set.semop(&sop(GATE, 1));
    pass_baton(set, 1, rounds);
}

/// `sem-bench --contender SOCKET ID` / `--kernel-contender ID`.
fn contender(args: &[String]) -> ! {
    let rounds = HANDOFF_ROUNDS;
    match (args.first().map(String::as_str), args.get(1), args.get(2)) {
        (Some("--contender"), Some(socket), Some(id)) => {
            let sems = Semaphores::connect(socket).unwrap_or_else(|e| {
                eprintln!("sem-bench: connect: {e}");
                std::process::exit(1)
            });
            pin_to_node(2);
            other_side(&sems.open(id.parse().unwrap_or(-1)), rounds);
        }
        (Some("--kernel-contender"), Some(id), _) => {
            other_side(&KernelSet(id.parse().unwrap_or(-1)), rounds);
        }
        _ => std::process::exit(2),
    }
    std::process::exit(0);
}

fn connect_to(socket: &std::path::Path) -> Semaphores {
    Semaphores::connect(socket).unwrap_or_else(|e| {
        eprintln!("sem-bench: connect: {e}");
        std::process::exit(1)
    })
}

fn row(name: &str, ours: &Stats, kernel: &Stats) {
    println!(
        "{name:<44} {:>10.1} {:>10.1} {:>14.2}",
        ours.p50_us, ours.p99_us, kernel.p50_us
    );
}

fn main() {
    // Its daemons' guardians may be this binary started again.
    if let Some(code) = dsm::guardian::serve_if_asked() {
        std::process::exit(code);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(flag) if flag == dsm::bench::DAEMON_FLAG => dsm::bench::daemon_child(&args[1..]),
        Some("--contender" | "--kernel-contender") => contender(&args),
        _ => {}
    }
    let (_latency_guard, mode) = hold_low_latency();
    let dir = std::env::temp_dir().join(format!("sem-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let (sockets, mut daemons) = start_daemons(&dir);
    let (node1, node2) = (connect_to(&sockets[0]), connect_to(&sockets[1]));
    let new_set = || {
        node1.get(0, 3, 0o600).unwrap_or_else(|e| {
            eprintln!("sem-bench: semget: {e}");
            std::process::exit(1)
        })
    };

    let local_set = new_set();
    pin_to_node(1);
    let local = stats(time_pv(&local_set, PV_ROUNDS));
    let remote_set = new_set();
    pin_to_node(2);
    let remote = stats(time_pv(&node2.open(remote_set.id()), PV_ROUNDS));
    unpin();
    let handoff_set = new_set();
    let exe = std::env::current_exe().expect("own path");
    pin_to_node(1);
    let handoff_per_s = handoffs(&handoff_set, || {
        std::process::Command::new(&exe)
            .arg("--contender")
            .arg(&sockets[1])
            .arg(handoff_set.id().to_string())
            .spawn()
            .expect("start the contender")
    });
    unpin();

    let kernel_set = KernelSet::new();
    let kernel = stats(time_pv(&kernel_set, PV_ROUNDS));
    let kernel_handoff_set = KernelSet::new();
    let kernel_handoff_per_s = handoffs(&kernel_handoff_set, || {
        std::process::Command::new(&exe)
            .arg("--kernel-contender")
            .arg(kernel_handoff_set.0.to_string())
            .spawn()
            .expect("start the contender")
    });
    for set in [&local_set, &remote_set, &handoff_set] {
        let _ = set.remove();
    }
    stop(&mut daemons, &dir);

    // Again with lending off: every operation of node 2 crosses to node 1.
    std::env::set_var("BENCH_SEM_LEND_AFTER", "0");
    let _ = std::fs::create_dir_all(&dir);
    let (sockets, mut daemons) = start_daemons(&dir);
    let (node1, node2) = (connect_to(&sockets[0]), connect_to(&sockets[1]));
    let fixed_set = node1.get(0, 3, 0o600).unwrap_or_else(|e| {
        eprintln!("sem-bench: semget: {e}");
        std::process::exit(1)
    });
    pin_to_node(2);
    let unlent = stats(time_pv(&node2.open(fixed_set.id()), PV_ROUNDS / 4));
    unpin();
    let _ = fixed_set.remove();
    stop(&mut daemons, &dir);

    println!("sem-bench: two dsmd on loopback, one per CPU; mode: {mode}");
    println!(
        "{:<44} {:>10} {:>10} {:>14}",
        "operation", "p50 µs", "p99 µs", "kernel p50 µs"
    );
    row("P+V uncontended, set homed on this node", &local, &kernel);
    row(
        "P+V uncontended, set homed on the other node",
        &remote,
        &kernel,
    );
    row(
        "  the same, lending off (--sem-lend-after 0)",
        &unlent,
        &kernel,
    );
    println!(
        "{:<44} {:>21.0} {:>14.0}",
        "mutex hand-offs between 2 nodes, per s", handoff_per_s, kernel_handoff_per_s
    );
    println!(
        "{{\"mode\":\"{}\",\"semop_local_p50_us\":{:.2},\"semop_local_p99_us\":{:.2},\"semop_remote_p50_us\":{:.2},\"semop_remote_p99_us\":{:.2},\"semop_remote_unlent_p50_us\":{:.2},\"semop_remote_unlent_p99_us\":{:.2},\"handoff_per_s\":{:.0},\"kernel_semop_p50_us\":{:.2},\"kernel_handoff_per_s\":{:.0}}}",
        if mode.starts_with("cpu_dma") { "low-latency" } else { "default" },
        local.p50_us, local.p99_us, remote.p50_us, remote.p99_us, unlent.p50_us, unlent.p99_us, handoff_per_s,
        kernel.p50_us, kernel_handoff_per_s
    );
}
