//! Helpers shared by the engine's integration tests: a temporary workspace and the built `dag`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

/// A temporary directory holding a pipeline, its workspace files, `cache/` and `out/`.
pub struct Ws {
    pub dir: tempfile::TempDir,
}

/// The repository root, from the CARGO_MANIFEST_DIR that cargo sets when it runs a test, not
/// the one compiled in: a test binary built in another checkout sharing the target directory
/// would otherwise read that checkout's files.
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
}

/// The fixture pipelines of this test suite.
pub fn fixture(name: &str) -> String {
    let p = manifest_dir().join("tests/pipelines").join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

impl Ws {
    /// A workspace with `pipeline.yaml` and the given files.
    pub fn new(pipeline: &str, files: &[(&str, &str)]) -> Self {
        let ws = Ws {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        ws.write("pipeline.yaml", pipeline);
        for (p, c) in files {
            ws.write(p, c);
        }
        ws
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
    }

    /// Replaces text in the pipeline file (asserting it was there).
    pub fn edit(&self, from: &str, to: &str) {
        let s = self.read("pipeline.yaml");
        assert!(s.contains(from), "`{from}` is not in the pipeline");
        self.write("pipeline.yaml", &s.replacen(from, to, 1));
    }

    /// A `dag` command in this workspace.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dag"));
        c.args(args)
            .current_dir(self.dir.path())
            .env_remove("DAG_CACHE")
            .env_remove("DAG_LOG")
            .env("NO_COLOR", "1");
        c
    }

    pub fn dag(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run dag")
    }

    /// `dag run pipeline.yaml <extra>`, asserting success; returns stage -> outcome.
    pub fn run(&self, extra: &[&str]) -> BTreeMap<String, String> {
        let mut args = vec!["run", "pipeline.yaml"];
        args.extend_from_slice(extra);
        let out = self.dag(&args);
        assert!(out.status.success(), "dag {args:?} failed:\n{}", text(&out));
        summary(&out)
    }

    /// The names of the stages that ran in a summary.
    pub fn ran(&self, extra: &[&str]) -> Vec<String> {
        self.run(extra)
            .into_iter()
            .filter(|(_, s)| s == "ran")
            .map(|(n, _)| n)
            .collect()
    }

    /// Number of manifests in the cache.
    pub fn manifests(&self) -> usize {
        fs::read_dir(self.path("cache/runs"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// stdout and stderr together, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Parses the summary table `dag run` prints: stage -> outcome.
pub fn summary(o: &Output) -> BTreeMap<String, String> {
    let s = String::from_utf8_lossy(&o.stdout);
    let mut rows = BTreeMap::new();
    let mut in_table = false;
    for line in s.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.first() == Some(&"stage") && t.get(1) == Some(&"status") {
            in_table = true;
            continue;
        }
        if !in_table || t.len() < 3 {
            continue;
        }
        if t[1] == "ran," {
            break;
        }
        rows.insert(t[0].to_string(), t[1..t.len() - 1].join(" "));
    }
    rows
}

/// Sorted stage names.
pub fn names(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}
