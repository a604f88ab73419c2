//! The code digests on a temporary workspace: what changes them and what does not.

use std::fs;
use std::path::Path;

use dag_code::{code_parts, crate_digest, DEPENDENCIES};

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// A workspace of three crates: `kinds` depends on `lib` (and on `helper` only for its tests),
/// `lib` on the external crate `ext`.
fn workspace(root: &Path, ext_version: &str) {
    write(
        &root.join("Cargo.toml"),
        "[workspace]\nmembers = [\"kinds\", \"lib\", \"helper\"]\n",
    );
    write(
        &root.join("kinds/Cargo.toml"),
        "[package]\nname = \"kinds\"\nversion = \"0.1.0\"\n\n[dependencies]\nlib = { path = \"../lib\" }\n\n[dev-dependencies]\nhelper = { path = \"../helper\" }\n",
    );
    write(&root.join("kinds/src/lib.rs"), "pub fn kind() {}\n");
    write(&root.join("kinds/tests/t.rs"), "#[test]\nfn t() {}\n");
    write(
        &root.join("lib/Cargo.toml"),
        "[package]\nname = \"lib\"\nversion = \"0.1.0\"\n\n[dependencies]\next = \"1\"\n",
    );
    write(&root.join("lib/src/lib.rs"), "pub fn f() -> u32 { 1 }\n");
    write(&root.join("lib/src/inner/mod.rs"), "pub fn g() {}\n");
    write(
        &root.join("helper/Cargo.toml"),
        "[package]\nname = \"helper\"\nversion = \"0.1.0\"\n",
    );
    write(&root.join("helper/src/lib.rs"), "pub fn h() {}\n");
    write(
        &root.join("Cargo.lock"),
        &format!(
            "version = 4\n\n\
             [[package]]\nname = \"ext\"\nversion = \"{ext_version}\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"00\"\n\n\
             [[package]]\nname = \"helper\"\nversion = \"0.1.0\"\n\n\
             [[package]]\nname = \"kinds\"\nversion = \"0.1.0\"\ndependencies = [\n \"helper\",\n \"lib\",\n]\n\n\
             [[package]]\nname = \"lib\"\nversion = \"0.1.0\"\ndependencies = [\n \"ext\",\n]\n"
        ),
    );
}

fn parts(root: &Path) -> Vec<(String, String)> {
    code_parts(root, "kinds").unwrap().parts
}

fn part<'a>(parts: &'a [(String, String)], name: &str) -> &'a str {
    &parts.iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn the_closure_follows_normal_dependencies_only() {
    let dir = tempfile::tempdir().unwrap();
    workspace(dir.path(), "1.0.0");
    let names: Vec<String> = parts(dir.path()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["kinds", "lib", DEPENDENCIES]);
    assert!(code_parts(dir.path(), "nobody").is_err());
}

#[test]
fn a_source_file_changes_its_crate_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    workspace(root, "1.0.0");
    let before = parts(root);
    write(&root.join("lib/src/inner/mod.rs"), "pub fn g() { }\n");
    let after = parts(root);
    assert_ne!(part(&before, "lib"), part(&after, "lib"));
    assert_eq!(part(&before, "kinds"), part(&after, "kinds"));
    assert_eq!(part(&before, DEPENDENCIES), part(&after, DEPENDENCIES));
    // A new file counts, and so does a file's path.
    let lib = crate_digest(&root.join("lib")).unwrap();
    write(&root.join("lib/src/extra.rs"), "");
    assert_ne!(lib, crate_digest(&root.join("lib")).unwrap());
}

#[test]
fn tests_comments_and_dev_dependencies_do_not_count() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    workspace(root, "1.0.0");
    let before = parts(root);
    write(
        &root.join("kinds/tests/t.rs"),
        "#[test]\nfn t() { assert!(true) }\n",
    );
    write(&root.join("helper/src/lib.rs"), "pub fn h() { }\n");
    let manifest = fs::read_to_string(root.join("kinds/Cargo.toml")).unwrap();
    write(
        &root.join("kinds/Cargo.toml"),
        &format!("# a comment\n{manifest}\n[dev-dependencies.more]\npath = \"../helper\"\n"),
    );
    assert_eq!(before, parts(root));
    // A normal dependency does count.
    write(
        &root.join("kinds/Cargo.toml"),
        &manifest.replace(
            "[dependencies]\n",
            "[dependencies]\nhelper = { path = \"../helper\" }\n",
        ),
    );
    assert_ne!(part(&before, "kinds"), part(&parts(root), "kinds"));
}

#[test]
fn a_locked_version_changes_the_dependencies_part() {
    let dir = tempfile::tempdir().unwrap();
    workspace(dir.path(), "1.0.0");
    let before = parts(dir.path());
    workspace(dir.path(), "1.0.1");
    let after = parts(dir.path());
    assert_ne!(part(&before, DEPENDENCIES), part(&after, DEPENDENCIES));
    assert_eq!(part(&before, "lib"), part(&after, "lib"));
}
