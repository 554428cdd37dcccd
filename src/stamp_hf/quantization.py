"""Loading STAMP in lower precision for CPU inference.

bfloat16 needs nothing extra: `AutoModel.from_pretrained(folder, dtype=torch.bfloat16)`. int8 weight-only
quantization of the language model goes through transformers' TorchAoConfig with torchao (the `quant` extra):

    model = AutoModel.from_pretrained(folder, quantization_config=int8_language_model_config())
"""

# Module-name prefixes kept in float: the vision tower (its merged features become the placeholders' inputs), the
# mask classifier, and the vocabulary head (tied to the embeddings, from which the `<|mask|>` embedding is read).
KEEP_IN_FLOAT = ["model.visual", "classifier", "lm_head"]


def int8_language_model_config(**torchao_kwargs):
    """transformers' TorchAoConfig for torchao's Int8WeightOnlyConfig on the language model's linear layers only
    (per-channel int8 weights, activations in the model's float dtype); `torchao_kwargs` go to Int8WeightOnlyConfig."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as error:
        raise ImportError("int8 quantization needs torchao: pip install 'stamp-hf[quant]'") from error
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig(**torchao_kwargs), modules_to_not_convert=list(KEEP_IN_FLOAT))


__all__ = ["KEEP_IN_FLOAT", "int8_language_model_config"]
