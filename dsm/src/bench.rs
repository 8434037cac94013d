//! Helpers the benchmark binaries (`dsm-bench`, `sem-bench`) share: two
//! daemons started as processes of their own (the benchmark binary run
//! again with `--daemon`), one per CPU as if each were a machine, the
//! low-latency mode, and latency statistics.

use crate::client::Client;
use crate::daemon::Config;
use crate::ids::NodeId;
use std::io::Write;
use std::time::{Duration, Instant};

/// The flag that makes a benchmark binary run as one of its daemons.
pub const DAEMON_FLAG: &str = "--daemon";

pub struct Stats {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// p50 and p99 of `samples`, in µs.
pub fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Stats {
        p50_us: at(0.5),
        p99_us: at(0.99),
    }
}

/// Keep the vCPUs out of deep idle while held (closing the file releases it).
pub fn hold_low_latency() -> (Option<std::fs::File>, &'static str) {
    match std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
    {
        Ok(mut f) => match f.write_all(&0i32.to_ne_bytes()) {
            Ok(()) => (Some(f), "cpu_dma_latency=0 (vCPUs kept out of deep idle)"),
            Err(_) => (None, "default idle states (cpu_dma_latency not writable)"),
        },
        Err(_) => (None, "default idle states (no /dev/cpu_dma_latency)"),
    }
}

fn daemon_config(n: u8, port: u16, dir: &std::path::Path) -> Config {
    let addr =
        |m: u8| -> std::net::SocketAddr { std::net::SocketAddr::from(([127, 0, 0, m], port)) };
    Config {
        node: NodeId(n),
        listen: addr(n),
        socket: dir.join(format!("node{n}.sock")),
        peers: (1..=2u8)
            .filter(|m| *m != n)
            .map(|m| (NodeId(m), addr(m)))
            .collect(),
        secret: None,
        balance: true,
        peer_timeout: Duration::from_secs(5),
        heartbeat: Duration::from_millis(500),
        sem_lend_after: std::env::var("BENCH_SEM_LEND_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(crate::daemon::sems::LEND_AFTER),
        cpus: crate::daemon::load::allowed_cpus(),
        cpus_given: false,
        speed: 1.0,
        low_latency: daemon_low_latency(),
    }
}

/// The daemons' `--low-latency` (default `auto`, as a user runs `dsmd`);
/// `BENCH_DSMD_LOW_LATENCY=off` measures what that mode saves.
fn daemon_low_latency() -> crate::daemon::wakeups::LowLatency {
    use crate::daemon::wakeups::LowLatency;
    match std::env::var("BENCH_DSMD_LOW_LATENCY").as_deref() {
        Ok("off") => LowLatency::Off,
        Ok("always") => LowLatency::Always,
        _ => LowLatency::Auto,
    }
}

/// Node N is CPU N-1, as if each node were a machine: its daemon runs there,
/// and so does the thread timing misses on node 2. (Left to the scheduler,
/// two daemons and the measuring thread on 2 vCPUs land differently from run
/// to run and the miss figures flip between two regimes, ≈ 31 and ≈ 42 µs.
/// Spinning ping-pong threads and the scan reader stay unpinned: sharing a
/// CPU with their node's daemon only slows those down.)
pub fn pin_to_node(node: u8) {
    set_affinity(Some(usize::from(node - 1)));
}

/// Undo `pin_to_node` for the calling thread.
pub fn unpin() {
    set_affinity(None);
}

fn set_affinity(cpu: Option<usize>) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it;
    // sched_setaffinity reads it and applies to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        match cpu {
            Some(c) => libc::CPU_SET(c % cpus, &mut set),
            None => (0..cpus).for_each(|c| libc::CPU_SET(c, &mut set)),
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `BENCH --daemon N PORT DIR`: one of the benchmark's two daemons, a
/// process of its own as `dsmd` is.
pub fn daemon_child(args: &[String]) -> ! {
    let n = args.first().and_then(|v| v.parse::<u8>().ok());
    let port = args.get(1).and_then(|v| v.parse::<u16>().ok());
    let (Some(n), Some(port), Some(dir)) = (n, port, args.get(2)) else {
        eprintln!("--daemon N PORT DIR");
        std::process::exit(2);
    };
    // End with the benchmark, however it ends.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and changes
    // nothing but this process's own death signal.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    if std::os::unix::process::parent_id() == 1 {
        std::process::exit(1); // the benchmark is already gone
    }
    pin_to_node(n);
    if let Err(e) = crate::daemon::run(daemon_config(n, port, std::path::Path::new(dir))) {
        eprintln!("benchmark daemon {n}: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// Start the two daemons (this binary again, as processes) and wait until
/// they see each other.
pub fn start_daemons(dir: &std::path::Path) -> (Vec<std::path::PathBuf>, Vec<std::process::Child>) {
    let port = 30000 + (std::process::id() % 20000) as u16;
    let exe = std::env::current_exe().expect("own path");
    let children: Vec<std::process::Child> = (1..=2u8)
        .map(|n| {
            std::process::Command::new(&exe)
                .arg(DAEMON_FLAG)
                .arg(n.to_string())
                .arg(port.to_string())
                .arg(dir)
                .spawn()
                .expect("start a daemon")
        })
        .collect();
    let sockets: Vec<std::path::PathBuf> = (1..=2u8)
        .map(|n| daemon_config(n, port, dir).socket)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    for s in &sockets {
        loop {
            let ready = Client::connect(s)
                .and_then(|c| c.nodes())
                .is_ok_and(|n| n.iter().all(|x| x.up));
            if ready {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("benchmark daemons did not come up");
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (sockets, children)
}

/// End a benchmark whose own process is still served by its daemons (it
/// holds attachments to the end): clean up, stop them by pid, and exit
/// before their guardian, seeing them gone, ends it as a process they
/// served.
pub fn stop_and_exit(daemons: &mut [std::process::Child], dir: &std::path::Path, code: i32) -> ! {
    let _ = std::fs::remove_dir_all(dir);
    for d in daemons.iter_mut() {
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    }
    std::process::exit(code);
}

/// Stop the daemons this benchmark started, by pid, and clean up.
pub fn stop(daemons: &mut [std::process::Child], dir: &std::path::Path) {
    for d in daemons.iter_mut() {
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    }
    for d in daemons.iter_mut() {
        let _ = d.wait();
    }
    let _ = std::fs::remove_dir_all(dir);
}
