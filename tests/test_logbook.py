"""The typed logbook without training: every kind through the file, validation on write
and on read, torn lines, version-0 files (the committed demo among them), redaction, the
renderers, and what recovery reads back."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from helpers import REPO
from pydantic import ValidationError

from opt.errors import OptError
from opt.run.logbook import Logbook, read_events
from opt.run.logbook.codec import EVENT_TYPES, parse_event, to_json
from opt.run.logbook.describe import describe
from opt.run.logbook.events import (
    SCHEMA_VERSION,
    AllocationEnd,
    AllocationStart,
    CheckpointSkipped,
    ConfigChange,
    DataEpoch,
    DownstreamEval,
    GaveUp,
    Hyperparameters,
    Intervention,
    InterventionCompletedAfterRestart,
    JobSubmitted,
    ManualIntervention,
    NodeExcluded,
    Note,
    Outcome,
    Requeue,
    RunStart,
    RunStop,
    StopForHuman,
    StragglerDetected,
    TaskAccuracy,
    ValidLoss,
)
from opt.run.logbook.redact import REDACTED
from opt.run.logbook.report import render_html, run_dir_of
from opt.run.logbook.summary import format_summary, summary
from opt.run.logbook.tables import markdown, timeline
from opt.run.recovery import PendingRollback, pending_rollback

# The demo's logbook as committed before events had a schema version (version 0), kept
# as it was; the committed demo logbook itself is rewritten whenever the demo is rerun.
DEMO_V0 = REPO / "tests" / "data" / "logbook_v0_demo"
DEMO = REPO / "logbook" / "demo"
BEFORE = Hyperparameters(lr_scale=1.0, grad_clip=1.0, adam_eps=1e-8, adam_beta2=0.95)
LOWER = Hyperparameters(lr_scale=0.9, grad_clip=0.6, adam_eps=1e-8, adam_beta2=0.95)


def one_of_each() -> list:
    """One event of every kind, with the fields today's writers set."""
    return [
        RunStart(step=0, tokens=0, reason="fresh", world_size=2, model="opt-tiny",
                 layout={"world_size": 2, "tp": 2, "sequence_parallel": False}, run_dir="runs/r"),
        ConfigChange(step=5, changes={"optim.lr": (1e-3, 5e-4), "data.path": (None, "x")}),
        CheckpointSkipped(step=None, checkpoint="ck/step_00000006", problem="truncated",
                          set_aside_as="step_00000006.corrupt"),
        Intervention(step=30, tokens=61440, detector="loss_spike", action="skip",
                     numbers={"loss": 9.5, "fired": ["loss_spike"]}, before=BEFORE, after=BEFORE,
                     detail="loss 9.5 vs median 6.1"),
        Intervention(step=31, tokens=63488, detector="loss_spike", action="rollback+lower_lr_clip",
                     before=BEFORE, after=LOWER, checkpoint="ck/step_00000025",
                     rolled_back_to_step=25, tokens_lost=12288, discarded_checkpoints=["step_30"],
                     skipped_data=(100, 140), skipped_steps=(26, 30)),
        ManualIntervention(step=40, tokens=81920, reason="drill", before=LOWER, after=BEFORE,
                           skipped_data=(200, 220), skipped_steps=(41, 42)),
        StopForHuman(step=50, detector="nonfinite", action="stop", before=LOWER,
                     reason="nonfinite at step 50: ladder exhausted"),
        Outcome(step=45, intervention_step=31, incident_start=30, rungs=["skip", "rollback"],
                pre_incident_loss=6.2, result="recovered", recovered=True, recovered_at_step=33,
                judged_at_step=45),
        InterventionCompletedAfterRestart(step=25, tokens=51200, from_step=31, before=BEFORE,
                                          after=LOWER, skipped_data=[(100, 140)]),
        Note(step=40, text="looked at the spike", author="ann"),
        RunStop(step=60, tokens=122880, reason="finished: reached max_steps", gpu_hours=0.0,
                energy_source="CPU run: not estimated"),
        JobSubmitted(job_id="17", nodes=2, ranks=16, partition="gpu", time_minutes=60),
        AllocationStart(job_id="17", restart=1, hosts=["n1", "n2"], ranks=16),
        AllocationEnd(job_id="17", step=60, result="finished"),
        Requeue(cause="process_failure", job_id="17", requeued_by="opt", step=12, hosts=["n2"],
                ranks="9", detail="Killed", checkpoint="ck/step_00000010"),
        NodeExcluded(job_id="17", hosts=["n2"], exclude="n2", failures={"n2": 2}),
        GaveUp(job_id="17", cause="timeout", requeues_used=3, limit=3, step=60),
        StragglerDetected(step=150, tokens=307200, rank=9, host="n2", seconds_per_block=0.031,
                          median_seconds_per_block=0.0124, ratio=2.5, windows=3, every=50),
        DownstreamEval(step=200, tokens=409600, split="validation", shots=0, seconds=2.5,
                       tasks={"rte": TaskAccuracy(median=0.52, iqr=0.04, min=0.47, max=0.6,
                                                  prompts=10, examples=64)}),
        DataEpoch(step=120, tokens=245760, source="wiki", epochs=2, samples=5120),
    ]  # fmt: skip


def test_the_samples_cover_every_kind():
    assert {e.kind for e in one_of_each()} == set(EVENT_TYPES)


@pytest.mark.parametrize("event", one_of_each(), ids=lambda e: e.kind)
def test_each_kind_round_trips_through_the_file(event, tmp_path):
    book = Logbook(tmp_path, "r")
    written = book.append(event)
    assert written == event.model_copy(update={"run": "r"})
    (read,) = read_events(book.events_path)
    assert read == written and type(read) is type(event)
    line = json.loads(book.events_path.read_text())
    assert list(line)[:4] == ["v", "time", "run", "kind"] and line["v"] == SCHEMA_VERSION
    assert None not in line.values()  # unset optional fields are left out
    assert (tmp_path / "r" / "LOGBOOK.md").read_text().count("\n| ") == 3  # header + 1 row


def test_a_diverged_loss_is_written_as_strict_json_and_read_back(tmp_path):
    book = Logbook(tmp_path, "r")
    book.append(Outcome(intervention_step=3, incident_start=2, rungs=["skip"], result="no",
                        pre_incident_loss=float("nan"), recovered=False, judged_at_step=9))  # fmt: skip
    book.append(Intervention(step=3, detector="nonfinite", action="skip", before=BEFORE,
                             after=BEFORE, numbers={"loss": float("inf")}))  # fmt: skip
    text = book.events_path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    outcome, intervention = read_events(book.events_path)
    assert math.isnan(outcome.pre_incident_loss)
    assert intervention.numbers["loss"] == "inf"  # a number of the detector's, kept as written


def test_a_misspelled_field_is_refused_when_writing(tmp_path):
    with pytest.raises(ValidationError, match="txt"):
        Note(txt="typo")
    with pytest.raises(ValidationError, match="rolled_back_to"):
        Intervention(detector="x", action="skip", before=BEFORE, after=BEFORE,
                     rolled_back_to=25)  # fmt: skip
    with pytest.raises(ValidationError, match="cause"):
        Requeue(cause="tiemout", job_id="1", requeued_by="opt")
    # An event built without validation is still checked by the store, and nothing is written.
    book = Logbook(tmp_path, "r")
    unchecked = Requeue.model_construct(cause="tiemout", job_id="1", requeued_by="opt")
    with pytest.raises(OptError, match=r"refused to write an event: requeue event: field 'cause'"):
        book.append(unchecked)
    assert not book.events_path.exists()


def _write(path: Path, *lines: str, end: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + end)
    return path


NOTE = json.dumps({"v": 1, "time": "t", "run": "r", "kind": "note", "text": "hello"})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not a JSON line"),
        ("[1, 2]", "not a JSON object but list"),
        ('{"v": 1, "time": "t", "kind": "rollback"}', "unknown event kind 'rollback'"),
        ('{"v": 1, "time": "t", "kind": "note", "text": "x", "txet": 1}',
         "note event: unknown field 'txet'"),
        ('{"v": 1, "time": "t", "kind": "requeue", "job_id": "1", "requeued_by": "opt"}',
         "requeue event: missing field 'cause'"),
        ('{"v": 1, "time": "t", "kind": "allocation_start", "job_id": "1", "restart": "x"}',
         "allocation_start event: field 'restart'"),
        ('{"v": 7, "time": "t", "kind": "note", "text": "x"}', "schema version 7"),
    ],
)  # fmt: skip
def test_a_malformed_line_is_refused_on_reading_with_the_file_and_line(bad, message, tmp_path):
    path = _write(tmp_path / "r" / "events.jsonl", NOTE, bad, NOTE)
    with pytest.raises(OptError, match=f"^{path}:2: .*{message}") as err:
        read_events(path)
    assert "\n" not in str(err.value)


def test_a_malformed_last_line_is_an_error_too_when_it_is_complete(tmp_path):
    path = _write(tmp_path / "events.jsonl", NOTE, '{"v": 1, "kind": "nope"}')
    with pytest.raises(OptError, match=f"{path}:2: unknown event kind"):
        read_events(path)


def test_a_torn_last_line_is_skipped_and_the_next_append_cuts_it_off(tmp_path):
    book = Logbook(tmp_path, "r")
    book.append(Note(text="one", step=1))
    with book.events_path.open("ab") as f:
        f.write(NOTE[:30].encode())  # what a machine dying mid-write leaves
    assert [e.text for e in read_events(book.events_path)] == ["one"]
    book.append(Note(text="two", step=2))
    raw = book.events_path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 2
    assert [e.text for e in book.events()] == ["one", "two"]
    # A whole last line that lost only its newline is an event; an append keeps it.
    _write(book.events_path, NOTE, end="")
    assert [e.text for e in read_events(book.events_path)] == ["hello"]
    book.append(Note(text="three"))
    assert [e.text for e in book.events()] == ["hello", "three"]


def test_the_version_0_demo_logbook_reads_and_renders_as_before():
    events = read_events(DEMO_V0 / "events.jsonl")
    assert [type(e) for e in events] == [RunStart, Intervention, Intervention, Outcome, RunStop]
    rollback = events[2]
    assert rollback.rolled_back_to_step == 100 and rollback.after == LOWER
    assert markdown("demo", events, "events.jsonl") == (DEMO_V0 / "LOGBOOK.md").read_text()
    committed = (DEMO_V0 / "report.html").read_text()
    page = render_html("demo", events)

    def timeline_table(html: str) -> str:
        return html[html.index("<h2>Timeline") : html.index("<h2>Config")]

    # The same rows and words, the Markdown bold now rendered as HTML.
    bold = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", timeline_table(committed))
    assert timeline_table(page) == bold and "**" not in page
    s = summary(events)
    assert s["by_action"] == {"skip": 1, "rollback+lower_lr_clip": 1}
    assert (s["steps_lost_to_rollbacks"], s["tokens_lost_to_rollbacks"]) == (21, 43008)
    assert s["current"] == {"lr_scale": 0.9, "grad_clip": 0.6} and s["recovered"] == 1
    assert timeline(events).splitlines()[2].split()[:3] == ["2026-11-25T17:34:46+00:00", "120",
                                                            "245,760"]  # fmt: skip


def test_the_committed_demo_logbook_is_current_and_tells_the_same_story():
    """The demo's public logbook: every line of the current schema, the same events as the
    version-0 one (the drill's skip and rollback to step 100, the outcome, the stop)."""
    lines = [json.loads(line) for line in (DEMO / "events.jsonl").read_text().splitlines()]
    assert {line["v"] for line in lines} == {SCHEMA_VERSION}
    events, old = read_events(DEMO / "events.jsonl"), read_events(DEMO_V0 / "events.jsonl")
    assert [(type(e), e.step) for e in events] == [(type(e), e.step) for e in old]
    assert [getattr(e, "action", None) for e in events] == [getattr(e, "action", None) for e in old]
    assert markdown("demo", events, "events.jsonl") == (DEMO / "LOGBOOK.md").read_text()


# Lines as the writers before typed events wrote them: no "v", lists for pairs, nulls.
V0 = {
    "run_start": {"step": 20, "tokens": 5120, "reason": "resumed",
                  "checkpoint": "ck/step_00000020", "world_size": 1,
                  "layout": {"world_size": 1, "pp": 1, "sequence_parallel": False},
                  "model": "opt-tiny", "run_dir": "runs/r", "previous_state": "running",
                  "previous_step": 22, "lost_steps": 2, "lost_tokens": 512, "lost_s": 4.5},
    "config_change": {"step": 5, "changes": {"optim.lr": [0.001, 0.0005]}},
    "run_stop": {"step": 8, "tokens": 2048, "reason": "finished: reached max_steps",
                 "gpu_hours": 0.0, "energy_kwh": None, "energy_source": "CPU run: not estimated"},
    "checkpoint_skipped": {"checkpoint": "ck/step_6", "problem": "short",
                           "set_aside_as": "step_6.corrupt"},
    "intervention": {"step": 31, "tokens": 7936, "detector": "loss_spike",
                     "numbers": {"loss": "nan", "fired": ["nonfinite"]},
                     "action": "rollback+lower_lr_clip+skip_data",
                     "before": BEFORE.model_dump(), "checkpoint": "ck/step_00000025",
                     "rolled_back_to_step": 25, "tokens_lost": 1536, "after": LOWER.model_dump(),
                     "skipped_data": [10, 20], "skipped_steps": [26, 30],
                     "discarded_checkpoints": ["step_00000030"], "detail": "loss nan"},
    "manual_intervention": {"step": 6, "tokens": 1536, "action": "manual", "reason": "",
                            "before": BEFORE.model_dump(),
                            "detail": "unreadable request: Expecting value"},
    "stop_for_human": {"step": 33, "tokens": 8448, "detector": "loss_spike", "numbers": {},
                       "action": "stop", "before": LOWER.model_dump(), "detail": "",
                       "reason": "loss_spike at step 33: ladder exhausted"},
    "outcome": {"step": 45, "tokens": 1, "intervention_step": 31, "incident_start": 30,
                "rungs": ["skip"], "pre_incident_loss": 6.1, "result": "not recovered",
                "recovered": False, "recovered_at_step": None, "judged_at_step": 45},
    "intervention_completed_after_restart": {"step": 25, "tokens": 6400,
                                             "before": BEFORE.model_dump(),
                                             "after": LOWER.model_dump(),
                                             "skipped_data": [[10, 20]], "from_step": 31},
    "note": {"step": 40, "text": "checked", "author": "ann", "api_key": REDACTED, "ticket": 7},
    "job_submitted": {"job_id": "17", "nodes": 1, "ranks": 2, "partition": None,
                      "time_minutes": 20},
    "allocation_start": {"job_id": "17", "restart": 0, "hosts": ["n1"], "ranks": 2},
    "allocation_end": {"job_id": "17", "step": 14, "result": "finished"},
    "requeue": {"cause": "node_failure", "job_id": "17", "requeued_by": "slurm", "hosts": [],
                "allocation_hosts": ["n1"],
                "detail": "the previous allocation ended without the driver's report"},
    "node_excluded": {"job_id": "17", "hosts": ["n1"], "exclude": "n1", "failures": {"n1": 1}},
    "gave_up": {"job_id": "17", "step": None, "cause": "node_failure", "requeues_used": 2,
                "limit": 2, "hosts": [], "allocation_hosts": ["n1"], "detail": "gone"},
    "straggler": {"step": 150, "rank": 9, "host": "n2", "seconds_per_block": 0.031,
                  "median_seconds_per_block": 0.0124, "ratio": 2.5, "windows": 3, "every": 50},
    "downstream_eval": {"step": 200, "split": "validation", "shots": 0, "seconds": 2.5,
                        "tasks": {"rte": {"median": 0.5, "iqr": 0.0, "min": 0.5, "max": 0.5,
                                          "prompts": 1, "examples": 8}}},
    "data_epoch": {"step": 120, "source": "wiki", "epochs": 1, "samples": 5120},
}  # fmt: skip


def test_version_0_lines_of_every_kind_are_upgraded(tmp_path):
    assert set(V0) == set(EVENT_TYPES)
    lines = [json.dumps({"time": "2026-11-25T17:34:02+00:00", "run": "old", "kind": kind, **f})
             for kind, f in V0.items()]  # fmt: skip
    events = read_events(_write(tmp_path / "events.jsonl", *lines))
    assert [e.kind for e in events] == list(V0)
    for event in events:
        assert event.v == SCHEMA_VERSION and isinstance(event, EVENT_TYPES[event.kind])
        describe(event)  # every kind has words
    by_kind = {e.kind: e for e in events}
    assert by_kind["config_change"].changes == {"optim.lr": (0.001, 0.0005)}
    assert by_kind["intervention"].skipped_data == (10, 20)
    assert by_kind["intervention"].after == LOWER
    assert by_kind["manual_intervention"].after is None
    assert by_kind["intervention_completed_after_restart"].skipped_data == [(10, 20)]
    assert by_kind["note"].extra == {"api_key": REDACTED, "ticket": 7}
    assert by_kind["gave_up"].allocation_hosts == ["n1"]


def test_version_0_fields_missing_get_the_defaults_their_readers_assumed():
    requeue = parse_event({"kind": "requeue", "cause": "timeout", "time": "t"})
    assert (requeue.job_id, requeue.requeued_by, requeue.hosts) == ("?", "opt", [])
    assert parse_event({"kind": "allocation_start", "time": "t"}).job_id == "?"
    # Version 1 has no such leniency.
    with pytest.raises(ValueError, match="missing field 'requeued_by'"):
        parse_event({"v": 1, "kind": "requeue", "cause": "timeout", "job_id": "1"})
    with pytest.raises(ValueError, match="unknown field 'api_key'"):
        parse_event({"v": 1, "kind": "note", "text": "x", "api_key": "k"})


def test_secrets_are_redacted_in_typed_fields_and_keep_their_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    book = Logbook(tmp_path, "r")
    written = book.append(ConfigChange(changes={
        "hub.api_key": ("old-secret-value", None),
        "data.path": ("/data/0123456789abcdef/x", "/data/y"),
    }))  # fmt: skip
    assert written.changes == {"hub.api_key": (REDACTED, None),
                               "data.path": (f"/data/{REDACTED}/x", "/data/y")}  # fmt: skip
    text = book.events_path.read_text() + (tmp_path / "r" / "LOGBOOK.md").read_text()
    assert "old-secret-value" not in text and "0123456789abcdef" not in text
    assert book.events() == [written]


def test_the_renderers_read_the_typed_events():
    events = [e.model_copy(update={"time": f"2026-01-01T00:00:{i:02d}+00:00"})
              for i, e in enumerate(one_of_each())]  # fmt: skip
    lines = [describe(e) for e in events]
    assert lines[0] == "run started (fresh) on 2 rank(s)"
    assert (
        lines[1]
        == '{"step": 5, "changes": {"optim.lr": [0.001, 0.0005], "data.path": [null, "x"]}}'
    )
    assert lines[4] == (
        "**rollback+lower_lr_clip** after loss_spike rolled back to ck/step_00000025 "
        "lr_scale 1 → 0.9; grad_clip 1 → 0.6 skipped data [100, 140]"
    )
    assert lines[5].startswith("**manual** after an operator's request (drill) lr_scale 0.9 → 1")
    assert lines[8] == (
        "restart finished the rollback logged at step 31: lr_scale 0.9, grad_clip 0.6, "
        "1 data skip(s) re-applied"
    )
    assert lines[14] == (
        "**process failure** on n2 (rank(s) 9: Killed); job 17 requeued by opt, "
        "last checkpoint step_00000010"
    )
    assert lines[16] == "**gave up** after timeout: 3 of 3 requeues used"
    assert lines[17] == (
        "**straggler**: rank 9 on n2 spent 31 ms per block forward, 2.50x the median 12.4 ms, "
        "for 3 consecutive windows of 50 steps"
    )
    assert describe(GaveUp(job_id="1", cause="refused", detail="bad config")) == (
        "**gave up**: bad config"
    )
    page = markdown("r", [*events, Note(time="t", text="a | b")], "events.jsonl")
    assert page.count("\n| ") == 2 + len(events) + 1 and "note: a \\| b" in page
    table = timeline(events).splitlines()
    assert len(table) == 1 + len(events) and table[3].split()[:2] == ["2026-01-01T00:00:02+00:00",
                                                                       "skipped"]  # fmt: skip
    s = summary(events)
    assert s["interventions"] == 4 and s["by_detector"] == {"loss_spike": 2}
    assert s["by_action"] == {"skip": 1, "rollback+lower_lr_clip": 1, "manual": 1, "stop": 1}
    assert (s["steps_lost_to_rollbacks"], s["tokens_lost_to_rollbacks"]) == (6, 12288)
    assert s["restarts_by_cause"] == {"process_failure": 1} and s["notes"] == 1
    assert s["current"] == {"lr_scale": 0.9, "grad_clip": 0.6}  # the restart's re-applied factors
    assert "restarts: 1 (process failure 1)" in format_summary("r", s)
    assert s["stragglers"] == ["rank 9 on n2 at step 150 (2.50x)"]
    assert "stragglers named: rank 9 on n2 at step 150 (2.50x)" in format_summary("r", s)
    assert run_dir_of(events) == Path("runs/r")
    page = render_html("r", events)
    assert "no series in this logbook" in page and page.count("<tr><td>") == len(events)
    assert json.loads(page[page.index("<h2>Events") :].split("<pre>")[1].split("</pre>")[0]
                      .replace("&quot;", '"')) == [to_json(e) for e in events]  # fmt: skip
    # The chart and its marks are tested in test_logbook_report.py.


def test_the_validation_loss_around_an_intervention_is_written_read_and_rendered(tmp_path):
    """Optional fields: the last validation before, and one right after a rollback or an
    operator's change; events without them (every older line) render as before."""
    before, after = ValidLoss(step=30, loss=4.56789), ValidLoss(step=25, loss=4.5)
    events = [
        _rollback(31, 25, checkpoint="ck/step_00000025", valid_before=before, valid_after=after),
        Intervention(step=30, detector="loss_spike", action="skip", before=BEFORE, after=BEFORE,
                     valid_before=ValidLoss(step=25, loss=float("nan"))),
        ManualIntervention(step=40, before=BEFORE, after=LOWER, valid_before=before,
                           valid_after=ValidLoss(step=40, loss=4.4)),
        StopForHuman(step=50, detector="nonfinite", action="stop", before=LOWER, reason="gone",
                     valid_before=before),
    ]  # fmt: skip
    book = Logbook(tmp_path, "r")
    for event in events:
        book.append(event)
    read = read_events(book.events_path)
    assert read[0].valid_before == before and read[0].valid_after == after
    assert math.isnan(read[1].valid_before.loss) and read[1].valid_after is None
    assert [e.valid_before for e in read[2:]] == [before, before]
    assert describe(read[0]) == (
        "**rollback+lower_lr_clip** after loss_spike rolled back to ck/step_00000025 "
        "lr_scale 1 → 0.9; grad_clip 1 → 0.6 validation loss 4.5679 (step 30) → 4.5000 (step 25)"
    )
    assert describe(read[1]).endswith("after loss_spike validation loss nan (step 25)")
    assert describe(read[2]).endswith("validation loss 4.5679 (step 30) → 4.4000 (step 40)")
    assert describe(read[3]) == (
        "**stopped for a human**: gone; last validation loss 4.5679 (step 30)"
    )
    assert "4.5679 (step 30) → 4.5000 (step 25)" in (tmp_path / "r" / "LOGBOOK.md").read_text()
    plain = _rollback(31, 25, checkpoint="ck/step_00000025")
    assert "validation" not in describe(plain)
    with pytest.raises(ValidationError):
        ValidLoss(step=3, loss=1.0, ppl=2.7)  # a misspelled or unknown field is refused


def _rollback(step: int, to: int, **fields) -> Intervention:
    return Intervention(step=step, detector="loss_spike", action="rollback+lower_lr_clip",
                        before=BEFORE, after=LOWER, rolled_back_to_step=to, **fields)  # fmt: skip


def test_a_rollback_pending_after_a_crash_is_found_with_its_factors_and_skips():
    start = RunStart(step=0, reason="fresh", world_size=1, layout={}, model="m", run_dir="r")
    skip = Intervention(step=30, detector="loss_spike", action="skip", before=BEFORE, after=BEFORE)
    rollback = _rollback(31, 25, skipped_data=(100, 140))
    manual = ManualIntervention(step=27, before=LOWER, after=LOWER.model_copy(
        update={"lr_scale": 0.5}), skipped_data=(150, 160))  # fmt: skip
    events = [start, skip, rollback, manual, Note(step=29, text="n")]
    assert pending_rollback(events, 25) == PendingRollback(
        from_step=31, after=manual.after, skipped_data=[(100, 140), (150, 160)], furthest_step=31
    )
    assert pending_rollback(events, 30) is None  # resumed elsewhere: the checkpoint holds it
    assert pending_rollback([start, skip], 25) is None
    # An earlier rollback to the same step does not count once a later one went elsewhere.
    assert pending_rollback([rollback, _rollback(50, 45)], 25) is None


def test_a_rollback_finished_by_a_restart_that_died_too_is_pending_again_once():
    rollback = _rollback(31, 25, skipped_data=(100, 140))
    again = InterventionCompletedAfterRestart(step=25, from_step=31, before=BEFORE, after=LOWER,
                                              skipped_data=[(100, 140)])  # fmt: skip
    pending = pending_rollback([rollback, again, Note(step=28, text="x")], 25)
    assert pending.skipped_data == [(100, 140)] and pending.after == LOWER
    assert pending.furthest_step == 31
