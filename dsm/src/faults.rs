//! Named fault-injection points, as CRIU has: with `MIGSHM_FAULT=NAME`
//! (or `NAME@N`: the N-th time it is reached; several separated by
//! commas) in its environment, a daemon or agent kills itself (SIGKILL,
//! no clean-up of any kind) when it reaches that point. The agents
//! inherit the daemon's environment, so one variable on a daemon arms the
//! points of the agents it starts too.
//!
//! Every point is listed in [`POINTS`], which the fault-injection tests
//! walk through: kill at each, then check that no process read wrong
//! data, nothing hangs and nothing is left behind.

use std::sync::Mutex;

/// The environment variable that arms points.
pub const FAULT_ENV: &str = "MIGSHM_FAULT";

/// Every point, with the stage it stands for.
pub const POINTS: &[(&str, &str)] = &[
    (
        "deputy.connected",
        "deputy: connected to the host, process not stopped yet",
    ),
    (
        "deputy.seized",
        "deputy: process stopped, before its checkpoint",
    ),
    (
        "deputy.checkpointed",
        "deputy: checkpoint taken, image not sent",
    ),
    (
        "deputy.before_go",
        "deputy: copy built and reported, home process set to die with us, Go not sent",
    ),
    (
        "deputy.after_go",
        "deputy: the copy runs, its memory still streams from home",
    ),
    (
        "deputy.streaming",
        "deputy: sending a batch of lazily moved memory",
    ),
    (
        "deputy.returning",
        "deputy: the copy's checkpoint arrived, home process not rebuilt",
    ),
    (
        "deputy.restored",
        "deputy: home process rebuilt, HomeOk not sent",
    ),
    ("host.image", "host: image received, nothing rebuilt"),
    (
        "host.restored",
        "host: copy rebuilt (stopped), not registered with its daemon",
    ),
    ("host.before_run", "host: Go received, copy not let run"),
    (
        "host.serving",
        "host: serving a fault on lazily moved memory",
    ),
    (
        "host.checkpointed",
        "host: called home, copy checkpointed, image not sent",
    ),
    ("host.home_ok", "host: HomeOk received, copy not killed yet"),
    (
        "dsmd.start_host",
        "daemon: host agent started for a move here",
    ),
    (
        "dsmd.adopt",
        "daemon: attachments of a moved process adopted, not answered",
    ),
    (
        "dsmd.remote_fault",
        "daemon: a fault on a page homed on another node",
    ),
];

/// Counts of the armed points reached so far.
static REACHED: Mutex<Vec<(String, u32)>> = Mutex::new(Vec::new());

/// Reach point `name`: if it is armed (for this time), die at once.
pub fn point(name: &str) {
    debug_assert!(
        POINTS.iter().any(|(p, _)| *p == name),
        "unlisted point {name}"
    );
    let Some(armed) = std::env::var_os(FAULT_ENV) else {
        return;
    };
    let armed = armed.to_string_lossy();
    let Some(at) = armed.split(',').find_map(|spec| {
        let (p, n) = spec.split_once('@').unwrap_or((spec, "1"));
        (p.trim() == name).then(|| n.trim().parse::<u32>().unwrap_or(1))
    }) else {
        return;
    };
    let count = {
        let mut reached = REACHED.lock().unwrap_or_else(|e| e.into_inner());
        match reached.iter_mut().find(|(p, _)| p == name) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                reached.push((name.to_string(), 1));
                1
            }
        }
    };
    if count == at {
        // Stderr directly: the log line must be out before we die.
        eprintln!("fault point {name} reached ({count}): killing myself");
        // SAFETY: raise takes a signal number; SIGKILL ends this process.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}
