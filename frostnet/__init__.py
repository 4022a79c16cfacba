"""frostnet: a PyTorch model zoo whose networks are INT8 from the start."""

__version__ = "0.1.0"

from .models import get_model, list_models  # noqa: E402
from .hub import list_weights, load_weights  # noqa: E402

create_model = get_model

__all__ = ["__version__", "create_model", "get_model", "list_models", "list_weights", "load_weights"]
