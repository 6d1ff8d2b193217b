"""AnyStory: unified single- and multi-subject personalization for Stable Diffusion XL."""

__version__ = "0.1.0"
