//! A procedural street-scene generator with a real domain shift: the quickstart's data.
//!
//! It writes a mini SYNTHIA-RAND-CITYSCAPES (the source: clean, flat-shaded, saturated colours)
//! and a mini Cityscapes (the target, `train` and `val`) in exactly the on-disk formats of the
//! real datasets, so that the same readers and protocols run on it.
//!
//! Both domains share the scene grammar (a street running to a vanishing point, sidewalks,
//! facades, trees, poles with signs and traffic lights, cars, persons, sky), so a model can
//! transfer. The target differs the way real data differs from a game: another palette per
//! class, textures (windows, tiles, leaves, lane markings, road grain), a higher camera, light
//! that varies across the image, an ego-vehicle hood (ignored label), blur, and per image a
//! difficulty in [0, 1] made of fog, darkness, sensor noise, contrast loss and clutter (extra
//! small objects crowding the street). That difficulty
//! goes to `difficulty.parquet` in the target root (readers ignore it), so the intra-domain
//! split can be checked against the truth.
//!
//! Output is a pure function of the config: every image draws from its own ChaCha stream
//! derived from (seed, domain, index), so the result is byte-identical whatever the threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use png::{BitDepth, ColorType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::pngio::{write_label_png, write_png, write_rgb_png};
use crate::tables::{Column, Table};
use crate::DataError;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Images of the source domain (SYNTHIA format).
    pub source_images: usize,
    /// Images of the target domain's `train` split (Cityscapes format).
    pub target_train: usize,
    /// Images of the target domain's `val` split.
    pub target_val: usize,
    /// Width of every image.
    pub width: u32,
    /// Height of every image.
    pub height: u32,
    /// Everything is a function of this seed.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            source_images: 200,
            target_train: 200,
            target_val: 60,
            width: 320,
            height: 160,
            seed: 0,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthReport {
    /// Source images written.
    pub source_images: usize,
    /// Target train images written.
    pub target_train: usize,
    /// Target val images written.
    pub target_val: usize,
    /// Mean difficulty of the target train images.
    pub mean_difficulty: f64,
}

/// Cities of the target's splits (made-up names in Cityscapes' naming scheme).
pub const TRAIN_CITIES: [&str; 3] = ["arden", "belmont", "corvale"];
/// The target's validation city.
pub const VAL_CITIES: [&str; 1] = ["dunmore"];

/// The scene classes, as drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Cls {
    Sky,
    Building,
    Road,
    Sidewalk,
    Vegetation,
    Pole,
    Light,
    Sign,
    Car,
    Person,
    /// The ego vehicle's hood (target only): Cityscapes id 1, ignored by every protocol.
    Ego,
}

/// SYNTHIA-RAND-CITYSCAPES class id of each [`Cls`] (0 = void).
const SYNTHIA_ID: [u16; 11] = [1, 2, 3, 4, 6, 7, 15, 9, 8, 10, 0];
/// Cityscapes label id of each [`Cls`].
const CITYSCAPES_ID: [u8; 11] = [23, 11, 7, 8, 21, 17, 19, 20, 26, 24, 1];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Domain {
    Source,
    TargetTrain,
    TargetVal,
}

impl Domain {
    fn tag(self) -> u64 {
        match self {
            Domain::Source => 1,
            Domain::TargetTrain => 2,
            Domain::TargetVal => 3,
        }
    }
    fn is_target(self) -> bool {
        self != Domain::Source
    }
}

/// The degradations of one target image, each in [0, 1].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Degradation {
    fog: f32,
    darkness: f32,
    noise: f32,
    contrast: f32,
    /// Extra small objects (poles, signs, persons, cars) crowding the street.
    clutter: f32,
}

impl Degradation {
    fn difficulty(&self) -> f32 {
        (self.fog + self.darkness + self.noise + self.contrast + self.clutter) / 5.0
    }
}

/// splitmix64: decorrelates nearby seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A per-pixel hash in [0, 1): deterministic texture without consuming the image's RNG.
fn hash01(x: u32, y: u32, salt: u64) -> f32 {
    let h = mix(salt ^ ((x as u64) << 32 | y as u64));
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// Smooth value noise in [0, 1) with features about `scale` pixels wide.
fn value_noise(x: f32, y: f32, scale: f32, salt: u64) -> f32 {
    let (fx, fy) = (x / scale, y / scale);
    let (x0, y0) = (fx.floor(), fy.floor());
    let (tx, ty) = (fx - x0, fy - y0);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let (ix, iy) = (x0 as i64 as u32, y0 as i64 as u32);
    let a = hash01(ix, iy, salt);
    let b = hash01(ix.wrapping_add(1), iy, salt);
    let c = hash01(ix, iy.wrapping_add(1), salt);
    let d = hash01(ix.wrapping_add(1), iy.wrapping_add(1), salt);
    let top = a + (b - a) * sx;
    let bottom = c + (d - c) * sx;
    top + (bottom - top) * sy
}

/// How a surface is textured in the target domain.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Texture {
    Flat,
    /// Grain of asphalt.
    Grain,
    /// Windows in a grid; the f32s are the cell size in pixels.
    Windows(f32, f32),
    /// Paving tiles.
    Tiles(f32),
    /// Leaves.
    Leaves(f32),
    /// A vertical sky gradient.
    SkyGradient,
}

/// One painted object: its colour, its texture and its distance (perspective scale `t`).
#[derive(Debug, Clone, Copy)]
struct Paint {
    color: [f32; 3],
    texture: Texture,
    /// Perspective scale at the object's ground contact: 1 at the bottom row, 0 at the
    /// horizon. Drives fog.
    t: f32,
}

/// The image being drawn: class, object and depth per pixel.
struct Canvas {
    w: usize,
    h: usize,
    cls: Vec<u8>,
    obj: Vec<u16>,
    paints: Vec<Paint>,
}

impl Canvas {
    fn new(w: usize, h: usize, sky: Paint) -> Self {
        Canvas {
            w,
            h,
            cls: vec![Cls::Sky as u8; w * h],
            obj: vec![0; w * h],
            paints: vec![sky],
        }
    }

    fn add_paint(&mut self, p: Paint) -> u16 {
        // Beyond u16::MAX objects the last one is reused; scenes have a few hundred at most.
        if self.paints.len() < u16::MAX as usize {
            self.paints.push(p);
        }
        (self.paints.len() - 1) as u16
    }

    /// Paints the pixels of the box [x0, x1) x [y0, y1) whose centre satisfies `inside`.
    fn fill(
        &mut self,
        (x0, y0, x1, y1): (f32, f32, f32, f32),
        cls: Cls,
        paint: u16,
        inside: impl Fn(f32, f32) -> bool,
    ) {
        let cx0 = x0.floor().max(0.0) as usize;
        let cy0 = y0.floor().max(0.0) as usize;
        let cx1 = (x1.ceil().max(0.0) as usize).min(self.w);
        let cy1 = (y1.ceil().max(0.0) as usize).min(self.h);
        for y in cy0..cy1 {
            for x in cx0..cx1 {
                if inside(x as f32 + 0.5, y as f32 + 0.5) {
                    let i = y * self.w + x;
                    self.cls[i] = cls as u8;
                    self.obj[i] = paint;
                }
            }
        }
    }

    /// A rectangle at least one pixel wide and tall, so thin far objects do not vanish.
    fn rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, cls: Cls, paint: u16) {
        let (x1, y1) = (x1.max(x0 + 1.0), y1.max(y0 + 1.0));
        self.fill((x0, y0, x1, y1), cls, paint, |x, y| {
            x >= x0 && x < x1 && y >= y0 && y < y1
        });
    }

    fn ellipse(&mut self, cx: f32, cy: f32, rx: f32, ry: f32, cls: Cls, paint: u16) {
        let (rx, ry) = (rx.max(0.7), ry.max(0.7));
        self.fill((cx - rx, cy - ry, cx + rx, cy + ry), cls, paint, |x, y| {
            let (dx, dy) = ((x - cx) / rx, (y - cy) / ry);
            dx * dx + dy * dy <= 1.0
        });
    }

    /// An upward-pointing triangle inscribed in the box.
    fn triangle(&mut self, cx: f32, top: f32, half: f32, height: f32, cls: Cls, paint: u16) {
        let (half, height) = (half.max(1.0), height.max(1.0));
        self.fill(
            (cx - half, top, cx + half, top + height),
            cls,
            paint,
            |x, y| {
                let f = (y - top) / height;
                (0.0..=1.0).contains(&f) && (x - cx).abs() <= half * f
            },
        );
    }
}

/// Colour palette and geometry of a domain.
struct Style {
    target: bool,
    /// Range of the horizon row, as a fraction of the height.
    horizon: (f32, f32),
    /// Camera height in "object units": a higher camera makes objects smaller relative to the
    /// visible ground.
    camera: f32,
    sky: [f32; 3],
    building: [[f32; 3]; 4],
    road: [f32; 3],
    sidewalk: [f32; 3],
    vegetation: [f32; 3],
    pole: [f32; 3],
    light: [f32; 3],
    sign: [[f32; 3]; 3],
    car: [[f32; 3]; 6],
    clothes: [[f32; 3]; 5],
    skin: [f32; 3],
}

const SOURCE_STYLE: Style = Style {
    target: false,
    horizon: (0.36, 0.46),
    camera: 1.0,
    sky: [110.0, 165.0, 240.0],
    building: [
        [170.0, 150.0, 120.0],
        [140.0, 140.0, 160.0],
        [190.0, 180.0, 160.0],
        [150.0, 120.0, 110.0],
    ],
    road: [95.0, 90.0, 105.0],
    sidewalk: [185.0, 175.0, 160.0],
    vegetation: [50.0, 150.0, 60.0],
    pole: [130.0, 130.0, 140.0],
    light: [40.0, 40.0, 45.0],
    sign: [
        [210.0, 40.0, 40.0],
        [40.0, 90.0, 210.0],
        [230.0, 230.0, 230.0],
    ],
    car: [
        [200.0, 30.0, 30.0],
        [30.0, 60.0, 200.0],
        [230.0, 230.0, 230.0],
        [30.0, 30.0, 30.0],
        [220.0, 200.0, 40.0],
        [40.0, 160.0, 80.0],
    ],
    clothes: [
        [200.0, 60.0, 60.0],
        [60.0, 60.0, 200.0],
        [60.0, 170.0, 60.0],
        [220.0, 200.0, 60.0],
        [150.0, 60.0, 160.0],
    ],
    skin: [235.0, 195.0, 165.0],
};

const TARGET_STYLE: Style = Style {
    target: true,
    horizon: (0.40, 0.52),
    camera: 1.35,
    sky: [150.0, 178.0, 212.0],
    building: [
        [115.0, 95.0, 85.0],
        [95.0, 100.0, 100.0],
        [150.0, 140.0, 125.0],
        [80.0, 75.0, 80.0],
    ],
    road: [75.0, 72.0, 70.0],
    sidewalk: [145.0, 118.0, 122.0],
    vegetation: [95.0, 115.0, 45.0],
    pole: [75.0, 80.0, 85.0],
    light: [25.0, 28.0, 25.0],
    sign: [
        [235.0, 205.0, 30.0],
        [245.0, 245.0, 240.0],
        [30.0, 110.0, 60.0],
    ],
    car: [
        [70.0, 70.0, 80.0],
        [160.0, 160.0, 165.0],
        [20.0, 25.0, 40.0],
        [110.0, 30.0, 30.0],
        [200.0, 200.0, 195.0],
        [50.0, 60.0, 55.0],
    ],
    clothes: [
        [40.0, 40.0, 50.0],
        [90.0, 80.0, 70.0],
        [30.0, 50.0, 90.0],
        [120.0, 40.0, 40.0],
        [150.0, 150.0, 145.0],
    ],
    skin: [200.0, 160.0, 135.0],
};

fn jitter(rng: &mut ChaCha8Rng, c: [f32; 3], amount: f32) -> [f32; 3] {
    let g = 1.0 + rng.random_range(-amount..=amount);
    c.map(|v| v * g + rng.random_range(-amount..=amount) * 40.0)
}

/// A rendered scene: RGB, class per pixel and object per pixel.
struct Scene {
    rgb: Vec<u8>,
    cls: Vec<u8>,
    obj: Vec<u16>,
    degradation: Degradation,
}

/// Street geometry: lines through the vanishing point.
struct Street {
    w: f32,
    h: f32,
    hz: f32,
    vx: f32,
    /// x at the bottom row of: road left/right edge, sidewalk outer left/right edge.
    road_l: f32,
    road_r: f32,
    walk_l: f32,
    walk_r: f32,
    /// Pixels per object unit at t = 1.
    unit: f32,
}

impl Street {
    /// Row of ground contact at perspective scale t.
    fn y(&self, t: f32) -> f32 {
        self.hz + t * (self.h - self.hz)
    }
    /// x of a line that passes through the vanishing point and `bottom_x` at the bottom row.
    fn x(&self, bottom_x: f32, t: f32) -> f32 {
        self.vx + (bottom_x - self.vx) * t
    }
    /// Perspective scale of row y (0 above the horizon).
    fn t_of(&self, y: f32) -> f32 {
        ((y - self.hz) / (self.h - self.hz)).max(0.0)
    }
}

fn render(w: u32, h: u32, domain: Domain, rng: &mut ChaCha8Rng) -> Scene {
    let style = if domain.is_target() {
        &TARGET_STYLE
    } else {
        &SOURCE_STYLE
    };
    let (wf, hf) = (w as f32, h as f32);
    let hz = hf * rng.random_range(style.horizon.0..style.horizon.1);
    let vx = wf * rng.random_range(0.35..0.65);
    let centre = vx + wf * rng.random_range(-0.12..0.12);
    let half = wf * rng.random_range(0.32..0.5);
    let walk = half * rng.random_range(0.35..0.7);
    let st = Street {
        w: wf,
        h: hf,
        hz,
        vx,
        road_l: centre - half,
        road_r: centre + half,
        walk_l: centre - half - walk,
        walk_r: centre + half + walk,
        unit: (hf - hz) / style.camera,
    };
    let sky = Paint {
        color: jitter(rng, style.sky, 0.05),
        texture: if style.target {
            Texture::SkyGradient
        } else {
            Texture::Flat
        },
        t: 0.0,
    };
    let mut cv = Canvas::new(w as usize, h as usize, sky);

    draw_ground(&mut cv, &st, style, rng);
    draw_skyline(&mut cv, &st, style, rng);
    for side in [-1.0f32, 1.0] {
        draw_facades(&mut cv, &st, style, rng, side);
    }
    // Drawn before the objects because clutter decides how many there are.
    let degradation = if style.target {
        // Skewed towards easy images with a tail of hard ones, as in real driving data; the
        // extremes stay below "invisible" so every image remains learnable.
        let d = 0.9 * rng.random::<f32>().powf(1.2);
        let mut part = || (d * rng.random_range(0.5f32..1.5)).clamp(0.0, 1.0);
        Degradation {
            fog: part(),
            darkness: part(),
            noise: part(),
            contrast: part(),
            clutter: part(),
        }
    } else {
        Degradation::default()
    };
    draw_street_objects(&mut cv, &st, style, rng, degradation.clutter);
    if style.target {
        draw_ego(&mut cv, rng);
    }
    let rgb = shade(&cv, &st, style, degradation, rng.random());
    Scene {
        rgb,
        cls: cv.cls,
        obj: cv.obj,
        degradation,
    }
}

fn draw_ground(cv: &mut Canvas, st: &Street, style: &Style, rng: &mut ChaCha8Rng) {
    let paint = |rng: &mut ChaCha8Rng, c, texture| Paint {
        color: jitter(rng, c, 0.06),
        texture,
        t: 1.0,
    };
    let road = paint(rng, style.road, Texture::Grain);
    let road = cv.add_paint(road);
    let tile = st.unit * 0.25;
    let walk = paint(rng, style.sidewalk, Texture::Tiles(tile));
    let walk = cv.add_paint(walk);
    let (wf, hf) = (st.w, st.h);
    cv.fill((0.0, st.hz, wf, hf), Cls::Sidewalk, walk, |x, y| {
        let t = st.t_of(y);
        x >= st.x(st.walk_l, t) && x <= st.x(st.walk_r, t)
    });
    cv.fill((0.0, st.hz, wf, hf), Cls::Road, road, |x, y| {
        let t = st.t_of(y);
        x >= st.x(st.road_l, t) && x <= st.x(st.road_r, t)
    });
}

/// Far buildings at the end of the street.
fn draw_skyline(cv: &mut Canvas, st: &Street, style: &Style, rng: &mut ChaCha8Rng) {
    let span = st.w * 0.35;
    let mut x = st.vx - span;
    while x < st.vx + span {
        let bw = st.w * rng.random_range(0.02..0.07);
        let top = st.hz - st.unit * rng.random_range(0.05..0.35);
        let c = style.building[rng.random_range(0..style.building.len())];
        let p = Paint {
            color: jitter(rng, c, 0.08),
            texture: Texture::Flat,
            t: 0.03,
        };
        let p = cv.add_paint(p);
        cv.rect(x, top, x + bw, st.hz + 1.0, Cls::Building, p);
        x += bw;
    }
}

/// Facades along one side of the street (`side` -1 left, +1 right), far to near so that
/// nearer blocks, drawn last, hide farther ones; then trees in front of them.
fn draw_facades(cv: &mut Canvas, st: &Street, style: &Style, rng: &mut ChaCha8Rng, side: f32) {
    let outer = if side < 0.0 { st.walk_l } else { st.walk_r };
    // Blocks are laid out along the street in world depth z = 1/t.
    let mut blocks = Vec::new();
    let mut z = rng.random_range(0.3f32..0.7);
    while z < 25.0 {
        let len = rng.random_range(0.6f32..2.5) * z.max(1.0).sqrt();
        blocks.push((z, z + len));
        z += len;
    }
    for &(z0, z1) in blocks.iter().rev() {
        let (t_near, t_far) = (1.0 / z0, 1.0 / z1);
        let kind: f32 = rng.random();
        let (x_near, x_far) = (st.x(outer, t_near), st.x(outer, t_far));
        let (xa, xb) = if x_near < x_far {
            (x_near, x_far)
        } else {
            (x_far, x_near)
        };
        if kind < 0.72 {
            let height = rng.random_range(2.0f32..9.0);
            let c = style.building[rng.random_range(0..style.building.len())];
            // Flat shading: the left facades face the light, the right ones less.
            let c = c.map(|v| v * if side < 0.0 { 1.0 } else { 0.85 });
            let win = st.unit * rng.random_range(0.35..0.6);
            let p = Paint {
                color: jitter(rng, c, 0.07),
                texture: Texture::Windows(win, win * rng.random_range(1.1..1.6)),
                t: (t_near + t_far) / 2.0,
            };
            let p = cv.add_paint(p);
            cv.fill((xa, 0.0, xb, st.h), Cls::Building, p, |x, y| {
                let t = (x - st.vx) / (outer - st.vx);
                let ground = st.y(t);
                let top = st.hz - t * st.unit * height;
                t > 0.0 && y >= top && y <= ground
            });
        } else if kind < 0.9 {
            // A hedge or park: low vegetation up to a random height.
            let height = rng.random_range(0.4f32..2.5);
            let p = Paint {
                color: jitter(rng, style.vegetation, 0.1),
                texture: Texture::Leaves(st.unit * 0.08),
                t: (t_near + t_far) / 2.0,
            };
            let p = cv.add_paint(p);
            let salt: u64 = rng.random();
            cv.fill((xa, 0.0, xb, st.h), Cls::Vegetation, p, |x, y| {
                let t = (x - st.vx) / (outer - st.vx);
                let bumps = value_noise(x, 0.0, st.unit * 0.3 * t + 1.0, salt);
                let top = st.hz - t * st.unit * height * (0.7 + 0.6 * bumps);
                t > 0.0 && y >= top && y <= st.y(t)
            });
        } else {
            // A gap between blocks: a lawn up to the horizon, sky above.
            let p = Paint {
                color: jitter(rng, style.vegetation, 0.1),
                texture: Texture::Leaves(st.unit * 0.15),
                t: (t_near + t_far) / 2.0,
            };
            let p = cv.add_paint(p);
            cv.fill((xa, st.hz, xb, st.h), Cls::Vegetation, p, |x, y| {
                let t = (x - st.vx) / (outer - st.vx);
                t > 0.0 && y <= st.y(t)
            });
        }
    }
    let trees = rng.random_range(0..5);
    let mut ts: Vec<f32> = (0..trees).map(|_| rng.random_range(0.12f32..1.3)).collect();
    ts.sort_by(f32::total_cmp);
    for t in ts {
        let gy = st.y(t);
        let x = st.x(outer, t) - side * rng.random_range(0.05..0.2) * st.unit * t;
        let s = st.unit * t;
        let p = Paint {
            color: jitter(rng, style.vegetation, 0.12),
            texture: Texture::Leaves(st.unit * 0.06),
            t,
        };
        let p = cv.add_paint(p);
        let trunk_h = s * rng.random_range(1.0..2.0);
        cv.rect(
            x - 0.05 * s,
            gy - trunk_h,
            x + 0.05 * s,
            gy,
            Cls::Vegetation,
            p,
        );
        let r = s * rng.random_range(0.5..1.0);
        cv.ellipse(x, gy - trunk_h - r * 0.6, r, r * 0.8, Cls::Vegetation, p);
    }
}

/// Poles, signs, traffic lights, cars and persons, painted far to near.
fn draw_street_objects(
    cv: &mut Canvas,
    st: &Street,
    style: &Style,
    rng: &mut ChaCha8Rng,
    clutter: f32,
) {
    #[derive(Clone, Copy)]
    enum Obj {
        Pole(f32),
        Car(f32),
        Person(f32),
    }
    let mut objs: Vec<(f32, Obj)> = Vec::new();
    // Clutter adds up to 12 objects of each kind; 0 keeps the source's scene statistics.
    let extra = (clutter * 12.0).round() as usize;
    for _ in 0..rng.random_range(1..5) + extra {
        let side = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
        objs.push((rng.random_range(0.1..1.2), Obj::Pole(side)));
    }
    for _ in 0..rng.random_range(0..6) + extra / 2 {
        objs.push((
            rng.random_range(0.08..0.9),
            Obj::Car(rng.random_range(0.15..0.85)),
        ));
    }
    for _ in 0..rng.random_range(0..6) + extra {
        // Most persons walk on the sidewalks; some cross the road.
        let u = if rng.random_bool(0.8) {
            if rng.random_bool(0.5) {
                rng.random_range(-0.9..-0.05)
            } else {
                rng.random_range(1.05..1.9)
            }
        } else {
            rng.random_range(0.1..0.9)
        };
        objs.push((rng.random_range(0.1..1.2), Obj::Person(u)));
    }
    objs.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (t, obj) in objs {
        let s = st.unit * t;
        let gy = st.y(t);
        // Position across the street: 0 = left road edge, 1 = right road edge.
        let at = |u: f32| {
            let (l, r) = (st.x(st.road_l, t), st.x(st.road_r, t));
            l + (r - l) * u
        };
        match obj {
            Obj::Pole(side) => draw_pole(cv, st, style, rng, t, side),
            Obj::Car(u) => {
                let cx = at(u);
                let c = style.car[rng.random_range(0..style.car.len())];
                let body = Paint {
                    color: jitter(rng, c, 0.08),
                    texture: Texture::Flat,
                    t,
                };
                let dark = Paint {
                    color: jitter(rng, [35.0, 38.0, 45.0], 0.05),
                    texture: Texture::Flat,
                    t,
                };
                let (body, dark) = (cv.add_paint(body), cv.add_paint(dark));
                let half = s * rng.random_range(0.55..0.75);
                let height = s * rng.random_range(0.9..1.3);
                let wheel = s * 0.18;
                cv.rect(
                    cx - half,
                    gy - height * 0.6,
                    cx + half,
                    gy - wheel * 0.6,
                    Cls::Car,
                    body,
                );
                let roof = half * rng.random_range(0.65..0.85);
                cv.rect(
                    cx - roof,
                    gy - height,
                    cx + roof,
                    gy - height * 0.6,
                    Cls::Car,
                    body,
                );
                // Windows and wheels are part of the car.
                let glass = roof * 0.85;
                cv.rect(
                    cx - glass,
                    gy - height * 0.93,
                    cx + glass,
                    gy - height * 0.65,
                    Cls::Car,
                    dark,
                );
                for wx in [cx - half * 0.7, cx + half * 0.7] {
                    cv.rect(wx - wheel, gy - wheel * 1.2, wx + wheel, gy, Cls::Car, dark);
                }
            }
            Obj::Person(u) => {
                let cx = at(u);
                let height = s * rng.random_range(1.0..1.35);
                let wide = height * 0.13;
                let shirt = style.clothes[rng.random_range(0..style.clothes.len())];
                let pants = style.clothes[rng.random_range(0..style.clothes.len())];
                let mk = |rng: &mut ChaCha8Rng, c| Paint {
                    color: jitter(rng, c, 0.1),
                    texture: Texture::Flat,
                    t,
                };
                let (shirt, pants, skin) = (mk(rng, shirt), mk(rng, pants), mk(rng, style.skin));
                let (shirt, pants, skin) =
                    (cv.add_paint(shirt), cv.add_paint(pants), cv.add_paint(skin));
                let stride = wide * rng.random_range(0.0..0.8);
                cv.rect(
                    cx - wide * 0.8 - stride * 0.3,
                    gy - height * 0.47,
                    cx - wide * 0.05,
                    gy,
                    Cls::Person,
                    pants,
                );
                cv.rect(
                    cx + wide * 0.05,
                    gy - height * 0.47,
                    cx + wide * 0.8 + stride * 0.3,
                    gy,
                    Cls::Person,
                    pants,
                );
                cv.rect(
                    cx - wide,
                    gy - height * 0.82,
                    cx + wide,
                    gy - height * 0.45,
                    Cls::Person,
                    shirt,
                );
                cv.ellipse(
                    cx,
                    gy - height * 0.9,
                    wide * 0.6,
                    height * 0.09,
                    Cls::Person,
                    skin,
                );
            }
        }
    }
}

fn draw_pole(cv: &mut Canvas, st: &Street, style: &Style, rng: &mut ChaCha8Rng, t: f32, side: f32) {
    let s = st.unit * t;
    let gy = st.y(t);
    let (edge, outer) = if side < 0.0 {
        (st.road_l, st.walk_l)
    } else {
        (st.road_r, st.walk_r)
    };
    let x = st.x(edge + (outer - edge) * rng.random_range(0.1..0.3), t);
    let height = s * rng.random_range(2.2..3.5);
    let width = s * 0.05;
    let p = Paint {
        color: jitter(rng, style.pole, 0.06),
        texture: Texture::Flat,
        t,
    };
    let p = cv.add_paint(p);
    cv.rect(x - width, gy - height, x + width, gy, Cls::Pole, p);
    let top = gy - height;
    match rng.random_range(0..3) {
        0 => {
            // A traffic light facing the camera.
            let lp = Paint {
                color: jitter(rng, style.light, 0.05),
                texture: Texture::Flat,
                t,
            };
            let lp = cv.add_paint(lp);
            cv.rect(
                x - s * 0.12,
                top,
                x + s * 0.12,
                top + s * 0.55,
                Cls::Light,
                lp,
            );
        }
        1 => {
            let sign = style.sign[rng.random_range(0..style.sign.len())];
            let sp = Paint {
                color: jitter(rng, sign, 0.05),
                texture: Texture::Flat,
                t,
            };
            let sp = cv.add_paint(sp);
            let r = s * rng.random_range(0.15..0.25);
            let cy = top + s * 0.3;
            match rng.random_range(0..3) {
                0 => cv.ellipse(x, cy, r, r, Cls::Sign, sp),
                1 => cv.rect(x - r, cy - r, x + r, cy + r, Cls::Sign, sp),
                _ => cv.triangle(x, cy - r, r * 1.1, r * 1.9, Cls::Sign, sp),
            }
        }
        _ => {}
    }
}

/// The hood of the recording car along the bottom edge (Cityscapes label "ego vehicle").
fn draw_ego(cv: &mut Canvas, rng: &mut ChaCha8Rng) {
    let (w, h) = (cv.w as f32, cv.h as f32);
    let depth = h * rng.random_range(0.05..0.09);
    let p = Paint {
        color: jitter(rng, [40.0, 42.0, 48.0], 0.05),
        texture: Texture::Flat,
        t: 1.0,
    };
    let p = cv.add_paint(p);
    cv.fill((0.0, h - depth, w, h), Cls::Ego, p, |x, y| {
        let u = (x - w / 2.0) / (w / 2.0);
        y >= h - depth * (1.0 - 0.5 * u * u)
    });
}

/// Turns the canvas into colours: textures, light and blur in the target, then the image's
/// degradation.
fn shade(cv: &Canvas, st: &Street, style: &Style, deg: Degradation, salt: u64) -> Vec<u8> {
    let (w, h) = (cv.w, cv.h);
    let mut img = vec![[0f32; 3]; w * h];
    let light_dir = if salt & 1 == 0 { 1.0 } else { -1.0 };
    let gain = 0.85 + 0.3 * ((salt >> 8) & 0xff) as f32 / 255.0;
    let lane_w = st.unit * 0.04;
    let road_c = |t: f32| st.x((st.road_l + st.road_r) / 2.0, t);
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let paint = cv.paints[cv.obj[i] as usize];
            let mut c = paint.color;
            if style.target {
                let (xf, yf) = (x as f32, y as f32);
                let tex = match paint.texture {
                    Texture::Flat => 1.0,
                    Texture::Grain => 0.9 + 0.2 * hash01(x as u32, y as u32, salt ^ 1),
                    Texture::Windows(cw, ch) => {
                        let (fx, fy) = ((xf / cw).fract(), (yf / ch).fract());
                        if (0.25..0.75).contains(&fx) && (0.3..0.8).contains(&fy) {
                            0.55
                        } else {
                            1.0
                        }
                    }
                    Texture::Tiles(size) => {
                        let (fx, fy) = ((xf / size).fract(), (yf / (size * 0.5)).fract());
                        if fx < 0.08 || fy < 0.12 {
                            0.8
                        } else {
                            1.0
                        }
                    }
                    Texture::Leaves(size) => {
                        0.7 + 0.6 * value_noise(xf, yf, size.max(1.0), salt ^ 2)
                    }
                    Texture::SkyGradient => 0.85 + 0.2 * (yf / st.hz.max(1.0)).min(1.0),
                };
                c = c.map(|v| v * tex);
                // Dashed lane markings on the road's centre line.
                if cv.cls[i] == Cls::Road as u8 {
                    let t = st.t_of(yf);
                    let dash = ((1.0 / t.max(0.02)) * 2.0).fract() < 0.5;
                    if dash && (xf - road_c(t)).abs() < lane_w * t + 0.3 {
                        c = [200.0, 200.0, 190.0];
                    }
                }
                let across = light_dir * (xf / w as f32 - 0.5);
                c = c.map(|v| v * gain * (1.0 + 0.25 * across));
            } else {
                // Flat shading with a slight darkening towards the horizon.
                let shade = 1.0 - 0.1 * (1.0 - paint.t.min(1.0));
                c = c.map(|v| v * shade);
            }
            img[i] = c;
        }
    }
    if style.target {
        let radius = (w / 480).max(1);
        img = box_blur(&img, w, h, radius);
        degrade(&mut img, cv, st, deg, salt);
    }
    img.iter()
        .flat_map(|c| c.map(|v| v.round().clamp(0.0, 255.0) as u8))
        .collect()
}

/// A separable box blur (the target camera's optics and compression).
fn box_blur(src: &[[f32; 3]], w: usize, h: usize, r: usize) -> Vec<[f32; 3]> {
    let pass = |src: &[[f32; 3]], horizontal: bool| -> Vec<[f32; 3]> {
        let mut out = vec![[0f32; 3]; w * h];
        for y in 0..h {
            for x in 0..w {
                let mut acc = [0f32; 3];
                let mut n = 0.0;
                let (lo, hi, fixed) = if horizontal { (x, w, y) } else { (y, h, x) };
                for k in lo.saturating_sub(r)..(lo + r + 1).min(hi) {
                    let j = if horizontal {
                        fixed * w + k
                    } else {
                        k * w + fixed
                    };
                    for ch in 0..3 {
                        acc[ch] += src[j][ch];
                    }
                    n += 1.0;
                }
                out[y * w + x] = acc.map(|v| v / n);
            }
        }
        out
    };
    pass(&pass(src, true), false)
}

/// Fog (stronger with distance), darkness, contrast loss and sensor noise.
fn degrade(img: &mut [[f32; 3]], cv: &Canvas, st: &Street, d: Degradation, salt: u64) {
    let w = cv.w;
    let fog_color = [205.0f32, 207.0, 212.0];
    let mean = {
        let sum = img.iter().fold([0f64; 3], |mut a, c| {
            for ch in 0..3 {
                a[ch] += c[ch] as f64;
            }
            a
        });
        sum.map(|v| (v / img.len().max(1) as f64) as f32)
    };
    // Sensor noise, partly fine-grained and partly in blotches a few pixels wide, per channel:
    // it survives a 2x downscale and makes local colour evidence ambiguous.
    let sigma = 80.0 * d.noise;
    let blotch = 3.0 * cv.w as f32 / 320.0;
    let fog_scale = 0.12 * cv.w as f32;
    for (i, c) in img.iter_mut().enumerate() {
        let (x, y) = ((i % w) as u32, (i / w) as u32);
        // Distance proxy: ground pixels by their row, objects by their contact point.
        let paint_t = cv.paints[cv.obj[i] as usize].t;
        let cls = cv.cls[i];
        let t = if cls == Cls::Sky as u8 {
            0.0
        } else if cls == Cls::Road as u8 || cls == Cls::Sidewalk as u8 {
            st.t_of(y as f32 + 0.5)
        } else {
            paint_t
        };
        // Fog comes in banks: its density varies across the image, leaving half-hidden objects.
        let bank = 0.3 + 1.4 * value_noise(x as f32, y as f32, fog_scale, salt ^ 11);
        let fog = (d.fog * bank * (0.15 + 0.55 * (1.0 - t.min(1.0)).powf(1.5))).min(0.7);
        let contrast = 1.0 - 0.35 * d.contrast;
        // Night is uneven: pools of light between dark stretches.
        let pools = 0.3 + 1.4 * value_noise(x as f32, y as f32, fog_scale, salt ^ 13);
        let dark = 1.0 - (0.45 * d.darkness * pools).min(0.8);
        let fine =
            (hash01(x, y, salt ^ 3) + hash01(x, y, salt ^ 4) + hash01(x, y, salt ^ 5) - 1.5) * 2.0;
        for ch in 0..3 {
            let coarse =
                (value_noise(x as f32, y as f32, blotch, salt ^ (7 + ch as u64)) - 0.5) * 3.4;
            let g = 0.5 * fine + coarse;
            let mut v = c[ch] * (1.0 - fog) + fog_color[ch] * fog;
            v = mean[ch] + (v - mean[ch]) * contrast;
            // Night light is bluish.
            v *= dark
                * if ch == 2 {
                    1.0 + 0.15 * d.darkness
                } else {
                    1.0
                };
            c[ch] = v + sigma * g;
        }
    }
}

fn seed_for(seed: u64, domain: Domain, index: usize) -> u64 {
    mix(mix(seed ^ mix(domain.tag())) ^ index as u64)
}

fn create_dir(dir: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))
}

/// The relative image and label paths of target image `i` of a split.
fn target_names(split: &str, i: usize) -> (String, String, String) {
    let cities: &[&str] = if split == "val" {
        &VAL_CITIES
    } else {
        &TRAIN_CITIES
    };
    let city = cities[i % cities.len()];
    let stem = format!("{city}_000000_{i:06}");
    (
        format!("{city}/{stem}_leftImg8bit.png"),
        format!("{city}/{stem}_gtFine_labelIds.png"),
        city.to_string(),
    )
}

struct Job {
    domain: Domain,
    index: usize,
}

/// Writes the source tree under `source_dir` and the target tree (with `difficulty.parquet`)
/// under `target_dir`. `progress(done, total)` is called as images finish; `cancelled()` is
/// polled before each image.
pub fn generate(
    cfg: &SynthConfig,
    source_dir: &Path,
    target_dir: &Path,
    progress: &(dyn Fn(usize, usize) + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<SynthReport, DataError> {
    if cfg.width < 16 || cfg.height < 16 {
        return Err(DataError::Config(format!(
            "synthetic images must be at least 16x16, got {}x{}",
            cfg.width, cfg.height
        )));
    }
    create_dir(&source_dir.join("RGB"))?;
    create_dir(&source_dir.join("GT").join("LABELS"))?;
    for (split, cities) in [("train", &TRAIN_CITIES[..]), ("val", &VAL_CITIES[..])] {
        for city in cities {
            create_dir(&target_dir.join("leftImg8bit").join(split).join(city))?;
            create_dir(&target_dir.join("gtFine").join(split).join(city))?;
        }
    }
    let jobs: Vec<Job> = [
        (Domain::Source, cfg.source_images),
        (Domain::TargetTrain, cfg.target_train),
        (Domain::TargetVal, cfg.target_val),
    ]
    .into_iter()
    .flat_map(|(domain, n)| (0..n).map(move |index| Job { domain, index }))
    .collect();
    let total = jobs.len();
    let done = AtomicUsize::new(0);
    let rows: Vec<Option<(String, String, Degradation)>> = jobs
        .par_iter()
        .map(|job| {
            if cancelled() {
                return Err(DataError::Cancelled);
            }
            let row = write_one(cfg, job, source_dir, target_dir)?;
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            Ok(row)
        })
        .collect::<Result<_, DataError>>()?;

    let rows: Vec<(String, String, Degradation)> = rows.into_iter().flatten().collect();
    let train: Vec<f64> = rows
        .iter()
        .filter(|r| r.0 == "train")
        .map(|r| r.2.difficulty() as f64)
        .collect();
    let mean_difficulty = if train.is_empty() {
        0.0
    } else {
        train.iter().sum::<f64>() / train.len() as f64
    };
    let pick = |f: fn(&Degradation) -> f32| Column::F32(rows.iter().map(|r| f(&r.2)).collect());
    Table::new()
        .with(
            "split",
            Column::Str(rows.iter().map(|r| r.0.clone()).collect()),
        )
        .with(
            "image",
            Column::Str(rows.iter().map(|r| r.1.clone()).collect()),
        )
        .with("difficulty", pick(Degradation::difficulty))
        .with("fog", pick(|d| d.fog))
        .with("darkness", pick(|d| d.darkness))
        .with("noise", pick(|d| d.noise))
        .with("contrast", pick(|d| d.contrast))
        .with("clutter", pick(|d| d.clutter))
        .write_parquet(&target_dir.join("difficulty.parquet"))?;
    Ok(SynthReport {
        source_images: cfg.source_images,
        target_train: cfg.target_train,
        target_val: cfg.target_val,
        mean_difficulty,
    })
}

/// Renders and writes one image and its label; returns the difficulty row of target images.
fn write_one(
    cfg: &SynthConfig,
    job: &Job,
    source_dir: &Path,
    target_dir: &Path,
) -> Result<Option<(String, String, Degradation)>, DataError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed_for(cfg.seed, job.domain, job.index));
    let scene = render(cfg.width, cfg.height, job.domain, &mut rng);
    let (w, h) = (cfg.width, cfg.height);
    match job.domain {
        Domain::Source => {
            let name = format!("{:07}.png", job.index);
            write_rgb_png(&source_dir.join("RGB").join(&name), w, h, &scene.rgb)?;
            // SYNTHIA's 16-bit label: class id, instance id, and an unused zero channel.
            let mut raw = Vec::with_capacity(scene.cls.len() * 6);
            for (&c, &o) in scene.cls.iter().zip(&scene.obj) {
                raw.extend_from_slice(&SYNTHIA_ID[c as usize].to_be_bytes());
                let inst = if c == Cls::Sky as u8 { 0 } else { o };
                raw.extend_from_slice(&inst.to_be_bytes());
                raw.extend_from_slice(&0u16.to_be_bytes());
            }
            let path: PathBuf = source_dir.join("GT").join("LABELS").join(&name);
            write_png(&path, w, h, ColorType::Rgb, BitDepth::Sixteen, &raw)?;
            Ok(None)
        }
        Domain::TargetTrain | Domain::TargetVal => {
            let split = if job.domain == Domain::TargetVal {
                "val"
            } else {
                "train"
            };
            let (image, label, _) = target_names(split, job.index);
            let img_path = join(&target_dir.join("leftImg8bit").join(split), &image);
            write_rgb_png(&img_path, w, h, &scene.rgb)?;
            let ids: Vec<u8> = scene
                .cls
                .iter()
                .map(|&c| CITYSCAPES_ID[c as usize])
                .collect();
            let lab_path = join(&target_dir.join("gtFine").join(split), &label);
            write_label_png(&lab_path, w, h, &ids)?;
            Ok(Some((split.to_string(), image, scene.degradation)))
        }
    }
}

fn join(dir: &Path, rel: &str) -> PathBuf {
    rel.split('/').fold(dir.to_path_buf(), |p, s| p.join(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_contain_the_street_classes() {
        let mut seen = [0usize; 11];
        for i in 0..12 {
            for domain in [Domain::Source, Domain::TargetTrain] {
                let mut rng = ChaCha8Rng::seed_from_u64(seed_for(7, domain, i));
                let s = render(160, 80, domain, &mut rng);
                for &c in &s.cls {
                    seen[c as usize] += 1;
                }
            }
        }
        for (c, n) in seen.iter().enumerate() {
            assert!(*n > 0, "class {c} never drawn");
        }
        // Road, building and sky dominate, as in street scenes.
        let total: usize = seen.iter().sum();
        for c in [Cls::Road, Cls::Building, Cls::Sky] {
            assert!(seen[c as usize] * 20 > total, "{c:?} too rare: {seen:?}");
        }
    }

    #[test]
    fn difficulty_darkens_the_target() {
        let mean_of = |d: Degradation| {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let scene = render(96, 48, Domain::TargetTrain, &mut rng);
            let st = Street {
                w: 96.0,
                h: 48.0,
                hz: 20.0,
                vx: 48.0,
                road_l: 20.0,
                road_r: 70.0,
                walk_l: 5.0,
                walk_r: 90.0,
                unit: 28.0,
            };
            let cv = Canvas {
                w: 96,
                h: 48,
                cls: scene.cls,
                obj: scene.obj,
                paints: vec![Paint {
                    color: [120.0, 120.0, 120.0],
                    texture: Texture::Flat,
                    t: 0.5,
                }],
            };
            let cv = Canvas {
                obj: vec![0; cv.obj.len()],
                ..cv
            };
            let rgb = shade(&cv, &st, &TARGET_STYLE, d, 9);
            rgb.iter().map(|&v| v as f64).sum::<f64>() / rgb.len() as f64
        };
        let clear = mean_of(Degradation::default());
        let dark = mean_of(Degradation {
            darkness: 1.0,
            ..Default::default()
        });
        assert!(dark < clear * 0.6, "clear {clear}, dark {dark}");
    }
}
