//! The Linux kernel is the reference: C programs exercising the SysV
//! edges (enumeration by index, the info commands, SHM_LOCK, every kind of
//! bad argument and the order of checks, limits changed at run time,
//! IPC_RMID racing other calls) print the same lines run natively, in an
//! IPC namespace of their own, as under omrun on a fresh cluster: on one
//! node, with their objects homed on another, and from the other node.

use migshm::{c_program, uffd_or_skip, Cluster, ClusterOptions};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Run `program` natively in a new IPC namespace (nothing else's objects,
/// the default limits).
fn native(program: &Path) -> String {
    let out = Command::new("unshare")
        .arg("--ipc")
        .arg("--")
        .arg(program)
        .output()
        .expect("run natively");
    assert!(out.status.success(), "native run failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `program` under omrun through `cluster` (in its IPC namespace if it
/// has one), on node `node`, its objects homed on `home`.
fn under_omrun(cluster: &Cluster, node: u8, home: Option<u8>, program: &Path) -> String {
    let mut cmd = cluster.command(&migshm::binary("omrun"));
    cmd.arg("--socket").arg(cluster.socket(node));
    if let Some(h) = home {
        cmd.arg("--home").arg(h.to_string());
    }
    cmd.arg("--")
        .arg(program)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let (status, out) = migshm::Proc::from(cmd.spawn().expect("start omrun"))
        .output(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{} hung under omrun", program.display()));
    assert!(status.success(), "under omrun: {status:?}\n{out}");
    out
}

/// The program natively, then under omrun three ways, each on a cluster
/// of its own.
fn differential(name: &str, opts: ClusterOptions) {
    if !uffd_or_skip() {
        return;
    }
    let program = c_program(name).unwrap_or_else(|e| panic!("compile {name}.c: {e}"));
    let expected = native(&program);
    for (node, home, what) in [
        (1, None, "on node 1"),
        (1, Some(2), "on node 1, homed on node 2"),
        (2, Some(1), "on node 2, homed on node 1"),
    ] {
        let cluster = Cluster::start_with(opts.clone()).expect("start a cluster");
        migshm::assert_same_output(
            &format!("{name} {what}"),
            &expected,
            &under_omrun(&cluster, node, home, &program),
        );
    }
}

fn two_nodes() -> ClusterOptions {
    ClusterOptions {
        nodes: 2,
        ..Default::default()
    }
}

#[test]
fn enumeration_by_index_info_and_shm_lock_match_the_kernel() {
    differential("sysv_enum", two_nodes());
}

#[test]
fn bad_arguments_and_the_order_of_checks_match_the_kernel() {
    differential("sysv_errors", two_nodes());
}

#[test]
fn limits_changed_at_run_time_match_the_kernel() {
    differential(
        "sysv_limits",
        ClusterOptions {
            ipc_namespace: true,
            ..two_nodes()
        },
    );
}

#[test]
fn ipc_rmid_racing_other_calls_matches_the_kernel() {
    differential("sysv_races", two_nodes());
}

#[test]
fn next_id_sysctls_match_the_kernel() {
    differential(
        "sysv_next_id",
        ClusterOptions {
            ipc_namespace: true,
            ..two_nodes()
        },
    );
}
