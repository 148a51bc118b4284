"""Export: ONNX export, FP16/INT8 graphs, TensorRT engine building."""
