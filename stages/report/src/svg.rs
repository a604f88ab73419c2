//! Hand-written SVG charts: line charts, grouped bars, a histogram with a threshold and the
//! pipeline graph. Each is a complete SVG document with a fixed width and height, so that a
//! browser shows it through `<img>` and a reader can save it for a paper.

use std::fmt::Write as _;

/// Ten distinguishable colours for series (models, loss terms).
pub const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#79706e",
];

const FONT: &str = "font-family=\"system-ui, -apple-system, 'Segoe UI', sans-serif\"";

/// Escapes text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn open(width: f64, height: f64) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" {FONT} font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    )
}

/// Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
pub fn ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    // Whole multiples of the step, from the last at or below `lo` to the first at or above `hi`
    // (counted, not accumulated, so that rounding cannot drop the end).
    let first = (lo / step).floor() as i64;
    let last = ((hi / step).ceil() as i64).max(first).min(first + 99);
    let v = (first..=last).map(|k| k as f64 * step).collect();
    (v, step)
}

/// One tick of a horizontal axis whose line runs at `y`: a short mark and its label below.
fn x_tick(s: &mut String, x: f64, y: f64, label: &str) {
    let _ = writeln!(
        s,
        "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{y:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>\
         <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{label}</text>",
        y + 4.0,
        y + 17.0,
    );
}

/// A tick label with as many decimals as the step needs, or scientific notation for tiny
/// values (learning rates).
pub fn tick_label(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v.abs() < 1e-3 || v.abs() >= 1e6 {
        return format!("{v:.1e}");
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// One line of a [`line_chart`].
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: String,
    /// Drawn thin and light (raw values under a smoothed line).
    pub faint: bool,
    /// Draw a dot at every point (few points, e.g. snapshot evaluations).
    pub dots: bool,
}

/// A line chart of one or more series on shared axes.
pub struct LineChart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series>,
    pub width: f64,
    pub height: f64,
}

/// Renders a [`LineChart`]; NaN points break a line instead of drawing it to zero.
pub fn line_chart(c: &LineChart<'_>) -> String {
    let (ml, mr, mt, mb) = (64.0, 16.0, 30.0, 44.0);
    let legend_rows = c.series.iter().filter(|s| !s.faint).count();
    let legend_h = if legend_rows > 1 { 18.0 } else { 0.0 };
    let (w, h) = (c.width, c.height);
    let pw = w - ml - mr;
    let ph = h - mt - mb - legend_h;
    let finite = c
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in finite {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let mut s = open(w, h);
    let _ = writeln!(
        s,
        "<text x=\"{ml}\" y=\"18\" font-weight=\"600\" font-size=\"13\">{}</text>",
        esc(c.title)
    );
    if x0 > x1 {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#777\">no data</text></svg>",
            w / 2.0,
            h / 2.0
        );
        return s;
    }
    if x1 - x0 < 1e-12 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    if y1 - y0 < 1e-12 * y1.abs().max(1.0) {
        let pad = (y1.abs() * 0.1).max(1e-9);
        y0 -= pad;
        y1 += pad;
    }
    let (yt, ystep) = ticks(y0, y1, 5);
    let (xt, xstep) = ticks(x0, x1, 6);
    let (ya, yb) = (yt[0].min(y0), yt.last().copied().unwrap_or(y1).max(y1));
    let (xa, xb) = (x0, x1);
    let px = |x: f64| ml + (x - xa) / (xb - xa) * pw;
    let py = |y: f64| mt + ph - (y - ya) / (yb - ya) * ph;
    for &t in &yt {
        if t < ya - 1e-12 || t > yb + 1e-12 {
            continue;
        }
        let y = py(t);
        let _ = writeln!(
            s,
            "<line x1=\"{ml}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{}</text>",
            ml + pw,
            ml - 6.0,
            y + 4.0,
            tick_label(t, ystep)
        );
    }
    for &t in &xt {
        if t < xa - 1e-9 || t > xb + 1e-9 {
            continue;
        }
        let x = px(t);
        x_tick(&mut s, x, mt + ph, &tick_label(t, xstep));
    }
    let _ = writeln!(
        s,
        "<rect x=\"{ml}\" y=\"{mt}\" width=\"{pw:.1}\" height=\"{ph:.1}\" fill=\"none\" \
         stroke=\"#999\"/>"
    );
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#333\">{}</text>",
        ml + pw / 2.0,
        mt + ph + 34.0,
        esc(c.x_label)
    );
    let _ = writeln!(
        s,
        "<text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\" \
         fill=\"#333\">{}</text>",
        mt + ph / 2.0,
        esc(c.y_label)
    );
    for se in &c.series {
        let mut d = String::new();
        let mut pen_down = false;
        for &(x, y) in &se.points {
            if !(x.is_finite() && y.is_finite()) {
                pen_down = false;
                continue;
            }
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if pen_down { "L" } else { "M" },
                px(x),
                py(y)
            );
            pen_down = true;
        }
        let (width, opacity) = if se.faint { (1.0, 0.3) } else { (1.8, 1.0) };
        let _ = writeln!(
            s,
            "<path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{width}\" \
             stroke-opacity=\"{opacity}\" stroke-linejoin=\"round\"/>",
            d.trim_end(),
            se.color
        );
        if se.dots {
            for &(x, y) in se
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
            {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                    px(x),
                    py(y),
                    se.color
                );
            }
        }
    }
    if legend_rows > 1 {
        let mut x = ml;
        let y = h - 8.0;
        for se in c.series.iter().filter(|s| !s.faint) {
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"4\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{y:.1}\" fill=\"#333\">{}</text>",
                y - 6.0,
                se.color,
                x + 16.0,
                esc(&se.name)
            );
            x += 28.0 + 7.0 * se.name.chars().count() as f64;
        }
    }
    s.push_str("</svg>\n");
    s
}

/// What a bar of [`grouped_bars`] is a mean of: its standard deviation (an error bar of
/// ± one std) and the values it averages (points), per category.
#[derive(Debug, Clone, Default)]
pub struct BarSpread {
    pub std: Vec<f64>,
    pub points: Vec<Vec<f64>>,
}

/// Grouped bars: for each category (class) one bar per group (model), values in `values[group]
/// [category]`; NaN draws no bar (the class is absent from the evaluation). `spread[group]`,
/// where given, adds an error bar and the individual values (per-seed points) to its bars.
pub fn grouped_bars(
    title: &str,
    y_label: &str,
    categories: &[String],
    groups: &[String],
    values: &[Vec<f64>],
    spread: &[BarSpread],
) -> String {
    let (ml, mr, mt, mb) = (54.0, 16.0, 30.0, 96.0);
    let bar = 9.0f64.min(60.0 / groups.len().max(1) as f64).max(3.0);
    let slot = bar * groups.len().max(1) as f64 + 10.0;
    let pw = (slot * categories.len().max(1) as f64).max(420.0);
    let w = ml + pw + mr;
    let ph = 220.0;
    let h = mt + ph + mb;
    let tops = spread.iter().enumerate().flat_map(|(g, sp)| {
        let means = values.get(g);
        let bars = sp
            .std
            .iter()
            .enumerate()
            .map(move |(c, sd)| means.and_then(|m| m.get(c)).copied().unwrap_or(f64::NAN) + sd);
        bars.chain(sp.points.iter().flatten().copied())
    });
    let vmax = values
        .iter()
        .flatten()
        .copied()
        .chain(tops)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let top = if vmax <= 0.0 { 1.0 } else { vmax };
    let (yt, step) = ticks(0.0, top, 5);
    let ymax = yt.last().copied().unwrap_or(top).max(top);
    let py = |v: f64| mt + ph - v / ymax * ph;
    let mut s = open(w, h);
    let _ = writeln!(
        s,
        "<text x=\"{ml}\" y=\"18\" font-weight=\"600\" font-size=\"13\">{}</text>",
        esc(title)
    );
    for &t in &yt {
        let y = py(t);
        let _ = writeln!(
            s,
            "<line x1=\"{ml}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{}</text>",
            ml + pw,
            ml - 6.0,
            y + 4.0,
            tick_label(t, step)
        );
    }
    let _ = writeln!(
        s,
        "<text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\" \
         fill=\"#333\">{}</text>",
        mt + ph / 2.0,
        esc(y_label)
    );
    let slot = pw / categories.len().max(1) as f64;
    for (c, name) in categories.iter().enumerate() {
        let x0 = ml + c as f64 * slot + (slot - bar * groups.len() as f64) / 2.0;
        for (g, vals) in values.iter().enumerate() {
            let v = vals.get(c).copied().unwrap_or(f64::NAN);
            if !v.is_finite() {
                continue;
            }
            let y = py(v.max(0.0));
            let _ = writeln!(
                s,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                x0 + g as f64 * bar,
                bar - 1.0,
                mt + ph - y,
                PALETTE[g % PALETTE.len()]
            );
            let Some(sp) = spread.get(g) else {
                continue;
            };
            let cx = x0 + g as f64 * bar + (bar - 1.0) / 2.0;
            if let Some(sd) = sp.std.get(c).copied().filter(|sd| sd.is_finite()) {
                let (lo, hi) = (py((v - sd).max(0.0)), py(v + sd));
                let cap = (bar / 2.0 - 0.5).max(1.0);
                let _ = writeln!(
                    s,
                    "<path d=\"M{cx:.1} {lo:.1}V{hi:.1}M{:.1} {hi:.1}H{:.1}M{:.1} {lo:.1}H{:.1}\" \
                     stroke=\"#222\" stroke-width=\"1\"/>",
                    cx - cap,
                    cx + cap,
                    cx - cap,
                    cx + cap
                );
            }
            for p in sp
                .points
                .iter()
                .filter_map(|run| run.get(c))
                .filter(|p| p.is_finite())
            {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{cx:.1}\" cy=\"{:.1}\" r=\"1.8\" fill=\"#222\" \
                     fill-opacity=\"0.7\"/>",
                    py(p.max(0.0))
                );
            }
        }
        let cx = ml + (c as f64 + 0.5) * slot;
        let _ = writeln!(
            s,
            "<text transform=\"translate({cx:.1} {:.1}) rotate(-45)\" text-anchor=\"end\" \
             fill=\"#333\">{}</text>",
            mt + ph + 14.0,
            esc(name)
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{ml}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>",
        ml + pw,
        mt + ph,
        mt + ph
    );
    let mut x = ml;
    for (g, name) in groups.iter().enumerate() {
        let _ = writeln!(
            s,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#333\">{}</text>",
            h - 18.0,
            PALETTE[g % PALETTE.len()],
            x + 14.0,
            h - 9.0,
            esc(name)
        );
        x += 30.0 + 7.0 * name.chars().count() as f64;
    }
    s.push_str("</svg>\n");
    s
}

/// A histogram of `values` with a vertical line at `threshold` (when given); bins left of it are
/// drawn in the first colour, the rest in the second.
pub fn histogram(
    title: &str,
    x_label: &str,
    values: &[f64],
    threshold: Option<(f64, String)>,
) -> String {
    let (w, h) = (640.0, 260.0);
    let (ml, mr, mt, mb) = (48.0, 16.0, 30.0, 44.0);
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let mut s = open(w, h);
    let _ = writeln!(
        s,
        "<text x=\"{ml}\" y=\"18\" font-weight=\"600\" font-size=\"13\">{}</text>",
        esc(title)
    );
    if finite.is_empty() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#777\">no data</text></svg>",
            w / 2.0,
            h / 2.0
        );
        return s;
    }
    let mut lo = finite.iter().copied().fold(f64::MAX, f64::min);
    let mut hi = finite.iter().copied().fold(f64::MIN, f64::max);
    if let Some((t, _)) = &threshold {
        lo = lo.min(*t);
        hi = hi.max(*t);
    }
    if hi - lo < 1e-12 {
        lo -= 0.5 * lo.abs().max(1e-3);
        hi += 0.5 * hi.abs().max(1e-3);
    }
    let bins = ((finite.len() as f64).sqrt().round() as usize).clamp(5, 40);
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for v in &finite {
        let b = (((v - lo) / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let cmax = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let (yt, ystep) = ticks(0.0, cmax, 4);
    let ymax = yt.last().copied().unwrap_or(cmax).max(cmax);
    let px = |x: f64| ml + (x - lo) / (hi - lo) * pw;
    let py = |c: f64| mt + ph - c / ymax * ph;
    for &t in &yt {
        let y = py(t);
        let _ = writeln!(
            s,
            "<line x1=\"{ml}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{}</text>",
            ml + pw,
            ml - 6.0,
            y + 4.0,
            tick_label(t, ystep.max(1.0))
        );
    }
    for (b, &c) in counts.iter().enumerate() {
        let x = px(lo + b as f64 * width);
        let mid = lo + (b as f64 + 0.5) * width;
        let color = match &threshold {
            Some((t, _)) if mid > *t => PALETTE[1],
            _ => PALETTE[0],
        };
        let y = py(c as f64);
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>",
            x + 0.5,
            (pw / bins as f64 - 1.0).max(0.5),
            mt + ph - y
        );
    }
    let (xt, xstep) = ticks(lo, hi, 6);
    for &t in xt.iter().filter(|t| **t >= lo - 1e-12 && **t <= hi + 1e-12) {
        let x = px(t);
        x_tick(&mut s, x, mt + ph, &tick_label(t, xstep));
    }
    let _ = writeln!(
        s,
        "<line x1=\"{ml}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/>",
        ml + pw,
        mt + ph,
        mt + ph
    );
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#333\">{}</text>",
        ml + pw / 2.0,
        h - 8.0,
        esc(x_label)
    );
    if let Some((t, label)) = &threshold {
        let x = px(*t);
        let anchor = if x > ml + pw * 0.7 { "end" } else { "start" };
        let dx = if anchor == "end" { -4.0 } else { 4.0 };
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{mt}\" y2=\"{:.1}\" stroke=\"#222\" \
             stroke-width=\"1.5\" stroke-dasharray=\"5 3\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" fill=\"#222\">{}</text>",
            mt + ph,
            x + dx,
            mt + 12.0,
            esc(label)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A node of [`dag_diagram`].
pub struct Node {
    pub name: String,
    /// Second line, e.g. `adapt · 144.2 s`.
    pub detail: String,
    pub fill: &'static str,
    pub stroke: &'static str,
    /// Indices of upstream nodes.
    pub upstream: Vec<usize>,
}

/// The pipeline graph, left to right: a node's column is the length of the longest path from a
/// source to it; within a column nodes follow the mean row of their upstream nodes, which keeps
/// most edges short and uncrossed.
pub fn dag_diagram(nodes: &[Node]) -> String {
    let n = nodes.len();
    let mut layer = vec![0usize; n];
    // Nodes come in topological order, so one pass settles every layer.
    for i in 0..n {
        layer[i] = nodes[i]
            .upstream
            .iter()
            .filter(|&&u| u < i)
            .map(|&u| layer[u] + 1)
            .max()
            .unwrap_or(0);
    }
    let layers = layer.iter().copied().max().map_or(0, |m| m + 1);
    let mut row = vec![0f64; n];
    let mut columns: Vec<Vec<usize>> = vec![Vec::new(); layers];
    for (l, column) in columns.iter_mut().enumerate() {
        let mut members: Vec<(f64, usize)> = (0..n)
            .filter(|&i| layer[i] == l)
            .map(|i| {
                let ups: Vec<f64> = nodes[i].upstream.iter().map(|&u| row[u]).collect();
                let key = if ups.is_empty() {
                    i as f64
                } else {
                    ups.iter().sum::<f64>() / ups.len() as f64
                };
                (key, i)
            })
            .collect();
        members.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (r, &(_, i)) in members.iter().enumerate() {
            row[i] = r as f64;
        }
        *column = members.into_iter().map(|(_, i)| i).collect();
    }
    let (bw, bh, gx, gy, m) = (150.0, 44.0, 46.0, 14.0, 12.0);
    let rows = columns.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let w = m * 2.0 + layers.max(1) as f64 * (bw + gx) - gx;
    let h = m * 2.0 + rows as f64 * (bh + gy) - gy;
    let pos = |i: usize| {
        let col = &columns[layer[i]];
        // Short columns are centred vertically.
        let off = (rows - col.len()) as f64 * (bh + gy) / 2.0;
        (
            m + layer[i] as f64 * (bw + gx),
            m + off + row[i] * (bh + gy),
        )
    };
    let mut s = open(w, h);
    s.push_str(
        "<defs><marker id=\"arrow\" viewBox=\"0 0 8 8\" refX=\"8\" refY=\"4\" markerWidth=\"7\" \
         markerHeight=\"7\" orient=\"auto\"><path d=\"M0,0 L8,4 L0,8 z\" fill=\"#777\"/>\
         </marker></defs>\n",
    );
    for (i, node) in nodes.iter().enumerate() {
        for &u in &node.upstream {
            let (ux, uy) = pos(u);
            let (vx, vy) = pos(i);
            let (x1, y1, x2, y2) = (ux + bw, uy + bh / 2.0, vx, vy + bh / 2.0);
            let mx = (x1 + x2) / 2.0;
            let _ = writeln!(
                s,
                "<path d=\"M{x1:.1},{y1:.1} C{mx:.1},{y1:.1} {mx:.1},{y2:.1} {x2:.1},{y2:.1}\" \
                 fill=\"none\" stroke=\"#999\" stroke-width=\"1.2\" marker-end=\"url(#arrow)\"/>"
            );
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let (x, y) = pos(i);
        let _ = writeln!(
            s,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw}\" height=\"{bh}\" rx=\"6\" \
             fill=\"{}\" stroke=\"{}\" stroke-width=\"1.5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-weight=\"600\">{}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" \
             fill=\"#333\">{}</text>",
            node.fill,
            node.stroke,
            x + bw / 2.0,
            y + 18.0,
            esc(&node.name),
            x + bw / 2.0,
            y + 34.0,
            esc(&node.detail)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (t, step) = ticks(0.13, 0.87, 5);
        assert_eq!(step, 0.2);
        assert!(t[0] <= 0.13 && *t.last().unwrap() >= 0.87, "{t:?}");
        assert_eq!(tick_label(0.4, 0.2), "0.4");
        assert_eq!(tick_label(2.5e-4, 1e-4), "2.5e-4");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
    }

    #[test]
    fn charts_are_complete_svg_documents() {
        let line = line_chart(&LineChart {
            title: "a <b>",
            x_label: "iteration",
            y_label: "loss",
            series: vec![Series {
                name: "seg".into(),
                points: vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 0.5)],
                color: PALETTE[0].into(),
                faint: false,
                dots: true,
            }],
            width: 400.0,
            height: 200.0,
        });
        let bars = grouped_bars(
            "iou",
            "IoU",
            &["road".into(), "sky".into()],
            &["a".into(), "b".into()],
            &[vec![50.0, f64::NAN], vec![60.0, 10.0]],
            &[],
        );
        // Means over seeds: an error bar and a point per seed where the value is defined.
        let spread = [
            BarSpread {
                std: vec![4.0, f64::NAN],
                points: vec![vec![46.0, f64::NAN], vec![54.0, f64::NAN]],
            },
            BarSpread {
                std: vec![2.0, 1.0],
                points: vec![vec![58.0, 9.0], vec![62.0, 11.0]],
            },
        ];
        let with_spread = grouped_bars(
            "iou",
            "IoU",
            &["road".into(), "sky".into()],
            &["a".into(), "b".into()],
            &[vec![50.0, f64::NAN], vec![60.0, 10.0]],
            &spread,
        );
        assert_eq!(with_spread.matches("<circle").count(), 6, "{with_spread}");
        assert_eq!(with_spread.matches("stroke=\"#222\"").count(), 3);
        assert!(!with_spread.contains("NaN"), "{with_spread}");
        let hist = histogram("h", "score", &[0.1, 0.2, 0.3], Some((0.25, "split".into())));
        let graph = dag_diagram(&[
            Node {
                name: "a".into(),
                detail: "x".into(),
                fill: "#fff",
                stroke: "#000",
                upstream: vec![],
            },
            Node {
                name: "b".into(),
                detail: "y".into(),
                fill: "#fff",
                stroke: "#000",
                upstream: vec![0],
            },
        ]);
        for svg in [&line, &bars, &hist, &graph] {
            assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\" width="));
            assert!(svg.trim_end().ends_with("</svg>"));
            assert!(!svg.contains("NaN"), "{svg}");
        }
        assert!(line.contains("a &lt;b&gt;"));
        // The NaN point splits the line into two moves.
        assert_eq!(line.matches('M').count(), 2, "{line}");
    }
}
