"""Stage baseline_model: load the checkpoint once, proving it loads, and record what the report needs."""

from __future__ import annotations

import json
from pathlib import Path

from clip_fp8.artifacts import ArtifactRef
from clip_fp8.config import ModelConfig
from clip_fp8.stage import Reads, StageOutput, stage
from clip_fp8.tasks.checkpoints import ModelSettings, load_clip


@stage(retries=2)
def baseline_model(model_source: ArtifactRef, cfg: ModelSettings, out_dir: Path) -> StageOutput:
    model = load_clip(model_source.path, cfg)
    vision, text = model.config.vision_config, model.config.text_config
    info = {
        "source": model_source.meta.get("source"),
        "revision": model_source.meta.get("revision"),
        "resolved_revision": model_source.meta.get("resolved_revision"),
        "digest": model_source.digest,
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
    (out_dir / "baseline.json").write_text(json.dumps(info, indent=1))
    return StageOutput(files={"baseline": "baseline.json"}, meta=info, summary={"model": info})
