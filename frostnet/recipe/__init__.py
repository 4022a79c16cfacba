"""The training recipe: StatAssist, GradBoost and the engine behind ``tools/train.py``."""

from .args import MODES, get_args_parser
from .statassist import StatAssist

__all__ = ["MODES", "StatAssist", "get_args_parser", "main"]


def main(args):  # noqa: ANN001,ANN201 - thin re-export; the engine imports the data stack lazily
    """Run the recipe (see :func:`frostnet.recipe.engine.main`)."""
    from .engine import main as _main

    return _main(args)
