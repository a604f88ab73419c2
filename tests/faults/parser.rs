//! The pipeline parser and validator on generated input: never a panic, and every error points
//! at a 1-based line and column of the file and renders with its snippet. A fixed case count
//! keeps the CI time bounded and the run reproducible.

use dag::diag::Source;
use proptest::prelude::*;

/// Fragments of pipeline files, valid and not, for the token soup.
const TOKENS: &[&str] = &[
    "name: ",
    "stages:",
    "datasets:",
    "device: ",
    "seed: ",
    "jobs: ",
    "kind: ",
    "params: ",
    "inputs: ",
    "\n",
    "\n  ",
    "\n    ",
    "{ ",
    " }",
    "[",
    "]",
    ", ",
    ": ",
    "- ",
    "&a ",
    "*a",
    "!!str ",
    "synth",
    "preprocess",
    "train_source",
    "adapt",
    "score_entropy",
    "split",
    "self_train",
    "evaluate",
    "compare",
    "shell",
    "lambda",
    "0.67",
    "-1",
    "1e400",
    ".nan",
    "~",
    "true",
    "\"",
    "'",
    "#",
    "---",
    "...",
    "|",
    ">",
    "?",
    "\t",
    "é",
    "\u{1F525}",
    "source.dataset",
    "synth.source",
    "size",
    "[64, 32]",
    "iters",
    "99999999999999999999",
    "cmd",
    "outs",
    "..",
];

const QUICKSTART: &str = include_str!("../../pipelines/quickstart.yaml");

fn check(text: &str) -> Result<(), TestCaseError> {
    let src = Source::new("p.yaml", text);
    let reg = dag::cli::registry();
    let r = dag::spec::load_str(
        &src,
        "p",
        "/nonexistent-dag-dir/p.yaml".into(),
        "/nonexistent-dag-dir".into(),
        &reg,
        &[],
    );
    if let Err(errs) = r {
        prop_assert!(!errs.0.is_empty());
        for e in &errs.0 {
            let s = e.to_string();
            prop_assert!(s.starts_with("p.yaml:"), "{}", s);
            prop_assert!(e.span.line >= 1 && e.span.col >= 1, "{}", s);
            // Rendering the snippet must not panic either (spans inside the text).
            let _ = format!("{:?}", e.report());
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text(s in "\\PC{0,300}") {
        check(&s)?;
    }

    #[test]
    fn token_soup(t in prop::collection::vec(prop::sample::select(TOKENS), 0..120)) {
        check(&t.concat())?;
    }

    #[test]
    fn mutated_quickstart(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6)) {
        let mut bytes = QUICKSTART.as_bytes().to_vec();
        for (at, b, op) in edits {
            let i = at.index(bytes.len().max(1));
            match op {
                0 if !bytes.is_empty() => bytes[i] = b,
                1 => bytes.insert(i.min(bytes.len()), b),
                _ if !bytes.is_empty() => { bytes.remove(i); }
                _ => {}
            }
        }
        // The file reader refuses invalid UTF-8 before parsing; the parser sees text.
        check(&String::from_utf8_lossy(&bytes))?;
    }
}
