"""Untrusted image bytes -> RGB uint8 pixels at the encoder's input size.

`decode_image` is the CPU stage's whole job for one image: open with a restricted set of decoders,
check the pixel count from the header before anything is decoded, decode (JPEG at a reduced DCT
scale when the photo is much larger than needed), apply the EXIF orientation, flatten every mode
to RGB (transparency onto white, 16/32-bit and float grayscale rescaled) and resize + center crop
exactly as open_clip's eval transform does. Normalization is left to the model (`pipeline.models.clip`).
Every failure on bad bytes is an `ImageError` carrying a status and a one-line message.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from pipeline.text import describe_error, one_line

ImageStatus = Literal["decode_error", "too_large", "unsupported", "empty"]

# open_clip's interpolation names -> the Pillow filters torchvision's Resize uses for them on PIL images.
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}
# Only these decoders ever see untrusted bytes. Left to itself Pillow tries every plugin it has:
# EPS hands the data to Ghostscript, and rarely used decoders are where most image-library CVEs live.
# AVIF is on the list because it is common on today's web (Pillow >= 11.3 ships the plugin).
_WANTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
# Formats whose loader implements draft() (DCT-domain downscale). Camera JPEGs with a multi-picture
# extension open through the JPEG plugin as MPO.
_DRAFT_FORMATS = ("JPEG", "MPO")
# JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the shortest side at least
# this many times the target size, so the final antialiased resize still does most of the
# reduction; 2 is also the reducing gap Pillow's own thumbnail() uses with draft().
_DRAFT_MARGIN = 2
# Shortest-side resize makes the long side aspect-ratio times the target: a 1 x 100000 strip (a few
# hundred bytes as PNG) would become a 224 x 22.4M, 15 GB intermediate. Strips past this ratio are
# slivers after the center crop anyway.
MAX_ASPECT_RATIO = 100
# EXIF orientation -> the transpose that shows the image upright (Pillow's ImageOps.exif_transpose table).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
# An animation may have 1/ANIMATED_PIXEL_SHARE of max_pixels: its decoder holds several canvases (`_decode`).
ANIMATED_PIXEL_SHARE = 4
# Decoded images above this many pixels are resized before their mode is converted (`_reduced`).
REDUCE_ABOVE_PIXELS = 16_000_000
# Modes whose resampling averages samples (not palette indices); 16-bit gray goes through "I".
_REDUCIBLE_MODES = ("L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F")
# Reader refusals that name a variant of a decoded format, not damage: 12-bit JPEG, float16 TIFF.
_UNSUPPORTED_VARIANT = re.compile(r"cannot handle|unknown pixel mode|not supported|unsupported", re.IGNORECASE)
# ISO base media major brands of HEIF/HEIC files (iPhone photos): a format Pillow cannot decode.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_MAX_MESSAGE = 300
# Pillow refuses a PNG whose one text or ICC chunk inflates past 1 MB; print workflows embed ICC profiles of
# 1-4 MB, and the pixels are fine. 16 MB still bounds a hostile chunk (Pillow caps all text at 64 MB).
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, 16 << 20)
# Formats every WebDataset consumer decodes by their extension; exported images in others are re-encoded.
_PORTABLE_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_EXPORT_JPEG_QUALITY = 95


@dataclass(frozen=True)
class ImageSpec:
    """What the encoder needs: a square `size` (open_clip resize_mode 'shortest'), its interpolation,
    and a decompression-bomb limit on the pixel count read from the file header.

    100 megapixels admits every mainstream camera (the largest medium-format sensors are ~100 MP),
    keeps a fully decoded RGBA image at 400 MB per worker, and lies below Pillow's hard limit
    (2 x `Image.MAX_IMAGE_PIXELS` = 179 MP), so this limit, not Pillow's, is the one that applies.
    """

    size: int
    interpolation: str = "bicubic"
    max_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"image size must be >= 1, got {self.size}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(_RESAMPLE)}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


class ImageError(Exception):
    """An image that cannot be used; `status` is the row status, str(error) a one-line message."""

    def __init__(self, status: ImageStatus, message: str):
        self.status = status
        super().__init__(one_line(message, _MAX_MESSAGE))

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        # Ray ships exceptions between processes; the default reduce would drop `status`.
        return type(self), (self.status, str(self))


@dataclass
class DecodedImage:
    """Pixels ready for the encoder, and the original size (after EXIF orientation)."""

    pixels: np.ndarray  # uint8 (size, size, 3), RGB
    width: int
    height: int


def decode_image(data: bytes, spec: ImageSpec, draft: bool = True) -> DecodedImage:
    """Untrusted bytes -> `DecodedImage`; raises `ImageError` and nothing else for bad input. `draft` False decodes
    a large JPEG at full scale (the reference the DCT-domain reduction is measured against)."""
    if not data:
        raise ImageError("empty", "zero-byte image")
    try:
        with warnings.catch_warnings():
            # spec.max_pixels is checked below; Pillow's lower warning threshold would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _decode(data, spec, draft)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit (header or a GIF/TIFF frame)
        raise ImageError("too_large", describe_error(exc)) from None
    except Exception as exc:  # untrusted bytes meet a large C and Python parser surface: any failure is a bad image
        raise ImageError("decode_error", describe_error(exc)) from None


def prepare_pil(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """RGB image -> uint8 (size, size, 3): shortest side resized to `size`, then center cropped.

    The same arithmetic as open_clip's eval transform (torchvision Resize(size) + CenterCrop(size)
    on a PIL image), so pixels / 255 equal open_clip's ToTensor output exactly. Raises ValueError for
    a non-RGB image, ImageError for one with no pixels or more elongated than MAX_ASPECT_RATIO.
    """
    if image.mode != "RGB":
        raise ValueError(f"prepare_pil needs an RGB image, got mode {image.mode}")
    width, height = image.size
    _check_shape(width, height)
    size = spec.size
    new_width, new_height = _resized_size(width, height, size)
    resized = image.resize((new_width, new_height), _RESAMPLE[spec.interpolation])
    # torchvision's center_crop offsets: Python's round(), i.e. half to even.
    left = round((new_width - size) / 2.0)
    top = round((new_height - size) / 2.0)
    return np.array(resized.crop((left, top, left + size, top + size)))


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Shortest side to `size`; as torchvision's _compute_resized_output_size, the long side is truncated."""
    return (size, int(size * height / width)) if width <= height else (int(size * width / height), size)


def portable_image(data: bytes) -> tuple[bytes, str]:
    """An image as (bytes, extension) that a training job reads anywhere: JPEG, PNG and WebP as they
    are; any other format this module decodes (GIF, BMP, TIFF, AVIF) as a JPEG of its first frame in
    RGB with the EXIF orientation applied. For images that `decode_image` accepted; raises ImageError."""
    try:
        with Image.open(io.BytesIO(data), formats=_open_formats()) as image:
            extension = _PORTABLE_EXTENSIONS.get(image.format)
            if extension:
                return data, extension
            image.load()
            buffer = io.BytesIO()
            _to_rgb(_oriented(image)).save(buffer, format="JPEG", quality=_EXPORT_JPEG_QUALITY)
            return buffer.getvalue(), "jpg"
    except Exception as exc:
        raise ImageError("decode_error", describe_error(exc)) from None


def _decode(data: bytes, spec: ImageSpec, draft: bool = True) -> DecodedImage:
    try:
        image = Image.open(io.BytesIO(data), formats=_open_formats())
    except UnidentifiedImageError as exc:
        known = _unsupported_format(data[:16])
        if known:
            raise ImageError("unsupported", f"{known} images are not decoded (decoded: {'/'.join(_open_formats())}; "
                                            "convert them to JPEG first)") from None
        refusal = _refusal(data)
        if refusal:  # a JPEG or TIFF of a kind Pillow does not read (12-bit samples, float16)
            name, reason = refusal
            status = "unsupported" if _UNSUPPORTED_VARIANT.search(reason) else "decode_error"
            raise ImageError(status, f"{name} image: {reason}") from None
        # Pillow's message ends with the repr of our BytesIO (a memory address): every row would get a
        # different error text, and two runs over the same data would disagree.
        raise ImageError("decode_error", f"{type(exc).__name__}: not a {'/'.join(_open_formats())} image") from None
    with image:
        width, height = image.size
        # Header size, before load(): nothing of a bomb has been allocated yet.
        if width * height > spec.max_pixels:
            raise ImageError("too_large", f"{width}x{height} image exceeds the limit of {spec.max_pixels} pixels")
        # Animation decoders (libwebp's above all) hold several full-canvas buffers: a 140-byte WebP of a
        # 100 MP canvas took 1.5 GB. A quarter of the limit still admits any real animation.
        if getattr(image, "is_animated", False) and width * height > spec.max_pixels // ANIMATED_PIXEL_SHARE:
            raise ImageError("too_large", f"{width}x{height} animated image exceeds the limit of "
                                          f"{spec.max_pixels // ANIMATED_PIXEL_SHARE} pixels for animations")
        _check_shape(width, height)
        scaled = False
        if draft and image.format in _DRAFT_FORMATS:
            image.draft(None, (_DRAFT_MARGIN * spec.size, _DRAFT_MARGIN * spec.size))
            scaled = image.size != (width, height)
        try:
            image.load()  # (the first frame); Pillow's TIFF reader applies and drops its own orientation here
        except Exception:
            if not scaled:
                raise
            return _decode(data, spec, draft=False)  # a JPEG kind without DCT scaling (lossless): full scale
        oriented = _oriented(image)
        if oriented.size != image.size:
            width, height = height, width
        # Inside the `with`: closing the image releases its pixel buffer.
        return DecodedImage(prepare_pil(_to_rgb(_reduced(oriented, spec)), spec), width, height)


def _oriented(image: Image.Image) -> Image.Image:
    """The loaded image turned as its EXIF orientation says. Pillow's ImageOps.exif_transpose also writes the
    EXIF back, which fails on tags of odd types common in camera files; the pixels need only the orientation."""
    try:
        method = _TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # an unreadable EXIF block, or an unhashable orientation value: the pixels as stored
        method = None
    return image if method is None else image.transpose(method)


def _reduced(image: Image.Image, spec: ImageSpec) -> Image.Image:
    """A huge image resized to the encoder's resize size before its mode is converted (Pillow box-reduces it
    first, as thumbnail() does): flattening 100 MP of RGBA or rescaling 100 MP of float samples took 1.2-1.7 GB.
    Below REDUCE_ABOVE_PIXELS nothing changes, so ordinary images keep open_clip's exact arithmetic."""
    if image.width * image.height <= REDUCE_ABOVE_PIXELS:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # no 16-bit resampling kernels
    if image.mode not in _REDUCIBLE_MODES:
        return image
    return image.resize(_resized_size(*image.size, spec.size), _RESAMPLE[spec.interpolation],
                        reducing_gap=_DRAFT_MARGIN)


def _refusal(data: bytes) -> tuple[str, str] | None:
    """(format, reason) when a decoded format recognises the bytes but its reader refuses them."""
    for name in _open_formats():
        factory, accept = Image.OPEN[name]
        with contextlib.suppress(Exception):
            if accept is None or not accept(data[:16]):
                continue
        try:
            factory(io.BytesIO(data)).close()
        except Exception as exc:
            return name, one_line(exc) or type(exc).__name__
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white (ignored for 16/32-bit gray)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # Pillow's convert('L') clips these to 0..255 (a 16-bit mid-gray becomes white).
        return Image.fromarray(_gray_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode == "La":  # premultiplied gray + alpha (TIFF): Pillow converts it to LA only
        image = image.convert("LA")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        flattened = Image.new("RGB", image.size, (255, 255, 255))
        flattened.paste(rgba, mask=rgba)
        return flattened
    return image if image.mode == "RGB" else image.convert("RGB")


def _gray_to_uint8(values: np.ndarray) -> np.ndarray:
    """16/32-bit integer or float grayscale -> uint8, scaled rather than clipped.

    Integers within 0..65535 are 16-bit samples (PNG/TIFF) and floats within 0..1 are unit
    intensities: both keep their absolute scale. Anything else (32-bit or signed integers, floats
    of arbitrary range) has no known white level and is stretched over its own min..max.
    """
    full_scale = 1.0 if values.dtype.kind == "f" else 65535.0
    values = np.nan_to_num(values.astype(np.float32), copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= full_scale:
        low, high = 0.0, full_scale
    scale = 255.0 / (high - low) if high > low else 0.0  # a constant image outside the known range -> black
    return np.rint((values - low) * scale).astype(np.uint8)


def _check_shape(width: int, height: int) -> None:
    if min(width, height) < 1:
        raise ImageError("decode_error", f"{width}x{height} image has no pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError("unsupported", f"{width}x{height} image is more elongated than {MAX_ASPECT_RATIO}:1")


@functools.cache
def _open_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin: needed to know which of the wanted ones this Pillow has
    return tuple(name for name in _WANTED_FORMATS if name in Image.OPEN)


def _unsupported_format(prefix: bytes) -> str | None:
    """The name of a format recognised from the first bytes that is not decoded here, else None.

    Only Pillow's accept() checks run (prefix comparisons); no other decoder touches the data.
    """
    if prefix[4:8] == b"ftyp" and prefix[8:12] in _HEIF_BRANDS:
        return "HEIF"
    for name, (_, accept) in Image.OPEN.items():
        if name in _open_formats() or accept is None:
            continue
        with contextlib.suppress(Exception):  # some accept() index past a short prefix
            if accept(prefix):
                return name
    return None
