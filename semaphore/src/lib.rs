//! Distributed SysV semaphore sets arbitrated by each set's home node.

pub use sysv::sem as engine;

pub use dsm::ids::NodeId;
