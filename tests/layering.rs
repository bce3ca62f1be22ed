//! The layout keeps its rules: the folders of `src/` are the planes, and
//! their dependencies run one way (docs/architecture.md draws them).
//!
//! Every `crate::name` path in a module's source (a `use` line or a path
//! written inline, comments left out) is a dependency of the top-level module
//! it sits in on the top-level module `name`. The test fails on a dependency
//! the rules do not allow, and on any cycle between top-level modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What each top-level module may use. Anything not listed may use nothing
/// in the crate; `serve` (the wiring) may use everything.
const ALLOWED: &[(&str, &[&str])] = &[
    ("body", &[]),
    ("error", &["body"]),
    ("config", &["error", "body"]),
    // The pure core and its shell: nothing but the error type.
    ("gate", &["error"]),
    // The pod client: connections per pod, shared by all who talk to pods.
    ("pod", &["error", "body", "config"]),
    // Observers read the gate's state; the planes write into them.
    ("observe", &["gate", "config", "error", "body"]),
    // The exchange with a pod, holding its slot.
    ("forward", &["gate", "pod", "config", "error", "body"]),
    // The request path's head: host table, routes, affinity, admission.
    // Async jobs: kept requests, sent through the request path by a runner
    // (the proxy, behind the `Runner` trait), their webhooks on the pod client.
    ("jobs", &["gate", "forward", "pod", "observe", "config", "error", "body"]),
    ("proxy", &["jobs", "gate", "forward", "pod", "observe", "config", "error", "body"]),
    // The control plane never reaches into the request path.
    ("control", &["gate", "pod", "observe", "config", "error", "body"]),
    // The sim names checkpoints as the gate does.
    ("tools", &["gate", "config", "error", "body"]),
    ("serve", &["*"]),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a source file belongs to (`None` for lib.rs and main.rs).
fn top_module(file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src()).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?.to_string();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(stem) => Some(stem.to_string()),
        None => Some(first),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `crate::name` paths of a source text, comments left out.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().last();
            let after = &rest[at + "crate::".len()..];
            let name: String = after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            // `sdgate::crate::` does not exist; skip identifiers that merely end in "crate".
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') && !name.is_empty() {
                found.insert(name);
            }
            rest = after;
        }
        // `use crate::{a, b::c}`
        if let Some(at) = code.find("crate::{") {
            let group = &code[at + "crate::{".len()..];
            for item in group.split([',', '}']) {
                let name: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != "self" {
                    found.insert(name);
                }
            }
        }
    }
    found
}

/// Top-level module -> the top-level modules it uses.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in &files {
        let Some(from) = top_module(file) else { continue };
        let text = std::fs::read_to_string(file).expect("a source file is readable");
        for to in crate_paths(&text) {
            if to != from && modules.contains(&to) {
                graph.get_mut(&from).expect("every module is a node").insert(to);
            }
        }
    }
    graph
}

#[test]
fn every_dependency_between_top_level_modules_is_one_the_rules_allow() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (from, uses) in dependencies() {
        let Some(may) = allowed.get(from.as_str()) else {
            wrong.push(format!("{from} is not in the rules (tests/layering.rs ALLOWED)"));
            continue;
        };
        for to in uses {
            if !may.contains(&"*") && !may.contains(&to.as_str()) {
                wrong.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(wrong.is_empty(), "dependencies the layering does not allow:\n{}", wrong.join("\n"));
}

#[test]
fn no_cycle_between_top_level_modules() {
    let graph = dependencies();
    // Depth-first search with colours: grey on the stack, black done.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        let cycle = visit(node, &graph, &mut Vec::new(), &mut done);
        assert!(cycle.is_none(), "a cycle between top-level modules: {}", cycle.unwrap_or_default().join(" -> "));
    }
}

#[test]
fn the_scanner_finds_use_lines_grouped_uses_and_inline_paths_but_not_comments() {
    let text = "use crate::gate::Slot;\nuse crate::{body, error::ProxyError};\nlet x = crate::pod::client();\n// crate::serve is only named here\n";
    let found: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(found, ["body", "error", "gate", "pod"]);
}

#[test]
fn the_rules_know_every_folder_of_src() {
    let graph = dependencies();
    let allowed: BTreeSet<&str> = ALLOWED.iter().map(|(m, _)| *m).collect();
    let unknown: Vec<&String> = graph.keys().filter(|m| !allowed.contains(m.as_str())).collect();
    assert!(unknown.is_empty(), "modules the layering rules do not name: {unknown:?}");
    assert!(graph.len() >= 10, "the scan found the modules of src/: {:?}", graph.keys());
}
