"""Reliability: seeded damage to a collection's files, and SIGKILLs during `imprint index`.

Mutations: three collections of seeded synthetic classes (an IVF collection whose largest proxy
file is memory-mapped, a Flat one, a sharded one); each mutation damages one file, chosen across
every kind a collection holds (the mapped IVF file, segment files that are read, the IVF
template, `imprint.db`, the shard manifest, the lock files), by flipping a run of 1-64 bytes,
zeroing a run, or cutting the file, then runs `imprint query --vectors Q --top 3 --json` and
`imprint check` through the real command line (in process, click's runner) and restores the file.
Each outcome is counted: refused (exit 2, one line), harmless (the same output as before the
damage), silent wrong (exit 0, another output), traceback (anything but a one-line error); and
whether `check` exits non-zero where the answer changed.

SIGKILLs: `imprint index` of 60,000 vectors in chunks of 5,000 is killed at a random moment, then
run again to the end; the collection must hold exactly the classes an uninterrupted run makes,
with the same answers.

    .venv/bin/python benchmarks/fuzz.py [--mutations 300] [--kills 10] [--out docs/reliability.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _common import DOCS, machine, markdown_table, scratch
from click.testing import CliRunner

from retrieval_imprint import segments
from retrieval_imprint.cli import main
from retrieval_imprint.collection import Collection
from retrieval_imprint.errors import ImprintError
from retrieval_imprint.sharded import ShardedCollection

D = 32


def classes(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` classes of 8 samples around two modes each (seeded)."""
    rng = np.random.default_rng(seed)
    modes = 2 * rng.standard_normal((n, 2, D)).astype(np.float32)
    y = np.repeat(np.arange(n), 8)
    X = modes[y, rng.integers(0, 2, len(y))] + 0.5 * rng.standard_normal((len(y), D)).astype(np.float32)
    return X, [f"class-{v}" for v in y]


def build(root: Path) -> dict[str, Path]:
    """The three collections, each calibrated (thresholds and shifts stored) and grown twice."""
    X, y = classes(3000, 1)
    made = {}
    ivf = Collection.create(root / "ivf", model=None, k=2, aggregation="max", index="IVF32,SQfp16", rejection="shift")
    ivf.add(X[:20_000], y[:20_000]).add(X[20_000:], y[20_000:])
    ivf.compact()  # one large proxy file: the one mapped at open
    ivf.add(*classes(40, 2))  # and a small one beside it, read
    ivf.set_search_params(nprobe=4).calibrate(target_false_rejection=0.1)
    made["ivf"] = root / "ivf"
    flat = Collection.create(root / "flat", model=None, k=2, aggregation="max")
    flat.add(X[:8000], y[:8000]).add(*classes(40, 3))
    flat.set_threshold(0.2)
    made["flat"] = root / "flat"
    sharded = ShardedCollection.create(root / "sharded", shards=3, model=None, k=2, aggregation="max")
    sharded.add(X[:8000], y[:8000])
    made["sharded"] = root / "sharded"
    return made


def files_of(path: Path) -> dict[str, list[Path]]:
    """A collection's files by kind (a sharded collection's across its shards)."""
    proxies = sorted(path.rglob("proxies-*.faiss"), key=lambda f: f.stat().st_size)
    mapped = (
        proxies[-1]
        if proxies
        and (path / "imprint.db").exists()
        and Collection.open(path).config["index_factory"].startswith("IVF")
        else None
    )
    kinds: dict[str, list[Path]] = {}
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.name.endswith(("-wal", "-shm")):
            continue
        if f.name == "imprint.db":
            kind = "database"
        elif f.name == "shards.json":
            kind = "manifest"
        elif f.name.endswith(".lock"):
            kind = "lock"
        elif f.name.startswith("template-"):
            kind = "template"
        elif f == mapped:
            kind = "mapped proxies"
        else:
            kind = "read segment"
        kinds.setdefault(kind, []).append(f)
    return kinds


def mutate(file: Path, rng: random.Random) -> str:
    """Damage ``file`` in place; returns what was done."""
    data = bytearray(file.read_bytes())
    how = rng.choice(["flip", "flip", "flip", "zero", "cut"])
    if not data:
        data += os.urandom(16)
        how = "fill"
    elif how == "cut":
        data = data[: rng.randrange(len(data))]
    else:
        n = rng.randint(1, min(64, len(data)))
        at = rng.randrange(len(data) - n + 1)
        for i in range(at, at + n):
            data[i] = 0 if how == "zero" else data[i] ^ rng.randint(1, 255)
    file.write_bytes(bytes(data))
    return how


def invoke(*args: str) -> tuple[int, str, BaseException | None]:
    """The command line's exit code, its output and, if it failed otherwise than with a one-line
    error, the exception (a traceback a user would see)."""
    result = CliRunner().invoke(main, list(args))
    exc = result.exception
    bug = exc if exc is not None and not isinstance(exc, (SystemExit, ImprintError)) else None
    if result.exit_code == 2 and result.stderr.count("\n") != 1:
        bug = bug or RuntimeError(f"a {result.stderr.count(chr(10))}-line error: {result.stderr[:200]}")
    return result.exit_code, result.output, bug


def fuzz(made: dict[str, Path], queries: Path, n: int, seed: int) -> tuple[list[list[object]], dict, list[str]]:
    rng = random.Random(seed)
    pristine = {name: path.with_name(path.name + ".pristine") for name, path in made.items()}
    expected = {}
    for name, path in made.items():
        shutil.copytree(path, pristine[name])
        code, out, bug = invoke("query", str(path), "--vectors", str(queries), "--top", "3", "--json")
        assert code == 0 and bug is None, out
        expected[name] = out
    counts: dict[tuple[str, str], Counter] = {}
    unchecked, notes = Counter(), []
    for i in range(n):
        name = rng.choice(list(made))
        kinds = files_of(made[name])
        kind = rng.choice(sorted(kinds))
        file = rng.choice(kinds[kind])
        how = mutate(file, rng)
        code, out, bug = invoke("query", str(made[name]), "--vectors", str(queries), "--top", "3", "--json")
        check_code, _, check_bug = invoke("check", str(made[name]))
        if bug or check_bug:
            outcome = "traceback"
            notes.append(f"{name} {kind} {file.name} {how}: {bug or check_bug!r}"[:300])
        elif code == 2:
            outcome = "refused"
        elif code == 0 and out == expected[name]:
            outcome = "harmless"
        elif code == 0:
            outcome = "silent wrong"
            notes.append(f"silent wrong: {name} {kind} {file.name} {how}")
        else:
            outcome = f"exit {code}"
        if code == 0 and out != expected[name] and check_code == 0:
            unchecked[kind] += 1
        counts.setdefault((name, kind), Counter())[outcome] += 1
        shutil.rmtree(made[name])
        shutil.copytree(pristine[name], made[name])
        if (i + 1) % 50 == 0:
            print(f"  {i + 1} mutations", flush=True)
    outcomes = ["refused", "harmless", "silent wrong", "traceback"]
    rows = [[name, kind, sum(c.values()), *(c[o] for o in outcomes)] for (name, kind), c in sorted(counts.items())]
    total = Counter()
    for c in counts.values():
        total.update(c)
    rows.append(["all", "", sum(total.values()), *(total[o] for o in outcomes)])
    return rows, {"unchecked": dict(unchecked), **{o: total[o] for o in outcomes}}, notes


def kills(root: Path, n: int, seed: int) -> list[list[object]]:
    """``n`` SIGKILLs at random moments of a chunked ``imprint index``, each followed by a rerun."""
    rng = random.Random(seed)
    X, y = classes(7500, 4)
    np.savez(root / "data.npz", X=X, y=np.array(y))
    imprint = [sys.executable, "-c", "from retrieval_imprint.cli import main; main()"]
    args = ["--model", "none", "--k", "2", "--aggregation", "max", "--chunk-size", "5000", "--quiet"]
    t = time.perf_counter()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run([*imprint, "index", str(root / "whole"), str(root / "data.npz"), *args], check=True, **quiet)
    whole_s = time.perf_counter() - t
    want = Collection.open(root / "whole")
    Q = X[::97]
    rows = []
    for i in range(n):
        path = root / f"killed-{i}"
        proc = subprocess.Popen([*imprint, "index", str(path), str(root / "data.npz"), *args], **quiet)
        at = rng.uniform(0.5, whole_s)
        time.sleep(at)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run([*imprint, "index", str(path), str(root / "data.npz"), *args], check=True, **quiet)
        got = Collection.open(path)
        same = got.classes == want.classes and np.array_equal(got.predict(Q), want.predict(Q))
        rows.append([i + 1, f"{at:.1f}", "yes" if killed else "no (it had finished)", "yes" if same else "NO"])
        got.close()
        shutil.rmtree(path)
    return rows


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=300)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DOCS / "reliability.md")
    args = parser.parse_args()
    started = time.time()
    segments.MAP_MIN = 1 << 17  # the IVF collection's large file (400 KB here) is mapped, as a 64 MiB one is
    with scratch("ri-fuzz-") as root:
        made = build(root)
        np.save(root / "q.npy", classes(3000, 1)[0][::160] + 0.1)
        rows, total, notes = fuzz(made, root / "q.npy", args.mutations, args.seed)
        killed = kills(root, args.kills, args.seed)
    lines = [
        "# Reliability",
        "",
        f"`.venv/bin/python benchmarks/fuzz.py --mutations {args.mutations} --kills {args.kills}` on "
        f"{machine()}; {time.strftime('%Y-%m-%d')}, {(time.time() - started) / 60:.1f} min.",
        "",
        "## Damaged files",
        "",
        "Each mutation damages one file of one collection (1-64 bytes flipped or zeroed, or the file cut), then "
        "`imprint query --vectors Q --top 3 --json` (19 queries) and `imprint check` run, and the file is restored. "
        "refused: a one-line error, exit 2; harmless: the same output as before the damage; silent wrong: exit "
        "0 with another output; traceback: any other failure. The IVF collection's large proxy file is "
        "memory-mapped (verified list by list as queries touch it).",
        "",
        markdown_table(["collection", "file", "mutations", "refused", "harmless", "silent wrong", "traceback"], rows),
        "",
        f"Answers changed without `check` exiting non-zero: {total['unchecked'] or 'none'}.",
        "",
    ]
    if notes:
        lines += ["Notes:", "", *[f"- {n}" for n in notes[:20]], ""]
    lines += [
        "## SIGKILL during `imprint index`",
        "",
        "60,000 vectors of 7,500 classes in chunks of 5,000, killed at a random moment, then run again; "
        "complete: the same classes, in the same order, and the same answers as an uninterrupted run.",
        "",
        markdown_table(["run", "killed after s", "killed mid-run", "complete after the rerun"], killed),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(json.dumps(total))


if __name__ == "__main__":
    main_()
