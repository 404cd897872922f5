"""The `kvcache` command line on the tiny model: output, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcache.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_generate_json_matches_api(tiny_model_dir, tiny_llm):
    from kvcache import SamplingParams

    r = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "Once upon a time", "--max-tokens", "8",
                "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = tiny_llm.generate(["Once upon a time"], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert got["token_ids"] == want.token_ids and got["text"] == want.text
    assert got["metrics"]["prompt_tokens"] == len(want.prompt_token_ids)


def test_generate_streams_the_same_text_with_and_without_cache(tiny_model_dir):
    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "The robot", "--max-tokens", "10",
            "--threads", "1"]
    cached, uncached = run_cli(*base), run_cli(*base, "--no-cache")
    assert cached.returncode == 0 and uncached.returncode == 0
    assert cached.stdout == uncached.stdout and cached.stdout.strip()


def test_chat_repl_commands(tiny_model_dir):
    script = "hello there\n/stats\n/reset\n/stats\n/bogus\nexit\n"
    r = run_cli("chat", "--model", str(tiny_model_dir), "--max-tokens", "6", "--threads", "1", stdin=script)
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.stdout.splitlines() if "turns" in line]
    assert len(stats) == 2
    assert stats[0].split("turns ")[1].startswith("1,") and stats[1].split("turns ")[1].startswith("0,")
    assert "unknown command /bogus" in r.stdout
    assert "Traceback" not in r.stderr


def test_chat_one_shot(tiny_model_dir):
    r = run_cli("chat", "--model", str(tiny_model_dir), "--message", "hi", "--max-tokens", "5", "--threads", "1")
    assert r.returncode == 0, r.stderr


def test_memory_json_llama2():
    r = run_cli("memory", "llama-2-7b", "--seq-len", "4096", "--json")
    assert r.returncode == 0
    got = json.loads(r.stdout)
    assert got["bytes_per_token"] == 524_288 and got["total_bytes"] == 2 * 1024**3


def test_memory_of_a_model_folder_uses_its_config(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    r = run_cli("memory", str(tiny_model_dir / "config.json"), "--dtype", "fp32", "--json")
    assert r.returncode == 0, r.stderr
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert json.loads(r.stdout)["bytes_per_token"] == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4


@pytest.mark.parametrize("args", [
    ["generate", "--model", "no-such-model-xyz", "--prompt", "hi"],
    ["generate", "--prompt", "hi", "--max-tokens", "0"],
    ["generate", "--prompt", "hi", "--temperature", "-1"],
    ["memory", "no-such-model-xyz"],
    ["memory", "llama-2-7b", "--dtype", "int3"],
    ["memory", "llama-2-7b", "--budget", "lots"],
    ["bench", "cache", "--positions", "a,b"],
    ["bench", "chat", "--repeats", "0"],
    ["bench", "cache", "--plot", "missing/dir/x.png"],
])
def test_bad_input_is_one_sentence_and_exit_2(args):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def main_in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `kvcache ARGV` run here: argparse mistakes raise SystemExit(2)."""
    from kvcache.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_sentence_exit_2(capsys, *argv: str, words: str = "") -> str:
    """Runs `kvcache ARGV` here; exit 2, nothing on stdout, one 'error:' line on stderr (returned)."""
    code, out, err = main_in_process(capsys, *argv)
    assert code == 2 and out == "", err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert words in err, err
    return err


@pytest.mark.parametrize("args", [
    ["bench", "cache", "--repeats", "-3"],
    ["bench", "chat", "--words", "0"],
    ["generate", "--prompt", "hi", "--max-tokens", "100000000", "--max-model-len", "512"],
    ["generate"],
    ["eval", "--out", "{file}/eval"],
    ["eval", "--out", "{file}/eval", "--stream-tokens", "40"],
    ["eval", "--kvpress-python", "{file}/python"],
    ["serve", "--sessions-dir", "{file}"],
])
def test_flags_are_checked_before_the_model_loads(capsys, tmp_path, args):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [a.format(file=blocker) for a in args]
    err = assert_one_sentence_exit_2(capsys, *args, "--model", "no-such-model-xyz")
    assert "no-such-model-xyz" not in err  # found before the model is looked up


def test_max_tokens_past_the_context_is_one_sentence(tiny_model_dir, capsys, one_torch_thread):
    model = ["--model", str(tiny_model_dir)]
    assert_one_sentence_exit_2(capsys, "generate", *model, "--prompt", "hi", "--max-tokens", "100000000",
                               words="max_tokens is 100000000 but the prompt has")
    assert_one_sentence_exit_2(capsys, "generate", *model, "--prompt", "word " * 20, "--max-model-len", "64",
                               "--max-tokens", "60", words="but the prompt has")
    assert_one_sentence_exit_2(capsys, "chat", *model, "--message", "hi", "--max-tokens", "100000000",
                               words="the context is 256")
    assert_one_sentence_exit_2(capsys, "chat", *model, "--max-tokens", "256",  # before the REPL starts
                               words="the context is 256")
    assert_one_sentence_exit_2(capsys, "bench", "chat", *model, "--reply-tokens", "300", words="max_tokens is 300")
    assert_one_sentence_exit_2(capsys, "bench", "cache", *model, "--positions", "8", "--prompt-tokens", "200",
                               "--new-tokens", "100", words="max_tokens is 100 but the prompt has 200 tokens")


def test_output_paths_are_checked_before_the_work(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model = ["--model", str(tiny_model_dir)]
    bench = ["bench", "cache", *model, "--positions", "8", "--repeats", "1", "--new-tokens", "2"]
    assert_one_sentence_exit_2(capsys, *bench, "--plot", str(blocker / "x.png"), words="is not a folder")
    assert_one_sentence_exit_2(capsys, *bench, "--plot", str(tmp_path), words="is a folder")
    small = ["eval", *model, "--policies", "full", "--contexts", "64", "--skip-needle", "--skip-speed",
             "--baselines", "none", "--no-plots"]
    for flag in ([], ["--stream-tokens", "40"]):
        assert_one_sentence_exit_2(capsys, *small, "--out", str(blocker / "eval"), *flag,
                                   words="a-file is a file, not a folder")
    code, _, err = main_in_process(capsys, *small, "--out", str(tmp_path / "new" / "eval"), "--no-record")
    assert code == 0, err
    assert (tmp_path / "new" / "eval" / "results.json").stat().st_size > 0  # a missing folder is still made


def test_failed_save_keeps_the_repl_and_the_conversation(tiny_model_dir, tmp_path):
    blocker = tmp_path / "sessions"
    blocker.write_text("a file where the sessions folder should be")
    script = "hello there\n/save first\nand one more thing\n/stats\nexit\n"
    r = run_cli("chat", "--model", str(tiny_model_dir), "--max-tokens", "4", "--threads", "1",
                "--sessions-dir", str(blocker), stdin=script)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/save failed, the conversation is kept" in errors[0]
    stats = [line for line in r.stdout.splitlines() if "turns" in line]
    assert len(stats) == 1 and stats[0].split("turns ")[1].startswith("2,")  # both messages answered


def test_an_os_error_is_one_sentence_and_exit_2(monkeypatch, capsys):
    from kvcache import cli

    def fails(args):
        raise PermissionError(13, "Permission denied", "/results/x.json")

    monkeypatch.setitem(cli.COMMANDS, "memory", fails)
    assert cli.main(["memory", "llama-2-7b"]) == 2
    assert capsys.readouterr().err == "error: Permission denied (/results/x.json).\n"


def test_prompt_longer_than_max_model_len_exits_2(tiny_model_dir):
    r = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "word " * 50, "--max-model-len", "8",
                "--max-tokens", "4")
    assert r.returncode == 2 and "max_model_len" in r.stderr and "Traceback" not in r.stderr


def test_corrupt_gguf_exits_2(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    r = run_cli("generate", "--model", str(bad), "--prompt", "hi")
    assert r.returncode == 2 and "GGUF" in r.stderr and "Traceback" not in r.stderr


def test_kv_policy_flag_runs_a_policy_and_rejects_bad_ones(tiny_model_dir):
    from kvcache import LLM, SamplingParams

    policy = "sinks:n_sink=2,window=16+quantized:bits=8,group_size=16,residual=8"
    r = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "Once upon a time there was a robot",
                "--max-tokens", "40", "--json", "--threads", "1", "--kv-policy", policy)
    assert r.returncode == 0, r.stderr
    want = LLM(str(tiny_model_dir), progress=False, kv_policy=policy).generate(
        ["Once upon a time there was a robot"], SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert json.loads(r.stdout)["token_ids"] == want.token_ids
    bad = run_cli("generate", "--model", str(tiny_model_dir), "--prompt", "x", "--kv-policy", "window:length=3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "no key 'length'" in bad.stderr and "size" in bad.stderr
