//! Byte flips, truncation and deletion of cache objects, manifests, materialised trees and
//! training checkpoints: `dag verify` reports and quarantines each, the next run rebuilds exactly
//! the stage concerned, and a damaged checkpoint is never resumed from.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

/// Four shell stages, two of them downstream: a rebuilt stage that writes the same bytes must
/// leave its dependents cached.
const CHAIN: &str = r#"
name: chain
stages:
  a: { kind: shell, params: { cmd: "seq 1 5000 > a.txt; echo log a", outs: [a.txt] } }
  b: { kind: shell, params: { cmd: "mkdir -p b; sort -r a.txt > b/r.txt; head -c 3000 a.txt > b/h.txt", deps: [a.txt], outs: [b] } }
  c: { kind: shell, params: { cmd: "wc -l b/r.txt > c.txt", deps: [b], outs: [c.txt] } }
  d: { kind: shell, params: { cmd: "printf 'independent\n' > d.txt", outs: [d.txt] } }
"#;

const LIMIT: Duration = Duration::from_secs(60);

fn writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if p.is_dir() { 0o755 } else { 0o644 };
    let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode));
}

fn flip(p: &Path, rng: &mut Rng) -> String {
    writable(p);
    let mut bytes = fs::read(p).unwrap();
    let at = rng.below(bytes.len());
    bytes[at] ^= 1 << rng.below(8);
    // In place, like a disk error: a new inode would break the hard links to the tree.
    let mut f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&bytes).unwrap();
    format!("flip bit at byte {at}")
}

fn truncate(p: &Path, rng: &mut Rng) -> String {
    writable(p);
    let len = fs::metadata(p).unwrap().len();
    let to = rng.below(len as usize) as u64;
    fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(to)
        .unwrap();
    format!("truncate {len} -> {to} bytes")
}

fn delete(p: &Path, _: &mut Rng) -> String {
    fs::remove_file(p).unwrap();
    "delete".into()
}

type Damage = fn(&Path, &mut Rng) -> String;
const DAMAGES: &[(&str, Damage)] = &[("flip", flip), ("truncate", truncate), ("delete", delete)];

fn show(ws: &Ws, stage: &str) -> serde_json::Value {
    let out = output_within(ws.cmd(&["show", "pipeline.yaml", stage, "--json"]), LIMIT);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn object(ws: &Ws, digest: &str) -> PathBuf {
    ws.path(&format!("cache/objects/{}/{}", &digest[..2], &digest[2..]))
}

/// Runs `verify` after a damage; returns whether it reported it, and checks the rerun.
fn check(ws: &Ws, what: &str, needle: &str, stage: &str, reference: &str) -> bool {
    let out = output_within(ws.cmd(&["verify"]), LIMIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let detected = out.status.code() == Some(1) && stdout.contains(needle);
    assert!(
        detected,
        "{what}: verify did not report `{needle}`:\n{}",
        text(&out)
    );
    let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), LIMIT);
    assert!(out.status.success(), "{what}: rerun failed\n{}", text(&out));
    let ran = with_outcome(&out, "ran");
    // A damaged tree is rebuilt from intact objects by verify: nothing needs to run.
    if !needle.starts_with("damaged tree") {
        assert_eq!(ran, [stage.to_string()], "{what}: the rerun ran {ran:?}");
    } else {
        assert!(ran.is_empty(), "{what}: the rerun ran {ran:?}");
    }
    let out = output_within(ws.cmd(&["verify"]), LIMIT);
    assert!(
        out.status.success(),
        "{what}: not clean after the rerun\n{}",
        text(&out)
    );
    assert_eq!(
        all_outputs(ws),
        reference,
        "{what}: outputs differ after the rebuild"
    );
    detected
}

fn all_outputs(ws: &Ws) -> String {
    ["a/a.txt/", "b/b/r.txt", "b/b/h.txt", "c/c.txt/", "d/d.txt/"]
        .iter()
        .map(|p| {
            let p = p.trim_end_matches('/');
            ws.read(&format!("out/chain/{p}"))
        })
        .collect()
}

#[test]
fn verify_finds_every_damaged_object_manifest_and_tree() {
    let ws = Ws::new(CHAIN, &[]);
    let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), LIMIT);
    assert!(out.status.success(), "{}", text(&out));
    let reference = all_outputs(&ws);
    let mut rng = Rng::new(0xc0ffee);
    let (mut tried, mut detected) = (0usize, 0usize);
    for stage in ["a", "b", "c", "d"] {
        for (dname, damage) in DAMAGES {
            // An output object of the stage.
            let m = show(&ws, stage);
            let outputs = m["outputs"].as_object().unwrap();
            let tree = outputs.values().next().unwrap();
            let entries = tree["entries"].as_array().unwrap();
            let digest = entries[rng.below(entries.len())]["digest"]
                .as_str()
                .unwrap()
                .to_string();
            let what = format!("{dname} object of {stage}");
            let how = damage(&object(&ws, &digest), &mut rng);
            let needle = if *dname == "delete" {
                format!("missing object {digest}")
            } else {
                format!("corrupt object {digest}")
            };
            tried += 1;
            detected += check(&ws, &format!("{what} ({how})"), &needle, stage, &reference) as usize;

            // Its manifest.
            let key = show(&ws, stage)["key"].as_str().unwrap().to_string();
            let path = ws.path(&format!("cache/runs/{key}.json"));
            let how = damage(&path, &mut rng);
            let what = format!("{dname} manifest of {stage} ({how})");
            tried += 1;
            if *dname == "delete" {
                // Nothing is left to check; the stage's latest pointer still names the run.
                detected += check(
                    &ws,
                    &what,
                    &format!("missing manifest runs/{key}.json"),
                    stage,
                    &reference,
                ) as usize;
            } else {
                detected += check(
                    &ws,
                    &what,
                    &format!("corrupt manifest {}", path.display()),
                    stage,
                    &reference,
                ) as usize;
            }
        }
        // A file of the materialised tree removed or replaced by another inode.
        let m = show(&ws, stage);
        let tree = m["outputs"].as_object().unwrap().values().next().unwrap();
        let tdigest = tree["digest"].as_str().unwrap();
        let root = ws.path(&format!("cache/trees/{tdigest}"));
        let file = if tree["file"].as_bool() == Some(true) {
            root.clone()
        } else {
            let rel = tree["entries"][0]["path"].as_str().unwrap();
            root.join(rel)
        };
        if let Some(parent) = file.parent() {
            writable(parent);
        }
        fs::remove_file(&file).unwrap();
        fs::write(&file, "replaced\n").unwrap();
        tried += 1;
        detected += check(
            &ws,
            &format!("replace a tree file of {stage}"),
            &format!("damaged tree {tdigest}"),
            stage,
            &reference,
        ) as usize;
    }
    let quarantined = fs::read_dir(ws.path("cache/quarantine")).unwrap().count();
    assert!(quarantined > 0, "nothing was quarantined");
    figure("corruptions_cache", &format!("{detected}/{tried}"));
}

/// A damaged training checkpoint is set aside with a warning and training starts over from
/// iteration 0 instead of resuming from it.
#[test]
fn a_damaged_checkpoint_is_not_resumed_from() {
    let ws = Ws::new(TINY, &[]);
    let limit = Duration::from_secs(240);
    let until = ["run", "pipeline.yaml", "--until", "src_only"];
    let out = output_within(ws.cmd(&until), limit);
    assert!(out.status.success(), "{}", text(&out));
    let cache = ws.path("cache");
    let key = latest(&cache, "tiny", "src_only").unwrap();
    let model = |cache: &Path| {
        output_digests(cache, "tiny", &["src_only"])[&("src_only".into(), "model".into())].clone()
    };
    let first_model = model(&cache);
    let ckpt = cache
        .join("scratch")
        .join(&key)
        .join("checkpoints/checkpoint");
    let mut rng = Rng::new(0xbad_c0de);
    let (mut tried, mut detected) = (0usize, 0usize);
    for (file, (dname, damage)) in [
        ("model.bpk", DAMAGES[0]),
        ("state.json", DAMAGES[1]),
        ("optim_seg.bpk", DAMAGES[2]),
        ("checksums.json", DAMAGES[0]),
    ] {
        fs::remove_file(cache.join("runs").join(format!("{key}.json"))).unwrap();
        let mut child = spawn_quiet(ws.cmd(&until));
        let pid = child.id() as i32;
        let ok = wait_for(Duration::from_secs(120), || {
            ckpt.join("checksums.json").is_file()
        });
        assert!(ok, "no checkpoint was written");
        kill_group(pid);
        let status = child.wait().unwrap();
        assert!(was_killed(&status), "src_only finished before the kill");
        let how = damage(&ckpt.join(file), &mut rng);
        tried += 1;
        let out = output_within(
            ws.cmd(&["run", "pipeline.yaml", "--until", "src_only", "-v"]),
            limit,
        );
        assert!(out.status.success(), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        let warned = err.contains("damaged checkpoint set aside");
        let m = manifest(&cache, &key).unwrap();
        let from = m["metrics"]["resumed_from"].as_u64().unwrap();
        assert!(warned, "{dname} {file} ({how}): no warning\n{err}");
        assert_eq!(
            from, 0,
            "{dname} {file} ({how}): resumed from a damaged checkpoint"
        );
        // Retrained from iteration 0, the model is the same bytes as the first run's.
        assert_eq!(
            model(&cache),
            first_model,
            "{dname} {file}: the retrained model differs"
        );
        detected += 1;
    }
    figure("corruptions_checkpoint", &format!("{detected}/{tried}"));
}
