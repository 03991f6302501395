"""The edge runtime: running a `tinyml export` ONNX folder and quantizing it to int4, on onnxruntime and numpy
alone (no torch, no transformers), as on a device."""

