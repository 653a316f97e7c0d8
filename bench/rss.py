"""Resident memory of the server after start and after 1,000 requests, beside the import floor.

    .venv/bin/python bench/rss.py          # embedded setup
    DATABASE_URL=... .venv/bin/python bench/rss.py   # any DATABASE_URL: the postgres setup

Superseded by bench/run.py, whose `floor` scenario measures exactly this (the floor now
includes gevent's patch_all, as the server does); this is `run.py --only floor --runs 1`.
The postgres setup makes its own throwaway database and claims its own Redis database.
"""

from __future__ import annotations

import os
import sys

import run  # bench/ is sys.path[0] when this file runs as a script

if __name__ == "__main__":
    setup = "postgres" if os.environ.get("DATABASE_URL") else "embedded"
    sys.exit(run.main(["--setup", setup, "--only", "floor", "--runs", "1", *sys.argv[1:]]))
