"""Settings, declared once: every GEN/NORM/AGG parameter and collection setting with its default,
its check and its help text, and the presets that name published methods.

``ImprintClassifier`` takes its defaults from ``DEFAULTS`` (``IMPRINT``, ``RUNTIME``), ``Collection.create`` resolves
its keyword arguments with ``resolve``, and ``imprint`` builds its options from ``IMPRINT`` and ``COLLECTION``: one
place to read what a parameter means and defaults to. Names follow the paper (docs/design.md): NORMpre / GEN /
NORMpost / NORMinf / AGG.
"""

from __future__ import annotations

import difflib
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

from .errors import DeviceError, InvalidParameterError

# The vocabulary of the settings, as plain data: the modules that implement each choice import it
# from here, so this module imports nothing of the package but its errors (and nothing heavy:
# ``imprint --help`` reads it without numpy or FAISS).
AUTO = "auto"  # a setting left to cross-validation (auto.py)
PAPER_K = 20  # k of the k-means family when neither the user nor auto sets it (the paper's best)
PRE_NORMS = ("none", "l2")  # normalize.py
POST_NORMS = ("none", "l2", "quantile")
INF_NORMS = ("none", "l2")
AGGREGATIONS = ("max", "mnn", "blend")  # aggregate.py
VOTES = ("uniform", "distance")
METRICS = ("ip", "cosine", "euclidean", "manhattan", "chebyshev", "mahalanobis")  # index.py
RULES = ("max", "shift")  # openset.py: open-set rejection rules
MARGIN = 1.0  # binomial standard errors a calibration target is cleared by on the validation queries
DEVICES = (None, "cpu", "cuda", "auto")  # device.py; and "cuda:N"
DEFAULT_MODEL = "all-MiniLM-L6-v2"  # the packaged sentence-transformers model (embed.py)
DEFAULT_PORT = 8000  # imprint serve


@dataclass(frozen=True)
class GeneratorKind:
    """What the settings need to know of a generator (GEN); its code is ``generate.GENERATORS``'s."""

    fixed_k: int | None = None  # where k is not taken: the k its proxies amount to (mean, ls: 1; all: -1)
    shared_k_rule: bool = True  # classes with n_c <= k keep all their samples (generate.generate applies it)
    per_class: bool = True  # False: a class's proxies depend on the other classes, so no collection can grow it

    @property
    def takes_k(self) -> bool:
        return self.fixed_k is None


# The generators there are, by name; ``generate.register`` adds to it.
GENERATOR_KINDS: dict[str, GeneratorKind] = {
    "all": GeneratorKind(fixed_k=-1, shared_k_rule=False),
    "mean": GeneratorKind(fixed_k=1, shared_k_rule=False),
    "kmeans": GeneratorKind(),
    "kmedoids": GeneratorKind(),
    "random": GeneratorKind(),
    "fps": GeneratorKind(),
    "cov_max": GeneratorKind(),
    "ls": GeneratorKind(fixed_k=1, shared_k_rule=False, per_class=False),
    "kls": GeneratorKind(shared_k_rule=False, per_class=False),
}


def _is_int(value: object) -> TypeGuard[numbers.Integral]:
    """An int or numpy integer (numpy registers those as ``numbers.Integral``; not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> TypeGuard[numbers.Real]:
    """A finite-or-not real number, not a bool (numpy's bool is not a ``numbers.Real``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_size(text: str | int) -> int:
    """Bytes from ``"8GB"``, ``"512MiB"``, ``"1.5G"`` or an int."""
    if _is_int(text):
        return int(text)
    units = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
             "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}  # fmt: skip
    value = str(text).strip().upper()
    number = value.rstrip("KMGTIB ")
    unit = value[len(number) :].strip()
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise InvalidParameterError(f"memory budget {text!r} is not a size like 8GB or 512MiB") from None


def check_device(name: str, device: Any) -> str | None:
    """``device`` if it is one of ``DEVICES`` or ``"cuda:N"``, else a ``DeviceError`` naming it."""
    if device in DEVICES or (isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise DeviceError(f"{name}={device!r} is not valid; expected one of None, 'cpu', 'cuda', 'cuda:N', 'auto'")


def check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int >= ``low``, or an ``InvalidParameterError`` naming the argument."""
    if not _is_int(value) or value < low:
        raise InvalidParameterError(f"{name}={value!r} is not valid; expected an integer >= {low}")
    return int(value)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else an ``InvalidParameterError`` listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise InvalidParameterError(
            f"{name}={value!r} is not valid; expected one of " + ", ".join(repr(a) for a in allowed)
        )
    return value


def check_k(name: str, value: object) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not (int(value) >= 1 or value == -1):
        raise InvalidParameterError(
            f"{name}={value!r} is not valid; expected a positive integer, -1 for every sample, or None"
        )
    return int(value)


def check_alpha(name: str, value: object) -> float | None:
    if value is None:
        return None
    if not _is_real(value) or not 0 <= float(value) <= 1:
        raise InvalidParameterError(f"{name}={value!r} is not valid; expected a number in [0, 1], or None")
    return float(value)


def check_seed(name: str, value: object) -> Any:
    """An int, None or a ``RandomState`` (the estimator; collections need an int, see ``resolve``)."""
    np = sys.modules.get("numpy")  # a RandomState comes from numpy, so numpy is loaded if value is one
    if value is None or (np is not None and isinstance(value, np.random.RandomState)):
        return value
    return check_int(name, value, 0)


def check_ridge(name: str, value: object) -> float | str:
    if value == AUTO:
        return AUTO
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise InvalidParameterError(f"{name}={value!r} is not valid; expected a finite number >= 0, or 'auto'")
    return float(value)


def check_temperature(name: str, value: object) -> float | str:
    if value == AUTO:
        return AUTO
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise InvalidParameterError(f"{name}={value!r} is not valid; expected a finite number > 0, or 'auto'")
    return float(value)


def check_optional_str(name: str, value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise InvalidParameterError(f"{name}={value!r} is not valid; expected a non-empty string or None")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool) and type(value).__name__ not in ("bool", "bool_"):  # numpy's bool
        raise InvalidParameterError(f"{name}={value!r} is not valid; expected True or False")
    return bool(value)


def check_index(name: str, value: object) -> str:
    if not isinstance(value, str) or not (value in ("Flat", "auto") or value.startswith("IVF")):
        raise InvalidParameterError(
            f"{name}={value!r} is not valid; expected 'Flat', 'auto' or a FAISS IVF "
            "factory string such as 'IVF4096,SQ8' or 'IVF4096,PQ48x4fs,Refine(SQfp16)'"
        )
    return value


def check_search_params(name: str, value: object) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidParameterError(f"{name}={value!r} is not valid; expected a dict such as {{'nprobe': 32}}")
    return {key: check_int(f"{name}[{key!r}]", v, 1) for key, v in value.items()}


def check_positive_or_none(name: str, value: object) -> int | None:
    return None if value is None else check_int(name, value, 1)


@dataclass(frozen=True)
class Param:
    """One setting: its default, what it means, and the choices it takes (a function: registries grow) or a
    ``check(name, value)`` that returns the value or raises."""

    name: str
    default: Any
    help: str
    choices: Callable[[], tuple[str, ...]] | None = None
    check: Callable[[str, Any], Any] | None = None
    type: type = str  # what a command line parses the value as

    def validate(self, value: Any) -> Any:
        if self.choices is not None:
            return check_choice(self.name, value, self.choices())
        assert self.check is not None, f"setting {self.name} has neither choices nor a check"
        return self.check(self.name, value)


# GEN/NORM/AGG: the estimator's constructor parameters; collections store all but ls_reg, features and temperature.
IMPRINT: dict[str, Param] = {
    p.name: p
    for p in (
        Param(
            "generator",
            AUTO,
            "GEN: how a class's samples become proxies; auto: chosen with k by cross-validation.",
            lambda: (AUTO, *GENERATOR_KINDS),
        ),
        Param(
            "k",
            None,
            f"Proxies per class; -1 keeps every sample, a class with n_c <= k keeps all. None: chosen "
            f"by generator auto, else the paper's {PAPER_K}.",
            check=check_k,
            type=int,
        ),
        Param("pre_norm", "l2", "NORMpre, applied to samples before GEN.", lambda: PRE_NORMS),
        Param("post_norm", "l2", "NORMpost, applied to proxies.", lambda: POST_NORMS),
        Param("inf_norm", "l2", "NORMinf, applied to queries.", lambda: INF_NORMS),
        Param(
            "aggregation",
            AUTO,
            "AGG: max (top-1 proxy), mnn (the m nearest proxies vote), blend (alpha x the "
            "class mean + (1 - alpha) x the best proxy) or auto (max or blend, chosen by cross-validation).",
            lambda: (AUTO, *AGGREGATIONS),
        ),
        Param(
            "alpha",
            None,
            "Weight of the class mean in aggregation blend; None: chosen by cross-validation.",
            check=check_alpha,
            type=float,
        ),
        Param(
            "m", 1, "Neighbours that vote with aggregation mnn.", check=lambda name, v: check_int(name, v, 1), type=int
        ),
        Param("metric", "ip", "Similarity of queries and proxies.", lambda: METRICS),
        Param("vote", "uniform", "m-NN vote weights: uniform, or distance (1 / (dist + 1e-10)).", lambda: VOTES),
        Param("random_state", 0, "Seed of the per-class random draws.", check=check_seed, type=int),
        Param(
            "rejection",
            "max",
            "Open-set score compared with a threshold: max (the best class's score) or shift "
            "(that score minus the class's mean score for its own samples, each left out; calibrate switches to it "
            "where it does better).",
            lambda: RULES,
        ),
        Param(
            "ls_reg",
            AUTO,
            "Ridge lambda of the ls / kls heads; auto: chosen by leave-one-out.",
            check=check_ridge,
            type=float,
        ),
        Param(
            "features",
            None,
            "Width of the random ReLU features that replace the embeddings before NORMpre and "
            "NORMinf (a fixed map drawn from random_state, features.py); they let the ls head bend, e.g. 2000. "
            "None: the embeddings as given.",
            check=check_positive_or_none,
            type=int,
        ),
        Param(
            "temperature",
            AUTO,
            "predict_proba: the softmax of the class scores divided by this (scores are "
            "similarities in [-1, 1]: 0.05 makes a 0.1 lead about 7x as likely); auto: fitted to out-of-fold scores "
            "of the training data, so that the probabilities are calibrated (temperature.py).",
            check=check_temperature,
            type=float,
        ),
    )
}
# Probabilities are the estimator's. A collection's ls is the streaming head (lshead.py), which fixes LS_FIXED.
STORED = tuple(name for name in IMPRINT if name != "temperature")
LS_FIXED = dict(aggregation="max", post_norm="none", metric="ip", keep_samples=True, rejection="max")

# How a collection stores and serves its head: fixed when it is created.
COLLECTION: dict[str, Param] = {
    p.name: p
    for p in (
        Param(
            "model",
            DEFAULT_MODEL,
            "Embedding model (name or path) recorded for texts; none (None in Python): "
            "a collection of precomputed vectors.",
            check=check_optional_str,
        ),
        Param(
            "index",
            "Flat",
            "Proxy index: Flat (exact), a FAISS IVF factory string such as IVF4096,SQ8 or "
            "IVF4096,PQ48x4fs,Refine(SQfp16) (fast-scan candidates re-ranked from float16 codes), or auto "
            "(chosen from memory_budget).",
            check=check_index,
        ),
        Param(
            "memory_budget",
            None,
            "Bytes the proxies may hold in memory with index auto, e.g. 8GB.",
            check=lambda name, v: None if v is None else parse_size(v),
        ),
        Param(
            "search_params", None, "Search parameters of an IVF index, e.g. {'nprobe': 32}.", check=check_search_params
        ),
        Param(
            "keep_samples",
            True,
            "Keep samples so a class can be re-imprinted when it gets more.",
            check=check_bool,
            type=bool,
        ),
        Param("dimension", None, "Vector dimension (None: taken from the first add).", check=check_positive_or_none),
    )
}

# Where the kernels run: a setting of the process (device.py), never stored with a collection.
RUNTIME: dict[str, Param] = {
    p.name: p
    for p in (
        Param(
            "device",
            None,
            "Where k-means and exact search run: none (numpy and FAISS), cpu or cuda (the torch "
            "backend), auto (cuda when torch sees a GPU, else none, with a notice).",
            check=check_device,
        ),
    )
}

_ESTIMATOR = IMPRINT | RUNTIME  # the estimator's parameters
DEFAULTS: dict[str, Any] = {name: p.default for name, p in _ESTIMATOR.items()}

# How ingestion writes: rows per atomic write (ingestion.py); larger inputs go chunk by chunk, resumably.
DEFAULT_CHUNK = 20_000

# The published methods in IMPRINT terms: NORMpre/GEN/NORMpost/NORMinf/AGG.
PRESETS: dict[str, dict[str, Any]] = {
    # Qi et al. 2018: L2/mean/L2/L2/max
    "qi": dict(pre_norm="l2", generator="mean", post_norm="l2", inf_norm="l2", aggregation="max"),
    # Hosoda et al.: none/mean/quantile/none/max
    "hosoda": dict(pre_norm="none", generator="mean", post_norm="quantile", inf_norm="none", aggregation="max"),
    # Janson et al.: none/mean/none/none/1-NN Euclidean, distance-weighted
    "janson": dict(
        pre_norm="none",
        generator="mean",
        post_norm="none",
        inf_norm="none",
        aggregation="mnn",
        m=1,
        metric="euclidean",
        vote="distance",
    ),
    # The paper's best: L2/k-means k=20/L2/L2/max
    "imprint": dict(pre_norm="l2", generator="kmeans", k=20, post_norm="l2", inf_norm="l2", aggregation="max"),
    # k and max-or-blend chosen from the training data by cross-validation (the default)
    "auto": dict(pre_norm="l2", generator=AUTO, k=None, post_norm="l2", inf_norm="l2", aggregation=AUTO, alpha=None),
}


def _unknown(name: str, known: dict[str, Param]) -> InvalidParameterError:
    if name in _ESTIMATOR:
        return InvalidParameterError(
            f"setting {name!r} is ImprintClassifier's only: a collection grows one class "
            f"at a time and does not take it (settings: {', '.join(known)})"
        )
    close = difflib.get_close_matches(name, list(known), n=1)
    return InvalidParameterError(
        f"unknown setting {name!r}"
        + (f"; did you mean {close[0]!r}?" if close else "")
        + f" (settings: {', '.join(known)})"
    )


def preset(name: str | None) -> dict[str, Any]:
    """The parameters of a preset (``{}`` for None)."""
    return {} if name is None else dict(PRESETS[check_choice("preset", name, tuple(PRESETS))])


def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """The GEN/NORM/AGG (and ``RUNTIME``) parameters in ``params``, each checked, and their combination."""
    out = {name: _ESTIMATOR[name].validate(value) for name, value in params.items()}
    aggregation = out.get("aggregation", AUTO)
    if aggregation != "mnn" and out.get("m", 1) != 1:
        raise InvalidParameterError(f"m={out['m']!r} is only used with aggregation='mnn'")
    if aggregation in ("max", "mnn") and out.get("alpha") is not None:
        raise InvalidParameterError(f"alpha={out['alpha']!r} is only used with aggregation='blend' or 'auto'")
    if aggregation == "mnn" and out.get("generator") == AUTO and out.get("k") is None:
        raise InvalidParameterError(
            "generator='auto' chooses k for aggregation max or blend; with aggregation='mnn' give k (or a generator)"
        )
    return out


def collection_scope() -> dict[str, Param]:
    """The settings ``Collection.create`` takes: the stored GEN/NORM/AGG parameters and ``COLLECTION``."""
    return {name: IMPRINT[name] for name in STORED} | COLLECTION


def resolve(given: dict[str, Any], scope: dict[str, Param], preset_name: str | None = None) -> dict[str, Any]:
    """Every setting of ``scope``: its default, overlaid by the preset, then ``given``; each checked (a name
    outside ``scope`` is an error suggesting the closest one)."""
    for name in given:
        if name not in scope:
            raise _unknown(name, scope)
    merged = {name: p.default for name, p in scope.items()} | preset(preset_name) | given
    checked = check_params({name: v for name, v in merged.items() if name in IMPRINT})
    return checked | {name: scope[name].validate(v) for name, v in merged.items() if name not in IMPRINT}


def check_collection(s: dict[str, Any]) -> dict[str, Any]:
    """What a collection needs of its resolved settings ``s`` beyond each one's own check."""
    if s["generator"] == "ls":  # the streaming least-squares head (lshead.py) fixes these
        for name, value in LS_FIXED.items():
            if s[name] not in (value, (IMPRINT | COLLECTION)[name].default):
                raise InvalidParameterError(f"{name}={s[name]!r} is not valid with generator='ls': the streaming "
                                            f"ls head takes {name}={value!r} (docs/collections.md)")  # fmt: skip
        for name, bad in (("k", s["k"] not in (None, 1)), ("index", s["index"] == AUTO or "Refine" in s["index"])):
            if bad:  # one mean a class; its index exact, or IVF lists of means (fast-scan candidates: not yet)
                raise InvalidParameterError(f"{name}={s[name]!r} is not valid with generator='ls' (collections.md)")
        return s | LS_FIXED
    for name in ("ls_reg", "features"):
        if s[name] != IMPRINT[name].default:
            raise InvalidParameterError(f"{name}={s[name]!r} is a setting of generator='ls' (the streaming head)")
    if s["generator"] != AUTO and not GENERATOR_KINDS[s["generator"]].per_class:
        raise InvalidParameterError(
            f"generator={s['generator']!r} needs every class at once (it is not imprinting), "
            "so it cannot grow a collection one class at a time; use ImprintClassifier for it"
        )
    if not isinstance(s["random_state"], int):
        raise InvalidParameterError(f"random_state={s['random_state']!r} is not valid; a collection needs an int seed")
    if s["aggregation"] == "blend" and s["index"] != "Flat":
        raise InvalidParameterError(
            "aggregation='blend' needs index='Flat': its exact search scores the class means "
            "beside the proxies (with an IVF index, auto chooses k under max)"
        )
    if s["index"] == "auto" and s["memory_budget"] is None:
        raise InvalidParameterError("index='auto' chooses from a memory budget: give memory_budget, e.g. '8GB'")
    return s
