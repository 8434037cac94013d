//! Real programs (Apache with PHP, PostgreSQL) run natively or under
//! `omrun`, for the tests and for `omrun-bench`: configurations, start and
//! stop, and the load tools' figures.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const APACHE: &str = "/usr/sbin/apache2";
pub const MOD_PHP: &str = "/usr/lib/apache2/modules/libphp8.2.so";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn wait_for_port(port: u16, limit: Duration) -> bool {
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
pub struct Group(pub Child);

impl Group {
    pub fn stop(&mut self, signal: i32, limit: Duration) -> Option<std::process::ExitStatus> {
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
/// children take turns accepting under the SysV accept mutex; with PHP if
/// it is installed.
pub fn apache_conf(dir: &Path, ports: [u16; 2]) -> PathBuf {
    apache_conf_with(dir, ports, Path::new(MOD_PHP).exists())
}

/// `apache_conf`, with or without PHP.
pub fn apache_conf_with(dir: &Path, ports: [u16; 2], php: bool) -> PathBuf {
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
LoadModule status_module /usr/lib/apache2/modules/mod_status.so
TypesConfig /etc/mime.types
User www-data
Group www-data
Mutex sysvsem default
DocumentRoot {d}/htdocs
<Directory {d}/htdocs>
  Require all granted
</Directory>
<Location /server-status>
  SetHandler server-status
</Location>
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
    let conf = if php {
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
pub fn ab(url: &str, requests: u32, concurrency: u32) -> (u32, u32, f64) {
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

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The uid and gid of a local user.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))?;
    let mut fields = line.split(':').skip(2);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// Apache and ab are installed (with PHP if `MOD_PHP` exists).
pub fn apache_installed() -> bool {
    Path::new(APACHE).exists()
        && Command::new("ab")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// PostgreSQL 15 and its user are there.
pub fn postgres_installed() -> Option<(u32, u32)> {
    user_ids("postgres").filter(|_| Path::new(PG_BIN).join("postgres").exists())
}

/// Where a program runs: natively, or under `omrun` on the node of
/// `socket`, with what it creates homed on node `home` if given.
#[derive(Clone, Copy)]
pub enum Under<'a> {
    Native,
    Omrun { socket: &'a Path, home: Option<u8> },
}

/// `program ARGS` as `under` says, in a process group of its own, as `uid`
/// if given.
pub fn start_group(
    under: Under<'_>,
    program: &Path,
    args: &[&std::ffi::OsStr],
    uid: Option<(u32, u32)>,
) -> std::io::Result<Group> {
    let mut cmd = match under {
        Under::Omrun { socket, home } => crate::omrun_command(socket, home, program),
        Under::Native => Command::new(program),
    };
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some((u, g)) = uid {
        cmd.uid(u).gid(g);
    }
    Ok(Group(cmd.spawn()?))
}

/// Start Apache with `conf` (natively or under omrun) and wait for it.
pub fn start_apache(under: Under<'_>, conf: &Path, port: u16) -> Result<Group, String> {
    let args = [
        std::ffi::OsStr::new("-f"),
        conf.as_os_str(),
        std::ffi::OsStr::new("-DFOREGROUND"),
    ];
    let group = start_group(under, Path::new(APACHE), &args, None).map_err(|e| e.to_string())?;
    if !wait_for_port(port, Duration::from_secs(30)) {
        return Err("apache did not come up".into());
    }
    Ok(group)
}

/// A new PostgreSQL data directory in `dir` (owned by the postgres user).
pub fn pg_init(dir: &Path, ids: (u32, u32)) -> Result<PathBuf, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::os::unix::fs::chown(dir, Some(ids.0), Some(ids.1)).map_err(|e| e.to_string())?;
    let data = dir.join("data");
    let ok = Command::new(Path::new(PG_BIN).join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres"])
        .uid(ids.0)
        .gid(ids.1)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(data)
    } else {
        Err("initdb failed".into())
    }
}

/// Start PostgreSQL on `data` with SysV shared memory (natively or under
/// omrun) and wait for it.
pub fn start_postgres(
    under: Under<'_>,
    data: &Path,
    port: u16,
    ids: (u32, u32),
) -> Result<Group, String> {
    let socket_dir = data.parent().unwrap_or(data);
    let settings = [
        "shared_memory_type=sysv".to_string(),
        format!("port={port}"),
        "listen_addresses=127.0.0.1".to_string(),
        format!("unix_socket_directories={}", socket_dir.display()),
    ];
    let mut args: Vec<std::ffi::OsString> = vec!["-D".into(), data.as_os_str().to_owned()];
    for s in &settings {
        args.push("-c".into());
        args.push(s.into());
    }
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let postgres = Path::new(PG_BIN).join("postgres");
    let group = start_group(under, &postgres, &args, Some(ids)).map_err(|e| e.to_string())?;
    // The port opens before recovery ends: ready is what pg_isready says.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let ready = Command::new(Path::new(PG_BIN).join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(group);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("postgres did not come up".into())
}

/// `pgbench ARGS` against the server on `port`: success and its output.
pub fn pgbench(port: u16, args: &[&str]) -> (bool, String) {
    let out = Command::new(Path::new(PG_BIN).join("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output();
    match out {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// From pgbench's report: (failed transactions, tps).
pub fn pgbench_figures(report: &str) -> (Option<u64>, Option<f64>) {
    let failed = report
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| l.split(':').nth(1)?.split_whitespace().next()?.parse().ok());
    let tps = report
        .lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split('=').nth(1)?.split_whitespace().next()?.parse().ok());
    (failed, tps)
}
