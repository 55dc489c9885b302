"""Downstream evaluation: PromptSource prompts, local task data, rank classification, and
the T0 view of the results (the spread of accuracy over many prompts of one task)."""
