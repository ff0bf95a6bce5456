//! The crate's layering, as `src/lib.rs` documents it ("Layers: how the modules stack"), held
//! against the code: every module is placed in that list, and each one refers only to modules
//! listed before it, so no lower layer reaches up and no import loop can form.

use std::collections::HashMap;
use std::path::Path;

/// The module order from lib.rs's layer list: every `[`name`]` between "# Layers" and the next
/// section, first mention first.
fn documented_order(lib: &str) -> Vec<String> {
    let start = lib.find("# Layers").expect("lib.rs documents its layers");
    let section = &lib[start..];
    let end = section
        .find("Outside the data path")
        .unwrap_or(section.len());
    let mut order: Vec<String> = Vec::new();
    for piece in section[..end].split("[`").skip(1) {
        let name = piece.split('`').next().unwrap_or_default().to_string();
        if !order.contains(&name) {
            order.push(name);
        }
    }
    order
}

/// The modules a file refers to through `crate::` paths, outside its unit tests and comments.
fn references(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        for piece in line.split("crate::").skip(1) {
            if let Some(group) = piece.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or_default();
                out.extend(
                    group
                        .split(',')
                        .map(|p| p.trim().split("::").next().unwrap_or_default().to_string()),
                );
            } else {
                let name: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn every_module_refers_only_to_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let order = documented_order(&lib);
    let rank: HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let mut modules = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".rs"))
        else {
            continue;
        };
        if !["lib", "main", "fuzzing", "bench_api"].contains(&name) {
            modules.push((name.to_string(), std::fs::read_to_string(&path).unwrap()));
        }
    }
    assert!(
        modules.len() > 10,
        "found only {} modules in {}",
        modules.len(),
        src.display()
    );
    let mut problems = Vec::new();
    for (name, text) in &modules {
        let Some(&own) = rank.get(name.as_str()) else {
            problems.push(format!("{name}: not placed in lib.rs's layer list"));
            continue;
        };
        for target in references(text) {
            match rank.get(target.as_str()) {
                Some(&r) if r > own => problems.push(format!("{name} refers up to {target}")),
                _ => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_layer_list_is_read_in_order() {
    let order = documented_order("x\n# Layers\n1. [`http`], [`store`]\n2. [`config`] uses [`http`]\nOutside the data path: [`bench`]");
    assert_eq!(order, ["http", "store", "config"]);
    let refs = references("use crate::{a, b::C};\n// crate::c\nfn f() { crate::d::e(); }\n#[cfg(test)]\nmod tests { use crate::f; }");
    assert_eq!(refs, ["a", "b", "d"]);
}
