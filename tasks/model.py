"""Baseline model: find a CLIP checkpoint, prove it is one, fingerprint it, load it.

Sources: ``embedded:tiny-clip-shapes`` (shipped with the package), a local transformers directory,
a Hugging Face Hub id (optionally pinned with ``model.revision``), or an open_clip model converted to
a transformers directory (``tasks.openclip``). Safetensors only and
``trust_remote_code`` off: a checkpoint is data, never code.
"""

from __future__ import annotations

import json
from pathlib import Path

from clip_fp8 import ASSETS_DIR
from clip_fp8.artifacts import ArtifactRef, sha256_tree
from clip_fp8.config import ModelConfig
from clip_fp8.errors import PipelineInputError

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
        from tasks.openclip import convert

        path = convert(source.split(":", 1)[1], cfg.pretrained, cfg.allow_pickle)
    elif Path(source).expanduser().is_dir():
        path = Path(source).expanduser().resolve()
    elif _looks_like_hub_id(source):
        path = _download_from_hub(source, cfg.revision)
    else:
        raise PipelineInputError(
            f"model.source '{source}' is neither an existing directory nor a Hub id (org/name); "
            "pass a transformers CLIP directory or a Hub id"
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


def pick_device(cfg: ModelConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PipelineInputError("model.device 'cuda' was asked for but no CUDA device is visible; use model.device=auto")
    return cfg.device


def pick_dtype(cfg: ModelConfig, device: str):
    import torch

    if cfg.dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_clip(path: str | Path, cfg: ModelConfig, attn_implementation: str = "sdpa"):
    """Load a ``CLIPModel`` in eval mode on the configured device and dtype."""
    from transformers import CLIPModel

    device = pick_device(cfg)
    model = CLIPModel.from_pretrained(
        str(path), dtype=pick_dtype(cfg, device), attn_implementation=attn_implementation,
        use_safetensors=True, trust_remote_code=False,
    )
    return model.eval().to(device)


def load_processor(path: str | Path):
    from transformers import CLIPProcessor

    return CLIPProcessor.from_pretrained(str(path))


def describe_baseline(source: ArtifactRef, cfg: ModelConfig) -> dict:
    """Load the baseline once: proves it loads, and records what the report needs to know of it."""
    model = load_clip(source.path, cfg)
    vision, text = model.config.vision_config, model.config.text_config
    return {
        "source": source.meta.get("source"),
        "revision": source.meta.get("revision"),
        "digest": source.digest,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "context_length": text.max_position_embeddings,
        "vision_layers": vision.num_hidden_layers,
        "text_layers": text.num_hidden_layers,
        "projection_dim": model.config.projection_dim,
    }
