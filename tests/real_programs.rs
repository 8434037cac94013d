//! Real programs under `omrun`, unchanged: their SysV calls become the
//! cluster's. `scripts/test.sh` installs the Debian packages they need.

use migshm::programs::{
    ab, apache_conf, apache_conf_with, apache_installed, free_port, pg_init, pgbench,
    pgbench_figures, postgres_installed, start_apache, start_postgres, Under, MOD_PHP,
};
use migshm::{children_of, omctl, running_away, uffd_or_skip, without_colours, Cluster};
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Apache started under omrun on the node of `socket`, answering on
/// `port`; its error log in the failure message if it does not come up.
fn apache_under_omrun(
    socket: &Path,
    dir: &Path,
    conf: &Path,
    port: u16,
) -> migshm::programs::Group {
    start_apache(Under::Omrun { socket, home: None }, conf, port).unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        )
    })
}

/// Apache 2.4 prefork, two Listen lines, `Mutex sysvsem`, children as
/// www-data, under omrun: ab gets no failed request, and stopping Apache
/// leaves no segment or set behind.
#[test]
fn apache_prefork_with_a_sysv_accept_mutex_serves_under_omrun() {
    if !uffd_or_skip() {
        return;
    }
    if !apache_installed() {
        eprintln!("SKIP: apache2/ab not installed (scripts/test.sh installs them)");
        return;
    }
    let cluster = Cluster::start(2).expect("start cluster");
    let dir = std::env::temp_dir().join(format!("migshm-apache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ports = [free_port(), free_port()];
    let conf = apache_conf(&dir, ports);
    let mut apache = apache_under_omrun(cluster.socket(1), &dir, &conf, ports[0]);
    let admin = dsm::client::Client::connect(cluster.socket(2)).unwrap();
    let www_data = std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("www-data:"))
        .and_then(|l| l.split(':').nth(2)?.parse::<u32>().ok());
    // The port answers as soon as Apache listens, a moment before its
    // parent creates the accept mutex, gives it to the children's user
    // (IPC_SET) and forks them: wait for that state, not for a moment.
    migshm::eventually(Duration::from_secs(10), || {
        admin
            .sem_ipcs()
            .is_ok_and(|s| s.len() == 1 && Some(s[0].perm.uid) == www_data)
    });
    let sets = admin.sem_ipcs().unwrap();
    assert_eq!(sets.len(), 1, "the accept mutex: {sets:?}");
    assert_eq!(sets[0].home, 1);
    assert_eq!(
        Some(sets[0].perm.uid),
        www_data,
        "IPC_SET to the children's user"
    );
    for port in ports {
        let (complete, failed, rate) = ab(&format!("http://127.0.0.1:{port}/index.html"), 3000, 8);
        eprintln!(
            "apache under omrun, port {port}: {complete} requests, {failed} failed, {rate:.0}/s"
        );
        assert_eq!((complete, failed), (3000, 0));
    }
    if Path::new(MOD_PHP).exists() {
        // opcache's 32 MiB segment is the cluster's: removed at once by the
        // parent, attached by it and every child.
        let page = php_page(ports[0]);
        assert!(
            page.contains("opcache:on") && page.contains("sum:500500"),
            "{page}"
        );
        let segments = admin.ipcs().unwrap();
        assert!(
            segments
                .iter()
                .any(|s| s.size == 32 << 20 && s.perm.mode & 0o1000 != 0 && s.nattch >= 2),
            "opcache's segment is not the cluster's: {segments:?}"
        );
        let (complete, failed, rate) =
            ab(&format!("http://127.0.0.1:{}/info.php", ports[1]), 2000, 8);
        eprintln!("php under omrun: {complete} requests, {failed} failed, {rate:.0}/s");
        assert_eq!((complete, failed), (2000, 0));
    } else {
        eprintln!(
            "SKIP (PHP part): libapache2-mod-php not installed (scripts/test.sh installs it)"
        );
    }
    let status = apache
        .stop(libc::SIGTERM, Duration::from_secs(20))
        .expect("apache did not stop");
    let mut err = String::new();
    if let Some(mut e) = apache.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "apache stopped with {status:?}: {err}");
    assert!(
        admin.sem_ipcs().unwrap().is_empty(),
        "the accept mutex was left behind"
    );
    assert!(admin.ipcs().unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// PostgreSQL 15 with `shared_memory_type=sysv` under omrun, as the
/// postgres user: `pgbench -i` and a `pgbench` run without a failed
/// transaction; its ~150 MB segment is the cluster's and goes at shutdown.
#[test]
fn postgresql_with_sysv_shared_memory_runs_pgbench_under_omrun() {
    if !uffd_or_skip() {
        return;
    }
    let Some(ids) = postgres_installed() else {
        eprintln!("SKIP: PostgreSQL 15 not installed (scripts/test.sh installs it)");
        return;
    };
    let cluster = Cluster::start(2).expect("start cluster");
    let dir = std::env::temp_dir().join(format!("migshm-pg-{}", std::process::id()));
    let data = pg_init(&dir, ids).expect("initdb");
    let port = free_port();
    let mut server = start_postgres(
        Under::Omrun {
            socket: cluster.socket(1),
            home: None,
        },
        &data,
        port,
        ids,
    )
    .expect("start postgres");
    let admin = dsm::client::Client::connect(cluster.socket(2)).unwrap();
    let segments = admin.ipcs().unwrap();
    assert!(
        segments
            .iter()
            .any(|s| s.size > 100 << 20 && s.perm.uid == ids.0),
        "postgres' main segment is not the cluster's: {segments:?}"
    );
    let (ok, report) = pgbench(port, &["-i", "-s", "2", "-q"]);
    assert!(ok, "pgbench -i: {report}");
    let (ok, report) = pgbench(port, &["-c", "4", "-j", "2", "-T", "4"]);
    assert!(ok, "pgbench: {report}");
    let (failed, tps) = pgbench_figures(&report);
    eprintln!("postgres under omrun: {tps:?} tps");
    assert_eq!(failed, Some(0), "{report}");
    // A fast shutdown; the segment goes with the server.
    let status = server
        .stop(libc::SIGINT, Duration::from_secs(30))
        .expect("postgres did not stop");
    assert!(status.success(), "postgres stopped with {status:?}");
    assert!(admin.ipcs().unwrap().is_empty(), "{:?}", admin.ipcs());
    assert!(admin.sem_ipcs().unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The scoreboard Apache's status page shows: (slots in use, busy, idle).
fn scoreboard(port: u16) -> Option<(usize, u32, u32)> {
    let out = Command::new("curl")
        .args(["-s", "-m", "5"])
        .arg(format!("http://127.0.0.1:{port}/server-status?auto"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let board = field("Scoreboard:")?;
    Some((
        board.chars().filter(|c| *c != '.').count(),
        field("BusyWorkers:")?.parse().ok()?,
        field("IdleWorkers:")?.parse().ok()?,
    ))
}

/// Issue 5's Apache acceptance: Apache prefork under omrun with the SysV
/// accept mutex; while ab runs, children (which hold the accept mutex in
/// turn, with SEM_UNDO, and accept on two listeners through epoll) are
/// moved to nodes 2 and 3 and back, again and again. ab gets no failed
/// request, the moved children served connections while away, the
/// scoreboard the parent sees accounts for every worker, and Apache stops
/// cleanly with nothing left behind (no process, agent, set or segment).
#[test]
fn apache_children_move_to_other_nodes_and_back_while_ab_runs() {
    children_move_while_ab_runs(false);
}

/// Issue 12's: the same with PHP and opcache (SysV model) serving a page
/// that also compiles new scripts now and then (opcache's write lock).
/// Opcache's lock file is deleted: a moved child's locks on it are taken
/// at home by its home pid, so they exclude the children at home. Checked
/// from /proc/locks meanwhile: never two writers, and a moved child seen
/// holding the lock from home.
#[test]
fn apache_php_children_move_while_ab_runs_and_opcache_locks_exclude() {
    if !Path::new(MOD_PHP).exists() {
        eprintln!("SKIP: libapache2-mod-php not installed (scripts/test.sh installs it)");
        return;
    }
    children_move_while_ab_runs(true);
}

/// The test PHP page as served on `port`.
fn php_page(port: u16) -> String {
    Command::new("curl")
        .args([
            "-s",
            "-m",
            "10",
            &format!("http://127.0.0.1:{port}/info.php"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Locks on inode `inode` in /proc/locks: (pid, writes, start, end); None
/// if the list did not come in one read (the kernel lists them in one
/// pass only within a page, so a longer one may mix two moments).
fn locks_on(inode: u64) -> Option<Vec<(i32, bool, u64, u64)>> {
    use std::io::Read;
    let mut buf = vec![0u8; 64 << 10];
    let n = std::fs::File::open("/proc/locks")
        .ok()?
        .read(&mut buf)
        .ok()?;
    if n >= 4096 - 128 {
        return None;
    }
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let locks = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: POSIX  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
            let ino: u64 = f.get(5)?.rsplit(':').next()?.parse().ok()?;
            if ino != inode || *f.get(1)? != "POSIX" {
                return None;
            }
            let end = match *f.get(7)? {
                "EOF" => u64::MAX,
                e => e.parse().ok()?,
            };
            Some((
                f.get(4)?.parse().ok()?,
                *f.get(3)? == "WRITE",
                f.get(6)?.parse().ok()?,
                end,
            ))
        })
        .collect();
    Some(locks)
}

/// Opcache's lock file, by inode, as Apache's parent holds it (deleted).
fn opcache_lock_inode(parent: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(format!("/proc/{parent}/fd"))
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("ZendSem"))
        })
        .and_then(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.ino())
}

fn children_move_while_ab_runs(php: bool) {
    if !uffd_or_skip() {
        return;
    }
    if !apache_installed() {
        eprintln!("SKIP: apache2/ab not installed (scripts/test.sh installs them)");
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let node1 = cluster.socket(1).to_path_buf();
    let name = if php { "php-move" } else { "move" };
    let dir = std::env::temp_dir().join(format!("migshm-apache-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ports = [free_port(), free_port()];
    let conf = apache_conf_with(&dir, ports, php);
    if php {
        // A page that now and then includes a script never compiled yet:
        // opcache takes its write lock to store it.
        std::fs::write(
            dir.join("htdocs/gen.php"),
            "<?php $f = sys_get_temp_dir() . '/migshm-gen-' . getmypid() . '-' . mt_rand(0, 40) . '.php';\n\
             if (!file_exists($f)) { file_put_contents($f, '<?php return 1;'); }\n\
             echo 'gen:', include $f, \"\\n\";\n",
        )
        .expect("gen.php");
    }
    let mut apache = apache_under_omrun(&node1, &dir, &conf, ports[0]);
    let parent = apache.0.id();
    const REQUESTS: u32 = 30000;
    let page = if php { "info.php" } else { "index.html" };
    let url = format!("http://127.0.0.1:{}/{page}", ports[0]);
    let load = std::thread::spawn(move || ab(&url, REQUESTS, 4));
    // With PHP: a second load on the compiling page, and a watch on the
    // lock while children move (the one away, if any, in `away`).
    let away = std::sync::Arc::new(std::sync::Mutex::new(None::<i32>));
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(php));
    let watch = {
        let (away, watching) = (away.clone(), watching.clone());
        let inode = if php {
            migshm::eventually(Duration::from_secs(10), || {
                opcache_lock_inode(parent).is_some()
            });
            opcache_lock_inode(parent)
        } else {
            None
        };
        assert!(!php || inode.is_some(), "opcache's lock file not found");
        std::thread::spawn(move || {
            let (mut two_writers, mut held_from_away, mut samples) = (Vec::new(), 0u32, 0u32);
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let Some(inode) = inode else { break };
                let Some(locks) = locks_on(inode) else {
                    std::thread::sleep(Duration::from_micros(500));
                    continue;
                };
                samples += 1;
                let moved = *away.lock().unwrap();
                if moved.is_some_and(|p| locks.iter().any(|l| l.0 == p)) {
                    held_from_away += 1;
                }
                for (i, a) in locks.iter().enumerate() {
                    for b in &locks[i + 1..] {
                        let overlap = a.2 <= b.3 && b.2 <= a.3;
                        if a.0 != b.0 && (a.1 || b.1) && overlap {
                            two_writers.push(format!("{a:?} and {b:?}"));
                        }
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            (two_writers, held_from_away, samples)
        })
    };
    let compile_load = php.then(|| {
        let url = format!("http://127.0.0.1:{}/gen.php", ports[1]);
        std::thread::spawn(move || ab(&url, 3000, 2))
    });
    let mut round_trips = 0;
    let mut refused = Vec::new();
    let mut turn = 0usize;
    while !load.is_finished() && round_trips < 12 {
        let children = children_of(parent);
        if children.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let child = children[turn % children.len()].to_string();
        let node = if turn.is_multiple_of(2) { "2" } else { "3" };
        turn += 1;
        let started = std::time::Instant::now();
        let (ok, out, err) = omctl(&node1, &["migrate", &child, node]);
        let text = out + &err;
        eprintln!("move {child} to {node}: {ok} in {:?}", started.elapsed());
        if !ok {
            refused.push(text);
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        *away.lock().unwrap() = child.parse().ok();
        std::thread::sleep(Duration::from_millis(300));
        // A return waits until the child is done with its connections:
        // it may have to be asked again.
        let mut home = (false, String::new());
        for _ in 0..20 {
            let started = std::time::Instant::now();
            let (ok, out, err) = omctl(&node1, &["migrate", &child, "home"]);
            home = (ok, out + &err);
            eprintln!("home {child}: {home:?} in {:?}", started.elapsed());
            if home.0 || home.1.contains("No such process") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        *away.lock().unwrap() = None;
        // Apache may let a spare child go while it is away: it ends there
        // and its deputy at home ends with it; no round trip then.
        if home.1.contains("No such process") {
            let clean_end = format!("ended exit 0 pid={child}");
            let log = without_colours(&cluster.log(1));
            assert!(
                log.contains(&clean_end),
                "child {child} ended away from home, not by exit 0"
            );
            continue;
        }
        assert!(home.0, "child {child} did not come home: {}", home.1);
        round_trips += 1;
    }
    let (complete, failed, rate) = load.join().expect("ab");
    if let Some(compiling) = compile_load {
        let (complete, failed, _) = compiling.join().expect("ab gen.php");
        eprintln!("compiling page: {complete} requests, {failed} failed");
        assert_eq!((complete, failed), (3000, 0), "the compiling page");
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let (two_writers, held_from_away, samples) = watch.join().expect("the lock watch");
    if php {
        eprintln!("opcache's lock: {samples} samples, held from away in {held_from_away}");
        assert!(
            two_writers.is_empty(),
            "two holders at once: {two_writers:?}"
        );
        assert!(
            held_from_away > 0,
            "no moved child seen holding opcache's lock"
        );
        let page = php_page(ports[0]);
        assert!(
            page.contains("opcache:on") && page.contains("sum:500500"),
            "{page}"
        );
    }
    eprintln!(
        "apache with moving children: {complete} requests, {failed} failed, {rate:.0}/s, \
         {round_trips} round trips, {} refusals: {refused:?}",
        refused.len()
    );
    assert_eq!((complete, failed), (REQUESTS, 0));
    assert!(round_trips >= 3, "too few moves: {refused:?}");
    let log = cluster.log(1);
    let served_away: u64 = log
        .lines()
        .filter(|l| l.contains("deputy: home accepted="))
        .filter_map(|l| {
            let at = l.find("accepted=")? + "accepted=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(served_away > 0, "no connection went to a moved child");
    // Those moved by hand came home above; any the balancer moved while
    // ab ran comes home by itself now that home is idle.
    let since = std::time::Instant::now();
    assert!(
        migshm::eventually(Duration::from_secs(20), || running_away(&node1).is_empty()),
        "still away: {:?}",
        running_away(&node1)
    );
    eprintln!("all home {:?} after the load ended", since.elapsed());
    // Every worker the parent has is on the scoreboard, and only those.
    assert!(
        migshm::eventually(Duration::from_secs(10), || {
            let workers = children_of(parent).len();
            scoreboard(ports[0]).is_some_and(|(used, busy, idle)| {
                used == workers && (busy + idle) as usize == workers
            })
        }),
        "scoreboard {:?} vs {} children",
        scoreboard(ports[0]),
        children_of(parent).len()
    );
    let status = apache
        .stop(libc::SIGTERM, Duration::from_secs(20))
        .expect("apache did not stop");
    assert!(status.success(), "apache stopped with {status:?}");
    let admin = dsm::client::Client::connect(&node1).unwrap();
    assert!(
        migshm::eventually(Duration::from_secs(5), || admin
            .sem_ipcs()
            .is_ok_and(|s| s.is_empty())
            && admin.ipcs().is_ok_and(|s| s.is_empty())),
        "left behind: {:?} {:?}",
        admin.sem_ipcs(),
        admin.ipcs()
    );
    let leftover = |name: &str| {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("cmdline")).is_ok_and(|c| {
                    c.contains(name) && c.contains(&dir.to_string_lossy().to_string())
                })
            })
            .count()
    };
    assert_eq!(leftover("apache2"), 0, "an Apache process was left behind");
    assert!(
        migshm::eventually(Duration::from_secs(5), || (1..=3).all(|n| cluster
            .node(n)
            .pid()
            .is_some_and(|pid| migshm::agents_of(pid).is_empty()))),
        "an agent was left behind"
    );
    // The scripts gen.php wrote.
    for e in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("migshm-gen-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
