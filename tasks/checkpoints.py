"""Checkpoints: find a CLIP checkpoint, prove it is one, fingerprint it; load it, or its FP8 version.

Sources: ``embedded:tiny-clip-shapes`` (shipped with the package), a local transformers directory,
a Hugging Face Hub id (optionally pinned with ``model.revision``), or an open_clip model converted to
a transformers directory (``clip_fp8.tasks.openclip``). Safetensors only and ``trust_remote_code``
off: a checkpoint is data, never code.

Attention: CLIP's SDPA path is a functional call that ModelOpt's module walk cannot see. ModelOpt's
Hugging Face plugin replaces ``CLIPAttention`` with a quantized attention (``q/k/v_bmm_quantizer``
around the SDPA call, ``p_bmm_quantizer`` for the softmax output); it is registered explicitly, before
quantizing and before every restore, because a restore without it fails or silently drops attention.
"""

from __future__ import annotations

import json
from pathlib import Path

from clip_fp8 import ASSETS_DIR
from clip_fp8.artifacts import ArtifactRef, sha256_tree
from clip_fp8.model_locks import CLIP_FORWARD_LOCK, MODELOPT_LOCK, clip_model_construction
from clip_fp8.config import ModelConfig
from clip_fp8.devices import pick_device
from clip_fp8.errors import PipelineInputError
from clip_fp8.stage import Reads

EMBEDDED_MODELS = {"tiny-clip-shapes": ASSETS_DIR / "tiny-clip-shapes"}
CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".txt", ".model")


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as exc:  # offline, unknown id, gated: all need the same user action
        raise PipelineInputError(
            f"model.source '{repo_id}' (revision {revision or 'main'}) could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}); on a connected machine run `huggingface-cli download {repo_id} "
            f"--local-dir DIR` and pass model.source=DIR"
        ) from None


def _resolved_revision(path: Path) -> str | None:
    """The commit a Hub snapshot resolved to (``.../snapshots/<commit>``), recorded when none was pinned."""
    return path.name if path.parent.name == "snapshots" else None


def resolve_model_source(cfg: ModelConfig) -> ArtifactRef:
    """Locate the checkpoint and fingerprint its content; raise one clear line if it cannot be a CLIP."""
    source = cfg.source
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
        if name not in EMBEDDED_MODELS:
            raise PipelineInputError(f"model.source '{source}': unknown embedded model (known: {', '.join(EMBEDDED_MODELS)})")
        path = EMBEDDED_MODELS[name]
    elif source.startswith("open_clip:"):
        from clip_fp8.tasks.openclip import convert

        path = convert(source.split(":", 1)[1], cfg.pretrained, cfg.allow_pickle)
    elif Path(source).expanduser().is_dir():
        path = Path(source).expanduser().resolve()
    elif _looks_like_hub_id(source):
        path = _download_from_hub(source, cfg.revision)
    else:
        raise PipelineInputError(
            f"model.source '{source}' is neither an existing directory nor a Hub id (org/name); pass a transformers "
            f"CLIP directory, a Hub id, `open_clip:<name or config JSON>` or one of "
            + ", ".join(f"'embedded:{name}'" for name in EMBEDDED_MODELS)
        )

    config_file = path / "config.json"
    if not config_file.is_file():
        raise PipelineInputError(f"model.source '{source}' has no config.json: not a transformers checkpoint")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "clip":
        raise PipelineInputError(
            f"model.source '{source}' is a '{model_type}' checkpoint, not CLIP (config.json model_type must be 'clip')"
        )
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found pickle weights {pickles}: convert them to safetensors)" if pickles else ""
        raise PipelineInputError(f"model.source '{source}' has no .safetensors weights{hint}")

    files = [p for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
    return ArtifactRef(
        stage="model_source",
        path=str(path),
        digest=sha256_tree(path, files),
        files={p.name: p.name for p in files},
        meta={"source": source, "revision": cfg.revision, "resolved_revision": _resolved_revision(path),
              "pretrained": cfg.pretrained},
    )


# What a stage that loads the model reads of model.*: where and in what precision (the checkpoint arrives as a ref).
ModelSettings = Reads[ModelConfig, "device", "dtype"]


def pick_dtype(cfg: ModelConfig, device: str):
    import torch

    if cfg.dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_clip(path: str | Path, cfg: ModelConfig, attn_implementation: str = "sdpa"):
    """Load a ``CLIPModel`` in eval mode on the configured device and dtype."""
    from transformers import CLIPModel

    device = pick_device(cfg)
    with clip_model_construction():
        model = CLIPModel.from_pretrained(
            str(path), dtype=pick_dtype(cfg, device), attn_implementation=attn_implementation,
            use_safetensors=True, trust_remote_code=False,
        )
    return model.eval().to(device)


def load_processor(path: str | Path):
    from transformers import CLIPProcessor

    return CLIPProcessor.from_pretrained(str(path))


def register_quantized_attention(model) -> None:
    """Swap ``CLIPAttention`` for ModelOpt's quantized attention (must precede quantize and restore)."""
    from modelopt.torch.quantization.plugins.huggingface import register_hf_attentions_on_the_fly

    with MODELOPT_LOCK:
        register_hf_attentions_on_the_fly(model)


def load_quantized(checkpoint: str | Path, model_cfg: ModelConfig, attn_implementation: str = "sdpa"):
    """Restore the fake-quantized model from a checkpoint written by the quantize stage."""
    import modelopt.torch.opt as mto
    import torch
    from transformers import CLIPConfig, CLIPModel

    # The quantized-attention class must be registered before from_pretrained restores modelopt_state.
    config = CLIPConfig.from_pretrained(str(checkpoint))
    config._attn_implementation = attn_implementation
    with clip_model_construction(), torch.device("meta"):  # structure only: no weights for the registration walk
        register_quantized_attention(CLIPModel(config))
    device = pick_device(model_cfg)
    with CLIP_FORWARD_LOCK, MODELOPT_LOCK:  # this order everywhere: an export holds the first, then restores
        mto.enable_huggingface_checkpointing()
        model = CLIPModel.from_pretrained(
            str(checkpoint), dtype=pick_dtype(model_cfg, device), attn_implementation=attn_implementation,
            use_safetensors=True, trust_remote_code=False,
        )
    return model.eval().to(device)


def load_variant(variant: str, model_source: str | Path, checkpoint: str | Path | None, model_cfg: ModelConfig):
    """The baseline for ``fp16``, the fake-quantized model for ``fp8``."""
    return load_clip(model_source, model_cfg) if variant == "fp16" else load_quantized(checkpoint, model_cfg)
