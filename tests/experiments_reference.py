"""Checks the mean rows of a compare stage's comparison.parquet against NumPy: for every group
(a method and its swept setting), the mean, the sample standard deviation (ddof=1) and n over the
per-seed runs of that group, for mIoU and every per-class IoU.

    python tests/experiments_reference.py COMPARISON_PARQUET EXPECTED_N
"""
import sys

import numpy as np
import pyarrow.parquet as pq

table = pq.read_table(sys.argv[1]).to_pandas()
expected_n = int(sys.argv[2])
runs = table[table["row"] == "run"]
means = table[table["row"] == "mean"]
assert len(means) > 0, "no mean rows"
columns = ["miou"] + [c for c in table.columns if c.startswith("iou_")]
for _, mean_row in means.iterrows():
    members = runs[runs["group"] == mean_row["group"]]
    assert len(members) == expected_n == mean_row["n"], (mean_row["group"], len(members))
    assert members["seed"].nunique() == expected_n
    for c in columns:
        values = members[c].to_numpy(dtype=np.float64)
        std_column = "miou_std" if c == "miou" else "std_" + c
        want_mean = np.mean(values)
        want_std = np.std(values, ddof=1)
        for got, want, what in [(mean_row[c], want_mean, "mean"), (mean_row[std_column], want_std, "std")]:
            if np.isnan(want):
                assert np.isnan(got), (mean_row["group"], c, what, got)
            else:
                assert abs(got - want) <= 1e-9 * max(1.0, abs(want)), (mean_row["group"], c, what, got, want)
print(f"{len(means)} mean rows match NumPy over {expected_n} seeds")
