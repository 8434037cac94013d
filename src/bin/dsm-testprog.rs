//! Roles the integration tests run as separate processes on different nodes.
//! The node is the daemon named by `DSMD_SOCKET`. Exit status 0 means the
//! role saw what it expected; a failure prints why and exits 1.
//!
//!   add KEY ITERS [PROCS]     wait for PROCS arrivals, then fetch_add(1)
//!                             ITERS times on word 0
//!   mp-write KEY ROUNDS       data words 1..=8, then flag word 0, wait for ack
//!   mp-read KEY ROUNDS        spin on the flag, check data, then ack
//!   fork KEY ITERS            fork; parent and child each add ITERS; the child
//!                             then waits to see word 2 written by another node
//!   post KEY                  wait for word 1 != 0, then write word 2 = 99
//!   scan KEY PAGES [PARITY]   read (and write: only pages of PARITY if
//!                             given) one word of every page, forever
//!   write-page KEY PAGE VALUE write VALUE to the first word of PAGE
//!   read-page KEY PAGE        print the first word of PAGE
//!   read KEY                  print word 0
//!   fill KEY PAGES BYTE       write BYTE into every byte of PAGES pages
//!   lin KEY PAGES WFIRST WLAST RFIRST RLAST MS LOG [PERIOD_US]
//!                             for MS ms, one operation per PERIOD_US (10):
//!                             write increasing values into the
//!                             first word of pages WFIRST..WLAST and read
//!                             pages RFIRST..RLAST at random, logging each
//!                             write (value, end time) and read (value,
//!                             start time) into LOG (see `migshm::linlog`)
//!   check-random KEY PAGES BYTE [write]
//!                             read (and with `write`, rewrite) random words
//!                             of random pages forever; each must be BYTE
//!                             repeated, else print `BAD ...` and exit 3

use dsm::client::{Client, IPC_CREAT};
use std::process::ExitCode;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

fn fail(msg: String) -> ExitCode {
    eprintln!("dsm-testprog: {msg}");
    ExitCode::FAILURE
}

fn arg(args: &[String], i: usize) -> u64 {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        eprintln!("dsm-testprog: missing or bad argument {i}");
        std::process::exit(2)
    })
}

const WORDS_PER_PAGE: usize = 512;

/// `probe get KEY SIZE FLAGS_OCTAL` / `probe attach ID ro|rw` /
/// `probe rmid ID`: print the id or `ok`, or `errno N`.
fn probe(client: &Client, args: &[String]) -> ExitCode {
    let what = args.get(1).map(String::as_str).unwrap_or("");
    let num = |i: usize| args.get(i).and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    let result = match what {
        "get" => {
            let flags = args
                .get(4)
                .and_then(|s| i32::from_str_radix(s, 8).ok())
                .unwrap_or(0);
            client
                .get(num(2) as i32, num(3) as u64, flags)
                .map(|id| id.to_string())
        }
        "attach" => client
            .attach(num(2) as i32, args.get(3).is_some_and(|s| s == "ro"))
            .map(|_| "ok".to_string()),
        "rmid" => client.remove(num(2) as i32).map(|_| "ok".to_string()),
        _ => return fail(format!("unknown probe {what:?}")),
    };
    match result {
        Ok(s) => println!("{s}"),
        Err(e) => println!("errno {}", e.errno()),
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let client = match Client::connect_default() {
        Ok(c) => c,
        Err(e) => return fail(format!("connect: {e}")),
    };
    let role = args.first().map(String::as_str).unwrap_or("");
    if role == "probe" {
        return probe(&client, &args);
    }
    let key = arg(&args, 1) as i32;
    let size: u64 = match role {
        "scan" | "write-page" | "read-page" => 256 * 4096,
        "fill" | "check-random" | "lin" => arg(&args, 2) * 4096,
        _ => 4096,
    };
    let id = match client.get(key, size, IPC_CREAT | 0o666) {
        Ok(id) => id,
        Err(e) => return fail(format!("shmget: {e}")),
    };
    let seg = match client.attach(id, false) {
        Ok(s) => s,
        Err(e) => return fail(format!("shmat: {e}")),
    };
    let words = seg.atomics_u64();
    match role {
        "add" => {
            // Start together: word 1 counts arrivals.
            let procs = args.get(3).and_then(|s| s.parse::<u64>().ok()).unwrap_or(1);
            words[1].fetch_add(1, SeqCst);
            let deadline = Instant::now() + Duration::from_secs(30);
            while words[1].load(SeqCst) < procs {
                if Instant::now() > deadline {
                    return fail("the other processes never arrived".into());
                }
                std::hint::spin_loop();
            }
            for _ in 0..arg(&args, 2) {
                words[0].fetch_add(1, SeqCst);
            }
        }
        "mp-write" => {
            for round in 1..=arg(&args, 2) {
                for i in 1..=8u64 {
                    words[i as usize].store(round * 1000 + i, SeqCst);
                }
                words[0].store(round, SeqCst);
                let deadline = Instant::now() + Duration::from_secs(30);
                while words[9].load(SeqCst) != round {
                    if Instant::now() > deadline {
                        return fail(format!("no ack for round {round}"));
                    }
                    std::hint::spin_loop();
                }
            }
        }
        "mp-read" => {
            for round in 1..=arg(&args, 2) {
                let deadline = Instant::now() + Duration::from_secs(30);
                while words[0].load(SeqCst) < round {
                    if Instant::now() > deadline {
                        return fail(format!("flag never reached round {round}"));
                    }
                    std::hint::spin_loop();
                }
                for i in 1..=8u64 {
                    let seen = words[i as usize].load(SeqCst);
                    if seen != round * 1000 + i {
                        return fail(format!(
                            "round {round}: word {i} = {seen}, stale (want {})",
                            round * 1000 + i
                        ));
                    }
                }
                words[9].store(round, SeqCst);
            }
        }
        "fork" => {
            let iters = arg(&args, 2);
            // SAFETY: fork in a single-threaded program; the child only uses
            // the segment and exits.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return fail("fork failed".into());
            }
            for _ in 0..iters {
                words[0].fetch_add(1, SeqCst);
            }
            if pid == 0 {
                words[1].store(u64::from(std::process::id()), SeqCst);
                let deadline = Instant::now() + Duration::from_secs(30);
                while words[2].load(SeqCst) != 99 {
                    if Instant::now() > deadline {
                        eprintln!("dsm-testprog: child never saw word 2 from the other node");
                        std::process::exit(1);
                    }
                    std::hint::spin_loop();
                }
                drop(seg);
                std::process::exit(0);
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                return fail(format!("child ended with status {status:#x}"));
            }
        }
        "post" => {
            let deadline = Instant::now() + Duration::from_secs(30);
            while words[1].load(SeqCst) == 0 {
                if Instant::now() > deadline {
                    return fail("word 1 never set".into());
                }
                std::hint::spin_loop();
            }
            words[2].store(99, SeqCst);
        }
        "scan" => {
            let pages = arg(&args, 2) as usize;
            // With a parity, write only the pages of that parity and read
            // the others: two scanners of opposite parities on two nodes
            // then need each other's writes on every pass, so neither can
            // ever hold every page it touches.
            let parity = args.get(3).and_then(|s| s.parse::<usize>().ok());
            let mut sum = 0u64;
            println!("scanning");
            loop {
                for p in 0..pages {
                    sum = sum.wrapping_add(words[p * WORDS_PER_PAGE].load(SeqCst));
                    if parity.is_none_or(|q| p % 2 == q) {
                        words[p * WORDS_PER_PAGE].store(sum, SeqCst);
                    }
                }
            }
        }
        "write-page" => {
            let page = arg(&args, 2) as usize;
            words[page * WORDS_PER_PAGE].store(arg(&args, 3), SeqCst);
        }
        "read" => println!("{}", words[0].load(SeqCst)),
        "fill" => {
            let pattern = u64::from_ne_bytes([arg(&args, 3) as u8; 8]);
            for w in words {
                w.store(pattern, SeqCst);
            }
        }
        "lin" => {
            let range = |a: usize, b: usize| arg(&args, a) as usize..arg(&args, b) as usize;
            let (writes, reads) = (range(3, 4), range(5, 6));
            let until = Instant::now() + Duration::from_millis(arg(&args, 7));
            let path = args.get(8).map(String::as_str).unwrap_or("lin.log");
            let mut log = match migshm::linlog::Log::create(std::path::Path::new(path)) {
                Ok(l) => l,
                Err(e) => return fail(format!("log {path}: {e}")),
            };
            let mut next = vec![0u64; writes.end.max(1)];
            let mut x = u64::from(std::process::id()) | 1;
            println!("running");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            // About one operation per 10 µs, so the log holds a whole run.
            let period_ns = args
                .get(9)
                .and_then(|p| p.parse::<u64>().ok())
                .unwrap_or(10)
                * 1000;
            let mut next_op = migshm::linlog::now_ns();
            while Instant::now() < until && !log.is_full() {
                while migshm::linlog::now_ns() < next_op {
                    std::hint::spin_loop();
                }
                next_op += period_ns;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if !writes.is_empty() && x % 3 == 0 {
                    let page = writes.start + (x >> 8) as usize % writes.len();
                    next[page] += 1;
                    words[page * WORDS_PER_PAGE].store(next[page], SeqCst);
                    log.wrote(page as u32, next[page]);
                } else if !reads.is_empty() {
                    let page = reads.start + (x >> 8) as usize % reads.len();
                    let started = migshm::linlog::now_ns();
                    let seen = words[page * WORDS_PER_PAGE].load(SeqCst);
                    log.read(page as u32, seen, started);
                }
            }
        }
        "check-random" => {
            let pattern = u64::from_ne_bytes([arg(&args, 3) as u8; 8]);
            let write = args.get(4).is_some_and(|a| a == "write");
            let mut x = u64::from(std::process::id()) | 1;
            let mut checked = 0u64;
            println!("checking");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            loop {
                // xorshift64: a different walk per process.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % words.len() as u64) as usize;
                let seen = words[i].load(SeqCst);
                if seen != pattern {
                    println!(
                        "BAD page {} word {} value {seen:#x} after {checked} good reads",
                        i / WORDS_PER_PAGE,
                        i % WORDS_PER_PAGE
                    );
                    let _ = std::io::stdout().flush();
                    std::process::exit(3);
                }
                if write && x & 3 == 0 {
                    words[i].store(pattern, SeqCst);
                }
                checked += 1;
            }
        }
        "read-page" => {
            let page = arg(&args, 2) as usize;
            println!("{}", words[page * WORDS_PER_PAGE].load(SeqCst));
        }
        other => return fail(format!("unknown role {other:?}")),
    }
    println!("ok");
    ExitCode::SUCCESS
}
