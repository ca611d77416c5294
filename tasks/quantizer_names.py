"""ModelOpt's quantizer attribute names, shared by quantize (which creates them) and audit (which reads
them back from the quantizer table), so that the audit's key does not depend on how quantize calibrates."""

ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")
QUANTIZER_SUFFIXES = ("weight_quantizer", "input_quantizer", "output_quantizer", *ATTENTION_QUANTIZERS, "p_bmm_quantizer")
