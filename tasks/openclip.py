"""open_clip checkpoints as transformers ``CLIPModel`` directories.

open_clip 3.x computes attention's QKV with ``F.linear`` on ``in_proj_weight`` and calls SDPA
directly, so ModelOpt's module replacement never sees a Linear or an attention module to quantize.
The laion checkpoints exist in both forms, and the architecture is the same: converting the weights
to a ``CLIPModel`` (QKV split into q/k/v projections) gives ModelOpt modules it quantizes, and the
audit proves it. The tokenizer is rebuilt from open_clip's own BPE file and the image processor from
the checkpoint's preprocessing config (laion2b models normalise with mean = std = 0.5, not OpenAI's).

Sources (``model.source``): ``open_clip:<model name>`` (a name open_clip knows, e.g. ``ViT-L-14``) or
``open_clip:<path to an open_clip model-config JSON>``; weights from ``model.pretrained``: a checkpoint
file (safetensors; ``.pt``/``.bin`` pickles only with ``model.allow_pickle``) or an open_clip pretrained
tag (downloaded from the Hub by open_clip, so it needs the network).
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
from pathlib import Path

from clip_fp8.artifacts import atomic_directory, cache_base, sha256_file
from clip_fp8.model_locks import CLIP_VOCAB_SIZE
from clip_fp8.errors import PipelineInputError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip features this converter has no transformers equivalent for; a config using one is refused.
UNSUPPORTED = {
    "vision_cfg": ("attentional_pool", "no_ln_pre", "final_ln_after_pool", "timm_model_name", "hf_model_name", "act_kwargs",
                   "norm_kwargs", "ls_init_value", "pos_embed_type", "pool_type"),
    "text_cfg": ("hf_model_name", "no_causal_mask", "proj_bias", "pool_type", "final_ln_after_pool", "embed_cls", "pad_id",
                 "ls_init_value", "proj_type", "norm_kwargs", "act_kwargs"),
}
DEFAULT_POOL = {"vision_cfg": "tok", "text_cfg": "argmax"}


def load_model_config(name_or_path: str) -> tuple[str, dict]:
    """(model name, open_clip model config) for a known name or a config JSON file."""
    import open_clip

    path = Path(name_or_path).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise PipelineInputError(f"model.source 'open_clip:{name_or_path}': config file does not exist")
        return path.stem, json.loads(path.read_text())
    config = open_clip.get_model_config(name_or_path)
    if config is None:
        raise PipelineInputError(
            f"model.source 'open_clip:{name_or_path}': open_clip knows no such model (e.g. 'ViT-L-14'; "
            "open_clip.list_models() lists them), or pass a model-config JSON path")
    return name_or_path, config


def check_supported(name: str, config: dict) -> None:
    for section, keys in UNSUPPORTED.items():
        cfg = config.get(section, {})
        for key in keys:
            if key in cfg and not (key == "pool_type" and cfg[key] == DEFAULT_POOL[section]) \
                    and not (key == "pad_id" and cfg[key] == 0):
                raise PipelineInputError(
                    f"open_clip model '{name}' uses {section}.{key}={cfg[key]!r}, which has no transformers "
                    "CLIPModel equivalent; only standard CLIP ViT architectures are converted")
    if config.get("custom_text") and "hf_model_name" in config.get("text_cfg", {}):
        raise PipelineInputError(f"open_clip model '{name}' has a Hugging Face text tower; not a CLIP architecture")


def read_state_dict(checkpoint: Path, allow_pickle: bool) -> dict:
    """Weights from a checkpoint file; pickles (arbitrary code on load) only when explicitly allowed."""
    if not checkpoint.is_file():
        raise PipelineInputError(f"model.pretrained '{checkpoint}' does not exist")
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(checkpoint))
    if not allow_pickle:
        raise PipelineInputError(
            f"model.pretrained '{checkpoint}' is a pickle checkpoint, which can run code when loaded; convert it to "
            "safetensors, or set model.allow_pickle=true if you trust its origin")
    import torch

    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def clip_config(config: dict, quick_gelu: bool):
    from transformers import CLIPConfig

    vision, text = config["vision_cfg"], config["text_cfg"]
    width, text_width = vision["width"], text["width"]
    vision_heads = width // vision.get("head_width", 64)
    return CLIPConfig(
        projection_dim=config["embed_dim"],
        text_config=dict(
            vocab_size=text.get("vocab_size", CLIP_VOCAB_SIZE), hidden_size=text_width,
            intermediate_size=int(text_width * text.get("mlp_ratio", 4.0)), num_hidden_layers=text["layers"],
            num_attention_heads=text.get("heads", 8), max_position_embeddings=text.get("context_length", 77),
            hidden_act="quick_gelu" if quick_gelu else "gelu", layer_norm_eps=1e-5,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=width, intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
            num_hidden_layers=vision["layers"], num_attention_heads=vision_heads, image_size=vision["image_size"],
            patch_size=vision["patch_size"], hidden_act="quick_gelu" if quick_gelu else "gelu", layer_norm_eps=1e-5,
        ),
    )


def convert_state_dict(state: dict, vision_layers: int, text_layers: int) -> dict:
    """open_clip names -> CLIPModel names; fused in_proj split into q/k/v; projections transposed."""
    out = {
        "logit_scale": state["logit_scale"],
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t().contiguous(),
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],  # sic: transformers' name
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t().contiguous(),
    }
    for prefix, target, layers in (("transformer", "text_model", text_layers), ("visual.transformer", "vision_model", vision_layers)):
        for i in range(layers):
            src, dst = f"{prefix}.resblocks.{i}", f"{target}.encoder.layers.{i}"
            for name, value in zip(("q", "k", "v"), state[f"{src}.attn.in_proj_weight"].chunk(3)):
                out[f"{dst}.self_attn.{name}_proj.weight"] = value.contiguous()
            for name, value in zip(("q", "k", "v"), state[f"{src}.attn.in_proj_bias"].chunk(3)):
                out[f"{dst}.self_attn.{name}_proj.bias"] = value.contiguous()
            pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                     "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
            for a, b in pairs.items():
                out[f"{dst}.{b}.weight"] = state[f"{src}.{a}.weight"]
                out[f"{dst}.{b}.bias"] = state[f"{src}.{a}.bias"]
    return out


def clip_tokenizer(context_length: int):
    """transformers' CLIP tokenizer from open_clip's BPE merges (the same vocabulary OpenAI's CLIP uses)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizerFast

    # The vocabulary is 256 byte tokens, the same with </w>, the merges and 2 specials: CLIP_VOCAB_SIZE in all.
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:1 + n_merges]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    # Pads with <|endoftext|>, not open_clip's 0 ("!"): as a pad token "!" becomes special and a "!" in a
    # caption would turn into padding. Padding after the first EOT cannot change the embedding (causal
    # attention, pooled at the first EOT), so the features are open_clip's.
    return CLIPTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, merges=merges,
                             model_max_length=context_length)


def resolve_weights(name: str, pretrained: str | None) -> Path:
    """A checkpoint file for ``pretrained`` (a path, or an open_clip tag fetched by open_clip)."""
    if not pretrained:
        raise PipelineInputError(
            f"model.source 'open_clip:{name}' needs model.pretrained: a checkpoint file or an open_clip tag")
    path = Path(pretrained).expanduser()
    if path.suffix in (".safetensors", ".pt", ".bin", ".pth") or path.exists():
        return path
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise PipelineInputError(
            f"model.pretrained '{pretrained}' is neither a file nor an open_clip tag of '{name}' "
            f"(known: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
    try:
        return Path(open_clip.download_pretrained(cfg))
    except Exception as exc:
        hub = cfg.get("hf_hub", "").rstrip("/")
        raise PipelineInputError(
            f"open_clip weights {name}/{pretrained} could not be downloaded ({type(exc).__name__}); on a connected "
            f"machine run `huggingface-cli download {hub} open_clip_model.safetensors --local-dir DIR` and pass "
            "model.pretrained=DIR/open_clip_model.safetensors") from None


def convert(name_or_config: str, pretrained: str | None, allow_pickle: bool, preprocess: dict | None = None) -> Path:
    """Convert once per (checkpoint content, config, converter code) into the local cache; return the directory."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    name, config = load_model_config(name_or_config)
    check_supported(name, config)
    checkpoint = resolve_weights(name, pretrained)
    if checkpoint.suffix != ".safetensors" and not allow_pickle:
        read_state_dict(checkpoint, allow_pickle)  # raises the pickle message before hashing gigabytes
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained and not Path(pretrained).exists() else {}
    preprocess = {"mean": list(tag_cfg.get("mean", OPENAI_MEAN)), "std": list(tag_cfg.get("std", OPENAI_STD)),
                  **(preprocess or {})}
    quick_gelu = bool(config.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    key = hashlib.sha256(json.dumps({"weights": sha256_file(checkpoint), "config": config, "preprocess": preprocess,
                                     "quick_gelu": quick_gelu, "converter": inspect.getsource(convert_state_dict)},
                                    sort_keys=True).encode()).hexdigest()
    final = cache_base() / "converted" / key[:32]
    if final.is_dir():
        return final

    state = read_state_dict(checkpoint, allow_pickle)
    hf_config = clip_config(config, quick_gelu)
    from clip_fp8.model_locks import clip_model_construction

    with clip_model_construction():
        model = CLIPModel(hf_config)
    converted = convert_state_dict(state, hf_config.vision_config.num_hidden_layers, hf_config.text_config.num_hidden_layers)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise PipelineInputError(f"open_clip checkpoint '{checkpoint}' does not fit model '{name}': "
                                 f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    with atomic_directory(final, keep_existing=True) as tmp:  # another run may convert the same model at once
        with torch.no_grad():
            model.save_pretrained(tmp, safe_serialization=True)
        size = hf_config.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                             image_mean=preprocess["mean"], image_std=preprocess["std"], resample=3)
        CLIPProcessor(image_processor=image_processor,
                      tokenizer=clip_tokenizer(hf_config.text_config.max_position_embeddings)).save_pretrained(tmp)
        (tmp / "open_clip_source.json").write_text(json.dumps(
            {"model": name, "pretrained": pretrained, "checkpoint_sha256": sha256_file(checkpoint), "preprocess": preprocess}))
    return final
