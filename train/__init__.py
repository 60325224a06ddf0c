"""``edgeml train``: the PyTorch trainer (models, data validation, reference statistics, ONNX export)."""
