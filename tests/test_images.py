"""Every image mode decodes to the 8-bit RGB the models expect; broken files raise an error naming them."""
import numpy as np
import pytest
from PIL import Image

from moco.course.images import UnreadableImage, image_size, load_rgb, read_image


def pixels(path):
    return np.asarray(load_rgb(path))


def test_16_bit_greyscale_keeps_its_contrast(tmp_path):
    ramp = (np.arange(32 * 64).reshape(32, 64) * 32).astype(np.uint16)  # 0 .. 65504
    Image.fromarray(ramp).save(tmp_path / "1.PNG")
    rgb, notes = read_image(tmp_path / "1.PNG")
    assert np.array_equal(np.asarray(rgb)[..., 0], (ramp >> 8).astype(np.uint8))
    assert "16-bit" in notes[0]
    # Pillow's own conversion clips at 255: the same file comes out almost white.
    with Image.open(tmp_path / "1.PNG") as raw:
        assert np.asarray(raw.convert("RGB")).mean() > 250 > 130 > np.asarray(rgb).mean()


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # invisible red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "1.PNG")
    out = pixels(tmp_path / "1.PNG")
    assert out[0, 0].tolist() == [0, 0, 255] and out[4, 4].tolist() == [255, 255, 255]


def test_palette_with_a_transparent_colour(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.save(tmp_path / "1.PNG", transparency=0)
    out = pixels(tmp_path / "1.PNG")
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [10, 20, 30]
    assert read_image(tmp_path / "1.PNG")[1][0] == "palette (P)"


@pytest.mark.parametrize("mode", ["L", "LA", "CMYK", "1"])
def test_other_modes_become_rgb(tmp_path, mode):
    suffix = ".JPEG" if mode == "CMYK" else ".PNG"
    Image.new(mode, (5, 3)).save(tmp_path / f"1{suffix}")
    rgb, notes = read_image(tmp_path / f"1{suffix}")
    assert rgb.mode == "RGB" and rgb.size == (5, 3) and notes


def test_plain_rgb_has_no_notes(tmp_path):
    Image.new("RGB", (5, 3), (1, 2, 3)).save(tmp_path / "1.PNG")
    rgb, notes = read_image(tmp_path / "1.PNG")
    assert notes == [] and np.asarray(rgb)[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("suffix", [".JPEG", ".PNG"])
def test_exif_orientation_is_applied_and_sizes_agree(tmp_path, suffix):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to show
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # the stored left edge is white
    image.save(tmp_path / f"1{suffix}", exif=exif)
    upright = pixels(tmp_path / f"1{suffix}")
    assert image_size(tmp_path / f"1{suffix}") == (20, 40) and upright.shape == (40, 20, 3)
    assert upright[:5].mean() > 200 and upright[-5:].mean() < 50  # the white edge is now on top


def _truncated(tmp_path, suffix, fmt):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / f"whole{suffix}", fmt)
    data = (tmp_path / f"whole{suffix}").read_bytes()
    (tmp_path / f"2{suffix}").write_bytes(data[: len(data) // 2])
    return tmp_path / f"2{suffix}"


@pytest.mark.parametrize("make", [
    lambda d: _truncated(d, ".PNG", "PNG"),
    lambda d: _truncated(d, ".JPEG", "JPEG"),
    lambda d: (d / "3.PNG").write_bytes(b"") and None or d / "3.PNG",
    lambda d: (d / "4.PNG").write_text("not an image") and d / "4.PNG",
], ids=["truncated-png", "truncated-jpeg", "zero-bytes", "text"])
def test_broken_files_raise_an_error_naming_them(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(UnreadableImage, match=f"{path.name}: cannot read image"):
        load_rgb(path)
