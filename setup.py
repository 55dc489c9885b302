"""Packaging for opt. Install torch==2.13.0 first on CPU-only machines (see README)."""

from setuptools import find_packages, setup

setup(
    name="opt",
    version="0.1.0",
    description="Pretraining OPT-style decoder-only language models, 125M to 175B, with a divergence supervisor.",
    python_requires=">=3.10",
    packages=find_packages(include=["opt", "opt.*"]),
    # PromptSource's templates (data, not a package) and their licence, for `opt eval`.
    package_data={"opt.eval": ["templates/LICENSE", "templates/NOTICE", "templates/*/*/*.yaml"]},
    install_requires=[
        # A range that the on-disk CPU wheel satisfies; the install commands pin torch first.
        "torch>=2.6",
        "numpy",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "tqdm",
        "submitit>=1.5",  # `opt launch slurm`
        "pydantic>=2.7",  # the config tree and the logbook's event schema
        "tomli-w>=1.0",  # writing the resolved config back as TOML
        "matplotlib>=3.7",  # the logbook report's chart (imported only when one is rendered)
        "py-spy>=0.3",  # `opt launch slurm`: the stacks of hung ranks, read from outside
        "pyyaml>=6",  # `opt eval`: PromptSource's templates.yaml
        "jinja2>=3",  # `opt eval`: rendering PromptSource templates
        "zstandard>=0.22",  # `opt data`: .jsonl.zst inputs, as the Pile ships them
        "pyarrow>=14",  # `opt data`: Parquet and Hugging Face `datasets` saved to disk
        "datasketch>=1.6",  # `opt data dedup`: MinHash LSH near-duplicate search
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "ruff==0.17.6",  # pinned: the suite runs it, and a new release may add rules
            "transformers>=4.40",
            # tests/test_lm_eval.py: our backend against lm-eval's own Hugging Face backend
            "lm-eval[hf]>=0.4.13,<0.5",
        ],
        # `python -m opt.eval.lm_eval_backend`: opt as an lm-evaluation-harness model
        "lm-eval": ["lm-eval>=0.4.13,<0.5"],
    },
    entry_points={"console_scripts": ["opt=opt.cli:main"]},
)
