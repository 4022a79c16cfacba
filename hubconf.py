"""torch.hub entrypoints of frostnet: one per registered model (``frostnet.list_models()``).

    import torch
    repo = "<path to a frostnet checkout>"
    model = torch.hub.load(repo, "frostnet_small_1_0", source="local", num_classes=10)
    int8 = torch.hub.load(repo, "frostnet_small_1_0", source="local", weights="DEFAULT", quantized=True)
    seg = torch.hub.load(repo, "lraspp_mobilenet_v3_large_re", source="local", num_classes=19)

(``torch.hub.list``/``torch.hub.help`` take GitHub repos only; for a checkout, ``ENTRYPOINTS``
below lists the names and each entrypoint's docstring documents its arguments.)

Every entrypoint is ``frostnet.get_model`` with the name bound: it takes ``weights`` (None,
"DEFAULT", a name from ``frostnet.list_weights()`` or a ``.safetensors`` path), ``quantized``,
``backend`` and the architecture's arguments (``num_classes``, ``in_channels``,
``features_only``, ...). Weights files are found in ``$FROSTNET_WEIGHTS_DIR``, the checkout's
``weights/`` or the Hugging Face Hub, and verified (sha256) before they are read; no pickle is
involved. A model family registered with ``frostnet.models.register_model`` appears here by
itself; ``tests/test_hub.py`` loads every entrypoint through ``torch.hub.load(..., source="local")``.
"""

dependencies = ["torch", "torchvision", "safetensors", "huggingface_hub"]

from frostnet.hub import entrypoint as _entrypoint  # noqa: E402
from frostnet.models import list_models as _list_models  # noqa: E402

#: Every entrypoint name: the registered models, classification, segmentation and detection.
ENTRYPOINTS: tuple[str, ...] = tuple(_list_models())

for _name in ENTRYPOINTS:
    globals()[_name] = _entrypoint(_name)
del _name
