"""External checks of the IntraDA pipeline's outputs, independent of dag's own code.

1. Opens scores.parquet (pyarrow) and metrics.parquet (DuckDB) and checks columns and rows.
2. Recomputes evaluate's mIoU with NumPy from the saved prediction PNGs and the raw Cityscapes
   `*_gtFine_labelIds.png` files, mapped to the 16-class protocol as methods.md lists it, with
   ADVENT's `bincount(n * gt + pred)` histogram, and compares it with summary.json to 1e-6.

Usage: python intrada_reference.py OUT_DIR TARGET_ROOT N_TRAIN N_VAL
Prints "ok" and exits 0, or raises.
"""
import json
import os
import sys

import duckdb
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

# Cityscapes labelId -> 16-class trainId (terrain 22, truck 27, train 31 and the rest -> 255).
CS16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9, 24: 10, 25: 11,
        26: 12, 28: 13, 32: 14, 33: 15}


def main():
    out, target_root, n_train, n_val = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    scores = pq.read_table(os.path.join(out, "entropy/scores/scores.parquet"))
    for col in ["image_id", "path", "score", "normalized_score", "rare_classes_present", "rank",
                "difficulty", "pixels_road", "pixels_bicycle"]:
        assert col in scores.column_names, f"scores.parquet lacks {col}: {scores.column_names}"
    assert scores.num_rows == n_train, (scores.num_rows, n_train)
    ranks = sorted(scores.column("rank").to_pylist())
    assert ranks == list(range(n_train)), ranks

    metrics_path = os.path.join(out, "eval_intrada/evaluation/metrics.parquet")
    con = duckdb.connect()
    cols = [r[0] for r in con.execute(f"describe select * from '{metrics_path}'").fetchall()]
    for col in ["class_id", "class", "iou", "tp", "fp", "fn"]:
        assert col in cols, f"metrics.parquet lacks {col}: {cols}"
    (rows,) = con.execute(f"select count(*) from '{metrics_path}'").fetchone()
    assert rows == 16, rows

    lut = np.full(256, 255, dtype=np.int64)
    for k, v in CS16.items():
        lut[k] = v
    n = 16
    hist = np.zeros((n, n), dtype=np.int64)
    pred_dir = os.path.join(out, "eval_intrada/evaluation/predictions")
    gt_dir = os.path.join(target_root, "gtFine", "val")
    seen = 0
    for city in sorted(os.listdir(pred_dir)):
        for name in sorted(os.listdir(os.path.join(pred_dir, city))):
            pred = np.array(Image.open(os.path.join(pred_dir, city, name))).astype(np.int64)
            gt_name = name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
            gt = lut[np.array(Image.open(os.path.join(gt_dir, city, gt_name))).astype(np.int64)]
            assert gt.shape == pred.shape, (gt.shape, pred.shape)
            keep = (gt >= 0) & (gt < n)
            hist += np.bincount(n * gt[keep] + pred[keep], minlength=n * n).reshape(n, n)
            seen += 1
    assert seen == n_val, (seen, n_val)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    miou = float(np.nanmean(iou) * 100)
    with open(os.path.join(out, "eval_intrada/evaluation/summary.json")) as f:
        summary = json.load(f)
    assert abs(summary["miou"] - miou) < 1e-6, (summary["miou"], miou)
    print("ok", miou)


if __name__ == "__main__":
    main()
