"""Published large training runs with their layouts and measured throughput: what `opt
plan`'s time model is fitted on and checked against (opt/plan/fit.py, bench/plan_fit.py).

Every run here is a GPT-style decoder (learned or ALiBi positions, GeLU/ReLU FFN of 4x the
width, multi-head attention), so our FLOP model describes its shape. Each reported figure
is per GPU, in the source's own FLOP count; ``counts_recompute`` says whether that count
includes the forward pass that activation recomputation repeats. All of these runs used
full recompute. Megatron-LM's formula (Narayanan et al. 2021, eq. 3),
96·B·s·l·h²·(1 + s/6h + V/16lh), counts it (4 passes over the blocks, 3 over the head);
Megatron-DeepSpeed (BLOOM) logs the same formula with its ``checkpoint_activations_factor``
of 4. ``micro_batch`` and ``stages_per_rank`` are None where the source does not state them;
the fit then takes the planner's choice for the published TP, PP and DP.
"""

from __future__ import annotations

from dataclasses import dataclass

from opt.models.sizes import ModelArgs

MEGATRON_2021 = (
    "Narayanan et al. 2021, Efficient Large-Scale Language Model Training on GPU Clusters "
    "Using Megatron-LM, arXiv:2104.04473, Table 1 (Selene, DGX A100 80GB, 8 x 200 Gb/s "
    "InfiniBand HDR per node)"
)
MT_NLG = (
    "Smith et al. 2022, Using DeepSpeed and Megatron to Train Megatron-Turing NLG 530B, "
    "arXiv:2201.11990, Table 1 (Selene); iteration times 60.1, 50.2, 44.4 s"
)
OPT = (
    "Zhang et al. 2022, OPT: Open Pre-trained Transformer Language Models, arXiv:2205.01068, "
    "section 2.4: 992 A100-80GB, FSDP with Megatron TP 8, up to 147 TFLOP/s per GPU"
)
BLOOM = (
    "BigScience 2022, BLOOM model card and training README (bigscience.notion.site, "
    "BigScience 176B Model): 384 A100-80GB, one replica on 48 GPUs (TP 4 x PP 12), ZeRO-1 "
    "DP 8, micro-batch 2, 'about 150 TFLOPs'; Jean Zay, 4 x 100 Gb/s Omni-Path per node"
)


@dataclass(frozen=True)
class PublishedRun:
    name: str
    args: ModelArgs
    seq_len: int
    batch_sequences: int
    gpus: int
    tp: int
    pp: int
    data_parallel: str  # "replicate" (DDP or ZeRO-1: all-reduce volume) or "fsdp"
    reported_tflops: float  # per GPU, in the source's count
    counts_recompute: bool
    source: str
    micro_batch: int | None = None
    stages_per_rank: int | None = None
    gpu: str = "a100-80gb"
    gpus_per_node: int = 8
    network_gbps: float = 25.0  # per GPU, per direction
    note: str = ""

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


def _gpt(layers: int, heads: int, hidden: int, vocab: int = 51200) -> ModelArgs:
    return ModelArgs(n_layers=layers, n_heads=heads, d_model=hidden, vocab_size=vocab,
                     max_positions=2048)  # fmt: skip


def _megatron(name, layers, heads, hidden, tp, pp, gpus, batch, tflops) -> PublishedRun:
    return PublishedRun(name, _gpt(layers, heads, hidden), 2048, batch, gpus, tp, pp,
                        "replicate", tflops, True, MEGATRON_2021)  # fmt: skip


RUNS = (
    _megatron("Megatron 1.7B", 24, 24, 2304, 1, 1, 32, 512, 137),
    _megatron("Megatron 3.6B", 30, 32, 3072, 2, 1, 64, 512, 138),
    _megatron("Megatron 7.5B", 36, 32, 4096, 4, 1, 128, 512, 142),
    _megatron("Megatron 18.4B", 40, 48, 6144, 8, 1, 256, 1024, 135),
    _megatron("Megatron 39.1B", 48, 64, 8192, 8, 2, 512, 1536, 138),
    _megatron("Megatron 76.1B", 60, 80, 10240, 8, 4, 1024, 1792, 140),
    _megatron("Megatron 145.6B", 80, 96, 12288, 8, 8, 1536, 2304, 148),
    _megatron("Megatron 310.1B", 96, 128, 16384, 8, 16, 1920, 2160, 155),
    _megatron("Megatron 529.6B", 105, 128, 20480, 8, 35, 2520, 2520, 163),
    _megatron("Megatron 1008B", 128, 160, 25600, 8, 64, 3072, 3072, 163),
    *(
        PublishedRun(
            f"MT-NLG 530B, {gpus} GPUs",
            _gpt(105, 128, 20480),
            2048,
            1920,
            gpus,
            8,
            35,
            "replicate",
            tflops,
            True,
            MT_NLG,
        )
        for gpus, tflops in ((2240, 126), (2800, 121), (3360, 113))
    ),
    PublishedRun(
        "OPT-175B",
        ModelArgs(n_layers=96, n_heads=96, d_model=12288),
        2048,
        992,
        992,
        8,
        1,
        "fsdp",
        147,
        True,
        OPT,
        note="'up to' 147; the count is not stated, but only a count with recompute "
        "(8 FLOPs per parameter and token) gives the paper's ~33 days for 300B tokens",
    ),
    PublishedRun(
        "BLOOM-176B",
        _gpt(70, 112, 14336, vocab=250880),
        2048,
        2048,
        384,
        4,
        12,
        "replicate",
        150,
        True,
        BLOOM,
        micro_batch=2,
        network_gbps=6.25,
    ),
)
