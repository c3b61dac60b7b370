//! The engine's layout keeps its promise: arrows between modules point one
//! way (no import circle), and modules import a name from the module that
//! defines it, never through `lib.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Every module (`backend::storage`, `runtime`, ...) and the modules it names
/// through `crate::` paths, outside its tests.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut modules = BTreeMap::new();
    for file in files {
        let relative = file
            .strip_prefix(&root)
            .expect("under src")
            .with_extension("");
        let mut parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        let name = parts.join("::");
        if name == "lib" || name == "layout_test" {
            continue;
        }
        let source = std::fs::read_to_string(&file).expect("a source file");
        let source = source.split("#[cfg(test)]").next().unwrap_or_default();
        modules.insert(name, paths(source));
    }
    modules
}

/// The `crate::` paths of `source`, `use crate::{a::{b, C}, d}` expanded
/// (only lower-case segments: modules).
fn paths(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        expand("", rest, &mut found);
    }
    found
}

/// Adds the module paths at the start of `text` (after `prefix`) to `found`.
fn expand(prefix: &str, text: &str, found: &mut BTreeSet<String>) {
    let text = text.trim_start();
    if let Some(group) = text.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(prefix, &group[start..i], found);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(prefix, &group[start..i], found);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let segment: String = text
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if segment.is_empty() || segment == "self" || !segment.starts_with(|c: char| c.is_lowercase()) {
        if !prefix.is_empty() {
            found.insert(prefix.to_owned());
        }
        return;
    }
    let path = if prefix.is_empty() {
        segment.clone()
    } else {
        format!("{prefix}::{segment}")
    };
    let after = &text[segment.len()..];
    match after.strip_prefix("::") {
        Some(more) => expand(&path, more, found),
        None => {
            found.insert(path);
        }
    }
}

/// The module `path` names: its longest prefix that is a module.
fn module_of<'a>(path: &str, modules: &'a BTreeMap<String, BTreeSet<String>>) -> Option<&'a str> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find_map(|candidate| modules.get_key_value(&candidate).map(|(k, _)| k.as_str()))
}

fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_and_no_room_imports_in_a_circle() {
    let modules = imports();
    assert!(
        modules.contains_key("runtime::stack"),
        "{:?}",
        modules.keys()
    );
    let mut files = BTreeMap::new();
    let mut rooms: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, paths) in &modules {
        let room = module.split("::").next().unwrap_or_default().to_owned();
        let mut targets = BTreeSet::new();
        for path in paths {
            let Some(target) = module_of(path, &modules) else {
                continue;
            };
            // A parent's own items are not imported by its children here.
            if target != module && !module.starts_with(&format!("{target}::")) {
                targets.insert(target.to_owned());
                let target_room = target.split("::").next().unwrap_or_default();
                if target_room != room {
                    rooms
                        .entry(room.clone())
                        .or_default()
                        .insert(target_room.to_owned());
                }
            }
        }
        files.insert(module.clone(), targets);
    }
    assert_eq!(cycle(&files), None, "modules importing in a circle");
    assert_eq!(
        cycle(&rooms),
        None,
        "rooms importing in a circle: {rooms:?}"
    );
    // The testing support runs a Worker as an app would; nothing else
    // reaches into the runtime.
    assert!(
        rooms
            .iter()
            .all(|(room, targets)| room == "testing" || !targets.contains("runtime")),
        "only lib.rs and testing use the runtime: {rooms:?}"
    );
}

#[test]
fn modules_import_names_from_where_they_are_defined() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut through_lib = Vec::new();
    for module in imports().keys() {
        let file = root.join(module.replace("::", "/"));
        let source = std::fs::read_to_string(file.with_extension("rs"))
            .or_else(|_| std::fs::read_to_string(file.join("mod.rs")))
            .expect("the module's file");
        let code: String = source
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let code = code.split("#[cfg(test)]").next().unwrap_or_default();
        let names_a_type = |text: &str| text.trim_start().starts_with(|c: char| c.is_uppercase());
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let direct = match rest.strip_prefix('{') {
                Some(group) => top_level_items(group).iter().any(|item| names_a_type(item)),
                None => names_a_type(rest),
            };
            if direct {
                through_lib.push(module.clone());
            }
        }
    }
    assert!(
        through_lib.is_empty(),
        "imports through lib.rs in {through_lib:?}"
    );
}

/// The items of a `{ .. }` group (its text after the `{`), nested groups whole.
fn top_level_items(group: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}
