"""Sample quality: FID and KID (torchmetrics) over pluggable features, and mode coverage.

Inputs are uint8 NHWC images, whatever framework made them; the metrics run in torch. A
TensorFlow process hands its samples to a torch process (pipeline.quality.remote), as torch
and TensorFlow never share one.
"""
