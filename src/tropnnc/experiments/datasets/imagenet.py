"""ImageNet (or any ``<class>/<image>`` folder) read lazily, with the VGG-16 preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import DatasetError, DatasetNotFoundError, data_dir

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataset", "load_imagenet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def _require_pillow():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading ImageNet needs Pillow: pip install pillow") from e
    return Image


class ImageFolderDataset(Dataset):
    """A lazy image-folder dataset: ``folder/<class>/<image>``, classes in sorted order.

    Each item is ``(image, label)``: the image is decoded with Pillow, converted to RGB, resized
    so that its shorter side is ``round(image_size * 256 / 224)`` (bilinear, antialiased, in
    torch), centre-cropped to ``image_size`` and, with ``normalize=True``, normalised with the
    ImageNet mean/std (the torchvision VGG-16 preprocessing); else left in ``[0, 1]``.
    """

    def __init__(self, folder: str | Path, image_size: int = 224, normalize: bool = True):
        _require_pillow()
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DatasetNotFoundError(
                f"image folder {self.folder} not found: expected {self.folder}/<class>/<image> "
                "(e.g. ILSVRC2012 train/ and val/ with one sub-folder per synset)"
            )
        self.classes = sorted(
            p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            for p in sorted((self.folder / c).rglob("*")):
                if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS:
                    self.samples.append((p, self.class_to_idx[c]))
        if not self.samples:
            raise DatasetNotFoundError(
                f"no images found under {self.folder}/<class>/ (extensions: "
                f"{', '.join(sorted(_IMAGE_EXTENSIONS))})"
            )
        self.image_size = int(image_size)
        self.resize_to = int(round(self.image_size * 256 / 224))
        self.normalize = normalize
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = _require_pillow()
        try:
            with image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: cannot decode image ({e})") from e
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return self.transform(x), label

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Resize (shorter side), centre crop and normalise a ``(3, H, W)`` tensor in [0, 1]."""
        _, h, w = x.shape
        s = self.resize_to
        if h <= w:
            nh, nw = s, max(s, int(round(w * s / h)))
        else:
            nh, nw = max(s, int(round(h * s / w))), s
        if (nh, nw) != (h, w):
            x = (
                torch.nn.functional.interpolate(
                    x.unsqueeze(0),
                    size=(nh, nw),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
                .squeeze(0)
                .clamp_(0.0, 1.0)
            )
        c = self.image_size
        top, left = (nh - c) // 2, (nw - c) // 2
        x = x[:, top : top + c, left : left + c]
        if self.normalize:
            x = (x - self._mean) / self._std
        return x.contiguous()


def load_imagenet(
    split: str = "val",
    root: str | Path | None = None,
    image_size: int = 224,
    normalize: bool = True,
) -> ImageFolderDataset:
    """ImageNet as an image folder ``root/<split>/<class>/*.JPEG`` (lazy; needs Pillow).

    ``split`` is the sub-folder name (``"train"``, ``"val"``; ``"test"`` maps to ``val`` when
    there is no ``test`` folder, since the ILSVRC test labels are not public).
    """
    _require_pillow()
    base = Path(root).expanduser() if root is not None else data_dir() / "imagenet"
    folder = base / split
    if split == "test" and not folder.is_dir() and (base / "val").is_dir():
        folder = base / "val"
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"ImageNet split {split!r} not found at {folder}: expected "
            f"{base}/{split}/<class>/<image>.JPEG; pass the folder holding train/ and val/ as "
            "root=... (ImageNet cannot be downloaded automatically)."
        )
    return ImageFolderDataset(folder, image_size=image_size, normalize=normalize)
