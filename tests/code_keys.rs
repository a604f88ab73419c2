//! The code part of the stage keys: every kind of dag's own is keyed by the digests of exactly the
//! crates it is built from, taken from the sources in this checkout; shell stages by none.

use std::path::PathBuf;

use dag::key::stage_key;
use dag_api::{Code, Params};

fn crate_dir(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match name {
        "dag-stages" => root.join("stages"),
        "dag-api-derive" => root.join("stages/api/derive"),
        other => root.join("stages").join(other.trim_start_matches("dag-")),
    }
}

fn code_of(kind: &str) -> Code {
    dag::cli::registry()
        .get(kind)
        .unwrap_or_else(|| panic!("no kind `{kind}`"))
        .code()
}

fn crates(code: &Code) -> Vec<&'static str> {
    code.parts.iter().map(|(name, _)| *name).collect()
}

/// Each workspace crate of `code` has the digest of its sources as they are now.
fn assert_current(kind: &str, code: &Code) {
    for (name, digest) in code.parts.iter().filter(|(n, _)| *n != "dependencies") {
        let now = dag_code::crate_digest(&crate_dir(name)).unwrap();
        assert_eq!(
            *digest, now,
            "{kind}: the digest of {name} is not its sources'"
        );
    }
}

#[test]
fn network_kinds_are_keyed_by_the_model_and_training_crates() {
    for kind in [
        "train_source",
        "adapt",
        "self_train",
        "score_entropy",
        "evaluate",
    ] {
        let code = code_of(kind);
        assert_eq!(
            crates(&code),
            [
                "dag-api",
                "dag-api-derive",
                "dag-artifacts",
                "dag-data",
                "dag-kernels",
                "dag-metrics",
                "dag-model",
                "dag-stages",
                "dag-train",
                "dependencies"
            ],
            "{kind}"
        );
        assert_current(kind, &code);
    }
}

#[test]
fn data_kinds_do_not_depend_on_the_network_crates() {
    for kind in ["synth", "preprocess", "split", "compare"] {
        let code = code_of(kind);
        assert_eq!(
            crates(&code),
            [
                "dag-api",
                "dag-api-derive",
                "dag-artifacts",
                "dag-data",
                "dag-data-stages",
                "dag-metrics",
                "dependencies"
            ],
            "{kind}"
        );
        assert_current(kind, &code);
    }
    // Not even through the external crates: Burn is not among them.
    assert_ne!(code_of("split").parts.last(), code_of("adapt").parts.last());
}

#[test]
fn shell_stages_depend_on_no_code_of_dag() {
    assert_eq!(code_of("shell"), Code::NONE);
}

#[test]
fn a_change_to_any_crate_of_a_kind_changes_its_key() {
    let params = Params::default();
    let code = code_of("adapt");
    let key = |code: &Code| {
        stage_key(
            "adapt",
            code,
            &params,
            Some("flex"),
            Some(1),
            &Default::default(),
        )
    };
    let base = key(&code);
    for i in 0..code.parts.len() {
        let mut parts = code.parts.to_vec();
        parts[i].1 = "0000";
        let changed = Code {
            parts: Box::leak(parts.into_boxed_slice()),
        };
        assert_ne!(base, key(&changed), "{} is not in the key", code.parts[i].0);
    }
}
