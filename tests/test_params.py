"""One declaration per setting: the estimator, collections and the CLI agree on every default,
and presets work everywhere."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import blobs

from retrieval_imprint import DEFAULTS, PRESETS, Collection, ImprintClassifier, auto
from retrieval_imprint.cli import main
from retrieval_imprint.errors import InvalidParameterError
from retrieval_imprint.params import COLLECTION, IMPRINT, STORED, collection_scope, resolve


def test_the_estimator_takes_exactly_the_declared_parameters_with_their_defaults():
    signature = inspect.signature(ImprintClassifier)
    assert {name: p.default for name, p in signature.parameters.items()} == DEFAULTS
    assert ImprintClassifier().get_params() == DEFAULTS


def test_a_collection_created_without_settings_stores_the_declared_defaults(tmp_path):
    config = Collection.create(tmp_path / "c", model=None).config
    assert {name: config[name] for name in STORED} == {name: DEFAULTS[name] for name in STORED}
    assert config["index_factory"] == COLLECTION["index"].default
    assert config["keep_samples"] == COLLECTION["keep_samples"].default
    assert Collection.create(tmp_path / "m").model == COLLECTION["model"].default


def test_the_cli_creates_collections_with_the_declared_defaults(tmp_path):
    X, y = blobs(3, 25, 5)
    np.savez(tmp_path / "v.npz", X=X, y=y)
    result = CliRunner().invoke(
        main, ["index", str(tmp_path / "c"), str(tmp_path / "v.npz"), "--model", "none", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    config = Collection.open(tmp_path / "c").config
    assert {name: config[name] for name in STORED} == {name: DEFAULTS[name] for name in STORED}
    assert config["index_factory"] == "Flat" and config["keep_samples"] is True


def test_the_cli_help_shows_every_setting_with_its_declared_default():
    out = CliRunner().invoke(main, ["index", "--help"], terminal_width=1000).output
    for name in [*STORED, "model", "index", "keep_samples"]:
        p = IMPRINT.get(name) or COLLECTION[name]
        assert f"--{name.replace('_', '-')}" in out
        shown = "none" if p.default is None else p.default
        assert f"[default: {shown}]" in " ".join(out.split()), name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_give_the_same_head_in_the_estimator_collections_and_the_cli(tmp_path, name, monkeypatch):
    X, y = blobs(4, 12, 6, seed=3)
    labels = [f"c{v}" for v in y]
    if name == "auto":  # a collection's auto chooses among the imprinted heads (its head's kind is fixed when made)
        weighed = ImprintClassifier.from_preset(name).fit(X, labels).cv_results_
        assert [r["generator"] for r in weighed].count("ls") == 1  # the estimator weighs the ls head too
        monkeypatch.setattr(auto, "LS_ROWS", -1)
    clf = ImprintClassifier.from_preset(name).fit(X, labels)
    col = Collection.create(tmp_path / "api", model=None, preset=name)
    col.add(X, labels)
    np.savez(tmp_path / "v.npz", X=X, y=np.array(labels))
    result = CliRunner().invoke(
        main, ["index", str(tmp_path / "cli"), str(tmp_path / "v.npz"), "--model", "none", "--preset", name, "--quiet"]
    )
    assert result.exit_code == 0, result.output
    cli = Collection.open(tmp_path / "cli")
    for key, value in PRESETS[name].items():
        assert col.config[key] == cli.config[key] == value
    Q = blobs(4, 5, 6, seed=4)[0]
    np.testing.assert_array_equal(col.predict(Q), clf.predict(Q))
    np.testing.assert_array_equal(cli.predict(Q), clf.predict(Q))


def test_an_option_beside_a_preset_wins(tmp_path):
    col = Collection.create(tmp_path / "c", model=None, preset="imprint", k=5)
    assert col.config["k"] == 5 and col.config["generator"] == "kmeans"


def test_settings_are_checked_once_with_a_message_that_names_them(tmp_path):
    with pytest.raises(InvalidParameterError, match="unknown setting 'kk'; did you mean 'k'"):
        resolve({"kk": 3}, collection_scope())
    with pytest.raises(InvalidParameterError, match="generator='kmean' is not valid; expected one of"):
        resolve({"generator": "kmean"}, collection_scope())
    with pytest.raises(InvalidParameterError, match="m=3 is only used with aggregation='mnn'"):
        resolve({"m": 3}, collection_scope())
    with pytest.raises(InvalidParameterError, match="preset='nope' is not valid"):
        resolve({}, collection_scope(), "nope")
    with pytest.raises(InvalidParameterError, match="memory budget '8 parsecs'"):
        resolve({"memory_budget": "8 parsecs"}, collection_scope())
    for name, value in (("ls_reg", 0.5), ("features", 100)):  # the streaming ls head's settings (lshead.py)
        with pytest.raises(InvalidParameterError, match=f"{name}={value} is a setting of generator='ls'"):
            Collection.create(tmp_path / name, model=None, **{name: value})


def test_open_or_create_opens_and_lists_every_clash(tmp_path):
    first = Collection.open_or_create(tmp_path / "c", model=None, k=3)
    again = Collection.open_or_create(tmp_path / "c", model=None, k=3)
    assert again.config == first.config
    with pytest.raises(ValueError, match=r"k=4 \(collection: 3\); generator='mean' \(collection: 'auto'\)"):
        Collection.open_or_create(tmp_path / "c", k=4, generator="mean")
    with pytest.raises(ValueError, match=r"model='all-MiniLM-L6-v2' \(collection: None\)"):
        Collection.open_or_create(tmp_path / "c", model="all-MiniLM-L6-v2")


def test_index_json_reports_every_field(tmp_path):
    X, y = blobs(3, 25, 5)
    np.savez(tmp_path / "v.npz", X=X, y=y)
    out = json.loads(
        CliRunner()
        .invoke(main, ["index", str(tmp_path / "c"), str(tmp_path / "v.npz"), "--model", "none", "--quiet", "--json"])
        .output
    )
    choice = out.pop("auto_choice")
    assert out == {
        "collection": str(tmp_path / "c"),
        "rows": 75,
        "resumed_after": 0,
        "new_classes": 3,
        "classes": 3,
        "proxies": out["proxies"],
        "retrained": False,
        "skipped": [],
        "created": True,
    }
    per_class = {"mean": 1, "all": 25}.get(choice["generator"], choice["k"])
    assert out["proxies"] == 3 * per_class
    assert len(choice["cv_results"]) == 1 + 6 * 5  # the mean; k in 2..20 and all, each under max or 4 blends
    best = max(r["correct"] for r in choice["cv_results"])
    chosen = [
        r
        for r in choice["cv_results"]
        if all(r[key] == choice[key] for key in ("generator", "k", "aggregation", "alpha"))
    ]
    assert chosen[0]["correct"] == best
