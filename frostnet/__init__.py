"""frostnet: a PyTorch model zoo whose networks are INT8 from the start."""

__version__ = "0.1.0"

from .hub import get_model, list_weights, load_weights  # noqa: E402
from .models import list_models  # noqa: E402

#: timm's name for :func:`get_model`.
create_model = get_model

__all__ = ["__version__", "create_model", "get_model", "list_models", "list_weights", "load_weights"]
