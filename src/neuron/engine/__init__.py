"""Generation: one worker thread per device, stepping every active job in turn.

The seam to the engines: runtime.py (`LoadedModel` around a `Runtime`: TransformersRuntime,
LlamaCppRuntime) and generation.py (the `Batch` each runtime makes: DecodeBatch, LlamaBatch).
Nothing here knows where weights come from (neuron.sources loads them, and imports this package).
"""
