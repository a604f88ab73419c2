//! Label protocols: raw dataset ids -> training ids, class names and the Cityscapes palette.
//!
//! Every protocol is a subset of the 19 Cityscapes training classes, in their order:
//! - 19 classes: all of them (Cityscapes and GTA5 label ids; SYNTHIA never has terrain, truck,
//!   train).
//! - 16 classes: the SYNTHIA protocol, the 19 without terrain, truck and train.
//! - 13 classes: the 16 without wall, fence and pole (the "mIoU*" protocol).
//!
//! Raw ids come in two spaces: Cityscapes label ids (Cityscapes `*_labelIds.png`, GTA5 palette
//! indices) and SYNTHIA-RAND-CITYSCAPES class ids. Every id not listed maps to [`IGNORE`].

use crate::DataError;

/// The label value that losses and metrics ignore.
pub const IGNORE: u8 = 255;

/// The 19 Cityscapes training classes, in training-id order.
pub const CITYSCAPES_CLASSES: [&str; 19] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
];

/// The official Cityscapes colour of each of the 19 training classes (RGB).
pub const CITYSCAPES_COLORS: [[u8; 3]; 19] = [
    [128, 64, 128],
    [244, 35, 232],
    [70, 70, 70],
    [102, 102, 156],
    [190, 153, 153],
    [153, 153, 153],
    [250, 170, 30],
    [220, 220, 0],
    [107, 142, 35],
    [152, 251, 152],
    [70, 130, 180],
    [220, 20, 60],
    [255, 0, 0],
    [0, 0, 142],
    [0, 0, 70],
    [0, 60, 100],
    [0, 80, 100],
    [0, 0, 230],
    [119, 11, 32],
];

/// Colour of [`IGNORE`] pixels in colour PNGs.
pub const IGNORE_COLOR: [u8; 3] = [0, 0, 0];

/// Cityscapes label id -> 19-class training id (shared by Cityscapes and GTA5).
const CITYSCAPES_IDS_19: [(u16, u8); 19] = [
    (7, 0),
    (8, 1),
    (11, 2),
    (12, 3),
    (13, 4),
    (17, 5),
    (19, 6),
    (20, 7),
    (21, 8),
    (22, 9),
    (23, 10),
    (24, 11),
    (25, 12),
    (26, 13),
    (27, 14),
    (28, 15),
    (31, 16),
    (32, 17),
    (33, 18),
];

/// SYNTHIA-RAND-CITYSCAPES class id -> 19-class training id.
const SYNTHIA_IDS_19: [(u16, u8); 19] = [
    (3, 0),
    (4, 1),
    (2, 2),
    (21, 3),
    (5, 4),
    (7, 5),
    (15, 6),
    (9, 7),
    (6, 8),
    (16, 9),
    (1, 10),
    (10, 11),
    (17, 12),
    (8, 13),
    (18, 14),
    (19, 15),
    (20, 16),
    (12, 17),
    (11, 18),
];

/// 19-class ids kept by the 16-class protocol, in order.
const KEEP_16: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18];
/// 19-class ids kept by the 13-class protocol, in order.
const KEEP_13: [u8; 13] = [0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18];

/// Which numbering the raw label files use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSpace {
    /// Cityscapes label ids (Cityscapes `labelIds`, GTA5 palette indices).
    Cityscapes,
    /// SYNTHIA-RAND-CITYSCAPES class ids.
    Synthia,
}

/// A label protocol: how many classes, which of the 19 Cityscapes classes they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The 19 Cityscapes training classes.
    C19,
    /// The 16 classes shared by SYNTHIA and Cityscapes.
    C16,
    /// The 16 without wall, fence and pole.
    C13,
}

impl Protocol {
    /// The protocol with `classes` classes.
    pub fn from_classes(classes: u32) -> Result<Self, DataError> {
        match classes {
            19 => Ok(Protocol::C19),
            16 => Ok(Protocol::C16),
            13 => Ok(Protocol::C13),
            other => Err(DataError::UnknownProtocol(other)),
        }
    }

    /// Number of classes.
    pub fn num_classes(self) -> usize {
        self.kept().len()
    }

    /// A short stable name, e.g. `cityscapes16`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::C19 => "cityscapes19",
            Protocol::C16 => "cityscapes16",
            Protocol::C13 => "cityscapes13",
        }
    }

    /// The 19-class id of each class of this protocol.
    pub fn kept(self) -> &'static [u8] {
        const ALL: [u8; 19] = [
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
        ];
        match self {
            Protocol::C19 => &ALL,
            Protocol::C16 => &KEEP_16,
            Protocol::C13 => &KEEP_13,
        }
    }

    /// Class names, in class-id order.
    pub fn class_names(self) -> Vec<&'static str> {
        self.kept()
            .iter()
            .map(|&c| CITYSCAPES_CLASSES[c as usize])
            .collect()
    }

    /// Cityscapes colours, in class-id order.
    pub fn colors(self) -> Vec<[u8; 3]> {
        self.kept()
            .iter()
            .map(|&c| CITYSCAPES_COLORS[c as usize])
            .collect()
    }

    /// A 256-entry lookup table, class id -> RGB, with [`IGNORE_COLOR`] for everything else.
    pub fn color_lut(self) -> [[u8; 3]; 256] {
        let mut lut = [IGNORE_COLOR; 256];
        for (i, c) in self.colors().into_iter().enumerate() {
            lut[i] = c;
        }
        lut
    }

    /// The raw-id -> class-id table for labels in `space`.
    pub fn lut(self, space: IdSpace) -> LabelLut {
        let pairs: &[(u16, u8)] = match space {
            IdSpace::Cityscapes => &CITYSCAPES_IDS_19,
            IdSpace::Synthia => &SYNTHIA_IDS_19,
        };
        let mut to_class = [IGNORE; 256];
        for &(raw, c19) in pairs {
            if let Some(pos) = self.kept().iter().position(|&k| k == c19) {
                to_class[raw as usize] = pos as u8;
            }
        }
        LabelLut(to_class)
    }
}

/// Maps raw label ids to class ids; ids without a class (and ids above 255) become [`IGNORE`].
#[derive(Debug, Clone)]
pub struct LabelLut(pub [u8; 256]);

impl LabelLut {
    /// The class id of a raw id.
    #[inline]
    pub fn map(&self, raw: u16) -> u8 {
        if raw < 256 {
            self.0[raw as usize]
        } else {
            IGNORE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_colors_follow_the_kept_classes() {
        let p = Protocol::C13;
        assert_eq!(p.num_classes(), 13);
        let names = p.class_names();
        assert!(!names.contains(&"wall") && !names.contains(&"pole"));
        assert_eq!(names[3], "traffic light");
        assert_eq!(p.colors()[3], [250, 170, 30]);
        assert_eq!(p.color_lut()[13], IGNORE_COLOR);
        assert!(Protocol::from_classes(7).is_err());
    }

    #[test]
    fn ids_above_255_are_ignored() {
        let lut = Protocol::C16.lut(IdSpace::Synthia);
        assert_eq!(lut.map(3), 0);
        assert_eq!(lut.map(256 + 3), IGNORE);
        assert_eq!(lut.map(0), IGNORE);
    }
}
