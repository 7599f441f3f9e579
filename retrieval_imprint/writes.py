"""How each write changes a collection: new segment files first, then one SQLite transaction, then
the same change in memory.

Every function here runs under the collection's writer lock (``Collection.writing``), on the
``Snapshot`` of the latest committed version, and updates that snapshot in step with its commit;
if anything fails, the caller reloads the snapshot from disk. ``segments.crash_point`` marks the
steps where crash tests kill the process.
"""

from __future__ import annotations

import json
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sqlalchemy import Engine

from . import classrows, refine, segments, store
from . import labels as lab
from ._groups import Grouped
from .auto import stored_choice
from .classtable import ClassTable
from .errors import DataError
from .imprint import imprint, seed_of
from .imprint import means as class_means
from .index import ProxyIndex
from .lshead import LSHead
from .normalize import normalize
from .openset import class_shifts
from .params import AUTO
from .segments import CLASS_SHIFT, MAX_PER_CLASS
from .snapshot import Snapshot
from .training import commit_fitted, first_index, fix_dimension, fixed_columns, record_template
from .tuning import Searcher, tune_nprobe

RECENT_MAX = 4096  # vectors of a segment file this process writes that it keeps for the next compaction


def set_values(engine: Engine, s: Snapshot, **values: Any) -> None:
    """Set columns of the collection row and bump the version."""
    version = s.version + 1
    with store.writing(engine) as conn:
        store.set_collection(conn, version=version, **values)
    s.config.update(values, version=version)


def set_search_params(engine: Engine, s: Snapshot, params: dict[str, int]) -> None:
    """Store these search parameters over the stored ones: the user's choice, no longer tuned
    (``tuning.tune_nprobe``)."""
    merged = {**s.search_params, **params}
    set_values(engine, s, search_params=json.dumps(merged), index_tuning=None)
    if s.proxies is not None:
        s.proxies.search_params = merged


def set_class_threshold(engine: Engine, s: Snapshot, class_id: int, threshold: float | None) -> None:
    """Set (None: clear) one class's own rejection threshold and bump the version."""
    version = s.version + 1
    with store.writing(engine) as conn:
        classrows.update_classes(conn, [{"id": class_id, "threshold": threshold}], version)
        store.set_collection(conn, version=version)
    if (table := s.loaded_table) is not None:
        table.threshold[table.positions(np.array([class_id]))] = np.nan if threshold is None else threshold
    s.config["version"] = version


def restore(
    engine: Engine, s: Snapshot, threshold: float | None, classes: dict[int, tuple], ridge: tuple | None
) -> None:
    """One transaction: the threshold, by class id each class's own threshold and shift (None: none), and a
    streaming ls head's ``ridge``, ``(lambda, samples it was chosen on)`` (None: as it is); bumps the version."""
    version, values = s.version + 1, {"threshold": threshold}
    if ridge is not None and s.head is not None:
        s.head = s.head.with_ridge(*ridge)
        values |= {"ridge": s.head.lam, "ridge_rows": s.head.chosen_on}
    with store.writing(engine) as conn:
        store.set_collection(conn, version=version, **values)
        rows = [{"id": i, "threshold": th, "shift": sh} for i, (th, sh) in classes.items()]
        classrows.update_classes(conn, rows, version)
    if (table := s.loaded_table) is not None:
        at = table.positions(np.array(list(classes), np.int64))
        table.threshold[at] = [np.nan if th is None else th for th, _ in classes.values()]
        table.shift[at] = [np.nan if sh is None else sh for _, sh in classes.values()]
    s.config.update(values, version=version)


@dataclass
class _Batch:
    """The classes one add touches, in label-entry order, with their samples old and new."""

    class_id: np.ndarray  # (B,) class ids, new ones numbered from next_class_id
    existing: np.ndarray  # (B,) bool: the class exists and is re-imprinted
    old_samples: np.ndarray  # (B,) kept samples before this add
    old_proxy_hi: np.ndarray  # (B,) end of the class's proxy ids before this add
    groups: Grouped  # per class: kept samples first, then the new ones (the order a one-go build sees)
    new_rows: np.ndarray  # rows of the new samples X, grouped by class
    new_counts: np.ndarray  # (B,) new samples per class
    next_class_id: int
    grown: ClassTable  # the rows of the existing classes, as this version has them


def _batch(directory: Path, s: Snapshot, X: np.ndarray, codes: np.ndarray, entries: list, found: dict) -> _Batch:
    B = len(entries)
    class_id = np.empty(B, np.int64)
    old_samples, old_proxy_hi = np.zeros(B, np.int64), np.zeros(B, np.int64)
    next_id = s.config["next_class_id"]
    for i, entry in enumerate(entries):
        row = found.get(entry)
        if row is None:
            class_id[i], next_id = next_id, next_id + 1
        else:
            class_id[i], old_samples[i], old_proxy_hi[i] = row.id, row.sample_hi, row.proxy_hi
    existing = np.array([e in found for e in entries], bool)
    grown = s.rows_of(class_id[existing])
    new_rows = np.argsort(codes, kind="stable")
    new_counts = np.bincount(codes, minlength=B)
    new_starts = np.concatenate([[0], np.cumsum(new_counts)])
    kept_starts = np.concatenate([[0], np.cumsum(old_samples)])
    parts = [X[new_rows]]  # new classes only (a bulk add): one gather, not one per class
    if existing.any():  # each class's kept samples, then its new ones
        kept = s.sample_index(directory).reconstruct(grown.sample_ids(class_id[existing]))
        new = [X[new_rows[new_starts[i] : new_starts[i + 1]]] for i in range(B)]
        parts = [rows for i in range(B) for rows in (kept[kept_starts[i] : kept_starts[i + 1]], new[i])]
    sizes = old_samples + new_counts
    groups = Grouped(
        np.concatenate(parts) if len(parts) > 1 else parts[0],
        np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        lab.entry_keys(entries),
    )
    return _Batch(class_id, existing, old_samples, old_proxy_hi, groups, new_rows, new_counts, next_id, grown)


def add(
    directory: Path,
    engine: Engine,
    s: Snapshot,
    X: np.ndarray,
    codes: np.ndarray,
    entries: list,
    checkpoints: Sequence[tuple[str, int]] = (),
    replace: Container[tuple[str, str]] = (),
    texts: Sequence[str | None] | None = None,
    refs: Sequence[str | None] | None = None,
) -> None:
    """Imprint samples ``X`` with class ``codes`` into ``entries`` (label entries; new or existing).
    An existing class among ``replace`` is imprinted from these samples alone: it is dropped and
    made again under a new id, in the same transaction. ``checkpoints``: ``(source, rows_done)``
    of ingestions, recorded in that transaction too. ``texts`` and ``refs`` (per row of ``X``)
    are kept beside the kept samples, for ``Collection.examples`` and ``explain``."""
    cfg = s.config
    if cfg["auto_choice"] is None:  # the first add: auto chooses what the settings leave open, on this data
        cfg["auto_choice"] = stored_choice(cfg, X, codes, lab.entry_keys(entries))
    params = s.params
    X = normalize(X, cfg["pre_norm"], what="X")
    with engine.connect() as conn:
        found = classrows.find_classes(conn, entries)
    replaced = np.array(sorted(found.pop(e).id for e in list(found) if e in replace), np.int64)
    if found and not cfg["keep_samples"]:
        raise DataError(
            f"class {next(iter(found))[1]!r} already exists and this collection keeps no samples, so it "
            "cannot be re-imprinted from old and new samples together; remove it and add all its "
            "samples, or create the collection with keep_samples=True"
        )
    fix_dimension(s, X)
    b = _batch(directory, s, X, codes, entries, found)
    gone = s.rows_of(replaced)  # read before the version moves on
    head = None
    if params["generator"] == "ls":  # the streaming head: class means of features, the new rows into G
        head = s.head.grown(X, _kept(directory, s, gone)) if s.head else LSHead.first(cfg, X, codes, b.groups.keys)
        W, owner = head.proxies(b.groups)
    else:
        W, owner, s.fixed = imprint(b.groups, params, s.fixed)
    shift = class_shifts(b.groups, params)
    version = s.version + 1
    template = first_index(directory, s, W, version) if s.proxies is None else None

    n_proxies = np.bincount(owner, minlength=len(entries))
    sizes = b.old_samples + b.new_counts
    if (n_proxies + b.old_proxy_hi).max() >= MAX_PER_CLASS or sizes.max() >= MAX_PER_CLASS:
        raise DataError(f"a class may hold at most {MAX_PER_CLASS - 1} proxies and samples")
    proxy_lo, proxy_hi = b.old_proxy_hi, b.old_proxy_hi + n_proxies
    j = np.arange(len(W)) - np.concatenate([[0], np.cumsum(n_proxies)])[owner]
    proxy_ids = (b.class_id[owner] << CLASS_SHIFT) + proxy_lo[owner] + j
    segment = s.new_index("proxies")
    segment.add(W, proxy_ids)
    if cfg["index_tuning"] == "pending":  # a streaming ls head's on its mapped samples: not what the means are
        queries = None if head is None else head.tuning_queries(X, len(W), seed_of(cfg["random_state"]))
        tune_search(s, segment, queries=queries)
    written = {"proxies": (segments.write_segment(directory, "proxies", version, segment.index), proxy_ids)}
    samples = X[b.new_rows] if cfg["keep_samples"] else X[:0]  # not a bulk add's 2.5 GB copy, where none are kept
    if cfg["keep_samples"]:
        s_owner = np.repeat(np.arange(len(entries)), b.new_counts)
        sample_ids = (
            (b.class_id[s_owner] << CLASS_SHIFT)
            + b.old_samples[s_owner]
            + (np.arange(len(X)) - np.concatenate([[0], np.cumsum(b.new_counts)])[s_owner])
        )
        sample_index = s.new_index("samples")
        sample_index.add(samples, sample_ids)
        written["samples"] = (segments.write_segment(directory, "samples", version, sample_index.index), sample_ids)
    if params["aggregation"] == "blend":  # the class means beside the proxies, one per class
        mean_ids = (b.class_id << CLASS_SHIFT) + proxy_lo
        M = class_means(b.groups, params, s.fixed)
        mean_index = s.new_index("means")
        mean_index.add(M, mean_ids)
        written["means"] = (segments.write_segment(directory, "means", version, mean_index.index), mean_ids)
    gram = write_gram(directory, version, head, s.head is None or len(replaced) > 0)
    segments.crash_point("add: segments written")
    with store.writing(engine) as conn:
        if len(replaced):
            store.delete_classes(conn, replaced)
        commit_gram(conn, gram, head)
        shifts = [None if np.isnan(v) else float(v) for v in shift]
        rows = [
            {"id": int(b.class_id[i]), "n_samples": int(sizes[i]), "proxy_lo": int(proxy_lo[i]),
             "proxy_hi": int(proxy_hi[i]), "sample_hi": int(sizes[i]), "shift": shifts[i]}
            for i in range(len(entries))
        ]  # fmt: skip
        classrows.insert_classes(conn, [{**r, "label": e[1], "label_kind": e[0]} for r, e in zip(rows, entries)
                                        if e not in found], version)  # fmt: skip
        classrows.update_classes(conn, [row for row, old in zip(rows, b.existing) if old], version)
        for kind, (file, ids) in written.items():
            store.insert_segment(conn, kind, file, len(ids))
        if "samples" in written and (texts is not None or refs is not None):
            order = b.new_rows.tolist()
            store.insert_texts(
                conn,
                written["samples"][1],
                written["samples"][1] >> CLASS_SHIFT,
                [texts[i] for i in order] if texts is not None else [None] * len(order),
                [refs[i] for i in order] if refs is not None else None,
            )
        commit_fitted(conn, s, version, template, next_class_id=b.next_class_id)
        for source, done in checkpoints:
            store.set_rows_done(conn, source, done)
    segments.crash_point("add: committed")

    if len(replaced):  # the same change in memory, without rereading the segments
        _forget(s, gone)
    if b.existing.any():
        s.searched.remove(b.grown.proxy_ids(b.grown.ids))
    s.searched.add(W, proxy_ids)
    if s.samples is not None and "samples" in written:
        s.samples.add(samples, written["samples"][1])
    if "means" in written:
        s.means = s.means if s.means is not None else s.new_index("means")
        if b.existing.any():
            s.means.remove(b.grown.mean_ids(b.grown.ids))
        s.means.add(M, mean_ids)
    vectors = {"proxies": W, "samples": samples, "means": M if "means" in written else None}
    for kind, (file, ids) in written.items():
        s.record(kind, file, len(ids))
        if len(ids) <= RECENT_MAX:
            s.recent[file.name] = (ids.copy(), np.array(vectors[kind], np.float32))
    if template is not None:
        record_template(s, template)
    record_head(s, gram, head)
    if s.loaded_table is not None:
        s.loaded_table.upsert(b.class_id, [lab.value(*e) for e in entries], sizes, proxy_lo, proxy_hi, shift)
    s.label_kinds.update(kind for kind, _ in entries)
    s.config.update(version=version, next_class_id=b.next_class_id)


def set_rejection(engine: Engine, s: Snapshot, threshold: float, rule: str, shift: np.ndarray | None) -> None:
    """In one transaction: the collection's rejection threshold and rule, and (if given) every
    class's shift, in table order."""
    version = s.version + 1
    with store.writing(engine) as conn:
        store.set_collection(conn, version=version, threshold=threshold, rejection=rule)
        if shift is not None:
            rows = [{"id": int(i), "shift": None if np.isnan(v) else float(v)} for i, v in zip(s.table.ids, shift)]
            classrows.update_classes(conn, rows, version)
    s.config.update(version=version, threshold=threshold, rejection=rule)
    if shift is not None:
        s.table.shift = np.asarray(shift, np.float64)


def retune(
    directory: Path,
    engine: Engine,
    s: Snapshot,
    choice: str | None = None,
    kept: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> None:
    """Choose again what the settings leave open, on every kept sample (or take ``choice``, an
    ``auto_choice`` made on more samples: a sharded collection's, with the ``kept_samples`` it
    read), and re-imprint every class with the choice in one atomic write: the new proxies (and
    means) replace all the old."""
    table, cfg = s.table, s.config
    X, codes, keys = kept if kept is not None else s.kept_samples(directory)
    cfg["auto_choice"] = choice or stored_choice(cfg, X, codes, keys)
    params = s.params
    groups = Grouped(X, np.concatenate([[0], np.cumsum(table.n_samples)]).astype(np.int64), keys)
    fixed = s.fixed if s.template is not None else None  # IVF lists live in the first fit's space
    head = None
    if params["generator"] == "ls":  # lambda chosen again on every kept sample, and G summed anew
        head = LSHead.first(cfg, X, codes, keys)
        W, owner = head.proxies(groups)
    else:
        W, owner, s.fixed = imprint(groups, params, fixed)
    shift = class_shifts(groups, params)
    n_proxies = np.bincount(owner, minlength=len(table))
    if (table.proxy_hi + n_proxies).max() >= MAX_PER_CLASS:
        raise DataError(f"a class may hold at most {MAX_PER_CLASS - 1} proxies")
    lo, hi = table.proxy_hi.copy(), table.proxy_hi + n_proxies
    proxy_ids = (
        (table.ids[owner] << CLASS_SHIFT)
        + lo[owner]
        + (np.arange(len(W)) - np.concatenate([[0], np.cumsum(n_proxies)])[owner])
    )
    version = s.version + 1
    proxies = (
        s.template.empty_like()
        if s.template is not None
        else ProxyIndex(s.width("proxies"), cfg["metric"], s.fixed.transform, with_ids=True)
    )
    proxies.search_params = s.search_params
    proxies.add(W, proxy_ids)
    written = {"proxies": segments.write_segment(directory, "proxies", version, proxies.index)}
    means, mean_ids = None, (table.ids << CLASS_SHIFT) + lo
    if params["aggregation"] == "blend":
        means = ProxyIndex(s.d, cfg["metric"], s.fixed.transform, with_ids=True)
        means.add(class_means(groups, params, s.fixed), mean_ids)
        written["means"] = segments.write_segment(directory, "means", version, means.index)
    gram = write_gram(directory, version, head, True)
    segments.crash_point("retune: segments written")
    with store.writing(engine) as conn:
        store.delete_segments(conn, ["proxies", "means", "candidates"])
        commit_gram(conn, gram, head)
        store.insert_segment(conn, "proxies", written["proxies"], len(proxy_ids))
        if means is not None:
            store.insert_segment(conn, "means", written["means"], len(mean_ids))
        classrows.update_classes(conn, [
            {"id": int(i), "proxy_lo": int(a), "proxy_hi": int(b), "shift": None if np.isnan(v) else float(v)}
            for i, a, b, v in zip(table.ids, lo, hi, shift)
        ], version)  # fmt: skip
        store.forget_dead(conn)  # the old ranges the update made dead left with every old file
        store.set_collection(conn, version=version, auto_choice=cfg["auto_choice"], **fixed_columns(s))
    segments.crash_point("retune: committed")
    s.proxies, s.means = proxies, means
    s.files.update(proxies=[], means=[], candidates=[])
    for kind, segment in written.items():
        s.record(kind, segment, len(proxy_ids) if kind == "proxies" else len(mean_ids))
    table.proxy_lo, table.proxy_hi, table.shift = lo, hi, shift
    record_head(s, gram, head)
    cfg["version"] = version
    segments.delete_unlisted(directory, {f for files in s.files.values() for f in files})


def remove(directory: Path, engine: Engine, s: Snapshot, entries: list) -> None:
    """Remove the classes of these label entries (all must exist)."""
    with engine.connect() as conn:
        found = classrows.find_classes(conn, entries)
    missing = [e[1] for e in entries if e not in found]
    if missing:
        raise DataError(
            f"no class {missing[0]!r} in collection {directory} ({len(missing)} unknown label(s)); nothing was removed"
        )
    ids = np.array(sorted(found[e].id for e in entries), np.int64)
    gone = s.rows_of(ids)  # read before the version moves on
    head = None if s.head is None else s.head.grown(np.zeros((0, s.d), np.float32), _kept(directory, s, gone))
    gram = write_gram(directory, s.version + 1, head, True)
    with store.writing(engine) as conn:
        store.delete_classes(conn, ids)
        commit_gram(conn, gram, head)
        store.set_collection(conn, version=s.version + 1)
    segments.crash_point("remove: committed")
    _forget(s, gone)
    record_head(s, gram, head)
    s.config["version"] += 1


def _kept(directory: Path, s: Snapshot, rows: ClassTable) -> np.ndarray:
    """The kept samples (NORMpre'd) of the classes of ``rows``: what a streaming ls head takes out of G."""
    if not len(rows):
        return np.zeros((0, s.d), np.float32)
    return s.sample_index(directory).reconstruct(rows.sample_ids(rows.ids))


def write_gram(directory: Path, version: int, head: LSHead | None, due: bool) -> segments.Segment | None:
    """A streaming ls head's ``G`` as a new ``gram`` segment, where this write writes it (``LSHead.checkpoint``)."""
    if head is None or not head.checkpoint(due):
        return None
    return segments.write_array(directory, "gram", version, head.ridge.gram_)


def commit_gram(conn: Any, gram: segments.Segment | None, head: LSHead | None) -> None:
    """Record a new ``gram`` segment (its row count: the samples G sums) and the ridge, replacing the last."""
    if gram is not None and head is not None:
        store.delete_segments(conn, ["gram"])
        store.insert_segment(conn, "gram", gram, head.n_rows)
        store.set_collection(conn, ridge=head.lam, ridge_rows=head.chosen_on)


def record_head(s: Snapshot, gram: segments.Segment | None, head: LSHead | None) -> None:
    """The same in memory, once committed: readers of this snapshot then take the new head."""
    if gram is not None and head is not None:
        s.files["gram"] = []
        s.record("gram", gram, head.n_rows)
    if head is not None:
        s.head, s.config["ridge"], s.config["ridge_rows"] = head, head.lam, head.chosen_on


def rechoose_ridge(directory: Path, engine: Engine, s: Snapshot) -> None:
    """A streaming ls head ``outgrown`` has its ``lambda`` chosen again (lshead.py) in a write of its own: only the
    ridge changes, not ``G``, the class means or the index; a crash before it commits leaves it to the next."""
    if s.head is not None and s.head.outgrown:
        s.head = s.head.rechosen(s.config["ls_reg"], s.kept_samples(directory) if s.config["ls_reg"] == AUTO else None)
        set_values(engine, s, ridge=s.head.lam, ridge_rows=s.head.chosen_on)


def _forget(s: Snapshot, gone: ClassTable) -> None:
    """Drop the classes of rows ``gone`` from the snapshot in memory (their rows are gone)."""
    s.searched.remove(gone.proxy_ids(gone.ids))
    if s.samples is not None:
        s.samples.remove(gone.sample_ids(gone.ids))
    if s.means is not None:
        s.means.remove(gone.mean_ids(gone.ids))
    if s.loaded_table is not None:
        s.loaded_table.drop(gone.ids)


def tune_search(
    s: Snapshot, proxies: ProxyIndex, candidates: faiss.Index | None = None, queries: np.ndarray | None = None
) -> None:
    """Set the snapshot's nprobe to the smallest reaching ``tuning.RECALL_TARGET`` on ``proxies``
    (``tuning.tune_nprobe``, on ``queries`` if given; the stored rule where it cannot be measured), in
    memory: the caller's transaction stores ``search_params`` and ``index_tuning``. With fast-scan ``candidates`` of
    ``proxies`` (refine.py), the recall is that of their re-ranked search, and ``k_factor`` is
    tuned with nprobe."""
    refined: Searcher | None = None
    if candidates is not None:
        reranker = refine.Reranker(proxies.index)

        def refined(Q: np.ndarray, k: int, params: dict[str, int]) -> np.ndarray:
            return refine.search(candidates, reranker, Q, k, params)[1]

    seed = seed_of(s.config["random_state"])
    tuning = tune_nprobe(proxies.index, seed=seed, refined=refined, k_factors=refine.K_FACTORS, queries=queries)
    if tuning is not None:
        tuned = {key: int(tuning[key]) for key in ("nprobe", "k_factor") if key in tuning}
        s.config["search_params"] = json.dumps({**s.search_params, **tuned})
    s.config["index_tuning"] = json.dumps(tuning) if tuning is not None else None
    for index in (proxies, s.proxies):
        if index is not None:
            index.search_params = s.search_params
