from .pipeline_anystory_sdxl import AnyStoryPipelineOutput, AnyStorySDXLPipeline, RoutingMaps

__all__ = ["AnyStoryPipelineOutput", "AnyStorySDXLPipeline", "RoutingMaps"]
