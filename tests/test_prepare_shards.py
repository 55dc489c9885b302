"""Sharded preparation (`opt data prepare --shards N`): shards in real processes, locally and
on the real Slurm, merged into the dataset one process writes, byte for byte; a failed shard
is redone alone, a missing or stale one stops the merge before anything is published."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, run_cli
from slurm_cluster import CPUS_PER_NODE

from opt.data.corpus import builtin_documents
from opt.data.prepare import save_tokenizer
from opt.data.shards import plan_shards, shard_prefix, shards_dir
from opt.data.tokenizer import train_tokenizer
from opt.errors import OptError

pytestmark = pytest.mark.timeout(300)

FILES = ("0.txt", "1.txt", "2.txt", "3.txt", "4.txt")
NAMES = ("bin", "idx", "json")
SPLIT = ["--valid-fraction", "0.1", "--split-seed", "3"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(builtin_documents(), 512), path)
    return path.parent


def write_corpus(root: Path, big_mb: float = 0.0) -> Path:
    """Five JSON-lines files of pydoc topics (empty documents and, in two files, a malformed
    record among them); with ``big_mb``,
    a sixth file, ``big.jsonl``, of that many MB of random word sequences (distinct text)."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    docs = builtin_documents()
    for i, name in enumerate(FILES):
        lines = [json.dumps({"text": d}) for d in docs[i * 16 : (i + 1) * 16]]
        lines.insert(3, json.dumps({"text": ""}))
        if i in (0, 3):
            lines.insert(5, '{"text": "a record cut sh')  # malformed: skipped and counted
        (corpus / name.replace(".txt", ".jsonl")).write_text("\n".join(lines) + "\n")
    if big_mb:
        words = " ".join(docs).split()
        rng = random.Random(0)
        with (corpus / "2b-big.jsonl").open("w") as f:  # sorts after 2.jsonl: file 3 of 6
            written = 0
            while written < big_mb * 1e6:
                line = json.dumps({"text": " ".join(rng.choices(words, k=400))}) + "\n"
                written += f.write(line)
    return corpus


def prepare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("data", "prepare", *args, "--no-progress", cwd=cwd, timeout=240)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def files_of(prefix: Path) -> dict[str, bytes]:
    return {
        f"{p}.{n}": Path(f"{p}.{n}").read_bytes()
        for p in (prefix, Path(f"{prefix}-valid"))
        for n in NAMES
    }


def shard_stats(prefix: Path, count: int, indices=None) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of the files of the shards ``indices`` (default: all): a redone
    shard's files are new files."""
    stats = {}
    for i in range(count) if indices is None else indices:
        for n in NAMES:
            st = Path(f"{shard_prefix(prefix, i, count)}.{n}").stat()
            stats[f"{i}.{n}"] = (st.st_ino, st.st_mtime_ns)
    return stats


def one_process(tmp_path: Path, corpus: Path, tokenizer_dir: Path) -> dict[str, bytes]:
    ok(prepare("corpus", "--tokenizer", str(tokenizer_dir), "--out", "one/ds", *SPLIT,
               cwd=corpus.parent))  # fmt: skip
    return files_of(corpus.parent / "one" / "ds")


def sharded(corpus: Path, tokenizer_dir: Path, *mode: str, shards: int = 3):
    return prepare("corpus", "--tokenizer", str(tokenizer_dir), "--out", "sh/ds", *SPLIT,
                   "--shards", str(shards), *mode, cwd=corpus.parent)  # fmt: skip


def renamed(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k.replace("one/", "sh/"): v for k, v in files.items()}


# ----- the plan -------------------------------------------------------------------------------
def test_the_plan_cuts_contiguous_runs_balanced_by_size() -> None:
    assert plan_shards([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert plan_shards([100, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
    assert plan_shards([1, 1, 1, 100], 3) == [(0, 2), (2, 3), (3, 4)]  # every shard a file
    assert plan_shards([5, 5, 5], 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(OptError, match="4 shards of 3 input file"):
        plan_shards([5, 5, 5], 4)


# ----- local processes ------------------------------------------------------------------------
def test_three_shards_merged_are_byte_identical_to_one_process(tmp_path, tokenizer_dir) -> None:
    corpus = write_corpus(tmp_path)
    expected = one_process(tmp_path, corpus, tokenizer_dir)
    out = ok(sharded(corpus, tokenizer_dir, "--launch", "local"))
    assert "preparing shards 0, 1, 2 of 3 in 3 processes" in out
    assert files_of(tmp_path / "sh" / "ds") == renamed(expected)  # metadata included
    meta = json.loads(Path(f"{shard_prefix(tmp_path / 'sh' / 'ds', 1, 3)}.json").read_text())
    recipe = meta["shard"]["recipe"]
    assert [Path(i["path"]).name for i in recipe["inputs"]] == [
        f.replace(".txt", ".jsonl") for f in FILES
    ]
    assert recipe["text_key"] == "text" and recipe["shards"] == 3
    assert all(i["bytes"] == (corpus / Path(i["path"]).name).stat().st_size
               for i in recipe["inputs"])  # fmt: skip
    # Run by hand, one shard at a time, then the merge: the same bytes again.
    for index in range(3):
        ok(prepare("corpus", "--tokenizer", str(tokenizer_dir), "--out", "hand/ds",
                   "--shards", "3", "--shard-index", str(index), cwd=tmp_path))  # fmt: skip
    ok(prepare("corpus", "--tokenizer", str(tokenizer_dir), "--out", "hand/ds", *SPLIT,
               "--shards", "3", "--merge", cwd=tmp_path))  # fmt: skip
    assert files_of(tmp_path / "hand" / "ds") == {
        k.replace("one/", "hand/"): v for k, v in expected.items()
    }


def test_a_killed_shard_is_redone_alone_and_the_others_are_untouched(
    tmp_path, tokenizer_dir
) -> None:
    corpus = write_corpus(tmp_path, big_mb=6)
    expected = one_process(tmp_path, corpus, tokenizer_dir)
    count = 6
    prefix = tmp_path / "sh" / "ds"
    for index in (0, 1, 2, 4, 5):
        ok(sharded(corpus, tokenizer_dir, "--shard-index", str(index), shards=count))
    # Shard 3 (the big file) in a real process, SIGKILLed while it writes.
    argv = [sys.executable, "-m", "opt", "data", "prepare", "corpus", "--tokenizer",
            str(tokenizer_dir), "--out", "sh/ds", "--shards", str(count), "--shard-index", "3",
            "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    name = shard_prefix(prefix, 3, count).name
    deadline = time.monotonic() + 120
    while not list(shards_dir(prefix).glob(f".{name}.bin.*.tmp")):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "shard 3 never started writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not Path(f"{shard_prefix(prefix, 3, count)}.json").exists()
    before = shard_stats(prefix, count, (0, 1, 2, 4, 5))

    failed = sharded(corpus, tokenizer_dir, "--merge", shards=count)
    assert failed.returncode == 2 and not (tmp_path / "sh" / "ds.json").exists()
    assert "(shard 3 in sh/ds.shards)" in failed.stderr

    assert list(shards_dir(prefix).glob(f".{name}.*.tmp"))  # what the killed one left
    out = ok(sharded(corpus, tokenizer_dir, "--launch", "local", shards=count))
    assert f"preparing shards 3 of {count} in 1 processes" in out
    assert list(shards_dir(prefix).glob(".*.tmp")) == []  # cleared by the redone shard
    assert shard_stats(prefix, count, (0, 1, 2, 4, 5)) == before
    assert files_of(prefix) == renamed(expected)
    # Everything is there now: the same command prepares nothing and merges the same bytes.
    stats = shard_stats(prefix, count)
    out = ok(sharded(corpus, tokenizer_dir, "--launch", "local", shards=count))
    assert f"all {count} shards are prepared already" in out
    assert shard_stats(prefix, count) == stats and files_of(prefix) == renamed(expected)


def test_a_merge_with_a_missing_shard_fails_in_one_line_and_publishes_nothing(
    tmp_path, tokenizer_dir
) -> None:
    corpus = write_corpus(tmp_path)
    old = one_process(tmp_path, corpus, tokenizer_dir)
    (tmp_path / "sh").mkdir()
    for name, data in renamed(old).items():  # an earlier dataset, which must survive
        (tmp_path / name).write_bytes(data)
    for index in (0, 2):
        ok(sharded(corpus, tokenizer_dir, "--shard-index", str(index), shards=4))
    result = sharded(corpus, tokenizer_dir, "--merge", shards=4)
    assert result.returncode == 2 and result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line
    assert re.search(r"2 of 4 shards are missing .* \(shard 1, 3 in sh/ds\.shards\)", line)
    assert "--shards 4 --shard-index I" in line and "--launch local" in line
    assert files_of(tmp_path / "sh" / "ds") == renamed(old)
    assert [p.name for p in (tmp_path / "sh").iterdir() if p.name.startswith(".")] == []


def test_changed_inputs_or_tokenizer_invalidate_every_shard(tmp_path, tokenizer_dir) -> None:
    corpus = write_corpus(tmp_path)
    ok(sharded(corpus, tokenizer_dir, "--launch", "local"))
    # An input edited in place: every shard is stale (the plan depends on every size).
    with (corpus / "4.jsonl").open("a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    failed = sharded(corpus, tokenizer_dir, "--merge")
    assert failed.returncode == 2 and "3 of 3 shards are missing" in failed.stderr
    out = ok(sharded(corpus, tokenizer_dir, "--launch", "local"))
    assert "preparing shards 0, 1, 2 of 3" in out
    assert files_of(tmp_path / "sh" / "ds") == renamed(one_process(tmp_path, corpus, tokenizer_dir))
    # Another tokenizer: stale again, and a shard run alone redoes itself.
    other = tmp_path / "other-tok"
    save_tokenizer(train_tokenizer(builtin_documents(), 600), other / "tokenizer.json")
    failed = prepare("corpus", "--tokenizer", str(other), "--out", "sh/ds", "--shards", "3",
                     "--merge", cwd=tmp_path)  # fmt: skip
    assert failed.returncode == 2 and "3 of 3 shards are missing" in failed.stderr
    out = ok(prepare("corpus", "--tokenizer", str(other), "--out", "sh/ds", "--shards", "3",
                     "--shard-index", "0", cwd=tmp_path))  # fmt: skip
    assert out.startswith("prepared shard 0 of 3")


def test_bad_records_are_counted_and_limited_over_the_whole_corpus(tmp_path, tokenizer_dir):
    corpus = write_corpus(tmp_path)  # 2 bad records of 82, one in shard 0, one in shard 2
    # A fraction of the whole corpus: shard 0 alone has 1 in 18 bad, more than 3%; the whole
    # corpus 2.4%, which one process accepts, and so does the merge.
    limit = ["--max-bad-records", "0.03"]
    ok(prepare("corpus", "--tokenizer", str(tokenizer_dir), "--out", "one/ds", *SPLIT, *limit,
               cwd=tmp_path))  # fmt: skip
    expected = files_of(tmp_path / "one" / "ds")
    meta = json.loads((tmp_path / "one" / "ds.json").read_text())
    assert meta["source"]["bad_records"]["count"] == 2
    out = ok(sharded(corpus, tokenizer_dir, "--launch", "local", *limit))
    assert "skipped 2 bad records: " in out
    assert files_of(tmp_path / "sh" / "ds") == renamed(expected)
    # A count: one process stops at the second; each shard has one, the merge sees two.
    assert prepare("corpus", "--tokenizer", str(tokenizer_dir), "--out", "one/ds",
                   "--max-bad-records", "1", cwd=tmp_path).returncode == 2  # fmt: skip
    failed = sharded(corpus, tokenizer_dir, "--merge", "--max-bad-records", "1")
    assert failed.returncode == 2
    assert "error: 2 bad records in the shards, more than 1" in failed.stderr
    assert files_of(tmp_path / "sh" / "ds") == renamed(expected)  # the old one stays


def test_more_shards_than_files_is_one_clear_line(tmp_path, tokenizer_dir) -> None:
    corpus = write_corpus(tmp_path)
    result = sharded(corpus, tokenizer_dir, "--launch", "local", shards=6)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: 6 shards of 5 input file(s): a shard is a run of whole files, so use "
        "--shards 5 or fewer, or split the input into more files"
    )
    assert not shards_dir(tmp_path / "sh" / "ds").exists()


# ----- the real Slurm ---------------------------------------------------------------------------
def wait_for_job(cluster, job_id: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=cluster.env,
                               capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
        if not state:
            return
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=cluster.env, timeout=30)
            raise AssertionError(f"job {job_id} still {state} after {timeout} s")
        time.sleep(0.5)


def submit(cluster, corpus: Path, tokenizer_dir: Path) -> tuple[str | None, str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "opt", "data", "prepare", "corpus", "--tokenizer",
         str(tokenizer_dir), "--out", "sh/ds", *SPLIT, "--shards", "3", "--launch", "slurm",
         "--time", "10", "--cpus-per-task", "1"],
        cwd=corpus.parent, env={**cluster.env, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    array = re.search(r"submitted job array (\d+)", result.stdout)
    merge = re.search(r"submitted merge job (\d+)", result.stdout).group(1)
    return (array.group(1) if array else None), merge, result.stdout


def merge_log(tmp_path: Path, job: str) -> str:
    return (tmp_path / "sh" / "ds.shards" / "slurm" / job / f"{job}_0_log.out").read_text()


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_a_slurm_job_array_prepares_the_same_bytes_and_a_failed_task_is_redone_alone(
    slurm_cluster, tmp_path, tokenizer_dir
) -> None:
    corpus = write_corpus(tmp_path)
    expected = one_process(tmp_path, corpus, tokenizer_dir)
    prefix = tmp_path / "sh" / "ds"
    # A real failure of one array task: a directory squats on shard 1's metadata path, so
    # its publication fails (an I/O error, as from a full or broken file system).
    squatter = Path(f"{shard_prefix(prefix, 1, 3)}.json")
    (squatter / "x").mkdir(parents=True)
    array, merge, out = submit(slurm_cluster, corpus, tokenizer_dir)
    assert array is not None and all(f"{array}_{i} (shard {i})" in out for i in range(3))
    wait_for_job(slurm_cluster, merge)
    assert not (tmp_path / "sh" / "ds.json").exists()
    log = merge_log(tmp_path, merge)
    assert (
        "(shard 1 in sh/ds.shards)" in log and "--time 10 --cpus-per-task 1 --launch slurm`" in log
    )
    stats = shard_stats(prefix, 3, (0, 2))

    (squatter / "x").rmdir()
    squatter.rmdir()
    array2, merge2, out2 = submit(slurm_cluster, corpus, tokenizer_dir)
    assert array2 is not None and array2 != array
    wait_for_job(slurm_cluster, merge2)
    assert "merged 3 shards" in merge_log(tmp_path, merge2)
    assert f"{array2} (shard 1)" in out2  # one task: submitit submits it as a plain job
    logs = (prefix.parent / "ds.shards" / "slurm").glob("*/*_log.out")
    task_logs = [p for p in logs if p.parent.name.split("_")[0] == array2]
    assert len(task_logs) == 1 and "prepared shard 1 of 3" in task_logs[0].read_text()
    assert shard_stats(prefix, 3, (0, 2)) == stats
    assert files_of(prefix) == renamed(expected)


def six_shards_on_slurm(slurm_cluster, tmp_path: Path, tokenizer_dir: Path):
    """A 6-shard preparation submitted to Slurm, returned once shard 3 (the big file's) is
    writing: (the one-process files to expect, the array's id, the merge's id, the prefix)."""
    write_corpus(tmp_path, big_mb=12)
    ok(prepare("corpus", "--tokenizer", str(tokenizer_dir), "--out", "one/ds", "--shards", "6",
               "--launch", "local", *SPLIT, cwd=tmp_path))  # fmt: skip
    expected = files_of(tmp_path / "one" / "ds")
    result = subprocess.run(
        [sys.executable, "-m", "opt", "data", "prepare", "corpus", "--tokenizer",
         str(tokenizer_dir), "--out", "sh/ds", *SPLIT, "--shards", "6", "--launch", "slurm",
         "--time", "10", "--cpus-per-task", "1"],
        cwd=tmp_path, env={**slurm_cluster.env, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    array = re.search(r"submitted job array (\d+)", result.stdout).group(1)
    merge = re.search(r"submitted merge job (\d+)", result.stdout).group(1)
    prefix = tmp_path / "sh" / "ds"
    name = shard_prefix(prefix, 3, 6).name  # the big file's shard
    deadline = time.monotonic() + 120
    while not list(shards_dir(prefix).glob(f".{name}.bin.*.tmp")):
        assert time.monotonic() < deadline, "shard 3 never started writing"
        time.sleep(0.01)
    return expected, array, merge, prefix


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_a_really_preempted_slurm_shard_task_and_the_merge_waits_for_it(
    slurm_cluster, tmp_path, tokenizer_dir
) -> None:
    expected, array, merge, prefix = six_shards_on_slurm(slurm_cluster, tmp_path, tokenizer_dir)
    # A real preemption (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE): a job in
    # the higher-tier partition needs every CPU of the node shard 3 runs on. Slurm cancels
    # the task's step (SIGTERM, which submitit and the opt child ignore) and, if it has not
    # ended by the end of the grace time, kills and requeues it.
    node = subprocess.run(["squeue", "-h", "-j", f"{array}_3", "-o", "%N"], env=slurm_cluster.env,
                          capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
    assert node, "shard 3's task is not running"
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", "urgent", "-N", "1", "-w", node, "-n", str(CPUS_PER_NODE),
         "-t", "2", "-o", "/dev/null", "--wrap", "sleep 5"],
        env=slurm_cluster.env, capture_output=True, text=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    assert urgent.isdigit(), urgent
    wait_for_job(slurm_cluster, merge, timeout=300)
    log = (shards_dir(prefix) / "slurm" / f"{array}_3" / f"{array}_3_0_log.out").read_text()
    # The preemption reached the running task. Within the partition's grace time (30 s) a
    # shard this small finishes; a longer one is killed at its end, requeued by Slurm and
    # redone from its start (the signal test below takes that path).
    assert "CANCELLED AT" in log and "Bypassing signal SIGTERM" in log, log
    attempts = log.count("Starting with JobEnvironment")
    assert attempts == 1 or attempts == 2, log
    assert "prepared shard 3 of 6" in log
    assert "merged 6 shards" in merge_log(tmp_path, merge)
    assert files_of(prefix) == renamed(expected)


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_a_shard_task_signalled_as_before_a_time_limit_is_requeued_and_redone(
    slurm_cluster, tmp_path, tokenizer_dir
) -> None:
    expected, array, merge, prefix = six_shards_on_slurm(slurm_cluster, tmp_path, tokenizer_dir)
    # What Slurm sends a job before its time limit (submitit's --signal=USR2@90), sent by hand.
    subprocess.run(["scancel", "--signal=USR2", f"{array}_3"], env=slurm_cluster.env,
                   check=True, timeout=30)  # fmt: skip
    wait_for_job(slurm_cluster, merge, timeout=300)
    log = (shards_dir(prefix) / "slurm" / f"{array}_3" / f"{array}_3_0_log.out").read_text()
    # submitit may take the signal for the time limit's (then it counts it against the
    # timeouts it requeues): either way the shard is requeued, and redone from its start.
    # Every start but the last was requeued. In one CI run the requeued start caught USR2
    # again 0.2 s in (scancel itself returns at once, without retrying), and was requeued
    # once more: there can be more than two starts, each ending the same way.
    starts = log.count("Starting with JobEnvironment")
    assert starts >= 2 and log.count(f"Requeued job {array}_3") == starts - 1, log
    assert "Caught signal SIGUSR2" in log
    # Only the last start wrote the shard, and nothing requeued it after that.
    assert log.count("prepared shard 3 of 6") == 1, log
    last = log.rsplit("Starting with JobEnvironment", 1)[1]
    assert "prepared shard 3 of 6" in last and "Requeued job" not in last, log
    assert "merged 6 shards" in merge_log(tmp_path, merge)
    assert files_of(prefix) == renamed(expected)
