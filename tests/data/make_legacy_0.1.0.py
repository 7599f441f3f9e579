"""Write the collections that tests/test_legacy.py opens, with retrieval-imprint 0.1.0 (commit 252622d)."""

import json
import sys
from pathlib import Path

import numpy as np

from retrieval_imprint.collection import Collection

out = Path(sys.argv[1])
rng = np.random.default_rng(7)
d = 8
centers = rng.standard_normal((12, d)).astype(np.float32) * 2


def draw(c, n):
    return (centers[c] + rng.standard_normal((n, d)).astype(np.float32)).astype(np.float32)


flat = Collection.create(out / "flat", model=None, k=2, random_state=3)
flat.add(np.concatenate([draw(0, 6), draw(1, 5), draw(2, 7)]), ["alpha"] * 6 + [7] * 5 + ["gamma"] * 7)
flat.add(np.concatenate([draw(3, 4), draw(4, 6)]), ["delta"] * 4 + [-2] * 6)
flat.add(draw(0, 3), ["alpha"] * 3)  # grows a class: re-imprinted from kept samples
flat.remove(["gamma"])
flat.add(draw(5, 5), ["日本語"] * 5)
flat.set_threshold(0.2)

ivf = Collection.create(out / "ivf", model=None, k=2, index="IVF16,Flat", search_params={"nprobe": 4})
X = np.concatenate([draw(c % 12, 6) + 0.1 * c for c in range(24)])
ivf.add(X, [f"c{c}" for c in range(24) for _ in range(6)])
ivf.add(draw(6, 6), ["late"] * 6)

Q = rng.standard_normal((10, d)).astype(np.float32) * 2
expected = {}
for name in ("flat", "ivf"):
    col = Collection.open(out / name)
    r = col.query(Q, 3, threshold=-np.inf)
    expected[name] = {
        "labels": r.labels.tolist(),
        "scores": r.scores.tolist(),
        "classes": col.classes,
        "class_table": col.class_table(),
        "predict": col.predict(Q).tolist(),
        "config": col.config,
    }
np.save(out / "queries.npy", Q)
(out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False))
