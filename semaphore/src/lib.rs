//! SysV semaphore sets that every node of the cluster shares, each
//! arbitrated by its home node (the node that created it), with the Linux
//! kernel's semantics.
//!
//! * [`engine`]: the semantics of one set (pure; from the `sysv` crate).
//! * [`client`]: the library API for Rust programs ([`Semaphores`]).
//!
//! `dsmd` serves the sets: a set's home applies every operation on it, in
//! arrival order, and keeps its waiters; other nodes forward operations to
//! it. `GETPID` reports the pid the process has on its own node (the node
//! it was started on, also after a migration): a process comparing it with
//! its `getpid()` finds them equal, as natively. See `docs/architecture.md`.

pub mod client;
pub use sysv::sem as engine;

pub use client::{Error, SemSet, Semaphores};
pub use dsm::ids::NodeId;
pub use dsm::sysv::{IPC_CREAT, IPC_EXCL};
pub use dsm::wire::SemSetStat;
pub use sysv::sem::{SemBuf, IPC_NOWAIT, SEM_UNDO};
