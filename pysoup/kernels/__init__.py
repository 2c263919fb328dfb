"""Triton kernels (shipped as pysoup.kernels; importing needs triton).

Each kernel follows the numerical contract of DESIGN.md bit for bit: fp32 accumulation with tl.fma in input
order from -0.0, one division by the fp32 sum of the weights, round-to-nearest-even done on the bits (Triton's
interpreter truncates fp32 -> bf16, so no conversion is left to it). Under TRITON_INTERPRET=1 they run on CPU
tensors, which is how CI tests them against the reference backend.
"""
