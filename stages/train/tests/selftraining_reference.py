"""NumPy reference of dag's self-training pieces (stages/train/tests/selftraining_reference.rs).

Reads the cases the Rust test wrote (inputs, the random draws and dag's outputs), recomputes each
output here from the inputs and draws alone, and exits non-zero on the first disagreement. The
formulas follow the reference code: DACS (utils/transformsgpu.py, trainUDA.py), DAFormer
(mmseg/models/utils/dacs_transforms.py), MIC (masking_transforms.py) and kornia's ColorJitter and
GaussianBlur2d.
"""
import json
import math
import sys

import numpy as np


def close(name, ours, theirs, atol):
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    if ours.shape != theirs.shape:
        sys.exit(f"{name}: shape {ours.shape} != {theirs.shape}")
    err = np.max(np.abs(ours - theirs)) if ours.size else 0.0
    if not err <= atol:
        sys.exit(f"{name}: max abs difference {err} > {atol}")


def same(name, ours, theirs):
    if not np.array_equal(np.asarray(ours), np.asarray(theirs)):
        sys.exit(f"{name}: differs\n dag:   {np.asarray(ours).ravel()[:40]}\n numpy: {np.asarray(theirs).ravel()[:40]}")


def check_pseudo(c):
    x = np.asarray(c["logits"], dtype=np.float64).reshape(c["shape"])
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    same("pseudo labels", c["labels"], p.argmax(axis=1).ravel())
    close("confidence", c["confidence"], p.max(axis=1).ravel(), 1e-6)
    weight = np.mean(p.max(axis=1) >= c["threshold"])
    close("confidence weight", c["weight"], weight, 1e-7)
    print("ok pseudo")


def check_classmix(c):
    n, h, w = c["shape"]
    ys = np.asarray(c["source_labels"]).reshape(n, h, w)
    yt = np.asarray(c["pseudo"]).reshape(n, h, w)
    xs = np.asarray(c["xs"], dtype=np.float64).reshape(n, 3, h, w)
    xt = np.asarray(c["xt"], dtype=np.float64).reshape(n, 3, h, w)
    top, bottom = c["crop"]
    tw = np.full((n, h, w), c["target_weight"])
    tw[:, :top, :] = 0
    tw[:, h - bottom:, :] = 0
    masks, mixed, labels, weights = [], [], [], []
    for i in range(n):
        # DACS: torch.unique(labels[i]); DAFormer: torch.unique(labels) of the whole batch. The
        # ignore label is a candidate in both.
        candidates = np.unique(ys if c["per_batch"] else ys[i])
        picked = np.asarray(c["classes"][i])
        if len(picked) != (len(candidates) + len(candidates) % 2) // 2:
            sys.exit(f"classmix: {len(picked)} classes picked of {len(candidates)}")
        if not np.all(np.isin(picked, candidates)) or len(np.unique(picked)) != len(picked):
            sys.exit(f"classmix: picked {picked} is not a subset of {candidates}")
        m = np.isin(ys[i], picked)
        masks.append(m)
        mixed.append(m[None] * xs[i] + (1 - m[None]) * xt[i])
        labels.append(np.where(m, ys[i], yt[i]))
        weights.append(m * 1.0 + (1 - m) * tw[i])
    same("classmix mask", c["mask"], np.asarray(masks).ravel())
    close("classmix image", c["mixed"], np.asarray(mixed).ravel(), 0)
    same("classmix labels", c["labels"], np.asarray(labels).ravel())
    close("classmix weights", c["weights"], np.asarray(weights).ravel(), 1e-7)
    print("ok classmix", "per_batch" if c["per_batch"] else "per_image")


def check_mic(c):
    h, w = c["shape"]
    b = c["block"]
    gh, gw = round(h / b), round(w / b)  # Python's round, as MIC's code
    u = np.asarray(c["draws"]).reshape(gh, gw)
    keep = u > c["ratio"]
    rows = (np.arange(h) * gh) // h
    cols = (np.arange(w) * gw) // w
    same("mic mask", c["mask"], keep[rows][:, cols].ravel())
    print("ok mic")


def check_cross_entropy(c):
    n, k, h, w = c["shape"]
    x = np.asarray(c["logits"], dtype=np.float64).reshape(n, k, h, w)
    y = np.asarray(c["labels"]).reshape(n, h, w)
    wt = np.asarray(c["weights"]).reshape(n, h, w)
    logp = x - x.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    valid = y != 255
    picked = np.take_along_axis(logp, np.where(valid, y, 0)[:, None], axis=1)[:, 0]
    ce = np.where(valid, -picked, 0.0)
    # reduction 'none', then the mean over every pixel, ignored ones included
    close("weighted cross-entropy", c["value"], np.mean(wt * ce), 1e-5)
    print("ok cross_entropy")


def check_ema(c):
    a = c["alpha"]
    close("alpha", a, min(1 - 1 / 10, 0.7), 1e-12)
    close("alpha at 0", c["alpha_0"], 0.0, 0)
    close("alpha at 1", c["alpha_1"], 0.5, 0)
    close("alpha at 1000", c["alpha_1000"], 0.99, 0)
    teacher, student, after = c["teacher"], c["student"], c["after"]
    buffers = 0
    for path, t in teacher.items():
        t = np.asarray(t, dtype=np.float64)
        s = np.asarray(student[path], dtype=np.float64)
        if path.endswith("running_mean") or path.endswith("running_var"):
            buffers += 1
            # Only parameters are averaged (`parameters()`), never BatchNorm statistics.
            close(f"ema buffer {path}", after[path], t, 0)
            if np.array_equal(t, s):
                sys.exit(f"{path}: the student's statistics moved the teacher's")
        else:
            close(f"ema {path}", after[path], a * t + (1 - a) * s, 2e-6)
    if buffers == 0:
        sys.exit("ema: no BatchNorm statistics found")
    print("ok ema")


def rgb_to_hsv(img):
    """kornia 0.5.8 rgb_to_hsv on [3, H, W]; hue in radians."""
    r, g, b = img
    maxc = img.max(axis=0)
    argmax = img.argmax(axis=0)  # first maximum: R, then G, then B
    minc = img.min(axis=0)
    v = maxc
    delta = maxc - minc
    s = delta / (v + 1e-6)
    delta = np.where(delta == 0, 1.0, delta)
    rc, gc, bc = maxc - r, maxc - g, maxc - b
    h = np.stack([bc - gc, 2.0 * delta + rc - bc, 4.0 * delta + gc - rc])
    h = np.take_along_axis(h, argmax[None], axis=0)[0]
    h = np.mod(h / delta / 6.0, 1.0)
    return 2 * math.pi * h, s, v


def hsv_to_rgb(h, s, v):
    """kornia 0.5.8 hsv_to_rgb; hue in radians, any sign."""
    h = h / (2 * math.pi)
    hi = np.mod(np.floor(h * 6), 6).astype(int)
    f = np.mod(h * 6, 6) - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    table = np.stack([
        np.stack([v, q, p, p, t, v]),
        np.stack([t, v, v, q, p, p]),
        np.stack([p, p, t, v, v, q]),
    ])  # [channel, sector, H, W]
    return np.take_along_axis(table, np.broadcast_to(hi, (3, 1) + hi.shape), axis=1)[:, 0]


def jitter(img, d):
    for op in d["order"]:
        if op == 0:
            img = np.clip(img + (d["brightness"] - 1), 0, 1)
        elif op == 1:
            img = np.clip(img * d["contrast"], 0, 1)
        elif op == 2:
            h, s, v = rgb_to_hsv(img)
            img = hsv_to_rgb(h, np.clip(s * d["saturation"], 0, 1), v)
        else:
            h, s, v = rgb_to_hsv(img)
            img = hsv_to_rgb(np.fmod(h + 2 * math.pi * d["hue"], 2 * math.pi), s, v)
    return img


def kernel_size(side):
    c = math.ceil(0.1 * side)
    return c if c % 2 == 1 else c - 1


def gaussian(size, sigma):
    x = np.arange(size) - size // 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def blur(img, sigma):
    """kornia GaussianBlur2d: reflect padding, the full 2-D kernel, one channel at a time."""
    _, h, w = img.shape
    ky, kx = kernel_size(h), kernel_size(w)
    k2 = np.outer(gaussian(ky, sigma), gaussian(kx, sigma))
    padded = np.pad(img, ((0, 0), (ky // 2, ky // 2), (kx // 2, kx // 2)), mode="reflect")
    out = np.zeros_like(img)
    for dy in range(ky):
        for dx in range(kx):
            out += k2[dy, dx] * padded[:, dy:dy + h, dx:dx + w]
    return out


def strong(img, mean, d, sigma):
    """DACS's colorJitter then gaussian_blur on one normalised image, channels as stored."""
    if d is not None:
        x = (img + mean[:, None, None]) / 255
        img = jitter(x, d) * 255 - mean[:, None, None]
    if sigma is not None:
        img = blur(img, sigma)
    return img


def check_augment(c):
    h, w = c["shape"]
    mean = np.asarray(c["mean_bgr"], dtype=np.float64)
    img = np.asarray(c["image"], dtype=np.float64).reshape(3, h, w)
    d = c["jitter"]
    if sorted(d["order"]) != [0, 1, 2, 3]:
        sys.exit(f"jitter order {d['order']} is not a permutation")
    for name, lo, hi in [("brightness", 0.75, 1.25), ("contrast", 0.75, 1.25),
                         ("saturation", 0.75, 1.25), ("hue", -0.25, 0.25)]:
        if not lo <= d[name] <= hi:
            sys.exit(f"jitter {name} {d[name]} outside [{lo}, {hi}]")
    # Tolerances in 8-bit levels: float32 against float64, and the HSV round trip.
    close("jitter", c["jittered"], strong(img, mean, d, None).ravel(), 2e-3)
    print("ok jitter")
    close("blur", c["blurred"], strong(img, mean, None, c["sigma"]).ravel(), 2e-3)
    close("jitter+blur", c["both"], strong(img, mean, d, c["sigma"]).ravel(), 3e-3)
    print("ok blur")
    before = np.asarray(c["batch_before"], dtype=np.float64).reshape(2, 3, h, w)
    expected = [strong(before[i], mean, dr["jitter"], dr["sigma"]) for i, dr in enumerate(c["batch_draws"])]
    close("batch augmentation", c["batch_after"], np.asarray(expected).ravel(), 3e-3)
    print("ok batch")
    draws = c["mic_batch_draws"]
    if len({json.dumps(d["jitter"]["order"]) for d in draws}) != 1 or len({d["sigma"] for d in draws}) != 1:
        sys.exit("mic batch: one order and one sigma for the whole batch expected")
    expected = [strong(before[i], mean, dr["jitter"], dr["sigma"]) for i, dr in enumerate(draws)]
    close("mic batch augmentation", c["mic_batch_after"], np.asarray(expected).ravel(), 3e-3)
    print("ok mic_batch")


def check_rcs(c):
    """DAFormer's uda_dataset.py: f_c = n_c / sum n over every image; P = softmax((1 - f) / T)
    over the classes; an image is drawn for c among those with more than min_pixels of it."""
    totals, holders = {}, {}
    for i, image in enumerate(c["counts"]):
        for cls, n in image:
            if cls == 255:
                continue
            totals[cls] = totals.get(cls, 0.0) + n
            if n > c["min_pixels"]:
                holders.setdefault(cls, []).append(i)
    classes = sorted(k for k in totals if k in holders)
    freq = np.array([totals[k] for k in classes]) / sum(totals.values())
    logits = (1 - freq) / c["temperature"]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    same("rcs classes", c["classes"], classes)
    close("rcs probabilities", c["probabilities"], p, 1e-12)
    for k, imgs in zip(classes, c["images"]):
        same(f"rcs images of class {k}", imgs, holders[k])
    print("ok rcs")


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def warp(x, affines):
    """torch.nn.functional.grid_sample(x, affine_grid(A, x.shape), padding_mode="zeros") with
    align_corners=False, as TUFL's perform_affine_tf (bilinear)."""
    n, k, h, w = x.shape
    out = np.zeros_like(x)
    gx, gy = np.meshgrid((2 * np.arange(w) + 1) / w - 1, (2 * np.arange(h) + 1) / h - 1)
    for i in range(n):
        a = np.asarray(affines[i], dtype=np.float64)
        sx = a[0] * gx + a[1] * gy + a[2]
        sy = a[3] * gx + a[4] * gy + a[5]
        ix = ((sx + 1) * w - 1) / 2
        iy = ((sy + 1) * h - 1) / 2
        x0, y0 = np.floor(ix), np.floor(iy)
        tx, ty = ix - x0, iy - y0
        for dx, dy, wt in [(0, 0, (1 - tx) * (1 - ty)), (1, 0, tx * (1 - ty)),
                           (0, 1, (1 - tx) * ty), (1, 1, tx * ty)]:
            cx, cy = x0 + dx, y0 + dy
            inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
            cxi = np.clip(cx, 0, w - 1).astype(int)
            cyi = np.clip(cy, 0, h - 1).astype(int)
            out[i] += np.where(inside, wt, 0.0)[None] * x[i][:, cyi, cxi]
    return out


def check_affine_draws(affines):
    # random_affine: [[cos(a) s, -sin(a + sh) s, 0], [sin(a) s, cos(a + sh) s, 0]], top row
    # negated on a flip; rotation within 30 degrees, shear within 5, scale in [0.8, 1.2].
    for a in affines:
        a = np.asarray(a, dtype=np.float64)
        flip = np.sign(a[0])
        scale = math.hypot(a[0], a[3])
        angle = math.degrees(math.atan2(a[3], abs(a[0])))
        both = math.degrees(math.atan2(-a[1] * flip, a[4]))
        if not (0.8 - 1e-6 <= scale <= 1.2 + 1e-6 and abs(angle) <= 30 + 1e-4
                and abs(both - angle) <= 5 + 1e-4 and a[2] == 0 and a[5] == 0
                and abs(math.hypot(a[1], a[4]) - scale) < 1e-5):
            sys.exit(f"affine draw outside TUFL's ranges: {a}")


def tufl_loss(weak, strong, pbar, labels, kept, cw, form):
    """TUFL's AdaptUnsupFocalLoss (form 'adaptive', focal_type 1) or UnsupFocalLoss ('fixed',
    focal_type 2) on pre-warp weak logits, with the pseudo-labels and the kept pixels fixed."""
    p = softmax(weak)
    q = softmax(strong)
    k = p.shape[1]
    one_hot = np.eye(k)[labels].transpose(0, 3, 1, 2)
    q_y = (q * one_hot).sum(axis=1, keepdims=True)
    if form == "adaptive":
        diff = 1.0 - q_y
    else:
        diff = (pbar * one_hot).sum(axis=1, keepdims=True) - q_y
    kl = pbar * (np.log(pbar + 1e-30) - np.abs(diff) ** 2 * np.log(q + 1e-30))
    ent = -p * np.log(p + 1e-30)
    loss = ((kl + ent) * np.asarray(cw)[None, :, None, None]).sum(axis=1)
    return np.maximum(loss, 1e-8)[kept].mean()


def check_tufl(c):
    n, k, h, w = c["shape"]
    affines = c["affines"]
    check_affine_draws(affines)
    image = np.asarray(c["image"], dtype=np.float64).reshape(n, 3, h, w)
    close("warped image", c["warped_image"], warp(image, affines).ravel(), 1e-2)
    weak = np.asarray(c["weak"], dtype=np.float64).reshape(n, k, h, w)
    strong = np.asarray(c["strong"], dtype=np.float64).reshape(n, k, h, w)
    warped = warp(weak, affines)
    close("warped logits", c["warped"], warped.ravel(), 1e-4)
    print("ok warp")

    pbar = softmax(warped)
    labels = np.asarray(c["labels"]).reshape(n, h, w)
    conf = np.asarray(c["confidence"], dtype=np.float32)
    same("weak labels", labels.ravel(), pbar.argmax(axis=1).ravel())
    close("weak confidence", conf, pbar.max(axis=1).ravel(), 1e-5)
    # AdaptUnsupFocalLoss.ias_thresh, then the EMA with beta 0.9 and the cap at 0.999.
    theta = np.asarray(c["thresholds_before"], dtype=np.float64)
    quantile = theta.copy()
    flat_labels = labels.ravel()
    for cls in range(k):
        picked = conf[flat_labels == cls]
        if len(picked):
            ext = np.concatenate([picked, np.asarray([theta[cls]], dtype=np.float32)])
            ext = -np.sort(-ext)
            quantile[cls] = ext[int(len(ext) * 0.8 * theta[cls] ** 8.0)]
    theta = 0.9 * theta + (1 - 0.9) * quantile
    theta[theta >= 1] = 0.999
    close("adaptive thresholds", c["thresholds_after"], theta, 1e-12)
    print("ok thresholds")

    for form in ["adaptive", "fixed"]:
        f = c["focal"][form]
        if form == "adaptive":
            kept = conf.astype(np.float64) > theta[flat_labels]
        else:
            kept = conf > np.float32(0.5)
        same(f"kept pixels ({form})", f["kept"], kept)
        kept = kept.reshape(n, h, w)
        fn = lambda wk, st: tufl_loss(warp(wk, affines), st, pbar, labels, kept, c["class_weights"], form)
        close(f"focal loss ({form})", f["value"], fn(weak, strong), 1e-5 * max(1.0, abs(f["value"])))
        eps = 1e-6
        for name, base in [("weak", weak), ("strong", strong)]:
            grad = np.zeros(base.size)
            for i in range(base.size):
                plus, minus = base.copy().ravel(), base.copy().ravel()
                plus[i] += eps
                minus[i] -= eps
                plus, minus = plus.reshape(base.shape), minus.reshape(base.shape)
                if name == "weak":
                    grad[i] = (fn(plus, strong) - fn(minus, strong)) / (2 * eps)
                else:
                    grad[i] = (fn(weak, plus) - fn(weak, minus)) / (2 * eps)
            scale = max(np.abs(grad).max(), 1e-3)
            close(f"focal gradient to the {name} logits ({form})", f[f"grad_{name}"], grad, 1e-3 * scale)
        print(f"ok focal {form}")

    y = np.asarray(c["ce_labels"]).reshape(n, h, w)
    pw = np.asarray(c["ce_weights"]).reshape(n, h, w)
    logp = np.log(softmax(strong))
    valid = y != 255
    picked = np.take_along_axis(logp, np.where(valid, y, 0)[:, None], axis=1)[:, 0]
    cw = np.asarray(c["class_weights"])[np.where(valid, y, 0)]
    # CrossEntropyLoss(weight=class_weight, reduction='none') * pixel weight, mean over all pixels
    ce = np.where(valid, -picked * cw, 0.0)
    close("class-weighted cross-entropy", c["ce_value"], np.mean(pw * ce), 1e-5)
    print("ok class_weighted_cross_entropy")


def downscale_label_ratio(labels, side, rows, cols, classes, min_ratio):
    """DAFormer's mmseg/utils/utils.py downscale_label_ratio: one-hot with 255 as a class of
    its own, average pooling over side x side windows, arg-max; 255 where the majority is
    ignored or covers less than min_ratio of the window."""
    n = labels.shape[0]
    sub = np.where(labels == 255, classes, labels)[:, : rows * side, : cols * side]
    one_hot = np.eye(classes + 1, dtype=np.float32)[sub]
    pooled = one_hot.reshape(n, rows, side, cols, side, classes + 1).mean(axis=(2, 4))
    ratio, out = pooled.max(axis=-1), pooled.argmax(axis=-1)
    out[out == classes] = 255
    out[ratio < np.float32(min_ratio)] = 255
    return out


def check_fd(cases):
    if not any(c["value"] is not None for c in cases):
        sys.exit("feature distance: no case keeps a cell; change the case")
    for c in cases:
        n, h, w = c["label_shape"]
        _, k, fh, fw = c["shape"]
        labels = np.asarray(c["labels"]).reshape(n, h, w)
        side = -(-w // fw)  # DAFormer's w // fw where they divide (see feature_distance.rs)
        if w % fw == 0:
            assert side == w // fw
        rows, cols = min(h // side, fh), min(w // side, fw)
        small = downscale_label_ratio(labels, side, rows, cols, c["classes"], c["min_ratio"])
        mask = np.zeros((n, fh, fw), dtype=bool)
        mask[:, :rows, :cols] = np.isin(small, c["fd_classes"])
        same("feature distance mask", c["mask"], mask.ravel())
        f = np.asarray(c["features"], dtype=np.float64).reshape(n, k, fh, fw)
        r = np.asarray(c["reference"], dtype=np.float64).reshape(n, k, fh, fw)
        dist = np.sqrt(((f - r) ** 2).sum(axis=1))
        if not mask.any():
            if c["value"] is not None:
                sys.exit("feature distance: a value without any cell")
            continue
        # masked_feat_dist: torch.norm(f1 - f2, dim=1)[mask].mean()
        close("feature distance", c["value"], dist[mask].mean(), 1e-5)
        grad = np.where(mask[:, None], (f - r) / dist[:, None], 0.0) / mask.sum()
        close("feature distance gradient", c["grad"], grad.ravel(), 1e-5)
    print("ok feature_distance")


def main():
    cases = json.load(open(sys.argv[1]))
    check_pseudo(cases["pseudo"])
    check_classmix(cases["classmix_per_image"])
    check_classmix(cases["classmix_per_batch"])
    check_augment(cases["augment"])
    check_mic(cases["mic"])
    check_cross_entropy(cases["cross_entropy"])
    check_ema(cases["ema"])
    check_rcs(cases["rcs"])
    check_tufl(cases["tufl"])
    check_fd(cases["fd"])


if __name__ == "__main__":
    main()
