"""Tests for `MageImageProcessor` (MAGE's eval transform) and the offline ImageNet-1k labels."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError

from mage_hf.image_processing_mage import MageImageProcessor
from mage_hf.labels import imagenet1k_id2label, imagenet1k_label2id, imagenet1k_labels


# "Chelsea the cat" from scikit-image's sample data (photo by Stefan van der Walt, released as CC0), downscaled to
# 121x80 and stored as an 85%-quality JPEG. 121x80 is deliberately odd: the resized long side is 387, so the crop
# offset 65.5 exercises torchvision's round-half-to-even.
CHELSEA_121X80_JPEG_B64 = """
/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAUDBAQEAwUEBAQFBQUGBwwIBwcHBw8LCwkMEQ8SEhEPERETFhwXExQaFRERGCEYGh0d
Hx8fExciJCIeJBweHx7/2wBDAQUFBQcGBw4ICA4eFBEUHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4e
Hh4eHh4eHh7/wAARCABQAHkDASIAAhEBAxEB/8QAGwAAAgMBAQEAAAAAAAAAAAAABQYDBAcCAQj/xAA4EAABAwMCBAMGBgEDBQAA
AAABAgMEAAUREiEGEzFRIkFhBxRScYGRFRYyQqGxwSNU0VNikvDx/8QAGQEAAgMBAAAAAAAAAAAAAAAAAwQBAgUA/8QAIhEAAgID
AAIDAAMAAAAAAAAAAAECEQMSIQQxEzJBIlHw/9oADAMBAAIRAxEAPwBgn2dURRWz+ntSDxHeEsOyWHHMeIFsAb9MGtdmQpJC0rPg
x1rGlMKPED4koS4gOqSFAbnfasvy0ox4bPjfay5wtFMhwS3ippKPG06R0PnTHOu0dxC+Q0lwjYnHh+fyqk82qLHbZjPLbQvAcAGx
z6eX9VQkOFEb3GO662RkEqAPMB3+Q+W1KfJwbk9meT5am1LQ++4o5yoNjYYIGn+qEPRkST7wph1oBSVJSpWMKzhSj80kferpZahx
VydBU8vxJI3AV13Gf4oTOfMhtT7juFLToCRuDjOPvvQ90Tqy/GS0ypAfkuFOtSVuctJQd8Df/wC4ri/ofev1kuUWY0wjWpCluL3U
FJGwT17VesUeMuA2G2w2lKttyrJJGr5E6aijMRL7d3oT8VKlMLVyF9Dq04P32oikkgTi2L/ENtQ3e5zXJMZlwpLjqTuVK/eD88D6
eleWSbc2bi4tbuYMlA0pWrOHUjCtJ8iQAe29E7m/Jl2NcaVGDsqNMcZdJUE5QSpKV+nixgeeahlamLMzGgRGhIfniOkYOPCkFSj2
zg1L6qI9Ow7ZZqpzi0ABtzsfPHX5UyaVx2hz3nk+HKgSD9MUsWm2PJuC1BtTfJcIUNWc48vln/3aj1yeP4egBZcByAsjqfM1OGWn
GX+zILhIZaYW8/ltpAzgYyf+ayvihld7uKpTydKEjS0gdEprQrvGWbfGMhfiVkAHt3oKuAk9BTScpK6KZmr1M/VYWvgrn8Ca+D+K
fTbgfKufw0dq7oCon0bd30twXVlOQEmsbckMttLXHb0uKJWSRkjJ6DNPXFnEsKHFXHQ8lyQsYCQax+4XeNGaLiNT0lZKeUg+LVnH
0FU83tIv469sNSuJIkRKfxVfKUpOMoySo+nbFewp9rmPhyNczIU4nwa06FJPTYY3+31oLw3ZZV3eTNu0dbaD4WmQSQkdznzNMViY
jQJ3uUtpCgkKxqA3STt1/wAVnzeqobUU+hR5q3MMolXSVFajoTnDjgbSfXJNLsm68JuB6Oi8xVNyFFQCVjYH4Scg99649pNlt8ji
zhxl2O37k6HV4wMKWlIKU/2celIvtZl2uAiFASwAqUpfMUBjlJGMHI/rPSiYY7zUF7YDPmWNWalYI7LcTXGkNSkpSSHmwPFvny2z
3qL2dRQ7MmTXlICUuqCQRgjesh4Vn3DhW1NX2OtRjr0e9RyfC4hWxOPiHUH6VulsSyq1tvxMJQ8A5kDOcjOarkxu+fgTDkU43/Yv
Xm2uNXK+SUAI99dZLCic4WN/42qw1Z5CZFiuD7RKm5bi3UjbdXhJI6EjGfqaLsSUyA02+NepeQdOw32+vSi810xoiknxqCxpSeg+
VVe2yRZJU2L7TKovF78XKghxQdSNWxBGCd/6HeriGeU4/GcJLSiVpBGMH/FDOJOIbRa+IIsm5yUpkqj6W2EgKcVv1x1x69KksXE1
kvs56IymZElIwSHmyAc9PFk5BosW/wBBurpAu7Wy8THC6XAcEYABwB2FcNMuMeB/ritAjvxkIW26QVp2NZtx1cgm5BuORk5rUi1J
cEpTfpl9DYUPDg17yfSh1mlOBoF0p6d6Je9p/wC371xHRe4RbfmqVMnuhxxbmUqVnp9aZbZbrS3eZGUNKlEhSNSMEDtQKwQX4DHK
cWXHWkZUR6+tWL424pmPcmFqZfaUMrTWZOVj+OJorERtMZXgQkqHQdqS7wmYHUlJzy1FJTp69t/I1ZZ4wlMQwLgwsHTs8lOUL29O
lAJ3EJuE1C4rSic6VnoFjsex9aFNxaSDRjJMurf/ABO3NWq4SeW825zoM5tGrkrT01DsRkH0zS3x3abTMTGVxNFkwlsL1B5plTzD
225StPkexxTA06F5cdirj+WCAQB8QII3z/FEbTcJMVBS24l1v9zSwFIO/UGhNtNSX4UyYoz4zJeKbzAk2pVstEKQ5DbG7jrJTzV+
Rx5AdQOpOK2f2SvCd7P4SHFZdaaLau4xsKDcZarpD5aoiWkJUCpCG8BZ+lC/ZpdZFrRJtSUEs8zUVHrv1HpRV5MVDVL/ADJh41dT
HJxrkzG3M7JIJz36/WiNylIC16QpfJZU+R0BwkkZqvG0yQVqAOc4GcUP47cfs1skuIClGTGKEqH7SoYP2oEc6ckXljepiUpu7z/a
C0H2XHy86mQXSMkbYKc9vStd4UsUWbxJPUCdMWM0y64g4w7uopyOwIzVGHw1cyllY4tjMMOIGhxERPvOkjpqzgH1xRRiZHsVqFks
DbqGUq/1Hnd3FqPVXrk+ZpqWb5Uk/wAE8OGWJtse7PYoK42DJKldCVqyT9aHXj2cW+c5zkODmeRSaTG7zJYbLbb60q8znqa8jcXX
mG94nytPrWjCapIA07sv3f2f3WIjERwqSO9BfylxH8Io2jj++OEAxCpv4u9S/ni4/wCyH2q38GTvJA20utuXRLexacQQSDnBotMt
5THcZUnW2oGk6FMTHmt6BhRXhS9fT6dPvWmxEc+KEq0lQHUJxSUIqcRlvViLDmrtrnuUphLjKjhBCgTiiQgwZZCmmkoCv0rR3q7e
La+5qbLCVIP6fAOvfcUHhyZdplJYmGKmOTss6QR9AKFrXGHTvq9lqXwy04yA264PMhJxk98d68XaHY4C1pVr2CCFbHbzBpohOMvp
RyywoHtn+6gukRayBBmMLIUNaHFkBI88UPOtOo6D24xfuAdejKSjT+nPgTpBP09aSruzLtzyH0OLRkAqbCBpJz1J/jFODrVwj3Rp
cmPJaHNLaVQ3NTageilg/wCKpe0Gzzl2AXCBGcnaTl4NjxJR8QHnikW5SkkkNQUYptlzhi5qfZbVnHQhKjkfeintVkp/Bmi43qDq
Rgg+ZxWW8L8ROxm8cplSB1SHRrHzHlTJeeJEXxUW2x231OEhKDgEJ3qV48oNnSltTrhbQ+kQ469SlKSjSd84xRex2iTcWS+nwZ3S
gpwfr61WsbSF3N9pyOdLaQpAUpJyRsTjtRUXSZa1+8IjuKClbpArR8RRtSkjO8hv0ip+VLg/KJ0aUjzxUH5fd/EW47yPBnc4rSLN
e2ZkdJWgNrI3B60HvUpCr60yjAxuo1rOEKtCWzvoRgWK3ojISWk7DtU34HA/6KftU8HUsBX7fKruPnXUjrPnma0ll5akx1HXhR0u
YPzwNvvWlcDKcctjYOtAG3zpFs5TOYSeQ8gnqnASfltWh8KrQ1HSjCQfMBXSszBKpND2TqDD8QLT4sH1NBbraYclpTa2OeSOnQUy
ZSU77+lVJeSMABIpiUUwcZNClbkyrRIDaCwGjshhpvUr/wAjU91dQ4NRiNL1fC5hX38vpRGSyjB8Gx691/M9qHvJBzncn+v+KXyY
VJUFjkadgWAGEvJOZbOlZ/Q7qHy3NNEa8w244ZXIKwUnUXE4J+YpZnQkrAUjUjtp8qGSI0zKcSFbnPTr86jFgUOl55NxM9pFsix+
OWnrLD5q7i34eTtoVnxZ8gDsfSnrhO1Q+HrYp5amX7k6jC1qVskn9oPb186rw7G4qcJTq8uYxqI3A9KJuwWW1BTshxfpii5EvddB
rJJLS+Fvh7T7u6eTERq+AaifXJrpcwmSGuXqwdhjIP18qlt8Nc9KW4oLYB/XjqKbrRYY0PDjiQ44eqj51GOFRoDklcrFiUxc0sic
3loIGdJ3zUXDbcm6zVS3UEYOM02cTSG49tcUpI0hNJXBHE65MlcCLD/1ASQTsKbh6oA/dmkxWw22Eg5NTYNBUKuurW88wyntXfMf
/wB+3Rip/9k=
"""


# ---------------------------------------------------------------------------------------------------------- helpers


def mage_eval_reference(image: PIL.Image.Image, size: int = 256, crop: int = 256) -> np.ndarray:
    """MAGE's eval transform in plain PIL: `.convert("RGB")`, `transforms.Resize(size, BICUBIC)`,
    `transforms.CenterCrop(crop)`, `transforms.ToTensor()` (torchvision's formulas, without torchvision)."""
    image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize((new_width, new_height), PIL.Image.BICUBIC)
    left, top = int(round((new_width - crop) / 2.0)), int(round((new_height - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)


# 8-bit inputs are resampled by PIL in 8 bits (like MAGE/torchvision), float inputs in 32-bit float. PIL's separable
# resampling rounds to uint8 after the horizontal pass and again after the vertical pass; the first rounding error
# (<= 0.5 level) is amplified by the bicubic kernel (sum of |weights| <= 1.25), so on smooth images the two paths
# differ by at most 0.5 * 1.25 + 0.5 = 1.125 grey levels.
EIGHT_BIT_VS_FLOAT_ATOL = 1.125 / 255 + 1e-6


def smooth_rgb(height: int, width: int) -> np.ndarray:
    """A smooth uint8 (H, W, 3) image: gradients, so 8-bit and float resampling agree (see the tolerance above)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack(
        [xx / max(width - 1, 1), yy / max(height - 1, 1), 0.5 + 0.5 * np.sin(xx / 9.0 + yy / 13.0)], axis=-1
    )
    return np.round(image * 255).astype(np.uint8)


def pixels(processor: MageImageProcessor, images, **kwargs) -> np.ndarray:
    return processor(images, return_tensors="np", **kwargs)["pixel_values"]


def assert_valid_output(pixel_values, batch: int = 1, size: int = 256):
    assert isinstance(pixel_values, np.ndarray)
    assert pixel_values.shape == (batch, 3, size, size)
    assert pixel_values.dtype == np.float32
    assert np.isfinite(pixel_values).all()
    assert pixel_values.min() >= 0.0 and pixel_values.max() <= 1.0


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def processor():
    return MageImageProcessor()


@pytest.fixture(scope="module")
def photo() -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(base64.b64decode(CHELSEA_121X80_JPEG_B64)))
    image.load()
    return image


# ------------------------------------------------------------------------------------------------- configuration


def test_defaults_match_mage_eval_transform(processor):
    assert MageImageProcessor.model_input_names == ["pixel_values"]
    assert processor.do_resize and processor.do_center_crop and processor.do_rescale and processor.do_convert_rgb
    assert not processor.do_normalize
    assert dict(processor.size) == {"shortest_edge": 256}
    assert dict(processor.crop_size) == {"height": 256, "width": 256}
    assert int(processor.resample) == int(PIL.Image.Resampling.BICUBIC)
    assert processor.rescale_factor == pytest.approx(1 / 255)
    assert tuple(processor.background_color) == (255, 255, 255)
    import mage_hf.image_processing_mage as module

    assert module.__all__ == ["MageImageProcessor"]


def test_int_sizes_follow_mage_semantics():
    processor = MageImageProcessor(size=288, crop_size=224)
    assert dict(processor.size) == {"shortest_edge": 288}
    assert dict(processor.crop_size) == {"height": 224, "width": 224}
    out = pixels(processor, PIL.Image.fromarray(smooth_rgb(100, 150)))
    assert_valid_output(out, size=224)


# --------------------------------------------------------------------------------------- parity with MAGE (PIL)


def test_real_photo_matches_mage_eval_transform(processor, photo):
    assert photo.size == (121, 80) and photo.mode == "RGB"
    out = processor(photo, return_tensors="pt")["pixel_values"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (1, 3, 256, 256)
    np.testing.assert_array_equal(out[0].numpy(), mage_eval_reference(photo))
    # a real photo: not flat, and uses most of the range
    assert out.std() > 0.1 and out.min() < 0.1 and out.max() > 0.8


def test_real_photo_from_file_and_grayscale(processor, photo, tmp_path):
    path = tmp_path / "chelsea.jpg"
    photo.save(path, quality=95)
    with PIL.Image.open(path) as reopened:
        from_file = pixels(processor, reopened)
        reference = mage_eval_reference(reopened)
    np.testing.assert_array_equal(from_file[0], reference)
    gray = pixels(processor, photo.convert("L"))
    np.testing.assert_array_equal(gray[0, 0], gray[0, 1])
    np.testing.assert_array_equal(gray[0, 0], gray[0, 2])
    np.testing.assert_array_equal(gray[0], mage_eval_reference(photo.convert("L")))


def test_scikit_image_photos_match_reference(processor):
    data = pytest.importorskip("skimage.data")  # optional test dependency; the embedded photo above always runs
    for photo in (data.astronaut(), data.coffee(), data.camera()):
        image = PIL.Image.fromarray(photo)
        np.testing.assert_array_equal(pixels(processor, image)[0], mage_eval_reference(image))
        np.testing.assert_array_equal(pixels(processor, photo), pixels(processor, image))


@pytest.mark.parametrize(
    "height,width", [(97, 301), (301, 97), (256, 256), (255, 257), (300, 451), (1, 1), (3, 700), (513, 256)]
)
def test_odd_sizes_match_reference(processor, rng, height, width):
    image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    out = pixels(processor, image)
    assert_valid_output(out)
    np.testing.assert_array_equal(out[0], mage_eval_reference(image))


def test_no_center_crop_keeps_aspect_ratio(rng):
    processor = MageImageProcessor(do_center_crop=False)
    out = processor(PIL.Image.fromarray(rng.integers(0, 256, (97, 301, 3), dtype=np.uint8)))["pixel_values"]
    assert out[0].shape == (3, 256, int(256 * 301 / 97))


def test_longest_edge_cap(rng):
    processor = MageImageProcessor(size={"shortest_edge": 256, "longest_edge": 300}, do_center_crop=False)
    out = processor(rng.integers(0, 256, (100, 400, 3), dtype=np.uint8))["pixel_values"]
    assert out[0].shape == (3, 75, 300)


# ----------------------------------------------------------------------------------------------------- PIL modes


def _mode_image(mode: str, rng) -> PIL.Image.Image:
    rgb = smooth_rgb(37, 53)
    base = PIL.Image.fromarray(rgb)
    if mode == "P+transparency":
        image = base.convert("P")
        image.info["transparency"] = 0
        return image
    if mode == "I;16":
        return PIL.Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    if mode == "I":
        return PIL.Image.fromarray(rgb[..., 0].astype(np.int32))
    if mode == "F":
        return PIL.Image.fromarray(rgb[..., 0].astype(np.float32))
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (37, 53, 1), dtype=np.uint8)
        return PIL.Image.fromarray(np.concatenate([rgb, alpha], axis=-1))
    return base.convert(mode)


@pytest.mark.parametrize(
    "mode", ["RGB", "L", "LA", "P", "P+transparency", "RGBA", "I;16", "I", "F", "CMYK", "1", "YCbCr", "HSV", "PA"]
)
def test_pil_modes(processor, rng, mode):
    image = _mode_image(mode, rng)
    assert image.mode == mode.split("+")[0]
    out = pixels(processor, image)
    assert_valid_output(out)


def test_grayscale_modes_replicate_channels(processor, rng):
    gray = smooth_rgb(37, 53)[..., 0]
    expected = pixels(processor, PIL.Image.fromarray(gray))  # mode L
    for image in [
        PIL.Image.fromarray(gray.astype(np.int32)),  # mode I
        PIL.Image.fromarray(gray.astype(np.uint16) * 257),  # mode I;16
        gray,  # 2-D array
        gray[:, :, None],  # (H, W, 1)
        gray[None],  # (1, H, W)
        torch.from_numpy(gray),
    ]:
        out = pixels(processor, image)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out[0, 0], out[0, 2])
    # float grey (mode F, 0..255) goes through float resampling
    out = pixels(processor, PIL.Image.fromarray(gray.astype(np.float32)))
    np.testing.assert_allclose(out, expected, atol=EIGHT_BIT_VS_FLOAT_ATOL)


def test_sixteen_bit_values_are_mapped_to_unit_range(processor):
    for value, expected in [(0, 0.0), (65535, 1.0), (128 * 257, 128 / 255)]:
        image = PIL.Image.fromarray(np.full((20, 30), value, dtype=np.uint16))
        assert image.mode == "I;16"
        np.testing.assert_allclose(pixels(processor, image), expected, atol=1e-7)


def test_cmyk_and_palette_follow_pil_conversion(processor, rng):
    rgb = PIL.Image.fromarray(smooth_rgb(40, 60))
    for image in [rgb.convert("CMYK"), rgb.convert("P"), rgb.convert("YCbCr"), rgb.convert("1")]:
        np.testing.assert_array_equal(pixels(processor, image)[0], mage_eval_reference(image))


# ------------------------------------------------------------------------------------------------- transparency


def test_rgba_is_composited_over_white_by_default(processor):
    transparent = PIL.Image.new("RGBA", (40, 30), (10, 200, 30, 0))
    np.testing.assert_array_equal(pixels(processor, transparent), 1.0)
    opaque = PIL.Image.new("RGBA", (40, 30), (10, 200, 30, 255))
    np.testing.assert_allclose(pixels(processor, opaque)[0, :, 0, 0], np.array([10, 200, 30]) / 255, atol=1e-7)
    half = PIL.Image.new("RGBA", (40, 30), (200, 100, 0, 128))
    alpha = 128 / 255
    expected = np.round(np.array([200, 100, 0]) * alpha + 255 * (1 - alpha)) / 255
    np.testing.assert_allclose(pixels(processor, half)[0, :, 0, 0], expected, atol=1e-7)


def test_background_color_option(tmp_path):
    transparent = PIL.Image.new("RGBA", (40, 30), (10, 200, 30, 0))
    black = MageImageProcessor(background_color=(0, 0, 0))
    np.testing.assert_array_equal(pixels(black, transparent), 0.0)
    grey = MageImageProcessor()
    np.testing.assert_allclose(pixels(grey, transparent, background_color=(51, 102, 204))[0, :, 5, 5], [0.2, 0.4, 0.8])
    np.testing.assert_allclose(pixels(grey, transparent, background_color=51), 0.2, atol=1e-7)
    black.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["background_color"] == [0, 0, 0]
    np.testing.assert_array_equal(pixels(MageImageProcessor.from_pretrained(tmp_path), transparent), 0.0)


def test_la_and_palette_transparency_use_background(processor):
    la = PIL.Image.fromarray(np.stack([np.zeros((30, 40), np.uint8), np.zeros((30, 40), np.uint8)], -1), "LA")
    np.testing.assert_array_equal(pixels(processor, la), 1.0)
    # Premultiplied "La" (PIL converts it to "LA" but not straight to "RGBA"): the same picture as its "LA" form.
    premultiplied = PIL.Image.new("La", (40, 30), (100, 128))
    np.testing.assert_array_equal(pixels(processor, premultiplied), pixels(processor, premultiplied.convert("LA")))
    assert pixels(processor, premultiplied).min() < 0.95  # composited, not blank white
    index = np.zeros((30, 40), np.uint8)
    index[:, 20:] = 1
    palette = PIL.Image.fromarray(index, "P")
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.info["transparency"] = 1  # the green half is transparent -> white
    out = pixels(processor, palette, do_resize=False, do_center_crop=False)
    np.testing.assert_array_equal(out[0, :, :, :20], np.array([1.0, 0.0, 0.0])[:, None, None] * np.ones((30, 20)))
    np.testing.assert_array_equal(out[0, :, :, 20:], 1.0)
    # the same palette image without transparency keeps its green half
    del palette.info["transparency"]
    out = pixels(processor, palette, do_resize=False, do_center_crop=False)
    np.testing.assert_array_equal(out[0, :, 0, 30], [0.0, 1.0, 0.0])


def test_rgba_array_equals_rgba_pil(processor, rng):
    rgba = np.concatenate([smooth_rgb(37, 53), rng.integers(0, 256, (37, 53, 1), dtype=np.uint8)], axis=-1)
    expected = pixels(processor, PIL.Image.fromarray(rgba))
    np.testing.assert_array_equal(pixels(processor, rgba), expected)
    np.testing.assert_array_equal(pixels(processor, rgba.transpose(2, 0, 1)), expected)
    np.testing.assert_array_equal(pixels(processor, torch.from_numpy(rgba).permute(2, 0, 1)), expected)
    # float RGBA in [0, 1]: alpha on the same scale, composited in float (smooth alpha, see EIGHT_BIT_VS_FLOAT_ATOL;
    # the 8-bit path also rounds the composite to uint8, hence the extra half level)
    rgba[..., 3] = smooth_rgb(37, 53)[..., 1]
    expected = pixels(processor, PIL.Image.fromarray(rgba))
    floats = pixels(processor, rgba.astype(np.float32) / 255, do_rescale=False)
    np.testing.assert_allclose(floats, expected, atol=EIGHT_BIT_VS_FLOAT_ATOL + 0.5 * 1.25 / 255)


# ----------------------------------------------------------------------------------------- numpy / torch inputs


def test_numpy_layouts_and_dtypes_agree(processor, rng):
    hwc = rng.integers(0, 256, (45, 67, 3), dtype=np.uint8)
    expected = pixels(processor, PIL.Image.fromarray(hwc))
    np.testing.assert_array_equal(pixels(processor, hwc), expected)
    np.testing.assert_array_equal(pixels(processor, np.ascontiguousarray(hwc.transpose(2, 0, 1))), expected)
    np.testing.assert_array_equal(pixels(processor, hwc.astype(np.int64)), expected)
    chw = hwc.transpose(2, 0, 1)
    np.testing.assert_array_equal(pixels(processor, chw, input_data_format="channels_first"), expected)
    np.testing.assert_array_equal(pixels(processor, (hwc.astype(np.uint16) * 257)), expected)
    # Big-endian 16-bit data (FITS files, some scientific formats), once refused as "not uint16".
    np.testing.assert_array_equal(pixels(processor, (hwc.astype(np.uint16) * 257).astype(">u2")), expected)


def test_float_inputs_follow_do_rescale(processor):
    hwc = smooth_rgb(45, 67)
    expected = pixels(processor, hwc)
    # floats in [0, 1] need do_rescale=False (transformers convention); they are resampled in float
    unit = hwc.astype(np.float32) / 255
    np.testing.assert_allclose(pixels(processor, unit, do_rescale=False), expected, atol=EIGHT_BIT_VS_FLOAT_ATOL)
    # floats holding 0..255 intensities are rescaled like uint8
    np.testing.assert_allclose(pixels(processor, hwc.astype(np.float64)), expected, atol=EIGHT_BIT_VS_FLOAT_ATOL)
    np.testing.assert_allclose(pixels(processor, hwc.astype(np.float16)), expected, atol=EIGHT_BIT_VS_FLOAT_ATOL)
    # an all-black float image is unambiguous
    np.testing.assert_array_equal(pixels(processor, np.zeros((10, 10, 3), np.float32)), 0.0)


def test_torch_inputs(processor):
    hwc = smooth_rgb(45, 67)
    expected = pixels(processor, hwc)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    np.testing.assert_array_equal(pixels(processor, chw), expected)
    np.testing.assert_array_equal(pixels(processor, torch.from_numpy(hwc)), expected)
    unit = (chw.float() / 255).requires_grad_()
    np.testing.assert_allclose(pixels(processor, unit, do_rescale=False), expected, atol=EIGHT_BIT_VS_FLOAT_ATOL)
    # bfloat16 keeps 8 significant bits: its own rounding (<= 2**-9 relative) comes on top
    bf16 = pixels(processor, unit.bfloat16(), do_rescale=False)
    np.testing.assert_allclose(bf16, expected, atol=EIGHT_BIT_VS_FLOAT_ATOL + 1.25 * 2**-9)
    batch = torch.stack([chw, chw.flip(-1)])
    out = processor(batch, return_tensors="pt")["pixel_values"]
    assert out.shape == (2, 3, 256, 256) and out.dtype == torch.float32
    np.testing.assert_array_equal(out[0].numpy(), expected[0])


def test_batches_and_return_types(processor, rng, photo):
    images = [
        photo,
        rng.integers(0, 256, (97, 301, 3), dtype=np.uint8),
        torch.from_numpy(smooth_rgb(300, 97)).permute(2, 0, 1),
        PIL.Image.new("LA", (10, 20)),
        smooth_rgb(5, 5)[..., 0],
    ]
    out = processor(images, return_tensors="pt")["pixel_values"]
    assert out.shape == (5, 3, 256, 256) and out.dtype == torch.float32
    np.testing.assert_array_equal(out[0].numpy(), mage_eval_reference(photo))
    as_list = processor(images)["pixel_values"]
    assert isinstance(as_list, list) and len(as_list) == 5
    assert all(isinstance(x, np.ndarray) and x.shape == (3, 256, 256) and x.dtype == np.float32 for x in as_list)
    np.testing.assert_array_equal(np.stack(as_list), out.numpy())
    # a tuple, a nested list and a 4-D numpy batch
    assert pixels(processor, tuple(images[:2])).shape == (2, 3, 256, 256)
    assert pixels(processor, [images[:2], images[2:]]).shape == (5, 3, 256, 256)
    batch = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    out = pixels(processor, batch)
    assert out.shape == (3, 3, 256, 256)
    np.testing.assert_array_equal(out[1], pixels(processor, batch[1])[0])


def test_channels_last_output_and_normalisation(processor):
    hwc = smooth_rgb(45, 67)
    base = pixels(processor, hwc)
    last = pixels(processor, hwc, data_format="channels_last")
    np.testing.assert_array_equal(last, base.transpose(0, 2, 3, 1))
    normalised = pixels(processor, hwc, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    np.testing.assert_allclose(normalised, base * 2 - 1, atol=1e-6)
    # the default mean/std make normalisation the identity
    np.testing.assert_array_equal(pixels(processor, hwc, do_normalize=True), base)
    raw = pixels(processor, hwc, do_rescale=False)
    np.testing.assert_allclose(raw, base * 255, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad,error,match",
    [
        ("cat.jpg", TypeError, r"images is a str .*does not read files or URLs.*PIL\.Image\.open"),
        (Path("cat.jpg"), TypeError, r"does not read files or URLs"),
        ([[0, 1], [2, 3]], TypeError, r"images\[0\] is a nested Python list of numbers.*np\.asarray"),
        ([np.zeros((4, 4, 3), np.uint8), "cat.jpg"], TypeError, r"images\[1\] is a str"),
        ([[[PIL.Image.new("RGB", (4, 4))]]], TypeError, r"images\[0\]\[0\] is a list: .*nested at most once"),
        ({"pixel_values": 1}, TypeError, r"unsupported type builtins\.dict.*PIL\.Image\.Image"),
        (3.5, TypeError, r"unsupported type builtins\.float"),
        ([], ValueError, r"empty list of images"),
        ([[], []], ValueError, r"no images"),
        (np.zeros((5,), np.uint8), ValueError, r"1 dimension\(s\) \(shape \(5,\)\); expected 2 \(H, W\)"),
        (np.zeros((1, 1, 4, 4, 3), np.uint8), ValueError, r"5 dimension\(s\)"),
        (np.zeros((0, 4, 4, 3), np.uint8), ValueError, r"4-D batch with 0 images"),
        (np.zeros((8, 8, 5), np.uint8), ValueError, r"Cannot find a channel axis.*1 \(grayscale\), 3 \(RGB\) or 4"),
        (np.zeros((8, 8, 2), np.uint8), ValueError, r"Cannot find a channel axis in an image of shape \(8, 8, 2\)"),
        (np.zeros((0, 4, 3), np.uint8), ValueError, r"empty image \(shape \(0, 4, 3\)\)"),
        (np.zeros((4, 0), np.float32), ValueError, r"empty image"),
        (PIL.Image.new("RGB", (0, 5)), ValueError, r"empty PIL image \(size 0x5\)"),
        (np.full((4, 4, 3), np.nan, np.float32), ValueError, r"contains NaN values.*nan_to_num"),
        (torch.full((3, 4, 4), float("inf")), ValueError, r"contains infinite values"),
        (np.full((4, 4, 3), 0.5, np.float32), ValueError, r"already looks rescaled to \[0, 1\].*do_rescale=False"),
        (np.full((4, 4, 3), 300.0), ValueError, r"must be in \[0, 255\] when do_rescale=True, got values up to 300"),
        (np.full((4, 4, 3), -0.5, np.float32), ValueError, r"negative values.*normalised"),
        (np.full((4, 4, 3), 256, np.int32), ValueError, r"Integer image values must lie in \[0, 255\].*uint16"),
        (PIL.Image.fromarray(np.full((4, 4), 1000, np.int32)), ValueError, r"got \[1000, 1000\] for dtype int32"),
        (np.zeros((4, 4, 3), bool), TypeError, r"Unsupported image dtype bool.*astype\(np\.uint8\)"),
        (torch.zeros((3, 4, 4), dtype=torch.complex64), TypeError, r"Complex-valued tensors"),
    ],
)
def test_invalid_inputs_raise_clear_errors(processor, bad, error, match):
    with pytest.raises(error, match=match):
        processor(bad)


def test_invalid_options_raise_clear_errors(processor):
    gray = PIL.Image.new("L", (8, 8))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got values up to 2.*do_rescale=True"):
        processor(np.full((4, 4, 3), 2.0, np.float32), do_rescale=False)
    with pytest.raises(ValueError, match=r"mode 'L' with do_convert_rgb=False"):
        processor(gray, do_convert_rgb=False)
    with pytest.raises(ValueError, match=r"1-channel image with do_convert_rgb=False"):
        processor(np.zeros((8, 8), np.uint8), do_convert_rgb=False)
    with pytest.raises(ValueError, match=r"Expected 1 \(grayscale\), 3 \(RGB\) or 4 \(RGBA\) channels, got 8"):
        processor(np.zeros((8, 8, 8), np.uint8), input_data_format="channels_last")
    with pytest.raises(ValueError, match=r"`background_color` must be an 8-bit RGB triple"):
        MageImageProcessor(background_color=(0, 0, 256))
    with pytest.raises(ValueError, match=r"`background_color` must be an 8-bit RGB triple"):
        MageImageProcessor(background_color="white")
    # call-time kwargs are type-checked by transformers (huggingface_hub strict dataclasses) before ours
    with pytest.raises(StrictDataclassFieldValidationError, match=r"background_color"):
        processor(gray, background_color="white")
    with pytest.raises(ValueError, match=r"supports size=\{'shortest_edge': s\}"):
        processor(gray, size={"max_height": 10, "max_width": 10})
    # A zero size used to give empty (3, 0, 0) arrays, then a numpy reduction error with return_tensors.
    for kwargs, match in (
        ({"crop_size": 0}, r"`crop_size` must hold positive whole numbers of pixels, got height=0"),
        ({"crop_size": {"height": 4, "width": -1}}, "got width=-1"),
        ({"size": 0}, r"`size` must hold positive whole numbers of pixels, got shortest_edge=0"),
    ):
        with pytest.raises(ValueError, match=match):
            processor(gray, **kwargs)
        with pytest.raises(ValueError, match=match):
            MageImageProcessor(**kwargs)(gray)


# ------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path, rng, photo):
    processor = MageImageProcessor(crop_size={"height": 224, "width": 224}, background_color=(0, 128, 255))
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "MageImageProcessor"
    assert config["size"] == {"shortest_edge": 256} and config["crop_size"] == {"height": 224, "width": 224}
    assert config["resample"] == 3 and config["do_normalize"] is False and config["background_color"] == [0, 128, 255]
    loaded = MageImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MageImageProcessor)
    assert loaded.to_dict() == processor.to_dict()
    images = [photo, PIL.Image.new("RGBA", (33, 77), (1, 2, 3, 100)), rng.integers(0, 256, (50, 60), dtype=np.uint8)]
    before, after = pixels(processor, images), pixels(loaded, images)
    assert before.shape == (3, 3, 224, 224)
    np.testing.assert_array_equal(before, after)
    # a second save produces the same file
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "preprocessor_config.json").read_text()) == config


def test_auto_image_processor_resolves_saved_folder(tmp_path):
    from transformers import AutoImageProcessor

    MageImageProcessor(crop_size=192).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MageImageProcessor) and dict(loaded.crop_size) == {"height": 192, "width": 192}


# --------------------------------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def tiny_vit_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    id2label = imagenet1k_id2label()
    config = ViTConfig(
        image_size=256,
        patch_size=32,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
    )
    folder = tmp_path_factory.mktemp("tiny_vit")
    ViTForImageClassification(config).eval().save_pretrained(folder)
    MageImageProcessor().save_pretrained(folder)
    return folder


def test_image_classification_pipeline(tiny_vit_folder, photo):
    from transformers import pipeline

    labels = set(imagenet1k_labels())
    explicit = pipeline("image-classification", model=str(tiny_vit_folder), image_processor=MageImageProcessor())
    auto = pipeline("image-classification", model=str(tiny_vit_folder))
    assert isinstance(auto.image_processor, MageImageProcessor)
    for classifier in (explicit, auto):
        result = classifier(photo, top_k=3)
        assert isinstance(result, list) and len(result) == 3
        assert all(set(item) == {"label", "score"} for item in result)
        assert all(item["label"] in labels and 0.0 <= item["score"] <= 1.0 for item in result)
        assert [item["score"] for item in result] == sorted((item["score"] for item in result), reverse=True)
    assert explicit(photo, top_k=3) == auto(photo, top_k=3)
    batch = explicit([photo, photo.convert("L"), smooth_rgb(97, 301)], top_k=2)
    assert len(batch) == 3 and all(len(item) == 2 for item in batch)
    assert batch[0] == explicit(photo, top_k=2)


def test_image_feature_extraction_pipeline(tiny_vit_folder, photo):
    from transformers import pipeline

    extractor = pipeline("image-feature-extraction", model=str(tiny_vit_folder), image_processor=MageImageProcessor())
    features = extractor(photo, return_tensors=True)
    assert isinstance(features, torch.Tensor)
    assert features.shape == (1, (256 // 32) ** 2 + 1, 32)
    as_lists = extractor(photo)
    assert np.asarray(as_lists).shape == (1, 65, 32)
    np.testing.assert_allclose(np.asarray(as_lists), features.numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------------------ labels


def test_imagenet1k_labels():
    id2label = imagenet1k_id2label()
    assert len(id2label) == 1000 and sorted(id2label) == list(range(1000))
    assert id2label[0] == "tench, Tinca tinca"
    assert id2label[1] == "goldfish, Carassius auratus"
    assert id2label[207] == "golden retriever"
    assert id2label[281] == "tabby, tabby cat"
    assert id2label[954] == "banana"
    assert id2label[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert all(isinstance(name, str) and name.strip() == name and name for name in id2label.values())
    # names are unique except "crane" (134: the bird, 517: the machine), as in the standard ImageNet-1k list
    names = imagenet1k_labels()
    duplicates = {name: [i for i, n in enumerate(names) if n == name] for name in names if names.count(name) > 1}
    assert duplicates == {"crane": [134, 517]}
    assert (names[638], names[639]) == ("maillot", "maillot, tank suit")
    label2id = imagenet1k_label2id()
    assert len(label2id) == 999 and label2id["crane"] == 134
    assert label2id["toilet tissue, toilet paper, bathroom tissue"] == 999
    # returned containers are copies
    names.append("x")
    id2label[0] = "y"
    assert len(imagenet1k_labels()) == 1000 and imagenet1k_id2label()[0] == "tench, Tinca tinca"


def test_label_file_is_packaged_with_its_provenance():
    from importlib import resources

    data = resources.files("mage_hf").joinpath("data")
    names = json.loads(data.joinpath("imagenet1k_labels.json").read_text(encoding="utf-8"))
    assert names == imagenet1k_labels()
    readme = data.joinpath("README.md").read_text(encoding="utf-8")
    assert "timm 1.0.31" in readme and "Apache License 2.0" in readme and "imagenet_synset_to_lemma.txt" in readme
