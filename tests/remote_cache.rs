//! A cache shared across machines: `dag run --remote`, `dag push` and `dag pull` against a
//! shared directory (`file://`) and a real S3-compatible server (`s3://`): results computed
//! once are reused from an empty cache, damaged remote files are refused, an interrupted push
//! publishes nothing half-way, and concurrent pushes of the same results agree.
//!
//! The S3 test needs a server: `scripts/test.sh` starts one (moto's, from PyPI) on 127.0.0.1 and
//! sets `DAG_TEST_S3_ENDPOINT` and `DAG_TEST_S3_BUCKET`. Without them it fails in CI
//! (`DAG_REQUIRE_S3=1`) and is skipped, saying so, elsewhere.

mod engine_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use engine_common::{summary, text, Ws};

const PIPELINE: &str = r#"
name: shared
stages:
  a: { kind: shell, params: { cmd: "echo alpha > a.txt", outs: [a.txt] } }
  b: { kind: shell, params: { cmd: "cat a.txt a.txt > b.txt", deps: [a.txt], outs: [b.txt] } }
  c: { kind: shell, params: { cmd: "head -c 200000 /dev/urandom > c.bin", outs: [c.bin] } }
"#;

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// `dag --cache <cache> <args>` in `ws`, with `env` set.
fn dag_with(ws: &Ws, cache: &str, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut all = vec!["--cache", cache];
    all.extend_from_slice(args);
    let mut cmd = ws.cmd(&all);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run dag")
}

fn outcomes(out: &std::process::Output) -> Vec<(String, String)> {
    assert!(out.status.success(), "{}", text(out));
    summary(out).into_iter().collect()
}

fn all(word: &str) -> Vec<(String, String)> {
    ["a", "b", "c"]
        .iter()
        .map(|s| (s.to_string(), word.to_string()))
        .collect()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn results_pushed_once_are_pulled_into_an_empty_cache() {
    let ws = Ws::new(PIPELINE, &[]);
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let out = dag_with(
        &ws,
        "cache",
        &["run", "pipeline.yaml", "--remote", &url],
        &[],
    );
    assert_eq!(outcomes(&out), all("ran"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("published 3 runs"), "{stdout}");
    assert_eq!(files(&remote.path().join("index")).len(), 3);

    // `dag pull` into an empty cache elsewhere, then a local run that runs nothing.
    let out = dag_with(
        &ws,
        "elsewhere/b",
        &["pull", "pipeline.yaml", "--remote", &url],
        &[],
    );
    assert_eq!(outcomes(&out), all("cached"), "{}", text(&out));
    let out = dag_with(&ws, "elsewhere/b", &["run", "pipeline.yaml"], &[]);
    assert_eq!(outcomes(&out), all("cached"));

    // `run --remote` from another empty cache pulls instead of running, and publishes nothing.
    let out = dag_with(
        &ws,
        "elsewhere/c",
        &["run", "pipeline.yaml", "--remote", &url],
        &[],
    );
    assert_eq!(outcomes(&out), all("cached"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("published"));

    // A bad URL is refused with what to give.
    let out = dag_with(&ws, "cache", &["push", "--remote", "ftp://x/y"], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("s3://bucket"), "{}", text(&out));
}

#[test]
fn a_damaged_remote_file_is_refused_and_its_stage_recomputed() {
    let ws = Ws::new(PIPELINE, &[]);
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    outcomes(&dag_with(
        &ws,
        "cache",
        &["run", "pipeline.yaml", "--remote", &url],
        &[],
    ));
    // c's 200 kB output is the largest blob; flip one byte of it.
    let blob = files(&remote.path().join("blobs"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[1000] ^= 0x10;
    std::fs::write(&blob, bytes).unwrap();

    let out = dag_with(
        &ws,
        "other",
        &["run", "pipeline.yaml", "--remote", &url],
        &[],
    );
    let rows = outcomes(&out);
    assert_eq!(
        rows,
        [("a", "cached"), ("b", "cached"), ("c", "ran")]
            .map(|(s, o)| (s.to_string(), o.to_string()))
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("damaged") && err.contains("runs here"),
        "{err}"
    );
    // Nothing of the bad blob reached the cache: `dag verify` finds every object sound.
    let out = dag_with(&ws, "other", &["verify"], &[]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn an_interrupted_push_publishes_nothing_half_way() {
    let ws = Ws::new(PIPELINE, &[]);
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    outcomes(&dag_with(&ws, "cache", &["run", "pipeline.yaml"], &[]));
    let out = dag_with(
        &ws,
        "cache",
        &["push", "pipeline.yaml", "--remote", &url],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    // What a push killed after c's files and before c's index entry leaves: the blobs, no
    // entry (the entry is the last thing a push writes).
    let c_key = ws.read("cache/latest/shared/c");
    let entry = remote.path().join(format!("index/{}.json", c_key.trim()));
    std::fs::remove_file(&entry).unwrap();

    let out = dag_with(&ws, "b", &["pull", "pipeline.yaml", "--remote", &url], &[]);
    let rows = outcomes(&out);
    assert_eq!(
        rows,
        [("a", "cached"), ("b", "cached"), ("c", "not run")]
            .map(|(s, o)| (s.to_string(), o.to_string()))
    );
    assert!(text(&out).contains("1 stage not in"), "{}", text(&out));
    // The next run computes c and publishes it; then everything is there.
    let out = dag_with(&ws, "b", &["run", "pipeline.yaml", "--remote", &url], &[]);
    assert_eq!(
        outcomes(&out),
        [("a", "cached"), ("b", "cached"), ("c", "ran")]
            .map(|(s, o)| (s.to_string(), o.to_string()))
    );
    assert!(entry.exists());
    let out = dag_with(&ws, "d", &["run", "pipeline.yaml", "--remote", &url], &[]);
    assert_eq!(outcomes(&out), all("cached"));
}

#[test]
fn concurrent_pushes_of_the_same_results_agree() {
    let ws = Ws::new(PIPELINE, &[]);
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    outcomes(&dag_with(&ws, "cache", &["run", "pipeline.yaml"], &[]));
    let push = || {
        ws.cmd(&["--cache", "cache", "push", "--remote", &url])
            .spawn()
            .expect("spawn dag push")
    };
    let (first, second) = (push(), push());
    for child in [first, second] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(files(&remote.path().join("index")).len(), 3);
    let out = dag_with(&ws, "b", &["run", "pipeline.yaml", "--remote", &url], &[]);
    assert_eq!(outcomes(&out), all("cached"));
}

/// The S3 server's settings, or `None` (after saying why) when the test cannot run here.
fn s3() -> Option<(String, String)> {
    match (
        std::env::var("DAG_TEST_S3_ENDPOINT"),
        std::env::var("DAG_TEST_S3_BUCKET"),
    ) {
        (Ok(endpoint), Ok(bucket)) => Some((endpoint, bucket)),
        _ => {
            let why = "no S3 server: set DAG_TEST_S3_ENDPOINT (http://127.0.0.1:PORT) and \
                       DAG_TEST_S3_BUCKET, as scripts/test.sh does with moto's server";
            assert!(std::env::var_os("DAG_REQUIRE_S3").is_none(), "{why}");
            eprintln!("skipped: {why}");
            None
        }
    }
}

#[test]
fn an_s3_remote_shares_results_and_refuses_damaged_blobs() {
    let Some((endpoint, bucket)) = s3() else {
        return;
    };
    let ws = Ws::new(PIPELINE, &[]);
    // A prefix of its own, so that reruns of the test start from an empty remote.
    let prefix = format!(
        "t{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let url = format!("s3://{bucket}/{prefix}");
    let env = [
        ("AWS_ENDPOINT", endpoint.clone()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_ACCESS_KEY_ID", "dag-test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "dag-test-secret".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    let out = dag_with(
        &ws,
        "cache",
        &["run", "pipeline.yaml", "--remote", &url],
        &env,
    );
    assert_eq!(outcomes(&out), all("ran"));
    assert!(
        !text(&out).contains("dag-test-secret"),
        "the secret reached the output"
    );
    // Two more pushes of the same results at once: both succeed.
    let push = || {
        let mut c = ws.cmd(&["--cache", "cache", "push", "--remote", &url]);
        for (k, v) in &env {
            c.env(k, v);
        }
        c.spawn().expect("spawn dag push")
    };
    let (first, second) = (push(), push());
    for child in [first, second] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = dag_with(&ws, "b", &["pull", "pipeline.yaml", "--remote", &url], &env);
    assert_eq!(outcomes(&out), all("cached"));
    let out = dag_with(&ws, "b", &["run", "pipeline.yaml"], &env);
    assert_eq!(outcomes(&out), all("cached"));
    for f in files(&ws.path("cache")) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("dag-test-secret"),
            "{} holds the secret",
            f.display()
        );
    }

    // Flip a byte of c's blob on the server; a fresh cache refuses it and runs c.
    let c_key = ws.read("cache/latest/shared/c");
    let manifest: serde_json::Value =
        serde_json::from_str(&ws.read(&format!("cache/runs/{}.json", c_key.trim()))).unwrap();
    let digest = manifest["outputs"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()["entries"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let python = std::env::var("DAG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let flip = format!(
        "import boto3\n\
         s3 = boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='dag-test', \
         aws_secret_access_key='dag-test-secret', region_name='us-east-1')\n\
         key = '{prefix}/blobs/{digest}'\n\
         b = bytearray(s3.get_object(Bucket='{bucket}', Key=key)['Body'].read())\n\
         b[1000] ^= 0x10\n\
         s3.put_object(Bucket='{bucket}', Key=key, Body=bytes(b))\n"
    );
    let status = Command::new(&python).args(["-c", &flip]).status().unwrap();
    assert!(
        status.success(),
        "flipping a byte on the server with {python}"
    );
    let out = dag_with(&ws, "c", &["run", "pipeline.yaml", "--remote", &url], &env);
    assert_eq!(
        outcomes(&out),
        [("a", "cached"), ("b", "cached"), ("c", "ran")]
            .map(|(s, o)| (s.to_string(), o.to_string()))
    );
    assert!(text(&out).contains("damaged"), "{}", text(&out));
}
