"""AnyStory: unified single- and multi-subject personalization for Stable Diffusion XL."""

from .models import AnyStoryAdapter, AnyStoryState, ReferenceNet, SubjectEncodings
from .pipelines import AnyStoryPipelineOutput, AnyStorySDXLPipeline, RoutingMaps
from .subject import Subject, SubjectError

__version__ = "0.1.0"

__all__ = [
    "AnyStoryAdapter", "AnyStoryPipelineOutput", "AnyStorySDXLPipeline", "AnyStoryState",
    "ReferenceNet", "RoutingMaps", "Subject", "SubjectEncodings", "SubjectError",
]
