"""Conversion between our checkpoints and other formats (Hugging Face transformers: ``hf``).

Deliberately empty of imports: ``opt.convert.cli`` is imported by ``opt --help`` and must not
pull in torch; import ``opt.convert.hf`` directly for the conversion functions.
"""
