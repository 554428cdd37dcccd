"""A multi-turn chat about one image that keeps the KV cache and the image features between turns.

Turn 1 encodes the image once and runs the prompt; every later turn appends only its own tokens (the closing of the
previous answer and the new user message) to the cached sequence, so neither the image nor earlier turns are
re-encoded, and a `<|seg|>` in a later answer attends to the whole conversation (it can segment something named
earlier). Each turn is one `model.generate_with_masks` call on the conversation's cache.
"""

import torch

from .pipeline_stamp import STAMPSegmentationPipeline, check_prompt, finish_results
from .processing_stamp import load_image, user_turn

_SENTINEL = "\x00STAMP-USER-TEXT\x00"


class Conversation:
    """
    conversation = Conversation(model, processor, "photo.jpg")
    conversation.ask("What is in the picture?")            # {"text": ..., "masks": [...]} as the pipeline returns
    conversation.ask("Please segment the animal you named.")

    `history` holds the turns as text; `sequences` and `cache` the token ids and keys/values of the whole chat.
    """

    def __init__(self, model, processor, image, threshold=None, refiner=None, resample=None, seed: int = 0,
                 sam_protocol: str | None = None):
        self.model, self.processor = model, processor
        self.image = load_image(image)
        self.threshold, self.refiner, self.resample, self.seed = threshold, refiner, resample, seed
        self.sam_protocol = sam_protocol
        self.history: list[dict] = []
        self.sequences = self.cache = self.mm_token_type_ids = None
        self.image_features = self.image_grid_thw = None
        self._closing, self._user_prefix, self._user_suffix = self._follow_up_template()

    @torch.no_grad()
    def ask(self, text: str, **generate_kwargs) -> dict:
        """The answer to `text` given everything said so far; generate arguments pass through (without a length
        limit, nor one in the model's generation config: the pipeline's, max_new_tokens=256)."""
        check_prompt(text)
        model = self.model
        limits = ("max_new_tokens", "max_length", "generation_config")
        if not any(key in generate_kwargs for key in limits) and model.generation_config.max_new_tokens is None:
            default = STAMPSegmentationPipeline._default_generation_config.max_new_tokens
            generate_kwargs["max_new_tokens"] = default
        if self.sequences is None:
            inputs, _ = self.processor.encode_chat([user_turn([self.image], text)])
            inputs = inputs.to(model.device)
            self.image_grid_thw = inputs["image_grid_thw"]
            self.image_features = model.encode_images(inputs["pixel_values"], self.image_grid_thw)
            input_ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
        else:
            new_ids = self._follow_up_ids(text).to(model.device)
            input_ids = torch.cat([self.sequences, new_ids], 1)
            types = torch.cat([self.mm_token_type_ids, torch.zeros_like(new_ids, dtype=self.mm_token_type_ids.dtype)], 1)
        for key in ("cache", "image_features", "pixel_values"):
            generate_kwargs.pop(key, None)
        out = model.generate_with_masks(
            input_ids=input_ids, image_grid_thw=self.image_grid_thw, mm_token_type_ids=types,
            image_features=self.image_features, cache=self.cache, **generate_kwargs,
        )
        self.sequences, self.cache = out.sequences, out.cache
        self.mm_token_type_ids = torch.cat([types, types.new_zeros(1, out.sequences.shape[1] - input_ids.shape[1])], 1)
        threshold = model.config.mask_threshold if self.threshold is None else self.threshold
        results = self.processor.post_process_generation(
            out, input_ids.shape[1], [[(self.image.height, self.image.width)]], threshold, self.resample,
            model.generation_config.eos_token_id,
        )
        (result,) = finish_results(results, [[self.image]], self.refiner, self.seed,
                                   self.sam_protocol or self.processor.sam_protocol)
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

