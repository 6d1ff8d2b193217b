"""Subject masks when the user gives none.

A subject is encoded from its pixels inside its mask, so a photo's background must not
leak in. Masks come, in order of preference, from: the user; the image's alpha channel
(RGBA with transparent pixels); a matting backend. A backend is any callable
`backend(image: PIL.Image) -> mask`, the mask being a PIL image, a numpy array or a torch
tensor (bool, uint8 0-255 or float 0-1), at any size (it is resized to the image).

Backends:
- `rembg`, when the package is installed (its model files must already be on disk,
  see rembg's `U2NET_HOME`; nothing is downloaded here);
- `TransformersSegmentation(path)`: a transformers `image-segmentation` pipeline loaded
  from a local model folder; pass the folder as the backend spec;
- your own: `register_matting_backend("name", fn)` (the mini world registers its
  segmentation this way). The backend registered last is the default.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .subject import Subject, load_image

MattingBackend = Callable[[Image.Image], Any]
BACKGROUND_LABELS = frozenset({"background", "bg", "__background__", "others"})

_BACKENDS: dict[str, MattingBackend] = {}

NO_BACKEND_HELP = (
    "give a mask (Subject(image, mask), or IMAGE:MASK on the command line), use an RGBA image "
    "whose background is transparent, install `rembg` (with its model files on disk), pass a "
    "local transformers image-segmentation model folder as the matting backend, or register "
    "one with anystory.matting.register_matting_backend(name, fn)"
)


class MattingError(ValueError):
    """No mask could be made for a subject image, with the reason and how to give one."""


def register_matting_backend(name: str, backend: MattingBackend) -> None:
    """Make `backend` available as `name`; the backend registered last is the default."""
    if not callable(backend):
        raise TypeError(f"a matting backend must be callable (image -> mask), got {type(backend).__name__}")
    _BACKENDS.pop(name, None)
    _BACKENDS[name] = backend


def available_backends() -> list[str]:
    """Names usable now, the default first: registered backends (latest first), then rembg."""
    names = list(reversed(_BACKENDS))
    if "rembg" not in names and importlib.util.find_spec("rembg") is not None:
        names.append("rembg")
    return names


def get_backend(spec: str | Path | MattingBackend | None = None) -> MattingBackend:
    """A backend from a registered name, "rembg", a local model folder or a callable;
    None picks the default."""
    if callable(spec):
        return spec
    if spec is None:
        names = available_backends()
        if not names:
            raise MattingError(f"no matting backend is available: {NO_BACKEND_HELP}")
        spec = names[0]
    spec = str(spec)
    if spec in _BACKENDS:
        return _BACKENDS[spec]
    if spec == "rembg":
        return Rembg()
    if Path(spec).expanduser().is_dir():
        return TransformersSegmentation(spec)
    raise MattingError(
        f"unknown matting backend {spec!r}: not a registered name {list(_BACKENDS)}, 'rembg', "
        "or a local model folder"
    )


def alpha_mask(image: Image.Image) -> np.ndarray | None:
    """The alpha channel as a mask when the image has transparent pixels, else None."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 128:
            return alpha >= 128
    return None


def extract_mask(
    image: Image.Image, backend: str | Path | MattingBackend | None = None, threshold: float = 0.5
) -> np.ndarray:
    """The subject's mask, (H, W) bool: the alpha channel if transparent, else the backend's."""
    alpha = alpha_mask(image)
    if alpha is not None:
        return alpha
    matte = get_backend(backend)
    mask = as_mask(matte(image.convert("RGB")), image.size, threshold)
    if not mask.any():
        raise MattingError(f"the matting backend found no subject in the {image.width}x{image.height} image; {NO_BACKEND_HELP}")
    return mask


def matted_subject(
    image: str | Path | Image.Image | np.ndarray,
    mask: str | Path | Image.Image | np.ndarray | None = None,
    backend: str | Path | MattingBackend | None = None,
    name: str = "",
) -> Subject:
    """A `Subject` whose mask is the given one, the alpha channel, or the backend's."""
    if mask is not None:
        return Subject(image, mask, name=name)
    picture = load_image(image, "subject image")
    found = extract_mask(picture, backend)
    # A subject that fills the whole picture is given without a mask (Subject refuses a full one).
    return Subject(picture, None if found.all() else found, name=name or _stem(image))


def _stem(source) -> str:
    return Path(source).stem if isinstance(source, (str, Path)) else ""


def as_mask(output: Any, size: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """A backend's output (PIL, array or tensor; bool, uint8 or float) as an (H, W) bool
    mask at `size` (width, height)."""
    if isinstance(output, torch.Tensor):
        output = output.detach().float().cpu().numpy()
    if isinstance(output, Image.Image):
        values = np.asarray(output.convert("L"), dtype=np.float32) / 255.0
    else:
        values = np.asarray(output)
        values = values.astype(np.float32) / 255.0 if values.dtype == np.uint8 else values.astype(np.float32)
    values = np.squeeze(values)
    if values.ndim != 2:
        raise MattingError(f"a matting backend must return one (H, W) mask, got shape {values.shape}")
    if values.shape != (size[1], size[0]):
        values = np.asarray(Image.fromarray(values).resize(size, Image.Resampling.BILINEAR))
    return values >= threshold


class Rembg:
    """rembg's background removal (U2-Net family); its model files must be on disk."""

    def __init__(self, model_name: str = "u2net"):
        try:
            self._rembg = importlib.import_module("rembg")
        except ImportError:
            raise MattingError(f"the rembg backend needs `pip install rembg`; otherwise {NO_BACKEND_HELP}") from None
        self.model_name = model_name
        self._session = None

    def __call__(self, image: Image.Image) -> Image.Image:
        if self._session is None:
            self._session = self._rembg.new_session(self.model_name)
        return self._rembg.remove(image, only_mask=True, session=self._session)


class TransformersSegmentation:
    """A transformers `image-segmentation` pipeline from a local folder (semantic, instance
    or panoptic models): the union of the masks of the `labels` it finds, or of every
    label that is not background."""

    def __init__(
        self,
        model_path: str | Path,
        labels: Iterable[str] | None = None,
        device: str | torch.device = "cpu",
        allow_pickle: bool = False,
    ):
        path = Path(model_path).expanduser()
        if not path.is_dir():
            raise MattingError(f"segmentation model folder not found: {path}")
        self.model_path, self.device, self.allow_pickle = path, device, allow_pickle
        self.labels = None if labels is None else frozenset(labels)
        self._pipeline = None

    def _load(self):
        from transformers import pipeline

        if not self.allow_pickle and not any(self.model_path.glob("*.safetensors")):
            raise MattingError(
                f"no safetensors weights in {self.model_path}: convert them, or pass allow_pickle=True "
                "if you trust the files"
            )
        try:
            return pipeline(
                "image-segmentation", model=str(self.model_path), device=self.device,
                model_kwargs={"use_safetensors": None if self.allow_pickle else True},
            )
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0]
            raise MattingError(f"cannot load a segmentation model from {self.model_path}: {reason}") from error

    def __call__(self, image: Image.Image) -> np.ndarray:
        if self._pipeline is None:
            self._pipeline = self._load()
        mask = np.zeros((image.height, image.width), dtype=bool)
        for segment in self._pipeline(image):
            label = str(segment["label"])
            wanted = label in self.labels if self.labels is not None else label.lower() not in BACKGROUND_LABELS
            if wanted:
                mask |= as_mask(segment["mask"], image.size)
        return mask
