"""One committed version of a collection in memory: its settings, class table and indexes.

``read`` takes the database rows and opens the segment files they name in one step, under
``readers.lock`` and inside one SQLite read transaction, so the rows and the files belong to the
same version even while a writer commits and compacts beside it. The files are read after the
lock is released (an open file outlives its deletion), so writers never wait on a slow reader.

The class table is not read then (1.2 GB and seconds at ten million classes): an answer reads its classes' rows
by key (``rows_of``: each row says which version last wrote it, so one no later write changed serves an older
version), an operation over most classes the whole table (``table``: only while the database is at this version).
Where they cannot, they raise ``CollectionChangedError``: a reader then reads the version now committed with its
whole class table (``read(table=True)``), which cannot fail so; a writer, holding the lock, is never stale.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np
from sqlalchemy import Engine

from . import classrows, segments, store
from . import labels as lab
from .classtable import ClassTable
from .errors import CollectionChangedError, CollectionDamagedError, CollectionStateError
from .imprint import Fixed
from .index import ProxyIndex
from .lshead import LSHead
from .mapped import Mapped, MappedProxyIndex
from .params import STORED
from .segments import class_of
from .verified import FileVerifier, ListVerifier

KINDS = ("proxies", "samples", "template", "means", "candidates", "gram")
STALE_READS = 4  # reads of a version before one reads the class table with it (it cannot then be stale)
ROWS_MAX = 100_000  # classes beyond which reading the whole table beats reading their rows by key


@dataclass
class Snapshot:
    config: dict[str, Any]  # the collection row (GEN/NORM/AGG settings, index, version...)
    embedder: dict[str, Any] | None  # the embedder row
    engine: Engine  # the collection's database, where the class rows are read on demand
    # segment files by kind ("proxies", "samples", "template", "means", "candidates"), oldest first
    files: dict[str, list[str]]
    checksums: dict[str, str | None] = field(default_factory=dict)  # recorded per segment file
    n_vectors: dict[str, int] = field(default_factory=dict)  # written to each segment file
    list_sums: dict[str, bytes | None] = field(default_factory=dict)  # an IVF proxy file's per-list checksums
    label_kinds: set[str] = field(default_factory=set)  # "str", "int": one, but for collections made before 0.2
    fixed: Fixed = field(default_factory=Fixed)
    template: ProxyIndex | None = None  # an IVF index's trained, empty index
    proxies: ProxyIndex | None = None  # None until the first add
    means: ProxyIndex | None = None  # class means of a blend
    samples: ProxyIndex | None = None  # loaded on first need (re-imprinting a class, check)
    # (ids, vectors as added) of small segment files this process wrote: merged from memory by the
    # automatic compaction instead of read back (which costs an IVF quantizer and list walk per file)
    recent: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    loaded_table: ClassTable | None = None  # the whole class table, once something needed it
    read_at: int = -1  # the version read from the database (writers move ``version`` on from it)
    # the dead proxy ids the database named (schema.dead_proxies) and the version they were read at
    dead: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dead_at: int = -1
    head: LSHead | None = None  # a streaming ls collection's feature map and ridge (lshead.py)

    @property
    def table(self) -> ClassTable:
        """The whole class table, read on first use (see the module's docstring); writers keep it
        equal to the database once it is read."""
        if self.loaded_table is None:
            self.loaded_table = ClassTable.from_columns(self._read(classrows.class_columns))
        return self.loaded_table

    @property
    def n_classes(self) -> int:
        if self.loaded_table is not None:
            return len(self.loaded_table)
        return self.config["n_classes"] if self.version == self.read_at else self._read(store.n_classes)

    def rows_of(self, class_ids: np.ndarray, *, exist: bool = False) -> ClassTable:
        """The rows of these class ids (any order, repeats; those of no class absent): from the whole table if read,
        else by key, as this version has them; a ``CollectionChangedError`` if a later write changed one (or, with
        ``exist``, removed one; else a class gone counts as gone)."""
        ids = np.unique(np.asarray(class_ids, np.int64))
        if self.loaded_table is not None or len(ids) > ROWS_MAX:
            return self.table.subset(ids)
        with self.engine.connect() as conn:
            rows = classrows.class_rows(conn, ids)
        if (rows["changed"] > self.version).any() or (exist and len(rows["id"]) < len(ids)):
            raise CollectionChangedError(f"classes were changed since version {self.version} while it was read")
        return ClassTable.from_columns(rows)

    def live(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """Which vector ids of ``kind`` (ids in its files) belong to this version: for proxies, those
        not ``dead`` where that names every dead one (``dead_known``), else by ``ClassTable.live``."""
        if kind == "proxies" and self.dead_known():
            return ~np.isin(ids, self.dead)
        return self.rows_of(class_of(ids)).live(kind, ids)

    def dead_known(self) -> bool:
        """``dead`` names every dead proxy in the files: read at this version, none died before schema 0014."""
        live = self.config["live_proxies"]
        total = sum(self.n_vectors[f] for f in self.files["proxies"])
        return self.dead_at == self.version and live is not None and total == live + len(self.dead)

    def _read(self, read: Any) -> Any:
        """``read(conn)`` in a transaction that sees this snapshot's version; else ``CollectionChangedError``."""
        with self.engine.connect() as conn, conn.begin():
            if store.version(conn) != self.version:
                raise CollectionChangedError(f"the collection moved on from version {self.version} as it was read")
            return read(conn)

    @property
    def version(self) -> int:
        return self.config["version"]

    @property
    def dimension(self) -> int | None:
        return self.config["dimension"]

    @property
    def params(self) -> dict[str, Any]:
        """The concrete GEN/NORM/AGG parameters: the stored ones with what auto chose at the first add
        (before it, the stored ones, which may still say auto)."""
        chosen = json.loads(self.config["auto_choice"]) if self.config.get("auto_choice") else {}
        stored = {name: self.config[name] for name in STORED} | {"rejection": self.config["rejection"] or "max"}
        return stored | {k: v for k, v in chosen.items() if k in STORED}

    def width(self, kind: str) -> int:
        """``segments.width`` of this version (a ``CollectionStateError`` before it has a dimension)."""
        return segments.width(self.config | {"dimension": self.d}, kind)

    @property
    def searched(self) -> ProxyIndex:
        """The proxy index; a ``CollectionStateError`` before the first add made one."""
        if self.proxies is None:
            raise CollectionStateError("the collection has no classes yet")
        return self.proxies

    @property
    def d(self) -> int:
        """The vectors' dimension; a ``CollectionStateError`` before anything fixed it."""
        if self.dimension is None:
            raise CollectionStateError("the collection has no vectors yet, so no dimension")
        return self.dimension

    def sample_index(self, directory: Path) -> ProxyIndex:
        """The kept samples' index, read on first need."""
        self.samples = self.samples or self.merge(directory, "samples", self.files["samples"])
        return self.samples

    @property
    def auto_choice(self) -> dict[str, Any] | None:
        """What auto chose at the first add, with its CV table (None before it)."""
        chosen = self.config["auto_choice"]
        return json.loads(chosen) if chosen else None

    def outgrown(self, growth: float) -> bool:
        """Whether IVF lists (Flat or SQfp16 codes) were trained on under 1 / ``growth`` of the live proxies."""
        trained_on = self.config["trained_on"]
        return (self.template is not None and self.template.retrainable() and trained_on is not None
                and self.proxies is not None and self.proxies.ntotal >= growth * trained_on)  # fmt: skip

    def kept_samples(self, directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every kept sample (as stored: NORMpre'd), its class's table position and each class's label key."""
        table = self.table
        X = self.sample_index(directory).reconstruct(table.sample_ids(table.ids))
        return X, np.repeat(np.arange(len(table)), table.n_samples), lab.label_keys(table.labels.tolist())

    def listed(self) -> set[str]:
        """Every segment file this version names."""
        return {f for files in self.files.values() for f in files}

    def check_files(self, directory: Path) -> None:
        """A ``CollectionDamagedError`` if a segment file this version names is missing."""
        missing = sorted(f for f in self.listed() if not (directory / f).is_file())
        if missing:
            raise CollectionDamagedError(
                f"collection {directory}: index file {missing[0]} is missing ({len(missing)} in all); nothing was "
                "changed: run `imprint check`"
            )

    @property
    def search_params(self) -> dict[str, int]:
        """Stored search parameters of an approximate index (e.g. ``{"nprobe": 16}``)."""
        return json.loads(self.config["search_params"]) if self.config["search_params"] else {}

    def record(self, kind: str, segment: segments.Segment, n_vectors: int) -> None:
        """Note a segment file of ``kind`` just committed (by a write or a compaction)."""
        self.files[kind].append(segment.name)
        self.n_vectors[segment.name] = n_vectors
        self.checksums[segment.name] = segment.checksum
        self.list_sums[segment.name] = segment.lists

    def new_index(self, kind: str, index: Any = None) -> ProxyIndex:
        """An empty in-memory index for ``kind``: a copy of the trained template, or exact; or, given
        a FAISS ``index`` read from a segment of that kind, that one."""
        if kind == "proxies" and self.template is not None and index is None:
            out = self.template.empty_like()
            out.search_params = self.search_params
            return out
        if kind == "proxies":
            return ProxyIndex(
                self.width(kind),
                self.config["metric"],
                self.fixed.transform,
                with_ids=True,
                search_params=self.search_params,
                index=index,
            )
        if kind == "means":
            return ProxyIndex(self.width(kind), self.config["metric"], self.fixed.transform, with_ids=True, index=index)
        return ProxyIndex(self.d, "euclidean", None, with_ids=True, index=index)

    def merge(
        self,
        directory: Path,
        kind: str,
        files: list[str],
        opened: dict[str, BinaryIO] | None = None,
        *,
        all_live: bool = False,
        dropped: list[np.ndarray] | None = None,
    ) -> ProxyIndex:
        """The live vectors (``live``; ``all_live``: known to be all) of these ``kind`` segment files, in one
        index; the dead ones' ids appended to ``dropped``, if given. Files not in ``opened`` are opened here:
        only the writer may. One file is used as read (no copy: a compacted collection opens faster)."""
        merged, read, dropped = self.new_index(kind), False, [] if dropped is None else dropped
        kept: list[tuple[np.ndarray, np.ndarray]] = []

        def add_kept() -> None:  # consecutive kept files in one add (one coarse assignment), dead left out
            if kept:
                ids, vectors = np.concatenate([k[0] for k in kept]), np.concatenate([k[1] for k in kept])
                live = np.ones(len(ids), bool) if all_live else self.live(kind, ids)
                merged.add(vectors[live], ids[live])
                dropped.append(ids[~live])
                kept.clear()

        with ExitStack() as stack:
            for name in files:  # in file order: an exact index breaks equal scores by row
                if name in self.recent:
                    kept.append(self.recent[name])
                    continue
                add_kept()
                read = True
                file = (
                    opened[name]
                    if opened and name in opened
                    else stack.enter_context(segments.open_segment(directory, name))
                )
                index = segments.read_segment(directory, name, file, self.width(kind), self.checksums.get(name))
                if kind == "proxies" and self.template is not None:
                    index = segments.share_quantizer(directory, name, index, self.template.index)
                if len(files) == 1 and segments.same_kind(index, merged.index):
                    merged = self.new_index(kind, index)
                    break
                try:
                    merged.merge(index)
                except RuntimeError as exc:  # FAISS refuses to merge indexes of different kinds
                    raise CollectionDamagedError(
                        f"collection {directory}: index file {name} does not hold a "
                        f"{kind} index like the others ({str(exc).strip().splitlines()[-1]})"
                    ) from None
        add_kept()
        if not read or all_live:  # every vector came from memory, the dead left out already
            return merged
        ids = merged.ids
        dead = ids[~self.live(kind, ids)]
        dropped.append(dead)
        if len(dead):
            merged.remove(dead)
        return merged

    def proxy_sources(self, directory: Path, files: list[str]) -> list[tuple[Any, Any]]:
        """The IVF index of each proxy file (mapped where possible, or from ``recent``), each with the check of its
        lists before they are read (None: checked whole on reading), for ``listfiles.write_lists``. Writer only."""
        out: list[tuple[Any, Any]] = []
        for name in files:
            if name in self.recent:
                ids, vectors = self.recent[name]
                index = self.new_index("proxies")
                index.add(vectors, ids)
                out.append((index.index, None))
                continue
            with segments.open_segment(directory, name) as file:
                if not segments.can_map():
                    out.append(
                        (
                            segments.read_segment(
                                directory, name, file, self.width("proxies"), self.checksums.get(name)
                            ),
                            None,
                        )
                    )
                    continue
                mapped, verifier = self._mapped(directory, name, file)
            out.append((mapped, verifier.ensure))
        return out

    def written_proxies(self, directory: Path, segment: segments.Segment, n_vectors: int) -> ProxyIndex:
        """The proxy file ``segment`` this writer just wrote (``n_vectors`` in it), mapped where possible, searchable
        with the template's quantizer: what a compaction tunes and builds candidates on, not held in memory."""
        name = segment.name
        with segments.open_segment(directory, name) as file:
            if segments.can_map():
                index = segments.map_segment(directory, name, file, self.width("proxies"), n_vectors)
            else:
                index = segments.read_segment(directory, name, file, self.width("proxies"), segment.checksum)
        assert self.template is not None  # only IVF proxies are written list by list
        return self.new_index("proxies", segments.share_quantizer(directory, name, index, self.template.index))

    def reopen_proxies(self, directory: Path) -> None:
        """Open the proxies again from the files this version names (as ``read`` does: the large ones
        mapped, with their candidates), dropping what was held in memory. Only the writer may call it."""
        with ExitStack() as stack:
            opened = {
                name: stack.enter_context(segments.open_segment(directory, name))
                for name in [*self.files["proxies"], *self.files["candidates"]]
            }
            self.config["live_proxies"] = self._read(store.live_proxies)  # this process's writes moved both
            self.dead, self.dead_at = self._read(store.dead_proxy_ids), self.version
            self.proxies = self.open_proxies(directory, opened)

    def candidates_of(self, directory: Path, name: str, opened: dict[str, BinaryIO]) -> tuple[faiss.Index, Any] | None:
        """The fast-scan candidates of proxy file ``name`` (refine.py) and the check of their lists:
        mapped, each list checked when first probed, where their checksums were recorded
        (listfiles.py); else read and checked whole (no check left: None). None if it has none."""
        pair = segments.candidates_of(name)
        if pair not in self.files["candidates"]:
            return None
        assert self.template is not None  # candidates are written for IVF proxies only
        if (lists := self.list_sums.get(pair)) is not None and segments.can_map():
            index = segments.map_segment(directory, pair, opened[pair], self.width("proxies"), self.n_vectors[pair])
            verify = ListVerifier(directory, pair, index, lists).ensure
        else:
            index, verify = (
                segments.read_segment(directory, pair, opened[pair], self.width("proxies"), self.checksums.get(pair)),
                None,
            )
        if index.ntotal != self.n_vectors[name]:
            raise CollectionDamagedError(
                f"collection {directory}: index file {pair} holds {index.ntotal} candidates for the "
                f"{self.n_vectors[name]} proxies of {name}"
            )
        return segments.share_quantizer(directory, pair, index, self.template.index, same=False), verify

    def open_proxies(self, directory: Path, opened: dict[str, BinaryIO]) -> ProxyIndex:
        """The proxies of these segment files: each IVF file of at least ``segments.MAP_MIN`` bytes
        memory-mapped (``mapped.MappedProxyIndex``), the rest read and merged."""
        files = self.files["proxies"]
        live = self.config["live_proxies"]  # kept by triggers: no read of the class table (schema.py)
        all_live = live is not None and sum(self.n_vectors[f] for f in files) == live  # no removals since written
        sizes = {name: os.fstat(opened[name].fileno()).st_size for name in files}
        large = [f for f in files if sizes[f] >= segments.MAP_MIN]
        if self.template is None or not large or not segments.can_map():
            return self.merge(directory, "proxies", files, opened, all_live=all_live)
        parts = []
        for name in large:
            index, verifier = self._mapped(directory, name, opened[name])
            index = segments.share_quantizer(directory, name, index, self.template.index)
            parts.append(Mapped(index, verifier, *(self.candidates_of(directory, name, opened) or ())))
        small = [f for f in files if f not in large]
        out = MappedProxyIndex(self.merge(directory, "proxies", small, opened, all_live=all_live), parts)
        if not all_live:  # dead proxies in the files: those the database names (Lucene's per-segment deletes:
            ids = self.dead if self.dead_known() else out.mapped_ids()  # O(dead)), else every mapped id checked
            out.mark_dead(ids[~self.live("proxies", ids)])
        return out

    def _mapped(self, directory: Path, name: str, file: BinaryIO) -> tuple[faiss.Index, Any]:
        """Proxy file ``name`` mapped (without its quantizer), and the check of its lists: per list
        where their checksums were recorded, else of the whole file before its first answer."""
        index = segments.map_segment(directory, name, file, self.width("proxies"), self.n_vectors[name])
        lists = self.list_sums.get(name)
        if lists is not None:
            return index, ListVerifier(directory, name, index, lists)
        return index, FileVerifier(directory, name, file, self.checksums.get(name))


def read(directory: Path, engine: Engine, *, samples: bool = False, table: bool = False) -> Snapshot:
    """The committed version now on disk: database rows and the segments they name (the samples' too with
    ``samples``; the whole class table with ``table``). Read again where a write changed the class rows of the small
    segment files' vectors before they were read (``CollectionChangedError``), the last time with the whole table,
    in the same transaction: a read never fails for other processes' writes."""
    for _ in range(STALE_READS - 1):
        try:
            return _read(directory, engine, samples, table)
        except CollectionChangedError:
            pass
    return _read(directory, engine, samples, True)


def _read(directory: Path, engine: Engine, samples: bool, table: bool) -> Snapshot:
    with ExitStack() as stack:
        with segments.reading(directory):
            with engine.connect() as conn, conn.begin():
                cfg, emb, label_kinds, segs = store.read_state(conn)
                dead = store.dead_proxy_ids(conn)  # as the class rows: in the same transaction
                whole = ClassTable.from_columns(classrows.class_columns(conn)) if table else None
            kinds = KINDS if samples else ("template", "proxies", "means", "candidates", "gram")
            opened = {
                name: stack.enter_context(segments.open_segment(directory, name))
                for kind, name, *_ in segs
                if kind in kinds or (kind == "samples" and cfg["generator"] == "ls")  # a head's replay reads some
            }
        d = cfg["dimension"]
        snap = Snapshot(
            cfg,
            emb,
            engine,
            {kind: [f for k, f, *_ in segs if k == kind] for kind in KINDS},
            {f: checksum for _, f, checksum, *_ in segs},
            {f: n for _, f, _, n, _ in segs},
            {f: lists for _, f, _, _, lists in segs},
            label_kinds,
            loaded_table=whole,
            read_at=cfg["version"],
            dead=dead,
            dead_at=cfg["version"],
        )
        snap.fixed = Fixed(
            np.frombuffer(cfg["quantile_targets"], np.float32).copy() if cfg["quantile_targets"] else None,
            np.frombuffer(cfg["metric_transform"], np.float32).reshape(d, d).copy()
            if cfg["metric_transform"]
            else None,
        )
        if gram := snap.files["gram"]:  # a streaming ls head's Gram matrix, and the samples written since
            G = segments.read_array(directory, gram[0], opened[gram[0]], snap.checksums[gram[0]])
            since = [f for f in snap.files["samples"] if segments.version_of(f) > segments.version_of(gram[0])]
            replayed = snap.merge(directory, "samples", since, opened, all_live=True)
            snap.head = LSHead.from_gram(cfg, G, snap.n_vectors[gram[0]], replayed.reconstruct(replayed.ids))
        template = snap.files["template"]
        if template:
            index = segments.read_segment(
                directory, template[0], opened[template[0]], snap.width("template"), snap.checksums[template[0]]
            )
            snap.template = ProxyIndex(d, cfg["metric"], snap.fixed.transform, index=index)
        ready = d is not None and (cfg["metric"] != "mahalanobis" or snap.fixed.transform is not None)
        if ready and (cfg["index_factory"] == "Flat" or template):
            snap.proxies = snap.open_proxies(directory, opened)
            if snap.files["means"]:
                snap.means = snap.merge(directory, "means", snap.files["means"], opened)
        if samples and cfg["keep_samples"] and d:
            snap.samples = snap.merge(directory, "samples", snap.files["samples"], opened)
    return snap
