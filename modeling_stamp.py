"""STAMP: transformers' Qwen2-VL (`STAMPModel`), Qwen2.5-VL (`STAMPQwen2_5_VLModel`) or Qwen3-VL
(`STAMPQwen3VLModel`, `STAMPQwen3VLMoeModel`) with STAMP's all-mask prediction head. Each is the backbone's own class
plus `STAMPMixin`, the one implementation of everything below (Qwen3-VL adds its DeepStack: `DeepStackMixin`).

Phase 1 is ordinary generation. Phase 2 decodes every `<|seg|>` of a response in one language-model forward on the
phase-1 cache: each `<|seg|>` gets N `<|mask|>` placeholders (N = merged patches of its image), placeholder j embedded
as embed(`<|mask|>`) + merged image feature j, positioned right after its `<|seg|>`, attending causally to the history
up to and including that `<|seg|>` and bidirectionally to its own N placeholders. A Linear(hidden, 1) classifier on the
final-norm hidden states gives one logit per patch.

Hub remote code: imports only torch, transformers, safetensors (which transformers requires) and the other
`*_stamp.py` files.
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    BaseModelOutputWithDeepstackFeatures,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration
from transformers.generation import GenerationMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.utils import ModelOutput, logging

from .configuration_stamp import STAMPConfig, STAMPQwen2_5_VLConfig, STAMPQwen3VLConfig, STAMPQwen3VLMoeConfig
from .pipeline_stamp import PIPELINE_TASK, STAMPSegmentationPipeline, register_pipeline
from .processing_stamp import upsample_mask_logits

logger = logging.get_logger(__name__)

# Released STAMP checkpoints (and Qwen2-VL ones) carry the legacy Qwen2-VL keys (`model.layers.*`, `visual.*`).
# transformers renames them for its own Qwen2-VL class only, not for a subclass defined outside it: give the "stamp"
# model types the same renaming, so `from_pretrained` (and peft's adapter loading) accepts both layouts. Qwen3-VL-MoE
# repos keep their experts' weights transposed against transformers 5's layout: the same applies to its converter.
for _stamp_type, _backbone in (
    (STAMPConfig.model_type, "Qwen2VLForConditionalGeneration"),
    (STAMPQwen2_5_VLConfig.model_type, "Qwen2_5_VLForConditionalGeneration"),
    (STAMPQwen3VLMoeConfig.model_type, "qwen3_vl_moe"),
):
    register_checkpoint_conversion_mapping(_stamp_type, get_checkpoint_conversion_mapping(_backbone), overwrite=True)


def readable_like_user_files(folder, pattern: str) -> None:
    """Give the files `pattern` matches in `folder` the mode any file the user writes gets (0666 less the umask):
    safetensors 0.8 writes 0600, which other users of a shared machine cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).glob(pattern):
        os.chmod(path, 0o666 & ~mask)

@dataclass
class STAMPOutput(ModelOutput):
    """
    loss: text_loss_weight * text_loss + mask_loss (whichever were computed).
    text_loss: next-token cross-entropy on `labels`.
    mask_loss: bce_loss_weight * BCE + dice_loss_weight * Dice over the patch logits of every `<|seg|>`.
    logits: (batch, seq_len, vocab) language-model logits.
    mask_logits: a list per sample of (h, w) patch-logit grids, one per `<|seg|>` in the sequence.
    """

    loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask_logits: list[list[torch.FloatTensor]] | None = None


@dataclass
class STAMPGenerateOutput(ModelOutput):
    """
    sequences: (batch, seq_len) prompt + response ids, as `generate` returns them.
    seg_positions: a list per sample of the indices in `sequences` of each `<|seg|>` of the response.
    seg_images: a list per sample of the image each `<|seg|>` masks (the last one before it), as its index among that
        sample's images (0 = its first).
    mask_logits: a list per sample of (h, w) patch-logit grids, one per `<|seg|>`; foreground is logit > 0.
    cache: the key/value cache of the whole of `sequences` (the state phase 1 left it in, plus the last token),
        ready for a follow-up turn.
    scores / logits: as `generate` returns them when asked (`output_scores`, `output_logits`).
    """

    sequences: torch.LongTensor | None = None
    seg_positions: list[list[int]] | None = None
    seg_images: list[list[int]] | None = None
    mask_logits: list[list[torch.FloatTensor]] | None = None
    cache: Cache | None = None
    scores: tuple | None = None
    logits: tuple | None = None


@dataclass
class _SegQuery:
    """One `<|seg|>` to decode: its row, its index in the sequence, its M-RoPE position and the image it masks."""

    row: int
    index: int
    position: int
    image: int


class STAMPMixin:
    """STAMP on a Qwen-VL backbone: the classifier, the mask loss, phase 2 and the helpers. A concrete class puts it
    before the backbone's `...ForConditionalGeneration` (see `STAMPModel`, `STAMPQwen2_5_VLModel`)."""

    # Both losses take Trainer's batch-wide counts (`num_items_in_batch`, `num_masks_in_batch`), so accumulated and
    # multi-process batches give the full batch's loss. Qwen3-VL's class says False, which would make Trainer average
    # per-micro-batch means instead.
    accepts_loss_kwargs = True

    def __init__(self, config):
        super().__init__(config)
        self.classifier = nn.Linear(config.text_config.hidden_size, 1)
        self.post_init()
        self._route_attention()
        self.loss_type = "ForCausalLM"  # L_text; transformers finds no loss in the class name and would say so

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """transformers' switch (sdpa, eager, flash, ...); the language model keeps reaching it through STAMP's
        attention, so phase 2 still finds its block attention after a switch."""
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self._route_attention()

    def _route_attention(self) -> None:
        """Name the language model's kernel `stamp|<kernel>` (see `stamp_attention`): done when the model is built and
        after `set_attn_implementation`, never during a call, so callers on other threads always see one kernel."""
        text_config = self.model.language_model.config
        text_config._attn_implementation_internal = stamp_attention_name(text_config._attn_implementation or "sdpa")

    def configured_attention(self) -> str:
        """The kernel the language model runs outside phase 2 (sdpa, eager, flash_attention_2, ...)."""
        return configured_kernel(self.model.language_model.config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_pickle: bool = False, **kwargs):
        """Weights load only from safetensors: a checkpoint with only pickled weights (pytorch_model.bin, ...) is
        refused unless `allow_pickle=True` (unpickling can run code), and a truncated or corrupt safetensors file is a
        one-line OSError naming it, not a deep traceback."""
        if not allow_pickle:
            _refuse_pickled_only(pretrained_model_name_or_path)
            kwargs.setdefault("use_safetensors", True)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise OSError(f"{pretrained_model_name_or_path}: its safetensors weights are truncated or corrupt ({error})") from None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also makes the folder a "stamp-segmentation" pipeline: config.custom_pipelines names the pipeline class,
        and the relative import of pipeline_stamp above makes transformers copy that file with this one on save (and
        fetch it with this one on a remote-code load, so a model loaded from the Hub saves it again)."""
        self.config.custom_pipelines = {PIPELINE_TASK: STAMPSegmentationPipeline.custom_pipeline_entry()}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        readable_like_user_files(save_directory, "*.safetensors")
        return result

    # ------------------------------------------------------------------ training / teacher-forced forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        mask_labels: list | None = None,
        **kwargs,
    ):
        r"""
        Without `mask_labels` this is Qwen2-VL's forward (generation uses it): `loss` is L_text when `labels` are given.

        mask_labels (`list`, one entry per sample): for each `<|seg|>` of the sample, in order, a binary
            ground-truth mask of any resolution (a (num_seg, H, W) tensor or a list of (H, W) tensors). It is resized
            to the patch grid of the `<|seg|>`'s image by area (or the logits are upsampled to it, with
            `config.mask_loss_resolution="image"`) and thresholded at 0.5 (kept as the foreground fraction with
            `config.soft_mask_labels`). The sequence then runs once with every `<|seg|>`'s placeholders appended
            (the hybrid mask keeps text tokens causal and blind to them), and the output carries `mask_logits`,
            `text_loss`, `mask_loss` and `loss` = config.text_loss_weight * text_loss + mask_loss.
        """
        if mask_labels is None:
            fresh = cache is None or cache.get_seq_length() == 0
            if position_ids is None and input_ids is not None and fresh and _has_grids(image_grid_thw, video_grid_thw):
                # what the backbone would compute, without keeping its rope offset in self.model.rope_deltas
                position_ids = self._rope_positions(input_ids, mm_token_type_ids, image_grid_thw, attention_mask,
                                                    video_grid_thw)
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                logits_to_keep=logits_to_keep,
                mm_encoder_outputs=mm_encoder_outputs,
                **kwargs,
            )
        ignored = {"position_ids": position_ids, "cache": cache, "inputs_embeds": inputs_embeds, "use_cache": use_cache,
                   "pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid_thw,
                   "logits_to_keep": logits_to_keep or None}
        given = sorted(name for name, value in ignored.items() if value is not None)
        if given:
            raise TypeError(f"the teacher-forced mask forward (mask_labels given) does not take {given}")
        return self._mask_training_forward(
            input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, mm_encoder_outputs, labels,
            mask_labels, **kwargs,
        )

    def _mask_training_forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                               mm_encoder_outputs, labels, mask_labels, **loss_kwargs) -> "STAMPOutput":
        """The training step: text logits and every `<|seg|>`'s mask logits in one forward, and their losses."""
        if input_ids is None:
            raise ValueError("mask_labels need input_ids: the <|seg|> tokens are found in them")
        text_hidden, mask_logits = self._teacher_forced(
            input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, mm_encoder_outputs
        )
        logits = self.lm_head(text_hidden)
        num_masks_in_batch = loss_kwargs.pop("num_masks_in_batch", None)
        text_loss = None
        if labels is not None:
            text_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **loss_kwargs
            )
        mask_loss = self.mask_loss(mask_logits, mask_labels, num_masks_in_batch)
        loss = mask_loss if text_loss is None else self.config.text_loss_weight * text_loss + mask_loss
        return STAMPOutput(loss=loss, text_loss=text_loss, mask_loss=mask_loss, logits=logits, mask_logits=mask_logits)

    def mask_loss(self, mask_logits: list[list[torch.Tensor]], mask_labels: list, num_masks_in_batch=None) -> torch.Tensor:
        """bce_loss_weight * BCE + dice_loss_weight * Dice of every `<|seg|>`, averaged: over this batch's masks, or
        summed and divided by `num_masks_in_batch` (the masks of a whole accumulated, multi-process batch, as
        `num_items_in_batch` counts its label tokens for L_text), so accumulation gives the full batch's loss."""
        losses = []
        for row, (logits_row, labels_row) in enumerate(zip(mask_logits, mask_labels, strict=True)):
            if len(logits_row) != len(labels_row):
                raise ValueError(
                    f"sample {row} has {len(logits_row)} <|seg|> tokens but {len(labels_row)} mask labels"
                )
            for logits, label in zip(logits_row, labels_row):
                logits, target = self._loss_pair(logits, label)
                losses.append(bce_dice_loss(logits, target, self.config.bce_loss_weight, self.config.dice_loss_weight))
        if not losses:  # no <|seg|> in the batch: a zero that still reaches the classifier (DDP needs every grad)
            return self.classifier.weight.sum() * 0.0
        if num_masks_in_batch is None:
            return torch.stack(losses).mean()
        return torch.stack(losses).sum() / num_masks_in_batch

    def _loss_pair(self, logits: torch.Tensor, label) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) at the resolution config.mask_loss_resolution names, both float32."""
        label = torch.as_tensor(label)
        if self.config.mask_loss_resolution == "image" and label.ndim == 2:
            logits = upsample_mask_logits(logits, label.shape)
        target = mask_target(label, logits.shape, soft=self.config.soft_mask_labels)
        return logits.float(), target.to(logits.device)

    @torch.no_grad()
    def predict_masks(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        **training_targets,
    ) -> list[list[torch.Tensor]]:
        """Teacher-forced: the (h, w) mask logits of every `<|seg|>` already in the sequence, a list per sample.
        A training batch can be passed whole: its `labels` / `mask_labels` are ignored; any other key is an error."""
        unknown = sorted(set(training_targets) - {"labels", "mask_labels"})
        if unknown:
            raise TypeError(f"predict_masks() got unexpected argument(s) {unknown}")
        _, mask_logits = self._teacher_forced(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)
        return mask_logits

    def _teacher_forced(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, encoded=None):
        """One no-cache forward of the full sequence plus the placeholders of every `<|seg|>` in it."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        features = self._image_features(pixel_values, image_grid_thw, encoded)
        embeds = self.get_input_embeddings()(input_ids)
        image_tokens = None
        if features:
            image_tokens = input_ids == self.config.image_token_id
            patches = torch.cat([self._patch_features(feature) for feature in features])
            embeds = embeds.masked_scatter(image_tokens.unsqueeze(-1), patches.to(embeds.dtype))
        if mm_token_type_ids is None:
            mm_token_type_ids = self._mm_token_type_ids(input_ids)
        positions = self._rope_positions(input_ids, mm_token_type_ids, image_grid_thw, attention_mask)
        seg_indices = [torch.nonzero(row == self._token_id("seg")).flatten().tolist() for row in input_ids]
        queries = self._seg_queries(seg_indices, positions, mm_token_type_ids, self._images_per_row(mm_token_type_ids))
        return self._decode_placeholders(
            embeds, positions, attention_mask.bool(), queries, features, image_grid_thw, cache=None,
            text_image_tokens=image_tokens,
        )

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def generate_with_masks(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        max_placeholders_per_forward: int | None = None,
        image_features: list[torch.Tensor] | None = None,
        cache: Cache | None = None,
        **generate_kwargs,
    ) -> STAMPGenerateOutput:
        """
        Phase 1: `generate` with whatever arguments it takes (GenerationConfig, max_new_tokens, logits_processor,
        streamer, sampling, ...). Phase 2: the masks of every `<|seg|>` of the response, in one language-model forward
        on the phase-1 cache (split into forwards of at most `max_placeholders_per_forward` placeholders, whole
        `<|seg|>` blocks at a time, only if given, to bound memory). The vision tower runs once per image.

        A follow-up turn continues a conversation: `input_ids` = the whole conversation so far plus the new tokens,
        `cache` = the cache a previous call returned (only the uncached tokens run), `image_features` = the features
        kept from the first turn (as `encode_images` gives them) instead of `pixel_values`, so the image is not
        encoded again. The images must all lie in the cached part.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if mm_token_type_ids is None:
            mm_token_type_ids = self._mm_token_type_ids(input_ids)
        self.check_generation_inputs(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
                                      image_features)
        features = list(image_features) if image_features is not None else self._image_features(pixel_values, image_grid_thw)
        continuing = cache is not None and cache.get_seq_length() > 0
        encoded = None
        if features and not continuing:  # a continuation's image tokens are in the cache: nothing to scatter
            encoded = {"image": self._encoder_output(features)}
        for key in ("return_dict_in_generate", "use_cache"):
            if generate_kwargs.pop(key, True) is not True:
                logger.warning(f"generate_with_masks needs {key}=True; ignoring the value given")
        phase1 = self.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=encoded,
            cache=cache,
            return_dict_in_generate=True,
            use_cache=True,
            **generate_kwargs,
        )
        sequences = phase1.sequences
        repeats = sequences.shape[0] // input_ids.shape[0]  # num_return_sequences
        new_len = sequences.shape[1] - input_ids.shape[1]
        full_attention = torch.cat(
            [attention_mask.repeat_interleave(repeats, 0), attention_mask.new_ones(sequences.shape[0], new_len)], 1
        )
        full_types = torch.cat(
            [mm_token_type_ids.repeat_interleave(repeats, 0), mm_token_type_ids.new_zeros(sequences.shape[0], new_len)], 1
        )
        # images in the order of the (possibly repeated) rows
        row_images = [i for row in range(sequences.shape[0]) for i in self._images_per_row(mm_token_type_ids)[row // repeats]]
        masks = self.decode_masks(
            sequences,
            phase1.cache,
            image_features=[features[i] for i in row_images],
            image_grid_thw=image_grid_thw[row_images] if row_images else None,
            attention_mask=full_attention,
            mm_token_type_ids=full_types,
            response_start=input_ids.shape[1],
            max_placeholders_per_forward=max_placeholders_per_forward,
        )
        return STAMPGenerateOutput(
            sequences=sequences,
            seg_positions=masks.seg_positions,
            seg_images=masks.seg_images,
            mask_logits=masks.mask_logits,
            cache=masks.cache,
            scores=getattr(phase1, "scores", None),
            logits=getattr(phase1, "logits", None),
        )

    def check_generation_inputs(self, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
                                 image_features) -> None:
        """Refuse, before any compute, what generation would get wrong or fail on deep inside torch."""
        context = self.config.text_config.max_position_embeddings
        if input_ids.shape[1] > context:
            raise ValueError(f"the prompt is {input_ids.shape[1]} tokens, over the model's context of {context} tokens")
        if input_ids.shape[0] > 1 and not bool(attention_mask[:, -1].all()):
            rows = torch.nonzero(attention_mask[:, -1] == 0).flatten().tolist()
            raise ValueError(
                f"the batch is padded on the right (sample(s) {rows} end in padding), but generation continues on the "
                "right: pad on the left (processor.tokenizer.padding_side = 'left')"
            )
        images = sum(len(row) for row in self._images_per_row(mm_token_type_ids))
        described = 0 if image_grid_thw is None else len(image_grid_thw)
        if images != described:
            raise ValueError(
                f"the prompts hold {images} image(s) but image_grid_thw describes {described}: pass the processor's "
                "outputs for the whole batch (pixel_values and image_grid_thw of every prompt's images)"
            )
        if image_features is not None:
            if len(image_features) != images:
                raise ValueError(f"the prompts hold {images} image(s) but {len(image_features)} image_features were given")
            for feature in image_features:
                self._patch_features(feature)  # a backbone checks the layout of its features (Qwen3-VL: DeepStack)
        elif pixel_values is not None and image_grid_thw is not None:
            patches = int(image_grid_thw.prod(-1).sum())
            if pixel_values.shape[0] != patches:
                raise ValueError(
                    f"pixel_values hold {pixel_values.shape[0]} patches but image_grid_thw describes {patches}: pass "
                    "the processor's outputs unchanged"
                )
        elif images:
            raise ValueError(f"the prompts hold {images} image(s) but neither pixel_values nor image_features were given")

    @torch.no_grad()
    def decode_masks(
        self,
        sequences: torch.LongTensor,
        cache: Cache,
        image_features: list[torch.Tensor],
        image_grid_thw: torch.LongTensor | None,
        attention_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        response_start: int = 0,
        max_placeholders_per_forward: int | None = None,
    ) -> STAMPGenerateOutput:
        """
        Phase 2 alone: the masks of every `<|seg|>` at index >= `response_start` of `sequences`, read from `cache`,
        which holds the keys/values of (a prefix of) `sequences`; the tokens it lacks are run in the same forward and
        kept, the placeholders never enter it, so the cache ends up covering exactly `sequences`.

        image_features / image_grid_thw: the merged features (N_i, hidden) and grids of the images of `sequences`,
        row by row in order (as `get_image_features` returns them); no vision forward happens here.
        """
        if cache is None or cache.get_seq_length() == 0:
            raise ValueError("phase 2 reads the phase-1 cache, but the cache is empty (use_cache must stay on)")
        if cache.layers[0].keys.shape[0] != sequences.shape[0]:
            raise ValueError(
                "the cache does not line up with the sequences (beam search keeps every beam); use greedy decoding "
                "or sampling (num_return_sequences works), or predict_masks on the sequences"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(sequences)
        if mm_token_type_ids is None:
            mm_token_type_ids = self._mm_token_type_ids(sequences)
        positions = self._rope_positions(sequences, mm_token_type_ids, image_grid_thw, attention_mask)
        seg_indices = [
            (torch.nonzero(row[response_start:] == self._token_id("seg")).flatten() + response_start).tolist()
            for row in sequences
        ]
        image_rows = self._images_per_row(mm_token_type_ids)
        queries = self._seg_queries(seg_indices, positions, mm_token_type_ids, image_rows)
        seg_images = [[image_rows[q.row].index(q.image) for q in queries if q.row == row] for row in range(len(image_rows))]

        # Tokens the cache lacks (generate never feeds back the last one) go into the same forward as the placeholders.
        cached = cache.get_seq_length()
        embeds = self.get_input_embeddings()(sequences[:, cached:])
        mask_logits = [[] for _ in range(sequences.shape[0])]
        sizes = lambda query: self._num_placeholders(image_grid_thw[query.image])  # noqa: E731
        for chunk in _chunks(queries, max_placeholders_per_forward, sizes):
            _, chunk_logits = self._decode_placeholders(
                embeds, positions[:, :, cached:], attention_mask.bool(), chunk, image_features, image_grid_thw, cache
            )
            embeds = embeds[:, :0]  # the missing tokens are in the cache after the first forward
            cached = cache.get_seq_length()
            for row, grids in enumerate(chunk_logits):
                mask_logits[row].extend(grids)
        return STAMPGenerateOutput(
            sequences=sequences, seg_positions=seg_indices, seg_images=seg_images, mask_logits=mask_logits, cache=cache
        )

    # ------------------------------------------------------------------ phase 2, shared by every path

    def _decode_placeholders(self, text_embeds, text_positions, key_valid, queries, features, image_grid_thw, cache,
                             text_image_tokens=None):
        """
        One language-model forward of `text_embeds` (tokens not yet in `cache`) followed by the placeholders of
        `queries`. Returns the text tokens' final hidden states and a list per row of (h, w) mask-logit grids.

        text_embeds: (batch, T, hidden); text_positions: (3, batch, T); key_valid: (batch, cached + T) padding mask of
        the whole sequence. The cache, if any, gains the T text tokens and nothing else (placeholders never enter it).
        text_image_tokens: (batch, T) bool, where the text holds the image tokens of all of `features` (the
        teacher-forced path), or None (no image token among them).
        """
        layout = self._phase2_layout(text_embeds, key_valid, queries, image_grid_thw, cache)
        placeholder_embeds, placeholder_positions = self._placeholder_inputs(
            layout, queries, features, text_embeds, text_positions
        )
        inputs_embeds = torch.cat([text_embeds, placeholder_embeds], 1)
        visual_inputs = self._phase2_visual_inputs(layout, queries, features, text_image_tokens)
        hidden_states = self._run_phase2(
            inputs_embeds, torch.cat([text_positions, placeholder_positions], 2), layout, **visual_inputs
        )
        text_hidden, placeholder_hidden = hidden_states.split([layout.text_len, layout.width], 1)
        return text_hidden, self._classify_blocks(placeholder_hidden, layout, queries, image_grid_thw)

    def _phase2_layout(self, text_embeds, key_valid, queries, image_grid_thw, cache) -> "Phase2Layout":
        """Where each `<|seg|>`'s block sits among the placeholders, what it may see, and the text tokens' own mask."""
        batch, text_len, _ = text_embeds.shape
        cached = cache.get_seq_length() if cache is not None else 0
        blocks, used = [], [0] * batch
        for query in queries:
            size = self._num_placeholders(image_grid_thw[query.image])
            blocks.append(PlaceholderBlock(query.row, used[query.row], size, query.index + 1))
            used[query.row] += size
        kernel = "eager" if self.configured_attention() == "eager" else "sdpa"
        key_valid = key_valid[:, : cached + text_len]
        return Phase2Layout(
            text_len=text_len,
            width=max(used, default=0),
            blocks=blocks,
            key_valid=key_valid,
            text_mask=kernel_mask(self._text_allowed(key_valid, text_len), text_embeds.dtype, kernel),
            kernel=kernel,
            causal_placeholders=self.config.placeholder_attention == "causal",
            cache=cache,
        )

    @staticmethod
    def _text_allowed(key_valid, text_len) -> torch.Tensor:
        """(batch, 1, T, cached + T): the text tokens' causal padding mask; left-padding rows see themselves (their
        output is never used) so that no query row is empty."""
        keys = key_valid.shape[1]
        cached = keys - text_len
        rows = torch.arange(cached, keys, device=key_valid.device)
        allowed = (rows[:, None] >= torch.arange(keys, device=key_valid.device)[None, :])[None] & key_valid[:, None, :]
        diagonal = torch.arange(text_len, device=key_valid.device)
        allowed[:, diagonal, cached + diagonal] |= ~allowed.any(-1)
        return allowed[:, None]

    def _placeholder_inputs(self, layout, queries, features, text_embeds, text_positions):
        """(batch, width, hidden) embeddings embed(`<|mask|>`) + patch feature and (3, batch, width) positions
        continuing after each `<|seg|>`; slots past a row's last block stay zero and are never read."""
        batch, _, hidden = text_embeds.shape
        device, dtype = text_embeds.device, text_embeds.dtype
        mask_embed = self.get_input_embeddings().weight[self._token_id("mask")]
        embeds = text_embeds.new_zeros(batch, layout.width, hidden)
        positions = text_positions.new_zeros(3, batch, layout.width)
        for query, block in zip(queries, layout.blocks, strict=True):
            span = slice(block.start, block.start + block.size)
            patches = self._patch_features(features[query.image]).to(dtype) if self.config.fuse_patch_features else 0
            embeds[block.row, span] = mask_embed + patches
            positions[:, block.row, span] = query.position + 1 + torch.arange(block.size, device=device)
        return embeds, positions

    def _run_phase2(self, inputs_embeds, position_ids, layout, **visual_inputs) -> torch.Tensor:
        """The language model with STAMP's block attention: the layout travels to `stamp_attention` through the
        forward kwargs, so this call alone runs it; gradient checkpointing's recomputation gets the same kwargs.
        `visual_inputs`: what the backbone's language model takes besides (`_phase2_visual_inputs`)."""
        kernel = self.model.language_model.config._attn_implementation
        if not kernel.startswith(STAMP_ATTENTION_PREFIX):
            raise ValueError(
                f"the language model's attention is {kernel!r}, set on its config directly: phase 2 reaches its block "
                "attention through STAMP's; switch kernels with model.set_attn_implementation(...)"
            )
        outputs = self.model.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=self._PHASE2_NO_MASK,
            use_cache=False,
            stamp_layout=layout,
            **visual_inputs,
        )
        return outputs.last_hidden_state

    # the language model's attention_mask in phase 2: none to build, the layout decides (a dict of None masks makes
    # the Qwen2-VL text models skip building theirs)
    _PHASE2_NO_MASK = {"full_attention": None, "sliding_attention": None}

    def _phase2_visual_inputs(self, layout, queries, features, text_image_tokens) -> dict:
        """What the backbone's language model takes besides embeddings and positions in phase 2 (Qwen3-VL: its
        DeepStack features); nothing for Qwen2-VL and Qwen2.5-VL."""
        return {}

    def _classify_blocks(self, placeholder_hidden, layout, queries, image_grid_thw) -> list[list[torch.Tensor]]:
        """Classifier logits of each block, reshaped to its image's (h, w) mask grid, a list per row."""
        patch_logits = self.classifier(placeholder_hidden).squeeze(-1)  # (batch, width)
        mask_logits = [[] for _ in range(patch_logits.shape[0])]
        for query, block in zip(queries, layout.blocks, strict=True):
            grid = patch_logits[block.row, block.start : block.start + block.size]
            mask_logits[block.row].append(grid.reshape(self._mask_grid(image_grid_thw[query.image])))
        return mask_logits

    # ------------------------------------------------------------------ helpers

    def _rope_positions(self, input_ids, mm_token_type_ids, image_grid_thw, attention_mask, video_grid_thw=None):
        """(3, batch, seq_len) M-RoPE positions of a sequence with images, from the backbone's own rope index (by
        keyword: Qwen2.5-VL's takes second_per_grid_ts, for videos, before attention_mask). A pure function of its
        arguments: the offset the backbone would keep in `self.model.rope_deltas` is not kept."""
        if mm_token_type_ids is None:
            mm_token_type_ids = self._mm_token_type_ids(input_ids)
        return self.model.get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
        )[0]

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """generate's positions: the text row, then the M-RoPE rows of the whole sequence (cached part included),
        from this call's inputs alone. The backbone's version keeps the rope offset in `self.model.rope_deltas`, which
        every caller of the model shares, and reads it back when a call continues on a cache: with two callers at
        once, the other one's offset."""
        text_positions = GenerationMixin._prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs)
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] == 0:
            input_ids = inputs_tensor
        image_grid_thw, video_grid_thw = model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw")
        is_ids = input_ids.ndim == 2 and not input_ids.is_floating_point()
        if is_ids and _has_grids(image_grid_thw, video_grid_thw):
            rope = self._rope_positions(input_ids, model_kwargs.get("mm_token_type_ids"), image_grid_thw,
                                        model_kwargs.get("attention_mask"), video_grid_thw)
        else:
            rope = text_positions[None].expand(3, -1, -1)
        return torch.cat([text_positions[None], rope.to(text_positions.device)], 0)

    def _token_id(self, name: str) -> int:
        token_id = getattr(self.config, f"{name}_token_id")
        if token_id is None:
            raise ValueError(
                f"config.{name}_token_id is not set: call config.set_stamp_token_ids(tokenizer) after adding the "
                "STAMP tokens to the tokenizer"
            )
        return token_id

    def encode_images(self, pixel_values, image_grid_thw) -> list[torch.Tensor]:
        """The vision tower's features of each image, as `generate_with_masks(image_features=...)` takes them for a
        follow-up turn: (N_i, hidden) merged patch features (Qwen2-VL, Qwen2.5-VL), or (1 + DeepStack levels, N_i,
        hidden) on Qwen3-VL (see `_patch_features`)."""
        return self._image_features(pixel_values, image_grid_thw)

    def _image_features(self, pixel_values, image_grid_thw, encoded=None) -> list[torch.Tensor]:
        """Image features, one tensor per image (see `encode_images`); the vision tower runs here and only here."""
        if encoded is not None and encoded.get("image") is not None:
            return self._features_of(encoded["image"])
        if pixel_values is None:
            return []
        if image_grid_thw is None:
            raise ValueError("pixel_values were given without image_grid_thw; pass the processor's outputs unchanged")
        return self._features_of(self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True))

    # How a backbone's image features travel: `_features_of` (the vision tower's output -> one tensor per image),
    # `_encoder_output` (back, as phase 1's precomputed mm_encoder_outputs) and `_patch_features` (the merged patch
    # features of one image, (N, hidden)). Qwen2-VL's are the merged patch features alone.

    def _features_of(self, vision_output) -> list[torch.Tensor]:
        return list(vision_output.pooler_output)

    def _encoder_output(self, features) -> BaseModelOutputWithPooling:
        return BaseModelOutputWithPooling(pooler_output=tuple(features))

    def _patch_features(self, feature) -> torch.Tensor:
        return feature

    def _mm_token_type_ids(self, input_ids):
        types = torch.zeros_like(input_ids)  # long, as the processor makes them
        types[input_ids == self.config.image_token_id] = 1
        types[input_ids == self.config.video_token_id] = 2
        return types

    @staticmethod
    def _images_per_row(mm_token_type_ids) -> list[list[int]]:
        """Global indices (into image_grid_thw) of the images of each row, in order: one per run of image tokens."""
        rows, next_image = [], 0
        for row in mm_token_type_ids:
            is_image = (row == 1).int()
            starts = int((is_image[1:] > is_image[:-1]).sum() + is_image[0])
            rows.append(list(range(next_image, next_image + starts)))
            next_image += starts
        return rows

    @staticmethod
    def _seg_queries(seg_indices, positions, mm_token_type_ids, image_rows) -> list[_SegQuery]:
        """Pair each `<|seg|>` with the last image before it (its mask is predicted on that image's patch grid)."""
        queries = []
        for row, indices in enumerate(seg_indices):
            if not indices:
                continue
            is_image = mm_token_type_ids[row] == 1
            image_starts = torch.nonzero(is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])).flatten()
            for index in indices:
                seen = int((image_starts < index).sum())
                if seen == 0:
                    raise ValueError(
                        f"<|seg|> at position {index} of sample {row} has no image before it: STAMP predicts a mask "
                        "over the patches of an image, so the conversation must contain one"
                    )
                queries.append(_SegQuery(row, index, int(positions[0, row, index]), image_rows[row][seen - 1]))
        return queries

    def _num_placeholders(self, grid_thw) -> int:
        return int(grid_thw.prod()) // self.config.vision_config.spatial_merge_size**2

    def _mask_grid(self, grid_thw) -> tuple[int, int]:
        merge = self.config.vision_config.spatial_merge_size
        return int(grid_thw[1]) // merge, int(grid_thw[2]) // merge


def _has_grids(image_grid_thw, video_grid_thw) -> bool:
    return image_grid_thw is not None or video_grid_thw is not None


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickled_only(source) -> None:
    """A local checkpoint folder whose weights are only pickles is refused with the reason (see from_pretrained)."""
    if not os.path.isdir(source):
        return
    names = sorted(os.listdir(source))
    if any(name.endswith(".safetensors") for name in names):
        return
    pickles = [name for name in names if name.endswith(PICKLED_WEIGHTS)]
    if pickles:
        raise OSError(
            f"{source}: holds only pickled weights ({', '.join(pickles)}); unpickling can run code, so STAMP loads "
            "safetensors only: convert them (stamp-hf convert --allow-pickle) or pass allow_pickle=True if you trust them"
        )


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 1.0, dice_weight: float = 1.0):
    """L_mask of one mask: bce_weight * BCE + dice_weight * Dice between logits and a target of the same shape."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs, target = logits.sigmoid().flatten(), target.flatten()
    dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
    return bce_weight * bce + dice_weight * dice


def mask_target(mask, size, soft: bool = False) -> torch.Tensor:
    """The loss target of a mask label: `area_fractions` at `size` (the patch grid, or the image the model sees),
    thresholded at 0.5 unless `soft`. A label already of that size may itself hold fractions (what the training
    dataset passes)."""
    fractions = area_fractions(mask, size)
    return fractions.clamp(0, 1) if soft else (fractions >= 0.5).float()


def area_fractions(mask, size) -> torch.Tensor:
    """A 2D mask of any size resized by area to `size` (h, w): each cell's foreground fraction (float32)."""
    mask = torch.as_tensor(mask).float()
    if mask.ndim != 2:
        raise ValueError(f"a mask label must be a 2D (height, width) array, got shape {tuple(mask.shape)}")
    if tuple(mask.shape) != tuple(size):
        mask = F.interpolate(mask[None, None], size=tuple(size), mode="area")[0, 0]
    return mask


def _chunks(queries, limit, size):
    """Split `queries` into runs of at most `limit` placeholders (whole `<|seg|>` blocks; all at once if None)."""
    if limit is None:
        yield queries
        return
    chunk, used = [], 0
    for query in queries:
        n = size(query)
        if chunk and used + n > limit:
            yield chunk
            chunk, used = [], 0
        chunk.append(query)
        used += n
    yield chunk


# ---------------------------------------------------------------------- phase 2's block attention

STAMP_ATTENTION_PREFIX = "stamp|"  # the language model's kernel is named "stamp|<configured kernel>"


def stamp_attention_name(kernel: str) -> str:
    """The registered name of STAMP's attention over `kernel` ("sdpa" -> "stamp|sdpa"), registered with transformers'
    AttentionInterface (and its mask function, so masks are built as for `kernel`) on first use: when a model is
    built or `set_attn_implementation` runs, never during a call."""
    if kernel.startswith(STAMP_ATTENTION_PREFIX):
        return kernel
    name = STAMP_ATTENTION_PREFIX + kernel
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, stamp_attention)
        if kernel in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[kernel])
    return name


def configured_kernel(config) -> str:
    """The kernel a (text) config names, without STAMP's prefix: what runs outside phase 2."""
    return (config._attn_implementation or "sdpa").removeprefix(STAMP_ATTENTION_PREFIX)


def stamp_attention(module, query, key, value, attention_mask, stamp_layout=None, **kwargs):
    """
    The language model's attention function: phase 2's block attention when the call carries a layout
    (`stamp_layout=`, which only `_run_phase2` passes), otherwise the configured kernel unchanged (sdpa, eager, flash,
    ...; eager is the backbone's own function). The choice is made per call from the call's own arguments, so
    callers on other threads, and gradient checkpointing's recomputation, each get the right one.
    """
    if stamp_layout is not None:  # the layout brings its own implementation (a remote-code copy may be another version)
        return stamp_layout.attend(module, query, key, value, kwargs.get("scaling"))
    kernel = configured_kernel(module.config)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(kernel, eager)(module, query, key, value, attention_mask, **kwargs)


@dataclass
class PlaceholderBlock:
    """The N placeholders of one `<|seg|>`: its row, its offset among that row's placeholders, N, and how many keys
    of the sequence it attends to (everything up to and including its `<|seg|>`)."""

    row: int
    start: int
    size: int
    prefix: int


@dataclass
class Phase2Layout:
    """What `block_attention` needs beyond query/key/value: it reaches every attention layer through the forward
    kwargs (`stamp_layout=`). The language model's input is T text tokens, then `width` placeholder slots per row."""

    text_len: int
    width: int
    blocks: list[PlaceholderBlock]
    key_valid: torch.Tensor  # (batch, cached + T) bool: padding mask of the sequence
    text_mask: torch.Tensor  # (batch, 1, T, cached + T): causal padding mask of the text tokens (bool or additive)
    kernel: str  # "sdpa" or "eager": what the text tokens and the placeholder blocks attend with
    causal_placeholders: bool
    cache: Cache | None  # read in place; gains the T text tokens' keys/values
    _masks: dict = field(default_factory=dict, repr=False)  # dtype -> block_masks, shared by every layer

    def attend(self, module, query, key, value, scaling=None):
        return block_attention(module, query, key, value, self, scaling)

    def block_masks(self, dtype) -> list[torch.Tensor]:
        """Every block's mask (see block_mask), built once per forward, not once per layer."""
        if dtype not in self._masks:
            self._masks[dtype] = [self.block_mask(block, dtype) for block in self.blocks]
        return self._masks[dtype]

    def block_mask(self, block: PlaceholderBlock, dtype) -> torch.Tensor:
        """(1, 1, 1 or n, S + n) mask of one block over the sequence (S = cached + T keys) then its own keys: its
        prefix (less padding) and its block, all of it, or up to itself with causal placeholders."""
        length = self.key_valid.shape[1]
        sees = torch.cat([self.key_valid[block.row].clone(), self.key_valid.new_ones(block.size)])
        sees[block.prefix : length] = False
        allowed = sees[None, None, None]
        if self.causal_placeholders:
            own = torch.ones(block.size, block.size, dtype=torch.bool, device=sees.device).tril()
            allowed = torch.cat([sees[:length].expand(block.size, length), own], 1)[None, None]
        return kernel_mask(allowed, dtype, self.kernel)


def block_attention(module, query, key, value, layout: "Phase2Layout", scaling=None):
    """
    Phase 2's attention (reached through `stamp_attention`). The text tokens attend
    causally to the cache and to themselves; each `<|seg|>`'s placeholders attend to the sequence up to that `<|seg|>`
    and to their own block only, one block at a time: the sequence's keys are laid out once per layer with room for
    one block after them, each block writes its keys there, and a key mask of one row hides the text after its
    `<|seg|>`. No block sees (or pays for) another block's keys, the cache is not copied per block, and no mask or
    score matrix spans the blocks.

    query: (batch, heads, T + width, head_dim); key/value: (batch, kv_heads, T + width, head_dim), this forward's
    tokens only (the language model runs without a cache; the layout carries it). Returns (batch, T + width, heads,
    head_dim) and no weights, as transformers' attention functions do. Attention dropout is not applied.
    """
    scaling = module.scaling if scaling is None else scaling
    text_len = layout.text_len
    text_keys, text_values = key[:, :, :text_len], value[:, :, :text_len]
    if layout.cache is not None and text_len:
        text_keys, text_values = layout.cache.update(text_keys, text_values, module.layer_idx)
    elif layout.cache is not None:
        cached = layout.cache.layers[module.layer_idx]
        text_keys, text_values = cached.keys, cached.values
    output = query.new_zeros(query.shape)
    if text_len:
        output[:, :, :text_len] = _attend(
            query[:, :, :text_len], text_keys, text_values, layout.text_mask, scaling, layout.kernel
        )
    room = max((block.size for block in layout.blocks), default=0)
    keys, values = _SequenceThenBlock(text_keys, room), _SequenceThenBlock(text_values, room)
    for block, mask in zip(layout.blocks, layout.block_masks(query.dtype), strict=True):
        span = slice(text_len + block.start, text_len + block.start + block.size)
        row = slice(block.row, block.row + 1)
        output[row, :, span] = _attend(
            query[row, :, span],
            keys.with_block(block.row, key[row, :, span]),
            values.with_block(block.row, value[row, :, span]),
            mask,
            scaling,
            layout.kernel,
        )
    return output.transpose(1, 2), None


class _SequenceThenBlock:
    """One row's keys (or values) of the sequence followed by one block's: the sequence is copied once per layer into
    a buffer with room for a block after it, and each block overwrites that room. With gradients on (training),
    autograd keeps every block's keys, so each block gets its own concatenation instead."""

    def __init__(self, sequence: torch.Tensor, room: int):
        self.sequence = sequence  # (batch, kv_heads, S, head_dim)
        self.buffer = None
        if room and not torch.is_grad_enabled():
            batch, heads, length, dim = sequence.shape
            self.buffer = sequence.new_empty(batch, heads, length + room, dim)
            self.buffer[:, :, :length] = sequence

    def with_block(self, row: int, block: torch.Tensor) -> torch.Tensor:
        """(1, kv_heads, S + n, head_dim): row `row` of the sequence, then `block` (1, kv_heads, n, head_dim)."""
        if self.buffer is None:
            return torch.cat([self.sequence[row : row + 1], block], 2)
        length, size = self.sequence.shape[2], block.shape[2]
        self.buffer[row : row + 1, :, length : length + size] = block
        return self.buffer[row : row + 1, :, : length + size]


def kernel_mask(allowed: torch.Tensor, dtype, kernel: str) -> torch.Tensor:
    """sdpa takes a boolean mask; eager math needs an additive one (a boolean mask is silently wrong there)."""
    if kernel == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _attend(query, key, value, mask, scaling, kernel):
    """Attention with the kernel the model is configured for (sdpa, or eager math with an additive mask); key/value
    may have fewer heads than query (grouped-query attention)."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    weights = (query @ key.transpose(-1, -2) * scaling + mask).softmax(-1, dtype=torch.float32)
    return weights.to(value.dtype) @ value



class DeepStackMixin:
    """What Qwen3-VL adds to STAMPMixin: DeepStack. Its vision tower also returns merged features of a few of its
    layers (`deepstack_features`), which the language model adds to the hidden states of the image tokens after its
    first layers. An image's features are kept as one (1 + levels, N, hidden) tensor: the merged patch features, then
    each level's; phase 1 gets them all precomputed, and in phase 2 each placeholder receives its patch's DeepStack
    features at the same layers as the patch's image token (`config.deepstack_placeholders`, default True)."""

    def _features_of(self, vision_output) -> list[torch.Tensor]:
        levels = vision_output.deepstack_features or []
        return [torch.stack(image) for image in zip(vision_output.pooler_output, *levels)]

    def _encoder_output(self, features) -> BaseModelOutputWithDeepstackFeatures:
        features = [self._checked_features(feature) for feature in features]
        levels = features[0].shape[0] - 1 if features else 0
        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(feature[0] for feature in features),
            deepstack_features=[tuple(feature[level] for feature in features) for level in range(1, levels + 1)],
        )

    def _patch_features(self, feature) -> torch.Tensor:
        return self._checked_features(feature)[0]

    def _checked_features(self, feature) -> torch.Tensor:
        levels = len(self.config.vision_config.deepstack_visual_indexes)
        if feature.ndim != 3 or feature.shape[0] != 1 + levels:
            raise ValueError(
                f"Qwen3-VL image features are (1 + {levels} DeepStack levels, N, hidden), as model.encode_images gives "
                f"them; got shape {tuple(feature.shape)}"
            )
        return feature

    # phase 2 needs no attention mask of the text model's making; a 4D one is taken as given, and this one is never
    # read (the layout decides)
    _PHASE2_NO_MASK = torch.ones(1, 1, 0, 0, dtype=torch.bool)

    def _phase2_visual_inputs(self, layout, queries, features, text_image_tokens) -> dict:
        """Qwen3-VL's DeepStack inputs of the phase-2 forward: `visual_pos_masks` (batch, T + width), where the text
        holds image tokens and, with config.deepstack_placeholders, every placeholder slot; `deepstack_visual_embeds`,
        per level the features of those positions in row-major order (a placeholder gets its patch's)."""
        batch = layout.key_valid.shape[0]
        device = layout.key_valid.device
        visual = torch.zeros(batch, layout.text_len + layout.width, dtype=torch.bool, device=device)
        pieces = [[] for _ in range(batch)]  # per row, (levels, n, hidden) features in sequence order
        if text_image_tokens is not None and bool(text_image_tokens.any()):
            visual[:, : layout.text_len] = text_image_tokens
            levels = torch.cat([self._checked_features(feature)[1:] for feature in features], 1)
            for row, part in enumerate(levels.split(text_image_tokens.sum(1).tolist(), 1)):
                pieces[row].append(part)
        if self.config.deepstack_placeholders:
            for query, block in zip(queries, layout.blocks, strict=True):  # a row's blocks come in slot order
                start = layout.text_len + block.start
                visual[block.row, start : start + block.size] = True
                pieces[block.row].append(self._checked_features(features[query.image])[1:])
        pieces = [piece for row in pieces for piece in row]
        if not pieces or pieces[0].shape[0] == 0:
            return {}
        return {"visual_pos_masks": visual, "deepstack_visual_embeds": list(torch.cat(pieces, 1).unbind(0))}


class STAMPModel(STAMPMixin, Qwen2VLForConditionalGeneration):
    """STAMP on transformers' Qwen2-VL (the released checkpoints)."""

    config_class = STAMPConfig
    config: STAMPConfig


class STAMPQwen2_5_VLModel(STAMPMixin, Qwen2_5_VLForConditionalGeneration):
    """STAMP on transformers' Qwen2.5-VL: the same head and phase 2; the vision tower (window attention) and the
    rope index are Qwen2.5-VL's own."""

    config_class = STAMPQwen2_5_VLConfig
    config: STAMPQwen2_5_VLConfig


class STAMPQwen3VLModel(DeepStackMixin, STAMPMixin, Qwen3VLForConditionalGeneration):
    """STAMP on transformers' Qwen3-VL: the same head and phase 2, with Qwen3-VL's vision tower, rope index
    (interleaved M-RoPE) and DeepStack (see `DeepStackMixin`)."""

    config_class = STAMPQwen3VLConfig
    config: STAMPQwen3VLConfig


class STAMPQwen3VLMoeModel(DeepStackMixin, STAMPMixin, Qwen3VLMoeForConditionalGeneration):
    """STAMP on transformers' Qwen3-VL-MoE: as `STAMPQwen3VLModel`, with mixture-of-experts MLPs."""

    config_class = STAMPQwen3VLMoeConfig
    config: STAMPQwen3VLMoeConfig


# STAMP model type -> class
STAMP_MODELS = {
    cls.config_class.model_type: cls
    for cls in (STAMPModel, STAMPQwen2_5_VLModel, STAMPQwen3VLModel, STAMPQwen3VLMoeModel)
}


def register_auto_classes() -> None:
    """Teach this process's Auto classes both STAMP model types (AutoConfig / AutoModel / AutoProcessor load a STAMP
    folder without trust_remote_code) and make `save_pretrained` write `auto_map` and the remote-code files, so the
    folder loads without this package. The installed package calls it when it imports this file."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .processing_stamp import STAMPProcessor

    for model_class in STAMP_MODELS.values():
        config_class = model_class.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
        AutoProcessor.register(config_class, STAMPProcessor, exist_ok=True)
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModel")
    STAMPProcessor.register_for_auto_class()


register_pipeline()  # pipeline(PIPELINE_TASK, model=<a loaded STAMP>) works without importing stamp_hf
if __name__.startswith("stamp_hf."):  # the installed package, not a Hub remote-code copy (that one comes with auto_map)
    register_auto_classes()

__all__ = [
    "STAMP_MODELS",
    "STAMPMixin",
    "STAMPModel",
    "STAMPQwen2_5_VLModel",
    "STAMPQwen3VLModel",
    "STAMPQwen3VLMoeModel",
    "STAMPOutput",
    "STAMPGenerateOutput",
    "bce_dice_loss",
    "area_fractions",
    "mask_target",
    "register_auto_classes",
]
