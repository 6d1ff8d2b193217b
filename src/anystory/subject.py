"""`Subject`: one reference (image + mask) and its preprocessing (paper §3.1).

A subject is segmented (outside the mask set to zero in the encoder's normalised input
space), cropped to a square around the mask's bounding box with a margin, and resized:
to the CLIP encoder's input size, and to the ReferenceNet's reference size (with the mask).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # beyond this an image is refused as a likely decompression bomb
MIN_SIDE = 8
CROP_MARGIN = 0.1


class SubjectError(ValueError):
    """A subject image or mask that cannot be used, with the reason."""


def load_image(source, what: str = "image") -> Image.Image:
    """Open an image from a path, PIL image or uint8 array, refusing unreadable or absurd inputs."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _array_to_image(source, what)
    elif isinstance(source, (str, os.PathLike)):
        image = _open_file(Path(source), what)
    else:
        raise SubjectError(f"{what} must be a path, PIL image or numpy array, got {type(source).__name__}")
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise SubjectError(f"{what} is {width}x{height} pixels, over the {MAX_PIXELS:,}-pixel limit")
    if min(width, height) < MIN_SIDE:
        raise SubjectError(f"{what} is {width}x{height} pixels; each side must be at least {MIN_SIDE}")
    return ImageOps.exif_transpose(image)


def _open_file(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise SubjectError(f"{what} file not found: {path}")
    try:
        image = Image.open(path)  # lazy: reads the header only, so size is checked before decoding
    except (UnidentifiedImageError, OSError) as error:
        raise SubjectError(f"{what} file {path} is not a readable image ({error})") from None
    except Image.DecompressionBombError as error:
        raise SubjectError(f"{what} file {path} is too large to decode safely ({error})") from None
    if image.width * image.height > MAX_PIXELS:
        raise SubjectError(f"{what} file {path} is {image.width}x{image.height}, over the {MAX_PIXELS:,}-pixel limit")
    try:
        image.load()
    except (OSError, ValueError) as error:
        raise SubjectError(f"{what} file {path} is truncated or corrupt ({error})") from None
    return image


def _array_to_image(array: np.ndarray, what: str) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise SubjectError(f"{what} array must be uint8 (H, W) or (H, W, C), got {array.dtype} {array.shape}")
    return Image.fromarray(array)


class Subject:
    """A reference subject: an RGB image and a boolean mask of the same size.

    `mask` may be omitted: an RGBA image's alpha is then used; otherwise the whole image
    is the subject (give a mask, or see `anystory.matting`, to segment photos).
    """

    def __init__(self, image, mask=None, name: str = ""):
        picture = load_image(image, "subject image")
        self.name = name or (Path(image).stem if isinstance(image, (str, os.PathLike)) else "")
        self.mask = self._resolve_mask(picture, mask)
        self.image = picture.convert("RGB")

    def __repr__(self) -> str:
        return f"Subject(name={self.name!r}, size={self.image.size}, mask_fraction={self.mask.mean():.2f})"

    @staticmethod
    def _resolve_mask(picture: Image.Image, mask) -> np.ndarray:
        if mask is not None:
            mask_image = load_image(mask, "subject mask")
            if mask_image.size != picture.size:
                raise SubjectError(
                    f"mask size {mask_image.size[0]}x{mask_image.size[1]} does not match image size "
                    f"{picture.size[0]}x{picture.size[1]}"
                )
            return _binary(np.asarray(mask_image.convert("L")), "subject mask", allow_full=False)
        if picture.mode in ("RGBA", "LA") or (picture.mode == "P" and "transparency" in picture.info):
            alpha = np.asarray(picture.convert("RGBA"))[..., 3]
            if alpha.min() < 128:  # an opaque alpha carries no mask
                return _binary(alpha, "subject image alpha channel", allow_full=True)
        return np.ones((picture.height, picture.width), dtype=bool)

    # -- preprocessing ----------------------------------------------------------------------

    def crop_box(self, margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
        """Square (left, top, right, bottom) around the mask's bounding box, `margin` of its
        side added on each side; it may extend past the image (filled with zeros)."""
        rows, cols = np.nonzero(self.mask)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        side = max(bottom - top, right - left) * (1 + 2 * margin)
        cy, cx = (top + bottom) / 2, (left + right) / 2
        half = side / 2
        return round(cx - half), round(cy - half), round(cx + half), round(cy + half)

    def cropped(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The square crop resized to `size`: image in [0, 1] (3, size, size) and soft mask (1, size, size)."""
        box = self.crop_box()
        image = self.image.crop(box).resize((size, size), Image.Resampling.BICUBIC)
        mask = Image.fromarray(self.mask.astype(np.uint8) * 255).crop(box).resize((size, size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return pixels.clamp(0, 1), torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]

    def clip_pixels(self, size: int, mean: list[float], std: list[float]) -> torch.Tensor:
        """CLIP input (3, size, size): normalised, zero outside the mask."""
        pixels, mask = self.cropped(size)
        normalized = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        return normalized * mask

    def reference_pixels(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ReferenceNet input: VAE pixels in [-1, 1] zero outside the mask (3, size, size), and the mask."""
        pixels, mask = self.cropped(size)
        return (pixels * 2 - 1) * mask, mask


def _binary(values: np.ndarray, what: str, allow_full: bool) -> np.ndarray:
    mask = values >= 128
    if not mask.any():
        raise SubjectError(f"{what} is empty: no pixel is marked as the subject")
    if mask.all() and not allow_full:
        raise SubjectError(f"{what} covers the whole image; omit the mask to use the whole image as the subject")
    return mask


def latent_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (N, 1, H, W) resampled to a latent grid by area (the ReferenceNet's 5th channel)."""
    return F.interpolate(masks, size=size, mode="area")
