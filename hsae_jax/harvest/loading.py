"""Loading a Hugging Face model and tokenizer by hub name or local folder."""

from __future__ import annotations

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("harvesting from a Hugging Face model needs `transformers` and "
                          "`torch`: pip install 'hsae-jax[harvest]'") from None
    return transformers


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(name: str, revision: str = "main", gguf_file: str | None = None):
    """``AutoTokenizer.from_pretrained(name)``; errors name the argument."""
    transformers = _import_transformers()
    kwargs = {"revision": revision}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return transformers.AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer {name!r} (revision {revision!r}): could not load it: "
                         f"{str(err).splitlines()[0]}") from err


def load_model(name: str, revision: str = "main", *, dtype: str = "float32",
               device: str = "auto", gguf_file: str | None = None, causal_lm: bool = False):
    """The model in eval mode on ``device``: ``AutoModel`` (the transformer without a head:
    enough for activations) or, with ``causal_lm``, ``AutoModelForCausalLM``."""
    transformers = _import_transformers()
    import torch

    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"model dtype {dtype!r} must be one of {tuple(_TORCH_DTYPES)}")
    auto = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
    kwargs = {"revision": revision, "dtype": getattr(torch, _TORCH_DTYPES[dtype])}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        model = auto.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"model {name!r} (revision {revision!r}): could not load it: "
                         f"{str(err).splitlines()[0]}") from err
    return model.to(resolve_device(device)).eval()
