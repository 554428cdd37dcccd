"""The bundled demo model: a small STAMP trained on synthetic shapes (see its card, demo_model/README.md), so that
`stamp-hf segment`, the examples and the tests run offline out of the box. Its files are the folder of the same name
next to this module (package data); the kit that built it is stamp_hf.synthetic. (The web demo, `stamp-hf demo`, is
stamp_hf.webdemo.)"""

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"


def load_demo_model(device=None):
    """The demo model (eval mode, on `device`) and its processor, as `from_pretrained` gives them."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(DEMO_MODEL, trust_remote_code=True).eval()
    return (model.to(device) if device is not None else model), AutoProcessor.from_pretrained(
        DEMO_MODEL, trust_remote_code=True
    )


__all__ = ["DEMO_MODEL", "load_demo_model"]
