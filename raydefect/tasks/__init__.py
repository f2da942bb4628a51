"""People-facing work without Ray: predict a few images, evaluate a model on a dataset split, export it to ONNX or
TorchScript. `raydefect.pipelines.evaluate` runs the same evaluation at scale."""
