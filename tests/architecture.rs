//! The layer table, enforced (in the spirit of rust-analyzer's tidy tests).
//!
//! `ARCHITECTURE.md`'s "Layers" table is the one statement of which module sits on which
//! floor. This test reads it, reads every file under `src/`, collects each file's `crate::`
//! (and `super::` reaching the crate root) paths, and fails on:
//! - an import of a module on a higher floor;
//! - an import between two modules of the `edges` floor (an edge never imports the other);
//! - a cycle between modules of one floor (peers import each other only one way);
//! - `axum` or `apalis` below the edges (the core and everything under it knows neither);
//! - a module that `src/lib.rs` declares but the table does not place, or the other way round;
//! - a module that `src/lib.rs`'s module doc does not name.
//!
//! It reads source text, not the compiler's view, so it stays fast and dependency-free; the
//! self-tests at the bottom show that each rule fails when broken.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// One floor of the table: its name and its modules, top floor first.
#[derive(Debug)]
struct Floor {
    name: String,
    modules: Vec<String>,
}

/// The floors of the "Layers" table in ARCHITECTURE.md: each row's first cell is the floor,
/// its second the modules in backticks (`` `http` ``, `` `src/http/` `` and `` `main.rs` ``
/// all name a module).
fn parse_layers(architecture: &str) -> Vec<Floor> {
    let mut floors = Vec::new();
    let mut in_section = false;
    for line in architecture.lines() {
        if line.starts_with("## ") {
            in_section = line.trim() == "## Layers";
            continue;
        }
        if !in_section || !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // ["", floor, modules, ..., ""]
        if cells.len() < 4 || cells[1] == "floor" || cells[1].starts_with("--") {
            continue;
        }
        let modules = backticked(cells[2])
            .into_iter()
            .map(|m| module_name(&m))
            .collect();
        floors.push(Floor {
            name: cells[1].to_owned(),
            modules,
        });
    }
    floors
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_owned())
        .collect()
}

/// `src/http/` → `http`, `main.rs` → `main`, `queue` → `queue`.
fn module_name(s: &str) -> String {
    let s = s.trim_start_matches("src/").trim_end_matches('/');
    s.trim_end_matches(".rs").to_owned()
}

/// A file's module path under `src/`: `src/http/admin/csrf.rs` → `[http, admin, csrf]`,
/// `src/http/mod.rs` → `[http]`, `src/main.rs` → `[main]`, `src/lib.rs` → `[]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" && stem != "lib" {
            parts.push(stem.to_owned());
        }
    }
    parts
}

/// The top-level modules a file's code names, through `crate::` or through `super::` chains
/// that reach the crate root. Comments are skipped (doc links do not make a dependency).
fn imported_modules(source: &str, path: &[String]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = strip_comment(line);
        let mut rest = code;
        while let Some(i) = find_path_start(rest) {
            let tail = &rest[i..];
            let (segments, consumed) = leading_path(tail);
            let depth = path.len();
            let mut resolved: Option<Vec<String>> = None;
            if segments.first().map(String::as_str) == Some("crate") {
                resolved = Some(segments[1..].to_vec());
            } else {
                let supers = segments.iter().take_while(|s| *s == "super").count();
                // A file at `[a, b]` (src/a/b.rs) is module a::b; `super` is `a`, `super::super`
                // the crate root. A `mod.rs` file's path is its directory's module.
                if supers > 0 && supers >= depth {
                    resolved = Some(segments[supers..].to_vec());
                }
            }
            if let Some(resolved) = resolved {
                if let Some(first) = resolved.first() {
                    if first == "{" {
                        // `crate::{a, b::c}`: the group's first-level names.
                        for name in group_heads(&tail[consumed..]) {
                            found.insert(name);
                        }
                    } else {
                        found.insert(first.clone());
                    }
                }
            }
            rest = &tail[consumed.max(1)..];
        }
    }
    found
}

fn strip_comment(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// The next `crate::` or `super::` that starts a path (not inside an identifier).
fn find_path_start(s: &str) -> Option<usize> {
    let mut best: Option<usize> = None;
    for needle in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = s[from..].find(needle) {
            let at = from + i;
            let before = s[..at].chars().next_back();
            if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_')) {
                best = Some(best.map_or(at, |b: usize| b.min(at)));
                break;
            }
            from = at + needle.len();
        }
    }
    best
}

/// `crate::a::b::{` → (["crate", "a", "b", "{"], bytes up to and including the `{` or the
/// last identifier).
fn leading_path(s: &str) -> (Vec<String>, usize) {
    let mut segments = Vec::new();
    let mut pos = 0;
    loop {
        let ident: String = s[pos..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if ident.is_empty() {
            if s[pos..].starts_with('{') {
                segments.push("{".to_owned());
                pos += 1;
            }
            break;
        }
        pos += ident.len();
        segments.push(ident);
        if s[pos..].starts_with("::") {
            pos += 2;
        } else {
            break;
        }
    }
    (segments, pos)
}

/// The first-level names of a `{a, b::c, d::{e}}` group whose `{` was just consumed.
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut expect_head = true;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => expect_head = true,
            c if expect_head && depth == 0 && (c.is_alphanumeric() || c == '_') => {
                let ident: String = s[i..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                for _ in 1..ident.chars().count() {
                    chars.next();
                }
                if ident != "self" {
                    heads.push(ident);
                }
                expect_head = false;
            }
            _ => {}
        }
    }
    heads
}

/// Whether a file's code names an external crate's path (`axum::`, `apalis_core::`), as a
/// path start, not inside another identifier.
fn names_crate(source: &str, krate: &str) -> bool {
    let needle = format!("{krate}::");
    source.lines().map(strip_comment).any(|code| {
        let mut from = 0;
        while let Some(i) = code[from..].find(&needle) {
            let at = from + i;
            let before = code[..at].chars().next_back();
            if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':')) {
                return true;
            }
            from = at + needle.len();
        }
        false
    })
}

/// The modules `src/lib.rs` declares.
fn declared_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")
                .and_then(|m| m.strip_suffix(';'))
                .map(str::to_owned)
        })
        .collect()
}

fn module_doc(lib: &str) -> String {
    lib.lines()
        .filter_map(|l| l.trim_start().strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every violation of the table by the given files (relative path under `src/`, source).
fn violations(floors: &[Floor], files: &[(PathBuf, String)]) -> Vec<String> {
    let floor_of: BTreeMap<&str, usize> = floors
        .iter()
        .enumerate()
        .flat_map(|(rank, f)| f.modules.iter().map(move |m| (m.as_str(), rank)))
        .collect();
    let edges = floors.iter().position(|f| f.name == "edges");
    let mut problems = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (relative, source) in files {
        let path = module_path(relative);
        let Some(module) = path.first() else {
            continue; // lib.rs: the declarations themselves
        };
        let Some(&rank) = floor_of.get(module.as_str()) else {
            problems.push(format!(
                "src/{}: module `{module}` is not placed in ARCHITECTURE.md's Layers table",
                relative.display()
            ));
            continue;
        };
        if edges.is_some_and(|e| rank > e) {
            for krate in ["axum", "apalis", "apalis_core", "apalis_redis"] {
                if names_crate(source, krate) {
                    problems.push(format!(
                        "src/{}: `{module}` ({}) uses `{krate}`: only the edges and above may",
                        relative.display(),
                        floors[rank].name
                    ));
                }
            }
        }
        for imported in imported_modules(source, &path) {
            if &imported == module {
                continue;
            }
            let Some(&their_rank) = floor_of.get(imported.as_str()) else {
                continue; // an item of lib.rs itself, or a name the table checks elsewhere
            };
            if their_rank < rank {
                problems.push(format!(
                    "src/{}: `{module}` ({}) imports `{imported}` ({}), a floor above it",
                    relative.display(),
                    floors[rank].name,
                    floors[their_rank].name
                ));
            } else if their_rank == rank && Some(rank) == edges {
                problems.push(format!(
                    "src/{}: the edge `{module}` imports the other edge `{imported}`",
                    relative.display()
                ));
            } else if their_rank == rank {
                graph
                    .entry(module.clone())
                    .or_default()
                    .insert(imported.clone());
            }
        }
    }
    for cycle in cycles(&graph) {
        problems.push(format!(
            "peers import each other in a cycle: {}",
            cycle.join(" → ")
        ));
    }
    problems
}

/// Cycles in the peer-import graph (each reported once, from its smallest module).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for start in graph.keys() {
        // Depth-first search for a path back to `start` through modules greater than it, so
        // each cycle is found from its smallest member only.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == start {
                    let mut cycle = path.clone();
                    cycle.push(start.clone());
                    found.push(cycle);
                } else if next > start && seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    found
}

fn source_files(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let source = fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let relative = path.strip_prefix(root).expect("under src").to_path_buf();
                out.push((relative, source));
            }
        }
    }
    out.sort();
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

#[test]
fn every_import_keeps_to_the_layer_table() {
    let floors = parse_layers(&read("ARCHITECTURE.md"));
    assert!(
        floors.len() >= 4 && floors.iter().any(|f| f.name == "edges"),
        "ARCHITECTURE.md has no `## Layers` table with an `edges` floor: {floors:?}"
    );
    let problems = violations(&floors, &source_files(&root().join("src")));
    assert!(
        problems.is_empty(),
        "imports that break ARCHITECTURE.md's Layers table:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_layer_table_places_exactly_the_declared_modules() {
    let floors = parse_layers(&read("ARCHITECTURE.md"));
    let placed: BTreeSet<String> = floors
        .iter()
        .flat_map(|f| f.modules.iter().cloned())
        .filter(|m| m != "main")
        .collect();
    let declared = declared_modules(&read("src/lib.rs"));
    let unplaced: Vec<_> = declared.difference(&placed).collect();
    let phantom: Vec<_> = placed.difference(&declared).collect();
    assert!(
        unplaced.is_empty() && phantom.is_empty(),
        "declared in src/lib.rs but not in ARCHITECTURE.md's Layers table: {unplaced:?}; \
         in the table but not declared: {phantom:?}"
    );
}

#[test]
fn the_crate_doc_names_every_module() {
    let lib = read("src/lib.rs");
    let doc = module_doc(&lib);
    let missing: Vec<_> = declared_modules(&lib)
        .into_iter()
        .filter(|m| !doc.contains(&format!("`{m}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "src/lib.rs's module doc does not name these modules (in backticks): {missing:?}"
    );
}

// Self-tests: each rule fails when broken.

const TABLE: &str = "\
## Layers
| floor | modules | may import |
|---|---|---|
| top | `main.rs`, `src/cli/` | all |
| edges | `http`, `worker` | below |
| core | `queue`, `tenants`, `accounts` | below |
| primitives | `config`, `security` | below |
## Next
| floor | `not_a_module` | x |
";

fn check(files: &[(&str, &str)]) -> Vec<String> {
    let files: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(p, s)| (PathBuf::from(p), (*s).to_owned()))
        .collect();
    violations(&parse_layers(TABLE), &files)
}

#[test]
fn the_table_is_read_from_its_section_only() {
    let floors = parse_layers(TABLE);
    let names: Vec<_> = floors.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["top", "edges", "core", "primitives"]);
    assert_eq!(floors[0].modules, ["main", "cli"]);
}

#[test]
fn an_import_from_a_higher_floor_fails() {
    let problems = check(&[("security/jwt.rs", "use crate::config::Config;\nuse crate::tenants::x;")]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("imports `tenants`"), "{problems:?}");
    assert!(check(&[("tenants.rs", "use crate::security::jwt;")]).is_empty());
}

#[test]
fn grouped_and_super_paths_count() {
    let grouped = check(&[(
        "config.rs",
        "use crate::{security::keyring::Keyring, queue::{a, b}};",
    )]);
    assert_eq!(grouped.len(), 1, "{grouped:?}");
    assert!(grouped[0].contains("imports `queue`"));
    // src/security/jwt.rs: `super::x` is security's own; `super::super::http` is the crate's.
    assert!(check(&[("security/jwt.rs", "use super::keyring;")]).is_empty());
    let up = check(&[("security/jwt.rs", "use super::super::http::x;")]);
    assert_eq!(up.len(), 1, "{up:?}");
    // src/security/mod.rs is `security` itself: one `super` reaches the crate.
    let from_mod = check(&[("security/mod.rs", "pub fn f() { super::accounts::g() }")]);
    assert_eq!(from_mod.len(), 1, "{from_mod:?}");
}

#[test]
fn comments_and_longer_identifiers_do_not_count() {
    assert!(
        check(&[(
            "security/jwt.rs",
            "/// see [`crate::http::x`]\nlet my_crate::x = 1; // crate::http"
        )])
        .is_empty()
    );
}

#[test]
fn the_edges_never_import_each_other() {
    let problems = check(&[("http/admin/mod.rs", "use crate::worker::stats;")]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("the edge `http` imports the other edge `worker`"));
}

#[test]
fn peers_may_not_import_each_other_in_a_cycle() {
    let problems = check(&[
        ("tenants.rs", "use crate::accounts::a;"),
        ("accounts.rs", "use crate::queue::q;"),
        ("queue/mod.rs", "use crate::tenants::t;"),
    ]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("accounts → queue → tenants → accounts"));
    assert!(check(&[("tenants.rs", "use crate::accounts::a;")]).is_empty());
}

#[test]
fn axum_and_apalis_stay_in_the_edges() {
    let problems = check(&[("queue/consume.rs", "use apalis_core::backend::Backend;")]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(check(&[("worker/backend.rs", "use apalis_core::backend::Backend;")]).is_empty());
    assert!(check(&[("queue/x.rs", "use my_axum::y;")]).is_empty());
}

#[test]
fn an_unplaced_module_fails() {
    let problems = check(&[("newthing.rs", "fn f() {}")]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("not placed"));
}

#[test]
fn the_crate_doc_check_sees_a_missing_module() {
    let lib = "//! `a` and `b`\npub mod a;\nmod b;\npub mod c;\n";
    let doc = module_doc(lib);
    let missing: Vec<_> = declared_modules(lib)
        .into_iter()
        .filter(|m| !doc.contains(&format!("`{m}`")))
        .collect();
    assert_eq!(missing, ["c"]);
}
