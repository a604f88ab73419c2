"""Independent reference for dag-metrics: ADVENT's confusion histogram and mIoU in NumPy.

Reads two raw u8 files (ground truth, prediction) and the class count, prints JSON with the
histogram, the per-class IoU (null where undefined) and the mIoU in percent.
Usage: python miou_reference.py GT.bin PRED.bin N
"""
import json
import sys

import numpy as np


def fast_hist(gt, pred, n):
    keep = (gt >= 0) & (gt < n)
    return np.bincount(n * gt[keep].astype(np.int64) + pred[keep], minlength=n * n).reshape(n, n)


def main():
    gt = np.fromfile(sys.argv[1], dtype=np.uint8).astype(np.int64)
    pred = np.fromfile(sys.argv[2], dtype=np.uint8).astype(np.int64)
    n = int(sys.argv[3])
    hist = fast_hist(gt, pred, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    print(json.dumps({
        "hist": hist.tolist(),
        "iou": [None if np.isnan(v) else float(v) for v in iou],
        "miou": float(np.nanmean(iou) * 100),
    }))


if __name__ == "__main__":
    main()
