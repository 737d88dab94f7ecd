//! Architecture fitness test (as ArchUnit does for Java codebases): reads `src/` and fails,
//! naming file and line, when a module imports from a layer above its own, or when the
//! top-level modules import each other in a circle. The layers are `lib.rs`'s map.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path prefix → layer (0 = bottom). The longest matching prefix wins, so
/// `flags::watcher` (a service) sits above `flags` (the file and bucketing).
const LAYERS: &[(&str, u8)] = &[
    ("domain", 0),
    ("error", 1),
    ("config", 1),
    ("auth", 1),
    ("storage", 2),
    ("lock_store", 2),
    ("budget", 2),
    ("redis_conn", 2),
    ("events", 2),
    ("providers", 2),
    ("metrics", 2),
    ("flags", 2),
    ("samples", 2),
    ("effects", 3),
    ("jobs", 3),
    ("flags::watcher", 3),
    ("flags::fleet", 3),
    ("guard", 3),
    ("accept", 3),
    ("seed", 3),
    ("http", 4),
    ("rollout", 4),
    ("server", 5),
    ("cli", 5),
    ("drive", 5),
    ("main", 6),
];

const LAYER_NAMES: [&str; 7] = ["domain", "foundation", "adapters", "services", "edge", "roof", "binary"];

fn layer_of(module: &str) -> Option<u8> {
    LAYERS
        .iter()
        .filter(|(prefix, _)| module == *prefix || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, layer)| *layer)
}

/// `src/a/b.rs` → `a::b`, `src/a/mod.rs` → `a`; `lib.rs` → `""`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .filter(|p| p != "mod" && p != "lib")
        .collect();
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Expands `a::{b, c::{d, self}}` into `a::b`, `a::c::d`, `a::c`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        return vec![path.trim_end_matches("::self").to_owned()];
    };
    let prefix = tree[..open].trim_end_matches("::");
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|item| !item.trim().is_empty())
        .flat_map(|item| {
            expand(item).into_iter().map(move |sub| {
                if sub == "self" {
                    prefix.to_owned()
                } else if prefix.is_empty() {
                    sub
                } else {
                    format!("{prefix}::{sub}")
                }
            })
        })
        .collect()
}

/// Every `crate::…` path a file names, with its line: `use crate::…;` statements (over
/// several lines, groups expanded) and `crate::a::b` written inline.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut statement: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        if let Some((start, buf)) = &mut statement {
            buf.push_str(code);
            if code.contains(';') {
                let tree = buf.trim_end().trim_end_matches(';').to_owned();
                found.extend(expand(&tree).into_iter().map(|p| (*start, p)));
                statement = None;
            }
            continue;
        }
        let trimmed = code.trim_start();
        let trimmed = trimmed.strip_prefix("pub ").unwrap_or(trimmed);
        if let Some(rest) = trimmed.strip_prefix("use crate::") {
            if rest.contains(';') {
                let tree = rest.split(';').next().unwrap_or_default();
                found.extend(expand(tree).into_iter().map(|p| (i + 1, p)));
            } else {
                statement = Some((i + 1, rest.to_owned()));
            }
            continue;
        }
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let tail = &rest[at + "crate::".len()..];
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            found.push((i + 1, tail[..end].trim_end_matches(':').to_owned()));
            rest = &tail[end..];
        }
    }
    found
}

#[test]
fn imports_point_down_and_top_level_modules_form_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut upward = Vec::new();
    let mut unmapped = BTreeSet::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        if module.is_empty() {
            continue; // lib.rs declares the modules
        }
        let Some(own) = layer_of(&module) else {
            unmapped.insert(module);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, path) in crate_paths(&text) {
            let Some(target) = layer_of(&path) else {
                unmapped.insert(path);
                continue;
            };
            let (from_top, to_top) = (top(&module), top(&path));
            if from_top != to_top {
                edges.entry(from_top.clone()).or_default().insert(to_top.clone());
            }
            if target > own {
                upward.push(format!(
                    "{}:{line}: {module} ({}) imports crate::{path} ({})",
                    file.strip_prefix(src.parent().unwrap()).unwrap().display(),
                    LAYER_NAMES[usize::from(own)],
                    LAYER_NAMES[usize::from(target)],
                ));
            }
        }
    }
    assert!(
        unmapped.is_empty(),
        "modules missing from the layer table: {unmapped:?}"
    );
    assert!(
        upward.is_empty(),
        "imports that point up a layer:\n{}",
        upward.join("\n")
    );
    if let Some(circle) = find_circle(&edges) {
        panic!(
            "top-level modules import each other in a circle: {}",
            circle.join(" -> ")
        );
    }
}

fn top(path: &str) -> String {
    path.split("::").next().unwrap_or(path).to_owned()
}

/// A circle in the module graph, as the modules along it, or `None`.
fn find_circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, edges, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

#[test]
fn the_checker_sees_what_it_must() {
    // Groups, `self`, renames and multi-line statements are expanded.
    assert_eq!(
        expand("flags::{self, watcher::{FlagsWatcher, reload as r}}"),
        ["flags", "flags::watcher::FlagsWatcher", "flags::watcher::reload"]
    );
    let text = "use crate::domain::now_ms;\nuse crate::{\n    http::AuthUser,\n    storage::Storage,\n};\nlet x = crate::server::start(); // crate::cli::x\n";
    let paths: Vec<(usize, String)> = crate_paths(text);
    assert_eq!(
        paths,
        [
            (1, "domain::now_ms".to_owned()),
            (2, "http::AuthUser".to_owned()),
            (2, "storage::Storage".to_owned()),
            (6, "server::start".to_owned()),
        ]
    );
    // An upward import and a circle are caught.
    assert!(layer_of("storage::assign").unwrap() < layer_of("http::AuthUser").unwrap());
    assert_eq!(layer_of("flags::watcher::FlagsWatcher"), Some(3));
    assert_eq!(layer_of("flags::FlagSet"), Some(2));
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    edges.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(find_circle(&edges).unwrap(), ["a", "b", "c", "a"]);
    edges.remove("c");
    assert_eq!(find_circle(&edges), None);
}
