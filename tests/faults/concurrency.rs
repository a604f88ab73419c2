//! Several `dag run`s on one cache and one pipeline at once: one result, the others wait and
//! say so (or exit with `--no-wait`), and the lock of a killed run does not outlive it.
//!
//! The runs must overlap whatever the machine's load, so the pipelines hold a stage at a gate
//! (a file the test creates) until every other process has said it is waiting.

use std::collections::BTreeMap;
use std::fs::File;
use std::process::{Output, Stdio};
use std::time::Duration;

use crate::common::*;

const SLOW: &str = r#"
name: busy
stages:
  a: { kind: shell, params: { cmd: "while [ ! -e 'GATE' ]; do sleep 0.02; done; seq 1 100 > a.txt", outs: [a.txt] } }
  b: { kind: shell, params: { cmd: "sleep 0.2; tac a.txt > b.txt", deps: [a.txt], outs: [b.txt] } }
  c: { kind: shell, params: { cmd: "sleep 0.2; echo c > c.txt", outs: [c.txt] } }
"#;

const LIMIT: Duration = Duration::from_secs(120);
/// Printed by every process that finds the lock taken (with the holder's pid once it is written).
const WAITING: &str = "waiting for another dag process";

/// A workspace whose pipeline's `GATE` placeholder names a file of the workspace that does not
/// exist yet.
fn gated(pipeline: &str) -> Ws {
    let ws = Ws::new(pipeline, &[]);
    let gate = ws.path("gate");
    ws.edit("GATE", gate.to_str().unwrap());
    ws
}

/// Starts `n` processes at once, opens the gate once `n - 1` of them say they are waiting for
/// the lock, and returns what each printed.
fn together(ws: &Ws, n: usize, args: &[&str]) -> Vec<Output> {
    let logs = ws.path("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let children: Vec<_> = (0..n)
        .map(|i| {
            let out = File::create(logs.join(format!("{i}.out"))).unwrap();
            let err = File::create(logs.join(format!("{i}.err"))).unwrap();
            let mut c = ws.cmd(args);
            c.stdout(Stdio::from(out)).stderr(Stdio::from(err));
            (i, spawn_in_group(c))
        })
        .collect();
    let stderr = |i: usize| std::fs::read_to_string(logs.join(format!("{i}.err"))).unwrap();
    let all_but_one_wait = wait_for(LIMIT, || {
        (0..n).filter(|&i| stderr(i).contains(WAITING)).count() == n - 1
    });
    std::fs::write(ws.path("gate"), "").unwrap();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|(i, child)| {
            let status = wait_within(child, LIMIT);
            Output {
                status,
                stdout: std::fs::read(logs.join(format!("{i}.out"))).unwrap(),
                stderr: std::fs::read(logs.join(format!("{i}.err"))).unwrap(),
            }
        })
        .collect();
    assert!(
        all_but_one_wait,
        "{} of {n} processes did not say they were waiting\n{}",
        n - 1,
        outs.iter().map(text).collect::<Vec<_>>().join("\n")
    );
    outs
}

/// Every process succeeds, each stage ran in exactly one of them, the others said why they
/// waited.
fn check_one_result(outs: &[Output], stages: &[&str]) {
    let mut ran: BTreeMap<String, usize> = BTreeMap::new();
    for o in outs {
        assert!(o.status.success(), "{}", text(o));
        for s in with_outcome(o, "ran") {
            *ran.entry(s).or_default() += 1;
        }
    }
    let want: BTreeMap<String, usize> = stages.iter().map(|s| (s.to_string(), 1)).collect();
    assert_eq!(
        ran, want,
        "each stage must run exactly once across the processes"
    );
    let waited = outs
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains(WAITING))
        .count();
    assert_eq!(waited, outs.len() - 1, "all but the lock holder wait");
}

#[test]
fn two_and_four_runs_at_once_give_one_result() {
    for n in [2, 4] {
        let ws = gated(SLOW);
        let outs = together(&ws, n, &["run", "pipeline.yaml"]);
        check_one_result(&outs, &["a", "b", "c"]);
        assert_eq!(ws.manifests(), 3);
        assert_eq!(ws.read("out/busy/b/b.txt").lines().next(), Some("100"));
        let v = output_within(ws.cmd(&["verify"]), LIMIT);
        assert!(v.status.success(), "{}", text(&v));
        // And with parallel stages inside each process.
        let ws = gated(SLOW);
        let outs = together(&ws, n, &["run", "pipeline.yaml", "-j", "2"]);
        check_one_result(&outs, &["a", "b", "c"]);
    }
    figure("concurrency_processes", "2 and 4");
}

#[test]
fn two_runs_of_the_real_stages_at_once() {
    // The gate stage keeps the holder's run (and so its lock) open while synth and val run.
    let ws = gated(&TINY.replacen(
        "stages:\n",
        "stages:\n  gate: { kind: shell, params: { cmd: \"while [ ! -e 'GATE' ]; do sleep 0.02; done; echo > g\", outs: [g] } }\n",
        1,
    ));
    let args = ["run", "pipeline.yaml", "--until", "val", "--until", "gate"];
    let outs = together(&ws, 2, &args);
    check_one_result(&outs, &["gate", "synth", "val"]);
    let v = output_within(ws.cmd(&["verify"]), LIMIT);
    assert!(v.status.success(), "{}", text(&v));
}

#[test]
fn no_wait_exits_with_a_clear_message_and_a_killed_holder_leaves_no_lock() {
    let ws = gated(SLOW);
    let mut holder = spawn_quiet(ws.cmd(&["run", "pipeline.yaml"]));
    let pid = holder.id() as i32;
    assert!(wait_for(Duration::from_secs(30), || ws
        .path("cache/tmp")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some())));
    let out = output_within(ws.cmd(&["run", "pipeline.yaml", "--no-wait"]), LIMIT);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("is locked by another dag process (pid {pid})")),
        "{err}"
    );
    assert!(err.contains("hint: wait for the other run"), "{err}");
    kill_group(pid);
    assert!(was_killed(&holder.wait().unwrap()));
    // The lock file still names the dead holder; the lock itself died with it.
    assert!(ws.read("cache/lock").contains(&format!("pid {pid}")));
    ws.write("gate", "");
    let out = output_within(ws.cmd(&["run", "pipeline.yaml", "--no-wait"]), LIMIT);
    assert!(
        out.status.success(),
        "a dead holder's lock was not recovered\n{}",
        text(&out)
    );
    assert_eq!(ws.manifests(), 3);
    let tmp: Vec<_> = std::fs::read_dir(ws.path("cache/tmp")).unwrap().collect();
    assert!(
        tmp.is_empty(),
        "the killed run's staging was not cleared: {tmp:?}"
    );
}
