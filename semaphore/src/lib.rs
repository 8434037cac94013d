//! Distributed SysV semaphore sets arbitrated by each set's home node.
//!
//! Not built yet: this crate is the home of issue 3's engine. It shares the
//! cluster-wide IPC namespace and transport of the `dsm` crate.

pub use dsm::ids::NodeId;
