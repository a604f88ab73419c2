//! The layout of the artifacts that dag's stage kinds write and its report reads: their file
//! names, the visuals index, and helpers that read and write artifact files with errors that
//! name the file. No tensor crate: the report and the Burn-free stage kinds build without Burn.

pub mod files;
pub mod visuals;

/// The outputs of `score_entropy`.
pub mod score {
    /// File name of the table in the `scores` output.
    pub const SCORES_FILE: &str = "scores.parquet";
    /// The score columns of scores.parquet (and of the split's tables) that a split may sort by.
    pub mod column {
        /// The mean entropy of the image's prediction.
        pub const SCORE: &str = "score";
        /// The score normalised by the rare classes present (the paper's best variant).
        pub const NORMALIZED_SCORE: &str = "normalized_score";
    }
    /// Folder of the 8-bit class-id pseudo-labels in the `pseudo_labels` output.
    pub const LABELS_DIR: &str = "labels";
    /// Folder of the colour pseudo-labels in the `pseudo_labels` output.
    pub const COLOR_DIR: &str = "color";
    /// The side table of the `synth` target that holds each image's generated difficulty.
    pub const DIFFICULTY_FILE: &str = "difficulty.parquet";
}

/// The output of `class_stats`: the pixels of each class in each labelled image, for rare class
/// sampling.
pub mod class_stats {
    /// The artifact type.
    pub const TYPE: &str = "class_stats";
    /// The table, one row per image and class present.
    pub const FILE: &str = "class_stats.parquet";

    /// Its columns.
    pub mod column {
        /// The image's path in its dataset.
        pub const PATH: &str = "path";
        /// The class id (255: ignored pixels).
        pub const CLASS: &str = "class";
        /// Pixels of the class in the preprocessed label.
        pub const PIXELS: &str = "pixels";
        /// The count at the image's original resolution, the scale the references' thresholds
        /// are given in: exact when `preprocess` kept the full-resolution labels, else the
        /// preprocessed count times the ratio of the two areas.
        pub const FULL_RESOLUTION_PIXELS: &str = "full_resolution_pixels";
    }
}

/// The outputs of `split`.
pub mod split {
    /// The table file of a split output (`easy` or `hard`).
    pub fn table_file(which: &str) -> &'static str {
        if which == "easy" {
            "easy.parquet"
        } else {
            "hard.parquet"
        }
    }

    /// The IntraDA list file of a split output.
    pub fn list_file(which: &str) -> &'static str {
        if which == "easy" {
            "easy_split.txt"
        } else {
            "hard_split.txt"
        }
    }
}

/// The outputs of `evaluate`.
pub mod evaluate {
    /// Per-class table of an evaluation.
    pub const METRICS_FILE: &str = "metrics.parquet";
    /// The confusion matrix, long format.
    pub const CONFUSION_FILE: &str = "confusion.parquet";
    /// mIoU and friends.
    pub const SUMMARY_FILE: &str = "summary.json";
    /// Pictures of the first `samples` images, with their `visuals.json`.
    pub const SAMPLES_DIR: &str = "samples";
    /// mIoU of every snapshot (with `snapshots: all`).
    pub const SNAPSHOTS_FILE: &str = "snapshots.parquet";
    /// The columns of snapshots.parquet: one row per evaluated snapshot.
    pub mod snapshot_column {
        /// The snapshot's iteration; -1 for the final model.
        pub const ITERATION: &str = "iteration";
        /// Its mIoU in percent.
        pub const MIOU: &str = "miou";
    }
}

/// The output of `compare`.
pub mod compare {
    /// The table file of the output.
    pub const COMPARISON_FILE: &str = "comparison.parquet";
    /// The same table as Markdown.
    pub const MARKDOWN_FILE: &str = "comparison.md";

    /// The columns of comparison.parquet, which `compare` writes and the report reads.
    pub mod column {
        /// The input's name (`advent@seed=1`), or a mean row's group.
        pub const NAME: &str = "name";
        /// The method and swept setting without the seed (`intrada@lambda=0.5`).
        pub const GROUP: &str = "group";
        /// The seed in the input's name; empty for a mean row or an unswept input.
        pub const SEED: &str = "seed";
        /// `run` or `mean`.
        pub const ROW: &str = "row";
        /// Runs a row stands for: 1, or the seeds of a mean.
        pub const N: &str = "n";
        /// The evaluate stage.
        pub const STAGE: &str = "stage";
        /// The model's description.
        pub const MODEL: &str = "model";
        /// The training method.
        pub const METHOD: &str = "method";
        /// mIoU over the protocol's classes, in percent.
        pub const MIOU: &str = "miou";
        /// mIoU over SYNTHIA's 16 classes.
        pub const MIOU16: &str = "miou16";
        /// mIoU over the 13 classes of the papers' mIoU*.
        pub const MIOU13: &str = "miou13";
        /// A mean row's standard deviation of a column: `<column>_std`.
        pub fn std(column: &str) -> String {
            format!("{column}_std")
        }
        /// Per-class IoU columns: `iou_<class>`.
        pub const IOU_PREFIX: &str = "iou_";
        /// A mean row's standard deviation of a class's IoU: `std_iou_<class>`.
        pub const STD_IOU_PREFIX: &str = "std_iou_";
    }
}

/// The outputs of the training kinds (`train_source`, `adapt`, `self_train`).
pub mod train {
    /// File name of the training log inside the `log` output.
    pub const LOG_FILE: &str = "log.parquet";
    /// Artifact type of the `log` output; the report finds training logs by it.
    pub const LOG_TYPE: &str = "training_log";
    /// The fixed columns of log.parquet; between `ITERATION` and `LR` come the method's loss
    /// terms, one column each.
    pub mod log_column {
        /// The iteration.
        pub const ITERATION: &str = "iteration";
        /// The network's learning rate.
        pub const LR: &str = "lr";
        /// The discriminators' learning rate (adversarial methods only).
        pub const LR_D: &str = "lr_d";
        /// Wall seconds of the iteration.
        pub const SECONDS: &str = "seconds";
        /// Every fixed column: the others are loss terms.
        pub const FIXED: [&str; 4] = [ITERATION, LR, LR_D, SECONDS];
    }
}
