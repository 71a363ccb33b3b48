"""Services: the tritonserver process supervisor, the model-repository writer, the local cluster (Redis,
Triton and workers as child processes). Imports output and below."""
