//! Every pipeline file shipped in `pipelines/` is valid: the synthetic ones plan as they are, and
//! on a machine without the datasets the papers' ones report only the missing data and weights
//! (each with the path to fill), never a param, an input or a method that does not exist.

mod engine_common;

use engine_common::{manifest_dir, text, Ws};

#[test]
fn shipped_pipelines_are_valid_and_ask_only_for_their_data() {
    let dir = manifest_dir().join("pipelines");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        // In a workspace of its own, so that `../data` is an empty folder.
        let ws = Ws::new("", &[]);
        let rel = format!("pipelines/{name}");
        ws.write(&rel, &std::fs::read_to_string(&file).unwrap());
        let out = ws.dag(&["plan", &rel]);
        let all = text(&out);
        if name.contains("quickstart") {
            assert!(out.status.success(), "{name}: {all}");
            continue;
        }
        assert!(
            !out.status.success(),
            "{name} planned without its data: {all}"
        );
        let problems: Vec<&str> = all
            .lines()
            .filter(|l| l.trim_start().starts_with('×'))
            .collect();
        assert!(!problems.is_empty(), "{name}: {all}");
        for p in problems {
            assert!(
                p.contains("does not exist") || p.contains("not found"),
                "{name}: a problem other than missing data: {p}\n{all}"
            );
        }
    }
}
