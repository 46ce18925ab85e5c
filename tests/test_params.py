"""``-p NAME VALUE`` on the command line: one YAML reading for ``headlab run`` and ``headlab book``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import headlab.book
import headlab.book.build
from headlab import cli
from headlab.params import parse_parameters, parse_value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("[4, 8]", [4, 8]),
        ("[1e-3, 0.1]", [0.001, 0.1]),  # YAML 1.1 would give the strings '1e-3'
        ("{k: 3, mode: zero}", {"k": 3, "mode": "zero"}),
        ("1e-3", 0.001),
        ("-7", -7),
        ("010", 10),  # not octal 8
        ("null", None),
        ("~", None),
        ("true", True),
        ("yes", "yes"),  # not a bool
        ("12:30", "12:30"),  # not 750
        ("2024-01-01", "2024-01-01"),  # not a datetime.date
        ("'42'", "42"),  # YAML quotes keep text
        ("smollm2-135m", "smollm2-135m"),
        ("", ""),
    ],
)
def test_values_are_yaml_core_schema(text: str, value: Any) -> None:
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[4, 8", "is not valid YAML (expected ',' or ']'"),
        ("{k: 3", "is not valid YAML"),
        ("a: b: c", "is not valid YAML (mapping values are not allowed here)"),
        ("@x", "is not valid YAML"),
        ("run #3", "'#3' is a YAML comment and would be dropped"),
        ("!!set {a}", "a set is not a parameter value"),
    ],
)
def test_bad_values_name_the_parameter_and_value(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_value(text, "shot_counts")
    assert f"-p shot_counts {text!r}" in str(err.value)
    assert fragment in str(err.value)
    assert "[4, 8]" in str(err.value)  # what is allowed


def test_names_must_be_identifiers_and_the_last_value_wins() -> None:
    assert parse_parameters([("x", "1"), ("y", "[a]"), ("x", "2")]) == {"x": 2, "y": ["a"]}
    with pytest.raises(ValueError, match="'n seqs': a parameter name is a Python identifier"):
        parse_parameters([("n seqs", "2")])


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record the parameters each command hands on instead of executing chapters."""
    seen: dict[str, Any] = {}

    def execute_chapter(src: Path, out_dir: Path, parameters: dict[str, Any] | None = None, **_: Any) -> Path:
        seen["run"] = parameters
        return Path(out_dir) / f"{Path(src).stem}.ipynb"

    def build_book(root: Path, chapters: Any, parameters: dict[str, Any] | None, *_: Any) -> Path:
        seen["book"] = parameters
        return Path(root)

    monkeypatch.setattr(headlab.book, "execute_chapter", execute_chapter)
    monkeypatch.setattr(headlab.book.build, "build_book", build_book)
    return seen


def test_run_and_book_read_a_list_the_same_way(captured: dict[str, Any], tmp_path: Path) -> None:
    argv = ["-p", "shot_counts", "[4, 8]", "-p", "n_test", "200", "-p", "model", "gpt2"]
    assert cli.main(["run", "notebooks/01_baseline.py", "--out", str(tmp_path), *argv]) == 0
    assert cli.main(["book", "--root", str(tmp_path), *argv]) == 0
    expected = {"shot_counts": [4, 8], "n_test": 200, "model": "gpt2"}
    assert captured["run"] == expected
    assert captured["book"] == expected
    # the long option (and its `--param` abbreviation, the former name in `headlab run`) reads the same
    assert cli.main(["run", "notebooks/01_baseline.py", "--out", str(tmp_path), "--param", "shot_counts",
                     "[4, 8]"]) == 0
    assert captured["run"] == {"shot_counts": [4, 8]}


@pytest.mark.parametrize("command", ["run", "book"])
def test_bad_value_is_a_usage_error_not_a_traceback(
    command: str, captured: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["notebooks/01_baseline.py"] if command == "run" else []
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, *args, "-p", "shot_counts", "[4, 8"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: -p shot_counts '[4, 8' is not valid YAML" in err
    assert "Traceback" not in err
    assert captured == {}  # nothing ran


def test_run_injects_the_list_into_the_kernel(tmp_path: Path) -> None:
    """End to end: papermill receives the parsed list, so the chapter sees a list, not a string."""
    pytest.importorskip("papermill")
    pytest.importorskip("jupytext")
    src = tmp_path / "chapter.py"
    out = tmp_path / "seen.json"
    src.write_text(
        '# %% tags=["parameters"]\n'
        "shot_counts: list[int] = [1]\n"
        "\n"
        "# %%\n"
        "import json\n"
        f"open({str(out)!r}, 'w').write(json.dumps(shot_counts))\n"
    )
    assert cli.main(["run", str(src), "--out", str(tmp_path / "nb"), "-p", "shot_counts", "[4, 8]"]) == 0
    assert json.loads(out.read_text()) == [4, 8]
