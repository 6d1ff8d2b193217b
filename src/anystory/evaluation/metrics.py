"""DINO and CLIP embeddings for subject fidelity (DINO, CLIP-I) and text alignment (CLIP-T).

The metric models load only from local folders (nothing is downloaded): a DINO ViT-S/16
(`facebook/dino-vits16` saved with `save_pretrained`) for DINO, a CLIP model
(`openai/clip-vit-base-patch32` or any `CLIPModel` folder) for CLIP-I and CLIP-T. DINO
uses the CLS token of the last layer (after the final layer norm), as the DreamBooth
protocol's `dino_vits16` does; CLIP uses the projected image and text embeddings. All
embeddings are L2-normalised, so a dot product is the cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel


class MetricModelError(ValueError):
    """A metric model folder that cannot be used, with the reason."""


def _load(loader, path: Path, what: str, **kwargs):
    try:
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        raise MetricModelError(f"cannot load the {what} from {path}: {error}") from error


def _local_folder(path: str | Path, what: str, allow_pickle: bool) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MetricModelError(
            f"the {what} must be a local model folder (saved with `save_pretrained`); not found: {path}"
        )
    if not allow_pickle and not any(path.glob("*.safetensors")):
        raise MetricModelError(
            f"no safetensors weights in {path}: convert them, or pass allow_pickle=True if you trust the files"
        )
    return path


def _features(output) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers 4 and a pooled output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class MetricModels:
    """The DINO and CLIP models of the DreamBench metrics, with their preprocessors."""

    def __init__(self, dino, dino_processor, clip: CLIPModel, clip_processor, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.dino = dino.to(self.device).eval()
        self.clip = clip.to(self.device).eval()
        self.dino_processor = dino_processor
        self.clip_processor = clip_processor

    @classmethod
    def from_pretrained(
        cls,
        dino_path: str | Path,
        clip_path: str | Path,
        device: str | torch.device = "cpu",
        allow_pickle: bool = False,
    ) -> MetricModels:
        """Load both metric models from local folders; pickle weights only if `allow_pickle`."""
        use_safetensors = None if allow_pickle else True
        dino_path = _local_folder(dino_path, "DINO model", allow_pickle)
        clip_path = _local_folder(clip_path, "CLIP model", allow_pickle)
        dino = _load(AutoModel, dino_path, "DINO model", use_safetensors=use_safetensors)
        clip = _load(CLIPModel, clip_path, "CLIP model", use_safetensors=use_safetensors)
        return cls(
            dino=dino,
            dino_processor=_load(AutoImageProcessor, dino_path, "DINO image processor"),
            clip=clip,
            clip_processor=_load(AutoProcessor, clip_path, "CLIP processor"),
            device=device,
        )

    @torch.no_grad()
    def dino_embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """DINO CLS embeddings, one row per image."""
        pixels = self.dino_processor(images=[_rgb(i) for i in images], return_tensors="pt")["pixel_values"]
        hidden = self.dino(pixel_values=pixels.to(self.device, self.dino.dtype)).last_hidden_state
        return _normalize(hidden[:, 0])

    @torch.no_grad()
    def clip_image_embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP image embeddings, one row per image."""
        pixels = self.clip_processor(images=[_rgb(i) for i in images], return_tensors="pt")["pixel_values"]
        return _normalize(_features(self.clip.get_image_features(pixel_values=pixels.to(self.device, self.clip.dtype))))

    @torch.no_grad()
    def clip_text_embed(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings, one row per text (truncated to the text encoder's length)."""
        tokens = self.clip_processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _normalize(_features(self.clip.get_text_features(**tokens)))


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()
