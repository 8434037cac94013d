//! Blocking behaviour against the kernel: children block in real `semop`s
//! while the engine queues the same arrays; after every change, which
//! waiters finished (and how), the values and GETNCNT/GETZCNT must agree.
//! Children are woken asynchronously, so after each step the kernel's state
//! is polled until it equals the engine's (bounded); a real difference
//! still fails, after the bound.

use dsm::coherence::sim::Rng;
use dsm::sysv::Credentials;
use semaphore::engine::{Caller, SemBuf, SemLimits, SemSet, SemopOutcome, IPC_NOWAIT};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long the kernel may take to reach the state the engine predicts.
const SETTLE_MAX: Duration = Duration::from_secs(3);

/// Poll `observe` until it equals `expected` or `SETTLE_MAX` passes; the
/// last observation.
fn settle<T: PartialEq>(expected: &T, mut observe: impl FnMut() -> T) -> T {
    let deadline = std::time::Instant::now() + SETTLE_MAX;
    loop {
        let now = observe();
        if &now == expected || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn counts_of(engine: &SemSet, n: usize, who: &Caller) -> Vec<(i32, i32)> {
    (0..n as i32)
        .map(|s| {
            (
                engine.getncnt(s, &who.cred).unwrap(),
                engine.getzcnt(s, &who.cred).unwrap(),
            )
        })
        .collect()
}

fn caller(process: u64) -> Caller {
    // SAFETY: getpid/geteuid/getegid have no preconditions.
    let (pid, uid, gid) = unsafe { (libc::getpid(), libc::geteuid(), libc::getegid()) };
    Caller {
        process,
        pid,
        cred: Credentials::of_process(pid, uid, gid),
    }
}

fn ctl(id: i32, semnum: i32, cmd: i32, arg: libc::c_ulong) -> i32 {
    // SAFETY: `arg` is what `cmd` expects (an int, or a pointer to n u16).
    unsafe { libc::semctl(id, semnum, cmd, arg) }
}

/// A child blocked (or not) in one semop; its exit code is 0 or the errno.
fn spawn_waiter(id: i32, sops: &[SemBuf]) -> i32 {
    let mut raw: Vec<libc::sembuf> = sops.iter().map(|s| libc::sembuf::from(*s)).collect();
    // SAFETY: the child only calls semop and _exit on memory prepared before fork.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let r = libc::semop(id, raw.as_mut_ptr(), raw.len());
            let code = if r == 0 { 0 } else { *libc::__errno_location() };
            libc::_exit(code);
        }
        pid
    }
}

/// Children that have exited since the last call: pid → exit code.
fn reap(children: &mut BTreeMap<i32, u64>, done: &mut BTreeMap<u64, i32>) {
    let pids: Vec<i32> = children.keys().copied().collect();
    for pid in pids {
        let mut status = 0;
        // SAFETY: polling our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            let id = children.remove(&pid).unwrap_or(0);
            done.insert(id, libc::WEXITSTATUS(status));
        }
    }
}

struct RemoveOnDrop(i32);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        ctl(self.0, 0, libc::IPC_RMID, 0);
    }
}

#[test]
fn blocked_operations_wake_like_the_kernels() {
    let limits = SemLimits::from_proc();
    let parent = caller(0);
    for seed in 0..25u64 {
        let mut rng = Rng::new(5000 + seed);
        let n = 2usize;
        // SAFETY: semget takes plain integers.
        let id = unsafe { libc::semget(libc::IPC_PRIVATE, n as i32, 0o600) };
        assert!(id >= 0);
        // Removed however the test ends, so no child stays blocked.
        let _set = RemoveOnDrop(id);
        let mut engine = SemSet::create(0, n as i32, 0o600, &parent.cred, &limits, 0).unwrap();
        let mut children: BTreeMap<i32, u64> = BTreeMap::new();
        let mut kernel_done: BTreeMap<u64, i32> = BTreeMap::new();
        let mut engine_done: BTreeMap<u64, i32> = BTreeMap::new();
        let mut next_waiter = 1u64;
        for step in 0..12 {
            let desc;
            if rng.chance(45) && children.len() < 4 {
                let sops: Vec<SemBuf> = (0..1 + rng.below(2))
                    .map(|_| SemBuf {
                        num: rng.below(n as u64) as u16,
                        op: rng.below(4) as i16 - 2,
                        flags: 0,
                    })
                    .collect();
                let w = next_waiter;
                next_waiter += 1;
                children.insert(spawn_waiter(id, &sops), w);
                match engine.semop_or_wait(w, &sops, &caller(w), &limits, 0) {
                    Ok(SemopOutcome::Done) => {
                        engine_done.insert(w, 0);
                    }
                    Ok(SemopOutcome::Blocked { .. }) => {}
                    Err(e) => {
                        engine_done.insert(w, e);
                    }
                }
                desc = format!("waiter {w}: {sops:?}");
            } else if rng.chance(60) {
                let sop = SemBuf {
                    num: rng.below(n as u64) as u16,
                    op: 1 + rng.below(2) as i16,
                    flags: IPC_NOWAIT,
                };
                let mut raw = [libc::sembuf::from(sop)];
                // SAFETY: one sembuf.
                let k = unsafe { libc::semop(id, raw.as_mut_ptr(), 1) };
                let e = engine.semop(&[sop], &parent, &limits, 0);
                assert_eq!(k == 0, e.is_ok(), "SEED={seed} step {step}: V {sop:?}");
                desc = format!("V {sop:?}");
            } else {
                let semnum = rng.below(n as u64) as i32;
                let value = rng.below(3) as i32;
                assert_eq!(ctl(id, semnum, libc::SETVAL, value as libc::c_ulong), 0);
                engine.setval(semnum, value, &parent, 0).unwrap();
                desc = format!("SETVAL {semnum} {value}");
            }
            while let Some((w, r)) = engine.poll_finished() {
                engine_done.insert(w, r.err().unwrap_or(0));
            }
            // The kernel wakes children asynchronously: wait (bounded) until
            // its observable state equals the engine's, then compare.
            let expected = (
                engine_done.clone(),
                engine.getall(&parent.cred).unwrap(),
                counts_of(&engine, n, &parent),
            );
            let observed = settle(&expected, || {
                reap(&mut children, &mut kernel_done);
                let mut kv = vec![0u16; n];
                ctl(id, 0, libc::GETALL, kv.as_mut_ptr() as libc::c_ulong);
                let counts = (0..n as i32)
                    .map(|s| (ctl(id, s, libc::GETNCNT, 0), ctl(id, s, libc::GETZCNT, 0)))
                    .collect();
                (kernel_done.clone(), kv, counts)
            });
            assert_eq!(
                observed, expected,
                "SEED={seed} step {step}: (finished waiters, values, ncnt/zcnt) after {desc}"
            );
        }
        // Removal: every remaining waiter gets EIDRM.
        assert_eq!(ctl(id, 0, libc::IPC_RMID, 0), 0);
        for w in engine.remove(&parent.cred).unwrap() {
            engine_done.insert(w, libc::EIDRM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !children.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            reap(&mut children, &mut kernel_done);
        }
        assert_eq!(kernel_done, engine_done, "SEED={seed}: after IPC_RMID");
    }
}
