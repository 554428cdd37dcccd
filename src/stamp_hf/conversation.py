"""A multi-turn chat about one image that keeps the KV cache and the image features between turns.

Turn 1 encodes the image once and runs the prompt; every later turn appends only its own tokens (the closing of the
previous answer and the new user message) to the cached sequence, so neither the image nor earlier turns are
re-encoded, and a `<|seg|>` in a later answer attends to the whole conversation (it can segment something named
earlier). Masks come from `model.decode_masks` on the same cache.
"""

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .pipeline_stamp import _load_image, segmentation_result, split_by_sample

_SENTINEL = "\x00STAMP-USER-TEXT\x00"


class Conversation:
    """
    conversation = Conversation(model, processor, "photo.jpg")
    conversation.ask("What is in the picture?")            # {"text": ..., "masks": [...]} as the pipeline returns
    conversation.ask("Please segment the animal you named.")

    `history` holds the turns as text; `sequences` and `cache` the token ids and keys/values of the whole chat.
    """

    def __init__(self, model, processor, image, threshold=None, refiner=None):
        self.model, self.processor = model, processor
        self.image = _load_image(image)
        self.threshold, self.refiner = threshold, refiner
        self.history: list[dict] = []
        self.sequences = self.cache = self.mm_token_type_ids = None
        self.image_features = self.image_grid_thw = None
        self._closing, self._user_prefix, self._user_suffix = self._follow_up_template()

    @torch.no_grad()
    def ask(self, text: str, **generate_kwargs) -> dict:
        """The answer to `text` given everything said so far; generate arguments pass through."""
        model = self.model
        device = model.device
        if self.sequences is None:
            content = [{"type": "image", "image": self.image}, {"type": "text", "text": text}]
            inputs = self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="pt",
            ).to(device)
            self.image_grid_thw = inputs["image_grid_thw"]
            self.image_features = list(
                model.model.get_image_features(inputs["pixel_values"], self.image_grid_thw, return_dict=True).pooler_output
            )
            input_ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
            encoder_outputs = {"image": BaseModelOutputWithPooling(pooler_output=tuple(self.image_features))}
        else:
            new_ids = self._follow_up_ids(text).to(device)
            input_ids = torch.cat([self.sequences, new_ids], 1)
            types = torch.cat([self.mm_token_type_ids, torch.zeros_like(new_ids, dtype=self.mm_token_type_ids.dtype)], 1)
            encoder_outputs = None  # the image tokens are all in the cache already
        # generate keeps the M-RoPE offset of its last call in model.model.rope_deltas; clear it so that this chat's
        # positions are computed from its own sequence, whatever ran on the model in between
        model.model.rope_deltas = None
        for key in ("return_dict_in_generate", "use_cache", "cache"):
            generate_kwargs.pop(key, None)
        phase1 = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            image_grid_thw=self.image_grid_thw,
            mm_token_type_ids=types,
            mm_encoder_outputs=encoder_outputs,
            cache=self.cache,
            return_dict_in_generate=True,
            use_cache=True,
            **generate_kwargs,
        )
        sequences = phase1.sequences
        self.mm_token_type_ids = torch.cat([types, types.new_zeros(1, sequences.shape[1] - input_ids.shape[1])], 1)
        out = model.decode_masks(
            sequences, phase1.cache, image_features=self.image_features, image_grid_thw=self.image_grid_thw,
            mm_token_type_ids=self.mm_token_type_ids, response_start=input_ids.shape[1],
        )
        self.sequences, self.cache = sequences, out.cache
        (sample,) = split_by_sample(model, out, input_ids.shape[1], [[self.image]])
        result = segmentation_result(model, self.processor, sample, self.threshold, self.refiner)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": result["text"]}]
        return result

    def _follow_up_template(self) -> tuple[str, str, str]:
        """From the chat template: what closes an answer, and what goes before / after a follow-up user message."""
        render = lambda messages, **kw: self.processor.apply_chat_template(messages, tokenize=False, **kw)  # noqa: E731
        turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        before = render(turns)
        after = render(turns + [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True)
        if not after.startswith(before):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        closing = before[before.rindex("a") + 1 :]
        prefix, suffix = after[len(before) :].split(_SENTINEL)
        return closing, prefix, suffix

    def _follow_up_ids(self, text: str) -> torch.Tensor:
        """Token ids that close the last answer and add the user's `text` (control tokens typed in it stay text)."""
        tokenizer = self.processor.tokenizer
        closing = self._closing
        eos = tokenizer.eos_token
        if eos and closing.startswith(eos) and int(self.sequences[0, -1]) == tokenizer.convert_tokens_to_ids(eos):
            closing = closing[len(eos) :]  # generation stopped on the end-of-turn token: it is already there
        encode = lambda s, **kw: tokenizer(s, add_special_tokens=False, **kw)["input_ids"]  # noqa: E731
        ids = encode(closing + self._user_prefix) + encode(text, split_special_tokens=True) + encode(self._user_suffix)
        return torch.tensor([ids])

