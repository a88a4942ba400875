# Copyright 2026 The mage-hf authors. MIT licence.
# MAGE (Li et al., CVPR 2023) and its reference code (LTH14/mage) are MIT licensed.
"""Configurations for MAGE and its MaskGIT VQGAN tokenizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedConfig

if TYPE_CHECKING:
    import torch

__all__ = ["MageConfig", "MageVQConfig"]

# MAGE's vocabulary reserves 1000 class slots after the codebook, then one mask token.
NUM_CLASS_SLOTS = 1000
# The original prepends `codebook_size + 1100 - 1024`, i.e. class slot 76, as its "fake" class label.
FAKE_CLASS_SLOT = 76


class MageVQConfig(PreTrainedConfig):
    r"""
    Configuration of [`MageVQModel`], the MaskGIT VQGAN that MAGE uses as its image tokenizer. The defaults give the
    tokenizer of the released MAGE checkpoints (`vqgan_jax_strongaug.ckpt`): 256x256 images to a 16x16 grid of ids
    into a codebook of 1024 entries.

    Args:
        num_channels (`int`, *optional*, defaults to 3):
            Number of image channels in and out.
        base_channels (`int`, *optional*, defaults to 128):
            Width of the first level (`ch` in the original).
        channel_multiplier (`list[int]`, *optional*, defaults to `[1, 1, 2, 2, 4]`):
            Width of each level as a multiple of `base_channels` (`ch_mult`). There are `len(channel_multiplier) - 1`
            down-sampling steps of 2x each.
        num_res_blocks (`int`, *optional*, defaults to 2):
            Residual blocks per level, in the encoder and in the decoder.
        num_embeddings (`int`, *optional*, defaults to 1024):
            Number of codebook entries (`n_embed`).
        embed_dim (`int`, *optional*, defaults to 256):
            Size of a codebook entry. It is also the encoder's output width (`z_channels`): there is no
            quantisation convolution.
        resolution (`int`, *optional*, defaults to 256):
            Image side length that the model is trained on.
        norm_num_groups (`int`, *optional*, defaults to 32):
            Groups of every `GroupNorm`.
        norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every `GroupNorm`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation for the initialisation of linear layers and the codebook.
    """

    model_type = "mage_vq"
    base_config_key = "vq_config"

    num_channels: int = 3
    base_channels: int = 128
    channel_multiplier: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    num_embeddings: int = 1024
    embed_dim: int = 256
    resolution: int = 256
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.channel_multiplier = [int(m) for m in self.channel_multiplier]
        super().__post_init__(**kwargs)
        if not self.channel_multiplier:
            raise ValueError("`channel_multiplier` needs at least one level, e.g. [1, 1, 2, 2, 4].")
        for width in self.level_channels:  # every GroupNorm sits on a level's width
            if width % self.norm_num_groups:
                raise ValueError(
                    f"Every width must be a multiple of norm_num_groups={self.norm_num_groups}; got {width} from "
                    f"base_channels={self.base_channels}, channel_multiplier={self.channel_multiplier}."
                )
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution={self.resolution} is not divisible by the down-sampling factor {self.downsample_factor}."
            )

    @property
    def level_channels(self) -> list[int]:
        """Width of each level, finest first."""
        return [self.base_channels * m for m in self.channel_multiplier]

    @property
    def downsample_factor(self) -> int:
        """Pixels per token side: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def grid_size(self) -> int:
        """Tokens per side for an image of `resolution` pixels."""
        return self.resolution // self.downsample_factor


class MageConfig(PreTrainedConfig):
    r"""
    Configuration of the MAGE transformer ([`MageModel`], [`MageForMaskedImageModeling`],
    [`MageForImageClassification`]). The defaults give MAGE ViT-B (`mage-vitb-1600.pth`).

    The vocabulary follows the tokenizer: `codebook_size` ids, then 1000 class slots, then the mask token, so
    `vocab_size = codebook_size + 1001`. Every sequence starts with a class position that holds the "fake class
    label" `codebook_size + 76` in the released (unconditional) models.

    Args:
        vq_config (`dict` or [`MageVQConfig`], *optional*):
            Configuration of the tokenizer. Defaults to [`MageVQConfig`]'s defaults.
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the encoder.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of encoder blocks.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Attention heads of each encoder block.
        intermediate_size (`int`, *optional*, defaults to 3072):
            Hidden width of each encoder MLP.
        decoder_hidden_size (`int`, *optional*, defaults to 768):
            Width of the decoder used for masked token prediction.
        decoder_num_hidden_layers (`int`, *optional*, defaults to 8):
            Number of decoder blocks.
        decoder_num_attention_heads (`int`, *optional*, defaults to 16):
            Attention heads of each decoder block.
        decoder_intermediate_size (`int`, *optional*, defaults to 3072):
            Hidden width of each decoder MLP.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLPs and of the MLM layer (exact, erf-based GELU).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout after the embeddings, the attention projection and in the MLPs.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on the attention probabilities.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the embedding, block, final and pooling layer norms.
        mlm_layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the MLM layer's norm (the original leaves it at PyTorch's default).
        use_mean_pooling (`bool`, *optional*, defaults to `False`):
            How the pooled output is made. `False`: the encoder ends with its final layer norm and the pooled output is
            the class position. `True` (MAGE's `global_pool`, used by the fine-tuned checkpoints and MAGE's linear
            probe): the encoder has no final norm, and the pooled output is a layer norm (`fc_norm`) of the mean over
            the image positions.
        mask_ratio_min (`float`, *optional*, defaults to 0.5):
            Lower end of the truncated normal that draws the masking ratio during pre-training.
        mask_ratio_max (`float`, *optional*, defaults to 1.0):
            Upper end of that truncated normal.
        mask_ratio_mu (`float`, *optional*, defaults to 0.55):
            Its mean.
        mask_ratio_std (`float`, *optional*, defaults to 0.25):
            Its standard deviation.
        drop_ratio (`float`, *optional*, defaults to 0.5):
            Fraction of the image tokens (the lowest-noise ones) dropped before the encoder during pre-training. The
            original ties it to `mask_ratio_min`; it must not exceed it, since dropped tokens are also masked.
        label_smoothing (`float`, *optional*, defaults to 0.1):
            Label smoothing of the masked-token loss.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation for the initialisation of embeddings.
        num_classes (`int`, *optional*, defaults to 0):
            Number of classes of a class-conditional model (at most 999), 0 for an unconditional one (the released
            checkpoints). Class `c` goes to the class position as the id given by [`~MageConfig.class_token_ids`];
            label -1 (and every row when no labels are given) uses the fake class label, i.e. the unconditional
            slot that classifier-free guidance contrasts with.
        contrastive_projection_dim (`int`, *optional*):
            When set, [`MageForMaskedImageModeling`] gets MAGE-C's contrastive projection head, an MLP
            (`hidden_size -> hidden_size -> contrastive_projection_dim`) on the mean of the encoder's image-token
            outputs, returned as `contrastive_embeddings`. `None` (or 0): no head, as in the released MAGE models.
    """

    model_type = "mage"
    sub_configs_defaults = {"vq_config": MageVQConfig}

    vq_config: dict | PreTrainedConfig | None = None
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    decoder_hidden_size: int = 768
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    layer_norm_eps: float = 1e-6
    mlm_layer_norm_eps: float = 1e-5
    use_mean_pooling: bool = False
    mask_ratio_min: float = 0.5
    mask_ratio_max: float = 1.0
    mask_ratio_mu: float = 0.55
    mask_ratio_std: float = 0.25
    drop_ratio: float = 0.5
    label_smoothing: float = 0.1
    initializer_range: float = 0.02
    num_classes: int = 0
    contrastive_projection_dim: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not 0 <= int(self.num_classes) <= NUM_CLASS_SLOTS - 1:
            raise ValueError(
                f"num_classes={self.num_classes} must lie in [0, {NUM_CLASS_SLOTS - 1}]: the vocabulary has "
                f"{NUM_CLASS_SLOTS} class slots and one of them is the unconditional (fake) label. Use 0 for an "
                "unconditional model."
            )
        if self.contrastive_projection_dim is not None and int(self.contrastive_projection_dim) < 0:
            raise ValueError(
                f"contrastive_projection_dim must be a positive size (or None/0 for no contrastive head), got "
                f"{self.contrastive_projection_dim}."
            )
        for width, heads, name in (
            (self.hidden_size, self.num_attention_heads, ""),
            (self.decoder_hidden_size, self.decoder_num_attention_heads, "decoder_"),
        ):
            if width % heads:
                raise ValueError(f"{name}hidden_size={width} is not divisible by {name}num_attention_heads={heads}.")
        if not 0.0 <= self.mask_ratio_min <= self.mask_ratio_max <= 1.0:
            raise ValueError(
                f"Need 0 <= mask_ratio_min <= mask_ratio_max <= 1, got {self.mask_ratio_min} and {self.mask_ratio_max}."
            )
        if not 0.0 <= self.drop_ratio <= self.mask_ratio_min:
            raise ValueError(
                f"drop_ratio={self.drop_ratio} must lie in [0, mask_ratio_min={self.mask_ratio_min}]: every dropped "
                "token is also a masked one."
            )

    @property
    def codebook_size(self) -> int:
        """Number of image token ids (the tokenizer's codebook)."""
        return self.vq_config.num_embeddings

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per sequence, e.g. 256 for a 16x16 grid."""
        return self.vq_config.grid_size**2

    @property
    def max_position_embeddings(self) -> int:
        """The class position plus the image tokens."""
        return self.num_image_tokens + 1

    @property
    def vocab_size(self) -> int:
        """Codebook ids, 1000 class slots and the mask token."""
        return self.codebook_size + NUM_CLASS_SLOTS + 1

    @property
    def fake_class_label(self) -> int:
        """The id at the class position in unconditional use (class slot 76, as in the original)."""
        return self.codebook_size + FAKE_CLASS_SLOT

    @property
    def mask_token_id(self) -> int:
        """The id of a masked image token: the last id of the vocabulary."""
        return self.vocab_size - 1

    def class_token_ids(self, class_labels: torch.LongTensor) -> torch.LongTensor:
        """Class labels -> the ids that go to the class position, same shape and device.

        The 1000 class slots follow the codebook (slot `s` is id `codebook_size + s`) and slot 76 is the fake
        label of unconditional use. So that every class stays distinct from it, class `c` takes slot `c` for
        `c < 76` and slot `c + 1` for `c >= 76` (classes 0..998). Label -1 means unconditional: the fake label.

        Raises a `ValueError` for labels outside `[-1, num_classes - 1]` (every label but -1, when the model is
        unconditional, `num_classes == 0`).
        """
        import torch

        labels = torch.as_tensor(class_labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be integer class indices (-1 for unconditional), got {labels.dtype}.")
        labels = labels.long()
        bad = (labels < -1) | (labels >= self.num_classes)
        if bool(bad.any()):
            if self.num_classes == 0:
                hint = (
                    "this model is unconditional (num_classes=0), so only -1 (unconditional) is allowed; set "
                    "`num_classes` in the config to train or use a class-conditional model"
                )
            else:
                hint = f"this model has num_classes={self.num_classes}"
            allowed = f"-1 (unconditional) or in [0, {self.num_classes - 1}]" if self.num_classes else "-1"
            raise ValueError(
                f"class_labels must be {allowed}; got {int(labels[bad][0])} ({int(bad.sum())} out of range): {hint}."
            )
        slots = labels + (labels >= FAKE_CLASS_SLOT).long()  # step over the fake label's slot
        slots = torch.where(labels < 0, torch.full_like(slots, FAKE_CLASS_SLOT), slots)
        return self.codebook_size + slots
