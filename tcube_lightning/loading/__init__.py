"""Loading the two CLIPs, one reader per source (see ``sources``): open_clip's own files and tags
(``openclip_files``), schema architectures (``architecture``: hf-hub:, local-dir:), transformers CLIPModel
folders (``transformers_clip``) and LoRA experts (``lora``: peft adapters, RobustMedCLIP checkpoints); files of
tensors are read by ``tensorfiles``."""

from tcube_lightning.loading.architecture import Architecture
from tcube_lightning.loading.lora import LoraAdapter
from tcube_lightning.loading.sources import LoadedModels, ModelPlan, load_clip, plan_models

__all__ = ["Architecture", "LoadedModels", "LoraAdapter", "ModelPlan", "load_clip", "plan_models"]
