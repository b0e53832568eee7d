"""The command line, run as a user runs it: a subprocess, stdout piped, stderr read."""

import json

import pytest
from helpers import run_aird

pytestmark = pytest.mark.slow   # every test starts the CLI in a subprocess (torch's import alone takes seconds)


def aird(*args, stdin=None, env=None):
    return run_aird(*args, stdin=stdin, env=env)


def assert_one_sentence_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr)   # 1 would be an internal error (a crash log)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("error:")]
    assert len(err) == 1, res.stderr
    for f in fragments:
        assert f in res.stderr.replace("\n", " "), res.stderr


def test_plugins_json():
    res = aird("plugins", "--json")
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in res.stdout.splitlines()]
    assert {(r["kind"], r["name"]) for r in recs} >= {("probe", "diff-in-means"), ("scorer", "substring")}
    assert "plugins" in res.stderr  # the rich table goes to stderr


def test_models_list_json():
    res = aird("models")
    assert res.returncode == 0, res.stderr
    names = [json.loads(line)["name"] for line in res.stdout.splitlines()]
    assert names[0] == "qwen2.5-coder-0.5b-instruct" and "smollm2-135m-instruct" in names


def test_missing_model_is_one_sentence(tmp_path):
    assert_one_sentence_error(aird("probe", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")),
                              "not found")


def test_error_text_is_not_read_as_markup(tmp_path):
    """A path or a hint like pip install 'aird[vllm]' keeps its brackets (rich would take [vllm] for a style)."""
    missing = tmp_path / "m[vllm]" / "nope"
    assert_one_sentence_error(aird("probe", "--model", str(missing), "--out", str(tmp_path / "o")), str(missing))


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    assert_one_sentence_error(aird("probe", "--model", str(tmp_path / "m")), "holds no config.json")


def test_unknown_family(refusing, tmp_path):
    import shutil

    model_dir, _ = refusing
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "bert"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_one_sentence_error(aird("probe", "--model", str(bad), "--out", str(tmp_path / "o")), "no adapter")


def test_bad_option_values(refusing, tmp_path):
    model_dir, data = refusing
    assert_one_sentence_error(aird("probe", "--model", str(model_dir), "--n-train", "1"), "--n-train")
    assert_one_sentence_error(aird("probe", "--model", str(model_dir), "--method", "nope", "--data-dir", str(data),
                                   "--out", str(tmp_path / "o")), "unknown probe 'nope'")


def test_empty_prompt_file(refusing, tmp_path):
    model_dir, data = refusing
    import shutil

    d = tmp_path / "data"
    shutil.copytree(data, d)
    (d / "refusal_direction" / "splits" / "harmful_train.json").write_text("[]")
    assert_one_sentence_error(aird("probe", "--model", str(model_dir), "--data-dir", str(d), "--out",
                                   str(tmp_path / "o")), "holds no prompts")


def test_probe_end_to_end_and_corrupt_artifact(refusing, tmp_path):
    model_dir, data = refusing
    out = tmp_path / "probe"
    args = ["probe", "--model", str(model_dir), "--data-dir", str(data), "--out", str(out), "--n-train", "32",
            "--n-val", "12", "--max-scored", "4", "--top-k", "1"]
    res = aird(*args)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["record"] == "probe.summary" and summary["out"] == str(out)
    assert "refusal direction of" in res.stderr and "source layer" in res.stderr
    # a rerun finds the finished probe and says so
    again = aird(*args)
    assert again.returncode == 0 and "already holds a finished probe" in again.stderr
    # the summary record on stdin can name the artifact in a pipeline
    piped = aird("probe", "--model", "-", "--data-dir", str(data), "--out", str(out), "--n-train", "32",
                 "--n-val", "12", "--max-scored", "4", "--top-k", "1", stdin=json.dumps({"out": str(model_dir)}) + "\n")
    assert piped.returncode == 0, piped.stderr
    # a corrupt line is one sentence, not a traceback
    with open(out / "probe.jsonl", "a") as fh:
        fh.write("{not json\n")
    assert_one_sentence_error(aird(*args), "is not valid JSON", "--force")
    assert aird(*args, "--force").returncode == 0


def test_compress_diff_repair_pipeline(refusing, tmp_path):
    """The commands chained as a user chains them: each takes the previous one's JSONL record on stdin."""
    model_dir, data = refusing
    common = ["--data-dir", str(data)]
    probe_opts = ["--n-train", "32", "--n-val", "12", "--max-scored", "4", "--top-k", "1", *common]
    assert aird("probe", "--model", str(model_dir), "--out", str(tmp_path / "p0"), *probe_opts).returncode == 0
    comp = aird("compress", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5",
                "--out", str(tmp_path / "m"), *common)
    assert comp.returncode == 0, comp.stderr
    probe = aird("probe", "--model", "-", "--out", str(tmp_path / "p1"), *probe_opts, stdin=comp.stdout)
    assert probe.returncode == 0, probe.stderr
    diff = aird("diff", str(tmp_path / "p0"), "-", "--out", str(tmp_path / "d"), stdin=probe.stdout)
    assert diff.returncode == 0, diff.stderr
    d = json.loads(diff.stdout.splitlines()[-1])
    assert d["record"] == "diff.summary" and d["quality"]["original_in_compressed"] is not None
    rep = aird("repair", "-", "--reference", str(tmp_path / "p0"), "--method", "aird-sparse", "--out",
               str(tmp_path / "r"), *common, stdin=comp.stdout)
    assert rep.returncode == 0, rep.stderr
    r = json.loads(rep.stdout.splitlines()[-1])
    assert r["record"] == "repair.summary" and r["sparsity"]["after"] == r["sparsity"]["before"]


def test_llm_compressor_methods_keep_stdout_pure_jsonl(refusing, tmp_path):
    """llm-compressor logs to stdout on import; a pipeline reading aird's stdout must see only its records."""
    model_dir, data = refusing
    res = aird("compress", "--model", str(model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
               "--format", "compressed-tensors", "--out", str(tmp_path / "q"), "--data-dir", str(data))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1, res.stdout[:500]
    rec = json.loads(lines[0])
    assert rec["record"] == "compress.summary" and rec["format"] == "compressed-tensors" and rec["bits"] <= 4
    assert "llmcompressor" in res.stderr   # its log still reaches the user, on stderr


def test_bad_compress_and_repair_input(refusing, tmp_path):
    model_dir, data = refusing
    assert_one_sentence_error(aird("compress", "--model", str(model_dir), "--method", "nope"), "unknown compressor")
    assert_one_sentence_error(aird("compress", "--model", str(model_dir), "--method", "magnitude", "--sparsity",
                                   "1.5", "--out", str(tmp_path / "x"), "--data-dir", str(data)), "sparsity must be in")
    assert_one_sentence_error(aird("compress", "--model", str(model_dir), "--method", "magnitude", "--pattern",
                                   "4:2", "--out", str(tmp_path / "x"), "--data-dir", str(data)), "smaller than M")
    assert_one_sentence_error(aird("repair", str(model_dir), "--reference", str(tmp_path / "nope")), "does not exist")
    assert_one_sentence_error(aird("diff", str(tmp_path / "a"), str(tmp_path / "b")), "does not exist")


def test_a_closed_pipe_ends_the_output_quietly():
    """`aird data | head -1`: the reader closes the pipe; aird stops as a Unix filter does (exit 141, SIGPIPE's
    status), with no crash log and nothing on stderr about an internal error."""
    import os
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "aird", "data"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "COLUMNS": "200"})
    p.stdout.close()                  # before aird writes a line: every write meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141, err
    assert "internal error" not in err and "Traceback" not in err and "Exception ignored" not in err, err
