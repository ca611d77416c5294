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
