//! Real programs under `omrun`, unchanged: their SysV calls become the
//! cluster's. `scripts/test.sh` installs the Debian packages they need.

use migshm::programs::{
    ab, apache_conf, apache_installed, free_port, pg_init, pgbench, pgbench_figures,
    postgres_installed, start_apache, start_postgres, Under, MOD_PHP,
};
use migshm::{uffd_or_skip, Cluster};
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

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
    let mut apache = start_apache(
        Under::Omrun {
            socket: cluster.socket(1),
            home: None,
        },
        &conf,
        ports[0],
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        )
    });
    let admin = dsm::client::Client::connect(cluster.socket(2)).unwrap();
    let sets = admin.sem_ipcs().unwrap();
    assert_eq!(sets.len(), 1, "the accept mutex: {sets:?}");
    assert_eq!(sets[0].home, 1);
    let www_data = std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("www-data:"))
        .and_then(|l| l.split(':').nth(2)?.parse::<u32>().ok());
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
        let page = Command::new("curl")
            .args([
                "-s",
                "-m",
                "10",
                &format!("http://127.0.0.1:{}/info.php", ports[0]),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
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
