# Copyright 2026 The mage-hf authors. MIT licence.
"""mage-hf: MAGE (MAsked Generative Encoder, CVPR 2023) as transformers models and diffusers pipelines.

Importing this package registers the MAGE classes with transformers' `Auto*` factories, so that
`AutoModel.from_pretrained(folder)` and `transformers.pipeline(..., model=folder)` work on converted folders.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)

from .configuration_mage import MageConfig, MageVQConfig
from .image_processing_mage import MageImageProcessor
from .modeling_mage import (
    MageContrastiveHead,
    MageForImageClassification,
    MageForMaskedImageModeling,
    MageMaskedImageModelingOutput,
    MageModel,
    MagePreTrainedModel,
)
from .modeling_mage_vq import MageVQEncoderOutput, MageVQModel
from .pipeline_mage import MageGenerationPipeline, MageInpaintPipeline, MagePipelineOutput
from .scheduling_mage import MageScheduler, MageSchedulerOutput
from .classifier_training import LARS, LinearProbeHead, fold_batchnorm_into_linear
from .vq_training import (
    CodebookUsageTracker,
    LPIPSPerceptualLoss,
    MageVQForTraining,
    MageVQTrainingOutput,
    PatchGANDiscriminator,
)

__version__ = "0.1.0"

__all__ = [
    "CodebookUsageTracker",
    "LARS",
    "LPIPSPerceptualLoss",
    "LinearProbeHead",
    "MageConfig",
    "MageContrastiveHead",
    "MageForImageClassification",
    "MageForMaskedImageModeling",
    "MageGenerationPipeline",
    "MageImageProcessor",
    "MageInpaintPipeline",
    "MageMaskedImageModelingOutput",
    "MageModel",
    "MagePipelineOutput",
    "MagePreTrainedModel",
    "MageScheduler",
    "MageSchedulerOutput",
    "MageVQConfig",
    "MageVQEncoderOutput",
    "MageVQForTraining",
    "MageVQModel",
    "MageVQTrainingOutput",
    "PatchGANDiscriminator",
    "fold_batchnorm_into_linear",
]

AutoConfig.register("mage", MageConfig, exist_ok=True)
AutoConfig.register("mage_vq", MageVQConfig, exist_ok=True)
AutoModel.register(MageConfig, MageModel, exist_ok=True)
AutoModel.register(MageVQConfig, MageVQModel, exist_ok=True)
AutoModelForImageClassification.register(MageConfig, MageForImageClassification, exist_ok=True)
AutoModelForMaskedImageModeling.register(MageConfig, MageForMaskedImageModeling, exist_ok=True)
AutoImageProcessor.register(MageConfig, image_processor_classes={"pil": MageImageProcessor}, exist_ok=True)
AutoImageProcessor.register(MageVQConfig, image_processor_classes={"pil": MageImageProcessor}, exist_ok=True)
