"""Compaction: merging a collection's segment files, so a query reads few files and removed
vectors leave the disk.

An automatic compaction after many small adds merges the smallest few files (``tiered``, as a
log-structured merge tree does), a full one (``Collection.compact``) every file of each kind, and
may retrain the IVF lists on all the live proxies. Like every write, it writes new segment files
first and records them in one SQLite transaction; the files it replaced are deleted once no
reader is opening segments.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import Engine

from . import listfiles, refine, segments, store
from .errors import CollectionStateError
from .imprint import seed_of
from .index import ProxyIndex
from .snapshot import Snapshot
from .training import record_template
from .writes import RECENT_MAX, commit_gram, record_head, tune_search, write_gram

MERGE_FAN_IN = 4  # a file an automatic compaction writes is this many times larger than its inputs
# bytes an automatic compaction writes in one file at most (Lucene's TieredMergePolicy caps its merged
# segments at 5 GB too): larger files merge only in a full compact(), never inside an add
MAX_MERGED = 5 << 30
# an automatic merge grows its largest input at least this much, or waits: a one-class add beside a 10M
# collection's 2.5 GB file merged the two (a 1.00x growth), which took that add 1.8 s
MIN_GROWTH = 1.5
RETUNE_GROWTH = 4  # an automatic compaction tunes nprobe again on a file this many times the last tuning's proxies


def _remember_merged(s: Snapshot, kind: str, name: str, parts: list) -> None:
    """Keep the live vectors of a merged segment for the next compaction, if every file merged into
    it was kept (``Snapshot.recent``) and they are few."""
    if not parts or any(p is None for p in parts):
        return
    ids, vectors = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    live = s.live(kind, ids)
    if live.sum() <= RECENT_MAX:
        s.recent[name] = (ids[live], vectors[live])


def tiered(sizes: Sequence[int], max_merged: int = MAX_MERGED) -> list[int]:
    """Positions of the files an automatic compaction merges, given their sizes in ascending order:
    the fewest smallest files (at least two) whose merged size is ``MERGE_FAN_IN`` times the
    largest of them; where no such prefix exists, the prefix that grows most over its largest, if
    that is ``MIN_GROWTH`` (else none: rewriting a large file to take in a small one costs the add
    the whole file and gains nothing; the next adds' files merge among themselves first); none of a
    single file. Only the smallest files that merge into at most ``max_merged`` bytes
    are candidates: a ten-million-class collection's dozen 3 GB files would otherwise reach the
    fan-in together, and one class's add would rewrite 12 GB.

    As in a log-structured merge tree, each merge multiplies the size of the file holding its
    vectors, so a vector is rewritten about a logarithmic number of times in all. Merging
    everything but the largest file (the rule before) rewrote the growing second-largest at every
    compaction: quadratic in the collection's size.
    """
    merged = np.cumsum(sizes, dtype=np.float64)
    n = int(np.sum(merged <= max_merged))
    sizes, merged = sizes[:n], merged[:n]
    if len(sizes) < 2:
        return []
    growth = merged[1:] / np.maximum(np.asarray(sizes[1:], np.float64), 1.0)
    enough = np.flatnonzero(growth >= MERGE_FAN_IN)
    k = int(enough[0]) if len(enough) else int(np.argmax(growth))
    return list(range(k + 2)) if growth[k] >= MIN_GROWTH else []


def check_retrain(directory: Path, s: Snapshot, retrain: bool) -> bool:
    """``retrain``, if the collection's index can be retrained; else a ``CollectionStateError``."""
    if retrain and s.template is None:
        raise CollectionStateError(f"collection {directory} has an exact index; only IVF indexes are retrained")
    if retrain and s.template is not None and not s.template.retrainable():
        raise CollectionStateError(
            f"collection {directory}: index={s.config['index_factory']!r} cannot be retrained; only IVF-Flat and "
            "IVF-SQfp16 codes re-encode without loss"
        )
    return retrain


def _candidates(s: Snapshot, proxies: ProxyIndex | None) -> faiss.Index | None:
    """Fast-scan candidates (refine.py) for the merged ``proxies``, where the collection's index is
    a refined one and their file will be memory-mapped at open (``segments.MAP_MIN``); else None."""
    factory = refine.parse(s.config["index_factory"])[1]
    if factory is None or proxies is None or not proxies.is_ivf:
        return None
    code_size = faiss.extract_index_ivf(proxies.index).code_size
    if proxies.ntotal * (code_size + 8) < segments.MAP_MIN:
        return None
    return refine.build(proxies.index, factory, seed_of(s.config["random_state"]))


def _tunes(s: Snapshot, proxies: ProxyIndex | None, full: bool) -> bool:
    """Whether this compaction tunes the search parameters again on the ``proxies`` it writes: a full
    one always (where they are tuned at all), an automatic one once its file holds ``RETUNE_GROWTH``
    times the proxies the stored tuning was measured on, so that they follow a collection grown by
    many adds (the first add's tuning is measured on its own proxies alone)."""
    tuning = s.config["index_tuning"]
    if tuning is None or proxies is None or not proxies.is_ivf:
        return False
    measured = json.loads(tuning) if tuning != "pending" else None
    return full or (isinstance(measured, dict) and proxies.ntotal >= RETUNE_GROWTH * int(measured["proxies"]))


def compact(directory: Path, engine: Engine, s: Snapshot, *, full: bool = True, retrain: bool = False) -> None:
    """Merge segment files into one per kind: all of them (``full``), or the smallest few
    (``tiered``), so that the automatic compaction after many small adds rewrites each vector a
    logarithmic number of times. ``retrain`` (full only): re-encode the proxies under IVF lists
    retrained on them."""
    version = s.version + 1
    kinds = ["proxies"] + (["samples"] if s.config["keep_samples"] else []) + (["means"] if s.files["means"] else [])
    victims = {}
    for kind in kinds:
        sizes = {f: (directory / f).stat().st_size for f in s.files[kind]}
        files = sorted(sizes, key=sizes.__getitem__)
        victims[kind] = files if full else [files[i] for i in tiered([sizes[f] for f in files])]
    chosen = {kind: files for kind, files in victims.items() if len(files) > 1 or full}
    if not chosen:  # every file past what an automatic compaction merges
        return
    # IVF proxies that make a file open would map are merged list by list from their files into the
    # new one (never all in memory), unless the lists are retrained, which reads them all anyway;
    # smaller merges go through memory (faster than a walk over every list, and often from ``recent``)
    streamed = (
        "proxies" in chosen
        and s.template is not None
        and not retrain
        and sum((directory / f).stat().st_size for f in chosen["proxies"]) >= segments.MAP_MIN
    )
    dropped: list[np.ndarray] = []  # the dead proxies of the files merged: the database forgets them as they go
    merged = {
        kind: s.merge(directory, kind, files, dropped=dropped if kind == "proxies" else None)
        for kind, files in chosen.items()
        if kind != "proxies" or not (retrain or streamed)
    }
    written: dict[str, segments.Segment] = {}
    template = None
    if streamed and s.template is not None:
        sources = s.proxy_sources(directory, chosen["proxies"])

        def live(ids: np.ndarray) -> np.ndarray:
            keep = s.live("proxies", ids)
            dropped.append(ids[~keep])
            return keep

        written["proxies"], n = listfiles.write_lists(directory, version, s.template.index, sources, live)
        merged["proxies"] = s.written_proxies(directory, written["proxies"], n)
    if retrain:  # from the live proxies in memory, which the merged files would only repeat
        exact = refine.parse(s.config["index_factory"])[0]
        s.template, merged["proxies"] = s.searched.retrained(exact, s.config["random_state"])
        merged["proxies"].search_params = s.search_params
        template = segments.write_segment(directory, "template", version, s.template.index)
    candidates = _candidates(s, merged.get("proxies"))
    tuned = _tunes(s, merged.get("proxies"), full)
    if tuned:  # the collection has grown or its lists changed: the nprobe that reaches the target too
        seed, n_means = seed_of(s.config["random_state"]), merged["proxies"].ntotal
        queries = None if s.head is None else s.head.tuning_queries(s.kept_samples(directory)[0], n_means, seed)
        tune_search(s, merged["proxies"], candidates, queries)
    for kind, index in merged.items():
        if kind not in written:
            written[kind] = segments.write_segment(directory, kind, version, index.index)
    counts = {kind: index.ntotal for kind, index in merged.items()}
    # the candidates of the proxy files merged away go with them; the new file's (if any) replace them
    victims["candidates"] = [
        segments.candidates_of(f)
        for f in victims.get("proxies", [])
        if segments.candidates_of(f) in s.files["candidates"]
    ]
    if candidates is not None:
        written["candidates"] = listfiles.write_candidates(directory, version, candidates)
        counts["candidates"] = candidates.ntotal
    # the samples merged into a file of this version are summed in G as of it (``lshead.REPLAY_MAX``)
    head = copy.copy(s.head) if s.head is not None and "samples" in chosen else None
    gram = write_gram(directory, version, head, True)
    segments.crash_point("compact: segments written")
    with store.writing(engine) as conn:
        commit_gram(conn, gram, head)
        for kind, segment in written.items():
            store.replace_segments(conn, kind, victims[kind], segment, counts[kind])
        if candidates is None:
            store.forget_segments(conn, victims["candidates"])
        if "proxies" in chosen:  # every file merged (full): every dead range goes; else those of the files merged
            store.forget_dead(conn, None if full else np.concatenate([np.zeros(0, np.int64), *dropped]))
        if template is not None:
            store.set_template(conn, template)
            store.set_collection(conn, trained_on=merged["proxies"].ntotal)
        if tuned:
            store.set_collection(conn, search_params=s.config["search_params"], index_tuning=s.config["index_tuning"])
        store.set_collection(conn, version=version)
    segments.crash_point("compact: committed")
    record_head(s, gram, head)
    s.config["version"] = version
    s.files["candidates"] = [f for f in s.files["candidates"] if f not in victims["candidates"]]
    for kind, segment in written.items():
        s.files[kind] = [f for f in s.files[kind] if f not in victims[kind]]
        s.record(kind, segment, counts[kind])
        _remember_merged(s, kind, segment.name, [s.recent.pop(name, None) for name in victims[kind]])
    if template is not None:
        record_template(s, template)
        s.config["trained_on"] = merged["proxies"].ntotal
        s.proxies = merged["proxies"]
    if streamed or candidates is not None:  # searched as a reopened collection would be: large files mapped,
        s.reopen_proxies(directory)  # with their candidates, and nothing held in memory twice
    segments.delete_unlisted(directory, {f for files in s.files.values() for f in files})
