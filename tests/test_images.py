"""pipeline.io.images: hostile bytes, every Pillow mode, EXIF orientation, open_clip equality, JPEG draft accuracy."""

from __future__ import annotations

import io
import pickle
import struct
import time
import warnings
import zlib

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFilter
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from pipeline.io.images import DecodedImage, ImageError, ImageSpec, decode_image, prepare_pil

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) claims width x height, followed by an empty IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour field + sharp shapes and lines + sensor-like noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x, y, x + int(rng.integers(2, width // 4 + 3)), y + int(rng.integers(2, height // 4 + 3))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(20):
        ends = [tuple(int(v) for v in rng.integers(0, min(width, height), 2)) for _ in range(2)]
        draw.line(ends, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    noisy = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)
    noisy += rng.normal(0, 6, noisy.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def big_endian_16bit(values: list[int]) -> Image.Image:
    image = Image.new("I;16B", (2, 2))  # convert("I;16B") would clip to 8 bits
    image.putdata(values)
    return image


def status_of(data: bytes, spec: ImageSpec | None = None) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, spec or ImageSpec(32))
    message = str(info.value)
    assert "\n" not in message and len(message) <= 300 and "Traceback" not in message
    return info.value


# --- hostile input ------------------------------------------------------------------------------------------


def test_zero_bytes_is_empty():
    assert status_of(b"").status == "empty"


def test_random_bytes_are_a_decode_error_naming_the_exception():
    error = status_of(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert error.status == "decode_error"
    assert "UnidentifiedImageError" in str(error)


def test_truncated_jpeg_is_a_decode_error_and_truncation_stays_strict():
    data = encode(photo_like(256, 256), "JPEG", quality=90)
    error = status_of(data[: len(data) // 2])
    assert error.status == "decode_error" and "OSError" in str(error) and "truncated" in str(error)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_header_claiming_50000_squared_fails_fast_without_touching_pillow_limits():
    limit = Image.MAX_IMAGE_PIXELS
    started = time.perf_counter()
    assert status_of(png_claiming(50_000, 50_000)).status == "too_large"
    assert time.perf_counter() - started < 1.0  # 7.5 GB were never allocated
    assert limit == Image.MAX_IMAGE_PIXELS


def test_own_pixel_limit_applies_below_pillows_and_silences_its_warning():
    # 120 MP: over our 100 MP default, between Pillow's warning (89 MP) and error (179 MP) thresholds.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        error = status_of(png_claiming(12_000, 10_000))
    assert error.status == "too_large" and "12000x10000" in str(error) and "100000000" in str(error)
    small = encode(Image.new("RGB", (20, 20), RED), "PNG")
    assert status_of(small, ImageSpec(8, max_pixels=399)).status == "too_large"
    assert decode_image(small, ImageSpec(8, max_pixels=400)).width == 20


@pytest.mark.parametrize(("data", "name"), [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIF"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n" + bytes(64), "EPS"),  # never reaches Ghostscript
    (encode(Image.new("RGB", (4, 4), RED), "PPM"), "PPM"),
])
def test_formats_outside_the_decoded_set_are_unsupported(data, name):
    error = status_of(data)
    assert error.status == "unsupported" and name in str(error)


def test_extreme_aspect_ratio_is_rejected_before_a_huge_resize():
    strip = encode(Image.new("RGB", (1, 101), RED), "PNG")
    assert status_of(strip, ImageSpec(224)).status == "unsupported"
    ok = decode_image(encode(Image.new("RGB", (1, 100), RED), "PNG"), ImageSpec(8))
    assert (ok.pixels == RED).all()
    with pytest.raises(ImageError) as info:
        prepare_pil(Image.new("RGB", (0, 5)), ImageSpec(8))
    assert info.value.status == "decode_error"


def test_image_error_survives_pickling_with_its_status():
    error = pickle.loads(pickle.dumps(ImageError("too_large", "line one\nline two")))
    assert error.status == "too_large" and str(error) == "line one line two"


def test_spec_and_prepare_pil_reject_bad_arguments():
    with pytest.raises(ValueError, match="interpolation"):
        ImageSpec(224, interpolation="nearest")
    with pytest.raises(ValueError, match="RGB"):
        prepare_pil(Image.new("L", (8, 8)), ImageSpec(8))


# --- formats and modes --------------------------------------------------------------------------------------


def test_one_pixel_image_is_resized_up():
    decoded = decode_image(encode(Image.new("RGB", (1, 1), RED), "PNG"), ImageSpec(224))
    assert isinstance(decoded, DecodedImage) and (decoded.width, decoded.height) == (1, 1)
    assert decoded.pixels.shape == (224, 224, 3) and decoded.pixels.dtype == np.uint8
    assert (decoded.pixels == RED).all()


@pytest.mark.parametrize(("fmt", "tolerance"), [
    ("JPEG", 3), ("PNG", 0), ("WEBP", 0), ("GIF", 0), ("BMP", 0), ("TIFF", 0), ("AVIF", 8),
])
def test_every_format_decodes_to_its_colour(fmt, tolerance):
    options = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(Image.new("RGB", (40, 30), (200, 40, 90)), fmt, **options), ImageSpec(16))
    assert (decoded.width, decoded.height) == (40, 30)
    assert np.abs(decoded.pixels.astype(int) - (200, 40, 90)).max() <= tolerance


def test_grayscale_and_bilevel_become_equal_channels():
    gray = decode_image(encode(Image.new("L", (4, 4), 77), "PNG"), ImageSpec(4)).pixels
    assert (gray == 77).all()
    bilevel = Image.new("1", (4, 4), 0)
    bilevel.putpixel((0, 0), 1)
    pixels = decode_image(encode(bilevel, "PNG"), ImageSpec(4)).pixels
    assert (pixels[0, 0] == 255).all() and (pixels[3, 3] == 0).all()


def test_cmyk_jpeg_becomes_rgb():
    pixels = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95), ImageSpec(8)).pixels
    assert np.abs(pixels.astype(int) - RED).max() <= 3


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited_on_white(fmt):
    palette = Image.new("P", (2, 2))
    palette.putpalette([*RED, *GREEN])
    palette.putpixel((1, 0), 1)
    pixels = decode_image(encode(palette, fmt, transparency=1), ImageSpec(2)).pixels
    assert tuple(pixels[0, 0]) == RED and tuple(pixels[0, 1]) == WHITE
    opaque = decode_image(encode(palette, fmt), ImageSpec(2)).pixels
    assert tuple(opaque[0, 1]) == GREEN


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))  # transparent black must not come out black
    rgba.putpixel((1, 0), (*BLUE, 255))
    rgba.putpixel((0, 1), (0, 0, 0, 128))
    pixels = decode_image(encode(rgba, "PNG"), ImageSpec(2)).pixels
    assert tuple(pixels[0, 0]) == WHITE and tuple(pixels[0, 1]) == BLUE
    assert np.abs(pixels[1, 0].astype(int) - 127).max() <= 1
    gray_alpha = decode_image(encode(Image.new("LA", (2, 2), (0, 0)), "PNG"), ImageSpec(2)).pixels
    assert (gray_alpha == 255).all()


def test_premultiplied_gray_alpha_tiff():
    # Pillow writes LA TIFFs with ExtraSamples=2 (unassociated); 1 makes it premultiplied "La".
    entry = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"
    data = encode(Image.new("LA", (2, 2), (100, 128)), "TIFF")
    assert data.count(entry) == 1
    data = data.replace(entry, entry[:-2] + b"\x01\x00")
    assert Image.open(io.BytesIO(data)).mode == "La"
    # premultiplied 100 at alpha 128 over white: 100 + 255 * (127 / 255) = 227
    assert np.abs(decode_image(data, ImageSpec(2)).pixels.astype(int) - 227).max() <= 1


@pytest.mark.parametrize(("image", "fmt", "expected"), [
    (Image.fromarray(np.array([[0, 65535], [32768, 32768]], dtype=np.uint16)), "PNG", [[0, 255], [128, 128]]),
    (big_endian_16bit([0, 65535, 32768, 32768]), "TIFF", [[0, 255], [128, 128]]),
    (Image.fromarray(np.array([[0, 65535], [32768, 32768]], dtype=np.int32)), "TIFF", [[0, 255], [128, 128]]),
    # no white level beyond 16 bits: stretched over the image's own range
    (Image.fromarray(np.array([[-1000, 1000], [0, 0]], dtype=np.int32)), "TIFF", [[0, 255], [128, 128]]),
    (Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.5]], dtype=np.float32)), "TIFF", [[0, 255], [128, 128]]),
])
def test_high_bit_depth_grayscale_is_scaled_not_clipped(image, fmt, expected):
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == image.mode
    pixels = decode_image(data, ImageSpec(2)).pixels
    assert (pixels == np.array(expected, dtype=np.uint8)[..., None]).all()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_yields_its_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert (decode_image(data, ImageSpec(8)).pixels == RED).all()


def test_exif_orientation_6_swaps_the_size_and_moves_the_marked_corner():
    stored = Image.new("RGB", (48, 32), BLUE)
    stored.paste(RED, (8, 0, 24, 16))  # near the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90 degrees clockwise
    decoded = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()), ImageSpec(32))
    assert (decoded.width, decoded.height) == (32, 48)
    # Displayed 32x48: the mark lands at columns 16..31, rows 8..23; the center crop keeps rows 8..39.
    quadrant = {name: decoded.pixels[rows, cols].reshape(-1, 3).mean(0) for name, rows, cols in [
        ("top_right", slice(2, 14), slice(18, 30)), ("top_left", slice(2, 14), slice(2, 14)),
        ("bottom_right", slice(18, 30), slice(18, 30))]}
    assert np.abs(quadrant["top_right"] - RED).max() < 10
    assert np.abs(quadrant["top_left"] - BLUE).max() < 10
    assert np.abs(quadrant["bottom_right"] - BLUE).max() < 10


def test_orientation_survives_exif_tags_of_odd_types_and_tiff_reports_its_displayed_size():
    """Camera files with a tag of a non-standard type (ResolutionUnit as ASCII) made exif_transpose fail while
    writing the EXIF back; Pillow's TIFF reader turns TIFFs itself, so their size was swapped twice."""
    stored = Image.new("RGB", (48, 32), BLUE)
    stored.paste(RED, (8, 0, 24, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    plain = exif.tobytes()  # b"Exif\0\0" + big-endian TIFF header + IFD0 of one entry at offset 14
    tag = struct.pack(">HHI4s", 0x0128, 2, 2, b"2\0\0\0")  # ResolutionUnit (a SHORT) written as ASCII "2"
    odd = plain[:14] + struct.pack(">H", 2) + plain[16:28] + tag + plain[28:]  # IFD0 of two entries
    reference = decode_image(encode(stored, "PNG", exif=exif.tobytes()), ImageSpec(32))
    for data in (encode(stored, "JPEG", quality=95, exif=odd), encode(stored, "TIFF", exif=exif.tobytes())):
        decoded = decode_image(data, ImageSpec(32))
        assert (decoded.width, decoded.height) == (32, 48)
        assert np.abs(decoded.pixels.astype(int) - reference.pixels).mean() < 6


def test_jpeg_and_tiff_variants_the_reader_cannot_handle_are_unsupported_and_say_why():
    data = bytearray(encode(photo_like(40, 30), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 4] = 12  # sample precision: a 12-bit JPEG (medical and some camera files)
    error = status_of(bytes(data))
    assert error.status == "unsupported" and str(error) == "JPEG image: cannot handle 12-bit layers"


def test_huge_images_are_reduced_before_their_mode_is_converted(monkeypatch):
    """Flattening 100 MP of RGBA took 1.2 GB; resizing first (with Pillow's box reduction) keeps memory low
    and the result close."""
    gradient = np.linspace(0, 255, 5000, dtype=np.float32)
    rgba = np.stack([np.tile(gradient, (4000, 1)), np.tile(gradient[::-1], (4000, 1)),
                     np.full((4000, 5000), 90, np.float32), np.full((4000, 5000), 200, np.float32)], axis=-1)
    image = Image.fromarray(rgba.astype(np.uint8), "RGBA")
    spec = ImageSpec(64)
    flattened = Image.new("RGB", image.size, WHITE)
    flattened.paste(image, mask=image)
    exact = prepare_pil(flattened, spec).astype(int)
    resized_modes = []
    resize = Image.Image.resize

    def spy(self, *args, **kwargs):
        resized_modes.append(self.mode)
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    decoded = decode_image(encode(image, "PNG"), spec)
    assert resized_modes[0] == "RGBA"  # resized while still RGBA: before the flattening copies
    assert (decoded.width, decoded.height) == (5000, 4000)
    difference = np.abs(decoded.pixels.astype(int) - exact)
    assert difference.mean() < 0.5 and difference.max() <= 2


def test_a_png_with_a_large_icc_profile_decodes():
    """Print workflows embed ICC profiles over Pillow's 1 MB chunk limit; the pixels are fine."""
    data = encode(Image.new("RGB", (8, 8), RED), "PNG", icc_profile=bytes(2 << 20))
    assert (decode_image(data, ImageSpec(8)).pixels == RED).all()


def test_an_animation_over_a_quarter_of_the_pixel_limit_is_too_large():
    """Animation decoders hold several full canvases (a 140-byte WebP of a 100 MP canvas took 1.5 GB)."""
    frames = [Image.new("RGB", (1100, 1000), colour) for colour in (RED, GREEN)]
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    spec = ImageSpec(8, max_pixels=4_000_000)
    assert status_of(animated, spec).status == "too_large"
    assert (decode_image(encode(frames[0], "GIF"), spec).pixels == RED).all()  # one frame: the full limit


def test_drafted_jpeg_reports_the_original_oriented_size():
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(photo_like(1000, 600), "JPEG", exif=exif.tobytes()), ImageSpec(56))
    assert (decoded.width, decoded.height) == (600, 1000) and decoded.pixels.shape == (56, 56, 3)


# --- exactness and accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos"])
@pytest.mark.parametrize(("width", "height", "size"), [
    (300, 200, 224),  # landscape
    (300, 199, 224),  # long side 337.69: truncated, not rounded
    (199, 301, 224),  # portrait, long side 338.81: truncated
    (97, 64, 64),     # crop offset 16.5: Python rounds half to even
    (64, 99, 64),     # 17.5 -> 18
    (50, 30, 64),     # smaller than the target: upscaled
    (64, 64, 64),     # already the target size
])
def test_prepare_pil_equals_open_clip_preprocess(interpolation, width, height, size):
    image = photo_like(width, height, seed=width + height)
    if interpolation == "lanczos":  # open_clip's image_transform accepts only bicubic/bilinear: torchvision directly
        normalize = Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        reference = Compose([Resize(size, InterpolationMode.LANCZOS), CenterCrop(size), ToTensor(), normalize])
    else:
        reference = open_clip.image_transform(size, is_train=False, interpolation=interpolation)
        normalize = reference.transforms[-1]
    pixels = prepare_pil(image, ImageSpec(size, interpolation=interpolation))
    assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
    ours = normalize(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert torch.equal(ours, reference(image))


def test_a_decode_without_draft_is_the_full_scale_decode():
    data = encode(photo_like(640, 480), "JPEG", quality=90)
    spec = ImageSpec(56)
    exact = prepare_pil(Image.open(io.BytesIO(data)).convert("RGB"), spec)
    assert np.array_equal(decode_image(data, spec, draft=False).pixels, exact)
    assert not np.array_equal(decode_image(data, spec).pixels, exact)  # drafted by default


@pytest.mark.parametrize("size", [56, 112])  # DCT scale 1/4 and 1/2 of a 640x480 photo
def test_jpeg_draft_stays_close_to_the_full_decode(size):
    data = encode(photo_like(640, 480), "JPEG", quality=90)
    spec = ImageSpec(size)
    exact = prepare_pil(Image.open(io.BytesIO(data)).convert("RGB"), spec).astype(np.float64)
    drafted = decode_image(data, spec).pixels.astype(np.float64)
    difference = np.abs(drafted - exact).mean()
    assert 0 < difference < 1  # > 0: the reduced-scale decode did happen; margin 1 gives 1.7-2.3
