"""Foundation: errors, the one config object and the env vars it reads, the output-folder layout, the scan
and plan file formats, the tokenizer wrapper. Imports no other fbas package."""
