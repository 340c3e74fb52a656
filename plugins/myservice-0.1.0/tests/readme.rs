//! The README's "Serving an async service" is this sample: the `src/lib.rs`
//! a user pastes from it is this crate's (and 0.2.0's, the same code), and
//! the `Cargo.toml` beside it has the same dependencies, so neither can
//! drift from what CI builds.

use std::path::Path;

const SECTION: &str = "## Serving an async service\n";

/// The README's section, up to the next one.
fn section() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let start = readme.find(SECTION).expect("the README has the section") + SECTION.len();
    let end = readme[start..]
        .find("\n## ")
        .map_or(readme.len(), |e| start + e);
    readme[start..end].to_owned()
}

/// The first block of `lang` in `text` whose code contains `marker`.
fn block(text: &str, lang: &str, marker: &str) -> String {
    let fence = format!("```{lang}\n");
    text.match_indices(&fence)
        .map(|(at, _)| {
            let code = &text[at + fence.len()..];
            &code[..code.find("```\n").expect("a closed block")]
        })
        .find(|code| code.contains(marker))
        .unwrap_or_else(|| panic!("no ```{lang} block with {marker:?}"))
        .to_owned()
}

/// The names in the `[dependencies]` table of a Cargo.toml, sorted.
fn dependencies(manifest: &str) -> Vec<String> {
    let mut names: Vec<String> = manifest
        .lines()
        .skip_while(|l| l.trim() != "[dependencies]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| {
            l.split(['.', ' ', '='])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn the_readme_lib_rs_is_this_crates() {
    let pasted = block(&section(), "rust", "export_service!");
    for sample in ["src/lib.rs", "../myservice-0.2.0/src/lib.rs"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(sample);
        let code = std::fs::read_to_string(&path).expect("the sample's lib.rs");
        assert!(
            code == pasted,
            "the README's src/lib.rs and {} differ: change both",
            path.display()
        );
    }
}

#[test]
fn the_readme_cargo_toml_has_this_crates_dependencies() {
    let pasted = block(&section(), "toml", "[dependencies]");
    assert!(pasted.contains("name = \"myservice\""), "{pasted}");
    assert!(pasted.contains("features = [\"tower\"]"), "{pasted}");
    let ours = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .expect("Cargo.toml");
    assert_eq!(dependencies(&pasted), dependencies(&ours));
    assert_eq!(
        dependencies(&ours),
        ["axum", "futures-util", "nine9s-sdk", "tokio"]
    );
}
