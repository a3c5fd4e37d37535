#!/usr/bin/env python3
"""nncompare from a checkout: `python compare.py [run|check|train|report|list|summary] ...` (see README.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the checkout's nncompare/ package

from nncompare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
