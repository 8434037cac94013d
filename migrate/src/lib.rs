//! Process migration between nodes: checkpoint a single-threaded process
//! held under ptrace into an [`Image`], and restore an image into another
//! process so that it continues where the first one stopped.
//!
//! DSM segments are not part of an image's memory: they are re-attached on
//! the destination node and fault in through the coherence protocol.

pub mod accept;
pub mod checkpoint;
pub mod daemon;
pub mod deputy;
pub mod forward;
pub mod home_calls;
pub mod home_io;
pub mod home_pids;
pub mod host;
pub mod host_calls;
pub mod image;
pub mod lazy;
pub mod link;
pub mod procfs;
pub mod ptrace;
pub mod relay;
pub mod restore;
pub mod seccomp;
pub mod waits;

pub use checkpoint::checkpoint;
pub use dsm::ids::NodeId;
pub use image::Image;
pub use restore::{restore_fresh, restore_into, Restored};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The process cannot move, and why (openMosix's "stay reasons").
    #[error("cannot migrate: {0}")]
    CannotMigrate(String),
    #[error("link between deputy and host: {0}")]
    Link(String),
    #[error("daemon: {0}")]
    Daemon(String),
    #[error("restore failed: {0}")]
    Restore(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
