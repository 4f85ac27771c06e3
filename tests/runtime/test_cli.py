"""`dllm generate`'s input and output: blank lines, stdin, pipes, interrupts, exit codes, progress."""
import io
import json
import os
import re
import signal

import pytest

from runtime import Engine, EngineConfig
from runtime.cli import main
from runtime.engine import CHECKPOINTS
from runtime.generate import BlockDiffusionLoop
from runtime.sampling import SamplingParams

TINY = CHECKPOINTS / "tiny-random"
BASE = ["generate", "--model", str(TINY), "--no-progress", "--device", "cpu", "--max-new-tokens", "5"]


def test_blank_lines_keep_their_ids_and_fail_alone(tmp_path, capsys):
    file = tmp_path / "prompts.txt"
    file.write_text("abc\n\nhello\n")
    assert main([*BASE, "--prompts-file", str(file), "--json"]) == 1  # a request failed
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["request_id"], d["prompt"], d["finish_reason"]) for d in lines] == [
        ("0", "abc", "length"), ("1", "", "error"), ("2", "hello", "length")]
    assert "blank" in lines[1]["error"]


def test_stdin_and_no_escape_codes_in_a_pipe(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("abc\nxyz\n"))
    assert main([*BASE, "--prompts-file", "-"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- [") == 2 and "\033" not in out


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupt_writes_every_finished_request(monkeypatch, capsys, how):
    original, calls = BlockDiffusionLoop.decode_block, []

    def decode_block(self, rows):
        calls.append(len(rows))
        if len(calls) == 4:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler turns it into KeyboardInterrupt
            else:
                raise KeyboardInterrupt
        return original(self, rows)

    monkeypatch.setattr(BlockDiffusionLoop, "decode_block", decode_block)
    args = ["generate", "--model", str(TINY), "--no-progress", "--device", "cpu", "--max-batch-size", "1",
            "--max-new-tokens", "6", "--prompt", "abcd", "--prompt", "efgh", "--json"]
    before = signal.getsignal(signal.SIGTERM)  # not always the default: ray.init, for one, installs its own
    assert main(args) == 130
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["finish_reason"] for d in lines][1] == "cancelled"
    assert lines[0]["finish_reason"] in ("length", "eos") and len(lines) == 2
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's handler is gone again


def test_the_progress_total_counts_the_blocks_that_run(capsys):
    engine = Engine(EngineConfig(model_path=str(TINY), device="cpu", dtype="float64", progress=True))
    [full] = engine.generate(["abcd"], sampling_params=SamplingParams(max_new_tokens=40, ignore_eos=True))
    capsys.readouterr()
    [cut] = engine.generate(["abcd"], sampling_params=SamplingParams(max_new_tokens=40, ignore_eos=True,
                                                                     stop=[full.text[5:7]]))
    assert cut.finish_reason == "stop" and cut.blocks < 10
    done, total = map(int, re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)[-1])
    assert done == total == cut.blocks


def test_jsonl_requests_in_results_out_a_bad_line_fails_alone(monkeypatch, capsys):
    lines = [json.dumps({"id": "a", "prompt": "abc", "max_new_tokens": 4, "temperature": 0.7, "seed": 3}),
             json.dumps({"prompt_token_ids": [5, 6, 7], "max_new_tokens": 8, "ignore_eos": True}),
             "{not json",
             json.dumps({"prompt": "hi", "temperature": -1}),
             json.dumps({"prompt": "hello", "bogus": 1}),
             json.dumps({"prompt": "xyz", "stop": "q"})]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main([*BASE, "--jsonl", "-"]) == 1  # some lines failed
    captured = capsys.readouterr()
    out = [json.loads(line) for line in captured.out.splitlines()]
    assert [(d["line"], d["request_id"]) for d in out] == [(1, "a"), (2, "1"), (3, "2"), (4, "3"), (5, "4"), (6, "5")]
    assert [d["finish_reason"] == "error" for d in out] == [False, False, True, True, True, False]
    assert out[2]["error"].startswith("refused: line 3:")
    assert "temperature=-1" in out[3]["error"] and "'bogus'" in out[4]["error"]
    assert "error: request 3:" in captured.err
    engine = Engine(EngineConfig(model_path=str(TINY), device="cpu", progress=False))
    [a] = engine.generate(SamplingParams(max_new_tokens=4, temperature=0.7, seed=3).requests("abc", "a"))
    [b] = engine.generate([[5, 6, 7]], sampling_params=SamplingParams(max_new_tokens=8, ignore_eos=True, seed=1))
    assert (out[0]["tokens"], out[0]["text"]) == (a.tokens, a.text)  # each line's options, as the engine reads them
    assert out[1]["tokens"] == b.tokens and len(b.tokens) == 8


def test_jsonl_to_a_file_all_good_exits_0(tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"prompt": "abc"}) + "\n" + json.dumps({"prompt": "de", "max_new_tokens": 2}) + "\n")
    assert main([*BASE, "--jsonl", str(source), "--output", str(target)]) == 0
    out = [json.loads(line) for line in target.read_text().splitlines()]
    assert [d["request_id"] for d in out] == ["0", "1"] and len(out[1]["tokens"]) <= 2
    assert all(d["error"] is None for d in out)
