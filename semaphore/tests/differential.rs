//! Random sequences of non-blocking `semop`s and `semctl`s run against a
//! real kernel set (private to this process) and against our engine; every
//! result, errno and value must be the same.

use dsm::coherence::sim::Rng;
use dsm::sysv::Credentials;
use semaphore::engine::{
    Caller, SemBuf, SemLimits, SemSet, SemopOutcome, IPC_NOWAIT, SEMVMX, SEM_UNDO,
};

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn me() -> Caller {
    // SAFETY: getpid/geteuid/getegid have no preconditions.
    let (pid, uid, gid) = unsafe { (libc::getpid(), libc::geteuid(), libc::getegid()) };
    Caller {
        process: 1,
        pid,
        cred: Credentials::of_process(pid, uid, gid),
    }
}

struct Kernel {
    id: i32,
}

impl Kernel {
    fn create(nsems: i32) -> Result<Kernel, i32> {
        // SAFETY: semget takes plain integers.
        let id = unsafe { libc::semget(libc::IPC_PRIVATE, nsems, 0o600) };
        if id < 0 {
            Err(errno())
        } else {
            Ok(Kernel { id })
        }
    }

    fn semop(&self, sops: &[SemBuf]) -> Result<i32, i32> {
        let mut raw: Vec<libc::sembuf> = sops.iter().map(|s| libc::sembuf::from(*s)).collect();
        // SAFETY: `raw` holds `raw.len()` sembufs.
        let r = unsafe { libc::semop(self.id, raw.as_mut_ptr(), raw.len()) };
        if r < 0 {
            Err(errno())
        } else {
            Ok(r)
        }
    }

    fn ctl(&self, semnum: i32, cmd: i32, arg: libc::c_ulong) -> Result<i32, i32> {
        // SAFETY: the fourth argument is the semun the command expects (an
        // int value, or a pointer to nsems u16 / a semid_ds).
        let r = unsafe { libc::semctl(self.id, semnum, cmd, arg) };
        if r < 0 {
            Err(errno())
        } else {
            Ok(r)
        }
    }

    fn getall(&self, n: usize) -> Vec<u16> {
        let mut v = vec![0u16; n];
        self.ctl(0, libc::GETALL, v.as_mut_ptr() as libc::c_ulong)
            .expect("GETALL");
        v
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = self.ctl(0, libc::IPC_RMID, 0);
    }
}

fn random_sops(rng: &mut Rng, n: usize, semopm: usize) -> Vec<SemBuf> {
    let count = match rng.below(40) {
        0 => 0,
        1 => semopm + 1,
        _ => 1 + rng.below(4) as usize,
    };
    (0..count)
        .map(|_| {
            let num = if rng.chance(8) {
                n as u16
            } else {
                rng.below(n as u64) as u16
            };
            let op = match rng.below(20) {
                0 => SEMVMX as i16,
                1 => -(SEMVMX as i16),
                2..=4 => 0,
                _ => rng.below(7) as i16 - 3,
            };
            let flags = IPC_NOWAIT | if rng.chance(35) { SEM_UNDO } else { 0 };
            SemBuf { num, op, flags }
        })
        .collect()
}

#[test]
fn random_operations_match_the_kernel() {
    let limits = SemLimits::from_proc();
    let caller = me();
    let mut compared = 0u64;
    for seed in 0..400u64 {
        let mut rng = Rng::new(seed);
        let nsems = match rng.below(10) {
            0 => 0,
            1 => limits.semmsl + 1,
            _ => 1 + rng.below(5) as i32,
        };
        let kernel = Kernel::create(nsems);
        let engine = SemSet::create(0, nsems, 0o600, &caller.cred, &limits, 0);
        assert_eq!(
            kernel.as_ref().err().copied(),
            engine.as_ref().err().copied(),
            "SEED={seed} semget({nsems})"
        );
        let (Ok(kernel), Ok(mut engine)) = (kernel, engine) else {
            continue;
        };
        let n = nsems as usize;
        for step in 0..80 {
            let (k, e, desc) = match rng.below(11) {
                0..=4 => {
                    let sops = random_sops(&mut rng, n, limits.semopm);
                    let k = kernel.semop(&sops);
                    let e = engine.semop(&sops, &caller, &limits, 0).map(|o| {
                        assert_eq!(o, SemopOutcome::Done, "IPC_NOWAIT never blocks");
                        0
                    });
                    (k, e, format!("semop {:?}", &sops[..sops.len().min(6)]))
                }
                5 => {
                    let semnum = rng.below(n as u64 + 2) as i32 - 1;
                    let value = match rng.below(6) {
                        0 => -1,
                        1 => SEMVMX + 1,
                        2 => SEMVMX,
                        _ => rng.below(6) as i32,
                    };
                    let k = kernel.ctl(semnum, libc::SETVAL, value as libc::c_ulong);
                    let e = engine.setval(semnum, value, &caller, 0).map(|()| 0);
                    (k, e, format!("SETVAL {semnum} {value}"))
                }
                6 => {
                    let mut values: Vec<u16> = (0..n)
                        .map(|_| {
                            if rng.chance(10) {
                                SEMVMX as u16
                            } else {
                                rng.below(6) as u16
                            }
                        })
                        .collect();
                    let k = kernel.ctl(0, libc::SETALL, values.as_mut_ptr() as libc::c_ulong);
                    let e = engine.setall(&values, &caller, 0).map(|()| 0);
                    (k, e, format!("SETALL {values:?}"))
                }
                7 => {
                    let semnum = rng.below(n as u64 + 2) as i32 - 1;
                    let k = kernel.ctl(semnum, libc::GETVAL, 0);
                    (
                        k,
                        engine.getval(semnum, &caller.cred),
                        format!("GETVAL {semnum}"),
                    )
                }
                8 => {
                    let semnum = rng.below(n as u64 + 2) as i32 - 1;
                    let k = kernel.ctl(semnum, libc::GETPID, 0);
                    (
                        k,
                        engine.getpid(semnum, &caller.cred),
                        format!("GETPID {semnum}"),
                    )
                }
                9 => {
                    let semnum = rng.below(n as u64 + 2) as i32 - 1;
                    let (cmd, name) = if rng.chance(50) {
                        (libc::GETNCNT, "GETNCNT")
                    } else {
                        (libc::GETZCNT, "GETZCNT")
                    };
                    let k = kernel.ctl(semnum, cmd, 0);
                    let e = if cmd == libc::GETNCNT {
                        engine.getncnt(semnum, &caller.cred)
                    } else {
                        engine.getzcnt(semnum, &caller.cred)
                    };
                    (k, e, format!("{name} {semnum}"))
                }
                _ => {
                    // SAFETY: semid_ds is plain data; all zeros is a valid value.
                    let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
                    let k = kernel
                        .ctl(
                            0,
                            libc::IPC_STAT,
                            &mut ds as *mut libc::semid_ds as libc::c_ulong,
                        )
                        .map(|_| ds.sem_nsems as i32);
                    let e = engine.stat(&caller.cred).map(|s| s.nsems as i32);
                    (k, e, "IPC_STAT nsems".to_string())
                }
            };
            assert_eq!(k, e, "SEED={seed} step {step}: {desc}");
            let values = engine.getall(&caller.cred).expect("GETALL");
            assert_eq!(
                kernel.getall(n),
                values,
                "SEED={seed} step {step}: values after {desc}"
            );
            compared += 1;
        }
    }
    println!("{compared} operations compared with the kernel");
}

#[test]
fn undo_adjustments_at_exit_match_the_kernel() {
    let limits = SemLimits::from_proc();
    let parent = me();
    for seed in 0..60u64 {
        let mut rng = Rng::new(1000 + seed);
        let n = 1 + rng.below(4) as usize;
        let kernel = Kernel::create(n as i32).expect("semget");
        let mut engine = SemSet::create(0, n as i32, 0o600, &parent.cred, &limits, 0).unwrap();
        let mut start: Vec<u16> = (0..n).map(|_| rng.below(8) as u16).collect();
        kernel
            .ctl(0, libc::SETALL, start.as_mut_ptr() as libc::c_ulong)
            .expect("SETALL");
        engine.setall(&start, &parent, 0).unwrap();
        // Everything the child needs is prepared before fork: it only makes
        // system calls, then exits.
        let plan: Vec<Vec<libc::sembuf>> = (0..30)
            .map(|_| {
                (0..1 + rng.below(3))
                    .map(|_| libc::sembuf {
                        sem_num: rng.below(n as u64) as u16,
                        sem_op: rng.below(7) as i16 - 3,
                        sem_flg: IPC_NOWAIT | if rng.chance(70) { SEM_UNDO } else { 0 },
                    })
                    .collect()
            })
            .collect();
        let mut before_exit = vec![0u16; n];
        let mut fds = [0i32; 2];
        // SAFETY: pipe fills the two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only calls semop/semctl/write/_exit on memory
        // prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            for sops in &plan {
                let mut ops = sops.clone();
                // SAFETY: `ops` holds ops.len() sembufs; failures are part of the test.
                unsafe { libc::semop(kernel.id, ops.as_mut_ptr(), ops.len()) };
            }
            // SAFETY: GETALL into a buffer of n u16; write it to the pipe; exit.
            unsafe {
                libc::semctl(
                    kernel.id,
                    0,
                    libc::GETALL,
                    before_exit.as_mut_ptr() as libc::c_ulong,
                );
                libc::write(fds[1], before_exit.as_ptr().cast(), n * 2);
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end; reading the child's values.
        unsafe {
            libc::close(fds[1]);
            libc::read(fds[0], before_exit.as_mut_ptr().cast(), n * 2);
            libc::close(fds[0]);
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let child = Caller {
            process: 2,
            pid,
            cred: parent.cred.clone(),
        };
        for sops in &plan {
            let ops: Vec<SemBuf> = sops.iter().map(SemBuf::from).collect();
            let _ = engine.semop(&ops, &child, &limits, 0);
        }
        assert_eq!(
            engine.getall(&parent.cred).unwrap(),
            before_exit,
            "SEED={seed}: values before the child exited"
        );
        let _ = engine.process_exited(2, 0);
        assert_eq!(
            engine.getall(&parent.cred).unwrap(),
            kernel.getall(n),
            "SEED={seed}: values after its undo"
        );
    }
}
