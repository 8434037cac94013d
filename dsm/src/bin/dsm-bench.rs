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

use dsm::bench::{hold_low_latency, pin_to_node, start_daemons, stats, stop_and_exit, unpin};
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
/// A new segment's first touch, one word a page (what initialising a
/// buffer pool costs); the median of this many fresh segments.
const FIRST_TOUCH_BYTES: usize = 256 << 20;
const FIRST_TOUCH_RUNS: usize = 3;
/// Segment sizes whose `shmget` + `shmat` is timed.
const CREATE_SIZES: [(u64, &str); 2] = [(1 << 30, "1 GiB"), (4 << 30, "4 GiB")];
/// The segment whose daemon memory per touched page is measured, touched
/// at 1 % of its pages.
const TABLE_SEGMENT_BYTES: u64 = 4 << 30;
const TABLE_TOUCH_STRIDE: usize = 100;

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

/// Write one word to every page of `base`, in order: MB/s.
fn first_touch(base: *mut u8, bytes: usize) -> f64 {
    let t = Instant::now();
    for p in 0..bytes / PAGE_SIZE {
        word(base, p).store(p as u64 + 1, SeqCst);
    }
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// First touch of new segments homed on node 1, by a process attached
/// through `toucher` (node 1 itself, or node 2): median MB/s, and whether
/// every page reads back what was written.
fn segment_first_touch(home: &Client, toucher: &Client) -> (f64, bool) {
    let mut rates = Vec::new();
    let mut ok = true;
    for _ in 0..FIRST_TOUCH_RUNS {
        let id = home
            .get(0, FIRST_TOUCH_BYTES as u64, 0o600)
            .expect("create the first-touch segment");
        let seg = toucher
            .attach(id, false)
            .expect("attach the first-touch segment");
        rates.push(first_touch(seg.as_ptr(), FIRST_TOUCH_BYTES));
        ok &= (0..FIRST_TOUCH_BYTES / PAGE_SIZE)
            .all(|p| word(seg.as_ptr(), p).load(SeqCst) == p as u64 + 1);
        drop(seg);
        let _ = home.remove(id);
    }
    (median(rates), ok)
}

/// The same on plain kernel shared memory (a new memfd each time).
fn kernel_first_touch() -> f64 {
    median(
        (0..FIRST_TOUCH_RUNS)
            .map(|_| {
                let memfd =
                    Memfd::create("bench-first-touch", FIRST_TOUCH_BYTES as u64).expect("memfd");
                let map = Mapping::map(memfd.as_fd(), FIRST_TOUCH_BYTES, true, None).expect("map");
                first_touch(map.as_ptr(), FIRST_TOUCH_BYTES)
            })
            .collect(),
    )
}

/// `shmget` + `shmat` of a new segment of `bytes` on node 1: ms.
fn create_and_attach_ms(node: &Client, bytes: u64) -> f64 {
    let t = Instant::now();
    let id = node.get(0, bytes, 0o600).expect("create a large segment");
    let seg = node.attach(id, false).expect("attach a large segment");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    drop(seg);
    let _ = node.remove(id);
    ms
}

/// The kernel's own `shmget` + `shmat` of `bytes`: ms.
fn kernel_create_and_attach_ms(bytes: u64) -> f64 {
    let t = Instant::now();
    // SAFETY: a private SysV segment made, attached, detached and removed
    // here; nothing else refers to it.
    unsafe {
        let id = libc::shmget(libc::IPC_PRIVATE, bytes as usize, libc::IPC_CREAT | 0o600);
        if id < 0 {
            return f64::NAN;
        }
        let addr = libc::shmat(id, std::ptr::null(), 0);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if addr as isize != -1 {
            libc::shmdt(addr);
        }
        libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
        ms
    }
}

/// The figures of a new segment's life: first touch, creation, and what
/// its touched pages cost the daemon.
struct NewSegmentRows {
    touch_home_mb_s: f64,
    touch_remote_mb_s: f64,
    kernel_touch_mb_s: f64,
    touch_ok: bool,
    /// Per entry of `CREATE_SIZES`: (migshm ms, kernel ms).
    create_ms: Vec<(f64, f64)>,
    /// (page-table bytes, RssAnon bytes) per touched page.
    sequential: (f64, f64),
    strided: (f64, f64),
}

fn new_segment_rows(node_a: &Client, node_b: &Client, home_daemon: u32) -> NewSegmentRows {
    // First, while the daemon's heap has not yet grown for anything else,
    // so that its RssAnon shows what the tables take.
    let sequential = bytes_per_touched_page(node_a, home_daemon, false);
    let strided = bytes_per_touched_page(node_a, home_daemon, true);
    let (touch_home_mb_s, home_ok) = segment_first_touch(node_a, node_a);
    let (touch_remote_mb_s, remote_ok) = segment_first_touch(node_a, node_b);
    let create_ms = CREATE_SIZES
        .iter()
        .map(|(bytes, _)| {
            let ours = median(
                (0..3)
                    .map(|_| create_and_attach_ms(node_a, *bytes))
                    .collect(),
            );
            let kernel = median(
                (0..3)
                    .map(|_| kernel_create_and_attach_ms(*bytes))
                    .collect(),
            );
            (ours, kernel)
        })
        .collect();
    NewSegmentRows {
        touch_home_mb_s,
        touch_remote_mb_s,
        kernel_touch_mb_s: kernel_first_touch(),
        touch_ok: home_ok && remote_ok,
        create_ms,
        sequential,
        strided,
    }
}

impl NewSegmentRows {
    fn print(&self) {
        println!("{:<44} {:>12} {:>12}", "new segment", "migshm", "kernel");
        println!(
            "{:<44} {:>12.0} {:>12.0}",
            "first touch 256 MiB on its home, MB/s", self.touch_home_mb_s, self.kernel_touch_mb_s
        );
        println!(
            "{:<44} {:>12.0} {:>12.0}",
            "first touch 256 MiB from node 2, MB/s", self.touch_remote_mb_s, self.kernel_touch_mb_s
        );
        for ((_, name), (ours, kernel)) in CREATE_SIZES.iter().zip(&self.create_ms) {
            println!(
                "{:<44} {:>12.3} {:>12.3}",
                format!("shmget + shmat of {name}, ms"),
                ours,
                kernel
            );
        }
        for (label, (table, rss)) in [
            ("sequential", self.sequential),
            ("every 100th page", self.strided),
        ] {
            println!(
                "{:<44} {:>12}",
                format!("daemon bytes per touched page ({label})"),
                format!("{table:.1} / {rss:.1}")
            );
        }
        println!(
            "(bytes per page: page tables / growth of the home daemon's RssAnon, 4 GiB segment touched at 1 %; first-touch data {})",
            if self.touch_ok { "ok" } else { "MISMATCH" }
        );
    }

    fn json(&self) -> String {
        let mut fields = vec![
            format!("\"first_touch_home_mb_s\":{:.0}", self.touch_home_mb_s),
            format!("\"first_touch_remote_mb_s\":{:.0}", self.touch_remote_mb_s),
            format!("\"kernel_first_touch_mb_s\":{:.0}", self.kernel_touch_mb_s),
            format!("\"first_touch_ok\":{}", self.touch_ok),
        ];
        for ((bytes, _), (ours, kernel)) in CREATE_SIZES.iter().zip(&self.create_ms) {
            let gib = bytes >> 30;
            fields.push(format!("\"shmget_shmat_{gib}g_ms\":{ours:.3}"));
            fields.push(format!("\"kernel_shmget_shmat_{gib}g_ms\":{kernel:.3}"));
        }
        fields.push(format!(
            "\"table_bytes_per_touched_page\":{:.1}",
            self.sequential.0.max(self.strided.0)
        ));
        fields.push(format!(
            "\"rss_bytes_per_touched_page\":{:.1}",
            self.sequential.1.max(self.strided.1)
        ));
        fields.join(",")
    }
}

/// A daemon's anonymous memory (heap), in bytes.
fn rss_anon_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Node 1's page-table bytes, as `omctl status` shows them.
fn table_bytes(node: &Client) -> u64 {
    node.status()
        .ok()
        .and_then(|v| v.iter().find(|s| s.node == 1).map(|s| s.table_bytes))
        .unwrap_or(0)
}

/// Daemon memory per touched page of a 4 GiB segment homed on node 1 and
/// touched at 1 % of its pages by a process on node 1 (`strided`: every
/// 100th page; otherwise the first 1 %): (page-table bytes, RssAnon
/// growth) per touched page, of node 1's daemon.
fn bytes_per_touched_page(node: &Client, daemon: u32, strided: bool) -> (f64, f64) {
    let pages = (TABLE_SEGMENT_BYTES as usize) / PAGE_SIZE;
    let touched: Vec<usize> = if strided {
        (0..pages).step_by(TABLE_TOUCH_STRIDE).collect()
    } else {
        (0..pages / TABLE_TOUCH_STRIDE).collect()
    };
    let (table0, rss0) = (table_bytes(node), rss_anon_bytes(daemon));
    let id = node
        .get(0, TABLE_SEGMENT_BYTES, 0o600)
        .expect("create the 4 GiB segment");
    let seg = node.attach(id, false).expect("attach the 4 GiB segment");
    for &p in &touched {
        word(seg.as_ptr(), p).store(1, SeqCst);
    }
    let (table1, rss1) = (table_bytes(node), rss_anon_bytes(daemon));
    drop(seg);
    let _ = node.remove(id);
    let n = touched.len() as f64;
    (
        table1.saturating_sub(table0) as f64 / n,
        rss1.saturating_sub(rss0) as f64 / n,
    )
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
    let default_idle = args.iter().any(|a| a == "--default-idle");
    let (_latency_guard, mode) = if default_idle {
        (None, "default idle states (as a user runs dsmd)")
    } else {
        hold_low_latency()
    };
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

    if args.iter().any(|a| a == "--new-segment-only") {
        let rows = new_segment_rows(&node_a, &node_b, daemon_pids[0]);
        println!("dsm-bench: two dsmd on loopback, one per CPU; mode: {mode}");
        rows.print();
        println!("{{{}}}", rows.json());
        stop_and_exit(&mut daemons, &dir, if rows.touch_ok { 0 } else { 1 });
    }

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
        stop_and_exit(&mut daemons, &dir, 0);
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
    drop(k_scan_map);
    let new_segment = new_segment_rows(&node_a, &node_b, daemon_pids[0]);

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
    new_segment.print();
    let all_ok = resident_ok && new_segment.touch_ok;
    println!(
        "{{\"mode\":\"{}\",\"read_miss_p50_us\":{:.1},\"read_miss_p99_us\":{:.1},\"write_miss_p50_us\":{:.1},\"write_miss_p99_us\":{:.1},\"pingpong_p50_us\":{:.1},\"pingpong_p99_us\":{:.1},\"scan_mb_s\":{:.0},\"kernel_read_fault_p50_us\":{:.2},\"kernel_write_fault_p50_us\":{:.2},\"kernel_pingpong_p50_us\":{:.2},\"kernel_scan_mb_s\":{:.0},{},\"data_ok\":{}}}",
        if mode.starts_with("cpu_dma") { "low-latency" } else { "default" },
        read_miss.p50_us, read_miss.p99_us, write_miss.p50_us, write_miss.p99_us, ping.p50_us, ping.p99_us, scan_mb_s,
        k_read_miss.p50_us, k_write_miss.p50_us, k_ping.p50_us, k_scan, new_segment.json(), all_ok
    );
    stop_and_exit(&mut daemons, &dir, if all_ok { 0 } else { 1 });
}
