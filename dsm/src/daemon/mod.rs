//! `dsmd`, the node daemon: serves local processes over a unix socket and
//! the other nodes over TCP, on one thread (the fault path then needs no
//! hop between threads, DESIGN.md §8).

pub mod balance;
pub mod clients;
pub mod config;
mod core;
pub mod gossip;
pub mod load;
mod migration;
mod peers;
mod placement;
pub mod sems;
#[cfg(test)]
mod sems_sim;
mod store;
pub mod wakeups;

pub use config::{Args, Config};
pub use migration::AGENT_PARENT_ENV;

use std::cell::RefCell;
use std::rc::Rc;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("userfaultfd is not usable here: {0}")]
    NoUserfaultfd(String),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("cannot bind the local socket {0}: {1}")]
    Socket(String, std::io::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the guardian (dsmd next to this program)")]
    Guardian,
}

/// Run the daemon until SIGTERM/SIGINT.
/// How often a node tells one other its load (`gossip.rs`).
const GOSSIP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub fn run(config: Config) -> Result<(), DaemonError> {
    match crate::uffd::probe_features() {
        Ok(f) if f & crate::uffd::REQUIRED_FEATURES == crate::uffd::REQUIRED_FEATURES => {}
        Ok(f) => {
            return Err(DaemonError::NoUserfaultfd(format!(
                "missing features (kernel offers {f:#x})"
            )))
        }
        Err(e) => return Err(DaemonError::NoUserfaultfd(e.to_string())),
    }
    crate::memfd::reuse_page_buffers();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(config))
}

async fn serve(config: Config) -> Result<(), DaemonError> {
    let tcp = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| DaemonError::Listen(config.listen.to_string(), e))?;
    // A socket file left by a daemon that died is replaced; a live one is not.
    if std::os::unix::net::UnixStream::connect(&config.socket).is_err() {
        let _ = std::fs::remove_file(&config.socket);
    }
    let unix = tokio::net::UnixListener::bind(&config.socket)
        .map_err(|e| DaemonError::Socket(config.socket.display().to_string(), e))?;
    // Every local user may connect, as every user may call shmget: access
    // is checked per segment with the caller's credentials.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| DaemonError::Socket(config.socket.display().to_string(), e))?;
    }
    if config.cpus_given {
        // Its own threads, the guardian and what it starts: on its CPUs.
        load::pin(0, &config.cpus).map_err(DaemonError::Runtime)?;
    }
    let core = Rc::new(RefCell::new(core::Core::new(&config)));
    core.borrow_mut().load = load::start_sampler(config.cpus.clone(), config.speed);
    core.borrow_mut().self_ref = Rc::downgrade(&core);
    // No process is served before something outlives this daemon with
    // their uffds (see `crate::guardian`).
    if !core.borrow_mut().restart_guardian() {
        return Err(DaemonError::Guardian);
    }
    tokio::task::spawn_local(watch_guardian(core.clone()));
    let identity = Rc::new(peers::Identity {
        me: config.node,
        incarnation: core.borrow().incarnation,
        secret: config.secret.clone(),
        members: config.members(),
    });
    tracing::info!(node = ?config.node, listen = %config.listen, socket = %config.socket.display(), "dsmd up");
    tokio::task::spawn_local(peers::accept_loop(core.clone(), tcp, identity.clone()));
    for (node, address) in &config.peers {
        if *node > config.node {
            tokio::task::spawn_local(peers::dial_loop(
                core.clone(),
                *node,
                *address,
                identity.clone(),
            ));
        }
    }
    tokio::task::spawn_local(clients::accept_loop(core.clone(), unix));
    tokio::task::spawn_local(wakeups::release_loop(core.clone()));
    // Semaphore work that waits for a process to let go of a set's values.
    let retry_core = core.clone();
    let retry = core.borrow().sem_retry.clone();
    tokio::task::spawn_local(async move {
        loop {
            retry.notified().await;
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                if !retry_core.borrow_mut().retry_deferred_sems() {
                    break;
                }
            }
        }
    });
    let heartbeat_core = core.clone();
    let (heartbeat, timeout) = (config.heartbeat, config.peer_timeout);
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            heartbeat_core.borrow_mut().heartbeat(timeout);
        }
    });
    let gossip_core = core.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(GOSSIP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            gossip_core.borrow_mut().gossip_tick();
        }
    });
    let balance_core = core.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(balance::ROUND_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            placement::round(&balance_core);
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Runtime)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("dsmd stopping");
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// Start a new guardian whenever the current one is gone (it never writes
/// to its socket: the socket turns readable when it ends).
async fn watch_guardian(core: Rc<RefCell<core::Core>>) {
    loop {
        let watched = core.borrow().guardian.as_ref().and_then(|g| {
            let fd = g.socket().try_clone_to_owned().ok()?;
            Some((g.pid(), fd))
        });
        let Some((pid, fd)) = watched else {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            core.borrow_mut().restart_guardian();
            continue;
        };
        crate::pidfd::readable(fd).await;
        let current = core.borrow().guardian.as_ref().map(|g| g.pid());
        if current == Some(pid) {
            tracing::error!(pid, "the guardian is gone; starting a new one");
            core.borrow_mut().restart_guardian();
        }
    }
}
