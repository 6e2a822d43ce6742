"""OmniFlatten: vocabulary, flattening, streaming chunk step, checkpoints, speech codec,
and the engine that batches every session's chunk step. Knows nothing of calls."""
