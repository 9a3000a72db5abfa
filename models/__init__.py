"""The shipped detectors, one folder each (``model.onnx``, ``manifest.json``, ``MODEL_CARD.md``).

This folder is installed as the package ``filmgate.models`` so that an installed gate finds its models wherever it
runs (:func:`filmgate.manifest.shipped_models_dir`); it holds no code.
"""
