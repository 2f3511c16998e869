import importlib.util
import json

import pytest

from cacheblend.cli import main


@pytest.mark.slow  # the bundled model
def test_eval_end_to_end(tmp_path, capsys, data_dir):
    out = tmp_path / "runs"
    argv = ["eval", "--dataset", "musique", "--data-dir", str(data_dir), "--limit", "1",
            "--passages", "2", "--passage-tokens", "64", "--methods", "full,reuse,blend,epic",
            "--max-tokens", "2", "--out", str(out), "--json", "--no-progress"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["methods"]) == {"full", "reuse", "blend", "epic"}
    for stats in result["methods"].values():
        for key in ("kl_first_token", "top1_agreement", "f1", "f1_vs_full", "ttft_s"):
            assert stats[key] is not None
    assert (out / "musique" / "results.jsonl").is_file()
    assert (out / "musique" / "quality_vs_ttft_musique.png").is_file()
    assert (out / "results.md").is_file()
    assert "--passage-tokens 64" in result["command"]
    assert "Answers decoded by `full`, `reuse`, `blend`, `epic`" in (out / "results.md").read_text()

    # A later run of another dataset into the same directory: the report covers both.
    argv[argv.index("musique")] = "2wikimqa"
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["dataset"] == "2wikimqa"  # --json: this run only, not musique's left there
    report = (out / "results.md").read_text()
    assert "## musique" in report and "## 2wikimqa" in report


@pytest.mark.slow  # the bundled model
def test_ttft_sweep_with_peers(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["eval", "--sweep", "--sweep-lengths", "80,120", "--chunk-tokens", "32",
            "--sweep-repeats", "1", "--sweep-methods", "full,prefix,reuse,blend,hf_full,llama_cpp",
            "--out", str(out), "--report-dir", str(tmp_path / "docs"), "--json", "--no-progress"]
    assert main(argv) == 0
    sweep = json.loads(capsys.readouterr().out)["ttft_sweep"]
    for label in ("full", "prefix", "reuse", "blend", "hf_full"):
        assert [r["target_tokens"] for r in sweep["methods"][label]] == [80, 120]
        assert all(r["ttft_s"] > 0 for r in sweep["methods"][label])
    if importlib.util.find_spec("llama_cpp"):  # the optional peer ran on the same GGUF
        assert all(r["ttft_s"] > 0 for r in sweep["methods"]["llama_cpp"])
    else:
        assert sweep["skipped_peers"] == ["llama_cpp"] and "llama_cpp" not in sweep["methods"]
    assert (out / "ttft_sweep.json").is_file() and (out / "ttft_vs_length.png").is_file()
    assert "TTFT against prompt length" in (tmp_path / "docs" / "results.md").read_text()


def test_bad_method_spec_is_a_one_line_error(capsys):
    assert main(["eval", "--methods", "full,blend@7"]) == 2
    assert "blend@7" in capsys.readouterr().err
    assert main(["eval", "--skip", "-1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--skip must be >= 0" in line


def test_malformed_data_file_is_refused_before_the_model_loads(tmp_path, capsys):
    rows = [{"question": "Who?", "answers": "['Ann', 'Bo']", "ctxs": "[{'text': 'x'}]"}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    assert main(["eval", "--data", str(path), "--out", str(tmp_path / "o"), "--json"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "row 0" in line and "answers" in line and "JSON list" in line
    rows[0]["answers"] = ["Ann"]
    path.write_text(json.dumps(rows))
    assert main(["eval", "--data", str(path), "--out", str(tmp_path / "o"), "--json"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "row 0: ctxs is str, not a JSON list" in line
    assert not (tmp_path / "o").exists()
