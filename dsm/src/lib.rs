//! `dsm`: SysV-style shared memory kept coherent across the nodes of a cluster.
//!
//! See `docs/architecture.md` for how the pieces fit.

pub mod bench;
pub mod client;
pub mod coherence;
pub mod daemon;
pub mod faults;
pub mod fdpass;
pub mod guardian;
pub mod ids;
pub mod memfd;
pub mod pidfd;
pub mod semregion;
pub mod sysv;
pub mod uffd;
pub mod wire;
