"""STAMP configurations: a Qwen2-VL, Qwen2.5-VL or Qwen3-VL (dense or MoE) configuration plus the settings of STAMP's all-mask head.

The STAMP settings are defined once, in `STAMPConfigMixin`; `STAMPConfig` (Qwen2-VL, model type "stamp") and
`STAMPQwen2_5_VLConfig` (Qwen2.5-VL, model type "stamp_qwen2_5_vl"), `STAMPQwen3VLConfig` ("stamp_qwen3_vl") and
`STAMPQwen3VLMoeConfig` ("stamp_qwen3_vl_moe") add them to the backbone's own configuration.

Hub remote code: imports only transformers (and huggingface_hub, which it ships with).
"""

import re
from dataclasses import dataclass

import transformers

# The transformers releases this code is tested with: [floor, ceiling). Checked here, in the first remote-code file
# transformers loads, so an older or newer transformers says so in one line instead of failing deep inside a class.
TRANSFORMERS_FLOOR, TRANSFORMERS_CEILING = (5, 25), (6, 0)
TRANSFORMERS_RANGE = "transformers>={}.{},<{}".format(*TRANSFORMERS_FLOOR, TRANSFORMERS_CEILING[0])


def check_transformers_version(version: str | None = None) -> None:
    """ImportError (one line: what is needed, what is installed, the pip command) unless `version` (default: the
    installed transformers') is in the supported range."""
    version = transformers.__version__ if version is None else version
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if not TRANSFORMERS_FLOOR <= release < TRANSFORMERS_CEILING:
        raise ImportError(f"STAMP's model code needs {TRANSFORMERS_RANGE}, but transformers {version} is installed; "
                          f"install a supported one: pip install '{TRANSFORMERS_RANGE}'")


check_transformers_version()

from huggingface_hub.dataclasses import strict  # noqa: E402  (after the version check: older releases lack it)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig  # noqa: E402
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig  # noqa: E402
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeConfig  # noqa: E402

# Appended in this order after the Qwen2-VL vocabulary by the released checkpoints.
STAMP_TOKENS = ("<|seg|>", "<|mask|>", "<|yes|>", "<|no|>")
MASK_LOSS_RESOLUTIONS = ("patch", "image")


@dataclass(repr=False, eq=False, kw_only=True)
class STAMPConfigMixin:
    r"""
    Everything of the backbone's configuration (``text_config``, ``vision_config``, image token ids) plus:

    seg_token / mask_token / yes_token / no_token (`str`):
        The STAMP vocabulary additions. ``<|seg|>`` asks for a mask, ``<|mask|>`` is the phase-2 placeholder.
    seg_token_id / mask_token_id / yes_token_id / no_token_id (`int`):
        Their ids, read from the tokenizer with [`STAMPConfig.set_stamp_token_ids`], never assumed.
    min_placeholders / max_placeholders (`int`):
        Bounds on N, the number of merged image patches (= mask placeholders per ``<|seg|>``). The processor
        derives its min/max pixels from them. The paper uses 1024 to 1280.
    mask_threshold (`float`):
        A patch is foreground when its logit exceeds this value (0.0 in the paper).
    text_loss_weight (`float`):
        The training loss is text_loss_weight * L_text + L_mask (1.0 in the paper). Raising it gives the few tokens
        that decide an answer (a `<|seg|>` or "Sorry, there is no ...") more say against the many mask logits.
    bce_loss_weight / dice_loss_weight (`float`):
        L_mask = bce_loss_weight * BCE + dice_loss_weight * Dice over the patch logits.
    mask_loss_resolution (`str`):
        Where L_mask compares prediction and ground truth. "patch" (the paper): the mask label is resized by area to
        the patch grid. "image": the patch logits are upsampled bilinearly, exactly as `post_process_masks` does at
        inference, to the mask label's own resolution (the training dataset passes it at the resolution of the image
        the model sees), so training scores the masks that inference produces: edges can fall anywhere inside a cell
        instead of being tied to its foreground fraction, and coarse grids give much finer masks.
    soft_mask_labels (`bool`):
        False (the paper): a target is 1 where at least half of its cell (patch, or pixel at "image" resolution) is
        foreground. True: the target is that foreground fraction, so boundary cells learn intermediate logits and the
        bilinearly upsampled mask places edges inside cells instead of on cell borders.
    placeholder_attention (`str`):
        "bidirectional" (the paper): each placeholder sees all placeholders of its `<|seg|>`. "causal": only those
        before it (the paper's "w/o A_hyb" ablation).
    fuse_patch_features (`bool`):
        True (the paper): placeholder j is embed(`<|mask|>`) + merged patch feature j. False: embed(`<|mask|>`) alone
        (the paper's "w/o E_mask" ablation).
    """

    seg_token: str = STAMP_TOKENS[0]
    mask_token: str = STAMP_TOKENS[1]
    yes_token: str = STAMP_TOKENS[2]
    no_token: str = STAMP_TOKENS[3]
    seg_token_id: int | None = None
    mask_token_id: int | None = None
    yes_token_id: int | None = None
    no_token_id: int | None = None
    min_placeholders: int = 1024
    max_placeholders: int = 1280
    mask_threshold: float = 0.0
    text_loss_weight: float = 1.0
    bce_loss_weight: float = 1.0
    dice_loss_weight: float = 1.0
    mask_loss_resolution: str = "patch"
    soft_mask_labels: bool = False
    placeholder_attention: str = "bidirectional"
    fuse_patch_features: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not 0 < self.min_placeholders <= self.max_placeholders:
            raise ValueError(
                f"placeholder bounds must satisfy 0 < min_placeholders <= max_placeholders, "
                f"got {self.min_placeholders} and {self.max_placeholders}"
            )
        if self.mask_loss_resolution not in MASK_LOSS_RESOLUTIONS:
            raise ValueError(
                f"mask_loss_resolution must be one of {MASK_LOSS_RESOLUTIONS}, got {self.mask_loss_resolution!r}"
            )
        if self.placeholder_attention not in ("bidirectional", "causal"):
            raise ValueError(
                f"placeholder_attention must be 'bidirectional' or 'causal', got {self.placeholder_attention!r}"
            )

    def set_stamp_token_ids(self, tokenizer) -> None:
        """Read the ids of the four STAMP tokens from `tokenizer`; fail if it does not know one of them."""
        unknown = tokenizer.unk_token_id
        for name in ("seg", "mask", "yes", "no"):
            token = getattr(self, f"{name}_token")
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or (token_id == unknown and token != tokenizer.unk_token):
                raise ValueError(
                    f"the tokenizer has no {token!r} token; add the STAMP tokens {STAMP_TOKENS} "
                    "(stamp_hf.add_stamp_tokens) and resize the embeddings first"
                )
            setattr(self, f"{name}_token_id", token_id)


@strict
class STAMPConfig(STAMPConfigMixin, Qwen2VLConfig):
    """STAMP on Qwen2-VL: [`Qwen2VLConfig`] plus the STAMP settings of [`STAMPConfigMixin`]."""

    model_type = "stamp"


@strict
class STAMPQwen2_5_VLConfig(STAMPConfigMixin, Qwen2_5_VLConfig):
    """STAMP on Qwen2.5-VL: [`Qwen2_5_VLConfig`] plus the STAMP settings of [`STAMPConfigMixin`]."""

    model_type = "stamp_qwen2_5_vl"


@dataclass(repr=False, eq=False, kw_only=True)
class DeepStackConfigMixin:
    r"""
    deepstack_placeholders (`bool`):
        Qwen3-VL adds multi-level ViT features (DeepStack) to the hidden states of its first layers at the image
        tokens. True (the default): each mask placeholder, which stands for a patch, receives its patch's DeepStack
        features at the same layers, as the image token of that patch does. False: the placeholders get none (only
        embed(`<|mask|>`) + the merged patch feature at the input, as on Qwen2-VL).
    """

    deepstack_placeholders: bool = True


@strict
class STAMPQwen3VLConfig(DeepStackConfigMixin, STAMPConfigMixin, Qwen3VLConfig):
    """STAMP on Qwen3-VL: [`Qwen3VLConfig`] plus the STAMP settings of [`STAMPConfigMixin`] and
    `deepstack_placeholders` ([`DeepStackConfigMixin`])."""

    model_type = "stamp_qwen3_vl"


@strict
class STAMPQwen3VLMoeConfig(DeepStackConfigMixin, STAMPConfigMixin, Qwen3VLMoeConfig):
    """STAMP on Qwen3-VL-MoE: [`Qwen3VLMoeConfig`] plus the STAMP settings, as [`STAMPQwen3VLConfig`]."""

    model_type = "stamp_qwen3_vl_moe"


# backbone model type -> the STAMP configuration built on it
STAMP_CONFIGS = {
    "qwen2_vl": STAMPConfig,
    "qwen2_5_vl": STAMPQwen2_5_VLConfig,
    "qwen3_vl": STAMPQwen3VLConfig,
    "qwen3_vl_moe": STAMPQwen3VLMoeConfig,
}
STAMP_MODEL_TYPES = tuple(config.model_type for config in STAMP_CONFIGS.values())

__all__ = [
    "MASK_LOSS_RESOLUTIONS",
    "STAMPConfig",
    "STAMPConfigMixin",
    "STAMPQwen2_5_VLConfig",
    "STAMPQwen3VLConfig",
    "STAMPQwen3VLMoeConfig",
    "STAMP_CONFIGS",
    "STAMP_MODEL_TYPES",
    "STAMP_TOKENS",
    "TRANSFORMERS_RANGE",
    "check_transformers_version",
]
