//! The one error type of the crate. Every variant names the file concerned and says what to do.

use std::path::PathBuf;

/// Why reading, preprocessing or generating a dataset failed.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The dataset root, or a folder the format requires inside it, does not exist.
    #[error("{format} dataset: folder {} does not exist; expected this layout under {}:\n{layout}", .expected.display(), .root.display())]
    MissingRoot {
        format: &'static str,
        root: PathBuf,
        expected: PathBuf,
        layout: &'static str,
    },
    /// A split name the format does not have.
    #[error("{format} dataset at {}: no split `{split}`; {hint}", .root.display())]
    BadSplit {
        format: &'static str,
        root: PathBuf,
        split: String,
        hint: String,
    },
    /// A format name that no reader handles.
    #[error("unknown dataset format `{0}`; expected one of cityscapes, gta5, synthia")]
    UnknownFormat(String),
    /// A class count with no label protocol.
    #[error("no label protocol with {0} classes; use 19, 16 or 13")]
    UnknownProtocol(u32),
    /// A line of a list file names an image that is not there.
    #[error("list file {}, line {line}: `{entry}` is not in the dataset (looked for {}); fix the line or the dataset root", .list.display(), .missing.display())]
    ListEntry {
        list: PathBuf,
        line: usize,
        entry: String,
        missing: PathBuf,
    },
    /// An image without its label, or a label without its image.
    #[error("{what} {}: expected its counterpart {}; add the missing file, remove this one, or set `allow_skip: true` to skip such pairs", .file.display(), .counterpart.display())]
    Unpaired {
        /// "image" or "label".
        what: &'static str,
        file: PathBuf,
        counterpart: PathBuf,
    },
    /// The split contains no image at all.
    #[error("no images found under {}; check the dataset root, split and list file", .dir.display())]
    Empty { dir: PathBuf },
    /// A PNG that cannot be decoded (truncated, corrupt, not a PNG).
    #[error("cannot decode {}: {reason}; re-download or regenerate the file, or set `allow_skip: true`", .path.display())]
    Decode { path: PathBuf, reason: String },
    /// A label PNG with a pixel format that does not hold class ids (e.g. a colour label).
    #[error("label {} is not an id image: {reason}", .path.display())]
    LabelFormat { path: PathBuf, reason: String },
    /// Image and label of one pair differ in size.
    #[error("image {} is {}x{} but its label {} is {}x{}; the pair must have the same size", .image.display(), .image_size.0, .image_size.1, .label.display(), .label_size.0, .label_size.1)]
    SizeMismatch {
        image: PathBuf,
        image_size: (u32, u32),
        label: PathBuf,
        label_size: (u32, u32),
    },
    /// Any file-system failure.
    // The cause is part of the message (not a `source`), so that printing the error once
    // says everything without repeating it.
    #[error("{}: {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A Parquet/Arrow failure while writing or reading a table.
    #[error("table {}: {reason}", .path.display())]
    Table { path: PathBuf, reason: String },
    /// A preprocessed dataset whose files do not match its index.
    #[error("preprocessed dataset {}: {reason}; delete it and run `preprocess` again", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// A configuration value out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The caller asked to stop.
    #[error("cancelled")]
    Cancelled,
}

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            error,
        }
    }

    /// The file this error is about, when there is one.
    pub fn path(&self) -> Option<&std::path::Path> {
        use DataError::*;
        match self {
            MissingRoot { expected, .. } => Some(expected),
            BadSplit { root, .. } => Some(root),
            ListEntry { list, .. } => Some(list),
            Unpaired { file, .. } => Some(file),
            Empty { dir } => Some(dir),
            Decode { path, .. } | LabelFormat { path, .. } => Some(path),
            SizeMismatch { image, .. } => Some(image),
            Io { path, .. } | Table { path, .. } | Corrupt { path, .. } => Some(path),
            UnknownFormat(_) | UnknownProtocol(_) | Config(_) | Cancelled => None,
        }
    }

    /// Whether `allow_skip` may skip the sample this error is about (bad files, not bad setups).
    pub fn is_skippable(&self) -> bool {
        matches!(
            self,
            DataError::Decode { .. }
                | DataError::LabelFormat { .. }
                | DataError::SizeMismatch { .. }
                | DataError::Unpaired { .. }
                | DataError::ListEntry { .. }
        )
    }
}
