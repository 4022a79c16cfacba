"""torch.hub entrypoints of frostnet.

    model = torch.hub.load("<path to a frostnet checkout>", "frostnet_small_1_0", source="local")

Every entrypoint takes the keyword arguments of :func:`frostnet.models.frostnet.frostnet`.
"""

dependencies = ["torch", "torchvision", "safetensors", "huggingface_hub"]

from frostnet.models.frostnet import (  # noqa: E402,F401
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
