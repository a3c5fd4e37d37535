#!/usr/bin/env python3
"""nncompare from a checkout: `python compare.py [run|check|train|report|list|summary] ...` (see README.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the checkout's nncompare/ package

if __name__ == "__main__":
    try:
        from nncompare import main
    except KeyboardInterrupt:  # during Python's own imports: no traceback
        sys.exit(130)
    sys.exit(main())
