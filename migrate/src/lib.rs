//! Process migration between nodes (issue 5). Not built yet.

pub use dsm::ids::NodeId;
