"""What every layer shares about CLIP, importable without torch: the vocabulary size, and the lock
that CLIP forwards in one process take.

ModelOpt's quantized attention swaps transformers' process-global attention function
(``ALL_ATTENTION_FUNCTIONS["sdpa"]``) for the length of every forward. Another CLIP forward running
meanwhile in another thread would call it: a plain model crashes (no ``q_bmm_quantizer``), a quantized
one silently applies the other model's scales. Stages run in threads side by side, so every CLIP
forward they make (calibration, evaluation, the ONNX check's reference, an in-process export) holds
``CLIP_FORWARD_LOCK``; ONNX Runtime, exports in their own processes and file work still overlap.
The benchmark runs alone, after every other stage.
"""

from __future__ import annotations

import threading

CLIP_FORWARD_LOCK = threading.RLock()

# CLIP's byte-level BPE vocabulary: 256 byte tokens, the same with </w>, 48,894 merges and 2 specials.
CLIP_VOCAB_SIZE = 49408


# ModelOpt's module registry and its Hugging Face checkpointing hooks are process-global. Once
# `mto.enable_huggingface_checkpointing()` has run in a process, every `CLIPModel.from_pretrained(path)`
# swaps `CLIPModel.__init__` for one that restores `path`'s ModelOpt state, for the length of the call: a
# CLIPModel built meanwhile in another thread (a baseline loaded beside a quantized checkpoint) came out
# fake-quantized with the other model's quantizers (seen in a full test run: baseline acc1 0.43 instead
# of 1.0). So every CLIPModel construction in a process holds this lock (`clip_model_construction`), and
# two stages restoring at once do not register the same class twice.
MODELOPT_LOCK = threading.RLock()


def clip_model_construction():
    """Hold while building a ``CLIPModel`` (``from_pretrained`` or a constructor): see ``MODELOPT_LOCK``."""
    return MODELOPT_LOCK
