"""``python -m headlab.book``: the same as ``headlab book`` (see :func:`headlab.book.build.book_main`)."""

from headlab.book.build import book_main

if __name__ == "__main__":
    raise SystemExit(book_main())
