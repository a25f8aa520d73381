//! The workspace's manifests as a user meets them: the commands that
//! `benches/README.md` documents resolve to a binary, and `rand` is built
//! once (the version redis already pulls in).

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_owned()
}

/// Runs cargo in the workspace (offline, with the lock file as it is) and
/// returns its standard output.
fn cargo(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(args)
        .args(["--offline", "--locked"])
        .current_dir(workspace_root())
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Every `cargo run … -p benches …` line of `benches/README.md` names a
/// binary cargo can pick: the one given with `--bin`, or the package's
/// `default-run` (the package holds two binaries, so without it cargo
/// stops with "could not determine which binary to run"); and every
/// feature it asks for exists.
#[test]
fn every_benches_readme_command_resolves_to_a_binary() {
    let metadata: serde_json::Value =
        serde_json::from_str(&cargo(&["metadata", "--no-deps", "--format-version", "1"]))
            .expect("cargo metadata is JSON");
    let benches = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "benches")
        .expect("the benches package");
    let binaries: Vec<&str> = benches["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(binaries.len() > 1, "{binaries:?}");
    let features = benches["features"].as_object().expect("features");

    let readme = std::fs::read_to_string(workspace_root().join("benches/README.md"))
        .expect("benches/README.md");
    let commands: Vec<&str> = readme
        .lines()
        .filter_map(|line| line.find("cargo run").map(|at| &line[at..]))
        .filter(|command| command.contains("-p benches"))
        .collect();
    assert!(commands.len() >= 5, "{commands:?}");
    for command in commands {
        let command = command.split('#').next().unwrap_or_default();
        let words: Vec<&str> = command
            .split(|c: char| c.is_whitespace() || c == '`')
            .filter(|w| !w.is_empty())
            .collect();
        let cargo_args = words.split(|w| *w == "--").next().unwrap_or_default();
        let value_of = |flag: &str| {
            cargo_args
                .iter()
                .position(|w| *w == flag)
                .and_then(|at| cargo_args.get(at + 1).copied())
        };
        let binary = value_of("--bin").or_else(|| benches["default_run"].as_str());
        let binary = binary.unwrap_or_else(|| panic!("`{command}`: no --bin and no default-run"));
        assert!(
            binaries.contains(&binary),
            "`{command}` runs {binary}, not one of {binaries:?}"
        );
        if let Some(feature) = value_of("--features") {
            assert!(
                features.contains_key(feature),
                "`{command}`: no feature {feature}"
            );
        }
    }
}

/// One `rand` (and `rand_core`) in what the workspace builds: the crates'
/// own `rand` is the version redis pulls in, not a second one beside it.
#[test]
fn rand_is_built_once() {
    let duplicates = cargo(&[
        "tree",
        "--workspace",
        "--duplicates",
        "--edges",
        "normal,build",
        "--depth",
        "0",
        "--prefix",
        "none",
    ]);
    let rands: Vec<&str> = duplicates
        .lines()
        .filter(|line| line.starts_with("rand ") || line.starts_with("rand_core "))
        .collect();
    assert!(
        rands.is_empty(),
        "rand is built twice: {rands:?}\n{duplicates}"
    );
}
