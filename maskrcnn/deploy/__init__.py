"""Deployment: ONNX export of the network (:mod:`.export`) and the runtimes that run the exported file
(:mod:`.runtime`) behind the predictor's interface; the batching queue of the HTTP service (:mod:`.serve`)."""
