"""Reliability (docs/reliability.md): bad input ends in one sentence and exit 2 before any model loads, a bug in
a crash log and exit 1, SIGTERM like Ctrl-C, one run per --out, and runs killed with SIGKILL or SIGTERM at seeded
points resume to the same artifacts as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_aird
from typer.testing import CliRunner

from aird.cli.main import app
from aird.core.artifacts import append_jsonl, read_jsonl
from aird.core.errors import AirdError

ENV = {**os.environ, "AIRD_ENGINE": "hf", "AIRD_LOAD_PLUGINS": "", "PYTHONUNBUFFERED": "1"}


def aird(*args, env=None):
    return run_aird(*args, env={**ENV, **(env or {})}, timeout=600)


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


# ---- the error boundary -----------------------------------------------------------------------------------
def test_an_internal_error_writes_a_crash_log_and_exits_1(tmp_path, monkeypatch):
    import aird.core.data as data

    def broken(*a, **k):
        raise TypeError("an aird bug")

    monkeypatch.setattr(data, "catalogue_status", broken)
    r = invoke("data", env={"AIRD_CRASH_DIR": str(tmp_path)})
    assert r.exit_code == 1
    assert "internal error" in r.output and str(tmp_path / "aird-crash.log") in r.output.replace("\n", "")
    log = (tmp_path / "aird-crash.log").read_text()
    assert "Traceback" in log and "TypeError: an aird bug" in log and "versions:" in log


def test_an_os_error_a_user_causes_is_one_sentence(tmp_path, monkeypatch):
    import aird.core.data as data

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.csv"))

    monkeypatch.setattr(data, "catalogue_status", denied)
    r = invoke("data", env={"AIRD_CRASH_DIR": str(tmp_path)})
    assert r.exit_code == 2 and "permission denied" in r.output and "x.csv" in r.output
    assert not (tmp_path / "aird-crash.log").exists()


# ---- bad options, caught before any model loads -----------------------------------------------------------
MISSING = "no/such/model-anywhere"   # were a model loaded first, the error would name the model


@pytest.mark.parametrize("args,msg", [
    (["eval", "-m", MISSING, "--batch-size", "0"], "--batch-size"),
    (["eval", "-m", MISSING, "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "-m", MISSING, "--limit", "0", "--suite", "utility"], "--limit"),
    (["eval", "-m", MISSING, "--limit", "-3"], "--limit"),
    (["eval", "-m", MISSING, "--suite", "utility", "--task", "arc_eazy"], "unknown zero-shot task"),
    (["eval", "-m", MISSING, "--ppl-ctx-len", "0", "--suite", "utility"], "--ppl-ctx-len"),
    (["eval", "-m", MISSING, "--harmful", "advbenh"], "unknown harmful set"),
    (["eval", "-m", MISSING, "--harmful", "none", "--benign", "none"], "no prompt set"),
    (["repair", MISSING, "-r", "x", "--alpha", "inf"], "--alpha"),
    (["repair", MISSING, "-r", "x", "--alpha", "nan"], "--alpha"),
    (["repair", MISSING, "-r", "x", "--candidates", "0"], "--candidates"),
    (["repair", MISSING, "-r", "x", "--layer", "best"], "--layer must be a whole number, default, auto, selective, gap"),
    (["probe", "-m", MISSING, "--n-train", "1"], "--n-train"),
])
def test_bad_options_fail_before_the_model_loads(args, msg):
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert msg in r.output and "not found" not in r.output


def test_out_that_is_a_file_is_refused_before_loading(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for args in (["probe", "-m", MISSING, "--out", f], ["eval", "-m", MISSING, "--out", f],
                 ["compress", "-m", MISSING, "--method", "magnitude", "--sparsity", "0.5", "--out", f / "sub"],
                 ["study", "--quick", "--out", f]):
        r = invoke(*args)
        assert r.exit_code == 2 and "is a file" in r.output, (args, r.output)
    assert f.read_text() == "x"


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    r = invoke("probe", "-m", "runs/m")
    assert r.exit_code == 2 and "does not exist" in r.output
    r = invoke("probe", "-m", "someorg/somemodel", env={"HF_HUB_OFFLINE": "1"})
    assert r.exit_code == 2 and "offline" in r.output


def test_every_model_loading_command_takes_trust_remote_code():
    for cmd in ("probe", "compress", "diff", "repair", "eval", "study"):
        assert "--trust-remote-code" in invoke(cmd, "--help").output, cmd


# ---- artifacts --------------------------------------------------------------------------------------------
def test_a_kill_inside_a_multibyte_character_is_a_torn_tail(tmp_path):
    path = tmp_path / "eval.jsonl"
    append_jsonl(path, [{"record": "eval.prompt", "completion": "好的 🙂"}])
    line = json.dumps({"record": "eval.prompt", "completion": "拒绝 🙂"}, ensure_ascii=False).encode()
    with open(path, "ab") as fh:
        fh.write(line[: line.index("🙂".encode()) + 2])   # half of the emoji's four bytes
    assert [r["completion"] for r in read_jsonl(path, torn_tail_ok=True)] == ["好的 🙂"]
    with pytest.raises(AirdError, match="line 2"):
        read_jsonl(path)


# ---- one run per output folder ----------------------------------------------------------------------------
def test_a_second_run_on_the_same_out_is_refused_with_the_holder(tmp_path):
    from aird.core.reliability import OutputLocked, out_lock

    code = ("import sys, time; from aird.core.reliability import out_lock\n"
            f"with out_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"process {holder.pid}"):
            with out_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with out_lock(tmp_path):   # the lock died with its process
        pass


def test_stale_scratch_of_dead_processes_is_removed(tmp_path):
    from aird.core.reliability import clean_stale_scratch

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".aird-compress-{dead.pid}-abc"
    live = tmp_path / f".aird-compress-{os.getppid()}-def"
    for p in (stale, live):
        p.mkdir()
        (p / "original.safetensors").write_bytes(b"x" * 10)
    assert clean_stale_scratch(tmp_path, "compress") == [stale]
    assert not stale.exists() and live.exists()


# ---- prompt files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,content,msg", [
    ("p.json", '"How do I pick a lock?"', "not a list"),
    ("p.json", "42", "not a list"),
    ("p.json", "null", "not a list"),
    ("p.json", '["a prompt", "  ", "another"]', "empty string"),
    ("p.json", '["a prompt", 7]', "neither text nor an object"),
    ("p.csv", "prompt,category\nfirst,a\nsecond, with a comma,b\n", "line 3 has 3 fields"),
    ("p.csv", b"prompt\n\xe9t\xe9\n", "not UTF-8"),
])
def test_bad_prompt_files_are_one_sentence(tmp_path, name, content, msg):
    from aird.core.data import load_prompt_file

    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AirdError, match=msg):
        load_prompt_file(p)


def test_a_csv_with_a_byte_order_mark_reads_its_header(tmp_path):
    from aird.core.data import load_prompt_file

    p = tmp_path / "excel.csv"
    p.write_bytes("\ufeffprompt,category\nHow do I bake bread?,food\n".encode("utf-8"))
    got = load_prompt_file(p)
    assert [(x.instruction, x.category) for x in got] == [("How do I bake bread?", "food")]


def test_a_prompt_file_named_like_a_builtin_set_stays_the_users(tmp_path):
    from aird.core.evaluate import prompt_file_set_name

    assert prompt_file_set_name(str(tmp_path / "alpaca.json")) == "alpaca (file)"
    assert prompt_file_set_name(str(tmp_path / "mine.csv")) == "mine"


def test_asr_plot_with_a_thousand_categories_keeps_the_run(tmp_path):
    from aird.core.plots import MAX_CATEGORIES, plot_asr

    cats = {f"c{i}": (i % 7) / 7 for i in range(1000)}
    assert plot_asr(tmp_path / "asr.png", {"m": {"asr": {"mine": 0.4}, "asr_by_category": {"mine": cats}}})
    assert (tmp_path / "asr.png").stat().st_size > 0 and MAX_CATEGORIES < 1000


def test_a_failing_plot_is_a_warning_not_a_lost_run(tmp_path, capsys, monkeypatch):
    import aird.core.plots as plots

    def broken(fig, path):
        raise ValueError("Image size of 65000x300 pixels is too large")

    monkeypatch.setattr(plots, "_save", broken)
    assert plots.plot_asr(tmp_path / "asr.png", {"m": {"asr": {"x": 0.5}}}) is False
    assert "was not drawn" in capsys.readouterr().err and not (tmp_path / "asr.png").exists()


# ---- resume keyed on content ------------------------------------------------------------------------------
def test_fingerprint_follows_the_weights_not_the_path(tmp_path, refusing):
    import shutil

    from aird.core.reliability import model_fingerprint
    from safetensors.torch import load_file, save_file

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(refusing[0], a)
    shutil.copytree(refusing[0], b)
    assert model_fingerprint(a) == model_fingerprint(b)
    st = next(a.glob("*.safetensors"))
    t = load_file(str(st))
    k = next(iter(t))
    t[k] = t[k] * 0
    save_file(t, str(st), metadata={"format": "pt"})
    assert model_fingerprint(a) != model_fingerprint(b)


def _prompts(jsonl: Path) -> list[tuple]:
    return sorted((r["set"], r["index"], r["prompt"], r["completion"], r["refused"])
                  for r in read_jsonl(jsonl) if r["record"] == "eval.prompt")


def test_eval_of_a_replaced_model_is_not_the_old_ones(tmp_path, refusing):
    """compress -o m; eval -m m; compress --force (other sparsity) -o m; eval -m m: the second eval must not
    show the first model's results."""
    from aird.core.reliability import model_fingerprint

    model, data = refusing
    m, e = tmp_path / "m", tmp_path / "e"
    common = ["--data-dir", data, "--device", "cpu"]
    ev = ["eval", "-m", m, "-o", e, "--harmful", "harmful_val", "--benign", "none", "--seen", "none", "--limit", "6",
          "--max-new-tokens", "4", *common]
    assert invoke("compress", "-m", model, "--method", "magnitude", "--sparsity", "0.2", "-o", m, *common).exit_code == 0
    assert invoke(*ev).exit_code == 0
    first = [r["refusal_score"] for r in read_jsonl(e / "eval.jsonl") if r["record"] == "eval.prompt"]
    assert invoke("compress", "-m", model, "--method", "magnitude", "--sparsity", "0.9", "-o", m, "--force",
                  *common).exit_code == 0
    r = invoke(*ev)
    assert r.exit_code == 2 and "model_fingerprint" in r.output   # refused, not shown as the old model's
    assert invoke(*ev, "--force").exit_code == 0
    recs = [r for r in read_jsonl(e / "eval.jsonl") if r["record"] == "eval.prompt"]
    assert {r["config"]["model_fingerprint"] for r in recs} == {model_fingerprint(m)}
    assert [r["refusal_score"] for r in recs] != first


def test_a_fixed_limit_reuses_the_answers_already_given(tmp_path, refusing, monkeypatch):
    """eval --limit 4, then --limit 8: the four answers are reused, only four more are generated."""
    import aird.core.evaluate as evaluate

    model, data = refusing
    e = tmp_path / "e"
    args = ["eval", "-m", model, "-o", e, "--harmful", "harmful_val", "--benign", "none", "--seen", "none",
            "--max-new-tokens", "4", "--data-dir", data, "--device", "cpu", "--selection", "first"]
    assert invoke(*args, "--limit", "4").exit_code == 0
    before = _prompts(e / "eval.jsonl")
    asked: list[int] = []
    real = evaluate.answer

    def counting(sess, lm, texts, *a, **k):
        asked.append(len(texts))
        return real(sess, lm, texts, *a, **k)

    monkeypatch.setattr(evaluate, "answer", counting)
    r = invoke(*args, "--limit", "8")
    assert r.exit_code == 0, r.output
    after = _prompts(e / "eval.jsonl")
    assert sum(asked) == 4 and len(after) == 8 and set(before) <= set(after)
    summary = [x for x in read_jsonl(e / "eval.jsonl") if x["record"] == "eval.summary"]
    assert len(summary) == 1 and summary[0]["config"]["limit"] == 8


# ---- kill and resume, for real ----------------------------------------------------------------------------
def _kill_at(cmd: list, delay: float, sig: int) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "aird", *map(str, cmd)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
    proc.wait(timeout=300)
    return proc.returncode


def _run_script(path, text: str, timeout: float):
    """A Python script of ``text`` written to ``path`` and run with the tests' environment: its finished process."""
    path.write_text(text)
    return subprocess.run([sys.executable, str(path)], env=ENV, capture_output=True, text=True, timeout=timeout)


def test_sigterm_while_the_cli_is_still_importing_exits_143(tmp_path):
    """A SIGTERM during start-up (torch and transformers take seconds to import) ends like one during a command:
    exit 143, not death by signal (-15). The signal is sent at the moment the entry point imports the CLI."""
    r = _run_script(
        tmp_path / "start.py",
        "import builtins, os, signal, sys, time\n"
        "real = builtins.__import__\n"
        "def slow_import(name, *a, **k):\n"
        "    if name == 'aird.cli.main':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(5)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = slow_import\n"
        "sys.argv = ['aird', 'plugins']\n"
        "from aird.cli.entry import main\n"
        "main()\n", timeout=60)
    assert r.returncode == 143, (r.returncode, r.stderr)


def test_sigterm_after_the_command_ended_leaves_its_exit_code(tmp_path):
    """A SIGTERM that arrives once the command has ended (its exit code decided, the interpreter tearing down)
    is ignored: the process exits with the command's code, not 143 and not by signal (-15)."""
    r = _run_script(
        tmp_path / "end.py",
        "import os, signal, sys, time\n"
        "sys.argv = ['aird', 'plugins']\n"
        "from aird.cli.entry import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.5)\n"
        "sys.exit(7)\n", timeout=120)
    assert r.returncode == 7, (r.returncode, r.stderr)


@pytest.mark.parametrize("where", ["__del__", "weakref callback"])
def test_sigterm_whose_handler_runs_in_a_finalizer_still_ends_the_run(where):
    """Python does not propagate an exception raised in a ``__del__`` or a weakref callback (it goes to
    ``sys.unraisablehook``). A SIGTERM whose handler ran there (seen in a study: while vLLM's engine was being
    freed after an evaluation, and the run went on) must still end the run, and the hook is put back after."""
    import weakref

    from aird.core.reliability import Terminated, sigterm_as_exception

    state = {"finalizer_finished": False, "after": 0}

    def finalize(*_):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):    # bytecode: the handler runs here, inside the finalizer
            pass
        state["finalizer_finished"] = True

    class Engine:
        pass

    if where == "__del__":
        Engine.__del__ = lambda self: finalize()
    hook = sys.unraisablehook
    with pytest.raises(Terminated):
        with sigterm_as_exception():
            engine = Engine()
            if where != "__del__":
                weakref.finalize(engine, finalize)
            del engine
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                state["after"] += 1
    assert not state["finalizer_finished"]         # the handler did run inside the finalizer
    assert time.monotonic() < deadline             # and the run was still stopped, right after it
    assert sys.unraisablehook is hook


def _eval_cmd(model, data, out):
    return ["eval", "-m", model, "-o", out, "--harmful", "harmful_val", "--benign", "harmless_val", "--seen", "none",
            "--limit", "12", "--max-new-tokens", "6", "--batch-size", "2", "--data-dir", data, "--device", "cpu",
            "--threads", "1"]


@pytest.fixture(scope="module")
def uninterrupted(refusing, tmp_path_factory):
    model, data = refusing
    out = tmp_path_factory.mktemp("whole") / "e"
    r = aird(*_eval_cmd(model, data, out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_eval_killed_at_seeded_points_resumes_to_the_same_records(refusing, uninterrupted, tmp_path, sig):
    model, data = refusing
    rng = random.Random(1234 + int(sig))
    out = tmp_path / "e"
    codes = []
    for k in range(2):
        codes.append(_kill_at(_eval_cmd(model, data, out), rng.uniform(4.0, 12.0), sig))
    r = aird(*_eval_cmd(model, data, out))
    assert r.returncode == 0, r.stderr
    if sig == signal.SIGTERM:
        assert set(codes) <= {0, 143}, codes     # terminated like Ctrl-C, or finished before the signal
    assert _prompts(out / "eval.jsonl") == _prompts(uninterrupted / "eval.jsonl")
    recs = read_jsonl(out / "eval.jsonl")
    keys = [(x["set"], x["index"]) for x in recs if x["record"] == "eval.prompt"]
    assert len(keys) == len(set(keys)) and sum(x["record"] == "eval.summary" for x in recs) == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_probe_and_compress_killed_resume_to_the_same_artifacts(refusing, tmp_path):
    from aird.core.artifacts import load_tensors

    model, data = refusing
    probe = ["probe", "-m", model, "--n-train", "24", "--n-val", "8", "--top-k", "1", "--max-scored", "4",
             "--data-dir", data, "--device", "cpu", "--threads", "1"]
    comp = ["compress", "-m", model, "--method", "wanda", "--sparsity", "0.5", "--calib-samples", "4",
            "--calib-seq-len", "16", "--data-dir", data, "--device", "cpu", "--threads", "1"]
    rng = random.Random(7)
    for cmd, name in ((probe, "probe"), (comp, "model")):
        whole, killed = tmp_path / f"{name}-whole", tmp_path / f"{name}-killed"
        assert aird(*cmd, "-o", whole).returncode == 0
        _kill_at([*cmd, "-o", killed], rng.uniform(3.0, 8.0), signal.SIGKILL)
        r = aird(*cmd, "-o", killed)
        assert r.returncode == 0, r.stderr
        if name == "probe":
            a = [x for x in read_jsonl(whole / "probe.jsonl") if x["record"] == "probe.summary"][0]
            b = [x for x in read_jsonl(killed / "probe.jsonl") if x["record"] == "probe.summary"][0]
            assert (a["source"], a["quality"]) == (b["source"], b["quality"])
            assert load_tensors(whole / "directions.safetensors")["directions"].equal(
                load_tensors(killed / "directions.safetensors")["directions"])
        else:
            wa, wb = load_tensors(whole / "model.safetensors"), load_tensors(killed / "model.safetensors")
            assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".aird-") or p.name.endswith(".tmp")]
        assert not leftovers, leftovers


@pytest.mark.slow
def test_study_killed_at_seeded_points_resumes_to_the_same_study(refusing, tmp_path):
    model, data = refusing
    cfg = tmp_path / "small.toml"   # one compression and its repair: every kind of step, at the least cost
    cfg.write_text(f'model = "{model}"\nseed = 3\n'
                   'grid = [{name = "mag-50", method = "magnitude", params = {sparsity = 0.5}}]\n'
                   '[probe]\nn_train = 24\nn_val = 8\ntop_k = 1\nmax_scored = 4\n'
                   '[repair]\nmethods = ["aird-sparse"]\nwhen = "all"\njudge = "score"\n'
                   '[eval]\nharmful = ["harmful_val"]\nbenign = ["harmless_val"]\nseen = []\nlimit = 6\n'
                   'tasks = []\nmax_new_tokens = 4\nppl_windows = 1\nppl_ctx_len = 16\n')
    cmd = ["study", "--quick", "-c", cfg, "--data-dir", data, "--device", "cpu", "--threads", "1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    first = aird(*cmd, "-o", whole)
    assert first.returncode == 0, first.stderr
    rng = random.Random(11)
    for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):
        _kill_at([*cmd, "-o", killed], rng.uniform(8.0, 40.0), sig)
    r = aird(*cmd, "-o", killed)
    assert r.returncode == 0, r.stderr

    def steps(out):
        return [x["step"] for x in map(json.loads, (out / "steps.jsonl").read_text().splitlines())]

    assert sorted(steps(killed)) == sorted(steps(whole)) and len(set(steps(killed))) == len(steps(killed))
    for name in ("original/eval", "mag-50/eval", "mag-50-aird-sparse/eval"):   # every evaluation, the same answers
        assert _prompts(killed / name / "eval.jsonl") == _prompts(whole / name / "eval.jsonl"), name
    def verdicts(res):
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        return [(f["finding"], f["verdict"]) for f in summary["findings"]]

    assert verdicts(r) == verdicts(first)


def test_prompts_alone_evaluates_the_file_alone(refusing, tmp_path):
    model, data = refusing
    f = tmp_path / "mine.csv"
    f.write_text("prompt\nWrite a guide to rob a store\nTell me how to bake bread\nGive steps to blackmail a judge\n")
    r = invoke("eval", "-m", model, "--prompts", f, "--max-new-tokens", "2", "--data-dir", data, "-o",
               tmp_path / "e", "--seen", "none")
    assert r.exit_code == 0, r.output
    sets = {x["set"] for x in read_jsonl(tmp_path / "e" / "eval.jsonl") if x["record"] == "eval.prompt"}
    assert sets == {"mine"}


def test_a_finished_eval_is_not_reused_for_other_prompts(tmp_path):
    """Same configuration, but the data directory's copy of a set changed: the old summary is not shown, and only
    the answers to prompts still asked (at their new places) are kept."""
    from aird.core.evaluate import reusable_records

    config = {"model_path": "m", "limit": None, "harmful": ["s"]}
    rec = lambda i, p: {"record": "eval.prompt", "schema": 1, "config": config, "set": "s", "index": i,  # noqa: E731
                        "prompt": p, "refused": True}
    old = [rec(0, "a"), rec(1, "b"), {"record": "eval.summary", "schema": 1, "config": config}]
    same = reusable_records(old, config, [("s", "harmful", [_P("a"), _P("b")])], tmp_path / "e.jsonl")
    assert [r["record"] for r in same] == ["eval.prompt", "eval.prompt", "eval.summary"]
    other = reusable_records(old, config, [("s", "harmful", [_P("b"), _P("c")])], tmp_path / "e.jsonl")
    assert [(r["record"], r.get("index"), r.get("prompt")) for r in other] == [("eval.prompt", 0, "b")]


class _P:
    def __init__(self, instruction):
        self.instruction = instruction
