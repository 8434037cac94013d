//! The interposer's state: connections to the local daemon, made on first
//! use, and the process's attachments by address. No `unsafe` here.

use dsm::client::{Attachment, Client, Error};
use semaphore::Semaphores;
use std::sync::{Mutex, OnceLock};

pub struct Runtime {
    pub segments: Client,
    pub sems: Semaphores,
    /// Where the objects this program creates are homed (`omrun --home`).
    pub home: Option<dsm::ids::NodeId>,
    /// Every attachment of the process, so `shmdt` finds it by address.
    pub attached: Mutex<Vec<Attachment>>,
}

/// What the first call found.
enum Found {
    /// Not under `omrun`: the real libc serves.
    Native,
    Daemon(Runtime),
    /// Under `omrun`, but the daemon could not be reached.
    Unreachable(String),
}

static RUNTIME: OnceLock<Found> = OnceLock::new();

/// Set by `omrun --home NODE`: the node that homes what the program creates.
pub const HOME_ENV: &str = "MIGSHM_HOME";

/// How a call is served.
pub enum Route {
    Native,
    Daemon(&'static Runtime),
    /// The errno to fail with.
    Fail(i32),
}

pub fn route() -> Route {
    let found = RUNTIME.get_or_init(|| {
        let Some(path) = std::env::var_os(dsm::client::SOCKET_ENV) else {
            return Found::Native;
        };
        let connected = Client::connect(&path).and_then(|segments| {
            let sems = Semaphores::connect(&path)?;
            let home = std::env::var(HOME_ENV)
                .ok()
                .and_then(|v| v.parse::<u8>().ok())
                .and_then(dsm::ids::NodeId::new);
            Ok(Runtime {
                segments,
                sems,
                home,
                attached: Mutex::new(Vec::new()),
            })
        });
        match connected {
            Ok(rt) => Found::Daemon(rt),
            Err(e) => Found::Unreachable(e.to_string()),
        }
    });
    match found {
        Found::Native => Route::Native,
        Found::Daemon(rt) => Route::Daemon(rt),
        Found::Unreachable(why) => {
            report_once(why);
            // SysV IPC is not available to this program: what Linux says
            // when it is compiled out.
            Route::Fail(libc::ENOSYS)
        }
    }
}

fn report_once(why: &str) {
    static REPORTED: std::sync::Once = std::sync::Once::new();
    REPORTED.call_once(|| eprintln!("migshm: SysV IPC unavailable: {why}"));
}

/// The errno for a failed call on an existing object: a daemon that went
/// away makes the object gone for this process.
pub fn errno_of(e: &Error) -> i32 {
    match e {
        Error::Errno(n) => *n,
        Error::Io(_) | Error::Protocol(_) => libc::EIDRM,
        // Only administrative requests are refused with a reason.
        Error::Refused(_) => libc::EINVAL,
        Error::Unreachable { .. } | Error::NoSocket => libc::ENOSYS,
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
