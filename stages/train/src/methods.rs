//! The methods, by the one name each has in pipeline files, checkpoints, `model.json`,
//! `log.parquet` and the report. A new method is a [`TargetObjective`] module under
//! `objectives/` and one row of [`METHODS`].
//!
//! [`TargetObjective`]: crate::objectives::TargetObjective

use std::collections::BTreeSet;

use dag_api::{Map, ParamSet, ParamSpec, ParamType, Value};

use crate::objectives::adversarial::AdversarialParams;
use crate::objectives::minent::MinEnt;
use crate::objectives::{Objective, Registered};
use crate::selftraining::tufl::TuflParams;
use crate::selftraining::{
    ClassMixParams, MicParams, PixelLossParams, SelfTraining, StrongAugmentParams, Teacher,
    TeacherParams,
};

/// A method: the objectives it adds to supervised segmentation on the labelled batch.
pub struct Method {
    /// Its name everywhere.
    pub name: &'static str,
    /// One line for `dag kinds`.
    pub doc: &'static str,
    /// Losses on the unlabelled batch from the network's predictions, in the order they are
    /// summed and logged.
    pub target: &'static [&'static dyn Objective],
    /// Whether ADVENT's two discriminators align the target predictions with the labelled
    /// ones (terms `adv_main`, `adv_aux`, `d_main`, `d_aux`, after the target objectives').
    pub adversarial: bool,
    /// Self-training: TUFL's two-view focal term (`focal`), ClassMix on a teacher's
    /// pseudo-labels (`mix`) and MIC's masked images (`mic`); see [`crate::selftraining`].
    pub self_training: Option<SelfTraining>,
}

/// Every method, in the order `dag kinds` lists them.
pub static METHODS: &[Method] = &[
    Method {
        name: "source_only",
        doc: "segmentation on the labelled batch only (no target batches)",
        target: &[],
        adversarial: false,
        self_training: None,
    },
    Method {
        name: "advent",
        doc: "ADVENT's adversarial entropy alignment (Vu et al., CVPR 2019)",
        target: &[],
        adversarial: true,
        self_training: None,
    },
    Method {
        name: "minent",
        doc: "entropy minimisation on the target batch (ADVENT's MinEnt)",
        target: &[&Registered::<MinEnt>::NEW],
        adversarial: false,
        self_training: None,
    },
    Method {
        name: "advent+minent",
        doc: "both of the above, summed (ADVENT's best)",
        target: &[&Registered::<MinEnt>::NEW],
        adversarial: true,
        self_training: None,
    },
    Method {
        name: "maxsquare",
        doc: "maximum squares loss on the target batch (Chen et al., ICCV 2019)",
        target: &[&Registered::<crate::objectives::maxsquare::MaxSquare>::NEW],
        adversarial: false,
        self_training: None,
    },
    Method {
        name: "dacs",
        doc: "mean-teacher self-training on ClassMix of source and target (Tranheden et al., \
              WACV 2021)",
        target: &[],
        adversarial: false,
        self_training: Some(SelfTraining {
            teacher: Some(Teacher::Ema),
            mic: false,
            tufl: false,
        }),
    },
    Method {
        name: "dacs+mic",
        doc: "DACS plus MIC's masked-image consistency (Hoyer et al., CVPR 2023)",
        target: &[],
        adversarial: false,
        self_training: Some(SelfTraining {
            teacher: Some(Teacher::Ema),
            mic: true,
            tufl: false,
        }),
    },
    Method {
        name: "tufl",
        doc: "TUFL's stage one: a threshold-adaptive unsupervised focal loss between two views \
              of the target (Yan et al., T-ITS 2023)",
        target: &[],
        adversarial: false,
        self_training: Some(SelfTraining {
            teacher: None,
            mic: false,
            tufl: true,
        }),
    },
    Method {
        name: "tufl+cim",
        doc: "TUFL's stage two: its focal loss plus ClassMix on the pseudo-labels of the frozen \
              starting model (cross-domain image mixing)",
        target: &[],
        adversarial: false,
        self_training: Some(SelfTraining {
            teacher: Some(Teacher::Frozen),
            mic: false,
            tufl: true,
        }),
    },
];

/// The suffix of the log term of HRDA's detail crop within a term (`mix_detail` in `mix`).
pub const DETAIL_SUFFIX: &str = "_detail";

/// The method of the adaptation kinds when the pipeline names none.
pub const DEFAULT_METHOD: &str = "advent";

/// The method named `name`, or an error that lists the names.
pub fn method(name: &str) -> Result<&'static Method, String> {
    METHODS.iter().find(|m| m.name == name).ok_or_else(|| {
        format!(
            "unknown method `{name}`; expected one of {}",
            names().join(", ")
        )
    })
}

/// The param that scales loss term `term`: `lambda_<term>`, or for the discriminators' own terms
/// (`d_main`, `d_aux`) their learning rate `lr_d`. A test checks that every term has one.
/// HRDA's detail terms (`{term}_detail`, part of `term`) are scaled by `term`'s param.
pub fn weight_param_of(term: &str) -> String {
    if let Some(whole) = term.strip_suffix(DETAIL_SUFFIX) {
        return weight_param_of(whole);
    }
    if term.starts_with("d_") {
        "lr_d".to_string()
    } else {
        format!("lambda_{term}")
    }
}

/// Every method's name.
pub fn names() -> Vec<&'static str> {
    METHODS.iter().map(|m| m.name).collect()
}

/// The `method` param of the kinds that take one.
pub fn method_param() -> ParamSpec {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| {
        let list: Vec<String> = METHODS
            .iter()
            .map(|m| format!("`{}`: {}", m.name, m.doc))
            .collect();
        format!(
            "the loss terms on the unlabelled batch; {}",
            list.join("; ")
        )
    });
    ParamSpec {
        name: "method",
        ty: ParamType::Enum(names()),
        default: Some(Value::from(DEFAULT_METHOD)),
        doc,
    }
}

/// The params of every method's objectives and of the adversarial alignment: params of the kinds
/// with a `method`. Names are unique (a test checks it), so one value serves every method.
pub fn param_specs() -> Vec<ParamSpec> {
    let mut seen = BTreeSet::new();
    let objectives = METHODS
        .iter()
        .flat_map(|m| m.target.iter())
        .filter(|o| seen.insert(o.name()));
    objectives
        .flat_map(|o| o.param_specs())
        .chain(AdversarialParams::param_specs())
        .chain(TeacherParams::param_specs())
        .chain(ClassMixParams::param_specs())
        .chain(StrongAugmentParams::param_specs())
        .chain(PixelLossParams::param_specs())
        .chain(MicParams::param_specs())
        .chain(TuflParams::param_specs())
        .collect()
}

impl Method {
    /// The names of the params that change what this method computes.
    pub fn param_names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self
            .target
            .iter()
            .flat_map(|o| o.param_specs())
            .map(|s| s.name)
            .collect();
        if self.adversarial {
            names.extend(AdversarialParams::param_specs().iter().map(|s| s.name));
        }
        if let Some(st) = self.self_training {
            let mut specs = StrongAugmentParams::param_specs();
            specs.extend(PixelLossParams::param_specs());
            if let Some(teacher) = st.teacher {
                specs.extend(ClassMixParams::param_specs());
                if teacher == Teacher::Ema {
                    specs.extend(TeacherParams::param_specs());
                }
            }
            if st.mic {
                specs.extend(MicParams::param_specs());
            }
            if st.tufl {
                specs.extend(TuflParams::param_specs());
            }
            names.extend(specs.iter().map(|s| s.name));
        }
        names
    }

    /// The values of this method's params among `all` (those absent keep their defaults).
    pub fn params_from(&self, all: &Map<String, Value>) -> Map<String, Value> {
        self.param_names()
            .into_iter()
            .filter_map(|n| all.get(n).map(|v| (n.to_string(), v.clone())))
            .collect()
    }

    /// Whether it draws unlabelled batches.
    pub fn uses_target(&self) -> bool {
        self.adversarial || !self.target.is_empty() || self.self_training.is_some()
    }

    /// Refuses a network the method cannot train: HRDA's training pass predicts a fused map
    /// whose detail covers one crop, so the methods that read the student's whole-image
    /// prediction of the target batch (target objectives, the discriminators, TUFL's two
    /// views) have nothing faithful to read.
    pub fn check_network(&self, network: &dag_model::Architecture) -> Result<(), String> {
        let whole_image = self.adversarial
            || !self.target.is_empty()
            || self.self_training.is_some_and(|st| st.tufl);
        if whole_image && matches!(network, dag_model::Architecture::Hrda(_)) {
            return Err(format!(
                "method `{}` trains on the network's whole-image prediction of the target                  batch, which HRDA's training pass does not give (its detail covers one crop);                  use HRDA with `source_only` or a ClassMix method (`dacs`, `mic`), or this                  method with `network: daformer`",
                self.name
            ));
        }
        Ok(())
    }
}
