//! The main demo: a 3-node cluster on loopback. Three `dsmd` start on
//! 127.0.0.1-3, processes on every node share one SysV-style segment, and
//! the demo shows that they see one coherent memory, then that a SysV
//! semaphore set shared by all nodes gives them mutual exclusion, then
//! moves a running C program (under omrun, with a segment) to node 2 and
//! home again. Every process it starts is stopped again.
//!
//! ```text
//! cargo run --release --example cluster
//! ```

use dsm::client::{Client, IPC_CREAT};
use migshm::{run_role, spawn_role, spawn_sem_role, Cluster};
use semaphore::Semaphores;
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Err(e) = dsm::uffd::probe_features() {
        return Err(format!(
            "userfaultfd is not usable here ({e}); run as root or allow /dev/userfaultfd"
        )
        .into());
    }
    println!("starting 3 dsmd on loopback ...");
    let cluster = Cluster::start(3)?;
    let admin = Client::connect(cluster.socket(1))?;
    for n in admin.nodes()? {
        println!(
            "  node {} {} at {}",
            n.node,
            if n.up { "up" } else { "down" },
            n.address
        );
    }

    let key = 0x00c0_ffee;
    let id = admin.get(key, 1 << 20, IPC_CREAT | 0o666)?;
    println!("\nsegment {id} (key {key:#x}, 1 MiB) created on node 1");

    let (procs, iters) = (6u64, 50_000u64);
    println!(
        "{procs} processes, two on each node, each add 1 to one shared word {iters} times ..."
    );
    let started = Instant::now();
    let k = key.to_string();
    let adders: Vec<_> = (0..procs)
        .map(|i| {
            spawn_role(
                cluster.socket((i % 3) as u8 + 1),
                &["add", &k, &iters.to_string(), &procs.to_string()],
            )
        })
        .collect::<Result<_, _>>()?;
    for a in adders {
        let (status, out) = a.output(Duration::from_secs(300)).ok_or("an adder hung")?;
        if !status.success() {
            return Err(format!("an adder failed: {out}").into());
        }
    }
    let (_, total) = run_role(cluster.socket(2), &["read", &k]);
    let total: u64 = total.lines().next().unwrap_or("0").parse()?;
    println!(
        "  total seen from node 2: {total} (expected {}) in {:.2?} -> {}",
        procs * iters,
        started.elapsed(),
        if total == procs * iters {
            "exact"
        } else {
            "WRONG"
        }
    );

    let k2 = (key + 1).to_string();
    println!("\nmessage passing: a writer on node 1 publishes data then a flag; a reader on node 3 spins on the flag ...");
    let reader = spawn_role(cluster.socket(3), &["mp-read", &k2, "500"])?;
    let writer = spawn_role(cluster.socket(1), &["mp-write", &k2, "500"])?;
    let (ws, _) = writer
        .output(Duration::from_secs(120))
        .ok_or("writer hung")?;
    let (rs, rout) = reader
        .output(Duration::from_secs(120))
        .ok_or("reader hung")?;
    println!(
        "  500 rounds: {}",
        if ws.success() && rs.success() {
            "the reader never saw stale data".to_string()
        } else {
            format!("FAILED: {rout}")
        }
    );

    let (mutex_procs, mutex_iters) = (6u64, 300u64);
    println!(
        "\nmutual exclusion: {mutex_procs} processes, two per node, each add 1 to a plain (non-atomic) counter {mutex_iters} times under one SysV semaphore ..."
    );
    let sems = Semaphores::connect(cluster.socket(1))?;
    let mutex = sems.get(key, 1, IPC_CREAT | 0o666)?;
    mutex.set_value(0, 1)?;
    let counter = admin.get(key + 2, 4096, IPC_CREAT | 0o666)?;
    let started = Instant::now();
    let lockers: Vec<_> = (0..mutex_procs)
        .map(|i| {
            spawn_sem_role(
                cluster.socket((i % 3) as u8 + 1),
                &[
                    "mutex",
                    &mutex.id().to_string(),
                    &counter.to_string(),
                    &mutex_iters.to_string(),
                    &mutex_procs.to_string(),
                ],
            )
        })
        .collect::<Result<_, _>>()?;
    let mut lockers_ok = true;
    for l in lockers {
        let (status, _) = l.output(Duration::from_secs(300)).ok_or("a locker hung")?;
        lockers_ok &= status.success();
    }
    let mut word = [0u8; 8];
    admin.attach(counter, true)?.read(0, &mut word);
    let counted = u64::from_ne_bytes(word);
    println!(
        "  counter: {counted} (expected {}) in {:.2?} -> {}",
        mutex_procs * mutex_iters,
        started.elapsed(),
        if counted == mutex_procs * mutex_iters && lockers_ok {
            "exact"
        } else {
            "WRONG"
        }
    );

    let moved_ok = migration_demo(&cluster, &admin)?;

    println!("\nsegments cluster-wide (omctl ipcs):");
    for s in admin.ipcs()? {
        println!(
            "  key {:#010x} id {:>10} bytes {:>8} nattch {} home node {}",
            s.perm.key as u32, s.id, s.size, s.nattch, s.home
        );
    }
    println!("semaphore sets cluster-wide:");
    for s in sems.list()? {
        println!(
            "  key {:#010x} id {:>10} nsems {} home node {}, arbitrated on node {}",
            s.perm.key as u32, s.id, s.nsems, s.home, s.arbiter
        );
    }
    mutex.remove()?;
    println!("\nper node (omctl status):");
    for s in admin.status()? {
        println!(
            "  node {}: {} segments homed, {} pages resident, {} faults served, {} bytes sent",
            s.node, s.segments_homed, s.resident_pages, s.faults_served, s.bytes_sent
        );
    }
    for id in admin.ipcs()?.iter().map(|s| s.id) {
        admin.remove(id)?;
    }
    drop(cluster);
    println!("\nall daemons stopped.");
    if total != procs * iters
        || !ws.success()
        || !rs.success()
        || counted != mutex_procs * mutex_iters
        || !lockers_ok
        || !moved_ok
    {
        return Err("the demo saw an inconsistency".into());
    }
    Ok(())
}

/// A C program under omrun on node 1 (a loop over its heap, its stack and a
/// segment, reading back everything it writes) moved to node 2 and home
/// while it runs: true if it never read a wrong value and ended with its
/// own exit status.
fn migration_demo(cluster: &Cluster, admin: &Client) -> Result<bool, Box<dyn std::error::Error>> {
    println!("\nprocess migration: a C loop under omrun on node 1 (1 MiB heap, a segment) ...");
    let prog = migshm::c_program("migrate_loop")?;
    let _ = migshm::binary("migshm-agent");
    let out_path = std::env::temp_dir().join(format!("migshm-demo-{}.out", std::process::id()));
    let mut command = migshm::omrun_command(cluster.socket(1), None, &prog);
    command
        .args(["1048576", "shm"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::process::Stdio::null());
    migshm::only_standard_fds(&mut command);
    let mut proc = migshm::Proc::from(command.spawn()?);
    let pid = proc.child.id() as i32;
    let text = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let lines_from = |p: i32| {
        text()
            .lines()
            .filter(|l| {
                l.starts_with("loop ") && l.split_whitespace().nth(3) == Some(&p.to_string())
            })
            .count()
    };
    migshm::eventually(Duration::from_secs(10), || lines_from(pid) >= 2);
    let t = Instant::now();
    admin.migrate(pid, dsm::ids::NodeId::new(2))?;
    let there = admin
        .migrations()?
        .into_iter()
        .find(|m| m.home_pid == pid)
        .map(|m| m.pid_there)
        .unwrap_or(0);
    println!(
        "  omctl migrate {pid} 2: runs on node 2 (pid {there} there) after {:.1?}",
        t.elapsed()
    );
    migshm::eventually(Duration::from_secs(10), || lines_from(there) >= 1);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    admin.migrate(pid, None)?;
    println!(
        "  omctl migrate {pid} home: back on node 1 after {:.1?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill of the pid we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = proc.wait_timeout(Duration::from_secs(10));
    let out = text();
    if std::env::var_os("DEMO_DEBUG").is_some() {
        eprintln!("{out}");
    }
    let _ = std::fs::remove_file(&out_path);
    let loops = out.lines().filter(|l| l.starts_with("loop ")).count();
    let from_node2 = out
        .lines()
        .filter(|l| {
            l.starts_with("loop ")
                && l.split_whitespace().nth(3) == Some(there.to_string().as_str())
        })
        .count();
    let ok = status.and_then(|s| s.code()) == Some(42)
        && from_node2 > 0
        && out.contains("rmid 0")
        && !out.contains("mismatch");
    println!(
        "  {loops} progress lines ({} from node 2); exit status {:?} (42 expected), IPC_RMID after coming home: {} -> {}",
        from_node2,
        status.and_then(|s| s.code()),
        if out.contains("rmid 0") { "ok" } else { "failed" },
        if ok { "every loop read back what it wrote" } else { "WRONG" }
    );
    Ok(ok)
}
