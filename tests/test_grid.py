"""Tests of ``headlab grid``: spec validation, point expansion and naming, and end-to-end papermill runs
with the local, Dask (LocalCluster on loopback) and submitit executors, on a tiny throwaway chapter.

Each end-to-end point starts a Python process and a Jupyter kernel (about 2-4 s on a busy CPU), so the
grids here have 2-3 points.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from headlab import grid
from headlab.records import write_summary

REPO = Path(__file__).resolve().parents[1]

#: A chapter that loads no model: it squares ``x``, optionally fails, and follows the summary.json
#: convention (by hand, so that its kernel does not import torch).
TOY = '''\
# %% [markdown]
# # Toy chapter

# %% tags=["parameters"]
x: int = 1  # a number
label: str = "a"  # a text
scale: list = [1, 2]  # a list
fail_when: int = -1  # raise when x equals this
sleep_when: int = -1  # sleep a minute when x equals this
device: str = "auto"  # "auto", "cpu" or "cuda"
dtype: str = "auto"  # "auto", "float32", ...
results_dir: str = "results/toy"  # where to write

# %%
import json, os, pathlib
if x == fail_when:
    raise RuntimeError(f"toy chapter asked to fail at x={x}")
if x == sleep_when:
    import time
    pathlib.Path(results_dir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(results_dir) / "kernel.pid").write_text(str(os.getpid()))
    time.sleep(60)
out = pathlib.Path(results_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "values.csv").write_text("x,y\\n" + "".join(f"{x},{x * s}\\n" for s in scale))
with open(out / "runs.txt", "a") as f:  # one line per execution: lets the tests count reruns
    f.write("ran\\n")
(out / "summary.json").write_text(json.dumps({"square": x * x, "label": label, "device_asked": device,
    "dtype_asked": dtype, "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}))
print("toy done", x)
'''


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A project folder holding notebooks/toy.py."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "toy.py").write_text(TOY)
    return tmp_path


@pytest.fixture(autouse=True)
def _importable_headlab(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point processes (point runners, Dask workers) get this checkout's headlab."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _spec(root: Path, **raw) -> grid.GridSpec:
    return grid.parse_spec({"chapter": "toy", "out": "out", **raw}, cwd=root)


def _runs(point: grid.GridPoint) -> int:
    path = Path(point.parameters["results_dir"]) / "runs.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


# --------------------------------------------------------------------------------------------------
# Spec validation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "message"), [
    ({"chapter": "toy", "grdi": {"x": [1]}}, r"unknown spec key\(s\) \['grdi'\]; allowed: \["),
    ({"out": "o"}, "needs `chapter`"),
    ({"chapter": "nope"}, "no chapter 'nope'.*Chapters in notebooks/: \\['toy'\\]"),
    ({"chapter": "toy", "grid": {"x": 3}}, r"grid\['x'\]=3 must be a non-empty list"),
    ({"chapter": "toy", "grid": {"x": []}}, r"grid\['x'\]=\[\] must be a non-empty list"),
    ({"chapter": "toy", "grid": {"x": [1]}, "parameters": {"x": 2}}, "both in `parameters` and in `grid`"),
    ({"chapter": "toy", "parameters": {"results_dir": "r"}}, "sets results_dir"),
    ({"chapter": "toy", "device": "gpu"}, r"device='gpu' is not a device; use one of \('auto', 'cpu'"),
    ({"chapter": "toy", "grid": {"dtype": ["float32", "fp8"]}}, "grid.dtype='fp8' is not a dtype"),
    ({"chapter": "toy", "timeout": 0}, "timeout=0 must be a positive number"),
    ({"chapter": "toy", "executor": "ray"}, r"executor kind 'ray' is unknown; choose one of \['dask', 'local', 'slurm'\]"),
    ({"chapter": "toy", "executor": {"kind": "local", "workers": 2}},
     r"executor 'local' has no option\(s\) \['workers'\]; it accepts \['gpus', 'max_workers'\]"),
    ({"chapter": "toy", "executor": {"kind": "local", "max_workers": 0}}, "max_workers=0 is out of range; expected an integer >= 1"),
    ({"chapter": "toy", "executor": {"kind": "slurm", "cluster": "pbs"}}, "cluster=.pbs. is not allowed; expected one of \\[.slurm., .local., .debug.\\]"),
    ({"chapter": "toy", "points": {"x": 1}}, "points=.* must be a list of mappings"),
    (["chapter", "toy"], "a grid spec is a YAML mapping"),
])
def test_bad_specs_name_the_problem(toy: Path, raw, message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        grid.parse_spec(raw, cwd=toy)


def test_parameters_are_checked_against_the_chapter(toy: Path) -> None:
    declared = grid.chapter_parameters(toy / "notebooks" / "toy.py")
    assert declared == {"x": 1, "label": "a", "scale": [1, 2], "fail_when": -1, "sleep_when": -1, "device": "auto",
                        "dtype": "auto", "results_dir": "results/toy"}
    with pytest.raises(ValueError, match=r"\['n_layers'\] are not in the parameters cell of toy.py; it declares"):
        grid.expand_points(_spec(toy, grid={"n_layers": [1, 2]}), declared)
    # device / dtype go only to chapters that declare them; asking for one elsewhere is an error
    no_device = {k: v for k, v in declared.items() if k != "device"}
    assert "device" not in grid.expand_points(_spec(toy), no_device)[0].parameters
    with pytest.raises(ValueError, match="device='cuda' given, but toy.py has no `device` parameter"):
        grid.expand_points(_spec(toy, device="cuda"), no_device)
    with pytest.raises(ValueError, match="has no `results_dir` parameter"):
        grid.expand_points(_spec(toy), {k: v for k, v in declared.items() if k != "results_dir"})


def test_chapter_without_parameters_cell_is_refused(toy: Path) -> None:
    (toy / "notebooks" / "plain.py").write_text("# %%\nx = 1\n")
    with pytest.raises(ValueError, match="plain.py has no cell tagged `parameters`"):
        grid.chapter_parameters(toy / "notebooks" / "plain.py")


def test_load_spec_reads_yaml_and_resolves_paths(toy: Path) -> None:
    path = toy / "g.yaml"
    path.write_text("chapter: toy\ngrid: {x: [1, 2]}\nexecutor: {kind: dask, n_workers: 2}\n")
    spec = grid.load_spec(path, cwd=toy)
    assert spec.chapter == (toy / "notebooks" / "toy.py").resolve()
    assert spec.out == (toy / "results" / "grids" / "g").resolve()  # default out: named after the spec
    assert (spec.executor, spec.executor_options) == ("dask", {"n_workers": 2})
    path.write_text("chapter: [toy\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        grid.load_spec(path, cwd=toy)


# --------------------------------------------------------------------------------------------------
# Expansion and naming
# --------------------------------------------------------------------------------------------------
def test_expansion_is_the_product_then_the_explicit_points(toy: Path) -> None:
    spec = _spec(toy, parameters={"label": "b"}, grid={"x": [1, 2], "scale": [[1], [2, 3]]},
                 points=[{"x": 9, "scale": [1]}, {"x": 1, "scale": [1]}])  # the last one repeats a product point
    points = grid.expand_points(spec)
    assert [p.varied for p in points] == [{"x": 1, "scale": [1]}, {"x": 1, "scale": [2, 3]},
                                          {"x": 2, "scale": [1]}, {"x": 2, "scale": [2, 3]},
                                          {"x": 9, "scale": [1]}]
    first = points[0]
    assert first.parameters == {"label": "b", "device": "auto", "dtype": "auto", "x": 1, "scale": [1],
                                "results_dir": str(spec.out / first.name / "results")}
    assert first.name.startswith("x=1,scale=1-") and points[1].name.startswith("x=1,scale=2+3-")
    assert len({p.name for p in points}) == len(points)
    assert grid.expand_points(_spec(toy))[0].name.startswith("point-")  # nothing varied


def test_names_are_stable_safe_and_cover_every_parameter() -> None:
    a = grid.point_name({"mode": "zero", "level": 0.5}, {"mode": "zero", "level": 0.5, "n": 4}, "ch")
    # same parameters in another order: same name; a shared parameter changed: same readable part, new hash
    assert a == grid.point_name({"mode": "zero", "level": 0.5}, {"n": 4, "level": 0.5, "mode": "zero"}, "ch")
    b = grid.point_name({"mode": "zero", "level": 0.5}, {"mode": "zero", "level": 0.5, "n": 5}, "ch")
    assert a.rsplit("-", 1)[0] == b.rsplit("-", 1)[0] == "mode=zero,level=0.5" and a != b
    odd = grid.point_name({"model": "../models/x y.gguf", "d": {"a": [1, 2]}}, {}, "ch")
    assert "/" not in odd and " " not in odd and ".." not in odd
    long = grid.point_name({"k": list(range(200))}, {}, "ch")
    assert len(long) <= 80 + 11


# --------------------------------------------------------------------------------------------------
# End to end with papermill
# --------------------------------------------------------------------------------------------------
def test_local_grid_runs_fails_and_resumes(toy: Path) -> None:
    spec = _spec(toy, parameters={"fail_when": 2}, grid={"x": [1, 2, 3]},
                 executor={"kind": "local", "max_workers": 2})
    summary = grid.run_grid_spec(spec)
    points = grid.expand_points(spec)
    assert list(summary["x"]) == [1, 2, 3]
    assert list(summary["status"]) == ["done", "failed", "done"]
    assert "toy chapter asked to fail at x=2" in summary.loc[1, "error"]
    assert list(summary["square"].iloc[[0, 2]]) == [1, 9]
    assert set(summary["device_asked"].dropna()) == {"auto"}
    for p in points:  # one folder per point: executed notebook, log, record; results for the good ones
        folder = Path(p.point_dir)
        assert (folder / "toy.ipynb").is_file() and (folder / "log.txt").is_file()
        assert grid.read_point(folder)["parameters"]["x"] == p.varied["x"]
    nb = json.loads((Path(points[0].point_dir) / "toy.ipynb").read_text())
    assert any("toy done 1" in "".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    saved = pd.read_csv(spec.out / "summary.csv")
    assert list(saved["status"]) == ["done", "failed", "done"]
    assert pd.read_parquet(spec.out / "summary.parquet").shape == summary.shape

    # Rerun with the failure fixed (a shared parameter changes every hash, so fix it by hand instead):
    # only the failed point executes again; done points are skipped and keep their results.
    bad = Path(points[1].point_dir) / "task.json"
    assert bad.is_file()
    spec2 = _spec(toy, parameters={"fail_when": 2}, grid={"x": [1, 2, 3]})
    toy_src = toy / "notebooks" / "toy.py"
    toy_src.write_text(TOY.replace("if x == fail_when:", "if x == fail_when and False:"))
    summary2 = grid.run_grid_spec(spec2)
    assert list(summary2["status"]) == ["done"] * 3
    assert [_runs(p) for p in points] == [1, 1, 1]  # the failed run wrote nothing; the others ran once
    assert grid.read_point(points[1].point_dir)["attempt"] == 2
    same = ["point", "x", "status", "square", "label"]
    pd.testing.assert_frame_equal(summary2.loc[[0, 2], same], summary.loc[[0, 2], same], check_dtype=False)

    # Nothing left: a third run executes nothing and gives the identical table.
    summary3 = grid.run_grid_spec(spec2)
    assert [_runs(p) for p in points] == [1, 1, 1]
    pd.testing.assert_frame_equal(summary3, summary2)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.2)


def test_killed_grid_stops_its_points_and_resumes(toy: Path) -> None:
    """SIGINT to a running `headlab grid` (as Ctrl-C): the running point's runner and kernel stop, the
    point reads `interrupted`, and the next run executes only the unfinished points."""
    (toy / "g.yaml").write_text(yaml.safe_dump({"chapter": "toy", "out": "out", "grid": {"x": [1, 2, 3]},
                                                "parameters": {"sleep_when": 2}}))
    spec = grid.load_spec(toy / "g.yaml", cwd=toy)
    points = grid.expand_points(spec)
    proc = subprocess.Popen([sys.executable, "-m", "headlab.grid", "g.yaml"], cwd=toy,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_file = Path(points[1].parameters["results_dir"]) / "kernel.pid"
    _wait_for(pid_file.exists)  # point 2 is inside its sleeping cell
    runner = grid.read_point(points[1].point_dir)["runner_pid"]
    kernel = int(pid_file.read_text())
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in out
    _wait_for(lambda: not _pid_alive(runner) and not _pid_alive(kernel), 30)
    statuses = list(grid.collect_summary(points)["status"])
    assert statuses == ["done", "interrupted", "pending"]

    toy_src = toy / "notebooks" / "toy.py"
    toy_src.write_text(TOY.replace("if x == sleep_when:", "if x == sleep_when and False:"))
    summary = grid.run_grid_spec(spec)
    assert list(summary["status"]) == ["done"] * 3
    assert [_runs(p) for p in points] == [1, 1, 1]  # point 1 not again; 2 and 3 once each


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_grid_killed_hard_leaves_no_orphans_and_reruns_the_point(toy: Path, sig: int) -> None:
    """SIGKILL (no cleanup possible) or SIGHUP to `headlab grid`: the runner and kernel of the running
    point die with it, the point's `running` record is recognised as stale (its grid process is gone),
    and the next run executes it again (issue 16, item 6)."""
    (toy / "g.yaml").write_text(yaml.safe_dump({"chapter": "toy", "out": "out", "grid": {"x": [1, 2, 3]},
                                                "parameters": {"sleep_when": 2}}))
    spec = grid.load_spec(toy / "g.yaml", cwd=toy)
    points = grid.expand_points(spec)
    proc = subprocess.Popen([sys.executable, "-m", "headlab.grid", "g.yaml"], cwd=toy,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_file = Path(points[1].parameters["results_dir"]) / "kernel.pid"
    _wait_for(pid_file.exists)  # point 2 is inside its sleeping cell
    record = grid.read_point(points[1].point_dir)
    runner, kernel = record["runner_pid"], int(pid_file.read_text())
    assert record["status"] == "running" and record["pid"] == proc.pid and "heartbeat" in record
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    _wait_for(lambda: not _pid_alive(runner) and not _pid_alive(kernel), 30)
    statuses = list(grid.collect_summary(points)["status"])
    assert statuses == ["done", "interrupted", "pending"]

    toy_src = toy / "notebooks" / "toy.py"
    toy_src.write_text(TOY.replace("if x == sleep_when:", "if x == sleep_when and False:"))
    logged: list[str] = []
    summary = grid.run_grid_spec(spec, log=logged.append)
    assert list(summary["status"]) == ["done"] * 3
    assert [_runs(p) for p in points] == [1, 1, 1]
    if sig == signal.SIGKILL:  # SIGHUP is handled: the point was marked interrupted, not left running
        assert any("was left running by process" in line for line in logged)


def test_running_point_elsewhere_is_stale_once_its_heartbeat_stops(toy: Path) -> None:
    spec = _spec(toy, grid={"x": [1]})
    (point,) = grid.expand_points(spec)
    Path(point.point_dir).mkdir(parents=True)
    alive = {"name": point.name, "status": "running", "host": "another-host", "pid": 12345,
             "heartbeat": time.time()}
    (Path(point.point_dir) / "point.json").write_text(json.dumps(alive))
    assert list(grid.run_grid_spec(spec)["status"]) == ["running"]  # left alone: it beats
    assert _runs(point) == 0
    (Path(point.point_dir) / "point.json").write_text(json.dumps({**alive, "heartbeat": time.time() - 3600}))
    assert list(grid.collect_summary([point])["status"]) == ["interrupted"]
    assert list(grid.run_grid_spec(spec)["status"]) == ["done"] and _runs(point) == 1
    # a running record of this host whose pid now belongs to another process (pid reuse)
    (Path(point.point_dir) / "point.json").write_text(json.dumps(
        {**alive, "host": grid.socket.gethostname(), "pid": os.getpid(), "pid_started": 1}))
    assert list(grid.collect_summary([point])["status"]) == ["interrupted"]
    (Path(point.point_dir) / "point.json").write_text('{"status": "runn')  # damaged record
    assert list(grid.collect_summary([point])["status"]) == ["interrupted"]


def test_timeout_stops_a_point(toy: Path) -> None:
    spec = _spec(toy, parameters={"sleep_when": 1}, timeout=15)
    summary = grid.run_grid_spec(spec)
    assert list(summary["status"]) == ["timeout"] and summary.loc[0, "seconds"] < 40
    assert "timeout of 15 s" in summary.loc[0, "error"]
    (point,) = grid.expand_points(spec)
    assert not _pid_alive(grid.read_point(point.point_dir)["runner_pid"])
    pid_file = Path(point.parameters["results_dir"]) / "kernel.pid"
    if pid_file.exists():  # the kernel reached the sleeping cell (on a very busy machine it may not)
        _wait_for(lambda: not _pid_alive(int(pid_file.read_text())), 30)


def test_local_gpus_option_pins_one_device_per_point(toy: Path) -> None:
    spec = _spec(toy, grid={"x": [1, 2]}, executor={"kind": "local", "gpus": [3, 5]})
    summary = grid.run_grid_spec(spec)
    assert list(summary["status"]) == ["done", "done"]
    assert set(summary["cuda_visible"]) <= {"3", "5"}


def test_dask_local_cluster_on_loopback(toy: Path) -> None:
    pytest.importorskip("dask.distributed")
    spec = _spec(toy, grid={"x": [4, 5]}, executor={"kind": "dask", "n_workers": 1, "threads_per_worker": 2})
    summary = grid.run_grid_spec(spec)
    assert list(summary["status"]) == ["done", "done"] and list(summary["square"]) == [16, 25]
    again = grid.run_grid_spec(spec)  # resumable under Dask too
    assert [_runs(p) for p in grid.expand_points(spec)] == [1, 1]
    pd.testing.assert_frame_equal(again, summary)


def test_submitit_debug_cluster_runs_the_array(toy: Path) -> None:
    pytest.importorskip("submitit")
    spec = _spec(toy, grid={"x": [6, 7]}, executor={"kind": "slurm", "cluster": "debug"})
    summary = grid.run_grid_spec(spec)
    assert list(summary["status"]) == ["done", "done"] and list(summary["square"]) == [36, 49]


def test_slurm_submission_is_one_job_array(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Slurm here. A fake ``sbatch`` records the submission; then the generated batch script is run
    once per array task, as Slurm would, with that task's SLURM_* variables and an ``srun`` that runs
    its command on this machine. The points' own records then give the summary."""
    pytest.importorskip("submitit")
    bin_dir = toy / "fakebin"
    bin_dir.mkdir()
    fakes = {
        "sbatch": 'echo "$@" >> "$(dirname "$0")/sbatch.calls"\necho "Submitted batch job 4242"',
        # srun [--unbuffered] [--output F] [--error F] CMD...: run CMD here
        "srun": 'while [ $# -gt 0 ]; do case "$1" in --unbuffered) shift;; --output|--error) shift 2;; '
                '*) break;; esac; done\nexec "$@"',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    spec = _spec(toy, grid={"x": [1, 2, 3]}, timeout=300,
                 executor={"kind": "slurm", "partition": "gpu", "gpus_per_node": 1, "array_parallelism": 2,
                           "setup": ["export HEADLAB_FROM_SETUP=1"], "additional": {"account": "lab"},
                           "wait": False})
    summary = grid.run_grid_spec(spec)
    assert list(summary["status"]) == ["submitted"] * 3  # submitted, not run
    grid.run_grid_spec(spec)  # a rerun while the jobs are queued submits nothing
    assert len((bin_dir / "sbatch.calls").read_text().splitlines()) == 1
    script = Path((bin_dir / "sbatch.calls").read_text().split()[-1])
    text = script.read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --account=lab", "#SBATCH --time=7", "export HEADLAB_FROM_SETUP=1",
                 "export SUBMITIT_EXECUTOR=slurm", "submitit.core._submit"):
        assert line in text, line
    folder = spec.out / "_submitit"
    assert len(list(folder.glob("4242_*_submitted.pkl"))) == 3

    for task in range(3):  # what Slurm does for array task `task` of job 4242
        env = {**os.environ, "SLURM_JOB_ID": f"{4300 + task}", "SLURM_ARRAY_JOB_ID": "4242",
               "SLURM_ARRAY_TASK_ID": str(task), "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
               "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost"}
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    done = grid.run_grid_spec(spec)  # collects what the jobs left; nothing is resubmitted
    assert list(done["status"]) == ["done"] * 3 and list(done["square"]) == [1, 4, 9]
    assert len((bin_dir / "sbatch.calls").read_text().splitlines()) == 1


def test_missing_optional_executor_dependency_is_named(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    points = grid.expand_points(_spec(toy))
    with pytest.raises(ImportError, match=r"needs `pip install submitit` \(or `pip install 'headlab\[grid\]'`\)"):
        grid.submit_slurm(points, toy / "submitit")
    with pytest.raises(ImportError, match=r"needs `pip install 'dask\[distributed\]'`"):
        grid._run_dask(points)
    assert not (toy / "out").exists()  # refused before running anything


def test_cli_dry_run_and_errors(toy: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from headlab.cli import main

    monkeypatch.chdir(toy)
    (toy / "g.yaml").write_text(yaml.safe_dump({"chapter": "toy", "grid": {"x": [1, 2]}}))
    assert main(["grid", "g.yaml", "--dry-run", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "x=1-" in out and "pending" in out
    assert not (toy / "results").exists()  # a dry run writes nothing
    assert main(["grid", "g.yaml", "--dtype", "fp4"]) == 2
    assert "dtype='fp4' is not a dtype" in capsys.readouterr().err
    assert main(["grid", "missing.yaml"]) == 2


def test_write_summary_convention(tmp_path: Path) -> None:
    import numpy as np
    import torch

    path = write_summary(tmp_path, accuracy=np.float32(0.5), n=np.int64(3), top="L3H1", ok=True,
                         loss=torch.tensor(1.25), none=None)
    assert json.loads(path.read_text()) == {"accuracy": 0.5, "n": 3, "top": "L3H1", "ok": True, "loss": 1.25,
                                            "none": None}
    with pytest.raises(TypeError, match=r"summary metric scores=\[1, 2\] is a list"):
        write_summary(tmp_path, scores=[1, 2])


# --------------------------------------------------------------------------------------------------
# A real chapter, CI-sized
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_grid_over_the_induction_chapter(tmp_path: Path) -> None:
    """``grids/induction_ci.yaml`` in small: chapter 03 on the real model on the CPU, one point (about
    25 s of chapter plus 10-20 s of kernel start on a busy 2-core machine), then a rerun that skips it."""
    raw = yaml.safe_load((REPO / "grids" / "induction_ci.yaml").read_text())
    raw.update(out=str(tmp_path / "grid"), grid={"seed": [0]})
    spec = grid.parse_spec(raw, cwd=REPO)
    summary = grid.run_grid_spec(spec)
    assert list(summary["status"]) == ["done"], summary["error"].tolist()
    assert list(summary["device"]) == ["cpu"] and list(summary["dtype"]) == ["float32"]
    row = summary.iloc[0]
    assert 0 < row["top_induction_score"] <= 1 and re.fullmatch(r"L\d+H\d", row["top_head"])
    assert 0 <= row["clean_p_correct"] <= 1 and row["k_max"] == 1
    (point,) = grid.expand_points(spec)
    results = Path(point.parameters["results_dir"])
    scores = pd.read_csv(results / "scores.csv")
    assert len(scores) == 30 * 9 and scores["induction_score"].max() == pytest.approx(row["top_induction_score"])
    assert (Path(point.point_dir) / "03_induction.ipynb").is_file()
    again = grid.run_grid_spec(spec)  # done: nothing runs, same table
    pd.testing.assert_frame_equal(again, summary)
