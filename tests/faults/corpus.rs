//! Malformed pipeline files through the real `dag` binary: each ends, within a time limit, with
//! exit status 2 and an error naming the file, line and column (never a panic, a crash or a
//! hang). The fixtures of tests/pipelines/invalid go through the binary too.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

/// A valid pipeline the cases below break one way each.
const BASE: &str = "name: corpus
device: flex
stages:
  synth: { kind: synth, params: { source_images: 4, target_train: 4, target_val: 2, size: [64, 32] } }
  split: { kind: split, inputs: { scores: entropy.scores } }
  entropy: { kind: score_entropy, inputs: { model: train.model, target: target } }
  train: { kind: train_source, inputs: { source: source } }
  source: { kind: preprocess, params: { dataset: synthia } }
  target: { kind: preprocess, params: { dataset: cityscapes, split: train } }
datasets:
  synthia:    { format: synthia,    root: synth.source, classes: 16 }
  cityscapes: { format: cityscapes, root: synth.target, classes: 16 }
";

fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "`{from}` not in BASE");
    BASE.replacen(from, to, 1)
}

/// `(file name, content, text the error must contain)`.
fn cases() -> Vec<(String, Vec<u8>, &'static str)> {
    let mut v: Vec<(&str, String, &'static str)> = vec![
        ("unclosed_flow", edit("size: [64, 32] } }", "size: [64, 32] }"), "invalid YAML"),
        ("tab_indent", edit("  split:", "\tsplit:"), "invalid YAML"),
        ("bad_indent", edit("  split:", "    split:"), "invalid YAML"),
        ("unterminated_quote", edit("name: corpus", "name: \"corpus"), "invalid YAML"),
        ("duplicate_top_key", format!("{BASE}name: again\n"), "duplicate key `name`"),
        ("duplicate_stage", edit("  split:", "  synth: { kind: synth }\n  split:"), "duplicate key `synth`"),
        ("top_is_list", "- name: corpus\n- stages: {}\n".into(), "mapping"),
        ("top_is_scalar", "just a string\n".into(), "mapping"),
        ("empty_file", String::new(), "the file is empty"),
        ("only_comments", "# nothing here\n# at all\n".into(), "the file is empty"),
        ("two_documents", format!("{BASE}---\nname: second\n"), "more than one YAML document"),
        ("unknown_top_key", edit("stages:", "stagse:"), "stagse"),
        ("unknown_stage_key", edit("{ kind: split, inputs", "{ kind: split, input"), "input"),
        ("unknown_kind", edit("kind: train_source", "kind: trian_source"), "did you mean `train_source`"),
        ("unknown_param", edit("source_images: 4", "source_imgs: 4"), "unknown param `source_imgs`"),
        ("string_for_int", edit("source_images: 4", "source_images: many"), "expected an integer"),
        ("float_for_int", edit("source_images: 4", "source_images: 1.5"), "expected an integer"),
        ("bool_for_float", edit("{ kind: split, inputs: { scores: entropy.scores } }", "{ kind: split, inputs: { scores: entropy.scores }, params: { lambda: yes } }"), "lambda"),
        ("lambda_zero", edit("inputs: { scores: entropy.scores } }", "inputs: { scores: entropy.scores }, params: { lambda: 0 } }"), "lambda"),
        ("lambda_above_one", edit("inputs: { scores: entropy.scores } }", "inputs: { scores: entropy.scores }, params: { lambda: 1.5 } }"), "lambda"),
        ("lambda_negative", edit("inputs: { scores: entropy.scores } }", "inputs: { scores: entropy.scores }, params: { lambda: -0.2 } }"), "lambda"),
        ("lambda_nan", edit("inputs: { scores: entropy.scores } }", "inputs: { scores: entropy.scores }, params: { lambda: .nan } }"), "lambda"),
        ("lambda_inf", edit("inputs: { scores: entropy.scores } }", "inputs: { scores: entropy.scores }, params: { lambda: .inf } }"), "lambda"),
        ("negative_size", edit("size: [64, 32]", "size: [-64, 32]"), "size"),
        ("size_arity", edit("size: [64, 32]", "size: [64]"), "size"),
        ("size_huge", edit("size: [64, 32]", "size: [100000000, 100000000]"), "size"),
        ("int_overflow", edit("source_images: 4", "source_images: 99999999999999999999999"), "source_images"),
        ("float_overflow", edit("source_images: 4", "source_images: 1e400"), "source_images"),
        ("images_huge", edit("source_images: 4", "source_images: 1000000000000"), "source_images"),
        ("preprocess_size_huge", edit("{ dataset: synthia }", "{ dataset: synthia, size: [4000000000, 3] }"), "size"),
        ("iters_zero", edit("inputs: { source: source } }", "inputs: { source: source }, params: { iters: 0 } }"), "iters"),
        ("cycle", edit("  split:", "  t1: { kind: train_source, inputs: { source: source, init: t2.model } }\n  t2: { kind: train_source, inputs: { source: source, init: t1.model } }\n  split:"), "form a cycle"),
        ("self_loop", edit("inputs: { source: source } }", "inputs: { source: source, init: train.model } }"), "self-loop"),
        ("self_loop_typed_wrong", edit("inputs: { scores: entropy.scores }", "inputs: { scores: split.easy }"), "split"),
        ("missing_input", edit("{ kind: split, inputs: { scores: entropy.scores } }", "{ kind: split }"), "scores"),
        ("unknown_input_name", edit("inputs: { scores: entropy.scores }", "inputs: { scores: entropy.scores, extra: synth }"), "extra"),
        ("unknown_input_stage", edit("scores: entropy.scores", "scores: entrpy.scores"), "entrpy"),
        ("unknown_output", edit("scores: entropy.scores", "scores: entropy.nope"), "nope"),
        ("input_type", edit("scores: entropy.scores", "scores: synth.source"), "scores"),
        ("empty_stages", "name: corpus\nstages: {}\n".into(), "stage"),
        ("null_stages", "name: corpus\nstages:\n".into(), "stages"),
        ("no_stages_key", "name: corpus\ndevice: flex\n".into(), "stages"),
        ("stage_is_scalar", edit("  split: { kind: split, inputs: { scores: entropy.scores } }", "  split: split"), "split"),
        ("stage_without_kind", edit("{ kind: split, inputs", "{ inputs"), "kind"),
        ("unicode_stage_name", edit("  split:", "  分割:"), "invalid stage name"),
        ("emoji_stage_name", edit("  split:", "  \u{1F525}split:"), "invalid stage name"),
        ("dotdot_stage_name", edit("  split:", "  \"../split\":"), "invalid stage name"),
        ("slash_pipeline_name", edit("name: corpus", "name: ../../etc"), "invalid pipeline name"),
        // Checked by the stage kind's preflight, which sees datasets with workspace roots only.
        ("unknown_format", edit("format: synthia,    root: synth.source", "format: synthya,    root: ."), "synthya"),
        ("bad_classes", edit("format: synthia,    root: synth.source, classes: 16", "format: synthia,    root: ., classes: 7"), "7"),
        ("missing_root_dir", edit("root: synth.source", "root: no/such/dir"), "no/such/dir"),
        ("undefined_dataset", edit("{ dataset: synthia }", "{ dataset: gta }"), "gta"),
        ("bad_device", edit("device: flex", "device: tpu"), "tpu"),
        ("seed_string", edit("device: flex", "device: flex\nseed: abc"), "seed"),
        ("seed_negative", edit("device: flex", "device: flex\nseed: -1"), "seed"),
        ("jobs_zero", edit("device: flex", "device: flex\njobs: 0"), "found 0"),
        ("jobs_string", edit("device: flex", "device: flex\njobs: all"), "jobs"),
        ("alias", edit("device: flex", "device: &d flex\nseed: *d"), "aliases"),
        ("billion_laughs", "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\nname: bomb\nstages: {}\n".into(), "aliases"),
        ("merge_key", edit("  split: { kind: split,", "  base: &base { kind: split }\n  split: { <<: *base,"), "aliases"),
        ("list_key", edit("name: corpus", "[name]: corpus"), "keys must be strings"),
        ("shell_out_dotdot", edit("  split:", "  sh: { kind: shell, params: { cmd: \"true\", outs: [../escape.txt] } }\n  split:"), ".."),
        ("shell_out_absolute", edit("  split:", "  sh: { kind: shell, params: { cmd: \"true\", outs: [/tmp/escape.txt] } }\n  split:"), "relative"),
        ("shell_dep_absolute", edit("  split:", "  sh: { kind: shell, params: { cmd: \"true\", deps: [/etc/passwd], outs: [o.txt] } }\n  split:"), "relative"),
    ];
    let deep = format!("name: deep\nstages: {}\n", "[".repeat(100_000));
    v.push(("deep_nesting", deep, "recursion limit"));
    // 10 MB: a long comment block, then a mistake at the end (its line number is large).
    let mut big = String::with_capacity(10 << 20);
    big.push_str(BASE);
    while big.len() < 10 << 20 {
        big.push_str("# padding padding padding padding padding padding padding padding padding\n");
    }
    big.push_str("bogus_key: 1\n");
    v.push(("ten_megabytes_comment", big, "bogus_key"));
    // 10 MB on one line: a key far longer than YAML allows (1024 chars); the error must not
    // crash the snippet renderer.
    let long = format!(
        "name: long\nstages:\n  {}: {{ kind: nope }}\n",
        "a".repeat(10 << 20)
    );
    v.push(("ten_megabytes_line", long, "mapping values are not allowed"));
    let mut out: Vec<(String, Vec<u8>, &'static str)> = v
        .into_iter()
        .map(|(n, c, e)| (format!("{n}.yaml"), c.into_bytes(), e))
        .collect();
    // Not UTF-8: the position of the first bad byte.
    let mut bin = b"name: corpus\nstages:\n  a: { kind: synth }\n  b\xff\xfe: x\n".to_vec();
    bin.extend_from_slice(&[0u8; 16]);
    out.push(("not_utf8.yaml".into(), bin, "not valid UTF-8"));
    out.push((
        "nul_bytes.yaml".into(),
        b"name: corpus\x00\nstages: {}\n".to_vec(),
        "",
    ));
    out
}

/// `FILE:LINE:COL:` with a 1-based line and column somewhere in `stderr`.
fn has_position(stderr: &str, file: &str) -> bool {
    stderr.match_indices(&format!("{file}:")).any(|(i, m)| {
        let rest = &stderr[i + m.len()..];
        let mut parts = rest.splitn(3, ':');
        let line = parts.next().and_then(|l| l.parse::<usize>().ok());
        let col = parts.next().and_then(|c| c.parse::<usize>().ok());
        matches!((line, col), (Some(l), Some(c)) if l >= 1 && c >= 1)
    })
}

fn check_file(dir: &Path, name: &str, expect: &str, problems: &mut Vec<String>) {
    let out = output_within(cmd_in(dir, &["plan", name]), Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    let head: String = err.chars().take(1500).collect();
    if out.status.code() != Some(2) {
        problems.push(format!("{name}: exit {:?}, want 2\n{head}", out.status));
    } else if err.contains("panicked") {
        problems.push(format!("{name}: panicked\n{head}"));
    } else if !has_position(&err, name) {
        problems.push(format!("{name}: no `{name}:LINE:COL:` in\n{head}"));
    } else if !err.contains(expect) {
        problems.push(format!("{name}: `{expect}` not in\n{head}"));
    }
}

#[test]
fn malformed_pipelines_are_errors_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    let mut problems = Vec::new();
    // Each case breaks a valid pipeline in one place.
    std::fs::write(dir.path().join("base.yaml"), BASE).unwrap();
    let out = output_within(
        cmd_in(dir.path(), &["plan", "base.yaml"]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "the base pipeline must be valid:\n{}",
        text(&out)
    );
    for (name, content, expect) in &cases {
        std::fs::write(dir.path().join(name), content).unwrap();
        check_file(dir.path(), name, expect, &mut problems);
    }
    // The validation fixtures, through the real binary and registry this time.
    let fixtures = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
    .join("tests/pipelines/invalid");
    let mut n_fixtures = 0;
    for e in std::fs::read_dir(&fixtures).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        std::fs::copy(e.path(), dir.path().join(&name)).unwrap();
        check_file(dir.path(), &name, "", &mut problems);
        n_fixtures += 1;
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    assert!(cases.len() >= 40);
    figure(
        "corpus_pipelines",
        &format!("{} generated + {n_fixtures} fixtures", cases.len()),
    );
}
