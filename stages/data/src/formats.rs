//! The on-disk layouts of the real datasets, list files, and pairing of images with labels.
//!
//! A sample's id is its image path relative to the image folder of its split, with `/`
//! separators: `aachen/aachen_000000_000019_leftImg8bit.png` (Cityscapes), `00001.png` (GTA5),
//! `0000001.png` (SYNTHIA). List files (IntraDA's `easy_split.txt`, ADVENT's `train.txt`) hold
//! one such id per line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::pngio::LabelEncoding;
use crate::protocol::IdSpace;
use crate::DataError;

/// A dataset format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `leftImg8bit/<split>/<city>/*_leftImg8bit.png`, `gtFine/<split>/<city>/*_gtFine_labelIds.png`.
    Cityscapes,
    /// `images/NNNNN.png`, `labels/NNNNN.png` (palette PNGs).
    Gta5,
    /// `RGB/NNNNNNN.png`, `GT/LABELS/NNNNNNN.png` (16-bit multi-channel PNGs).
    Synthia,
}

const CITYSCAPES_LAYOUT: &str =
    "  leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n  \
     gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png";
const GTA5_LAYOUT: &str =
    "  images/NNNNN.png\n  labels/NNNNN.png   (palette PNGs of Cityscapes label ids)";
const SYNTHIA_LAYOUT: &str =
    "  RGB/NNNNNNN.png\n  GT/LABELS/NNNNNNN.png   (16-bit PNGs, class id in the first channel)";

impl FromStr for Format {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s.to_ascii_lowercase().as_str() {
            "cityscapes" => Ok(Format::Cityscapes),
            "gta5" | "gta" => Ok(Format::Gta5),
            "synthia" => Ok(Format::Synthia),
            _ => Err(DataError::UnknownFormat(s.to_string())),
        }
    }
}

impl Format {
    /// The canonical lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Cityscapes => "cityscapes",
            Format::Gta5 => "gta5",
            Format::Synthia => "synthia",
        }
    }

    /// Which numbering its label files use.
    pub fn id_space(self) -> IdSpace {
        match self {
            Format::Cityscapes | Format::Gta5 => IdSpace::Cityscapes,
            Format::Synthia => IdSpace::Synthia,
        }
    }

    /// How its label files store ids.
    pub fn label_encoding(self) -> LabelEncoding {
        match self {
            Format::Cityscapes | Format::Gta5 => LabelEncoding::Ids,
            Format::Synthia => LabelEncoding::FirstChannel,
        }
    }

    /// The expected layout, for error messages.
    pub fn layout(self) -> &'static str {
        match self {
            Format::Cityscapes => CITYSCAPES_LAYOUT,
            Format::Gta5 => GTA5_LAYOUT,
            Format::Synthia => SYNTHIA_LAYOUT,
        }
    }

    /// The image and label folders of `split` under `root`.
    pub fn dirs(self, root: &Path, split: &str) -> Result<(PathBuf, PathBuf), DataError> {
        match self {
            Format::Cityscapes => {
                if split == "all" {
                    return Err(DataError::BadSplit {
                        format: self.name(),
                        root: root.to_path_buf(),
                        split: split.into(),
                        hint: "Cityscapes has split folders; set `split:` to train, val or test"
                            .into(),
                    });
                }
                Ok((
                    root.join("leftImg8bit").join(split),
                    root.join("gtFine").join(split),
                ))
            }
            Format::Gta5 | Format::Synthia if split != "all" => Err(DataError::BadSplit {
                format: self.name(),
                root: root.to_path_buf(),
                split: split.into(),
                hint: format!(
                    "{} has no split folders; use `split: all` and a list file to select images",
                    self.name()
                ),
            }),
            Format::Gta5 => Ok((root.join("images"), root.join("labels"))),
            Format::Synthia => Ok((root.join("RGB"), root.join("GT").join("LABELS"))),
        }
    }

    /// Checks that the root and the folders of `split` exist.
    pub fn check_root(self, root: &Path, split: &str) -> Result<(PathBuf, PathBuf), DataError> {
        let missing = |expected: &Path| DataError::MissingRoot {
            format: self.name(),
            root: root.to_path_buf(),
            expected: expected.to_path_buf(),
            layout: self.layout(),
        };
        if !root.is_dir() {
            return Err(missing(root));
        }
        let (images, labels) = self.dirs(root, split)?;
        for dir in [&images, &labels] {
            if !dir.is_dir() {
                return Err(missing(dir));
            }
        }
        Ok((images, labels))
    }

    /// The label id that belongs to image id `id`, or `None` if `id` is not an image name of
    /// this format.
    fn label_of(self, id: &str) -> Option<String> {
        match self {
            Format::Cityscapes => id
                .strip_suffix("_leftImg8bit.png")
                .map(|stem| format!("{stem}_gtFine_labelIds.png")),
            Format::Gta5 | Format::Synthia => id.ends_with(".png").then(|| id.to_string()),
        }
    }

    /// The image id that belongs to label id `id`, or `None` if `id` is not a label file name.
    fn image_of(self, id: &str) -> Option<String> {
        match self {
            Format::Cityscapes => id
                .strip_suffix("_gtFine_labelIds.png")
                .map(|stem| format!("{stem}_leftImg8bit.png")),
            Format::Gta5 | Format::Synthia => id.ends_with(".png").then(|| id.to_string()),
        }
    }
}

/// One image/label pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleRef {
    /// Image path relative to the split's image folder, `/`-separated.
    pub id: String,
    /// The image file.
    pub image: PathBuf,
    /// The label file (ids, not colours).
    pub label: PathBuf,
}

/// The pairs of a split, and the files that have no partner.
#[derive(Debug)]
pub struct Discovery {
    /// Complete pairs, sorted by id.
    pub samples: Vec<SampleRef>,
    /// Images without a label, labels without an image, list entries without an image; each
    /// as the error it would raise.
    pub problems: Vec<DataError>,
}

/// Relative `/`-separated paths of the `.png` files under `dir`, sorted.
fn list_pngs(dir: &Path) -> Result<BTreeSet<String>, DataError> {
    let mut out = BTreeSet::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, prefix)) = stack.pop() {
        let entries = std::fs::read_dir(&path).map_err(|e| DataError::io(&path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| DataError::io(&path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            let ty = entry
                .file_type()
                .map_err(|e| DataError::io(entry.path(), e))?;
            if ty.is_dir() {
                stack.push((entry.path(), rel));
            } else if name.to_ascii_lowercase().ends_with(".png") {
                out.insert(rel);
            }
        }
    }
    Ok(out)
}

fn join_rel(dir: &Path, rel: &str) -> PathBuf {
    rel.split('/')
        .fold(dir.to_path_buf(), |p, part| p.join(part))
}

/// Reads a list file: one image id per line (the first whitespace-separated token); blank
/// lines and lines starting with `#` are ignored. Returns (line number, id).
pub fn read_list(path: &Path) -> Result<Vec<(usize, String)>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    Ok(text
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let tok = line.split_whitespace().next()?;
            (!tok.starts_with('#')).then(|| (i + 1, tok.trim_start_matches("./").to_string()))
        })
        .collect())
}

/// Finds the image/label pairs of `split` under `root`, optionally restricted to the ids of a
/// list file. Problems are returned, not raised, so that the caller decides whether to skip.
pub fn discover(
    format: Format,
    root: &Path,
    split: &str,
    list: Option<&Path>,
) -> Result<Discovery, DataError> {
    let (image_dir, label_dir) = format.check_root(root, split)?;
    let images = list_pngs(&image_dir)?;
    let labels = list_pngs(&label_dir)?;
    let mut problems = Vec::new();
    let mut samples = Vec::new();

    let wanted: Vec<(Option<(usize, &Path)>, String)> = match list {
        Some(list_path) => read_list(list_path)?
            .into_iter()
            .map(|(line, id)| (Some((line, list_path)), id))
            .collect(),
        None => images.iter().map(|id| (None, id.clone())).collect(),
    };
    let mut seen = BTreeSet::new();
    for (origin, id) in wanted {
        if !seen.insert(id.clone()) {
            continue;
        }
        let image = join_rel(&image_dir, &id);
        if let Some((line, list_path)) = origin {
            if !images.contains(&id) {
                problems.push(DataError::ListEntry {
                    list: list_path.to_path_buf(),
                    line,
                    entry: id,
                    missing: image,
                });
                continue;
            }
        }
        match format.label_of(&id) {
            Some(label_id) if labels.contains(&label_id) => samples.push(SampleRef {
                label: join_rel(&label_dir, &label_id),
                id,
                image,
            }),
            // An image name that does not follow the format's naming has no label either.
            label_id => {
                let counterpart = join_rel(
                    &label_dir,
                    &label_id.unwrap_or_else(|| format!("{id} (no label name for this image)")),
                );
                problems.push(DataError::Unpaired {
                    what: "image",
                    file: image,
                    counterpart,
                });
            }
        }
    }
    // Labels without images matter only when the whole split is read.
    if list.is_none() {
        for label_id in &labels {
            let image_id = format.image_of(label_id);
            if !image_id.as_ref().is_some_and(|i| images.contains(i)) {
                // Cityscapes keeps other label kinds (color, instanceIds, polygons) beside the
                // labelIds; only labelIds files must have an image.
                if format == Format::Cityscapes && image_id.is_none() {
                    continue;
                }
                problems.push(DataError::Unpaired {
                    what: "label",
                    file: join_rel(&label_dir, label_id),
                    counterpart: join_rel(&image_dir, &image_id.unwrap_or_default()),
                });
            }
        }
    }
    samples.sort_by(|a, b| a.id.cmp(&b.id));
    if samples.is_empty() && problems.is_empty() {
        return Err(DataError::Empty { dir: image_dir });
    }
    Ok(Discovery { samples, problems })
}
