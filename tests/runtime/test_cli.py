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
    assert main(args) == 130
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["finish_reason"] for d in lines][1] == "cancelled"
    assert lines[0]["finish_reason"] in ("length", "eos") and len(lines) == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or how == "ctrl-c"


def test_the_progress_total_counts_the_blocks_that_run(capsys):
    engine = Engine(EngineConfig(model_path=str(TINY), device="cpu", dtype="float64", progress=True))
    [full] = engine.generate(["abcd"], sampling_params=SamplingParams(max_new_tokens=40, ignore_eos=True))
    capsys.readouterr()
    [cut] = engine.generate(["abcd"], sampling_params=SamplingParams(max_new_tokens=40, ignore_eos=True,
                                                                     stop=[full.text[5:7]]))
    assert cut.finish_reason == "stop" and cut.blocks < 10
    done, total = map(int, re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)[-1])
    assert done == total == cut.blocks
