//! Semaphore roles the integration tests run as separate processes on
//! different nodes (the node is the daemon named by `DSMD_SOCKET`). Exit
//! status 0 means the role saw what it expected; a failure prints why.
//!
//!   mutex SET SEG ITERS PROCS  wait for PROCS arrivals (word 1 of segment
//!                              SEG), then ITERS times: P, a plain read of
//!                              word 0, a pause, a plain write of it + 1, V
//!   p SET [undo] [TIMEOUT_MS]  one P on semaphore 0; prints `ok` or `errno N`
//!   hold SET [WARMUP]          WARMUP P+V pairs, then P (all SEM_UNDO), then
//!                              sleep until killed
//!   p-interruptible SET        P with a SIGUSR1 handler installed (no
//!                              SA_RESTART); prints `ok` or `errno N`
//!   timed-p-loop SET MS US     P's of US µs timeout each for MS ms; prints
//!                              how many succeeded
//!   v SET N [GAP_US]           N V's, with irregular pauses below GAP_US
//!   stall SET                  take the set's fast-path lock, stop itself
//!                              (SIGSTOP), and on SIGCONT let go and exit
//!   probe get KEY NSEMS FLAGS_OCTAL | probe op SET NUM OP | probe setval
//!     SET NUM VALUE | probe rmid SET | probe perm SET MODE_OCTAL
//!                              print the result or `errno N`

use dsm::client::Client;
use semaphore::{SemBuf, Semaphores, SEM_UNDO};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn fail(msg: String) -> ExitCode {
    eprintln!("sem-testprog: {msg}");
    ExitCode::FAILURE
}

fn arg(args: &[String], i: usize) -> i64 {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        eprintln!("sem-testprog: missing or bad argument {i}");
        std::process::exit(2)
    })
}

fn p(undo: bool) -> [SemBuf; 1] {
    [SemBuf {
        num: 0,
        op: -1,
        flags: if undo { SEM_UNDO } else { 0 },
    }]
}

fn v(undo: bool) -> [SemBuf; 1] {
    [SemBuf {
        num: 0,
        op: 1,
        flags: if undo { SEM_UNDO } else { 0 },
    }]
}

fn print_result<T: std::fmt::Display>(r: Result<T, semaphore::Error>) {
    match r {
        Ok(x) => println!("{x}"),
        Err(e) => println!("errno {}", e.errno()),
    }
}

extern "C" fn on_sigusr1(_: i32) {}

fn mutex(sems: &Semaphores, args: &[String]) -> ExitCode {
    let set = sems.open(arg(args, 1) as i32);
    let segments = match Client::connect_default() {
        Ok(c) => c,
        Err(e) => return fail(format!("connect: {e}")),
    };
    let seg = match segments.attach(arg(args, 2) as i32, false) {
        Ok(a) => a,
        Err(e) => return fail(format!("attach: {e}")),
    };
    let (iters, procs) = (arg(args, 3), arg(args, 4) as u64);
    // Start together, so the processes really contend.
    seg.atomic_u64(1)
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while seg.atomic_u64(1).load(std::sync::atomic::Ordering::SeqCst) < procs {
        if Instant::now() > deadline {
            return fail("the other processes never arrived".into());
        }
        std::thread::yield_now();
    }
    for _ in 0..iters {
        if let Err(e) = set.op(&p(true)) {
            return fail(format!("P: {e}"));
        }
        // A plain read-modify-write: only the semaphore keeps it exact.
        let mut word = [0u8; 8];
        seg.read(0, &mut word);
        let value = u64::from_ne_bytes(word);
        for _ in 0..200 {
            std::hint::spin_loop();
        }
        seg.write(0, &(value + 1).to_ne_bytes());
        if let Err(e) = set.op(&v(true)) {
            return fail(format!("V: {e}"));
        }
    }
    ExitCode::SUCCESS
}

fn probe(sems: &Semaphores, args: &[String]) -> ExitCode {
    let what = args.get(1).map(String::as_str).unwrap_or("");
    let octal = |i: usize| {
        args.get(i)
            .and_then(|s| i32::from_str_radix(s, 8).ok())
            .unwrap_or(0)
    };
    match what {
        "get" => print_result(
            sems.get(arg(args, 2) as i32, arg(args, 3) as i32, octal(4))
                .map(|s| s.id()),
        ),
        "op" => print_result(
            sems.open(arg(args, 2) as i32)
                .op(&[SemBuf {
                    num: arg(args, 3) as u16,
                    op: arg(args, 4) as i16,
                    flags: semaphore::IPC_NOWAIT,
                }])
                .map(|()| "ok"),
        ),
        "setval" => print_result(
            sems.open(arg(args, 2) as i32)
                .set_value(arg(args, 3) as i32, arg(args, 4) as i32)
                .map(|()| "ok"),
        ),
        "rmid" => print_result(sems.open(arg(args, 2) as i32).remove().map(|()| "ok")),
        "perm" => print_result(
            sems.open(arg(args, 2) as i32)
                .set_perm(0, 0, octal(3) as u32)
                .map(|()| "ok"),
        ),
        _ => return fail(format!("unknown probe {what:?}")),
    }
    ExitCode::SUCCESS
}

/// Take a set's fast-path lock as this process, as if inside an operation,
/// then stop (SIGSTOP); on SIGCONT let it go and exit. The lock is the
/// region's first word (`dsm::semregion`); holding it is what a process
/// stopped at the wrong instant does.
fn stall(args: &[String]) -> ExitCode {
    use std::os::unix::net::UnixStream;
    let id = arg(args, 1) as i32;
    let Some(path) = std::env::var_os(dsm::client::SOCKET_ENV) else {
        return fail("no socket".into());
    };
    let Ok(mut stream) = UnixStream::connect(path) else {
        return fail("connect".into());
    };
    let call = |stream: &mut UnixStream, n: u64, req: &dsm::wire::ClientRequest| {
        use std::io::Write;
        stream.write_all(&dsm::wire::encode_client(n, req)).ok()?;
        let mut buf = vec![0u8; 4096];
        let mut fds = Vec::new();
        let got =
            dsm::fdpass::recv_with_fds(std::os::fd::AsRawFd::as_raw_fd(stream), &mut buf, &mut fds)
                .ok()?;
        let (_, reply): (u64, dsm::wire::ClientReply) =
            dsm::wire::decode_client(buf.get(4..got)?).ok()?;
        Some((reply, fds.pop()))
    };
    let hello = dsm::wire::ClientRequest::Hello {
        version: dsm::wire::PROTOCOL_VERSION,
        link: None,
    };
    if call(&mut stream, 1, &hello).is_none() {
        return fail("hello".into());
    }
    let Some((_, Some(fd))) = call(&mut stream, 2, &dsm::wire::ClientRequest::SemRegion { id })
    else {
        return fail("no region for the set".into());
    };
    let Ok(region) = dsm::memfd::Mapping::map(
        std::os::fd::AsFd::as_fd(&fd),
        dsm::semregion::REGION_BYTES,
        true,
        None,
    ) else {
        return fail("map".into());
    };
    // SAFETY: the region's first word is its lock, an aligned u32 that is
    // only ever accessed atomically.
    let lock = unsafe { &*(region.as_ptr() as *const std::sync::atomic::AtomicU32) };
    let me = std::process::id();
    while lock
        .compare_exchange(
            0,
            me,
            std::sync::atomic::Ordering::Acquire,
            std::sync::atomic::Ordering::Relaxed,
        )
        .is_err()
    {
        std::thread::yield_now();
    }
    println!("held");
    // SAFETY: stopping ourselves, as a job-control stop would.
    unsafe { libc::raise(libc::SIGSTOP) };
    lock.store(0, std::sync::atomic::Ordering::Release);
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sems = match Semaphores::connect_default() {
        Ok(s) => s,
        Err(e) => return fail(format!("connect: {e}")),
    };
    let set = || sems.open(arg(&args, 1) as i32);
    match args.first().map(String::as_str) {
        Some("mutex") => return mutex(&sems, &args),
        Some("p") => {
            let undo = args.get(2).is_some_and(|s| s == "undo");
            let timeout = args
                .get(3)
                .and_then(|s| s.parse().ok())
                .map(Duration::from_millis);
            print_result(set().timed_op(&p(undo), timeout).map(|()| "ok"));
        }
        Some("hold") => {
            // P, V pairs (WARMUP of them, 1 by default), then P: where the
            // set is arbitrated the first op gives the process its undo
            // slot and the others take the fast path, so the adjustment
            // held at the end lives in shared memory; enough pairs get the
            // set lent to this node.
            let warmup = args
                .get(2)
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(1);
            for _ in 0..warmup {
                for sops in [p(true), v(true)] {
                    if let Err(e) = set().op(&sops) {
                        return fail(format!("semop: {e}"));
                    }
                }
            }
            if let Err(e) = set().op(&p(true)) {
                return fail(format!("semop: {e}"));
            }
            println!("held");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Some("p-interruptible") => {
            // SAFETY: installing a handler that does nothing, without
            // SA_RESTART, as a program that wants EINTR does.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigusr1 as extern "C" fn(i32) as usize;
                libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
            }
            print_result(set().op(&p(false)).map(|()| "ok"));
        }
        Some("timed-p-loop") => {
            let (ms, us) = (arg(&args, 2) as u64, arg(&args, 3) as u64);
            let until = Instant::now() + Duration::from_millis(ms);
            let mut ok = 0u64;
            while Instant::now() < until {
                match set().timed_op(&p(false), Some(Duration::from_micros(us))) {
                    Ok(()) => ok += 1,
                    Err(e) if e.errno() == libc::EAGAIN => {}
                    Err(e) => return fail(format!("timed P: {e}")),
                }
            }
            println!("{ok}");
        }
        Some("v") => {
            let gap = args.get(3).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            for i in 0..arg(&args, 2) as u64 {
                if gap > 0 {
                    // Irregular gaps, so posts land at every point of a wait.
                    std::thread::sleep(Duration::from_micros(i * 7919 % gap));
                }
                if let Err(e) = set().op(&v(false)) {
                    return fail(format!("V: {e}"));
                }
            }
        }
        Some("probe") => return probe(&sems, &args),
        Some("stall") => return stall(&args),
        other => return fail(format!("unknown role {other:?}")),
    }
    ExitCode::SUCCESS
}
