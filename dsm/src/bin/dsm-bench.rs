//! `dsm-bench`: remote fault latency and throughput between two `dsmd` on
//! loopback, beside the same operations on plain kernel shared memory.
//! Prints a table, then (last line) one JSON object.
//!
//! The two daemons are this binary again (`--daemon`), each a process of its
//! own exactly as `dsmd` is, so the benchmark needs no other binary; sharing
//! one address space with the measured processes would add TLB shootdowns
//! that a real deployment does not have. Each daemon is pinned to a CPU of
//! its own, as on two machines.
//! While it runs it holds `/dev/cpu_dma_latency` at 0 when it can (vCPUs that
//! halt when idle add ~60 µs to every wake-up, DESIGN.md §8) and says so.

use dsm::bench::{hold_low_latency, pin_to_node, start_daemons, stats, stop, unpin};
use dsm::client::{Attachment, Client};
use dsm::ids::PAGE_SIZE;
use dsm::memfd::{Mapping, Memfd};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MISS_PAGES: usize = 4000;
const PINGPONG_ROUNDS: usize = 5000;
const SCAN_BYTES: usize = 64 << 20;
/// Scans per run; the median is reported.
const SCAN_RUNS: usize = 5;

/// A permutation of page indexes with no two neighbours adjacent, so
/// read-ahead never kicks in and every access is a real miss.
fn scattered(pages: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pages).collect();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..pages).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

fn word(base: *mut u8, page: usize) -> &'static AtomicU64 {
    // SAFETY: callers pass the base of a live mapping of at least page+1
    // pages that outlives the benchmark step.
    unsafe { &*(base.add(page * PAGE_SIZE) as *const AtomicU64) }
}

fn time_accesses(base: *mut u8, pages: usize, write: bool) -> Vec<Duration> {
    scattered(pages)
        .into_iter()
        .map(|p| {
            let t = Instant::now();
            if write {
                word(base, p).store(p as u64 + 1, SeqCst);
            } else {
                std::hint::black_box(word(base, p).load(SeqCst));
            }
            t.elapsed()
        })
        .collect()
}

/// Two threads alternately writing one word; returns time per hand-off.
fn pingpong(a: &'static AtomicU64, b: &'static AtomicU64, rounds: usize) -> Vec<Duration> {
    a.store(0, SeqCst);
    let other = std::thread::spawn(move || {
        for r in 0..rounds as u64 {
            while b.load(SeqCst) != 2 * r + 1 {
                std::thread::yield_now();
            }
            b.store(2 * r + 2, SeqCst);
        }
    });
    let mut samples = Vec::with_capacity(rounds);
    let mut last = Instant::now();
    for r in 0..rounds as u64 {
        a.store(2 * r + 1, SeqCst);
        while a.load(SeqCst) != 2 * r + 2 {
            std::thread::yield_now();
        }
        let now = Instant::now();
        samples.push((now - last) / 2);
        last = now;
    }
    let _ = other.join();
    samples
}

fn scan(base: *const u8, bytes: usize) -> f64 {
    let t = Instant::now();
    let mut sum = 0u64;
    for i in (0..bytes).step_by(8) {
        // SAFETY: inside a live mapping of `bytes` bytes.
        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(base.add(i) as *const u64) });
    }
    std::hint::black_box(sum);
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// CLOCK_MONOTONIC in seconds, to line the scan up with `perf record -k CLOCK_MONOTONIC`.
fn monotonic_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn leak<T>(v: T) -> &'static T {
    Box::leak(Box::new(v))
}

/// CPU time (ms) used so far by each daemon process.
fn daemon_cpu_ms(daemons: &[u32]) -> Vec<(String, u64)> {
    let tick_ms = 1000 / 100; // USER_HZ is 100 on Linux
    daemons
        .iter()
        .enumerate()
        .map(|(i, pid)| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let ticks: u64 = fields
                .get(11)
                .and_then(|u| u.parse::<u64>().ok())
                .unwrap_or(0)
                + fields
                    .get(12)
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
            (format!("dsmd node {}", i + 1), ticks * tick_ms)
        })
        .collect()
}

/// Write 64 MiB from node 1, then time a process on node 2 reading it all
/// once: (MB/s, faults served, data correct).
fn remote_scan(
    node_a: &Client,
    node_b: &Client,
    socket_b: &std::path::Path,
    daemons: &[u32],
) -> (f64, u64, bool) {
    let faults = || {
        node_b
            .status()
            .map(|v| v.iter().map(|s| s.faults_served).sum::<u64>())
            .unwrap_or(0)
    };
    let scan_id = node_a
        .get(0, SCAN_BYTES as u64, 0o600)
        .expect("create the scan segment");
    let writer = node_a.attach(scan_id, false).expect("attach on node 1");
    for p in 0..SCAN_BYTES / PAGE_SIZE {
        word(writer.as_ptr(), p).store(p as u64, SeqCst);
    }
    let before = faults();
    let cpu0 = daemon_cpu_ms(daemons);
    let verbose = std::env::var_os("DSM_BENCH_VERBOSE").is_some();
    if verbose {
        eprintln!("  scan: starts at {:.6} s (CLOCK_MONOTONIC)", monotonic_s());
    }
    let child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .arg("--scan-child")
        .arg(socket_b)
        .arg(scan_id.to_string())
        .output()
        .expect("run the scan child");
    let scan_faults = faults() - before;
    if verbose {
        eprintln!("  scan: ends at {:.6} s (CLOCK_MONOTONIC)", monotonic_s());
        for ((name, a), (_, b)) in cpu0.iter().zip(&daemon_cpu_ms(daemons)) {
            eprintln!("  scan: {name} used {} ms of CPU", b - a);
        }
    }
    let out = String::from_utf8_lossy(&child.stdout);
    let mut fields = out.split_whitespace();
    let mb_s: f64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let ok = fields.next() == Some("true");
    drop(writer);
    let _ = node_a.remove(scan_id);
    (mb_s, scan_faults, ok)
}

/// `dsm-bench --scan-child SOCKET ID`: attach segment ID through the daemon
/// at SOCKET, read it all once, check it, print MB/s. A process of its own,
/// as a reader on another node would be (sharing an address space with the
/// writer would add TLB shootdowns a real deployment does not have).
fn scan_child(args: &[String]) -> ! {
    let (Some(socket), Some(id)) = (
        args.first(),
        args.get(1).and_then(|s| s.parse::<i32>().ok()),
    ) else {
        eprintln!("dsm-bench: --scan-child SOCKET ID");
        std::process::exit(2);
    };
    let client = Client::connect(socket).unwrap_or_else(|e| {
        eprintln!("dsm-bench: scan child: {e}");
        std::process::exit(1)
    });
    let seg = client.attach(id, true).unwrap_or_else(|e| {
        eprintln!("dsm-bench: scan child attach: {e}");
        std::process::exit(1)
    });
    let mb_s = scan(seg.as_ptr(), SCAN_BYTES);
    let ok = (0..SCAN_BYTES / PAGE_SIZE).all(|p| word(seg.as_ptr(), p).load(SeqCst) == p as u64);
    println!("{mb_s:.0} {ok}");
    std::process::exit(0);
}

fn main() {
    // Its daemons' guardians may be this binary started again.
    if let Some(code) = dsm::guardian::serve_if_asked() {
        std::process::exit(code);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--scan-child") {
        scan_child(&args[1..]);
    }
    if args.first().is_some_and(|a| a == dsm::bench::DAEMON_FLAG) {
        dsm::bench::daemon_child(&args[1..]);
    }
    let (_latency_guard, mode) = hold_low_latency();
    let dir = std::env::temp_dir().join(format!("dsm-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let (sockets, mut daemons) = start_daemons(&dir);
    let daemon_pids: Vec<u32> = daemons.iter().map(|c| c.id()).collect();
    let node_a = Client::connect(&sockets[0]).expect("connect node 1");
    let node_b = Client::connect(&sockets[1]).expect("connect node 2");
    let seg = |bytes: usize| -> (Attachment, Attachment) {
        let id = node_a
            .get(0, bytes as u64, 0o600)
            .expect("create segment on node 1");
        let on_a = node_a.attach(id, false).expect("attach on node 1");
        let on_b = node_b.attach(id, false).expect("attach on node 2");
        node_a.remove(id).expect("mark for removal");
        (on_a, on_b)
    };

    // First sequential read of 64 MiB homed (and written) on node 1, by a
    // process on node 2; the median of five fresh segments (one run on
    // this 2-vCPU VM varies by a factor of two).
    let cpu_before = daemon_cpu_ms(&daemon_pids);
    let mut scans: Vec<(f64, u64, bool)> = (0..SCAN_RUNS)
        .map(|_| remote_scan(&node_a, &node_b, &sockets[1], &daemon_pids))
        .collect();
    let cpu_after = daemon_cpu_ms(&daemon_pids);
    scans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (scan_mb_s, scan_faults, _) = scans[SCAN_RUNS / 2];
    let resident_ok = scans.iter().all(|s| s.2);
    if std::env::args().any(|a| a == "--scan-only") {
        println!(
            "first scan of 64 MiB (median of {SCAN_RUNS}): {scan_mb_s:.0} MB/s, {scan_faults} faults, data {}",
            if resident_ok { "ok" } else { "MISMATCH" }
        );
        for ((name, before), (_, after)) in cpu_before.iter().zip(&cpu_after) {
            println!(
                "  {name}: {} ms of CPU for {SCAN_RUNS} scans (incl. the writes)",
                after - before
            );
        }
        stop(&mut daemons, &dir);
        std::process::exit(0);
    }

    // Remote misses: node 2 touches pages homed on node 1.
    let (_ha, read_b) = seg(MISS_PAGES * PAGE_SIZE);
    let (_hw, write_b) = seg(MISS_PAGES * PAGE_SIZE);
    pin_to_node(2);
    let read_miss = stats(time_accesses(read_b.as_ptr(), MISS_PAGES, false));
    let write_miss = stats(time_accesses(write_b.as_ptr(), MISS_PAGES, true));
    unpin();
    // Hand-offs of one word between the nodes.
    let (pa, pb) = seg(PAGE_SIZE);
    let ping = stats(pingpong(
        leak(pa).atomic_u64(0),
        leak(pb).atomic_u64(0),
        PINGPONG_ROUNDS,
    ));
    // The same on plain kernel shared memory (one node, no coherence).
    let kernel_seg = |bytes: usize, fill: bool| {
        let memfd = Memfd::create("bench-kernel", bytes as u64).expect("memfd");
        if fill {
            let chunk = vec![1u8; 1 << 20];
            for off in (0..bytes).step_by(chunk.len()) {
                memfd.write_at(off as u64, &chunk).expect("fill");
            }
        }
        Mapping::map(memfd.as_fd(), bytes, true, None).expect("map")
    };
    let k_read = kernel_seg(MISS_PAGES * PAGE_SIZE, true);
    let k_read_miss = stats(time_accesses(k_read.as_ptr(), MISS_PAGES, false));
    let k_write = kernel_seg(MISS_PAGES * PAGE_SIZE, false);
    let k_write_miss = stats(time_accesses(k_write.as_ptr(), MISS_PAGES, true));
    let k_ping_map = Arc::new(kernel_seg(PAGE_SIZE, false));
    let k_word: &'static AtomicU64 = word(k_ping_map.as_ptr(), 0);
    let k_ping = stats(pingpong(k_word, k_word, PINGPONG_ROUNDS));
    let k_scan_map = kernel_seg(SCAN_BYTES, true);
    let k_scan = scan(k_scan_map.as_ptr(), SCAN_BYTES);

    println!("dsm-bench: two dsmd on loopback, one per CPU; mode: {mode}");
    println!(
        "{:<34} {:>12} {:>12} {:>14}",
        "operation", "p50 µs", "p99 µs", "kernel p50 µs"
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>14.2}",
        "read miss (page homed remotely)", read_miss.p50_us, read_miss.p99_us, k_read_miss.p50_us
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>14.2}",
        "write miss (page homed remotely)",
        write_miss.p50_us,
        write_miss.p99_us,
        k_write_miss.p50_us
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>14.2}",
        "ping-pong hand-off (one word)", ping.p50_us, ping.p99_us, k_ping.p50_us
    );
    println!(
        "{:<34} {:>12.0} {:>12} {:>14.0}",
        "first scan of 64 MiB, MB/s (median of 5)", scan_mb_s, "", k_scan
    );
    println!(
        "faults during the scan: {scan_faults}; data check after the scan: {}",
        if resident_ok { "ok" } else { "MISMATCH" }
    );
    println!(
        "{{\"mode\":\"{}\",\"read_miss_p50_us\":{:.1},\"read_miss_p99_us\":{:.1},\"write_miss_p50_us\":{:.1},\"write_miss_p99_us\":{:.1},\"pingpong_p50_us\":{:.1},\"pingpong_p99_us\":{:.1},\"scan_mb_s\":{:.0},\"kernel_read_fault_p50_us\":{:.2},\"kernel_write_fault_p50_us\":{:.2},\"kernel_pingpong_p50_us\":{:.2},\"kernel_scan_mb_s\":{:.0},\"data_ok\":{}}}",
        if mode.starts_with("cpu_dma") { "low-latency" } else { "default" },
        read_miss.p50_us, read_miss.p99_us, write_miss.p50_us, write_miss.p99_us, ping.p50_us, ping.p99_us, scan_mb_s,
        k_read_miss.p50_us, k_write_miss.p50_us, k_ping.p50_us, k_scan, resident_ok
    );
    stop(&mut daemons, &dir);
    std::process::exit(if resident_ok { 0 } else { 1 });
}
