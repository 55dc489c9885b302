"""Conversion between our checkpoints and other formats (Hugging Face transformers: ``hf``).

Deliberately empty of imports: the `opt convert` command (opt/cli/convert.py) is registered
by ``opt --help`` and must not pull in torch; import ``opt.convert.hf`` for the conversion
functions.
"""
