//! What `dag report` and `dag metrics` need from the engine: for every stage its state (what
//! the plan and the last run say), its timings and the directories of its outputs in the cache.
//! Reading the artifacts themselves is `dag-report`'s job.

use std::collections::BTreeMap;

use dag_report::{ReportInput, StageInfo, State};

use crate::cache::{Cache, Manifest};
use crate::executor::{Engine, EngineError, Outcome, PlanStatus, Selection};
use crate::spec::Pipeline;

/// The state of every stage of `p` and the readable outputs of its current run (or, for a stale
/// stage, of its last run). Reads the cache only.
pub fn gather(
    p: &Pipeline,
    engine: &Engine<'_>,
    cache: &Cache,
) -> Result<ReportInput, EngineError> {
    let plan = engine.plan(&Selection::default())?;
    let last = cache.last_run(&p.name);
    let mut index_of = BTreeMap::new();
    for (k, &i) in p.order.iter().enumerate() {
        index_of.insert(i, k);
    }
    let mut stages = Vec::with_capacity(p.order.len());
    for (&i, entry) in p.order.iter().zip(&plan) {
        let st = &p.stages[i];
        let in_last = last
            .as_ref()
            .and_then(|l| l.stages.iter().find(|s| s.stage == st.name));
        let current = (entry.status == PlanStatus::Cached)
            .then(|| entry.key.as_deref().and_then(|k| cache.read_manifest(k)))
            .flatten();
        let (state, shown, note): (State, Option<Manifest>, Option<String>) = match current {
            Some(m) => {
                let ran_last = in_last.is_some_and(|s| {
                    s.outcome == Outcome::Ran && s.key.as_deref() == Some(m.key.as_str())
                });
                (
                    if ran_last { State::Ran } else { State::Cached },
                    Some(m),
                    None,
                )
            }
            None => {
                let failed = in_last.filter(|s| s.outcome == Outcome::Failed);
                let previous = cache
                    .latest(&p.name, &st.name)
                    .and_then(|k| cache.read_manifest(&k));
                let why = entry
                    .reasons
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                if let Some(f) = failed {
                    let msg = f.message.clone().unwrap_or_else(|| "failed".into());
                    (State::Failed, None, Some(msg))
                } else if let Some(m) = previous {
                    let note = format!(
                        "results shown are from an earlier run; `dag run` would rerun it ({why})"
                    );
                    (State::Stale, Some(m), Some(note))
                } else {
                    (State::NotRun, None, (!why.is_empty()).then_some(why))
                }
            }
        };
        let mut outputs = BTreeMap::new();
        if let Some(m) = &shown {
            for (name, t) in &m.outputs {
                // A tree that gc removed is left out rather than rebuilt: the report only reads.
                let dir = cache.tree_path(&t.digest);
                if dir.exists() {
                    outputs.insert(name.clone(), dir);
                }
            }
        }
        let upstream = p
            .upstream(i)
            .into_iter()
            .filter_map(|u| index_of.get(&u).copied())
            .collect();
        stages.push(StageInfo {
            name: st.name.clone(),
            kind: st.kind.kind().to_string(),
            state,
            upstream,
            params: st.params.0.clone().into_iter().collect(),
            seconds: shown.as_ref().map(|m| m.seconds + m.publish_seconds),
            finished_unix: shown.as_ref().map(|m| m.finished_unix),
            metrics: shown
                .as_ref()
                .map(|m| m.metrics.clone())
                .unwrap_or_default(),
            outputs,
            output_types: st
                .kind
                .outputs(&st.params)
                .into_iter()
                .map(|o| (o.name, o.ty.to_string()))
                .collect(),
            note,
        });
    }
    Ok(ReportInput {
        pipeline: p.name.clone(),
        file: p.file.clone(),
        cache: cache.root.clone(),
        device: engine.device.name().to_string(),
        stages,
    })
}
