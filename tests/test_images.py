"""Image reading and preprocessing: every mode to 8-bit, max-normalisation, 1024 px, clear errors."""

import io

import numpy as np
import pytest
from PIL import Image

from medprobe.images import BadImageError, downsample, load_image, normalise, preprocess


def test_16bit_grayscale_is_scaled_by_its_maximum(tmp_path):
    array = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), np.rint(array / 4000 * 255).astype(np.uint8))


def test_rgb_is_scaled_by_its_overall_maximum():
    array = np.zeros((2, 2, 3), dtype=np.uint8)
    array[0, 0] = (100, 50, 0)
    out = np.asarray(normalise(Image.fromarray(array)))
    np.testing.assert_array_equal(out[0, 0], [255, np.rint(50 * (255 / 100)), 0])
    assert normalise(Image.fromarray(np.zeros((2, 2), np.uint8))).getextrema() == (0, 0)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3)])
def test_8bit_images_scale_exactly_as_the_float_path_for_every_maximum(shape):
    """The 8-bit fast path (a 256-entry table) gives the bytes the float64 computation gives, for every
    maximum, grey and RGB."""
    from medprobe.images import _scaled_by_maximum

    rng = np.random.default_rng(0)
    for peak in range(256):
        array = rng.integers(0, peak + 1, size=shape, dtype=np.uint8)
        array.flat[0] = peak
        expected = _scaled_by_maximum(array)
        direct = np.clip(np.rint(array.astype(np.float64) * (255.0 / peak if peak else 1.0)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(expected, direct)
        out = normalise(Image.fromarray(array))
        assert out.mode == ("RGB" if len(shape) == 3 else "L")
        np.testing.assert_array_equal(np.asarray(out), expected, err_msg=f"maximum {peak}")


@pytest.mark.parametrize("mode", ["P", "CMYK", "RGBA", "LA", "1", "F", "I"])
def test_every_mode_becomes_l_or_rgb(mode):
    image = Image.new("RGB", (8, 8), (10, 200, 30)).convert(mode)
    assert normalise(image).mode in ("L", "RGB")


def test_downsample_keeps_aspect_and_leaves_small_images():
    assert downsample(Image.new("L", (2048, 1024))).size == (1024, 512)
    assert downsample(Image.new("L", (1100, 300))).size == (1024, 279)
    small = Image.new("L", (1024, 900))
    assert downsample(small) is small


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"this is not an image", "cannot decode"), (None, "does not exist")],
)
def test_bad_files_name_the_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadImageError, match=reason) as error:
        load_image(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(tmp_path, fmt):
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(BadImageError, match=str(path)):
        load_image(path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import medprobe.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    path = tmp_path / "big.png"
    Image.new("L", (20, 20)).save(path)
    with pytest.raises(BadImageError, match="exceeds"):
        load_image(path)


def test_preprocess_writes_png_atomically(tmp_path):
    source = tmp_path / "in.jpg"
    Image.new("RGB", (1500, 750), (120, 60, 30)).save(source)
    target = tmp_path / "out.png"
    assert preprocess(source, target) == (1024, 512)
    assert Image.open(target).format == "PNG"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jpg", "out.png"]  # no temporary left


def test_cmyk_jpeg_file_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=100)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    red, green, blue = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert red > 250 and green < 10 and blue < 10


def test_palette_png_file_keeps_its_colours(tmp_path):
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[:4] = (200, 100, 0)
    array[4:] = (0, 50, 100)
    path = tmp_path / "palette.png"
    Image.fromarray(array).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    assert Image.open(path).mode == "P"
    out = np.asarray(load_image(path))
    np.testing.assert_array_equal(out[0, 0], [255, np.rint(100 * (255 / 200)), 0])
    np.testing.assert_array_equal(out[7, 7], [0, np.rint(50 * (255 / 200)), np.rint(100 * (255 / 200))])


def test_16bit_png_file_uses_its_full_range(tmp_path):
    array = np.linspace(0, 60000, 64, dtype=np.uint16).reshape(8, 8)
    path = tmp_path / "radiograph16.png"
    Image.fromarray(array).save(path)
    preprocess(path, tmp_path / "out.png")
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "L"
        np.testing.assert_array_equal(np.asarray(out), np.rint(array / 60000 * 255).astype(np.uint8))


def test_real_decompression_bomb_header_is_refused_before_decoding(tmp_path):
    """A 100 000 x 100 000 PNG header (10 Gpx declared, a few bytes on disk) stops at the header."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(BadImageError, match=r"bomb\.png: (declared size 100000x100000 exceeds|decompression bomb)"):
        load_image(path)
