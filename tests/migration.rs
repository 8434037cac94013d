//! Checkpoint and restore of single-threaded processes (`migrate` crate).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use migrate::daemon::DaemonConn;
use migrate::ptrace::{kill, Tracee};
use migshm::{
    c_program, children_of, eventually, omctl, omrun_command, running_away, uffd_or_skip, Cluster,
    Proc,
};

fn output(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// One progress line of migrate_loop.c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    run: u64,
    pid: i32,
    usr1: i32,
    peer: u64,
}

/// The progress lines printed, in order.
fn loops(out: &str) -> Vec<Progress> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                ["loop", n, "pid", p, "usr1", u, "peer", v] => Some(Progress {
                    run: n.parse().ok()?,
                    pid: p.parse().ok()?,
                    usr1: u.parse().ok()?,
                    peer: v.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

/// Loop numbers only go up, across every move.
fn assert_continuous(text: &str) {
    let seen = loops(text);
    for pair in seen.windows(2) {
        assert!(
            pair[0].run < pair[1].run,
            "loop numbers go on: {pair:?}\n{text}"
        );
    }
}

/// migrate_loop.c with its output in DIR/out; under omrun on `socket` if given.
fn start_loop(dir: &Path, heap: usize, omrun: Option<&Path>) -> Child {
    start_loop_with(dir, heap, omrun, &[])
}

/// `start_loop` with more environment.
fn start_loop_with(dir: &Path, heap: usize, omrun: Option<&Path>, env: &[(&str, &str)]) -> Child {
    let prog = c_program("migrate_loop").expect("compile migrate_loop.c");
    let out = std::fs::File::create(dir.join("out")).expect("create output file");
    let mut command = match omrun {
        Some(socket) => {
            let mut c = omrun_command(socket, None, &prog);
            c.arg(heap.to_string()).arg("shm");
            c
        }
        None => {
            let mut c = Command::new(prog);
            c.arg(heap.to_string());
            c
        }
    };
    migshm::only_standard_fds(&mut command);
    command
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("start migrate_loop")
}

/// C program `name` (tests/c) under omrun on the node of `socket`, with
/// `env` added: its standard output in `dir`/out, which it returns.
fn start_c_under_omrun(
    socket: &Path,
    name: &str,
    dir: &Path,
    env: &[(&str, &std::ffi::OsStr)],
) -> (Proc, std::path::PathBuf) {
    let prog = c_program(name).unwrap_or_else(|e| panic!("compile {name}.c: {e}"));
    let out = dir.join("out");
    let mut command = omrun_command(socket, None, &prog);
    command
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("output file"))
        .stderr(Stdio::null());
    migshm::only_standard_fds(&mut command);
    (Proc::from(command.spawn().expect("start")), out)
}

fn wait_status(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let mut status = None;
    eventually(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// The process is checkpointed mid-loop, the original killed, and the image
/// restored into a new process that carries on: every loop reads back what
/// it wrote (heap, stack, FP state), its signal handlers work, its output
/// file continues at the right offset, and it exits with its own status.
#[test]
fn restored_process_carries_on() {
    let dir = tempdir("restore");
    let mut original = Proc::from(start_loop(&dir, 1 << 20, None));
    let out = dir.join("out");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out)).len() >= 2),
        "the loop never got going: {}",
        output(&out)
    );
    let pid = original.child.id() as i32;
    let mut tracee = Tracee::seize(pid).expect("seize");
    let image = migrate::checkpoint(&mut tracee, &Default::default()).expect("checkpoint");
    assert!(image.private_bytes() >= 1 << 20, "heap pages saved");
    // The original never runs again.
    tracee.forget();
    kill(pid, libc::SIGKILL).expect("kill the original");
    let _ = original.child.wait();
    let before = loops(&output(&out)).last().copied().expect("a loop line");

    let encoded = image.encode().expect("encode");
    let image = migrate::Image::decode(&encoded).expect("decode");
    let running = migrate::restore_fresh(&image, None)
        .and_then(|r| r.run())
        .expect("restore");
    let mut restored = Proc::from(running.child);
    let new_pid = restored.child.id() as i32;
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == new_pid)),
        "the restored process printed nothing: {}",
        output(&out)
    );
    kill(new_pid, libc::SIGUSR1).expect("SIGUSR1");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == new_pid && l.usr1 == 1)),
        "the handler did not run in the restored process: {}",
        output(&out)
    );
    kill(new_pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut restored.child, Duration::from_secs(10)).expect("it ends");
    let text = output(&out);
    assert_eq!(status.code(), Some(42), "exit status; output:\n{text}");
    assert_continuous(&text);
    let after = loops(&text)
        .into_iter()
        .find(|l| l.pid == new_pid)
        .expect("a restored line");
    assert!(after.run >= before.run, "{before:?} then {after:?}");
    assert!(text.contains("done "), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("migshm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A process under omrun on node 1 with a segment is checkpointed there and
/// restored on node 2: its segment is re-attached to node 2's copy at the
/// same address (pages fault in through the protocol: what it wrote on node
/// 1 is there, what node 3 writes reaches it), its client library follows
/// it to node 2's daemon (IPC_RMID through it works), and it ends with its
/// own exit status.
#[test]
fn restored_process_keeps_its_segment_on_another_node() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start 3 daemons");
    let dir = tempdir("segment");
    let out = dir.join("out");
    let mut original = Proc::from(start_loop(&dir, 256 << 10, Some(cluster.socket(1))));
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out)).len() >= 2),
        "the loop never got going: {}",
        output(&out)
    );
    let shmid: i32 = output(&out)
        .lines()
        .find_map(|l| l.strip_prefix("shmid ")?.parse().ok())
        .expect("shmid line");
    let pid = original.child.id() as i32;
    let info = DaemonConn::connect(cluster.socket(1))
        .and_then(|mut c| c.process_info(pid))
        .expect("process info from node 1");
    assert_eq!(info.attachments.len(), 1, "{info:?}");
    assert!(!info.links.is_empty(), "{info:?}");

    let mut tracee = Tracee::seize(pid).expect("seize");
    let image = migrate::checkpoint(&mut tracee, &info).expect("checkpoint");
    tracee.forget();
    kill(pid, libc::SIGKILL).expect("kill the original");
    let _ = original.child.wait();
    let running = migrate::restore_fresh(&image, Some(cluster.socket(2)))
        .and_then(|r| r.run())
        .expect("restore on node 2");
    let mut restored = Proc::from(running.child);
    let new_pid = restored.child.id() as i32;
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == new_pid)),
        "the restored process printed nothing: {}",
        output(&out)
    );
    // Node 2 serves it now.
    let on_node2 = DaemonConn::connect(cluster.socket(2))
        .and_then(|mut c| c.process_info(new_pid))
        .expect("process info from node 2");
    assert_eq!(on_node2.attachments.len(), 1, "{on_node2:?}");

    let node3 = dsm::client::Client::connect(cluster.socket(3)).expect("connect node 3");
    let seg = node3.attach(shmid, false).expect("attach on node 3");
    seg.atomic_u64(1).store(777, SeqCst);
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == new_pid && l.peer == 777)),
        "node 3's write never reached the restored process: {}",
        output(&out)
    );
    let seen_run = seg.atomic_u64(0).load(SeqCst);
    assert!(
        eventually(Duration::from_secs(10), || seg.atomic_u64(0).load(SeqCst)
            > seen_run),
        "node 3 never sees the restored process's writes"
    );
    drop(seg);
    kill(new_pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut restored.child, Duration::from_secs(10)).expect("it ends");
    let text = output(&out);
    assert_eq!(status.code(), Some(42), "exit status; output:\n{text}");
    assert!(
        text.contains("rmid 0"),
        "IPC_RMID from node 2:\n{text}\nnode 2 log:\n{}",
        cluster.log(2)
    );
    assert_continuous(&text);
    assert!(
        eventually(Duration::from_secs(5), || node3.stat(shmid).is_err()),
        "the segment is gone once its last user ended"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A line from an agent's stdout, within a bound.
fn agent_line(lines: &std::sync::mpsc::Receiver<String>) -> String {
    lines
        .recv_timeout(Duration::from_secs(30))
        .expect("the agent reported nothing")
}

fn spawn_agent(args: &[&str]) -> (Proc, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = Command::new(migshm::binary("migshm-agent"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start migshm-agent");
    let out = child.stdout.take().expect("agent stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (Proc::from(child), rx)
}

/// The deputy and host agents move a process under omrun to node 2 and
/// back: its pid at home stays its pid (signals sent there reach it on node
/// 2), it comes home and carries on, and its parent gets its real exit status.
#[test]
fn deputy_and_host_move_a_process_there_and_back() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let dir = tempdir("agents");
    let out = dir.join("out");
    let mut process = Proc::from(start_loop(&dir, 1 << 20, Some(cluster.socket(1))));
    let home_pid = process.child.id() as i32;
    assert!(eventually(Duration::from_secs(10), || loops(&output(&out))
        .len()
        >= 2));

    let token = "0123456789abcdef0123456789abcdef";
    let node2 = cluster.socket(2).to_string_lossy().into_owned();
    let (mut host, host_lines) = spawn_agent(&[
        "host",
        "--socket",
        &node2,
        "--bind",
        "127.0.0.2",
        "--token",
        token,
    ]);
    let port = agent_line(&host_lines);
    let port = port.strip_prefix("listening ").expect("listening PORT");
    let node1 = cluster.socket(1).to_string_lossy().into_owned();
    let (mut deputy, deputy_lines) = spawn_agent(&[
        "deputy",
        "--pid",
        &home_pid.to_string(),
        "--socket",
        &node1,
        "--host",
        &format!("127.0.0.2:{port}"),
        "--token",
        token,
    ]);
    let running = agent_line(&deputy_lines);
    let remote_pid: i32 = running
        .strip_prefix("running ")
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("deputy: {running}"));
    assert_eq!(agent_line(&host_lines), format!("guest {remote_pid}"));
    assert_eq!(agent_line(&host_lines), format!("running {remote_pid}"));
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == remote_pid)),
        "{}",
        output(&out)
    );
    // A signal to the home pid reaches the process on node 2.
    kill(home_pid, libc::SIGUSR1).expect("SIGUSR1 to the home pid");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == remote_pid && l.usr1 == 1)),
        "{}",
        output(&out)
    );
    // Home again.
    {
        use std::io::Write;
        let stdin = deputy.child.stdin.as_mut().expect("deputy stdin");
        writeln!(stdin, "home").expect("ask to come home");
    }
    assert_eq!(agent_line(&deputy_lines), "home accepted=0");
    assert_eq!(agent_line(&host_lines), "ended went home");
    let before = loops(&output(&out)).last().copied().expect("lines");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == home_pid && l.run > before.run)),
        "{}",
        output(&out)
    );
    kill(home_pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut process.child, Duration::from_secs(10)).expect("it ends");
    let text = output(&out);
    assert_eq!(status.code(), Some(42), "{text}");
    assert!(text.contains("rmid 0"), "{text}");
    assert_continuous(&text);
    assert!(deputy.wait_timeout(Duration::from_secs(10)).is_some());
    assert!(host.wait_timeout(Duration::from_secs(10)).is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `omctl PATH args`: (success, stdout, stderr).
/// The pid on the node it runs on of the one process `omctl ps` lists.
fn listed_pid_there(socket: &Path) -> Option<i32> {
    omctl(socket, &["ps"])
        .1
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

fn pid_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// `omctl migrate PID NODE|home` and `omctl ps` through the daemons: the
/// C loop (heap, stack, FP, a segment) goes to node 2 mid-loop and home
/// again (asked on node 2, by its home pid), then to node 3, from there to
/// node 2 (asked on node 3), where `kill -9` of its home pid ends the copy
/// too;
/// every loop reads back what it wrote, and the segment id still works.
#[test]
fn omctl_migrates_there_and_home_and_kill_ends_it_everywhere() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start 3 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("omctl");
    let out = dir.join("out");
    let mut process = Proc::from(start_loop(&dir, 1 << 20, Some(&node1)));
    let pid = process.child.id() as i32;
    let pid_arg = pid.to_string();
    assert!(eventually(Duration::from_secs(10), || loops(&output(&out))
        .len()
        >= 2));

    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid_arg, "2"]);
    assert!(ok, "migrate to 2: {stdout} {stderr}\n{}", cluster.log(1));
    assert_eq!(stdout.trim(), format!("{pid} runs on node 2"));
    let (_, ps, _) = omctl(cluster.socket(3), &["ps"]);
    let row: Vec<String> = ps
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(row[..3], [pid_arg.clone(), "1".into(), "2".into()], "{ps}");
    let pid_there: i32 = row[3].parse().expect("pid there");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == pid_there)),
        "{}",
        output(&out)
    );
    // Again to node 2: refused with the reason, nothing changes.
    let (ok, _, stderr) = omctl(&node1, &["migrate", &pid_arg, "2"]);
    assert!(!ok && stderr.contains("already runs on node 2"), "{stderr}");

    // Asked on the node it runs on, by its home pid: done by its home.
    let (ok, stdout, stderr) = omctl(cluster.socket(2), &["migrate", &pid_arg, "home"]);
    assert!(ok, "home: {stdout} {stderr}");
    assert!(
        eventually(Duration::from_secs(10), || !pid_running(pid_there)),
        "the copy on node 2 is gone"
    );
    let before = loops(&output(&out)).last().copied().expect("lines");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == pid && l.run > before.run)),
        "{}",
        output(&out)
    );
    let away = running_away(&node1);
    assert!(away.is_empty(), "nothing migrated: {away:?}");

    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid_arg, "3"]);
    assert!(ok, "migrate to 3: {stdout} {stderr}");
    let pid_there = listed_pid_there(&node1).expect("pid on node 3");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == pid_there)),
        "{}",
        output(&out)
    );
    // From node 3 straight to node 2, asked on node 3 (it goes through
    // its home).
    let (ok, stdout, stderr) = omctl(cluster.socket(3), &["migrate", &pid_arg, "2"]);
    assert!(ok, "migrate from 3 to 2: {stdout} {stderr}");
    assert_eq!(stdout.trim(), format!("{pid} runs on node 2"));
    let (_, ps, _) = omctl(&node1, &["ps"]);
    assert!(
        ps.lines()
            .nth(1)
            .is_some_and(|l| l.split_whitespace().nth(2) == Some("2")),
        "{ps}"
    );
    assert!(!pid_running(pid_there), "the copy on node 3 is gone");
    let pid_there = listed_pid_there(&node1).expect("pid on node 2");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == pid_there)),
        "{}",
        output(&out)
    );
    kill(pid, libc::SIGKILL).expect("kill -9 the home pid");
    let status = wait_status(&mut process.child, Duration::from_secs(10)).expect("it ends");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(
        eventually(Duration::from_secs(10), || !pid_running(pid_there)),
        "the copy on node 2 ended too"
    );
    assert!(
        eventually(Duration::from_secs(10), || omctl(&node1, &["ps"])
            .1
            .lines()
            .count()
            == 1),
        "nothing left migrated"
    );
    assert_continuous(&output(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process that ends while it runs on another node ends the same way at
/// home: its parent gets the real exit status, and IPC_RMID made there works.
#[test]
fn exit_status_of_a_migrated_process_reaches_its_parent() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("exit");
    let out = dir.join("out");
    let mut process = Proc::from(start_loop(&dir, 64 << 10, Some(&node1)));
    let pid = process.child.id() as i32;
    assert!(eventually(Duration::from_secs(10), || loops(&output(&out))
        .len()
        >= 2));
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "2"]);
    assert!(ok, "{stdout} {stderr}");
    kill(pid, libc::SIGTERM).expect("SIGTERM to the home pid");
    let status = wait_status(&mut process.child, Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "it ends\n{}\nnode 1:\n{}\nnode 2:\n{}",
            output(&out),
            cluster.log(1),
            cluster.log(2)
        )
    });
    let text = output(&out);
    assert_eq!(status.code(), Some(42), "{text}");
    assert!(text.contains("rmid 0"), "{text}");
    assert!(
        eventually(Duration::from_secs(10), || omctl(&node1, &["ps"])
            .1
            .lines()
            .count()
            == 1),
        "nothing left migrated"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pipe to the parent (the program's stdout) and a connected TCP socket
/// keep working while the process runs on another node and after it comes
/// home: every line reaches the parent in order, the socket answers, and
/// the parent reads end of file once the process ended.
#[test]
fn pipe_and_socket_work_through_migrations() {
    use std::io::{BufRead, Read, Write};
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("port").port();
    let prog = c_program("migrate_loop").expect("compile migrate_loop.c");
    let mut command = omrun_command(&node1, None, &prog);
    command
        .args(["65536", "shm"])
        .env("MIGRATE_ECHO_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    migshm::only_standard_fds(&mut command);
    let mut process = Proc::from(command.spawn().expect("start the loop"));
    let pid = process.child.id() as i32;
    let stdout = process.child.stdout.take().expect("stdout pipe");
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let eof = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (text, eof) = (text.clone(), eof.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let mut t = text
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                t.push_str(&line);
                t.push('\n');
            }
            eof.store(true, SeqCst);
        })
    };
    let seen = || {
        text.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    };
    let (mut sock, _) = listener.accept().expect("the program connects");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let ping = |sock: &mut std::net::TcpStream, word: &str| {
        sock.write_all(word.as_bytes()).expect("send");
        let mut buf = vec![0u8; 5 + word.len()];
        sock.read_exact(&mut buf).expect("the echo comes back");
        assert_eq!(String::from_utf8_lossy(&buf), format!("echo {word}"));
    };
    assert!(eventually(Duration::from_secs(10), || loops(&seen()).len() >= 2));
    ping(&mut sock, "at-home");

    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "2"]);
    assert!(ok, "{stdout} {stderr}");
    let pid_there = listed_pid_there(&node1).expect("pid on node 2");
    assert!(
        eventually(Duration::from_secs(10), || loops(&seen())
            .iter()
            .any(|l| l.pid == pid_there)),
        "lines from node 2 reach the parent's pipe: {}",
        seen()
    );
    ping(&mut sock, "on-node-2");
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "home"]);
    assert!(ok, "{stdout} {stderr}");
    let last = loops(&seen()).last().copied().expect("lines");
    assert!(
        eventually(Duration::from_secs(10), || loops(&seen())
            .iter()
            .any(|l| l.pid == pid && l.run > last.run)),
        "{}",
        seen()
    );
    ping(&mut sock, "home-again");
    // Away again, and it ends there: its last lines and the end of file
    // still reach the parent.
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "2"]);
    assert!(ok, "{stdout} {stderr}");
    ping(&mut sock, "away-again");
    kill(pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut process.child, Duration::from_secs(10)).expect("it ends");
    assert_eq!(status.code(), Some(42), "{}", seen());
    assert!(
        eventually(Duration::from_secs(10), || eof.load(SeqCst)),
        "the parent reads end of file"
    );
    let _ = reader.join();
    let all = seen();
    assert!(all.contains("rmid 0") && all.contains("done "), "{all}");
    assert_continuous(&all);
}

/// The destination node dies while the process is being rebuilt there:
/// `omctl migrate` fails with a reason, the process goes on at home as if
/// nothing happened, and nothing is left on either node.
#[test]
fn destination_killed_during_a_migration_leaves_the_process_at_home() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("dies");
    let out = dir.join("out");
    // 64 MiB: the rebuild takes long enough to be cut in the middle.
    let mut process = Proc::from(start_loop(&dir, 64 << 20, Some(&node1)));
    let pid = process.child.id() as i32;
    assert!(eventually(Duration::from_secs(20), || loops(&output(&out))
        .len()
        >= 2));
    let dsmd2 = cluster.node(2).pid().expect("node 2 runs");
    // Node 2 dies as soon as its host agent starts rebuilding the process.
    let killer = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            for host in migshm::agents_of(dsmd2) {
                if !children_of(host as u32).is_empty() {
                    let _ = kill(host, libc::SIGKILL);
                    let _ = kill(dsmd2 as i32, libc::SIGKILL);
                    return true;
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        false
    });
    let started = std::time::Instant::now();
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "2"]);
    assert!(
        killer.join().unwrap_or(false),
        "node 2 was never caught rebuilding"
    );
    assert!(!ok, "the move cannot succeed: {stdout}");
    assert!(stderr.starts_with("omctl: cannot migrate"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "bounded");
    let last = loops(&output(&out)).last().copied().expect("lines");
    assert!(
        eventually(Duration::from_secs(20), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == pid && l.run > last.run)),
        "the process goes on at home: {}",
        output(&out)
    );
    assert!(loops(&output(&out)).iter().all(|l| l.pid == pid));
    assert_eq!(running_away(&node1), Vec::<String>::new());
    kill(pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut process.child, Duration::from_secs(20)).expect("it ends");
    assert_eq!(status.code(), Some(42), "{}", output(&out));
    assert_continuous(&output(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Going home fails (the program's executable changed at home meanwhile):
/// the failure is reported, the process runs on where it was, and once the
/// cause is gone the same request succeeds.
#[test]
fn a_failed_return_is_reported_and_can_be_retried() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("retry");
    let out = dir.join("out");
    // A copy of the program of its own, to touch.
    let prog = dir.join("migrate_loop");
    std::fs::copy(c_program("migrate_loop").expect("compile"), &prog).expect("copy");
    let mtime = std::fs::metadata(&prog)
        .and_then(|m| m.modified())
        .expect("mtime");
    let mut command = omrun_command(&node1, None, &prog);
    command
        .args(["65536", "shm"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("output"))
        .stderr(Stdio::null());
    migshm::only_standard_fds(&mut command);
    let mut process = Proc::from(command.spawn().expect("start"));
    let pid = process.child.id() as i32;
    let pid_arg = pid.to_string();
    assert!(eventually(Duration::from_secs(10), || loops(&output(&out))
        .len()
        >= 2));
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid_arg, "2"]);
    assert!(ok, "{stdout} {stderr}");
    let set_mtime = |t: std::time::SystemTime| {
        // Read-only: the file is being executed. As its owner we may still
        // set its times.
        std::fs::File::open(&prog)
            .and_then(|f| f.set_modified(t))
            .expect("set mtime");
    };
    set_mtime(mtime + Duration::from_secs(60));
    let (ok, _, stderr) = omctl(&node1, &["migrate", &pid_arg, "home"]);
    assert!(!ok, "the return must fail");
    assert!(stderr.contains("is not the file"), "{stderr}");
    let pid_there = listed_pid_there(&node1).expect("still on node 2");
    let last = loops(&output(&out)).last().copied().expect("lines");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == pid_there && l.run > last.run + 20)),
        "it runs on on node 2: {}",
        output(&out)
    );
    set_mtime(mtime);
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid_arg, "home"]);
    assert!(ok, "the retry succeeds: {stdout} {stderr}");
    let last = loops(&output(&out)).last().copied().expect("lines");
    assert!(
        eventually(Duration::from_secs(10), || loops(&output(&out))
            .iter()
            .any(|l| l.pid == pid && l.run > last.run)),
        "{}",
        output(&out)
    );
    kill(pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut process.child, Duration::from_secs(10)).expect("it ends");
    assert_eq!(status.code(), Some(42), "{}", output(&out));
    assert_continuous(&output(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `omrun --node 2`: the program's home is node 1 (its pid, its parent)
/// but it runs on node 2 from its first line; it ends at home with its
/// status. A node that cannot take it: the program does not run (127).
#[test]
fn omrun_node_starts_the_program_elsewhere() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("node");
    let out = dir.join("out");
    let prog = c_program("migrate_loop").expect("compile");
    let start = |node: &str| {
        let mut command = Command::new(migshm::binary("omrun"));
        command
            .arg("--socket")
            .arg(&node1)
            .args(["--node", node, "--"])
            .arg(&prog)
            .args(["65536", "shm"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("output"))
            .stderr(Stdio::piped());
        migshm::only_standard_fds(&mut command);
        Proc::from(command.spawn().expect("start omrun --node"))
    };
    let mut process = start("2");
    let pid = process.child.id() as i32;
    assert!(
        eventually(Duration::from_secs(20), || !loops(&output(&out)).is_empty()),
        "{}",
        output(&out)
    );
    assert!(
        loops(&output(&out)).iter().all(|l| l.pid != pid),
        "every line comes from node 2: {}",
        output(&out)
    );
    let (_, ps, _) = omctl(&node1, &["ps"]);
    assert!(
        ps.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(&pid.to_string())),
        "{ps}"
    );
    kill(pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut process.child, Duration::from_secs(10)).expect("it ends");
    assert_eq!(status.code(), Some(42), "{}", output(&out));
    assert!(output(&out).contains("rmid 0"), "{}", output(&out));

    // Node 7 is not in the cluster.
    let mut refused = start("7");
    let status = wait_status(&mut refused.child, Duration::from_secs(20)).expect("it ends");
    assert_eq!(status.code(), Some(127));
    assert!(loops(&output(&out)).is_empty(), "the program never ran");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What cannot migrate is refused with the reason, and keeps running:
/// a process with two threads.
#[test]
fn a_threaded_process_is_refused_with_the_reason() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("threads");
    let out = dir.join("out");
    let prog = c_program("two_threads").expect("compile two_threads.c");
    let mut process = Proc::from(
        omrun_command(&node1, None, &prog)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("output"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start"),
    );
    assert!(eventually(Duration::from_secs(10), || output(&out).contains("ready")));
    let pid = process.child.id() as i32;
    let (ok, _, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "2"]);
    assert!(!ok);
    assert!(stderr.contains("2 threads"), "{stderr}");
    assert!(pid_running(pid), "it runs on at home");
    assert!(process.child.try_wait().ok().flatten().is_none());
    assert_eq!(running_away(&node1), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `omctl migrate --check PID` lists every reason a process stays home,
/// at once, without moving or stopping it; a process that can move is
/// said to.
#[test]
fn migrate_check_lists_every_reason_at_once() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("check");
    let out = dir.join("out");
    // Under omrun on node 1, given `dir`, until it says it is ready.
    let start_ready = |name: &str| {
        let prog = c_program(name).unwrap_or_else(|e| panic!("compile {name}.c: {e}"));
        let process = Proc::from(
            omrun_command(&node1, None, &prog)
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out).expect("output"))
                .stderr(Stdio::null())
                .spawn()
                .expect("start"),
        );
        assert!(eventually(Duration::from_secs(10), || output(&out).contains("ready")));
        process
    };
    let mut process = start_ready("cantmove");
    let pid = process.child.id() as i32;
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", "--check", &pid.to_string()]);
    assert!(!ok, "{stdout} {stderr}");
    assert!(
        stdout.starts_with(&format!("{pid} cannot move:")),
        "{stdout}"
    );
    for reason in [
        "2 threads",
        "anon_inode:[userfaultfd], which can be neither reopened, relayed nor served at home",
        "a unix seqpacket listening socket",
        "(deleted)\", which cannot be reopened",
    ] {
        assert!(stdout.contains(reason), "{reason:?} not in:\n{stdout}");
    }
    assert!(process.child.try_wait().ok().flatten().is_none());
    assert_eq!(running_away(&node1), Vec::<String>::new(), "nothing moved");
    drop(process);

    let mut process = start_ready("cr_env");
    let pid = process.child.id() as i32;
    let (ok, stdout, _) = omctl(&node1, &["migrate", "--check", &pid.to_string()]);
    assert!(ok && stdout.trim() == format!("{pid} can move"), "{stdout}");
    let (ok, _, _) = omctl(&node1, &["migrate", "--check", "999999999"]);
    assert!(!ok, "a process that does not exist");
    let _ = process.child.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A host takes nothing from a connection without the token the daemons
/// agreed on (nor an oversized first message): it reports the refusal,
/// starts nothing and ends.
#[test]
fn a_host_refuses_a_connection_without_the_token() {
    use std::io::Write;
    for first in [
        // A Hello with another token (postcard: variant 0, then the u128).
        {
            let mut m = vec![0u8];
            m.extend([0x01; 16]);
            m
        },
        // Garbage.
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
    ] {
        let (mut host, lines) = spawn_agent(&[
            "host",
            "--socket",
            "/nonexistent.sock",
            "--bind",
            "127.0.0.1",
            "--token",
            "0123456789abcdef0123456789abcdef",
        ]);
        let port = agent_line(&lines);
        let port = port.strip_prefix("listening ").expect("listening PORT");
        let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
        let _ = s.write_all(&(first.len() as u64).to_le_bytes());
        let _ = s.write_all(&first);
        let report = agent_line(&lines);
        assert!(report.starts_with("error "), "{report}");
        let status = host
            .wait_timeout(Duration::from_secs(10))
            .expect("the host ends");
        assert!(!status.success());
    }
    // A first message announcing 1 TiB is refused before any allocation.
    let (mut host, lines) = spawn_agent(&[
        "host",
        "--socket",
        "/nonexistent.sock",
        "--bind",
        "127.0.0.1",
        "--token",
        "0123456789abcdef0123456789abcdef",
    ]);
    let port = agent_line(&lines);
    let port = port.strip_prefix("listening ").expect("listening PORT");
    let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).expect("connect");
    let _ = s.write_all(&(1u64 << 40).to_le_bytes());
    assert!(agent_line(&lines).starts_with("error "));
    assert!(host.wait_timeout(Duration::from_secs(10)).is_some());
}

/// Anonymous shared memory made before a fork is a DSM object under omrun,
/// and so is POSIX shared memory (shm_open + mmap): the child, moved to
/// node 2 and home again while it ping-pongs with its parent through that
/// memory, never sees a turn out of order, and the two keep going wherever
/// the child runs. The POSIX object goes with shm_unlink at the end.
#[test]
fn a_forked_child_sharing_memory_moves_and_stays_coherent() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let posix_name = format!("/migshm-pingpong-{}", std::process::id());
    for posix in [None, Some(posix_name.as_str())] {
        let dir = tempdir(if posix.is_some() { "posix" } else { "anon" });
        let env: Vec<(&str, &std::ffi::OsStr)> = posix
            .map(|name| ("SHARED_POSIX", std::ffi::OsStr::new(name)))
            .into_iter()
            .collect();
        let (mut parent, out) = start_c_under_omrun(&node1, "shared_anon", &dir, &env);
        let turns = || {
            output(&out)
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("turns ")?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        assert!(
            eventually(Duration::from_secs(10), || turns() >= 2000),
            "{}",
            output(&out)
        );
        let child: i32 = output(&out)
            .lines()
            .find_map(|l| l.strip_prefix("child ")?.parse().ok())
            .expect("child line");
        // The mapping is a segment of the cluster's, attached by both:
        // keyless and removed at once (anonymous), or keyed (POSIX).
        let admin = dsm::client::Client::connect(&node1).expect("connect");
        let segments = admin.ipcs().expect("ipcs");
        const SHM_DEST: u32 = 0o1000;
        assert!(
            segments.iter().any(|s| s.size == 4096
                && s.nattch == 2
                && if posix.is_some() {
                    s.perm.key != 0 && s.perm.mode & SHM_DEST == 0
                } else {
                    s.perm.key == 0 && s.perm.mode & SHM_DEST != 0
                }),
            "{posix:?}: {segments:?}"
        );
        let (ok, stdout, stderr) = omctl(&node1, &["migrate", &child.to_string(), "2"]);
        assert!(ok, "{stdout} {stderr}");
        let before = turns();
        assert!(
            eventually(Duration::from_secs(20), || turns() >= before + 2000),
            "the ping-pong goes on across nodes: {}",
            output(&out)
        );
        let (ok, stdout, stderr) = omctl(&node1, &["migrate", &child.to_string(), "home"]);
        assert!(ok, "{stdout} {stderr}");
        let before = turns();
        assert!(
            eventually(Duration::from_secs(20), || turns() >= before + 2000),
            "{}",
            output(&out)
        );
        kill(parent.child.id() as i32, libc::SIGTERM).expect("SIGTERM");
        let status = wait_status(&mut parent.child, Duration::from_secs(20)).expect("it ends");
        let text = output(&out);
        assert_eq!(status.code(), Some(0), "{text}");
        assert!(text.contains("child-status 0"), "{text}");
        if posix.is_some() {
            assert!(text.contains("unlink 0"), "{text}");
        }

        assert!(
            eventually(Duration::from_secs(5), || admin
                .ipcs()
                .is_ok_and(|l| l.is_empty())),
            "left behind: {:?}",
            admin.ipcs()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The number `tag` (e.g. "semid") the loop printed first.
fn printed_id(out: &Path, tag: &str) -> Option<i32> {
    output(out)
        .lines()
        .find_map(|l| l.strip_prefix(tag)?.trim().parse().ok())
}

/// A process that works a semaphore set (P and V each loop, with or
/// without SEM_UNDO) moves there and back, three times, each time while it
/// waits in a `semop` (a gate the test holds closed): the wait is
/// withdrawn, asked again on the node it lands on, and ends there when the
/// test opens the gate. Every value it checks stays right. With SEM_UNDO,
/// the adjustments it made at home and away stay in force through the
/// moves (none undone when a copy is left behind) and are all undone when
/// it is killed.
#[test]
fn semaphore_users_move_even_while_they_wait_and_keep_their_undo() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let sems = semaphore::Semaphores::connect(&node1).expect("connect");
    for mode in ["plain", "undo"] {
        let dir = tempdir(&format!("sem-{mode}"));
        let out = dir.join("out");
        let mut process = Proc::from(start_loop_with(
            &dir,
            65536,
            Some(&node1),
            &[("MIGRATE_SEM", mode)],
        ));
        let pid = process.child.id() as i32;
        assert!(eventually(Duration::from_secs(10), || loops(&output(&out))
            .len()
            >= 2));
        let set = sems.open(printed_id(&out, "semid ").expect("semid"));
        for round in 0..3 {
            set.set_value(1, 1).expect("close the gate");
            std::thread::sleep(Duration::from_millis(30));
            let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "2"]);
            assert!(ok, "{mode} round {round}: {stdout} {stderr}");
            let there = listed_pid_there(&node1).expect("pid on node 2");
            assert_eq!(set.get_ncnt(0).expect("GETNCNT"), 0);
            let last = loops(&output(&out)).last().copied().expect("lines");
            set.set_value(1, 0).expect("open the gate");
            assert!(
                eventually(Duration::from_secs(10), || loops(&output(&out))
                    .iter()
                    .any(|l| l.pid == there && l.run > last.run + 100)),
                "{mode}: it goes on on node 2: {}",
                output(&out)
            );
            let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "home"]);
            assert!(ok, "{mode} round {round}: {stdout} {stderr}");
            let last = loops(&output(&out)).last().copied().expect("lines");
            assert!(
                eventually(Duration::from_secs(10), || loops(&output(&out))
                    .iter()
                    .any(|l| l.pid == pid && l.run > last.run + 100)),
                "{mode}: it goes on at home: {}",
                output(&out)
            );
        }
        let text = output(&out);
        assert!(!text.contains("failure"), "{mode}: {text}");
        if mode == "undo" {
            let ups = set.get_value(2).expect("GETVAL");
            assert!(ups > 0, "{text}");
            kill(pid, libc::SIGKILL).expect("SIGKILL");
            wait_status(&mut process.child, Duration::from_secs(10)).expect("it ends");
            assert!(
                eventually(Duration::from_secs(10), || set.get_value(2).ok() == Some(0)),
                "every adjustment (here {ups}) undone at its end: {:?}",
                set.get_value(2)
            );
            set.remove().expect("IPC_RMID");
            let shmid = printed_id(&out, "shmid ").expect("shmid");
            dsm::client::Client::connect(&node1)
                .and_then(|c| c.remove(shmid))
                .expect("shm IPC_RMID");
        } else {
            kill(pid, libc::SIGTERM).expect("SIGTERM");
            let status = wait_status(&mut process.child, Duration::from_secs(10)).expect("it ends");
            let text = output(&out);
            assert_eq!(status.code(), Some(42), "{mode}: {text}");
            assert!(
                text.contains("semrmid 0") && text.contains("rmid 0"),
                "{text}"
            );
        }
        assert_continuous(&output(&out));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Queued signals sent to the home pid at any moment of moves there and
/// back are each delivered exactly once (none lost in a checkpoint, none
/// twice), including while the process blocks them (it does for most of
/// each loop, so they wait in its queue when it is stopped).
#[test]
fn every_signal_sent_during_moves_arrives_once() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("signals");
    let out = dir.join("out");
    let mut process = Proc::from(start_loop_with(
        &dir,
        1 << 20,
        Some(&node1),
        &[("MIGRATE_BLOCK_RT", "1")],
    ));
    let pid = process.child.id() as i32;
    assert!(eventually(Duration::from_secs(10), || loops(&output(&out))
        .len()
        >= 2));
    const SENT: i32 = 600;
    let sender = std::thread::spawn(move || {
        for _ in 0..SENT {
            // SAFETY: a plain kill with the pid we started.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGRTMIN() + 1) }, 0);
            std::thread::sleep(Duration::from_micros(700));
        }
    });
    for round in 0..3 {
        let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "2"]);
        assert!(ok, "round {round} away: {stdout} {stderr}");
        std::thread::sleep(Duration::from_millis(40));
        let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "home"]);
        assert!(ok, "round {round} home: {stdout} {stderr}");
        std::thread::sleep(Duration::from_millis(40));
    }
    sender.join().expect("sender");
    // Let the last ones land, then end.
    std::thread::sleep(Duration::from_millis(200));
    kill(pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut process.child, Duration::from_secs(10)).expect("it ends");
    let text = output(&out);
    assert_eq!(status.code(), Some(42), "{text}");
    let rt: i32 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("done ")?
                .split("rt ")
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .expect("done line");
    assert_eq!(rt, SENT, "queued signals delivered: {text}");
    assert_continuous(&text);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One request to the accept_server on `port`: its answer.
fn ask(port: u16, line: &str) -> String {
    let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    request(s, line)
}

/// `line` sent over a connection, and all it answers until it closes.
fn request(mut s: impl std::io::Read + std::io::Write, line: &str) -> String {
    let _ = s.write_all(line.as_bytes());
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

/// A server blocked in accept() on its listening socket moves to node 2:
/// connections to its port (which stays at home) are answered by the copy
/// there, one after another, and by the process at home once it is back.
#[test]
fn a_server_blocked_in_accept_serves_its_port_from_another_node() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("accept");
    let (mut server, out) = start_c_under_omrun(&node1, "accept_server", &dir, &[]);
    let pid = server.child.id() as i32;
    assert!(eventually(Duration::from_secs(10), || printed_id(
        &out, "port "
    )
    .is_some()));
    let port = printed_id(&out, "port ").expect("port") as u16;
    assert_eq!(ask(port, "one"), format!("pid {pid}: one"));
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "2"]);
    assert!(ok, "{stdout} {stderr}");
    let there = listed_pid_there(&node1).expect("pid on node 2");
    for n in 0..20 {
        assert_eq!(
            ask(port, &format!("away {n}")),
            format!("pid {there}: away {n}")
        );
    }
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "home"]);
    assert!(ok, "{stdout} {stderr}");
    assert_eq!(ask(port, "back"), format!("pid {pid}: back"));
    kill(pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut server.child, Duration::from_secs(10)).expect("it ends");
    assert_eq!(status.code(), Some(0), "{}", output(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same server on a unix stream socket bound to a path: connections
/// to that path (a socket file of the home node) are answered by the copy
/// on node 2, and by the process at home once it is back.
#[test]
fn a_server_blocked_in_accept_serves_its_unix_socket_from_another_node() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("unix-listener");
    let sock = dir.join("sock");
    let (mut server, out) = start_c_under_omrun(
        &node1,
        "accept_server",
        &dir,
        &[("ACCEPT_UNIX", sock.as_os_str())],
    );
    let pid = server.child.id() as i32;
    assert!(eventually(Duration::from_secs(10), || printed_id(
        &out, "port "
    )
    .is_some()));
    let ask_unix = |line: &str| {
        let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        request(s, line)
    };
    assert_eq!(ask_unix("one"), format!("pid {pid}: one"));
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "2"]);
    assert!(ok, "{stdout} {stderr}");
    let there = listed_pid_there(&node1).expect("pid on node 2");
    for n in 0..20 {
        assert_eq!(
            ask_unix(&format!("away {n}")),
            format!("pid {there}: away {n}")
        );
    }
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "home"]);
    assert!(ok, "{stdout} {stderr}");
    assert_eq!(ask_unix("back"), format!("pid {pid}: back"));
    kill(pid, libc::SIGTERM).expect("SIGTERM");
    let status = wait_status(&mut server.child, Duration::from_secs(10)).expect("it ends");
    assert_eq!(status.code(), Some(0), "it ran on: {}", output(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The daemon of the node a moved process runs on dies (its DSM service
/// is gone, as when the node is lost): the process ends everywhere (SIGKILL
/// at home, as its parent sees), and no agent or copy is left behind.
#[test]
fn the_daemon_of_the_node_it_runs_on_dies_and_the_process_ends_everywhere() {
    if !uffd_or_skip() {
        return;
    }
    let mut cluster = Cluster::start(2).expect("start 2 daemons");
    let node1 = cluster.socket(1).to_path_buf();
    let dir = tempdir("daemon-lost");
    let out = dir.join("out");
    let mut process = Proc::from(start_loop(&dir, 1 << 20, Some(&node1)));
    let pid = process.child.id() as i32;
    assert!(eventually(Duration::from_secs(10), || loops(&output(&out))
        .len()
        >= 2));
    let (ok, stdout, stderr) = omctl(&node1, &["migrate", &pid.to_string(), "2"]);
    assert!(ok, "{stdout} {stderr}");
    let there = listed_pid_there(&node1).expect("pid on node 2");
    // Field 4 of /proc/PID/stat: the copy's parent, its host.
    let host = migrate::procfs::stat_fields(there).expect("the copy's stat")[4] as i32;
    cluster.kill(2);
    let status = wait_status(&mut process.child, Duration::from_secs(10)).expect("it ends");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", output(&out));
    assert!(
        eventually(Duration::from_secs(10), || !pid_running(there)
            && !pid_running(host)),
        "the copy or its host was left behind"
    );
    let daemon = cluster.node(1).pid().expect("node 1's daemon");
    assert!(
        eventually(Duration::from_secs(10), || migshm::agents_of(daemon)
            .is_empty()),
        "the deputy was left behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
