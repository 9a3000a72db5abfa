"""Training for filmgate's detectors: data cache, tasks, a small CNN, fit / evaluate / export to ONNX + manifest.

Needs the ``train`` extra (torch, onnx, tqdm). The gate never imports this package; the two meet only in
``filmgate.decode`` / ``filmgate.preprocess`` (identical pixels in training and serving) and ``filmgate.manifest``.
"""
