"""Shards that cannot go stale, corrupt or collide (issue 16, items 1-3), with fault injection.

* stale: everything that changes a number is in the key (weights, dtype, device kind, attention
  implementation, :data:`headlab.shards.RESULTS_VERSION`, the prompts, the settings); numpy values key
  like Python values;
* corrupt: a shard cut short, emptied, deleted, with a truncated marker or copied over another is
  recomputed with one stderr line naming it and the reason (never a raw pyarrow / JSON traceback);
* concurrent: real processes on one folder compute each point once; a killed holder's lock is taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from headlab import shards, sweeps, tasks

REPO = Path(__file__).resolve().parents[1]
POINTS = [{"a": i, "b": "odd" if i % 2 else "even", "level": 0.5 * i} for i in range(6)]
BASE = {"task": {"k": 2}}


def _compute(calls: list):
    def compute(point):
        calls.append(point)
        i = point["a"]
        return {"main": pd.DataFrame({"a": [i] * 3, "j": range(3), "v": [i * 10.0 + j / 7 for j in range(3)]}),
                "extra": pd.DataFrame({"a": [i], "b": [point["b"]]})}

    return compute


# --------------------------------------------------------------------------------------------------
# 1. Stale results
# --------------------------------------------------------------------------------------------------
def test_numpy_values_key_like_python_values() -> None:
    h = shards.config_hash
    assert h({"layers": np.arange(2)}) == h({"layers": [0, 1]}) == h({"layers": (0, 1)})
    assert h({"layer": np.int64(3), "level": np.float32(0.5)}) == h({"layer": 3, "level": 0.5})
    assert h({"x": torch.tensor([1, 2])}) == h({"x": [1, 2]}) and h({"ok": np.bool_(True)}) == h({"ok": True})
    assert h({"x": 1}) != h({"x": 1.5}) and h({"x": [0, 1]}) != h({"x": [1, 0]})
    with pytest.raises(TypeError, match="cannot key a result by a builtins.object"):
        h({"x": object()})


def test_numpy_points_resume_the_python_points(tmp_path: Path) -> None:
    store = shards.ShardStore(tmp_path, BASE)
    shards.run_grid(POINTS, _compute([]), store, progress=False)
    calls: list = []
    as_numpy = [{"a": np.int64(p["a"]), "b": np.str_(p["b"]), "level": np.float64(p["level"])} for p in POINTS]
    shards.run_grid(as_numpy, _compute(calls), store, progress=False)
    assert calls == []


def _task():
    shots = pd.DataFrame({"text": ["a gripping, funny and warm film.", "the plot is dull and the acting is worse.",
                                   "one of the best movies of the year.", "a tedious mess that never ends."],
                          "label": ["positive", "negative", "positive", "negative"]})
    dev = pd.DataFrame({"text": ["charming, clever and beautifully shot.", "boring, predictable and far too long.",
                                 "a warm and funny film.", "dull and tedious."],
                        "label": ["positive", "negative", "positive", "negative"]})
    return tasks.make_task({"shots": shots, "dev": dev}, "dev", tasks.PromptConfig("plain", k=2, shot_seed=0))


SETTINGS = [{"mode": "zero"}, {"mode": "absolute", "level": 0.5, "seed": 0}]


class _Counting:
    """Counts the engine's sweep calls (one per computed shard)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from headlab import engine

        self.calls = 0
        real = engine.sweep_heads

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, "sweep_heads", counting)


def test_head_sweep_keys_dtype_weights_version_and_prompts(tiny_factory, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The scenarios of issue 16 item 1: each rerun that would change a number recomputes everything."""
    count = _Counting(monkeypatch)
    lm, task, out = tiny_factory("llama"), _task(), tmp_path / "shards"
    n = len(SETTINGS) * lm.n_layers
    heads32, _ = sweeps.head_sweep(lm, task, SETTINGS, out, batch_size=8, progress=False)
    assert count.calls == n
    sweeps.head_sweep(lm, task, SETTINGS, out, layers=np.arange(lm.n_layers), progress=False)
    assert count.calls == n  # numpy layers: the same shards

    lm16 = tiny_factory("llama")  # the same weights in bfloat16: another computation
    lm16.model.to(torch.bfloat16)
    heads16, _ = sweeps.head_sweep(lm16, task, SETTINGS, out, batch_size=8, progress=False)
    assert count.calls == 2 * n
    assert not np.allclose(heads16["logit_diff"], heads32["logit_diff"], atol=1e-6)

    other = tiny_factory("llama", seed=1)  # another in-memory model with the same spec
    assert other.spec == lm.spec and other.fingerprint == lm.fingerprint == ""
    sweeps.head_sweep(other, task, SETTINGS, out, batch_size=8, progress=False)
    assert count.calls == 3 * n

    with torch.no_grad():  # the same model object, edited in memory through .data
        w = lm.layers[1].mlp.down_proj.weight
        saved = w.detach().clone()
        w.data[0, 0] += 1.0
    try:
        sweeps.head_sweep(lm, task, SETTINGS, out, batch_size=8, progress=False)
    finally:
        with torch.no_grad():
            w.data.copy_(saved)
    assert count.calls == 4 * n
    sweeps.head_sweep(lm, task, SETTINGS, out, batch_size=8, progress=False)
    assert count.calls == 4 * n  # restored: the first shards again

    monkeypatch.setattr(shards, "RESULTS_VERSION", shards.RESULTS_VERSION + 1)
    sweeps.head_sweep(lm, task, SETTINGS, out, batch_size=8, progress=False)
    assert count.calls == 5 * n
    monkeypatch.undo()
    count = _Counting(monkeypatch)

    dev2 = tasks.make_task({"shots": pd.DataFrame({"text": ["great.", "awful.", "good.", "bad."],
                                                    "label": ["positive", "negative"] * 2}),
                            "dev": pd.DataFrame({"text": ["charming, clever and beautifully shot.",
                                                          "boring, predictable and far too long.",
                                                          "a warm and funny film.", "dull and tedious."],
                                                 "label": ["positive", "negative", "positive", "negative"]})},
                           "dev", tasks.PromptConfig("plain", k=2, shot_seed=0))
    sweeps.head_sweep(lm, dev2, SETTINGS, out, batch_size=8, progress=False)  # same queries, other shots
    assert count.calls == n


def test_computation_identity_names_what_changes_numbers(tiny_factory) -> None:
    lm = tiny_factory("llama")
    ident = shards.computation_identity(lm)
    assert ident["dtype"] == "float32" and ident["device"] == "cpu" and ident["attn_implementation"] == "eager"
    assert ident["results_version"] == shards.RESULTS_VERSION and ident["model_type"] == "llama"
    assert shards.computation_identity(tiny_factory("llama"))["weights"] == ident["weights"]  # same seed
    assert shards.computation_identity(tiny_factory("llama", seed=2))["weights"] != ident["weights"]
    a, b = shards._word_sums(torch.arange(8.0)), shards._word_sums(torch.arange(8.0).flip(0))
    assert a != b  # the accelerator digest sees a reordering


# --------------------------------------------------------------------------------------------------
# 2. Damaged shards
# --------------------------------------------------------------------------------------------------
def _files(store: shards.ShardStore, point: dict) -> tuple[Path, Path]:
    return store._marker(point), store.path(point, "main")


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "parquet cut in half": (lambda m, t: _cut(t), "does not match its checksum"),
    "parquet emptied": (lambda m, t: t.write_bytes(b""), "does not match its checksum"),
    "parquet deleted": (lambda m, t: t.unlink(), "is missing"),
    "marker cut short": (lambda m, t: _cut(m), "not valid shard JSON"),
    "marker emptied": (lambda m, t: m.write_text(""), "not valid shard JSON"),
    "marker not a dict": (lambda m, t: m.write_text("[1, 2]"), "not valid shard JSON"),
    "marker of an older headlab": (
        lambda m, t: m.write_text(json.dumps({"config": {}, "tables": {"main": t.name}})), "marker format"),
    "parquet rewritten, checksum stale": (
        lambda m, t: pd.DataFrame({"a": [9]}).to_parquet(t), "does not match its checksum"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_shard_is_recomputed_and_named(tmp_path: Path, capsys, damage: str) -> None:
    store = shards.ShardStore(tmp_path, BASE)
    full = shards.run_grid(POINTS, _compute([]), store, progress=False)
    hurt, reason = DAMAGE[damage]
    hurt(*_files(store, POINTS[3]))
    capsys.readouterr()
    calls: list = []
    again = shards.run_grid(POINTS, _compute(calls), store, progress=False)
    err = capsys.readouterr().err
    assert calls == [POINTS[3]]
    assert store._stem(POINTS[3]) in err and reason in err and "recomputing" in err
    assert "Traceback" not in err
    for name in full:
        pd.testing.assert_frame_equal(again[name], full[name])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.lock"))


def test_shard_copied_over_another_is_detected(tmp_path: Path, capsys) -> None:
    store = shards.ShardStore(tmp_path, BASE)
    full = shards.run_grid(POINTS, _compute([]), store, progress=False)
    (m1, _), (m2, _) = _files(store, POINTS[1]), _files(store, POINTS[2])
    for name in ("main", "extra"):
        shutil.copy(store.path(POINTS[1], name), store.path(POINTS[2], name))
    shutil.copy(m1, m2)
    calls: list = []
    again = shards.run_grid(POINTS, _compute(calls), store, progress=False)
    assert calls == [POINTS[2]] and "another configuration's key" in capsys.readouterr().err
    pd.testing.assert_frame_equal(again["main"], full["main"])  # no duplicated rows, no missing point
    with pytest.raises(ValueError, match="another configuration's key"):
        shutil.copy(m1, m2)
        store.load(POINTS[2])


# --------------------------------------------------------------------------------------------------
# 3. Concurrent writers (real processes)
# --------------------------------------------------------------------------------------------------
WORKER = textwrap.dedent("""
    import os, sys, time
    import pandas as pd
    from headlab import shards

    folder, log, hang = sys.argv[1], sys.argv[2], int(sys.argv[3])
    points = [{"i": i} for i in range(8)]

    def compute(p):
        with open(log, "a") as f:
            f.write(f"{p['i']} {os.getpid()}\\n")
        if p["i"] == hang:
            open(log + ".hang", "w").write(str(os.getpid()))
            time.sleep(600)
        time.sleep(0.3)
        return {"t": pd.DataFrame({"i": [p["i"]] * 2, "v": [p["i"] / 3, p["i"] * 2.0]})}

    store = shards.ShardStore(folder, {"demo": 1}, heartbeat=0.5, stale_after=5)
    out = shards.run_grid(points, compute, store, progress=True, poll=0.1)["t"]
    out.to_csv(f"{folder}.{os.getpid()}.csv", index=False)
""")


def _worker(folder: Path, log: Path, hang: int = -1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(log), str(hang)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _computed(log: Path) -> list[int]:
    return sorted(int(line.split()[0]) for line in log.read_text().splitlines())


def test_three_processes_compute_each_point_once(tmp_path: Path) -> None:
    folder, log = tmp_path / "shards", tmp_path / "log.txt"
    procs = [_worker(folder, log) for _ in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    assert _computed(log) == list(range(8))  # each point once, between the three processes
    tables = [pd.read_csv(f) for f in sorted(tmp_path.glob("shards.*.csv"))]
    assert len(tables) == 3
    for t in tables[1:]:
        pd.testing.assert_frame_equal(t, tables[0])
    assert tables[0]["i"].tolist() == [i for i in range(8) for _ in range(2)]
    assert not list(folder.glob("*.tmp")) and not list(folder.glob("*.lock"))


def test_killed_holder_lock_is_taken_over(tmp_path: Path) -> None:
    folder, log = tmp_path / "shards", tmp_path / "log.txt"
    first = _worker(folder, log, hang=5)
    hang = Path(f"{log}.hang")
    deadline = time.time() + 120
    while not hang.exists():
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.1)
    pid = int(hang.read_text())
    assert list(folder.glob("*.lock"))  # it holds point 5
    os.kill(pid, signal.SIGKILL)  # no cleanup of any kind
    first.communicate(timeout=30)
    second = _worker(folder, log, hang=-1)
    _, err = second.communicate(timeout=240)
    assert second.returncode == 0, err
    assert f"process {pid} on" in err and "is gone" in err
    assert _computed(log) == sorted([*range(8), 5])  # 0-4 once, 5 by both (the first died inside it), 6-7 once
    assert not list(folder.glob("*.lock")) and not list(folder.glob("*.tmp"))


def test_lock_of_a_silent_process_elsewhere_goes_stale(tmp_path: Path) -> None:
    lock = shards.ShardLock(tmp_path / "x.lock", heartbeat=0.2, stale_after=1.0)
    lock.path.write_text(json.dumps({"pid": 1, "host": "another-host", "token": "t"}))
    assert not lock.acquire()  # fresh heartbeat: live
    old = time.time() - 5
    os.utime(lock.path, (old, old))
    assert lock.acquire()  # silent for 5 s > stale_after: taken over
    time.sleep(0.5)
    assert time.time() - lock.path.stat().st_mtime < 0.45  # our heartbeat keeps it fresh
    other = shards.ShardLock(lock.path, heartbeat=0.2, stale_after=1.0)
    assert not other.acquire()
    lock.release()
    assert not lock.path.exists() and other.acquire()
    other.release()


def test_lock_of_a_live_process_here_is_kept_however_old_its_heartbeat(tmp_path: Path) -> None:
    """A live holder on this host is never robbed (its heartbeat may lag on a busy machine); a pid now
    used by a later process (another start time) is a dead holder."""
    parent = os.getppid()
    lock = shards.ShardLock(tmp_path / "x.lock", heartbeat=0.2, stale_after=1.0)
    lock.path.write_text(json.dumps({"pid": parent, "pid_started": shards.process_start(parent),
                                     "host": shards._HOST, "token": "t"}))
    old = time.time() - 3600
    os.utime(lock.path, (old, old))
    assert not lock.acquire()
    lock.path.write_text(json.dumps({"pid": parent, "pid_started": -1, "host": shards._HOST, "token": "t"}))
    if shards.process_start(parent) is not None:  # Linux: the reused pid is recognised
        assert lock.acquire()
        lock.release()


def test_accelerator_digest_sees_every_edit() -> None:
    w = torch.randn(1000)
    base = shards._word_sums(w)
    assert shards._word_sums(w.clone()) == base
    for i in (0, 517, 999):
        v = w.clone()
        v[i] = torch.nextafter(v[i], torch.tensor(10.0))  # the smallest possible change
        assert shards._word_sums(v) != base
    assert shards._word_sums(w[torch.randperm(1000)]) != base
