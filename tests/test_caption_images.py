"""Reading user images: every mode becomes RGB; bad files give one clear UsageError."""
import io

import numpy as np
import pytest
from PIL import Image

from engine.errors import UsageError
from engine.images import load_image, to_pixel_values


def save(image, fmt, path, **kw):
    image.save(path, fmt, **kw)
    return path


def test_rgba_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (5, 4), (255, 0, 0, 0))
    im.putpixel((1, 1), (0, 0, 255, 255))
    im.putpixel((2, 2), (0, 0, 0, 128))
    out = load_image(save(im, "PNG", tmp_path / "a.png"))
    assert out.mode == "RGB" and out.size == (5, 4)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 0, 255)
    assert all(120 <= c <= 135 for c in out.getpixel((2, 2)))


def test_grayscale_palette_and_16bit(tmp_path):
    gray = Image.new("L", (6, 6), 77)
    assert load_image(save(gray, "PNG", tmp_path / "g.png")).getpixel((0, 0)) == (77, 77, 77)
    la = Image.new("LA", (6, 6), (10, 0))
    assert load_image(save(la, "PNG", tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("RGB", (6, 6), (40, 170, 60)).quantize(4)
    assert pal.mode == "P"
    assert load_image(save(pal, "PNG", tmp_path / "p.png")).getpixel((3, 3)) == (40, 170, 60)
    pal_t = pal.copy()
    pal_t.info["transparency"] = pal_t.getpixel((0, 0))
    assert load_image(save(pal_t, "PNG", tmp_path / "pt.png", transparency=pal_t.getpixel((0, 0)))
                      ).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert load_image(save(deep, "PNG", tmp_path / "d.png")).getpixel((0, 0)) == (255, 255, 255)
    bw = Image.new("1", (4, 4), 1)
    assert load_image(save(bw, "PNG", tmp_path / "bw.png")).getpixel((0, 0)) == (255, 255, 255)


def test_jpeg_webp_and_bytes(tmp_path):
    im = Image.new("RGB", (40, 30), (40, 80, 220))
    for fmt, name in (("JPEG", "x.jpg"), ("WEBP", "x.webp")):
        out = load_image(save(im, fmt, tmp_path / name, quality=95))
        assert out.mode == "RGB" and out.size == (40, 30)
        assert np.abs(np.asarray(out, dtype=int) - (40, 80, 220)).max() <= 6
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    assert load_image(save(cmyk, "JPEG", tmp_path / "c.jpg")).mode == "RGB"
    webp_a = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert load_image(save(webp_a, "WEBP", tmp_path / "a.webp", lossless=True)).getpixel((4, 4)) == (255, 255, 255)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (40, 30)


def test_pixel_values_any_size():
    im = Image.new("RGB", (300, 200), (255, 0, 0))
    x = to_pixel_values(im, 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    assert np.allclose(x[0, 0], 1.0) and np.allclose(x[0, 1], -1.0)


def message(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text and text.endswith(".")
    return text


def test_not_an_image_missing_and_empty(tmp_path):
    (tmp_path / "t.png").write_text("hello, I am text")
    with pytest.raises(UsageError) as e:
        load_image(tmp_path / "t.png")
    assert "not an image the studio reads (PNG, JPEG, WebP, BMP or GIF)" in message(e)
    with pytest.raises(UsageError) as e:
        load_image(tmp_path / "missing.png")
    assert "does not exist" in message(e)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UsageError) as e:
        load_image(tmp_path / "empty.png")
    assert "empty" in message(e)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated(tmp_path, fmt):
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = save(im, fmt, tmp_path / f"t.{fmt.lower()}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError) as e:
        load_image(path)
    assert "truncated" in message(e) or "not an image the studio reads" in message(e)


def test_decompression_bombs(tmp_path):
    big = save(Image.new("1", (8000, 8000)), "PNG", tmp_path / "big.png")  # 64 Mpx, a few kB on disk
    assert big.stat().st_size < 100_000
    with pytest.raises(UsageError) as e:
        load_image(big)
    assert "decompression bomb" in message(e)
    huge = save(Image.new("1", (20000, 10000)), "PNG", tmp_path / "huge.png")  # over PIL's own limit
    with pytest.raises(UsageError) as e:
        load_image(huge, max_pixels=10**12)
    assert "decompression bomb" in message(e)
