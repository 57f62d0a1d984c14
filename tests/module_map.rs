//! The module map of docs/ARCHITECTURE.md ("who uses whom") matches the
//! code: for every top-level module of `src/`, the set of other top-level
//! modules its non-test code names through `crate::` (or, for the binary,
//! `hookstream::`) is exactly the set the map lists. And the graph has no
//! cycle: in particular `history` depends on nothing in `shard`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module names after `prefix` (`crate::` or `hookstream::`).
fn named_modules(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

fn code_graph() -> Graph {
    let src = repo().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for path in files {
        let relative = path.strip_prefix(&src).expect("under src");
        let first = relative.components().next().expect("a component");
        let first = first.as_os_str().to_string_lossy();
        let top = first.trim_end_matches(".rs").to_string();
        if top == "lib" || relative.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("read source");
        // Unit tests sit at the bottom of a file; only the code above counts.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let prefix = if top == "main" {
            "hookstream::"
        } else {
            "crate::"
        };
        let used = graph.entry(top.clone()).or_default();
        for module in named_modules(code, prefix) {
            if module != top {
                used.insert(module);
            }
        }
    }
    graph
}

fn documented_graph() -> Graph {
    let doc = fs::read_to_string(repo().join("docs/ARCHITECTURE.md")).expect("read doc");
    let start = doc
        .find("module map: who uses whom\n")
        .expect("the module map block in docs/ARCHITECTURE.md");
    let block = &doc[start..];
    let block = &block[..block.find("```").expect("end of the block")];
    let mut graph = Graph::new();
    for line in block.lines().skip(1) {
        let (module, uses) = line.split_once("->").expect("`module -> uses`");
        let uses = uses.split_whitespace().map(str::to_string).collect();
        assert!(
            graph.insert(module.trim().to_string(), uses).is_none(),
            "{module} listed twice"
        );
    }
    graph
}

#[test]
fn the_module_map_matches_the_use_lines() {
    let code = code_graph();
    let documented = documented_graph();
    for (module, uses) in &code {
        assert_eq!(
            documented.get(module),
            Some(uses),
            "docs/ARCHITECTURE.md module map, line of `{module}`"
        );
    }
    for module in documented.keys() {
        assert!(
            code.contains_key(module),
            "`{module}` is not a module of src/"
        );
    }
}

#[test]
fn the_modules_form_no_cycle_and_history_knows_nothing_of_shard() {
    let graph = code_graph();
    assert!(!graph["history"].contains("shard"));
    // Depth-first search for a back edge.
    fn visit<'a>(
        graph: &'a Graph,
        module: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(module) {
            return;
        }
        assert!(
            !path.contains(&module),
            "module cycle: {} -> {module}",
            path.join(" -> ")
        );
        path.push(module);
        for next in graph.get(module).into_iter().flatten() {
            visit(graph, next, path, done);
        }
        path.pop();
        done.insert(module);
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(&graph, module, &mut Vec::new(), &mut done);
    }
}
