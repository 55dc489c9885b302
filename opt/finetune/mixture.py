"""A prompted mixture: which datasets a fine-tuning run trains on, through which PromptSource
templates, how much of each, and which task clusters it must never see.

The file is TOML::

    seed = 0
    cap = 500000                 # at most this many examples of each dataset (T0's cap)
    held_out_clusters = ["nli", "coreference", "sentence_completion", "word_sense"]

    [[dataset]]
    name = "paraphrase_pairs"    # unique in the mixture
    data = "data/pairs.jsonl"    # a JSONL file, or a directory (see below)
    split = "train"              # with a directory only: <split>.jsonl there, or the split
                                 # of a `datasets` save_to_disk directory
    templates = "templates/pairs/templates.yaml"   # PromptSource format
    cluster = "paraphrase"
    prompts = "all"              # or a list of template names

Relative paths are taken from the mixture file's folder. ``held_out_clusters`` defaults to
T0's four; ``seed``, ``cap``, ``split`` and ``prompts`` default as above.

Reading a mixture checks everything that can be checked before training, each problem one
:class:`OptError` line naming the file and the entry: unknown keys, wrong types, missing
files, duplicate names, unknown template names, a dataset no example of which renders, a
cap below 1, and leaks. A leak is a dataset whose cluster is held out, or one of the tasks T0
held out (the five SuperGLUE tasks ``opt eval`` knows, and ANLI, HellaSwag, Story Cloze,
WinoGrande) declared under another cluster than T0's: recognised by its name, by the
dataset/subset its templates file names, or by the folders of its templates or data, so a
wrong label cannot hide it.

Each dataset keeps at most ``cap`` examples: the first ``cap`` of those a selected template
applies to, in an order seeded by (seed, dataset name), so adding a dataset to a mixture
does not change what another keeps. Examples-proportional mixing (T0, after T5) follows
from the stream drawing uniformly over all kept (dataset, example) pairs.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from opt.errors import OptError
from opt.eval.prompts import Template, load_template_file, select_templates
from opt.eval.tasks import TASKS, is_saved_dataset, read_jsonl, read_saved_dataset

T0_CAP = 500_000
"""T0's per-dataset cap on examples for examples-proportional mixing (Sanh et al. 2021, §4)."""

T0_HELD_OUT_CLUSTERS = ("nli", "coreference", "sentence_completion", "word_sense")
"""The task clusters T0 held out whole for zero-shot evaluation."""

# T0's clusters of its held-out evaluation datasets (Sanh et al. 2021, "Multitask Prompted
# Training Enables Zero-Shot Task Generalization", Figure 2): natural language inference
# (ANLI, CB, RTE), coreference resolution (WSC, Winogrande), sentence completion (COPA,
# HellaSwag, Story Cloze) and word sense disambiguation (WiC).
T0_CLUSTERS = {
    "rte": "nli",
    "cb": "nli",
    "anli": "nli",
    "copa": "sentence_completion",
    "hellaswag": "sentence_completion",
    "story_cloze": "sentence_completion",
    "wsc": "coreference",
    "winogrande": "coreference",
    "wic": "word_sense",
}
assert set(TASKS) <= set(T0_CLUSTERS), "every task opt eval knows has its T0 cluster"

# Spellings that name a known task: Hugging Face / PromptSource dataset and subset names.
_ALIASES = {
    "wsc.fixed": "wsc",
    "wsc273": "wsc",
    "winograd_wsc": "wsc",
    "anli_r1": "anli",
    "anli_r2": "anli",
    "anli_r3": "anli",
}
_CONTAINERS = ("super_glue", "glue")  # collections whose subset is the task's name

_TOP_KEYS = {"seed", "cap", "held_out_clusters", "dataset"}
_DATASET_KEYS = {"name", "data", "split", "templates", "cluster", "prompts"}


@dataclass(frozen=True)
class MixtureDataset:
    """One dataset of the mixture, read and checked: its kept examples and templates."""

    name: str
    cluster: str
    data: Path
    templates_file: Path
    templates: tuple[Template, ...]  # the selected ones, in the order the file or list gives
    examples: tuple[dict, ...]  # the kept examples, in the seeded order
    rows: tuple[int, ...]  # each kept example's row in the data (0-based), same order
    total: int  # rows in the data
    unrenderable: int  # rows looked at and dropped: no selected template applies


@dataclass(frozen=True)
class Mixture:
    path: Path
    seed: int
    cap: int
    held_out_clusters: tuple[str, ...]
    datasets: tuple[MixtureDataset, ...]

    @property
    def num_examples(self) -> int:
        """All kept (dataset, example) pairs: the length of one epoch."""
        return sum(len(d.examples) for d in self.datasets)

    def fingerprint(self) -> str:
        """A hash of everything that decides which example and template a stream position
        holds: seed, cap, and per dataset its name, kept rows and their contents, and its
        templates. A resume refuses a stream state saved under another fingerprint."""
        digest = hashlib.sha256()
        head = {"seed": self.seed, "cap": self.cap}
        digest.update(json.dumps(head, sort_keys=True).encode())
        for d in self.datasets:
            templates = [[t.id, t.name, t.jinja, t.answer_choices] for t in d.templates]
            digest.update(json.dumps([d.name, list(d.rows), templates]).encode())
            for example in d.examples:
                digest.update(json.dumps(example, sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]

    def summary(self) -> list[str]:
        """One line per dataset, for a run's log."""
        return [
            f"{d.name} ({d.cluster}): {len(d.examples)} of {d.total} examples, "
            f"{len(d.templates)} templates"
            + (f", {d.unrenderable} unrenderable" if d.unrenderable else "")
            for d in self.datasets
        ]


def load_mixture(path: str | Path) -> Mixture:
    """Read and check a mixture file (see the module's docstring)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptError(f"mixture file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise OptError(f"{path}: not TOML ({err})") from None
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise OptError(
            f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})"
        )
    seed = _int(raw.get("seed", 0), f"{path}: seed")
    cap = _int(raw.get("cap", T0_CAP), f"{path}: cap")
    if cap < 1:
        raise OptError(f"{path}: cap must be at least 1, not {cap}")
    held_out = raw.get("held_out_clusters", list(T0_HELD_OUT_CLUSTERS))
    if not isinstance(held_out, list) or not all(isinstance(c, str) for c in held_out):
        raise OptError(f"{path}: held_out_clusters must be a list of cluster names")
    entries = raw.get("dataset")
    if not isinstance(entries, list) or not entries:
        raise OptError(f"{path}: no [[dataset]] entries")
    names: set[str] = set()
    datasets = []
    for i, entry in enumerate(entries, 1):
        where = f"{path}: [[dataset]] {i}"
        if not isinstance(entry, dict):
            raise OptError(f"{where}: not a table")
        if isinstance(entry.get("name"), str):
            where = f"{path}: dataset {entry['name']!r}"
        unknown = sorted(set(entry) - _DATASET_KEYS)
        if unknown:
            known = ", ".join(sorted(_DATASET_KEYS))
            raise OptError(f"{where}: unknown key {unknown[0]!r} (known: {known})")
        for key in ("name", "data", "templates", "cluster"):
            if key not in entry:
                raise OptError(f"{where}: missing key {key!r}")
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise OptError(f"{where}: {key} must be a non-empty string")
        if entry["name"] in names:
            raise OptError(f"{where}: a second dataset of that name")
        names.add(entry["name"])
        datasets.append(_read_dataset(path, where, entry, seed, cap, tuple(held_out)))
    return Mixture(path, seed, cap, tuple(held_out), tuple(datasets))


def _read_dataset(
    path: Path, where: str, entry: dict, seed: int, cap: int, held_out: tuple[str, ...]
) -> MixtureDataset:
    name, cluster = entry["name"], entry["cluster"]
    templates_file = path.parent / entry["templates"]
    data = path.parent / entry["data"]
    if not templates_file.is_file():
        raise OptError(f"{where}: templates file not found: {templates_file}")
    if not data.exists():
        raise OptError(f"{where}: data not found: {data}")
    try:
        header_dataset, header_subset, templates = load_template_file(templates_file)
    except OptError as err:
        raise OptError(f"{where}: {err}") from None
    _refuse_leak(
        where, name, cluster, held_out, header_dataset, header_subset, templates_file, data
    )
    prompts = entry.get("prompts", "all")
    if not (
        prompts == "all" or (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts))
    ):
        raise OptError(f'{where}: prompts must be "all" or a list of template names')
    try:
        selected = select_templates(templates, prompts)
    except OptError as err:
        raise OptError(f"{where}: {err} (in {templates_file})") from None
    if not selected:
        raise OptError(
            f'{where}: {templates_file} has no original-task template for prompts = "all"; '
            "name the templates to use"
        )
    if len({t.name for t in selected}) != len(selected):
        raise OptError(f"{where}: a template is named twice in prompts")
    rows = _read_rows(where, data, entry)
    kept, kept_rows, dropped = [], [], 0
    for row in random.Random(f"mixture:{seed}:{name}").sample(range(len(rows)), len(rows)):
        if any(applies(t, rows[row], where, row) for t in selected):
            kept.append(rows[row])
            kept_rows.append(row)
            if len(kept) == cap:
                break
        else:
            dropped += 1
    if not kept:
        raise OptError(
            f"{where}: none of its {len(rows)} examples renders under its "
            f"{len(selected)} templates (an input and a non-empty target)"
        )
    return MixtureDataset(
        name=name,
        cluster=cluster,
        data=data,
        templates_file=templates_file,
        templates=tuple(selected),
        examples=tuple(kept),
        rows=tuple(kept_rows),
        total=len(rows),
        unrenderable=dropped,
    )


def render(
    template: Template, example: dict, where: str = "", row: int = 0
) -> tuple[str, str] | None:
    """(input, target) of ``example`` under ``template``, or None where the template does
    not apply: PromptSource's ``[""]``, an empty input or target, or a ``|||`` too many."""
    try:
        parts = template.apply(example)
    except OptError as err:
        raise OptError(f"{where}: row {row + 1}: {err}") from None
    except Exception as err:  # jinja's errors: a template written for other fields
        raise OptError(
            f"{where}: template {template.name!r} fails on row {row + 1}: "
            f"{type(err).__name__}: {err}"
        ) from None
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1]


def applies(template: Template, example: dict, where: str = "", row: int = 0) -> bool:
    return render(template, example, where, row) is not None


def _read_rows(where: str, data: Path, entry: dict) -> list[dict]:
    split = entry.get("split")
    if split is not None and not isinstance(split, str):
        raise OptError(f"{where}: split must be a string")
    try:
        if data.is_file():
            if split is not None:
                raise OptError(
                    f"data {data} is one JSONL file, so it is one split; 'split' applies to "
                    "a directory"
                )
            rows = read_jsonl(data)
        else:
            split = split or "train"
            if (data / f"{split}.jsonl").is_file():
                rows = read_jsonl(data / f"{split}.jsonl")
            elif is_saved_dataset(data, split):
                rows = read_saved_dataset(data, split)
            else:
                raise OptError(
                    f"no {split!r} split in {data}: expected {data / f'{split}.jsonl'} or a "
                    "directory written by datasets' save_to_disk"
                )
    except OptError as err:
        raise OptError(f"{where}: {err}") from None
    except UnicodeDecodeError as err:
        raise OptError(f"{where}: {data} is not UTF-8 text ({err.reason})") from None
    return rows


def known_task(
    name: str,
    header: tuple[str | None, str | None] = (None, None),
    paths: tuple[Path, ...] = (),
) -> tuple[str, str] | None:
    """(task, how it was recognised) when a dataset is one of the tasks T0 held out, by its
    ``name``, its templates file's (dataset, subset) ``header``, or the folders of ``paths``
    (the templates file and the data); None otherwise."""
    candidates = [(name, f"its name {name!r}")]
    dataset, subset = header
    if dataset is not None:
        spelled = f"{dataset}/{subset}" if subset else dataset
        candidates.append((spelled, f"its templates file's header {spelled!r}"))
    for p in paths:
        # PromptSource's <dataset>/<subset>/templates.yaml, opt eval's <task>/<split>.jsonl,
        # a save_to_disk <task>/ directory: the last two folders name the data.
        folders = (Path(p).parts if Path(p).is_dir() else Path(p).parent.parts)[-2:]
        candidates += [(folder, f"the folder {folder!r} in {p}") for folder in folders]
    for spelled, how in candidates:
        task = _task_of(spelled)
        if task is not None:
            return task, how
    return None


def _task_of(spelled: str) -> str | None:
    """The known task a dataset spelling names: ``rte``, ``super_glue/rte``,
    ``wsc.fixed``, ``winogrande/winogrande_xl``, ``story_cloze/2016``, ``anli_r1``..."""
    parts = [p for p in spelled.strip().lower().split("/") if p]
    if not parts:
        return None
    if parts[0] in _CONTAINERS and len(parts) > 1:
        key = parts[1]
    elif len(parts) > 1 and _ALIASES.get(parts[0], parts[0]) in T0_CLUSTERS:
        key = parts[0]  # <dataset>/<subset>: the dataset decides
    else:
        key = parts[-1] if len(parts) == 1 else parts[0]
    key = _ALIASES.get(key, key)
    return key if key in T0_CLUSTERS else None


def _refuse_leak(
    where: str,
    name: str,
    cluster: str,
    held_out: tuple[str, ...],
    header_dataset: str | None,
    header_subset: str | None,
    templates_file: Path,
    data: Path,
) -> None:
    held = {c.lower() for c in held_out}
    found = known_task(name, (header_dataset, header_subset), (templates_file, data))
    if found is not None:
        task, how = found
        t0 = T0_CLUSTERS[task]
        if cluster.lower() != t0:
            also = " (a held-out cluster)" if t0 in held else ""
            raise OptError(
                f"{where}: this is {task} (by {how}), which T0 puts in cluster {t0!r}{also}, "
                f"but it is declared {cluster!r}: a leak cannot hide behind another label"
            )
    if cluster.lower() in held:
        raise OptError(
            f"{where}: cluster {cluster!r} is held out (held_out_clusters = "
            f"{list(held_out)}); training on it would leak the held-out evaluation"
        )


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptError(f"{what} must be an integer, not {value!r}")
    return value
