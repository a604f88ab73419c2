//! Validation: every error of tests/pipelines/invalid/*.yaml, each with its line and column; and a
//! library-level run of typed stage kinds (inputs, datasets whose root is a stage output).

mod engine_common;

use std::fs;

use dag::cache::Cache;
use dag::executor::{Engine, Outcome, PlanStatus, Selection};
use dag::hash::StatCache;
use dag::spec::{self, Override};
use dag_api::{
    InputSpec, OutputSpec, ParamSpec, ParamType, Params, Registry, Stage, StageContext, StageError,
    StageOutcome, Value,
};
use engine_common::{text, Ws};

/// Writes a dataset-shaped artifact: the dataset's format, and the files under its root.
struct Source;
impl Stage for Source {
    fn kind(&self) -> &'static str {
        "source"
    }
    fn code(&self) -> dag_api::Code {
        dag_api::Code::NONE
    }
    fn doc(&self) -> &'static str {
        "test source"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required("dataset", ParamType::Dataset, "the dataset"),
            ParamSpec::optional(
                "size",
                ParamType::Tuple(vec![ParamType::positive(), ParamType::positive()]),
                serde_json::json!([64, 32]),
                "width, height",
            ),
        ]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![]
    }
    fn outputs(&self, _: &Params) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "data".into(),
            ty: "dataset",
            doc: "rows",
        }]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let ds = ctx.dataset("dataset")?;
        let mut listing: Vec<String> = match fs::read_dir(&ds.root) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => vec!["<no root>".into()],
        };
        listing.sort();
        let extra = serde_json::to_string(&ds.extra).unwrap();
        let body = format!(
            "{} {} {} {}\n",
            ds.format,
            ds.classes,
            extra,
            listing.join(",")
        );
        fs::write(ctx.output("data")?.join("rows.txt"), body)?;
        Ok(StageOutcome::default())
    }
}

/// Reads its `source` input and writes a "model"; built from the code it holds.
struct Train(dag_api::Code);

/// The code of [`Train`] in most tests.
const TRAIN_CODE: dag_api::Code = dag_api::Code {
    parts: &[("test-train", "3"), ("dependencies", "1")],
};

impl Stage for Train {
    fn kind(&self) -> &'static str {
        "train"
    }
    fn code(&self) -> dag_api::Code {
        self.0
    }
    fn doc(&self) -> &'static str {
        "test trainer"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional("iters", ParamType::positive(), 10, "iterations"),
            ParamSpec::optional(
                "lr",
                ParamType::Float {
                    min: Some(0.0),
                    max: None,
                    min_exclusive: true,
                },
                0.01,
                "learning rate",
            ),
            ParamSpec::optional(
                "method",
                ParamType::Enum(vec!["advent", "minent"]),
                "advent",
                "method",
            ),
        ]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "source",
                ty: "dataset",
                required: true,
                doc: "labelled data",
            },
            InputSpec {
                name: "init",
                ty: "model",
                required: false,
                doc: "initial weights",
            },
        ]
    }
    fn outputs(&self, _: &Params) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "model".into(),
            ty: "model",
            doc: "weights",
        }]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let rows = fs::read_to_string(ctx.input("source")?.path.join("rows.txt"))?;
        let iters = ctx.params.get("iters").and_then(Value::as_i64).unwrap_or(0);
        ctx.progress.start("train", iters as u64);
        fs::write(
            ctx.output("model")?.join("weights.txt"),
            format!("{rows}{iters} {}\n", ctx.device),
        )?;
        let mut o = StageOutcome::default();
        o.metrics.insert("loss".into(), serde_json::json!(0.5));
        Ok(o)
    }
}

/// Needs a model and a dataset.
struct Eval;
impl Stage for Eval {
    fn kind(&self) -> &'static str {
        "eval"
    }
    fn code(&self) -> dag_api::Code {
        dag_api::Code::NONE
    }
    fn doc(&self) -> &'static str {
        "test evaluator"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "model",
                ty: "model",
                required: true,
                doc: "the model",
            },
            InputSpec {
                name: "data",
                ty: "dataset",
                required: true,
                doc: "the data",
            },
        ]
    }
    fn outputs(&self, _: &Params) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "metrics".into(),
            ty: "metrics",
            doc: "scores",
        }]
    }
    fn run(&self, _: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        Ok(StageOutcome::default())
    }
}

fn registry() -> Registry {
    registry_with(TRAIN_CODE)
}

fn registry_with(train_code: dag_api::Code) -> Registry {
    let mut r = Registry::new();
    r.register(Source);
    r.register(Train(train_code));
    r.register(Eval);
    r.register(dag::shell::Shell);
    r
}

fn fixtures_dir() -> std::path::PathBuf {
    engine_common::manifest_dir().join("tests/pipelines")
}

#[test]
fn every_invalid_fixture_reports_its_line_and_column() {
    let dir = fixtures_dir().join("invalid");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "fixtures missing");
    let reg = registry();
    let mut problems = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", f.display()));
        let (pos, msgs) = expect.split_once(' ').unwrap();
        let errs = match spec::load(&f, &reg, &[]) {
            Ok(_) => {
                problems.push(format!("{} validated", f.display()));
                continue;
            }
            Err(e) => e,
        };
        let want = format!("{}:{pos}: ", f.display());
        let Some(hit) = errs.0.iter().find(|e| e.to_string().starts_with(&want)) else {
            problems.push(format!("{}: no error at {pos}; got:\n{errs}", f.display()));
            continue;
        };
        let full = format!("{hit}\n{}", hit.hint.clone().unwrap_or_default());
        for m in msgs.split(" | ") {
            if !full.contains(m.trim()) {
                problems.push(format!("{}: `{m}` not in:\n{full}", f.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn overrides_are_validated_like_the_file() {
    let reg = registry();
    let f = fixtures_dir().join("datasets_edge.yaml");
    let bad = |arg: &str| {
        let o = match Override::parse(arg) {
            Ok(o) => o,
            Err(e) => return e.to_string(),
        };
        match spec::load(&f, &reg, &[o]) {
            Ok(_) => panic!("{arg} validated"),
            Err(e) => e.to_string(),
        }
    };
    let e = bad("trian.iters=3");
    assert!(
        e.starts_with("-S trian.iters=3:1:1: unknown stage `trian`"),
        "{e}"
    );
    assert!(e.contains("did you mean `train`?"), "{e}");
    let e = bad("train.itres=3");
    assert!(
        e.starts_with("-S train.itres=3:1:7: unknown param `itres`"),
        "{e}"
    );
    let e = bad("train.iters=lots");
    assert!(
        e.starts_with(
            "-S train.iters=lots:1:13: param `iters` of stage `train`: expected an integer"
        ),
        "{e}"
    );
    let e = bad("train.iters");
    assert!(e.contains("stage.param=value"), "{e}");
    // A valid override changes the param.
    let o = Override::parse("train.iters=7").unwrap();
    let p = spec::load(&f, &reg, &[o]).unwrap();
    assert_eq!(
        p.stages[p.index["train"]].params.get("iters"),
        Some(&serde_json::json!(7))
    );
}

#[test]
fn dataset_roots_that_are_outputs_are_edges_and_resolve_to_the_artifact() {
    let ws = Ws::new(
        &engine_common::fixture("datasets_edge.yaml"),
        &[("data/city/a.png", "x")],
    );
    let reg = registry();
    let p = spec::load(&ws.path("pipeline.yaml"), &reg, &[]).unwrap();
    let (prep, use_, train) = (p.index["prep"], p.index["use"], p.index["train"]);
    assert!(p.upstream(use_).contains(&prep));
    assert_eq!(p.order, vec![prep, use_, train]);
    // Defaults are filled in, and `lr: 1` is stored as a float (so `1` and `1.0` share a key).
    assert_eq!(
        p.stages[train].params.get("method"),
        Some(&serde_json::json!("advent"))
    );
    assert_eq!(
        p.stages[train].params.get("lr"),
        Some(&serde_json::json!(1.0))
    );

    let cache = Cache::open(&ws.path("cache")).unwrap();
    let stat = StatCache::load(cache.root.join("statcache.json"));
    let engine = Engine::new(&p, &cache, &stat, dag_api::DeviceKind::Flex, ws.path("out"));
    let report = engine.run(&Selection::default(), 2).unwrap();
    assert!(report.failure.is_none(), "{:?}", report.failure);
    assert!(report.stages.iter().all(|s| s.outcome == Outcome::Ran));
    // `use` saw prep's artifact as its dataset root; the extra key came through.
    let rows = ws.read("out/uda/use/data/rows.txt");
    assert_eq!(rows, "synthia 16 {\"split_file\":\"train.txt\"} rows.txt\n");
    assert_eq!(
        ws.read("out/uda/prep/data/rows.txt"),
        "cityscapes 19 {} a.png\n"
    );
    assert_eq!(
        ws.read("out/uda/train/model/weights.txt"),
        format!("{rows}3 flex\n")
    );
    // Metrics land in the manifest.
    let key = cache.latest("uda", "train").unwrap();
    let m = cache.read_manifest(&key).unwrap();
    assert_eq!(m.metrics["loss"], serde_json::json!(0.5));
    assert_eq!(m.inputs["source"].producer, "use.data");

    // A new file in the workspace dataset changes its fingerprint: everything downstream reruns.
    ws.write("data/city/b.png", "y");
    let engine = Engine::new(&p, &cache, &stat, dag_api::DeviceKind::Flex, ws.path("out"));
    let report = engine.run(&Selection::default(), 1).unwrap();
    let ran: Vec<_> = report.stages.iter().map(|s| s.outcome).collect();
    // `prep` lists the new file; `use` reruns because its dataset changed but writes the same
    // bytes (prep's artifact still holds one file), so `train` is cut off.
    assert_eq!(ran, vec![Outcome::Ran, Outcome::Ran, Outcome::Cached]);
    // New code of the crates `train` is built from reruns `train` alone, and says why.
    let newer = registry_with(dag_api::Code {
        parts: &[("test-train", "4"), ("dependencies", "1")],
    });
    let p2 = spec::load(&ws.path("pipeline.yaml"), &newer, &[]).unwrap();
    let engine = Engine::new(
        &p2,
        &cache,
        &stat,
        dag_api::DeviceKind::Flex,
        ws.path("out"),
    );
    let plan = engine.plan(&Selection::default()).unwrap();
    let status: Vec<PlanStatus> = plan.iter().map(|e| e.status).collect();
    assert_eq!(
        status,
        [PlanStatus::Cached, PlanStatus::Cached, PlanStatus::Run],
        "{plan:?}"
    );
    assert_eq!(
        plan[2].reasons,
        [dag::executor::Reason::CodeChanged {
            crates: vec!["test-train".into()]
        }]
    );
    assert_eq!(plan[2].reasons[0].to_string(), "code of test-train changed");
    assert_eq!(plan[2].code["test-train"], "4");
    assert!(plan[2].code_digest.is_some() && plan[0].code_digest.is_none());
    let locked = registry_with(dag_api::Code {
        parts: &[("test-train", "3"), ("dependencies", "2")],
    });
    let p3 = spec::load(&ws.path("pipeline.yaml"), &locked, &[]).unwrap();
    let engine = Engine::new(
        &p3,
        &cache,
        &stat,
        dag_api::DeviceKind::Flex,
        ws.path("out"),
    );
    let plan = engine.plan(&Selection::default()).unwrap();
    assert_eq!(
        plan[2].reasons[0].to_string(),
        "the locked dependencies changed"
    );

    // Another device is another key for device-dependent kinds.
    let engine = Engine::new(&p, &cache, &stat, dag_api::DeviceKind::Cuda, ws.path("out"));
    let plan = engine.plan(&Selection::default()).unwrap();
    assert!(plan.iter().all(|e| e.status == PlanStatus::Run), "{plan:?}");
    assert!(plan[0]
        .reasons
        .iter()
        .any(|r| matches!(r, dag::executor::Reason::DeviceChanged { .. })));
}

#[test]
fn the_cli_renders_spec_errors_with_snippets_and_exit_status_2() {
    let ws = Ws::new(
        "name: p\nstages:\n  a: { kind: shel, params: { cmd: x, outs: [o] } }\n",
        &[],
    );
    let out = ws.dag(&["plan", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pipeline.yaml:3:14: unknown stage kind `shel`"),
        "{err}"
    );
    assert!(err.contains("did you mean `shell`?"), "{err}");
    assert!(
        err.contains("a: { kind: shel"),
        "the snippet is shown: {err}"
    );
    assert!(err.contains("nothing was run"), "{err}");

    // A cycle through shell deps names every stage on it.
    let ws = Ws::new(
        r#"name: p
stages:
  a: { kind: shell, params: { cmd: x, deps: [c.txt], outs: [a.txt] } }
  b: { kind: shell, params: { cmd: x, deps: [a.txt], outs: [b.txt] } }
  c: { kind: shell, params: { cmd: x, deps: [b.txt], outs: [c.txt] } }
"#,
        &[],
    );
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pipeline.yaml:3:3: the stages form a cycle: a -> b -> c -> a"),
        "{err}"
    );
    assert!(
        !ws.path("cache").exists(),
        "nothing ran, no cache was created"
    );

    // A missing workspace dep, and an out written twice.
    let ws = Ws::new(
        r#"name: p
stages:
  a: { kind: shell, params: { cmd: x, deps: [nope.txt], outs: [a.txt] } }
  b: { kind: shell, params: { cmd: x, outs: [a.txt] } }
"#,
        &[],
    );
    let out = ws.dag(&["plan", "pipeline.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "pipeline.yaml:3:46: dep `nope.txt` of stage `a` does not exist and no stage writes it"
        ),
        "{err}"
    );
    assert!(
        err.contains("out `a.txt` is also written by stage `a`"),
        "{err}"
    );
}

#[test]
fn unknown_kinds_list_what_exists() {
    let reg = registry();
    let src = dag::diag::Source::new("x.yaml", "stages:\n  a: { kind: zzz }\n");
    let e = spec::load_str(&src, "x", "/x.yaml".into(), "/".into(), &reg, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("x.yaml:2:14: unknown stage kind `zzz`"), "{e}");
    assert!(e.contains("known kinds: eval, shell, source, train"), "{e}");
}

#[test]
fn stages_with_one_key_run_once_even_in_parallel() {
    // Two stages with identical definitions have one key and would share a scratch directory:
    // the second waits for the first and is then cached.
    let ws = Ws::new(
        r#"name: twins
datasets:
  raw: { format: cityscapes, root: data, classes: 19 }
stages:
  a: { kind: source, params: { dataset: raw } }
  b: { kind: source, params: { dataset: raw, size: [64, 32] } }
"#,
        &[("data/x.png", "x")],
    );
    let reg = registry();
    let p = spec::load(&ws.path("pipeline.yaml"), &reg, &[]).unwrap();
    let cache = Cache::open(&ws.path("cache")).unwrap();
    let stat = StatCache::load(cache.root.join("statcache.json"));
    let engine = Engine::new(&p, &cache, &stat, dag_api::DeviceKind::Flex, ws.path("out"));
    let report = engine.run(&Selection::default(), 2).unwrap();
    let outcomes: Vec<_> = report.stages.iter().map(|s| s.outcome).collect();
    assert_eq!(outcomes, vec![Outcome::Ran, Outcome::Cached]);
    assert_eq!(report.stages[0].key, report.stages[1].key);
    assert_eq!(
        ws.read("out/twins/b/data/rows.txt"),
        "cityscapes 19 {} x.png\n"
    );
}
