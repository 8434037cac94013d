//! Top-level package of migshm: the local cluster harness used by the
//! examples and the integration tests.
