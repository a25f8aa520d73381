//! Cross-crate suites: several app instances sharing one Redis, clusters and
//! chaos. The suites live in `tests/`; this library is empty.
