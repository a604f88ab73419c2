//! The 7-stage shell pipeline: caching, reruns after edits, early cutoff, --force/--only/--until.

mod engine_common;

use engine_common::{fixture, names, text, Ws};

const INPUT: &str = "pear\napple\nfig\n";
const ALL: &[&str] = &["gen", "upper", "count", "sorted", "first", "report", "last"];

fn seven() -> Ws {
    Ws::new(&fixture("seven.yaml"), &[("src/input.txt", INPUT)])
}

#[test]
fn first_run_runs_all_and_second_run_none() {
    let ws = seven();
    assert_eq!(ws.ran(&[]), names(ALL));
    assert_eq!(ws.read("out/seven/report/report/summary.txt"), "APPLE\n3\n");
    assert_eq!(ws.read("out/seven/last/data/last.txt"), "fig\n");
    let second = ws.run(&[]);
    assert!(second.values().all(|s| s == "cached"), "{second:?}");
    assert_eq!(second.len(), 7);
    // A different output directory gets links too, without running anything.
    assert!(ws.ran(&["--out", "elsewhere"]).is_empty());
    assert_eq!(ws.read("elsewhere/seven/first/data/first.txt"), "APPLE\n");
}

#[test]
fn parallel_run_gives_the_same_outputs() {
    let ws = seven();
    assert_eq!(ws.ran(&["-j", "4"]), names(ALL));
    assert_eq!(ws.read("out/seven/report/report/summary.txt"), "APPLE\n3\n");
    assert!(ws.ran(&["-j", "4"]).is_empty());
}

#[test]
fn the_files_jobs_runs_independent_stages_at_once_and_the_flag_overrides_it() {
    // Each stage marks its arrival and then waits for the other's mark: they can only both
    // succeed when they run at the same time.
    let ws = Ws::new("", &[]);
    let meet = ws.path("meet");
    std::fs::create_dir_all(&meet).unwrap();
    let stage = |me: &str, other: &str| {
        format!(
            "  {me}: {{ kind: shell, params: {{ cmd: \"touch {dir}/{me}; for i in $(seq 50); do \
             [ -e {dir}/{other} ] && echo met > {me}.txt && exit 0; sleep 0.1; done; exit 1\", \
             outs: [{me}.txt] }} }}\n",
            dir = meet.display()
        )
    };
    ws.write(
        "pipeline.yaml",
        &format!(
            "name: meet\njobs: 2\nstages:\n{}{}",
            stage("a", "b"),
            stage("b", "a")
        ),
    );
    assert_eq!(ws.ran(&[]), names(&["a", "b"]));
    // `-j 1` runs one at a time: the first stage waits in vain and fails.
    std::fs::remove_dir_all(ws.path("cache")).unwrap();
    for f in ["a", "b"] {
        std::fs::remove_file(meet.join(f)).unwrap();
    }
    let out = ws.dag(&["run", "pipeline.yaml", "-j", "1"]);
    assert!(!out.status.success(), "{}", text(&out));
}

#[test]
fn editing_a_param_reruns_exactly_it_and_its_descendants() {
    let ws = seven();
    ws.run(&[]);
    // `count` now counts bytes: it and `report` (its only descendant) change.
    ws.edit("wc -l < data/raw.txt", "wc -c < data/raw.txt");
    let plan = ws.dag(&["plan", "pipeline.yaml"]);
    let plan_text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan_text.contains("param `cmd` changed from \"wc -l < data/raw.txt > data/count.txt\""),
        "{plan_text}"
    );
    assert!(
        plan_text.contains("upstream `count` will run"),
        "{plan_text}"
    );
    // `report` is stale only through `count`: early cutoff could still keep it.
    assert!(
        plan_text
            .lines()
            .any(|l| l.starts_with("report ") && l.contains(" may run ")),
        "{plan_text}"
    );
    assert!(
        plan_text.contains("1 of 7 stages will run; 1 more may run"),
        "{plan_text}"
    );
    assert_eq!(ws.ran(&[]), names(&["count", "report"]));
    assert_eq!(
        ws.read("out/seven/report/report/summary.txt"),
        "APPLE\n15\n"
    );
    // Editing a workspace dep reruns the whole pipeline below `gen`.
    ws.write("src/input.txt", "kiwi\n");
    let ran = ws.ran(&[]);
    assert_eq!(ran, names(ALL));
}

#[test]
fn unchanged_output_bytes_stop_the_rerun_early_cutoff() {
    let ws = seven();
    ws.run(&[]);
    // A new env value changes `upper`'s key but not what it writes.
    ws.edit("NOTE: \"a\"", "NOTE: \"b\"");
    assert_eq!(ws.ran(&[]), names(&["upper"]));
    // The same through a command-line override.
    assert_eq!(ws.ran(&["-S", "upper.env={NOTE: c}"]), names(&["upper"]));
    // And --force: it reruns, the bytes are equal, nothing below reruns.
    let r = ws.run(&["--force", "gen"]);
    assert_eq!(r["gen"], "ran");
    assert!(ALL[1..].iter().all(|s| r[*s] == "cached"), "{r:?}");
}

#[test]
fn only_and_until_select_stages() {
    let ws = seven();
    // --until: a stage and its ancestors, nothing else.
    let r = ws.run(&["--until", "sorted"]);
    assert_eq!(r["gen"], "ran");
    assert_eq!(r["upper"], "ran");
    assert_eq!(r["sorted"], "ran");
    for s in ["count", "first", "report", "last"] {
        assert_eq!(r[s], "skipped", "{s}: {r:?}");
    }
    // --only on a stage whose inputs are cached runs just it.
    let r = ws.run(&["--only", "last"]);
    assert_eq!(r["last"], "ran");
    assert!(
        r.iter()
            .filter(|(k, _)| *k != "last")
            .all(|(_, v)| v == "skipped"),
        "{r:?}"
    );
    // --only on a stage whose input was never built refuses and says what to do.
    let out = ws.dag(&["run", "pipeline.yaml", "--only", "report"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs the output of `count`"), "{err}");
    // --force with --only reruns a cached stage.
    let r = ws.run(&["--only", "upper", "--force", "upper"]);
    assert_eq!(r["upper"], "ran");
    // The rest then completes the pipeline.
    assert_eq!(ws.ran(&[]), names(&["count", "first", "report"]));
    // Unknown names are refused with a suggestion.
    let out = ws.dag(&["run", "pipeline.yaml", "--until", "sortd"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did you mean `sorted`?"),
        "{}",
        text(&out)
    );
}

#[test]
fn plan_json_explains_every_stage() {
    let ws = seven();
    let out = ws.dag(&["plan", "pipeline.yaml", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plan = plan.as_array().unwrap();
    assert_eq!(plan.len(), 7);
    assert_eq!(plan[0]["stage"], "gen");
    assert_eq!(plan[0]["status"], "run");
    assert_eq!(plan[0]["reasons"][0]["reason"], "never_ran");
    assert_eq!(plan[1]["reasons"][0]["reason"], "upstream_will_run");
    ws.run(&[]);
    ws.edit("tail -n 1", "tail -n 2");
    let out = ws.dag(&["plan", "pipeline.yaml", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["stage"] == "last")
        .unwrap();
    assert_eq!(last["status"], "run");
    assert_eq!(last["reasons"][0]["reason"], "param_changed");
    assert_eq!(last["reasons"][0]["param"], "cmd");
    assert_eq!(
        last["reasons"][0]["to"],
        "tail -n 2 data/raw.txt > data/last.txt"
    );
    let cached = plan
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] == "cached")
        .count();
    assert_eq!(cached, 6);
}

#[test]
fn shell_stages_see_the_users_environment_not_dags_headless_fixes() {
    let ws = Ws::new(
        "name: envcheck\nstages:\n  env:\n    kind: shell\n    params:\n      cmd: echo \"wayland=[${WAYLAND_DISPLAY-unset}]\" > data/env.txt\n      outs: [data/env.txt]\n",
        &[],
    );
    // A headless session: dag quiets libwayland for its own GPU probe only.
    let out = ws
        .cmd(&["run", "pipeline.yaml"])
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        ws.read("out/envcheck/env/data/env.txt"),
        "wayland=[unset]\n"
    );
}
