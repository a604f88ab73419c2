//! `split`: IntraDA's easy/hard split of the ranked target images.

use std::fmt::Write as _;

use dag_api::{
    InputSpec, OutputSpec, ParamSet, ParamSpec, Params, Stage, StageContext, StageError,
    StageOutcome,
};
use dag_data::{Column, Table};
use dag_metrics::ranking::rank_and_split;
use serde::Deserialize;

use dag_artifacts::files::{data_error, f64_column, read_table, str_column, u32_column};
use dag_artifacts::score::SCORES_FILE;
use dag_artifacts::split::{list_file, table_file};

/// The `split` stage kind.
pub struct Split;

/// The params of `split`.
#[derive(ParamSet, Deserialize)]
struct P {
    /// fraction of the images that are easy, in (0, 1]: int(N * lambda) easy
    #[param(default = 0.67, min = 0.0, max = 1.0, min_exclusive)]
    lambda: f64,
    /// which column of scores.parquet orders the images
    #[param(default = "score", one_of = ["score", "normalized_score"])]
    by: String,
}

impl Stage for Split {
    fn kind(&self) -> &'static str {
        "split"
    }

    fn code(&self) -> dag_api::Code {
        crate::CODE
    }

    fn doc(&self) -> &'static str {
        "IntraDA's easy/hard split: sorts the scored images by ascending `score` (or \
         `normalized_score`), puts the first int(N * lambda) in `easy` and the rest in `hard`, \
         and writes each as a table (image_id, path, score, rank) and as an IntraDA-compatible \
         list (easy_split.txt / hard_split.txt, one image path per line)."
    }

    fn params(&self) -> Vec<ParamSpec> {
        P::param_specs()
    }

    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "scores",
            ty: "scores",
            required: true,
            doc: "the ranking (`score_entropy.scores`)",
        }]
    }

    fn outputs(&self, _params: &Params) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "easy".into(),
                ty: "split",
                doc: "easy.parquet and easy_split.txt",
            },
            OutputSpec {
                name: "hard".into(),
                ty: "split",
                doc: "hard.parquet and hard_split.txt",
            },
        ]
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let p: P = ctx.params.parse()?;
        let dir = &ctx.input("scores")?.path;
        let file = dir.join(SCORES_FILE);
        let t = read_table(dir, SCORES_FILE)?;
        let paths = str_column(&t, "path", &file)?;
        let ids = u32_column(&t, "image_id", &file)?;
        let scores = f64_column(&t, &p.by, &file)?;
        if let Some(i) = scores.iter().position(|s| s.is_nan()) {
            return Err(
                StageError::new(format!("`{}` has a NaN {}", paths[i], p.by)).with_path(file),
            );
        }
        let (ranked, easy) = rank_and_split(&scores, p.lambda);
        for (which, part) in [("easy", &ranked[..easy]), ("hard", &ranked[easy..])] {
            let out = ctx.output(which)?;
            let table = Table::new()
                .with(
                    "image_id",
                    Column::U32(part.iter().map(|&i| ids[i]).collect()),
                )
                .with(
                    "path",
                    Column::Str(part.iter().map(|&i| paths[i].clone()).collect()),
                )
                .with(
                    p.by.clone(),
                    Column::F64(part.iter().map(|&i| scores[i]).collect()),
                )
                .with(
                    "rank",
                    Column::U32(
                        (0..part.len())
                            .map(|r| (r + if which == "easy" { 0 } else { easy }) as u32)
                            .collect(),
                    ),
                );
            let path = out.join(table_file(which));
            table
                .write_parquet(&path)
                .map_err(|e| data_error(e).with_path(path.clone()))?;
            let mut list = String::new();
            for &i in part {
                let _ = writeln!(list, "{}", paths[i]);
            }
            let path = out.join(list_file(which));
            std::fs::write(&path, list).map_err(|e| StageError::from(e).with_path(path))?;
        }
        if easy == 0 {
            tracing::warn!(stage = ctx.stage, "int(N * lambda) is 0: no image is easy");
        }
        let mut outcome = StageOutcome::default();
        outcome.metrics.insert("easy".into(), easy.into());
        outcome
            .metrics
            .insert("hard".into(), (ranked.len() - easy).into());
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use dag_api::{ParamType, Stage};
    use dag_artifacts::score::column;

    /// `by` takes exactly the score columns that score_entropy writes (derive attributes take
    /// literals, so the names are spelled here a second time).
    #[test]
    fn split_sorts_by_the_score_columns() {
        let by = super::Split
            .params()
            .into_iter()
            .find(|p| p.name == "by")
            .expect("a `by` param");
        assert_eq!(
            by.ty,
            ParamType::Enum(vec![column::SCORE, column::NORMALIZED_SCORE])
        );
        assert_eq!(by.default, Some(column::SCORE.into()));
    }
}
