//! Distributed SysV semaphore sets arbitrated by each set's home node.
//!
//! `engine`: the semantics of one set, as Linux implements them (pure).
//! The distribution (requests to the home, blocking, cancellation, undo on
//! process and node loss) and the library API build on it (issue 3).

pub mod engine;

pub use dsm::ids::NodeId;
