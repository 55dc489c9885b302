"""Multitask prompted fine-tuning (T0-style): the mixture file and its checks
(``mixture``), and the training examples as a resumable, packed stream (``stream``)."""
