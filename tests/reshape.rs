//! Mappings reshaped behind the interposer's back (issue 11, item 2): the
//! C program `reshape.c` unmaps, moves, grows, shrinks, protects, advises
//! and maps over parts of anonymous shared memory (also from /dev/zero),
//! a SysV segment and a POSIX object, forks, and prints what the memory
//! holds at every step. It must print the same natively and under omrun:
//! on one node, with its objects homed on another, and moved to another
//! node (and back) between its two halves.

use migshm::{c_program, omctl, omrun_command, uffd_or_skip, Cluster};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Run `program pause` from `command`, feeding the line that ends its
/// pause after `at_pause` ran; returns what it printed.
fn run_paused(mut command: Command, out: &Path, at_pause: impl FnOnce(u32)) -> String {
    command
        .arg("pause")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(out).expect("output file"))
        .stderr(Stdio::inherit());
    migshm::only_standard_fds(&mut command);
    let mut child = migshm::Proc::from(command.spawn().expect("start reshape"));
    let read = || std::fs::read_to_string(out).unwrap_or_default();
    assert!(
        migshm::eventually(Duration::from_secs(30), || read().contains("paused")),
        "it never paused: {}",
        read()
    );
    at_pause(child.child.id());
    let mut stdin = child.child.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("release it");
    drop(stdin);
    let status = child
        .wait_timeout(Duration::from_secs(60))
        .expect("reshape hung");
    assert!(status.success(), "reshape: {status:?}\n{}", read());
    read()
}

#[test]
fn reshaped_mappings_keep_the_kernels_meaning_on_every_node_and_across_moves() {
    if !uffd_or_skip() {
        return;
    }
    let program = c_program("reshape").expect("compile reshape.c");
    let dir = std::env::temp_dir().join(format!("migshm-reshape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut native = Command::new("unshare");
    native.arg("--ipc").arg("--").arg(&program);
    let expected = run_paused(native, &dir.join("native"), |_| {});

    let cluster = Cluster::start(2).expect("start 2 daemons");
    let socket1 = cluster.socket(1).to_path_buf();
    for (home, what) in [(None, "on node 1"), (Some(2), "on node 1, homed on node 2")] {
        let out = run_paused(
            omrun_command(&socket1, home, &program),
            &dir.join("omrun"),
            |_| {},
        );
        migshm::assert_same_output(what, &expected, &out);
    }
    // Moved between its halves, with every reshaped mapping of the first
    // half still there: to node 2 (where the second half runs), and to
    // node 2 and back.
    for back in [false, true] {
        let out = run_paused(
            omrun_command(&socket1, None, &program),
            &dir.join("moved"),
            |pid| {
                let pid = pid.to_string();
                let (ok, stdout, stderr) = omctl(&socket1, &["migrate", &pid, "2"]);
                assert!(ok, "migrate to 2: {stdout} {stderr}");
                let (_, ps, _) = omctl(&socket1, &["ps"]);
                assert!(
                    ps.lines().any(|l| l.starts_with(&pid)),
                    "not listed as moved: {ps}"
                );
                if back {
                    let (ok, stdout, stderr) = omctl(&socket1, &["migrate", &pid, "home"]);
                    assert!(ok, "migrate home: {stdout} {stderr}");
                }
            },
        );
        migshm::assert_same_output(
            if back {
                "moved to node 2 and back"
            } else {
                "moved to node 2"
            },
            &expected,
            &out,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
