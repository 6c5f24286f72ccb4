//! The modules of `src/` form no import cycle.
//!
//! A cycle makes a layer impossible to read, test or replace on its own: the
//! broker would know the hub that sits on it, a transport the node that starts it.
//! This test reads every `crate::` and `super::` path in the library's files and
//! checks, at every level of the module tree, that sibling modules depend on each
//! other without a circle. A module and its own descendants are one unit here (a
//! parent dispatching to its children and children naming their parent's types is
//! how a module is built); `#[cfg(test)]` code is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path below the crate root: `["broker", "redis", "shard"]`.
type ModPath = Vec<String>;

fn library_files(root: &Path) -> Vec<(ModPath, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                // The binaries under src/bin are crates of their own.
                if path.file_name().is_some_and(|n| n != "bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(root).expect("under src");
            let mut segments: ModPath = rel
                .iter()
                .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            let last = segments.last().cloned().unwrap_or_default();
            if last == "mod" || last == "lib" || last == "main" {
                segments.pop();
            }
            if segments.is_empty() {
                continue; // lib.rs and main.rs only declare modules
            }
            out.push((segments, path));
        }
    }
    out
}

/// The source without `#[cfg(test)]` items (test modules sit at the end of a file,
/// so everything from the first one on is left out) and without comments.
fn code_of(text: &str) -> String {
    let body = match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    };
    body.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path a `use` tree or an expression names after `crate::` or `super::`,
/// resolved to segments from the crate root. Brace groups are expanded.
fn referenced_paths(code: &str, module: &ModPath) -> Vec<ModPath> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !code.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &code[i..];
        let preceded_by_ident =
            i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if !preceded_by_ident && (rest.starts_with("crate::") || rest.starts_with("super::")) {
            let mut base: ModPath = Vec::new();
            let mut j = i;
            if rest.starts_with("crate::") {
                j += "crate::".len();
            } else {
                // `super` of `a/b.rs` and of `a/b/mod.rs` is `a` alike.
                base = module.clone();
                while code[j..].starts_with("super::") {
                    base.pop();
                    j += "super::".len();
                }
            }
            let (paths, end) = parse_tree(code, j);
            for p in paths {
                let mut full = base.clone();
                full.extend(p);
                out.push(full);
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// Parses a path or brace group starting at `at`; returns the relative paths and
/// where parsing stopped.
fn parse_tree(code: &str, mut at: usize) -> (Vec<ModPath>, usize) {
    let bytes = code.as_bytes();
    let skip_ws = |mut k: usize| {
        while k < bytes.len() && bytes[k].is_ascii_whitespace() {
            k += 1;
        }
        k
    };
    at = skip_ws(at);
    if at < bytes.len() && bytes[at] == b'{' {
        let mut out = Vec::new();
        at += 1;
        loop {
            at = skip_ws(at);
            if at >= bytes.len() {
                return (out, at);
            }
            match bytes[at] {
                b'}' => return (out, at + 1),
                b',' => at += 1,
                _ => {
                    let (paths, end) = parse_tree(code, at);
                    out.extend(paths);
                    if end == at {
                        at += 1;
                    } else {
                        at = end;
                    }
                }
            }
        }
    }
    let mut segments = Vec::new();
    loop {
        let start = at;
        while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_') {
            at += 1;
        }
        if at == start {
            break;
        }
        segments.push(code[start..at].to_string());
        if code[at..].starts_with("::") {
            at += 2;
            if at < bytes.len() && bytes[at] == b'{' {
                let (paths, end) = parse_tree(code, at);
                let expanded = paths
                    .into_iter()
                    .map(|p| segments.iter().cloned().chain(p).collect())
                    .collect();
                return (expanded, end);
            }
        } else {
            break;
        }
    }
    (vec![segments], at)
}

/// The longest prefix of `path` that is a module of the crate.
fn resolve(path: &ModPath, modules: &BTreeSet<ModPath>) -> Option<ModPath> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|prefix| modules.contains(prefix))
}

#[test]
fn the_modules_of_src_form_no_import_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = library_files(&root);
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let modules: BTreeSet<ModPath> = files.iter().map(|(m, _)| m.clone()).collect();

    // Per parent module: edges between its children, with the file and path that
    // makes each edge (to say where a cycle comes from).
    let mut levels: BTreeMap<ModPath, BTreeMap<(String, String), String>> = BTreeMap::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).expect("read source");
        for referenced in referenced_paths(&code_of(&text), module) {
            let Some(target) = resolve(&referenced, &modules) else {
                continue; // an item of lib.rs, or a re-export
            };
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common == module.len() || common == target.len() {
                continue; // a module and its descendants are one unit
            }
            let parent = module[..common].to_vec();
            let edge = (module[common].clone(), target[common].clone());
            let rel = path
                .strip_prefix(&root)
                .unwrap_or(path)
                .display()
                .to_string();
            levels
                .entry(parent)
                .or_default()
                .entry(edge)
                .or_insert_with(|| format!("src/{rel} uses {}", referenced.join("::")));
        }
    }

    let mut cycles = Vec::new();
    for (parent, edges) in &levels {
        if let Some(cycle) = find_cycle(edges) {
            let place = if parent.is_empty() {
                "crate".to_string()
            } else {
                parent.join("::")
            };
            let because: Vec<String> = cycle
                .windows(2)
                .map(|w| edges[&(w[0].clone(), w[1].clone())].clone())
                .collect();
            cycles.push(format!(
                "in {place}: {}\n    {}",
                cycle.join(" -> "),
                because.join("\n    ")
            ));
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles between modules:\n{}",
        cycles.join("\n")
    );
}

/// One cycle of the graph (its first node repeated at the end), if there is one.
fn find_cycle(edges: &BTreeMap<(String, String), String>) -> Option<Vec<String>> {
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        graph.entry(from).or_default().push(to);
    }
    // Depth-first search with colours: a grey node met again closes a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        Grey,
        Black,
    }
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        colour: &mut BTreeMap<&'a str, Colour>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        colour.insert(node, Colour::Grey);
        stack.push(node);
        for &next in graph.get(node).map(Vec::as_slice).unwrap_or_default() {
            match colour.get(next) {
                Some(Colour::Grey) => {
                    let from = stack.iter().position(|&n| n == next).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        stack[from..].iter().map(|s| s.to_string()).collect();
                    cycle.push(next.to_string());
                    return Some(cycle);
                }
                Some(Colour::Black) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, colour, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        colour.insert(node, Colour::Black);
        None
    }
    let mut colour = BTreeMap::new();
    let nodes: Vec<&str> = graph.keys().copied().collect();
    for node in nodes {
        if !colour.contains_key(node) {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(node, &graph, &mut colour, &mut stack) {
                return Some(cycle);
            }
        }
    }
    None
}
