//! Several `dag run`s on one cache and one pipeline at once: one result, the others wait and
//! say so (or exit with `--no-wait`), and the lock of a killed run does not outlive it.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use crate::common::*;

const SLOW: &str = r#"
name: busy
stages:
  a: { kind: shell, params: { cmd: "sleep 0.4; seq 1 100 > a.txt", outs: [a.txt] } }
  b: { kind: shell, params: { cmd: "sleep 0.4; tac a.txt > b.txt", deps: [a.txt], outs: [b.txt] } }
  c: { kind: shell, params: { cmd: "sleep 0.4; echo c > c.txt", outs: [c.txt] } }
"#;

const LIMIT: Duration = Duration::from_secs(120);

fn together(ws: &Ws, n: usize, args: &[&str]) -> Vec<Output> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let c = ws.cmd(args);
            std::thread::spawn(move || output_within(c, LIMIT))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Every process succeeds, each stage ran in exactly one of them, the waiters said why.
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
        .filter(|o| {
            String::from_utf8_lossy(&o.stderr).contains("waiting for another dag process (pid ")
        })
        .count();
    assert!(waited >= 1, "no process said it was waiting");
}

#[test]
fn two_and_four_runs_at_once_give_one_result() {
    for n in [2, 4] {
        let ws = Ws::new(SLOW, &[]);
        let outs = together(&ws, n, &["run", "pipeline.yaml"]);
        check_one_result(&outs, &["a", "b", "c"]);
        assert_eq!(ws.manifests(), 3);
        assert_eq!(ws.read("out/busy/b/b.txt").lines().next(), Some("100"));
        let v = output_within(ws.cmd(&["verify"]), LIMIT);
        assert!(v.status.success(), "{}", text(&v));
        // And with parallel stages inside each process.
        let ws = Ws::new(SLOW, &[]);
        let outs = together(&ws, n, &["run", "pipeline.yaml", "-j", "2"]);
        check_one_result(&outs, &["a", "b", "c"]);
    }
    figure("concurrency_processes", "2 and 4");
}

#[test]
fn two_runs_of_the_real_stages_at_once() {
    let ws = Ws::new(TINY, &[]);
    let args = ["run", "pipeline.yaml", "--until", "val"];
    let outs = together(&ws, 2, &args);
    check_one_result(&outs, &["synth", "val"]);
    let v = output_within(ws.cmd(&["verify"]), LIMIT);
    assert!(v.status.success(), "{}", text(&v));
}

#[test]
fn no_wait_exits_with_a_clear_message_and_a_killed_holder_leaves_no_lock() {
    let ws = Ws::new(SLOW, &[]);
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
