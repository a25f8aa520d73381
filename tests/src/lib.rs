//! Cross-crate suites: several app instances sharing one Redis, clusters and
//! chaos. The suites live in `tests/`; this library holds what the chaos
//! suite and the soak run (`examples/soak.rs`) share: the app with all three
//! layers, the request load and its invariants, and a fault-injecting TCP
//! proxy; and the [`Answer`](answer::Answer) the suites read responses into.

pub mod answer;
pub mod chaos;
pub mod held_up;

/// The root README's Rust code blocks, compiled by `cargo test --doc -p tests`.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct RootReadme;
