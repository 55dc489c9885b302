"""`opt plan`: choosing a model size and parallel layout from a memory and time model."""
