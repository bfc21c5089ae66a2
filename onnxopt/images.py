"""Image folders as calibration and evaluation data: JPEG/PNG files read with Pillow, preprocessed, in batches.

A folder of images becomes float tensors for a model's single image input::

    pre = parse_preprocess("imagenet")            # resize 256, centre crop 224, RGB/255, ImageNet mean/std
    source = image_source("val1300", pre, model)  # a DataSource: reads 16 images at a time, again on each pass

Preprocessing follows torchvision's ``Resize(256)`` + ``CenterCrop(224)`` + ``ToTensor()`` + ``Normalize``
on a PIL image, so that models trained with it score what their authors measured:

1. ``convert("RGB")`` (grey, palette, RGBA and CMYK images become RGB; alpha is dropped).
2. ``resize``: the shorter side becomes ``resize`` pixels and the longer ``int(resize * long / short)`` (truncated,
   as torchvision computes it), bilinear with Pillow's antialiasing, on 8-bit pixels. ``size=(h, w)`` resizes to
   exactly that size instead (fixed-size detectors).
3. ``crop``: a centre crop of ``crop`` x ``crop``, its top-left corner at ``round((h - crop) / 2)``,
   ``round((w - crop) / 2)`` (Python's rounding, as torchvision); an image smaller than the crop is padded with 0.
4. ``x = pixel * scale``, then ``(x - mean) / std`` per channel (mean and std in RGB order, in the scaled units).
5. ``bgr`` reverses the channels; ``layout`` is ``NCHW`` (C, H, W per image) or ``NHWC``.

Labels come from a ``labels.txt`` in the folder (``FILE, CLASS`` lines, CLASS an integer) or from class sub-folders
(sorted folder names give classes 0..k-1); a folder of loose images has no labels. Pillow is the ``images`` extra
and is imported only when an image is read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import data as data_mod
from onnxopt.errors import DataError, UsageError
from onnxopt.graph import shape_text

__all__ = [
    "Preprocess",
    "PRESETS",
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "parse_preprocess",
    "list_images",
    "load_image",
    "load_images",
    "image_source",
    "is_image_folder",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
LABELS_FILE = "labels.txt"
MAX_BATCH_BYTES = 4 << 20  # input bytes per batch when the batch size is automatic: 6 ImageNet images, 16 CIFAR
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a float tensor (see the module docstring for the order of the steps).

    Attributes:
        resize: the shorter side after a bilinear resize; ``None`` keeps the image's size.
        crop: the side of the centre crop; ``None`` keeps the whole image.
        scale: pixel values (0-255) are multiplied by this before mean/std.
        mean: per-channel mean in the scaled units, RGB order; ``None`` subtracts nothing.
        std: per-channel standard deviation, RGB order; ``None`` divides by nothing.
        bgr: reverse the channels to BGR after normalizing.
        layout: ``"NCHW"`` or ``"NHWC"``.
        size: an exact ``(height, width)`` to resize to, instead of ``resize``.
    """

    resize: int | None = 256
    crop: int | None = 224
    scale: float = 1 / 255
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    bgr: bool = False
    layout: str = "NCHW"
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise UsageError(f"preprocess layout {self.layout!r}: expected NCHW or NHWC")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise UsageError(f"preprocess {name}={value!r}: expected a positive integer or none")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise UsageError(f"preprocess size={self.size!r}: expected (height, width), both positive")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise UsageError(f"preprocess {name}={value!r}: expected 3 values (R, G, B)")
        if self.std is not None and any(s == 0 for s in self.std):
            raise UsageError(f"preprocess std={self.std!r}: must not be 0")
        if not np.isfinite(self.scale) or self.scale == 0:
            raise UsageError(f"preprocess scale={self.scale!r}: expected a finite non-zero number")

    def describe(self) -> str:
        """A spec string that :func:`parse_preprocess` reads back to this object (a preset's name for a preset)."""
        for name, preset in PRESETS.items():
            if preset == self:
                return name
        parts = [
            "resize=" + ("none" if self.resize is None else str(self.resize)),
            "crop=" + ("none" if self.crop is None else str(self.crop)),
            f"scale={_number(self.scale)}",
        ]
        if self.mean is not None:
            parts.append("mean=" + "/".join(_plain(m) for m in self.mean))
        if self.std is not None:
            parts.append("std=" + "/".join(_plain(s) for s in self.std))
        if self.size is not None:
            parts.append(f"size={self.size[0]}x{self.size[1]}")
        if self.bgr:
            parts.append("bgr")
        parts.append(self.layout.lower())
        return ",".join(parts)


PRESETS: dict[str, Preprocess] = {
    # torchvision's ImageNet models: Resize(256), CenterCrop(224), ToTensor(), Normalize(mean, std)
    "imagenet": Preprocess(256, 224, 1 / 255, _IMAGENET_MEAN, _IMAGENET_STD),
    # TF/EfficientNet-Lite style: the same resize and crop, then (RGB - 127) / 128
    "tf": Preprocess(256, 224, 1.0, (127.0,) * 3, (128.0,) * 3),
    # the image as it is: RGB / 255
    "none": Preprocess(None, None, 1 / 255),
}


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """A folder of images with its preprocessing: data that :func:`onnxopt.data.as_source` accepts.

    ``batch_size`` fixes the batch; ``None`` takes ``as_source``'s batch size (16 by default) capped at
    ``max_batch_bytes`` of input per batch: a model's activations grow with its input, and onnxruntime's
    calibration session holds about 100 MB per 224x224 image for MobileNetV2 (1.9 GB at 16 images, 0.6 GB at 4).
    """

    path: Path
    preprocess: Preprocess
    batch_size: int | None = None
    max_batch_bytes: int = MAX_BATCH_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


def parse_preprocess(spec: str | Preprocess) -> Preprocess:
    """Read a ``--preprocess`` spec: a preset name, optionally followed by ``key=value`` items and flags.

    Items: ``resize=N|none``, ``crop=N|none``, ``scale=X`` (a number or a fraction such as ``1/255``),
    ``mean=R/G/B`` or ``mean=X`` (all three channels), ``std=...`` (the same), ``size=HxW|none``, and the flags
    ``bgr``, ``rgb``, ``nchw``, ``nhwc``. Without a preset first, the items change the defaults of
    :class:`Preprocess` (resize 256, crop 224, scale 1/255, no mean/std, RGB, NCHW). For example
    ``imagenet,crop=192`` or ``resize=none,crop=none,mean=0.485/0.456/0.406,std=0.229/0.224/0.225``.

    Raises:
        UsageError: an unknown preset or item, or a value that cannot be read.
    """
    if isinstance(spec, Preprocess):
        return spec
    items = [item.strip() for item in str(spec).split(",")]
    if not any(items):
        raise UsageError(f"--preprocess {spec!r}: empty; give a preset ({', '.join(PRESETS)}) or key=value items")
    base = Preprocess()
    if items[0].lower() in PRESETS:
        base = PRESETS[items.pop(0).lower()]
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        try:
            if not sep:
                flags = {"bgr": ("bgr", True), "rgb": ("bgr", False), "nchw": ("layout", "NCHW")}
                flags["nhwc"] = ("layout", "NHWC")
                if key not in flags:
                    raise KeyError(key)
                changes[flags[key][0]] = flags[key][1]
            elif key in ("resize", "crop"):
                changes[key] = None if value.lower() == "none" else _positive_int(value)
            elif key == "scale":
                changes[key] = _ratio(value)
            elif key in ("mean", "std"):
                values = [float(v) for v in value.split("/")]
                if len(values) not in (1, 3):
                    raise ValueError
                changes[key] = tuple(values * 3 if len(values) == 1 else values)
            elif key == "size":
                if value.lower() == "none":
                    changes[key] = None
                else:
                    height, width = value.lower().split("x")
                    changes[key] = (_positive_int(height), _positive_int(width))
            elif key == "layout":
                changes[key] = value.upper()
            else:
                raise KeyError(key)
        except KeyError:
            known = "resize=, crop=, scale=, mean=, std=, size=, bgr, rgb, nchw, nhwc"
            raise UsageError(
                f"--preprocess {spec!r}: unknown item {item!r}; presets are {', '.join(PRESETS)} (first), "
                f"items are {known}"
            ) from None
        except (ValueError, ZeroDivisionError):
            raise UsageError(
                f"--preprocess {spec!r}: cannot read {item!r} (resize/crop: N or none; scale: X or A/B; "
                "mean/std: R/G/B or one value; size: HxW)"
            ) from None
    return dataclasses.replace(base, **changes)


def is_image_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory (the CLI then reads it as images; ``.npz`` data is a file)."""
    return Path(path).is_dir()


def list_images(path: str | os.PathLike) -> tuple[list[Path], list[int] | None]:
    """The images of a folder, sorted, and their class labels when the folder gives them.

    Labels come from ``labels.txt`` (``FILE, CLASS`` lines; every image needs one and every line needs an
    image), else from class sub-folders (sorted folder names are classes 0..k-1; images directly in the folder
    are then an error), else there are none.

    Raises:
        DataError: not a folder, no images, a bad or incomplete ``labels.txt``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    loose = sorted(p for p in folder.iterdir() if _is_image(p))
    labels_file = folder / LABELS_FILE
    if labels_file.is_file():
        return _labelled_by_file(folder, loose, labels_file)
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [c for c in classes if any(_is_image(p) for p in c.rglob("*"))]
    if classes:
        if loose:
            raise DataError(
                f"{folder}: has both class sub-folders ({classes[0].name}, ...) and loose images "
                f"({loose[0].name}, ...); move the loose images into a class folder or remove the folders"
            )
        files: list[Path] = []
        labels: list[int] = []
        for index, class_dir in enumerate(classes):
            members = sorted(p for p in class_dir.rglob("*") if _is_image(p))
            files += members
            labels += [index] * len(members)
        logger.info("%s: %d images in %d class folders", folder, len(files), len(classes))
        return files, labels
    if not loose:
        raise DataError(f"{folder}: holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return loose, None


def load_image(path: str | os.PathLike, pre: Preprocess) -> np.ndarray:
    """One image file as a float32 array of shape (C, H, W) (NCHW) or (H, W, C) (NHWC).

    Raises:
        DataError: the file cannot be read or decoded (the message names it).
    """
    image = _pil()
    path = Path(path)
    try:
        with image.open(path) as img:
            img = img.convert("RGB")  # decodes the whole file: a truncated JPEG fails here
            if pre.size is not None:
                height, width = pre.size
                img = img.resize((width, height), image.Resampling.BILINEAR)
            elif pre.resize is not None:
                img = img.resize(_shorter_side_size(img.size, pre.resize), image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, image.DecompressionBombError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None
    if pre.crop is not None:
        pixels = _centre_crop(pixels, pre.crop)
    x = pixels.astype(np.float32) * np.float32(pre.scale)
    if pre.mean is not None:
        x -= np.asarray(pre.mean, dtype=np.float32)
    if pre.std is not None:
        x /= np.asarray(pre.std, dtype=np.float32)
    if pre.bgr:
        x = x[..., ::-1]
    if pre.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x)


def load_images(
    path: str | os.PathLike, pre: Preprocess, limit: int | None = None, offset: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images ``offset .. offset+limit`` of a folder (in :func:`list_images` order), stacked, with their labels.

    Eager: the whole selection is in memory (for benchmarks and small sets; use :func:`image_source` otherwise).
    Raises DataError for an unreadable image, or images of different sizes (give ``crop`` or ``size``).
    """
    files, labels = list_images(path)
    stop = None if limit is None else offset + limit
    files = files[offset:stop]
    if not files:
        raise DataError(f"{path}: no images at offset {offset}")
    arrays = [load_image(f, pre) for f in files]
    _check_same_shape(arrays, files)
    selected = None if labels is None else np.asarray(labels[offset:stop], dtype=np.int64)
    return np.stack(arrays), selected


def image_source(
    path: str | os.PathLike,
    pre: Preprocess,
    model: ir.Model,
    *,
    batch_size: int = 16,
    what: str = "data",
    max_batch_bytes: int | None = None,
) -> data_mod.DataSource:
    """A lazy :class:`~onnxopt.data.DataSource` of the folder's images for ``model``'s single float image input.

    Each iteration reads the files again, ``batch_size`` at a time (fewer when a batch's input would exceed
    ``max_batch_bytes``; the model's batch size when it is fixed, and images left over after whole batches of a
    fixed size are not used), so memory stays flat in the number of images. The first image is read here to
    check its shape against the model's input.

    Raises:
        DataError: the model has several data inputs or a non-float input, the preprocessed shape does not fit
            the model's input, a file cannot be read, or the folder holds no images.
    """
    folder = Path(path)
    specs = data_mod.input_specs(model)
    if len(specs) != 1:
        names = ", ".join(s.describe() for s in specs)
        raise DataError(
            f"{what} {folder}: an image folder feeds a model with one image input; this model has {len(specs)} "
            f"({names}); give an .npz keyed by input name"
        )
    spec = specs[0]
    if spec.dtype.kind != "f":
        raise DataError(f"{what} {folder}: input {spec.describe()} is not a float tensor; images cannot feed it")
    files, labels = list_images(folder)
    first = load_image(files[0], pre)
    _check_fits(first, files[0], pre, spec, f"{what} {folder}")
    step = max(1, int(batch_size))
    if max_batch_bytes is not None:
        step = max(1, min(step, max_batch_bytes // max(1, first.size * spec.dtype.itemsize)))
    step = spec.fixed_batch or step
    usable = len(files) - len(files) % spec.fixed_batch if spec.fixed_batch else len(files)
    if usable == 0:
        raise DataError(f"{what} {folder}: {len(files)} images, but the model's fixed batch size is {step}")
    if usable < len(files):
        logger.warning("%s %s: %d images left over after batches of %d are not used", what, folder,
                       len(files) - usable, step)  # fmt: skip
    description = f"{what} {folder.name}/ ({pre.describe()})"

    starts = range(0, usable, step)
    labels = None if labels is None else np.asarray(labels[:usable], dtype=np.int64)

    def reader(files: list[Path], labels: np.ndarray | None):
        def read(first: int, stop: int) -> Iterator[data_mod.Batch]:  # batches first .. stop-1 (a Ray task's shard)
            for start in starts[first:stop]:
                chunk = files[start : start + step]
                arrays = [load_image(f, pre) for f in chunk]
                _check_same_shape(arrays, chunk)
                _check_fits(arrays[0], chunk[0], pre, spec, f"{what} {folder}")
                batch = np.stack(arrays).astype(spec.dtype, copy=False)
                yield data_mod.Batch({spec.name: batch}, None if labels is None else labels[start : start + step])

        return read

    def take(order: np.ndarray) -> data_mod.DataSource:  # the images in another order (data_mod.reordered)
        read = reader([files[i] for i in order], None if labels is None else labels[order])
        taken = data_mod.DataSource(lambda: read(0, len(starts)), description, usable, batch_sizes=sizes)
        taken.labels, taken.order = None if labels is None else labels[order], order
        return taken

    read = reader(files, labels)
    sizes = [min(step, usable - start) for start in starts]
    source = data_mod.DataSource(lambda: read(0, len(starts)), description, usable, reader=read, batch_sizes=sizes)
    source.labels, source.take = labels, take
    return source


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("reading images needs Pillow: pip install 'onnxopt[images]'") from None
    return Image


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _labelled_by_file(folder: Path, files: list[Path], labels_file: Path) -> tuple[list[Path], list[int]]:
    table: dict[str, int] = {}
    for number, line in enumerate(labels_file.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, label = line.rpartition(",")
        try:
            if not sep or not name.strip():
                raise ValueError
            table[name.strip()] = int(label.strip())
        except ValueError:
            raise DataError(
                f"{labels_file} line {number}: expected 'FILE, CLASS' with an integer class, got {line[:80]!r}"
            ) from None
    if not files:
        raise DataError(f"{folder}: holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    unlabelled = [f.name for f in files if f.name not in table]
    if unlabelled:
        raise DataError(f"{labels_file}: no label for {len(unlabelled)} images ({unlabelled[0]}, ...)")
    present = {f.name for f in files}
    missing = [name for name in table if name not in present]
    if missing:
        raise DataError(f"{labels_file}: {len(missing)} listed files are not images in {folder} ({missing[0]}, ...)")
    return files, [table[f.name] for f in files]


def _shorter_side_size(size: tuple[int, int], target: int) -> tuple[int, int]:
    """torchvision's ``Resize(int)`` output (width, height): the shorter side ``target``, the longer truncated."""
    width, height = size
    if width <= height:
        return target, int(target * height / width)
    return int(target * width / height), target


def _centre_crop(pixels: np.ndarray, crop: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    if height < crop or width < crop:  # torchvision pads with zeros, then crops
        pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
        pads = ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        pixels = np.pad(pixels, pads)
        height, width = pixels.shape[:2]
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return pixels[top : top + crop, left : left + crop]


def _check_same_shape(arrays: Sequence[np.ndarray], files: Sequence[Path]) -> None:
    for array, file in zip(arrays, files, strict=True):
        if array.shape != arrays[0].shape:
            raise DataError(
                f"images of different sizes: {files[0].name} gives {shape_text(arrays[0].shape)}, "
                f"{file.name} {shape_text(array.shape)}; give --preprocess crop=N or size=HxW"
            )


def _check_fits(array: np.ndarray, file: Path, pre: Preprocess, spec: data_mod.InputSpec, where: str) -> None:
    if spec.shape is None:
        return
    if len(spec.shape) != 4:
        raise DataError(f"{where}: input {spec.describe()} is not a 4-d image batch ({pre.layout})")
    expected = spec.shape[1:]
    if all(e is None or e == a for e, a in zip(expected, array.shape, strict=True)):
        return
    want, got = shape_text(expected), shape_text(array.shape)
    hint = ""
    other = "NHWC" if pre.layout == "NCHW" else "NCHW"
    channels = expected[2] if pre.layout == "NCHW" else expected[0]
    if channels == 3:
        hint = f"; the model looks {other}: add ',{other.lower()}' to --preprocess"
    else:
        hint = "; change --preprocess resize=/crop=/size="
    raise DataError(f"{where}: {file.name} preprocessed to {got} ({pre.layout}), the model's input takes {want}{hint}")


def _ratio(text: str) -> float:
    """``0.5``, ``1/255`` or ``1/127.5`` as a float."""
    numerator, sep, denominator = text.partition("/")
    return float(numerator) / float(denominator) if sep else float(numerator)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _number(value: float) -> str:
    """``1/255`` for a reciprocal of an integer, else the shortest text that reads back as ``value``."""
    if 0 < abs(value) < 1 and abs(1 / value - round(1 / value)) < 1e-9:
        return f"{'-' if value < 0 else ''}1/{abs(round(1 / value))}"
    return _plain(value)


def _plain(value: float) -> str:
    return repr(float(value)).removesuffix(".0")
