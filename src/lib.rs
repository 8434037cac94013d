//! Top-level package of migshm: a local cluster harness for the examples and
//! the integration tests. It starts several `dsmd` on 127.0.0.x, each with
//! its own socket, and stops every process it started, by pid.

pub mod linlog;
pub mod netns;
pub mod programs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True if userfaultfd with the features migshm needs is usable here;
/// otherwise says why the caller skips.
pub fn uffd_or_skip() -> bool {
    match dsm::uffd::probe_features() {
        Ok(f) if f & dsm::uffd::REQUIRED_FEATURES == dsm::uffd::REQUIRED_FEATURES => true,
        other => {
            println!(
                "SKIP: userfaultfd with shmem WP/MINOR/POISON is not available here: {other:?}"
            );
            false
        }
    }
}

/// Where cargo put the binaries of this build (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Tests and examples run from target/<profile>/{deps,examples}.
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir
}

/// `omctl --socket SOCKET ARGS`: (success, stdout, stderr).
pub fn omctl(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary("omctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run omctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of `omctl ps` (asked at `socket`) of processes running
/// away from their home node: empty when every process is home.
pub fn running_away(socket: &Path) -> Vec<String> {
    let (ok, stdout, stderr) = omctl(socket, &["ps"]);
    assert!(ok, "omctl ps: {stderr}");
    stdout
        .lines()
        .skip(1)
        .filter(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            cells.get(1) != cells.get(2)
        })
        .map(str::to_owned)
        .collect()
}

/// The children of process `pid`.
pub fn children_of(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A log as text, its terminal colour codes taken out.
pub fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Set (to the test's name) in a test binary started again by
/// [`run_test_in_child`].
pub const TEST_CHILD_ENV: &str = "MIGSHM_TEST_CHILD";

/// Is this process the child [`run_test_in_child`] started for `name`?
pub fn is_test_child(name: &str) -> bool {
    std::env::var(TEST_CHILD_ENV).is_ok_and(|v| v == name)
}

/// Run test `name` of this test binary again in a child process (which
/// sees [`is_test_child`]), with `env`, and return how it ended and what
/// it printed. For a test whose own process would use a daemon's memory
/// or semaphore undo: stopping that daemon kills such processes (see
/// `dsm::guardian`), which must not be the test runner.
pub fn run_test_in_child(
    name: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> (std::process::ExitStatus, String) {
    let exe = std::env::current_exe().expect("own path");
    let mut cmd = Command::new(exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(TEST_CHILD_ENV, name)
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    only_standard_fds(&mut cmd);
    let out = cmd.output().expect("run the test in a child");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status, text)
}

/// Every thread of process `pid` and of its descendants: state, wait
/// channel, system call (what a hung test reports).
pub fn describe_tree(pid: i32) -> String {
    let mut out = String::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        out += &format!("process {p} {}\n", comm.trim());
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let t = t.path();
                let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
                let state = read("stat")
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next().map(str::to_string))
                    .unwrap_or_default();
                out += &format!(
                    "  task {} {state} wchan={} syscall={}\n",
                    t.display(),
                    read("wchan"),
                    read("syscall").split_whitespace().next().unwrap_or("")
                );
            }
        }
        todo.extend(children_of(p as u32));
    }
    out
}

/// The agents a daemon started: its children but its guardian.
pub fn agents_of(daemon: u32) -> Vec<i32> {
    children_of(daemon)
        .into_iter()
        .filter(|pid| !is_guardian(*pid))
        .collect()
}

/// Is `pid` a daemon's guardian (see `dsm::guardian`)?
pub fn is_guardian(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim_end() == dsm::guardian::GUARDIAN_NAME)
}

/// The guardian of a daemon, if it has one now.
pub fn guardian_of(daemon: u32) -> Option<i32> {
    children_of(daemon)
        .into_iter()
        .find(|pid| is_guardian(*pid))
}

/// Path of a workspace binary, building it first if this build lacks it.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.exists() {
        let release = bin_dir().ends_with("release");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--quiet", "--bin", name]);
        if release {
            cmd.arg("--release");
        }
        let _ = cmd.status();
    }
    path
}

pub struct Node {
    pub id: u8,
    pub listen: String,
    pub socket: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Several `dsmd` on loopback.
pub struct Cluster {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    opts: ClusterOptions,
    /// The daemons' network namespaces, if they run in their own.
    pub namespaces: Option<netns::Namespaces>,
    /// A process holding the daemons' IPC namespace, if they have one.
    ipc_holder: Option<Proc>,
}

/// Options for the daemons a cluster starts.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: u8,
    pub peer_timeout_ms: u64,
    pub heartbeat_ms: u64,
    /// `DSMD_LOG` filter for the daemons' logs.
    pub log: String,
    /// Cluster secret written to a file and given with `--secret-file`.
    pub secret: Option<String>,
    /// Run each daemon in a network namespace of its own, joined by a
    /// bridge (see [`netns::Namespaces`]): links can then be cut.
    pub namespaces: bool,
    /// More environment for the daemons (and so their agents).
    pub daemon_env: Vec<(String, String)>,
    /// Run the daemons in an IPC namespace of their own, whose sysctls
    /// (`kernel.shmmni`, ...) a test may change (see [`Cluster::command`]).
    pub ipc_namespace: bool,
    /// Give node N `--cpus` (N-1) modulo the CPUs there are: each node a
    /// CPU of its own, as separate machines.
    pub cpu_per_node: bool,
    /// More arguments for every daemon (`--no-balance`), and for some
    /// only, by node.
    pub daemon_args: Vec<String>,
    pub node_args: Vec<(u8, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            peer_timeout_ms: 1000,
            heartbeat_ms: 100,
            // MIGSHM_TEST_LOG: the daemons' log filter for a run that
            // needs more (`info,dsm::daemon::placement=debug`).
            log: std::env::var("MIGSHM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            secret: None,
            namespaces: false,
            daemon_env: Vec::new(),
            ipc_namespace: false,
            cpu_per_node: false,
            daemon_args: Vec::new(),
            node_args: Vec::new(),
        }
    }
}

impl Cluster {
    pub fn start(nodes: u8) -> std::io::Result<Cluster> {
        Cluster::start_with(ClusterOptions {
            nodes,
            ..Default::default()
        })
    }

    pub fn start_with(opts: ClusterOptions) -> std::io::Result<Cluster> {
        let mut last_err = None;
        for attempt in 0..5 {
            let dir = std::env::temp_dir().join(format!(
                "migshm-{}-{}-{attempt}",
                std::process::id(),
                unique()
            ));
            std::fs::create_dir_all(&dir)?;
            // A port per run; a clash shows as a daemon that exits at once.
            let port = 20000 + (unique() * 7919 + u64::from(std::process::id())) % 30000;
            let namespaces = if opts.namespaces {
                Some(netns::Namespaces::create(opts.nodes)?)
            } else {
                None
            };
            let ipc_holder = if opts.ipc_namespace {
                let child = Command::new("unshare")
                    .args(["--ipc", "--", "sleep", "1000000"])
                    .stdin(Stdio::null())
                    .spawn()?;
                let holder = Proc { child };
                // Until it has unshared, its namespace is ours.
                let ours = std::fs::read_link("/proc/self/ns/ipc")?;
                let pid = holder.child.id();
                eventually(Duration::from_secs(5), || {
                    std::fs::read_link(format!("/proc/{pid}/ns/ipc")).is_ok_and(|ns| ns != ours)
                });
                Some(holder)
            } else {
                None
            };
            let mut cluster = Cluster {
                dir: dir.clone(),
                nodes: Vec::new(),
                opts: opts.clone(),
                namespaces,
                ipc_holder,
            };
            // Daemons listening beyond loopback must share a secret.
            let secret = opts
                .secret
                .clone()
                .or_else(|| opts.namespaces.then(|| format!("test-secret-{port}")));
            cluster.opts.secret = secret.clone();
            if let Some(secret) = &secret {
                std::fs::write(dir.join("secret"), secret)?;
            }
            for id in 1..=opts.nodes {
                let host = match &cluster.namespaces {
                    Some(_) => netns::Namespaces::address(id),
                    None => format!("127.0.0.{id}"),
                };
                cluster.nodes.push(Node {
                    id,
                    listen: format!("{host}:{port}"),
                    socket: dir.join(format!("node{id}.sock")),
                    child: None,
                });
            }
            for id in 1..=opts.nodes {
                cluster.spawn_daemon(id)?;
            }
            match cluster.wait_ready(Duration::from_secs(10)) {
                Ok(()) => return Ok(cluster),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("cluster did not start")))
    }

    /// Start node `id`'s daemon (its log is appended to).
    fn spawn_daemon(&mut self, id: u8) -> std::io::Result<()> {
        let me = &self.nodes[usize::from(id - 1)];
        let mut cmd = match &self.namespaces {
            Some(ns) => {
                let mut c = self.command(Path::new("ip"));
                c.args(["netns", "exec", ns.name(id)]).arg(binary("dsmd"));
                c
            }
            None => self.command(&binary("dsmd")),
        };
        cmd.arg("--node").arg(me.id.to_string());
        cmd.arg("--listen").arg(&me.listen);
        cmd.arg("--socket").arg(&me.socket);
        cmd.arg("--peer-timeout-ms")
            .arg(self.opts.peer_timeout_ms.to_string());
        cmd.arg("--heartbeat-ms")
            .arg(self.opts.heartbeat_ms.to_string());
        if self.opts.secret.is_some() {
            cmd.arg("--secret-file").arg(self.dir.join("secret"));
        }
        if self.opts.cpu_per_node {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            cmd.arg("--cpus")
                .arg(((usize::from(me.id) - 1) % cpus).to_string());
        }
        cmd.args(&self.opts.daemon_args);
        cmd.args(
            self.opts
                .node_args
                .iter()
                .filter(|(n, _)| *n == me.id)
                .map(|(_, a)| a),
        );
        for other in self.nodes.iter().filter(|n| n.id != me.id) {
            cmd.arg("--peer")
                .arg(format!("{}={}", other.id, other.listen));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node{}.log", me.id)))?;
        cmd.envs(self.opts.daemon_env.iter().map(|(k, v)| (k, v)));
        cmd.env("DSMD_LOG", &self.opts.log)
            .stdout(Stdio::null())
            .stderr(log);
        // The daemons end when the thread that started them ends (the
        // test or the program), even if it is killed. Asked of dsmd
        // rather than done in a pre-exec hook: a hook makes std fork
        // (running the client library's fork handlers in a child of
        // a threaded test) where it would otherwise posix_spawn.
        cmd.env("DSMD_PARENT_PID", std::process::id().to_string());
        let child = cmd.spawn()?;
        self.nodes[usize::from(id - 1)].child = Some(child);
        Ok(())
    }

    /// A command running `program` in the daemons' IPC namespace (as is,
    /// if they have none), where a test changes the SysV limits they obey.
    pub fn command(&self, program: &Path) -> Command {
        match &self.ipc_holder {
            Some(holder) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--ipc=/proc/{}/ns/ipc", holder.child.id()))
                    .arg("--")
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Start a new life of node `id`'s daemon (after [`Cluster::kill`]) and
    /// wait until the whole cluster sees it up.
    pub fn restart(&mut self, id: u8) -> std::io::Result<()> {
        self.kill(id);
        self.spawn_daemon(id)?;
        self.wait_ready(Duration::from_secs(10))
    }

    /// Wait until every daemon answers and sees every other one up.
    pub fn wait_ready(&mut self, limit: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            for n in &mut self.nodes {
                if let Some(child) = n.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(std::io::Error::other(format!(
                            "dsmd {} exited: {status}",
                            n.id
                        )));
                    }
                }
            }
            let all_up = self.nodes.iter().all(|n| {
                dsm::client::Client::connect(&n.socket)
                    .and_then(|c| c.nodes())
                    .map(|list| list.len() == self.nodes.len() && list.iter().all(|x| x.up))
                    .unwrap_or(false)
            });
            if all_up {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("cluster not ready in time"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self, node: u8) -> &Path {
        &self.nodes[usize::from(node - 1)].socket
    }

    pub fn node(&self, node: u8) -> &Node {
        &self.nodes[usize::from(node - 1)]
    }

    /// SIGKILL one daemon (node loss).
    pub fn kill(&mut self, node: u8) {
        if let Some(mut child) = self.nodes[usize::from(node - 1)].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Send a signal to one daemon (e.g. SIGSTOP: a node that falls silent
    /// without closing its connections).
    pub fn signal(&self, node: u8, signal: i32) {
        if let Some(pid) = self.node(node).pid() {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// The log a daemon wrote so far.
    pub fn log(&self, node: u8) -> String {
        std::fs::read_to_string(self.dir.join(format!("node{node}.log"))).unwrap_or_default()
    }

    /// Stop every daemon with SIGTERM (then SIGKILL) and wait for each.
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                // SAFETY: signalling a child we spawned and have not reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(3);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            // The test failed: what the daemons said last, for the record.
            for n in 1..=self.nodes.len() as u8 {
                let log = self.log(n);
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(30)..];
                eprintln!("--- node {n}'s log, last lines:\n{}", tail.join("\n"));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    NEXT.fetch_add(1, Ordering::Relaxed) * 1_000_003 + u64::from(nanos % 1000)
}

/// Poll `f` every 10 ms until it holds or `limit` passes.
pub fn eventually(limit: Duration, f: impl FnMut() -> bool) -> bool {
    eventually_every(limit, Duration::from_millis(10), f)
}

/// Poll `f` every `every` until it holds or `limit` passes.
pub fn eventually_every(limit: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(every);
    }
    f()
}

/// A process started on a node, killed (by pid) if still running when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    /// Wait at most `limit`; `None` if it is still running (then killed).
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                // What it (and what it started) waits on, for the record.
                eprintln!("{}", describe_tree(self.child.id() as i32));
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait at most `limit`; `None` if it is still running (left running).
    pub fn child_wait_until(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn output(self, limit: Duration) -> Option<(std::process::ExitStatus, String)> {
        let mut me = self;
        let status = me.wait_timeout(limit)?;
        let mut out = String::new();
        if let Some(mut stdout) = me.child.stdout.take() {
            use std::io::Read;
            let _ = stdout.read_to_string(&mut out);
        }
        Some((status, out))
    }
}

/// Start `cmd` with descriptors 0-2 only: others this process inherited
/// without close-on-exec (a make jobserver's pipe) would be relayed by a
/// migration, or keep it from migrating. They are marked close-on-exec in
/// this process instead of closed in a pre-exec hook, which would make std
/// fork rather than posix_spawn (and run fork handlers in the child).
pub fn only_standard_fds(cmd: &mut Command) -> &mut Command {
    static MARKED: std::sync::Once = std::sync::Once::new();
    MARKED.call_once(|| {
        let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        for fd in fds.into_iter().filter(|&fd| fd > 2) {
            // SAFETY: fcntl on a descriptor number only changes its flags
            // (one already closed just fails).
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    });
    cmd
}

impl From<Child> for Proc {
    fn from(child: Child) -> Proc {
        Proc { child }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run a test program role against a node's socket.
pub fn spawn_role(socket: &Path, args: &[&str]) -> std::io::Result<Proc> {
    spawn_role_as(socket, args, None)
}

/// Run a role as another user (for permission checks).
pub fn spawn_role_as(socket: &Path, args: &[&str], uid: Option<u32>) -> std::io::Result<Proc> {
    spawn_program_as("dsm-testprog", socket, args, uid)
}

/// Run a `sem-testprog` role against a node's socket.
pub fn spawn_sem_role(socket: &Path, args: &[&str]) -> std::io::Result<Proc> {
    spawn_program_as("sem-testprog", socket, args, None)
}

/// Run one of the workspace's programs against a node's socket, as
/// another user if `uid` is given.
pub fn spawn_program_as(
    program: &str,
    socket: &Path,
    args: &[&str],
    uid: Option<u32>,
) -> std::io::Result<Proc> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(binary(program));
    cmd.args(args)
        .env(dsm::client::SOCKET_ENV, socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    Ok(Proc {
        child: cmd.spawn()?,
    })
}

/// Compile `tests/c/NAME.c` with the system C compiler into the build
/// directory (once per test process) and return the executable's path.
pub fn c_program(name: &str) -> std::io::Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(format!("{name}.c"));
    let out_dir = bin_dir().join("c-programs");
    std::fs::create_dir_all(&out_dir)?;
    // One file per test process, made once even when tests of the process
    // ask at the same time, and renamed into place only when complete.
    static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = COMPILING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = out_dir.join(format!("{name}-{}", std::process::id()));
    if out.exists() {
        return Ok(out);
    }
    let partial = out.with_extension("partial");
    let status = Command::new("cc")
        .args(["-O1", "-Wall", "-pthread", "-o"])
        .arg(&partial)
        .arg(&source)
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "cc {} failed",
            source.display()
        )));
    }
    std::fs::rename(&partial, &out)?;
    Ok(out)
}

/// Run `program ARGS` under `omrun` on a node; killed if it outlives
/// `limit`. Returns the exit status and stdout.
pub fn run_under_omrun(
    socket: &Path,
    program: &Path,
    args: &[&str],
    limit: Duration,
) -> Option<(std::process::ExitStatus, String)> {
    run_under_omrun_homed(socket, None, program, args, limit)
}

/// `run_under_omrun`, with the objects the program creates homed on node
/// `home` (`omrun --home`).
pub fn run_under_omrun_homed(
    socket: &Path,
    home: Option<u8>,
    program: &Path,
    args: &[&str],
    limit: Duration,
) -> Option<(std::process::ExitStatus, String)> {
    let child = omrun_command(socket, home, program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .ok()?;
    Proc { child }.output(limit)
}

/// Start `program ARGS` under `omrun` on a node.
pub fn spawn_under_omrun(socket: &Path, program: &Path, args: &[&str]) -> std::io::Result<Proc> {
    let child = omrun_command(socket, None, program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(Proc { child })
}

/// `omrun --socket SOCKET [--home HOME] -- PROGRAM`, to add the program's
/// arguments to.
pub fn omrun_command(socket: &Path, home: Option<u8>, program: &Path) -> Command {
    let mut cmd = Command::new(binary("omrun"));
    cmd.arg("--socket").arg(socket);
    if let Some(n) = home {
        cmd.arg("--home").arg(n.to_string());
    }
    cmd.arg("--").arg(program);
    cmd
}

/// Run a role to completion and return its stdout (panics on a hang).
pub fn run_role(socket: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    spawn_role(socket, args)
        .expect("spawn dsm-testprog")
        .output(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("dsm-testprog {args:?} hung"))
}

/// Panic, showing the lines that differ, unless `ours` prints what
/// `native` printed (the kernel is the reference).
pub fn assert_same_output(what: &str, native: &str, ours: &str) {
    let diff: Vec<String> = native
        .lines()
        .zip(ours.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("native: {a}\nomrun:  {b}"))
        .collect();
    assert!(
        diff.is_empty() && native.lines().count() == ours.lines().count(),
        "{what} differs from native:\n{}\n(native {} lines, omrun {})",
        diff.join("\n"),
        native.lines().count(),
        ours.lines().count()
    );
}

/// Start `program ARGS` (a checker such as `random_check.c`) under omrun
/// on `socket`, its output in `out`, and wait until it printed `ready`.
pub fn start_checker(
    socket: &Path,
    program: &Path,
    args: &[&str],
    out: &Path,
    ready: &str,
) -> Proc {
    let mut command = omrun_command(socket, None, program);
    command.args(args);
    only_standard_fds(&mut command);
    command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).expect("output file"))
        .stderr(Stdio::null());
    let process = Proc::from(command.spawn().expect("start the checker"));
    let read = || std::fs::read_to_string(out).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(10), || read().contains(ready)),
        "{} never started: {}",
        program.display(),
        read()
    );
    process
}
