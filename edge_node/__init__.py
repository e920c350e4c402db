"""EdgeFleet edge node: verifies commands and artifacts, hot-swaps ONNX models, runs inference."""
