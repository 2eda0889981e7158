"""What only inference uses, applied to a plain `models.wan.WanModel` from outside.

    from inference import VideoPipeline                    # the Python sampling API (inference/pipeline.py)
    from inference import prepare_for_inference            # frozen + FP8 linears + fused row kernels + compile

fp8.py (FP8 linears, swapped in by `quantize_linears_fp8`), fused_rows.py (row kernels and `FusedWanBlock`, swapped in
by `enable_fused_rows`), samplers.py (few-step DMD student, CFG UniPC teacher, TI2V conditioning), timer.py
(`StageTimer`), prepare.py, pipeline.py.
"""

from inference.pipeline import VideoPipeline
from inference.prepare import prepare_for_inference

__all__ = ["VideoPipeline", "prepare_for_inference"]
