//! The appliance's modules import each other one way only: no circle among the top-level modules of
//! `signer/src` (those `lib.rs` declares).
//!
//! An edge A -> B is any `crate::B` path in code under A (a `use`, a grouped `use crate::{B, ..}`, or a path in an
//! expression); comments and doc links do not count. Run alone with
//! `cargo test -p signet --test layering`; on failure it prints every circle with the files that close it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The modules `lib.rs` declares.
fn modules() -> Vec<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("read lib.rs");
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').trim().to_string())
        .collect()
}

fn files_of(module: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let file = src().join(format!("{module}.rs"));
    if file.exists() {
        out.push(file);
    }
    let mut dirs = vec![src().join(module)];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// Code without comments (line comments, doc comments and block comments).
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(i) = rest
            .find("/*")
            .filter(|&i| rest.find("//").is_none_or(|j| i < j))
        {
            out.push_str(&rest[..i]);
            rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
        } else if let Some(i) = rest.find("//") {
            out.push_str(&rest[..i]);
            rest = rest[i..].find('\n').map_or("", |j| &rest[i + j..]);
        } else {
            out.push_str(rest);
            rest = "";
        }
    }
    out
}

/// The top-level modules `text` names through `crate::`.
fn named(text: &str, modules: &BTreeSet<&str>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let after = &text[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            // Only the first segment of each item of the group names a module.
            let mut depth = 0usize;
            let mut item_start = true;
            for (k, c) in group[..end].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth = depth.saturating_sub(1),
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        found.insert(ident(&group[k..]));
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(after));
        }
    }
    found.retain(|m| modules.contains(m.as_str()));
    found
}

#[test]
fn no_import_circle_among_signers_modules() {
    let mods = modules();
    assert!(
        mods.len() > 10,
        "lib.rs declares {} modules: {mods:?}",
        mods.len()
    );
    let set: BTreeSet<&str> = mods.iter().map(String::as_str).collect();
    // edges[a][b] = files of a that name b.
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for m in &mods {
        let files = files_of(m);
        assert!(!files.is_empty(), "module {m} has no source file");
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read source");
            for t in named(&code(&text), &set) {
                if &t != m {
                    let rel = f.strip_prefix(src()).unwrap_or(&f).display().to_string();
                    edges
                        .entry(m.clone())
                        .or_default()
                        .entry(t)
                        .or_default()
                        .insert(rel);
                }
            }
        }
    }
    // Tarjan's strongly connected components: any component of more than one module is a circle.
    struct Walk<'a> {
        edges: &'a BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        next: usize,
        circles: Vec<Vec<String>>,
    }
    impl Walk<'_> {
        fn visit(&mut self, v: &str) {
            self.index.insert(v.into(), self.next);
            self.low.insert(v.into(), self.next);
            self.next += 1;
            self.stack.push(v.into());
            self.on.insert(v.into());
            let targets: Vec<String> = self
                .edges
                .get(v)
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default();
            for w in targets {
                if !self.index.contains_key(&w) {
                    self.visit(&w);
                    let lw = self.low[&w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on.contains(&w) {
                    let iw = self.index[&w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(&w);
                    let done = w == v;
                    comp.push(w);
                    if done {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.circles.push(comp);
                }
            }
        }
    }
    let mut walk = Walk {
        edges: &edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        circles: Vec::new(),
    };
    for m in &mods {
        if !walk.index.contains_key(m) {
            walk.visit(m);
        }
    }
    let mut report = String::new();
    for comp in &walk.circles {
        report.push_str(&format!("circle among {comp:?}:\n"));
        for a in comp {
            for b in comp {
                if let Some(files) = edges.get(a).and_then(|t| t.get(b)) {
                    report.push_str(&format!("  {a} -> {b} in {files:?}\n"));
                }
            }
        }
    }
    assert!(walk.circles.is_empty(), "{report}");
    // The check can fail: the edges it found include the layering everyone relies on.
    assert!(
        edges.get("api").is_some_and(|t| t.contains_key("pipeline")),
        "the scan found no api -> pipeline edge: it reads nothing"
    );
}

#[test]
fn the_scan_sees_grouped_imports_and_skips_comments() {
    let set: BTreeSet<&str> = ["api", "ca", "store", "x509"].into_iter().collect();
    let text = "use crate::{ca::Authorities, store::{Store, x}};\n// crate::api::no\nlet v = crate::x509::f();";
    let found = named(&code(text), &set);
    assert_eq!(
        found,
        ["ca", "store", "x509"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}
