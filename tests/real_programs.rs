//! Real programs under `omrun`, unchanged: their SysV calls become the
//! cluster's. `scripts/test.sh` installs the Debian packages they need.

use migshm::{binary, uffd_or_skip, Cluster};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const APACHE: &str = "/usr/sbin/apache2";
const MOD_PHP: &str = "/usr/lib/apache2/modules/libphp8.2.so";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A program started in a process group of its own (Apache signals its
/// whole group when it stops), ended with it if the test fails.
struct Group(Child);

impl Group {
    fn stop(&mut self, signal: i32, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling the process group we created.
        unsafe { libc::kill(-(self.0.id() as i32), signal) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.0.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: killing the process group we created.
            unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}

/// An Apache prefork configuration with two `Listen` lines, so that the
/// children take turns accepting under the SysV accept mutex.
fn apache_conf(dir: &Path, ports: [u16; 2]) -> PathBuf {
    let htdocs = dir.join("htdocs");
    std::fs::create_dir_all(&htdocs).unwrap();
    std::fs::write(htdocs.join("index.html"), "hello from migshm\n").unwrap();
    let conf = format!(
        r#"ServerRoot {d}
ServerName localhost
Listen 127.0.0.1:{p0}
Listen 127.0.0.1:{p1}
PidFile {d}/httpd.pid
ErrorLog {d}/error.log
LogLevel warn
LoadModule mpm_prefork_module /usr/lib/apache2/modules/mod_mpm_prefork.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule mime_module /usr/lib/apache2/modules/mod_mime.so
LoadModule dir_module /usr/lib/apache2/modules/mod_dir.so
TypesConfig /etc/mime.types
User www-data
Group www-data
Mutex sysvsem default
DocumentRoot {d}/htdocs
<Directory {d}/htdocs>
  Require all granted
</Directory>
StartServers 4
MinSpareServers 2
MaxSpareServers 8
MaxRequestWorkers 16
"#,
        d = dir.display(),
        p0 = ports[0],
        p1 = ports[1]
    );
    // PHP with opcache in a SysV segment (created by the parent, removed at
    // once, inherited by the children), when mod_php is installed.
    let conf = if Path::new(MOD_PHP).exists() {
        let php = dir.join("php");
        std::fs::create_dir_all(&php).unwrap();
        std::fs::write(
            php.join("php.ini"),
            "zend_extension=opcache.so\nopcache.enable=1\nopcache.preferred_memory_model=shm\nopcache.memory_consumption=32\n",
        )
        .unwrap();
        std::fs::write(
            htdocs.join("info.php"),
            "<?php $s = opcache_get_status(false);\necho 'opcache:', ($s && $s['opcache_enabled']) ? 'on' : 'off', \"\\n\";\necho 'sum:', array_sum(range(1, 1000)), \"\\n\";\n",
        )
        .unwrap();
        format!(
            "{conf}LoadModule php_module {MOD_PHP}\nPHPIniDir {}\nAddHandler application/x-httpd-php .php\n",
            php.display()
        )
    } else {
        conf
    };
    let path = dir.join("httpd.conf");
    std::fs::write(&path, conf).unwrap();
    // The children run as www-data and read the document root.
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(dir)
        .status();
    path
}

/// `ab` against `url`: (complete, failed, requests per second).
fn ab(url: &str, requests: u32, concurrency: u32) -> (u32, u32, f64) {
    let out = Command::new("ab")
        .args([
            "-q",
            "-n",
            &requests.to_string(),
            "-c",
            &concurrency.to_string(),
            url,
        ])
        .output()
        .expect("run ab");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().find_map(|w| w.parse::<f64>().ok()))
            .unwrap_or(-1.0)
    };
    (
        field("Complete requests:") as u32,
        field("Failed requests:") as u32,
        field("Requests per second:"),
    )
}

fn apache_or_skip() -> bool {
    let present = Path::new(APACHE).exists()
        && Command::new("ab")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
    if !present {
        eprintln!("SKIP: apache2/ab not installed (scripts/test.sh installs them)");
    }
    present
}

/// Apache 2.4 prefork, two Listen lines, `Mutex sysvsem`, children as
/// www-data, under omrun: ab gets no failed request, and stopping Apache
/// leaves no segment or set behind.
#[test]
fn apache_prefork_with_a_sysv_accept_mutex_serves_under_omrun() {
    if !uffd_or_skip() || !apache_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start cluster");
    let dir = std::env::temp_dir().join(format!("migshm-apache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ports = [free_port(), free_port()];
    let conf = apache_conf(&dir, ports);
    let mut apache = Group(
        Command::new(binary("omrun"))
            .arg("--socket")
            .arg(cluster.socket(1))
            .args(["--", APACHE, "-f"])
            .arg(&conf)
            .arg("-DFOREGROUND")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start apache under omrun"),
    );
    assert!(
        wait_for_port(ports[0], Duration::from_secs(20)),
        "apache did not come up: {}",
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    );
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

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The uid and gid of a local user.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))?;
    let mut fields = line.split(':').skip(2);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// PostgreSQL 15 with `shared_memory_type=sysv` under omrun, as the
/// postgres user: `pgbench -i` and a `pgbench` run without a failed
/// transaction; its ~150 MB segment is the cluster's and goes at shutdown.
#[test]
fn postgresql_with_sysv_shared_memory_runs_pgbench_under_omrun() {
    if !uffd_or_skip() {
        return;
    }
    let (Some((uid, gid)), true) = (
        user_ids("postgres"),
        Path::new(PG_BIN).join("postgres").exists(),
    ) else {
        eprintln!("SKIP: PostgreSQL 15 not installed (scripts/test.sh installs it)");
        return;
    };
    let cluster = Cluster::start(2).expect("start cluster");
    let dir = std::env::temp_dir().join(format!("migshm-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    let data = dir.join("data");
    let initdb = Command::new(Path::new(PG_BIN).join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres"])
        .uid(uid)
        .gid(gid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("initdb");
    assert!(initdb.success());
    let port = free_port();
    let mut server = Group(
        Command::new(binary("omrun"))
            .arg("--socket")
            .arg(cluster.socket(1))
            .arg("--")
            .arg(Path::new(PG_BIN).join("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-c",
                "shared_memory_type=sysv",
                "-c",
                &format!("port={port}"),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
            ])
            .arg(format!("unix_socket_directories={}", dir.display()))
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start postgres under omrun"),
    );
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "postgres did not come up"
    );
    let admin = dsm::client::Client::connect(cluster.socket(2)).unwrap();
    let segments = admin.ipcs().unwrap();
    assert!(
        segments
            .iter()
            .any(|s| s.size > 100 << 20 && s.perm.uid == uid),
        "postgres' main segment is not the cluster's: {segments:?}"
    );
    let pgbench = |args: &[&str]| {
        let out = Command::new(Path::new(PG_BIN).join("pgbench"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .output()
            .expect("run pgbench");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pgbench {args:?}: {text}");
        text
    };
    pgbench(&["-i", "-s", "2", "-q"]);
    let run = pgbench(&["-c", "4", "-j", "2", "-T", "4"]);
    let failed = run
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| {
            l.split(':')
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        });
    let tps = run.lines().find(|l| l.starts_with("tps"));
    eprintln!("postgres under omrun: {tps:?}");
    assert_eq!(failed, Some(0), "{run}");
    // A fast shutdown; the segment goes with the server.
    let status = server
        .stop(libc::SIGINT, Duration::from_secs(30))
        .expect("postgres did not stop");
    assert!(status.success(), "postgres stopped with {status:?}");
    assert!(admin.ipcs().unwrap().is_empty(), "{:?}", admin.ipcs());
    assert!(admin.sem_ipcs().unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
