"""The two CLIP encoders as single-input modules: one place for ONNX export, serving and training.

transformers 4.x returns a tensor from ``get_*_features``; 5.x returns a ``BaseModelOutputWithPooling``
whose ``pooler_output`` is the projected embedding. Everything here accepts both.
"""

from __future__ import annotations

import torch
from torch import nn

from clip_fp8.model_locks import CLIP_FORWARD_LOCK


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_embeds(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Projected, unnormalised text embedding. CLIP pools at the first EOS, so no mask is needed."""
    return _features(model.get_text_features(input_ids=input_ids))


def image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return _features(model.get_image_features(pixel_values=pixel_values))


class TextEncoder(nn.Module):
    """``input_ids [batch, context] (int64) -> text_embeds [batch, projection_dim]``."""

    input_name = "input_ids"
    output_name = "text_embeds"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return text_embeds(self.model, input_ids)


class ImageEncoder(nn.Module):
    """``pixel_values [batch, 3, H, W] -> image_embeds [batch, projection_dim]``."""

    input_name = "pixel_values"
    output_name = "image_embeds"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_embeds(self.model, pixel_values)


class TorchEncoders:
    """A ``CLIPModel`` in this process as a runtime (``pytorch``, ``fakequant``): the ``encode_image`` /
    ``encode_text`` surface CLIP_benchmark's evaluators call, float32 embeddings on ``device``.

    CLIP_benchmark hands ``encode_text`` whatever its tokenizer returned, here a ``[batch, context]`` id
    tensor; pixels are cast to the model's dtype so an FP16 model takes FP32 pixels.
    """

    def __init__(self, model, device: str):
        self.model, self.device = model, device
        self.dtype = next(model.parameters()).dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with CLIP_FORWARD_LOCK:
            return image_embeds(self.model, images.to(self.device, self.dtype)).float()

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        with CLIP_FORWARD_LOCK:
            return text_embeds(self.model, input_ids.to(self.device)).float()
