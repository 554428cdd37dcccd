"""The STAMP vocabulary additions."""

from .configuration_stamp import STAMP_TOKENS


def add_stamp_tokens(tokenizer) -> dict[str, int]:
    """Append `<|seg|>`, `<|mask|>`, `<|yes|>`, `<|no|>` (in that order) as special tokens; return their ids.

    One `add_special_tokens` call, as the official training code makes it, so the tokens get the next ids in order
    and are listed as extra special tokens. The official call replaces that list; here it is extended, so the
    tokenizer's own special tokens (`<|vision_start|>`, ...) stay special. Tokens the tokenizer already has keep their
    ids, so a released STAMP tokenizer is left as it is.
    """
    missing = [token for token in STAMP_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return {token: tokenizer.convert_tokens_to_ids(token) for token in STAMP_TOKENS}
