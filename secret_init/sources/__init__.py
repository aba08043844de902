"""Sources only read. Each kind lives in one module and returns Materials for the sink."""
