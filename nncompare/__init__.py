"""nncompare: one network spec built in Keras, PyTorch and MXNet, proven equivalent, trained and timed side by side.

Subpackages: nncompare.models (specs, zoo, data) and nncompare.backends (adapters); the command line is
nncompare.cli. Importing any of them imports no deep-learning framework.
"""
from pathlib import Path as _Path

# In a checkout, models/ and backends/ sit beside this folder (the repository keeps them at its top level);
# an installed wheel has them inside it. Extending the package path lets both import as nncompare.<name>.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "models").is_dir() and (_checkout / "models" / "spec.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (__path__ is defined for packages)

__version__ = "0.2.0"


def main(argv: list[str] | None = None) -> int:
    """The command line (console script `nncompare`): a Ctrl-C while it is still loading exits 130, quietly."""
    import sys
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return cli_main(argv)
