# Copyright 2026 The mage-hf authors. MIT licence.
"""Image processor for MAGE (Masked Generative Encoder, CVPR 2023).

MAGE's evaluation transform (``torchvision``) is::

    transforms.Resize(256, interpolation=InterpolationMode.BICUBIC)
    transforms.CenterCrop(256)
    transforms.ToTensor()  # uint8 [0, 255] -> float32 [0, 1], no normalisation

applied to ``PIL.Image.open(path).convert("RGB")``. `MageImageProcessor` reproduces it with PIL and NumPy only (no
torchvision), including torchvision's rounding of the resized long side and of the centre-crop offsets, so for 8-bit
RGB inputs the output matches MAGE's eval transform.
"""

import numbers
from collections.abc import Sequence
from typing import Any


try:  # Python >= 3.11
    from typing import Unpack
except ImportError:  # pragma: no cover
    from typing_extensions import Unpack

import numpy as np
import PIL.Image
from transformers import BatchFeature, ImagesKwargs, PilBackend
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict
from transformers.utils import TensorType, is_torch_tensor, logging


logger = logging.get_logger(__name__)

__all__ = ["MageImageProcessor"]


# PIL modes that carry an alpha channel (or are converted to one) and are composited over `background_color`.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# PIL modes holding 16-bit unsigned samples (0..65535).
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_VALID_CHANNELS = (1, 3, 4)


class MageImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    background_color (`tuple[int, int, int]`, *optional*, defaults to `self.background_color`):
        8-bit RGB colour that transparent pixels (RGBA, LA, P/L/RGB with a transparency key, 4-channel arrays) are
        composited over before the alpha channel is dropped.
    """

    background_color: tuple[int, int, int] | list[int] | int | None


class MageImageProcessor(PilBackend):
    r"""
    Constructs a MAGE image processor (PIL/NumPy backend; torchvision is not needed).

    The default pipeline reproduces MAGE's evaluation transform: convert to RGB, resize the shorter side to 256 with
    bicubic interpolation, centre-crop 256x256 and scale to `[0, 1]`. No mean/std normalisation is applied by default
    because MAGE's VQGAN tokenizer consumes `[0, 1]` pixels. The output is a [`~transformers.BatchFeature`] whose
    `pixel_values` have shape `(batch_size, 3, 256, 256)` and dtype `float32`.

    Accepted inputs are a single image or a list (optionally nested once) of images, where an image is a
    `PIL.Image.Image` of any mode, or a `numpy.ndarray` / `torch.Tensor` of shape `(H, W)`, `(H, W, C)` or `(C, H, W)`
    with `C` in {1, 3, 4}; a 4-D array/tensor is treated as a batch. File paths and URLs are *not* loaded: open them
    first (e.g. with `PIL.Image.open` or `transformers.image_utils.load_image`).

    How pixel values are interpreted:

    - 8-bit data (`uint8`, PIL modes `1`, `L`, `P`, `RGB`, `RGBA`, `CMYK`, ...) is used as is. Other integer arrays
      (and PIL mode `I`) must hold values in `[0, 255]`. 16-bit data (`uint16` arrays, PIL modes `I;16*`) is mapped
      from `[0, 65535]` to `[0, 255]` (rounded to 8 bits, the precision MAGE was trained on).
    - Floating-point data (`float16/32/64`, `bfloat16` tensors, PIL mode `F`) follows the transformers convention:
      with `do_rescale=True` it must hold `[0, 255]` intensities, with `do_rescale=False` it must already be in
      `[0, 1]`. A float image whose values all lie in `[0, 1]` combined with `do_rescale=True` raises a `ValueError`
      instead of being silently rescaled twice; pass `do_rescale=False` for such images. NaN/inf and negative values
      (e.g. an already mean/std-normalised tensor) raise a `ValueError`.
    - Grayscale images are replicated to 3 channels. Images with an alpha channel (PIL `RGBA`, `LA`, `PA`, `RGBa`,
      `La`, `P`/`L`/`RGB` with a `transparency` key, and 4-channel arrays, whose 4th channel is taken as alpha on the
      same scale as the colour channels) are alpha-composited over `background_color` (white by default), then the
      alpha channel is dropped. Note: MAGE's own loader (`.convert("RGB")`) simply drops alpha, and so does
      `transformers.pipeline`, which converts PIL inputs to RGB before calling the image processor.
    - Other PIL modes (`CMYK`, `YCbCr`, `HSV`, ...) are converted with `PIL.Image.Image.convert("RGB")`.

    Args:
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Whether to convert grayscale, palette, alpha and other non-RGB inputs to 3-channel RGB. If `False`, every
            input must already be 3-channel RGB (PIL mode `RGB` or arrays with 3 channels), otherwise a `ValueError`
            is raised. Can be overridden by `do_convert_rgb` in the `preprocess` method.
        background_color (`tuple[int, int, int]`, *optional*, defaults to `(255, 255, 255)`):
            8-bit RGB colour that transparent pixels are composited over. A single int `v` means `(v, v, v)`. Can be
            overridden by `background_color` in the `preprocess` method.
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize the image to `size`. Can be overridden by `do_resize` in the `preprocess` method.
        size (`dict[str, int]`, *optional*, defaults to `{"shortest_edge": 256}`):
            Target size of the resize. `{"shortest_edge": s}` resizes the shorter side to `s` keeping the aspect ratio
            (the longer side is `int(s * long / short)`, as in `torchvision.transforms.Resize(s)`); an optional
            `"longest_edge"` caps the longer side (torchvision's `max_size`). `{"height": h, "width": w}` resizes to
            exactly `h x w`. An int `s` means `{"shortest_edge": s}`. Can be overridden by `size` in the `preprocess`
            method.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BICUBIC`):
            Resampling filter used when resizing (MAGE uses bicubic). Can be overridden by `resample` in the
            `preprocess` method.
        do_center_crop (`bool`, *optional*, defaults to `True`):
            Whether to centre-crop the image to `crop_size` after resizing, with torchvision's crop offsets
            (`round((H - h) / 2)`); images smaller than the crop are zero-padded first. Can be overridden by
            `do_center_crop` in the `preprocess` method.
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 256, "width": 256}`):
            Size of the centre crop. An int `s` means `{"height": s, "width": s}`. Can be overridden by `crop_size` in
            the `preprocess` method.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply pixel values by `rescale_factor` (0-255 intensities to `[0, 1]`). Set it to `False`
            for floating-point inputs that are already in `[0, 1]`. Can be overridden by `do_rescale` in the
            `preprocess` method.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            Scale factor used when `do_rescale=True`. Can be overridden by `rescale_factor` in the `preprocess`
            method.
        do_normalize (`bool`, *optional*, defaults to `False`):
            Whether to normalise with `image_mean` and `image_std`. MAGE does not normalise (its VQGAN expects `[0, 1]`
            pixels), so this is off by default. Can be overridden by `do_normalize` in the `preprocess` method.
        image_mean (`float` or `list[float]`, *optional*, defaults to `[0.0, 0.0, 0.0]`):
            Per-channel mean used when `do_normalize=True`. The default makes normalisation the identity. Can be
            overridden by `image_mean` in the `preprocess` method.
        image_std (`float` or `list[float]`, *optional*, defaults to `[1.0, 1.0, 1.0]`):
            Per-channel standard deviation used when `do_normalize=True`. The default makes normalisation the
            identity. Can be overridden by `image_std` in the `preprocess` method.
        do_pad (`bool`, *optional*, defaults to `False`):
            Whether to zero-pad the images of a batch (bottom/right) to a common size, only useful when
            `do_center_crop=False`. Can be overridden by `do_pad` in the `preprocess` method.
    """

    valid_kwargs = MageImageProcessorKwargs
    model_input_names = ["pixel_values"]

    do_convert_rgb = True
    background_color = (255, 255, 255)
    do_resize = True
    size = {"shortest_edge": 256}
    default_to_square = False
    resample = PILImageResampling.BICUBIC
    do_center_crop = True
    crop_size = {"height": 256, "width": 256}
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = False
    image_mean = [0.0, 0.0, 0.0]
    image_std = [1.0, 1.0, 1.0]
    do_pad = False

    def __init__(self, **kwargs: Unpack[MageImageProcessorKwargs]):
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ kwargs

    def _standardize_kwargs(self, background_color=None, **kwargs) -> dict:
        kwargs = super()._standardize_kwargs(**kwargs)
        for name in ("size", "crop_size"):
            sizes = kwargs.get(name)
            for key, value in (dict(sizes) if sizes is not None else {}).items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise ValueError(f"`{name}` must hold positive whole numbers of pixels, got {key}={value!r}.")
        kwargs["background_color"] = None if background_color is None else _check_background_color(background_color)
        return kwargs

    # ------------------------------------------------------- input structure

    def fetch_images(self, image_url_or_urls):
        # The base class would download URLs / read paths here; MAGE's processor only takes decoded images.
        return image_url_or_urls

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list[Any]:
        """Flatten the input into a list of single images (PIL images or 2-D/3-D arrays/tensors), with clear errors."""
        flat: list[Any] = []
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("Received an empty list of images; pass at least one image.")
            for i, item in enumerate(images):
                if isinstance(item, (list, tuple)):
                    if _is_nested_numbers(item):
                        raise TypeError(
                            f"images[{i}] is a nested Python list of numbers, which is not an image. Convert it to an "
                            "array first, e.g. `np.asarray(pixels, dtype=np.uint8)` with shape (H, W) or (H, W, C)."
                        )
                    for j, sub in enumerate(item):
                        if isinstance(sub, (list, tuple)):
                            raise TypeError(
                                f"images[{i}][{j}] is a {type(sub).__name__}: image lists may be nested at most once "
                                "(a list of lists of images)."
                            )
                        _append_image(flat, sub, f"images[{i}][{j}]")
                else:
                    _append_image(flat, item, f"images[{i}]")
        else:
            _append_image(flat, images, "images")
        if not flat:
            raise ValueError("Received no images (empty nested lists); pass at least one image.")
        return flat

    # ------------------------------------------------------ per-image decode

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        background_color: Sequence[int] | None = None,
        **kwargs,
    ) -> np.ndarray:
        """
        Convert one image to a channels-first `(3, H, W)` array: `uint8` for integer inputs, `float32` for
        floating-point inputs (on the scale implied by `do_rescale`, see the class docstring).
        """
        do_convert_rgb = True if do_convert_rgb is None else do_convert_rgb
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        background_color = self.background_color if background_color is None else background_color

        if isinstance(image, PIL.Image.Image):
            array, layout = _pil_to_array(image, do_convert_rgb), ChannelDimension.LAST
        elif isinstance(image, np.ndarray) or is_torch_tensor(image):
            array = _to_numpy(image)
            layout = None if input_data_format is None else ChannelDimension(input_data_format)
        else:  # pragma: no cover - filtered by _prepare_images_structure
            raise TypeError(_unsupported_type_message(image, "image"))

        return _array_to_rgb_chw(
            array,
            layout=layout,
            do_convert_rgb=do_convert_rgb,
            float_max=_float_max(do_rescale, rescale_factor),
            background_color=_check_background_color(background_color),
        )

    # ------------------------------------------------------------- transforms

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict | dict[str, int],
        resample: PILImageResampling | int | None = None,
        value_range: tuple[float, float] | None = None,
        **kwargs,
    ) -> np.ndarray:
        """
        Resize a channels-first image with PIL. `uint8` images are resized as 8-bit RGB PIL images (exactly what
        `torchvision.transforms.Resize` does on PIL images); float images are resized per channel in PIL's 32-bit
        float mode and clipped to `value_range` (bicubic overshoot).
        """
        size = size if isinstance(size, SizeDict) else SizeDict(**size)
        height, width = image.shape[-2:]
        new_height, new_width = _resize_output_size(height, width, size)
        if (new_height, new_width) == (height, width):
            return image
        resample = PIL.Image.Resampling(int(PILImageResampling.BICUBIC if resample is None else resample))
        if image.dtype == np.uint8 and image.shape[0] == 3:
            pil = PIL.Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1)))
            return np.moveaxis(np.asarray(pil.resize((new_width, new_height), resample)), -1, 0).copy()
        channels = [
            np.asarray(
                PIL.Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32)).resize(
                    (new_width, new_height), resample
                )
            )
            for channel in image
        ]
        resized = np.stack(channels, axis=0)
        if value_range is not None:
            resized = np.clip(resized, value_range[0], value_range[1])
        return resized.astype(np.float32, copy=False)

    def center_crop(self, image: np.ndarray, size: SizeDict | dict[str, int], **kwargs) -> np.ndarray:
        """
        Centre-crop a channels-first image like `torchvision.transforms.CenterCrop`: zero-pad if the crop is larger
        than the image, then crop at offsets `int(round((H - h) / 2))`, `int(round((W - w) / 2))`.
        """
        size = size if isinstance(size, SizeDict) else SizeDict(**size)
        if size.height is None or size.width is None:
            raise ValueError(f"`crop_size` must have the keys 'height' and 'width', got {dict(size)}.")
        crop_height, crop_width = size.height, size.width
        height, width = image.shape[-2:]
        if crop_height > height or crop_width > width:
            pad_top = (crop_height - height) // 2 if crop_height > height else 0
            pad_left = (crop_width - width) // 2 if crop_width > width else 0
            pad_bottom = (crop_height - height + 1) // 2 if crop_height > height else 0
            pad_right = (crop_width - width + 1) // 2 if crop_width > width else 0
            image = np.pad(image, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right)), mode="constant")
            height, width = image.shape[-2:]
        top = int(round((height - crop_height) / 2.0))
        left = int(round((width - crop_width) / 2.0))
        return image[:, top : top + crop_height, left : left + crop_width]

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int | None,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float] | None,
        image_std: float | Sequence[float] | None,
        return_tensors: str | TensorType | None = None,
        do_pad: bool | None = None,
        pad_size: SizeDict | None = None,
        data_format: str | ChannelDimension | None = ChannelDimension.FIRST,
        **kwargs,
    ) -> BatchFeature:
        float_max = _float_max(do_rescale, rescale_factor)
        processed = []
        for image in images:
            if do_resize:
                image = self.resize(image, size=size, resample=resample, value_range=(0.0, float_max))
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            image = image.astype(np.float32)
            if do_rescale:
                image = self.rescale(image, rescale_factor).astype(np.float32, copy=False)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std).astype(np.float32, copy=False)
            processed.append(np.ascontiguousarray(image))

        if do_pad:
            processed = self.pad(processed, pad_size=pad_size)
        if data_format is not None and ChannelDimension(data_format) == ChannelDimension.LAST:
            processed = [np.ascontiguousarray(np.moveaxis(image, 0, -1)) for image in processed]

        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _is_nested_numbers(value: Any) -> bool:
    """True for a number or a non-empty (nested) list/tuple whose leaves are all numbers."""
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(_is_nested_numbers(x) for x in value)
    return isinstance(value, (numbers.Number, np.generic))


def _unsupported_type_message(value: Any, where: str) -> str:
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        return (
            f"{where} is a {type(value).__name__} ({str(value)[:80]!r}); MageImageProcessor does not read files or "
            "URLs. Load the image first, e.g. `PIL.Image.open(path)` or `transformers.image_utils.load_image(path)`, "
            "and pass the PIL image, a numpy array or a torch tensor."
        )
    return (
        f"{where} has unsupported type {type(value).__module__}.{type(value).__qualname__}. Pass a PIL.Image.Image, "
        "a numpy.ndarray or a torch.Tensor of shape (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}, a 4-D batch "
        "of those, or a list of such images."
    )


def _append_image(flat: list[Any], item: Any, where: str) -> None:
    if isinstance(item, PIL.Image.Image):
        flat.append(item)
        return
    if isinstance(item, np.ndarray) or is_torch_tensor(item):
        ndim = item.ndim
        if ndim in (2, 3):
            flat.append(item)
        elif ndim == 4:
            if item.shape[0] == 0:
                raise ValueError(f"{where} is a 4-D batch with 0 images (shape {tuple(item.shape)}).")
            flat.extend(list(item))
        else:
            raise ValueError(
                f"{where} has {ndim} dimension(s) (shape {tuple(item.shape)}); expected 2 (H, W), 3 (H, W, C) or "
                "(C, H, W) for one image, or 4 (B, H, W, C) or (B, C, H, W) for a batch."
            )
        return
    raise TypeError(_unsupported_type_message(item, where))


def _to_numpy(image: Any) -> np.ndarray:
    if is_torch_tensor(image):
        import torch

        tensor = image.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        if tensor.is_complex():
            raise TypeError(f"Complex-valued tensors are not images (dtype {tensor.dtype}).")
        return tensor.numpy()
    return image


def _pil_to_array(image: PIL.Image.Image, do_convert_rgb: bool) -> np.ndarray:
    """Decode a PIL image to an (H, W) or (H, W, C) array, keeping alpha (RGBA) and high bit depths."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"Received an empty PIL image (size {width}x{height}); images must have at least 1 pixel.")
    mode = image.mode
    if not do_convert_rgb:
        if mode != "RGB":
            raise ValueError(
                f"Got a PIL image in mode {mode!r} with do_convert_rgb=False; only 'RGB' images can skip the "
                "conversion. Pass do_convert_rgb=True (the default) or convert with `image.convert('RGB')`."
            )
        return np.asarray(image)
    has_transparency_key = image.info.get("transparency") is not None
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and has_transparency_key):
        if mode == "La":  # premultiplied; PIL converts it to LA (un-premultiplying) but not to RGBA directly
            image = image.convert("LA")
        return np.asarray(image.convert("RGBA"))
    if mode in ("RGB", "L"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode == "P":
        return np.asarray(image.convert("RGB"))
    if mode in _UINT16_MODES:
        return np.asarray(image).astype(np.uint16)  # native byte order, values 0..65535
    if mode in ("I", "F"):
        return np.asarray(image)
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as err:
        raise ValueError(
            f"Cannot convert a PIL image in mode {mode!r} to RGB ({err}). Convert it to 'RGB' yourself first."
        ) from err


def _float_max(do_rescale: bool, rescale_factor: float | None) -> float:
    """Upper end of the valid range for floating-point inputs: 1/rescale_factor if rescaling, else 1."""
    if do_rescale and rescale_factor is not None and 0 < rescale_factor < 1:
        return 1.0 / rescale_factor
    return 1.0


def _check_background_color(color: Any) -> tuple[int, int, int]:
    if isinstance(color, (int, np.integer)) and not isinstance(color, bool):
        color = (int(color),) * 3
    if (
        not isinstance(color, (list, tuple))
        or len(color) != 3
        or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
    ):
        raise ValueError(
            f"`background_color` must be an 8-bit RGB triple such as (255, 255, 255) (or one int in [0, 255]), got "
            f"{color!r}."
        )
    return tuple(int(c) for c in color)


def _resize_output_size(height: int, width: int, size: SizeDict) -> tuple[int, int]:
    """Output (height, width) of a resize, with torchvision's `Resize` rounding for `shortest_edge`."""
    if size.shortest_edge is not None:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
        if size.longest_edge is not None:
            if size.longest_edge <= new_short:
                raise ValueError(
                    f"size['longest_edge']={size.longest_edge} must be larger than "
                    f"size['shortest_edge']={size.shortest_edge}."
                )
            if new_long > size.longest_edge:
                new_short, new_long = int(size.longest_edge * new_short / new_long), size.longest_edge
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if size.height is not None and size.width is not None:
        return size.height, size.width
    raise ValueError(
        f"MageImageProcessor supports size={{'shortest_edge': s}} (optionally with 'longest_edge') or "
        f"size={{'height': h, 'width': w}}, got {dict(size)}."
    )


def _infer_layout(shape: tuple[int, ...]) -> ChannelDimension:
    first_ok, last_ok = shape[0] in _VALID_CHANNELS, shape[-1] in _VALID_CHANNELS
    if first_ok and last_ok:
        # Ambiguous (tiny image); prefer the axis of size 3, otherwise channels-first like transformers does.
        if shape[-1] == 3 and shape[0] != 3:
            return ChannelDimension.LAST
        if shape[0] != 3:
            logger.warning_once(
                f"The channel axis of an image of shape {shape} is ambiguous; assuming channels-first. Pass "
                "`input_data_format='channels_last'` (or 'channels_first') to say which it is."
            )
        return ChannelDimension.FIRST
    if first_ok:
        return ChannelDimension.FIRST
    if last_ok:
        return ChannelDimension.LAST
    raise ValueError(
        f"Cannot find a channel axis in an image of shape {shape}: expected 1 (grayscale), 3 (RGB) or 4 (RGBA) "
        "channels on the first (C, H, W) or last (H, W, C) axis. For a batch of grayscale images pass a list of 2-D "
        "arrays or add a channel axis."
    )


def _array_to_rgb_chw(
    array: np.ndarray,
    layout: ChannelDimension | None,
    do_convert_rgb: bool,
    float_max: float,
    background_color: tuple[int, int, int],
) -> np.ndarray:
    if array.dtype == np.bool_ or array.dtype.kind in "cOUSV":
        raise TypeError(
            f"Unsupported image dtype {array.dtype}; use uint8 (0-255) or a float type. For a boolean mask use "
            "`mask.astype(np.uint8) * 255`."
        )
    if array.ndim == 2:
        array, layout = array[:, :, None], ChannelDimension.LAST
    elif array.ndim != 3:
        raise ValueError(f"Expected an image with 2 or 3 dimensions, got shape {tuple(array.shape)}.")
    if array.size == 0:
        raise ValueError(f"Received an empty image (shape {tuple(array.shape)}); images must have at least 1 pixel.")
    if layout is None:
        layout = _infer_layout(tuple(array.shape))
    if layout == ChannelDimension.FIRST:
        array = np.moveaxis(array, 0, -1)
    num_channels = array.shape[-1]
    if num_channels not in _VALID_CHANNELS:
        raise ValueError(
            f"Expected 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, got {num_channels} (image shape in (H, W, C) "
            f"order: {tuple(array.shape)}). Check `input_data_format` or drop the extra channels."
        )
    if not do_convert_rgb and num_channels != 3:
        raise ValueError(
            f"Got a {num_channels}-channel image with do_convert_rgb=False; without conversion only 3-channel RGB "
            "images are accepted. Pass do_convert_rgb=True (the default)."
        )

    if array.dtype.kind in "iu":
        array = _integer_to_uint8(array)
        scale = 255.0
    else:
        array = _check_float(array.astype(np.float32, copy=False), float_max)
        scale = float_max

    if num_channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif num_channels == 4:
        alpha = array[..., 3:].astype(np.float32) / np.float32(scale)
        background = np.asarray(background_color, dtype=np.float32) * np.float32(scale / 255.0)
        composite = array[..., :3].astype(np.float32) * alpha + background * (np.float32(1.0) - alpha)
        if array.dtype == np.uint8:
            array = np.clip(np.round(composite), 0, 255).astype(np.uint8)
        else:
            array = np.clip(composite, 0.0, scale).astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(array, -1, 0))


def _integer_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16 in either byte order (FITS is big-endian)
        return np.round(array.astype(np.float32) * np.float32(255.0 / 65535.0)).astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"Integer image values must lie in [0, 255] (8-bit), got [{low}, {high}] for dtype {array.dtype}. For "
            "16-bit data pass a uint16 array or a PIL 'I;16' image; otherwise scale the values to 0-255 and cast "
            "to uint8."
        )
    return array.astype(np.uint8)


def _check_float(array: np.ndarray, float_max: float) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        bad = "NaN" if np.isnan(array).any() else "infinite"
        raise ValueError(
            f"The image contains {bad} values; replace them (e.g. `np.nan_to_num`) before preprocessing."
        )
    low, high = float(array.min()), float(array.max())
    tolerance = 1e-3 * float_max
    if low < -tolerance:
        raise ValueError(
            f"The image has negative values (min {low:.4g}); MAGE expects raw pixel intensities. If the image was "
            "already mean/std-normalised, pass the unnormalised image (uint8 0-255, or floats in [0, 1] with "
            "do_rescale=False)."
        )
    if float_max == 1.0 and high > 1.0 + tolerance:
        raise ValueError(
            f"With do_rescale=False floating-point images must be in [0, 1], got values up to {high:.4g}. If the "
            "image holds 0-255 intensities, pass do_rescale=True (the default) or convert it to uint8."
        )
    if float_max > 1.0:
        if high > float_max + tolerance:
            raise ValueError(
                f"Floating-point image values must be in [0, {float_max:g}] when do_rescale=True, got values up to "
                f"{high:.4g}. Scale the image to 0-{float_max:g} (or to [0, 1] and pass do_rescale=False)."
            )
        if 0.0 < high <= 1.0:
            raise ValueError(
                f"This floating-point image already looks rescaled to [0, 1] (max {high:.4g}), but do_rescale=True "
                f"would multiply it by rescale_factor={1.0 / float_max:.6g} again, giving an almost black image. Pass "
                "do_rescale=False for images already in [0, 1] (e.g. from torchvision's ToTensor), or convert 0-255 "
                "intensities to uint8."
            )
    return np.clip(array, 0.0, float_max)
