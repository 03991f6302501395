"""Records: data files, conversations and preference pairs, their encoding and scoring. Torch-free: the ONNX
runner and `data validate` use the same code as training."""

