"""torch.hub entrypoints of frostnet: one per model family and width.

    import torch
    repo = "<path to a frostnet checkout>"
    model = torch.hub.load(repo, "frostnet_small_1_0", source="local", num_classes=10)
    int8 = torch.hub.load(repo, "frostnet_small_1_0", source="local", weights="DEFAULT", quantized=True)

(``torch.hub.list``/``torch.hub.help`` take GitHub repos only; for a checkout, ``ENTRYPOINTS``
below lists the names and each entrypoint's docstring documents its arguments.)

Every entrypoint is the registered builder of the same name and takes its keyword arguments:
``weights`` (None, "DEFAULT", a name from ``frostnet.list_weights()`` or a ``.safetensors``
path), ``quantized``, ``backend`` and the architecture arguments (``num_classes``,
``in_channels``, ``features_only``, ...). Weights files are found in ``<checkout>/weights`` or
fetched from the Hugging Face Hub, and verified (sha256) before they are read; no pickle is
involved.

Adding a family: register its builders (``frostnet.models.register_model``), import them below
under the family's heading and add their names to ``ENTRYPOINTS``; ``tests/test_hub.py`` loads
every name of ``ENTRYPOINTS`` through ``torch.hub.load(..., source="local")``.
"""

dependencies = ["torch", "torchvision", "safetensors", "huggingface_hub"]

# --- Classification: FrostNet-Small/Base/Large (frostnet/models/frostnet.py) -----------------
from frostnet.models.frostnet import (  # noqa: E402
    frostnet_base_0_5,
    frostnet_base_0_35,
    frostnet_base_0_75,
    frostnet_base_1_0,
    frostnet_base_1_25,
    frostnet_large_0_5,
    frostnet_large_0_35,
    frostnet_large_0_75,
    frostnet_large_1_0,
    frostnet_large_1_25,
    frostnet_small_0_5,
    frostnet_small_0_35,
    frostnet_small_0_75,
    frostnet_small_1_0,
    frostnet_small_1_25,
)

# --- Segmentation (frostnet/models/lraspp.py, espnet.py): return {"out": logits} --------------
from frostnet.models.espnet import espnet, espnet_v2  # noqa: E402
from frostnet.models.lraspp import (  # noqa: E402
    lraspp_frostnet_base_1_0,
    lraspp_frostnet_large_1_0,
    lraspp_frostnet_small_1_0,
    lraspp_mobilenet_v3_large_re,
    lraspp_mobilenet_v3_small_re,
)

# --- Detection (frostnet/models/ssdlite.py, tiny_dsod.py): torchvision-style boxes/scores/labels --
from frostnet.models.ssdlite import (  # noqa: E402
    ssdlite_frostnet_base_1_0,
    ssdlite_frostnet_large_1_0,
    ssdlite_frostnet_small_1_0,
    ssdlite_mobilenet_v2,
)
from frostnet.models.tiny_dsod import tiny_dsod  # noqa: E402

#: Every entrypoint name, grouped by family (kept in sync with the imports above).
ENTRYPOINTS: tuple[str, ...] = (
    # classification
    "frostnet_small_0_35", "frostnet_small_0_5", "frostnet_small_0_75", "frostnet_small_1_0", "frostnet_small_1_25",
    "frostnet_base_0_35", "frostnet_base_0_5", "frostnet_base_0_75", "frostnet_base_1_0", "frostnet_base_1_25",
    "frostnet_large_0_35", "frostnet_large_0_5", "frostnet_large_0_75", "frostnet_large_1_0", "frostnet_large_1_25",
    # segmentation
    "lraspp_mobilenet_v3_large_re", "lraspp_mobilenet_v3_small_re", "espnet", "espnet_v2",
    "lraspp_frostnet_small_1_0", "lraspp_frostnet_base_1_0", "lraspp_frostnet_large_1_0",
    # detection
    "ssdlite_mobilenet_v2", "ssdlite_frostnet_small_1_0", "ssdlite_frostnet_base_1_0", "ssdlite_frostnet_large_1_0",
    "tiny_dsod",
)
