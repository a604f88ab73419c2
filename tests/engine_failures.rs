//! Failed and killed stages leave nothing behind; the lock; corrupt objects and `dag verify`.

mod engine_common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use engine_common::{names, text, Ws};

const TWO: &str = r#"
name: two
stages:
  ok:
    kind: shell
    params: { cmd: "echo fine > ok.txt", outs: [ok.txt] }
  bad:
    kind: shell
    params:
      cmd: "echo partial > bad.txt; echo something broke >&2; exit 1"
      deps: [ok.txt]
      outs: [bad.txt]
"#;

fn assert_no_trace(ws: &Ws, stage: &str) {
    assert!(
        !ws.path(&format!("out/two/{stage}")).exists(),
        "{stage} has a visible output"
    );
    assert!(
        !ws.path(&format!("cache/latest/two/{stage}")).exists(),
        "{stage} has a latest run"
    );
    let tmp: Vec<_> = std::fs::read_dir(ws.path("cache/tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "staging left behind: {tmp:?}");
}

#[test]
fn a_failing_stage_leaves_no_manifest_and_reruns() {
    let ws = Ws::new(TWO, &[]);
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stage `bad` failed"), "{err}");
    assert!(err.contains("exit status 1"), "{err}");
    assert!(err.contains("something broke"), "{err}");
    assert!(err.contains("log: "), "{err}");
    let rows = engine_common::summary(&out);
    assert_eq!(rows["ok"], "ran");
    assert_eq!(rows["bad"], "FAILED");
    assert_eq!(ws.manifests(), 1, "only `ok` has a manifest");
    assert_no_trace(&ws, "bad");
    // The failure is not cached: the next run tries again (and fails again).
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(engine_common::summary(&out)["ok"], "cached");
    // Fixed, it runs; `ok` stays cached.
    ws.edit("exit 1", "true");
    assert_eq!(ws.ran(&[]), names(&["bad"]));
    assert_eq!(ws.read("out/two/bad/bad.txt"), "partial\n");
}

#[test]
fn a_stage_killed_mid_write_leaves_nothing_and_reruns() {
    let ws = Ws::new(
        r#"
name: two
stages:
  slow:
    kind: shell
    params:
      cmd: 'echo part > big.bin; if [ ! -e "$MARK" ]; then touch "$MARK"; sleep 60; fi; echo rest >> big.bin'
      outs: [big.bin]
      env: { MARK: MARKPATH }
"#
        .replace("MARKPATH", &ws_mark())
        .as_str(),
        &[],
    );
    let _ = std::fs::remove_file(ws_mark());
    let mut child = ws
        .cmd(&["run", "pipeline.yaml"])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the command has written part of its out and is sleeping.
    let t0 = Instant::now();
    while !Path::new(&ws_mark()).exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the stage never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Meanwhile a second writer is refused (or would wait).
    let out = ws.dag(&["run", "pipeline.yaml", "--no-wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked by another dag process"),
        "{}",
        text(&out)
    );
    // SIGKILL the whole process group: dag and its shell.
    let pgid = child.id() as i32;
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    child.wait().unwrap();
    assert_eq!(ws.manifests(), 0);
    assert!(!ws.path("out/two/slow").exists());
    assert!(!ws.path("cache/latest/two/slow").exists());
    // The next run takes the (dead) lock, clears the staging and reruns the stage.
    let r = ws.run(&[]);
    assert_eq!(r["slow"], "ran");
    assert_eq!(ws.read("out/two/slow/big.bin"), "part\nrest\n");
    assert_no_trace_tmp(&ws);
    let _ = std::fs::remove_file(ws_mark());
}

fn ws_mark() -> String {
    std::env::temp_dir()
        .join(format!("dag-kill-test-{}", std::process::id()))
        .display()
        .to_string()
}

fn assert_no_trace_tmp(ws: &Ws) {
    let tmp: Vec<_> = std::fs::read_dir(ws.path("cache/tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "staging left behind: {tmp:?}");
    let scratch: Vec<_> = std::fs::read_dir(ws.path("cache/scratch"))
        .unwrap()
        .collect();
    assert!(
        scratch.is_empty(),
        "scratch left behind after publishing: {scratch:?}"
    );
}

#[test]
fn verify_quarantines_a_corrupt_object_and_the_next_run_rebuilds_it() {
    let ws = Ws::new(
        &engine_common::fixture("seven.yaml"),
        &[("src/input.txt", "b\na\n")],
    );
    ws.run(&[]);
    let out = ws.dag(&["verify"]);
    assert!(out.status.success(), "{}", text(&out));
    // Corrupt the object behind `sorted`'s output.
    let show = ws.dag(&["show", "pipeline.yaml", "sorted", "--json"]);
    assert!(show.status.success(), "{}", text(&show));
    let m: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let digest = m["outputs"]["data/sorted.txt"]["entries"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let obj = ws.path(&format!("cache/objects/{}/{}", &digest[..2], &digest[2..]));
    let mut perms = std::fs::metadata(&obj).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&obj, perms).unwrap();
    std::fs::write(&obj, "garbage\n").unwrap();
    let out = ws.dag(&["verify", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("corrupt object {digest}")),
        "{stdout}"
    );
    assert!(stdout.contains("seven/sorted"), "{stdout}");
    assert!(ws.path(&format!("cache/quarantine/{digest}")).exists());
    // Exactly the stage that wrote it reruns; its bytes are back, so nothing below reruns.
    assert_eq!(ws.ran(&[]), names(&["sorted"]));
    assert_eq!(ws.read("out/seven/sorted/data/sorted.txt"), "A\nB\n");
    let out = ws.dag(&["verify"]);
    assert!(out.status.success(), "{}", text(&out));
}
