from .adapter import AdapterWeightsError, AnyStoryAdapter, AnyStoryLayer
from .conditioning import AnyStoryState, RecordedMaps, SubjectEncodings
from .qformer import QFormer
from .reference_net import ReferenceNet
from .router import RouterLayer, RouterLogits, hard_route
from .topology import grid_size, sdxl_unet_config, transformer_blocks

__all__ = [
    "AdapterWeightsError", "AnyStoryAdapter", "AnyStoryLayer", "AnyStoryState", "QFormer",
    "RecordedMaps", "ReferenceNet", "RouterLayer", "RouterLogits", "SubjectEncodings",
    "grid_size", "hard_route", "sdxl_unet_config", "transformer_blocks",
]
