//! The other commands: graph, show, status, gc, kinds, logging, cache location.

mod engine_common;

use engine_common::{fixture, names, text, Ws};

fn seven() -> Ws {
    Ws::new(&fixture("seven.yaml"), &[("src/input.txt", "b\na\n")])
}

#[test]
fn graph_prints_dot_and_mermaid() {
    let ws = seven();
    let out = ws.dag(&["graph", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(dot.starts_with("digraph \"seven\" {"), "{dot}");
    assert!(
        dot.contains("\"gen\" -> \"upper\" [label=\"data/raw.txt\"];"),
        "{dot}"
    );
    assert!(dot.contains("\"count\" -> \"report\""), "{dot}");
    assert_eq!(dot.matches(" -> ").count(), 7);
    let out = ws.dag(&["graph", "pipeline.yaml", "--format", "mermaid"]);
    let mm = String::from_utf8_lossy(&out.stdout);
    assert!(mm.starts_with("flowchart LR"), "{mm}");
    assert!(mm.contains("s0 -->|\"data/raw.txt\"| s1"), "{mm}");
}

#[test]
fn show_status_and_gc() {
    let ws = seven();
    let out = ws.dag(&["status", "pipeline.yaml"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("gen: stale (never ran)"),
        "{}",
        text(&out)
    );
    ws.run(&[]);
    let out = ws.dag(&["status", "pipeline.yaml"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(s.matches(": up to date").count(), 7, "{s}");

    let out = ws.dag(&["show", "pipeline.yaml", "report"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("stage    report (shell)"), "{s}");
    assert!(
        s.contains("code     none of dag's own (a change to dag never reruns it)"),
        "{s}"
    );
    assert!(
        s.contains("input    data/count.txt <- count.data/count.txt"),
        "{s}"
    );
    assert!(
        s.contains("out/seven/report/report (1 files, 4 bytes)"),
        "{s}"
    );
    assert!(s.contains("log      "), "{s}");
    let out = ws.dag(&["show", "pipeline.yaml", "reprot"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean `report`?"));

    // Three versions of `last`; gc --keep-last 1 drops the two older runs and their objects.
    ws.edit("tail -n 1", "tail -n 2");
    assert_eq!(ws.ran(&[]), names(&["last"]));
    ws.edit("tail -n 2", "tail -c 1");
    assert_eq!(ws.ran(&[]), names(&["last"]));
    assert_eq!(ws.manifests(), 9);
    let out = ws.dag(&["gc", "--keep-last", "1", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("would delete 2 old runs"),
        "{}",
        text(&out)
    );
    assert_eq!(ws.manifests(), 9);
    let out = ws.dag(&["gc", "--keep-last", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deleted 2 old runs"),
        "{}",
        text(&out)
    );
    assert_eq!(ws.manifests(), 7);
    // Everything current is still there and verifies.
    assert!(ws.ran(&[]).is_empty());
    let out = ws.dag(&["verify"]);
    assert!(out.status.success(), "{}", text(&out));
    // The dropped version is rebuilt when asked for again.
    ws.edit("tail -c 1", "tail -n 1");
    assert_eq!(ws.ran(&[]), names(&["last"]));
}

#[test]
fn kinds_logs_and_cache_location() {
    let ws = seven();
    let out = ws.dag(&["kinds"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("shell (no code of dag's own)"), "{s}");
    // Every other kind names the crates its code digest covers.
    let train = s
        .lines()
        .find(|l| l.starts_with("adapt (code "))
        .expect("adapt");
    assert!(
        train.contains("dag-train") && train.contains("dependencies"),
        "{train}"
    );
    let split = s
        .lines()
        .find(|l| l.starts_with("split (code "))
        .expect("split");
    assert!(
        !split.contains("dag-train") && !split.contains("dag-model"),
        "{split}"
    );
    assert!(s.contains("param  cmd: string (required)"), "{s}");
    assert!(s.contains("param  deps: list of path = []"), "{s}");

    // DAG_CACHE moves the cache; -v --log-format json logs one JSON object per line.
    let out = ws
        .cmd(&["run", "pipeline.yaml", "-v", "--log-format", "json"])
        .env("DAG_CACHE", ws.path("elsewhere"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(ws.path("elsewhere/runs").is_dir());
    assert!(!ws.path("cache").exists());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 7, "{err}");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["fields"]["message"], "running");
    }
    // --cache on the command line wins over the environment.
    let out = ws
        .cmd(&["plan", "pipeline.yaml", "--cache", "elsewhere"])
        .env("DAG_CACHE", ws.path("nowhere"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 of 7 stages will run"),
        "{}",
        text(&out)
    );
}
