"""The STAMP vocabulary additions."""

from tokenizers import AddedToken

from .configuration_stamp import STAMP_TOKENS


def add_stamp_tokens(tokenizer) -> dict[str, int]:
    """Append `<|seg|>`, `<|mask|>`, `<|yes|>`, `<|no|>` (in that order) as special tokens; return their ids.

    Tokens the tokenizer already has keep their ids, so a released STAMP tokenizer is left as it is.
    """
    missing = [token for token in STAMP_TOKENS if token not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing], special_tokens=True)
    return {token: tokenizer.convert_tokens_to_ids(token) for token in STAMP_TOKENS}
