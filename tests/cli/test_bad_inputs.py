"""Bad inputs to the `dsv3` command end in one line naming the problem and a non-zero exit, never a
traceback, a hang, silent garbage or lost data.

Most cases fail before any weight is read; they run through `dsv3.cli.main` in one fresh interpreter
(a real `python -m dsv3` start per case would cost a second each) and each test asserts its own case's
exit code, message and the absence of a traceback. What needs a real process of its own (argv bytes,
closed pipes, stdin, signals) runs as `python -m dsv3`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.api import TINY_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
INDEX = "model.safetensors.index.json"
SHARD = "model-00001-of-00001.safetensors"
NORM = "model.norm.weight"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PYTHONIOENCODING": "utf-8"}


def dsv3(*args: str | bytes, timeout: int = 120, **kwargs) -> subprocess.CompletedProcess:
    """`python -m dsv3 ARGS` in a process of its own."""
    if "stdout" not in kwargs:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "dsv3", *args], cwd=ROOT, env=env(), timeout=timeout, **kwargs)


def assert_error(code: int, stderr: str, expected_code: int, *fragments: str) -> None:
    """A non-zero exit, no traceback, one `dsv3: error:` line holding every fragment."""
    assert code == expected_code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("dsv3: error:")]
    assert len(lines) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- checkpoints broken one way each ---------------------------------------------------------

def copy_tiny(directory: Path) -> Path:
    return Path(shutil.copytree(TINY_CHECKPOINT, directory))


def with_tensor(path: Path, name: str, change) -> Path:
    shard = path / SHARD
    tensors = load_file(str(shard))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return path


def with_index(path: Path, change) -> Path:
    index = json.loads((path / INDEX).read_text())
    change(index)
    (path / INDEX).write_text(json.dumps(index))
    return path


def with_json(path: Path, file: str, text: str) -> Path:
    (path / file).write_text(text)
    return path


def duplicated_tensor(path: Path) -> Path:
    """No index; a stray second shard repeats one tensor with other values."""
    (path / INDEX).unlink()
    save_file({NORM: torch.zeros(128, dtype=torch.bfloat16)}, str(path / "zz-extra.safetensors"))
    return path


def fifo_shard(path: Path) -> Path:
    (path / SHARD).unlink()
    os.mkfifo(path / SHARD)
    return path


def no_chat_template(path: Path) -> Path:
    settings = json.loads((path / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    return path


def zero_tail(path: Path) -> Path:
    """The shard's last megabyte zero, as a download cut short into a preallocated file leaves it."""
    with open(path / SHARD, "r+b") as f:
        f.seek(-(1 << 20), os.SEEK_END)
        f.write(bytes(1 << 20))
    return path


def nan_in(name: str):
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor.view(-1)[3] = float("nan")
        return tensor
    return change


def config_with(**fields):
    def change(path: Path) -> Path:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **fields}))  # json writes Infinity
        return path
    return change


BROKEN = {  # name -> how a copy of the tiny checkpoint is broken
    "index_escapes": lambda p: with_index(p, lambda i: i["weight_map"].update({NORM: "../" + SHARD})),
    "index_absolute": lambda p: with_index(p, lambda i: i["weight_map"].update({NORM: str(p / SHARD)})),
    "weight_map_list": lambda p: with_index(p, lambda i: i.update(weight_map=[SHARD])),
    "duplicated": duplicated_tensor,
    "fifo": fifo_shard,
    "nan": lambda p: with_tensor(p, NORM, nan_in(NORM)),
    "inf_rope": config_with(rope_theta=float("inf")),
    "bad_tokenizer_config": lambda p: with_json(p, "tokenizer_config.json", "{not json"),
    "no_tokenizer": lambda p: (p / "tokenizer.json").unlink() or p,
    "no_template": no_chat_template,
    "zero_tail": zero_tail,
    "layers_1e9": config_with(num_hidden_layers=10**9),
    "experts_1e12": config_with(n_routed_experts=10**12),
    "bos_not_a_token": lambda p: with_json(p, "tokenizer_config.json", json.dumps(
        {**json.loads((p / "tokenizer_config.json").read_text()), "bos_token": "<｜nope｜>"})),
    "template_tokens_missing": lambda p: with_json(p, "tokenizer.json", (p / "tokenizer.json").read_text().replace(
        "<｜User｜>", "<｜Usr｜>")),
    "bad_generation_config": lambda p: with_json(p, "generation_config.json", '{"temperature": "warm"}'),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    return {name: make(copy_tiny(root / name)) for name, make in BROKEN.items()}


# ---- the batch: every case through dsv3.cli.main in one fresh interpreter ----------------------

CHILD = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    from dsv3.cli import main

    results = {}
    for name, argv in json.loads(sys.stdin.read()).items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
                code = "raised"
        results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
    print(json.dumps(results))
""")


def cases(broken: dict[str, Path], tmp: Path) -> dict[str, list[str]]:
    gen = ["generate", "Hello", "--backend", "reference", "--max-new-tokens", "4"]
    long_prompt = "word " * 200
    (tmp / "a_file").write_text("not a directory")
    (tmp / "json_dir").mkdir()
    (tmp / "zero.jinja").write_text("{{ 1 / 0 }}")
    (tmp / "recursion.jinja").write_text("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    return {
        "temperature_nan": gen + ["--temperature", "nan"],
        "temperature_tiny": gen + ["--temperature", "1e-30"],
        "top_p_zero": gen + ["--top-p", "0"],
        "max_new_tokens_zero": gen + ["--max-new-tokens", "0"],
        "ckpt_is_a_config_name": gen + ["--ckpt", "deepseek-v3"],
        "ckpt_missing": gen + ["--ckpt", str(tmp / "nowhere")],
        "ckpt_is_a_file": gen + ["--ckpt", str(tmp / "a_file")],
        "config_without_flag": gen + ["--config", "deepseek-v3"],
        "ckpt_and_config": gen + ["--ckpt", str(TINY_CHECKPOINT), "--config", "tiny", "--random-weights"],
        "random_weights_alone": gen + ["--random-weights"],
        "device_unknown": gen + ["--device", "warp9"],
        "device_meta": gen + ["--device", "meta"],
        "device_cuda0": gen + ["--device", "cuda:0"],
        "max_model_len_too_small": gen + ["--max-model-len", "1"],
        "prompt_longer_than_context": ["generate", long_prompt, "--max-model-len", "64"],
        "max_shard_size_nan": ["convert", str(TINY_CHECKPOINT), str(tmp / "out_nan"), "--max-shard-size", "nan"],
        "convert_into_a_file": ["convert", str(TINY_CHECKPOINT), str(tmp / "a_file"), "--overwrite"],
        "conformance_json_dir": ["conformance", "--quick", "--op", "rms_norm", "--json", str(tmp / "json_dir")],
        "backend_empty": gen + ["--backend", ""],
        "bench_decode_with_ckpt": ["bench", "decode", "--ckpt", "deepseek-v3", "--backend", "reference"],
        "serve_shutdown_timeout_nan": ["serve", "--shutdown-timeout", "nan"],
        "chat_template_divides_by_zero": gen + ["--chat", "--chat-template", str(tmp / "zero.jinja")],
        "chat_template_recurses": gen + ["--chat", "--chat-template", str(tmp / "recursion.jinja")],
        **{f"ckpt_{name}": gen + ["--ckpt", str(path)] for name, path in broken.items()
           if name != "no_template"},
        "chat_without_template": gen + ["--chat", "--ckpt", str(broken["no_template"])],
        "chat_tokens_missing": gen + ["--chat", "--ckpt", str(broken["template_tokens_missing"])],
    }


@pytest.fixture(scope="module")
def batch(broken, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("batch")
    argv = cases(broken, tmp)
    done = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(argv), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.splitlines()[-1])


def case(batch, name: str, expected_code: int, *fragments: str) -> dict:
    result = batch[name]
    assert_error(result["code"], result["stderr"], expected_code, *fragments)
    return result


# ---- silent wrong results and random weights ----------------------------------------------------

def test_index_shard_outside_the_checkpoint_is_refused(batch):
    case(batch, "ckpt_index_escapes", 2, "'../model-00001-of-00001.safetensors'", "outside the checkpoint directory")
    case(batch, "ckpt_index_absolute", 2, "outside the checkpoint directory")


def test_weight_map_of_the_wrong_json_type_is_named(batch):
    case(batch, "ckpt_weight_map_list", 2, INDEX, '"weight_map" object', "found list")


def test_tensor_in_two_shards_names_both_files(batch):
    case(batch, "ckpt_duplicated", 2, f"tensor {NORM} is in two shards", SHARD, "zz-extra.safetensors")


def test_nan_weight_is_named(batch):
    case(batch, "ckpt_nan", 2, f"tensor {NORM} has NaN or Inf values")


def test_infinite_config_value_is_refused(batch):
    case(batch, "ckpt_inf_rope", 2, "config.json", "'rope_theta' must be finite, found inf")


def test_broken_generation_config_is_named_not_dropped(batch):
    before_loading(case(batch, "ckpt_bad_generation_config", 2, "generation_config.json",
                        "temperature must be a finite number, found 'warm'"))


def test_flags_that_used_to_be_ignored_are_refused(batch):
    case(batch, "backend_empty", 2, "an empty backend name was requested; choose auto")
    case(batch, "bench_decode_with_ckpt", 2, "bench decode: --ckpt is for bench serve")
    case(batch, "serve_shutdown_timeout_nan", 2, "--shutdown-timeout must be a finite number of seconds >= 0, got nan")


def test_ckpt_must_be_a_checkpoint_directory(batch):
    case(batch, "ckpt_is_a_config_name", 2, "--ckpt deepseek-v3: no such checkpoint directory",
         "--config deepseek-v3 --random-weights")
    case(batch, "ckpt_missing", 2, "no such checkpoint directory")
    case(batch, "ckpt_is_a_file", 2, "no such checkpoint directory")


def test_random_weights_only_when_asked_and_never_beside_a_checkpoint(batch):
    case(batch, "config_without_flag", 2, "--config deepseek-v3 runs random weights; add --random-weights")
    case(batch, "ckpt_and_config", 2, "either --ckpt", "not both")
    case(batch, "random_weights_alone", 2, "--random-weights needs --config")


# ---- hangs --------------------------------------------------------------------------------------

def test_fifo_shard_is_refused_without_opening_it(batch):
    case(batch, "ckpt_fifo", 2, SHARD, "is a FIFO; checkpoint files must be regular files")


# ---- fail fast: before the weights load ---------------------------------------------------------

def before_loading(result: dict) -> None:
    assert "loading weights" not in result["stderr"] and "loaded" not in result["stderr"], result["stderr"]


def test_tokenizer_problems_are_found_before_loading(batch):
    before_loading(case(batch, "ckpt_no_tokenizer", 2, "no tokenizer.json"))
    before_loading(case(batch, "ckpt_bad_tokenizer_config", 2, "tokenizer_config.json", "not a valid tokenizer "
                                                                                         "config"))


def test_what_the_tokenizer_config_and_template_promise_is_checked_before_loading(batch):
    before_loading(case(batch, "ckpt_bos_not_a_token", 2, "tokenizer_config.json: bos_token '<｜nope｜>' is not a "
                                                          "token of", "tokenizer.json"))
    before_loading(case(batch, "chat_tokens_missing", 2, "the chat template writes <｜User｜>, which the "
                                                         "checkpoint's tokenizer.json does not have as tokens"))


def test_sizes_the_shards_cannot_hold_are_refused_before_any_per_layer_work(batch):
    """These used to build per-layer layouts for minutes (and all memory) before any check."""
    case(batch, "ckpt_layers_1e9", 2, "config.json: ", "need at least", "but the 1 shards hold at most",
         "num_hidden_layers=1000000000")
    case(batch, "ckpt_experts_1e12", 2, "n_routed_experts and n_shared_experts x moe_intermediate_size need at least",
         "n_routed_experts=1000000000000")


def test_a_shard_with_a_zero_filled_tail_is_refused(batch):
    case(batch, "ckpt_zero_tail", 2, "model-00001-of-00001.safetensors: its last 1 MiB are all zero bytes")


def test_chat_without_a_template_fails_before_loading(batch):
    before_loading(case(batch, "chat_without_template", 2, "no chat template", "--chat"))


def test_a_chat_template_that_raises_is_one_line(batch):
    case(batch, "chat_template_divides_by_zero", 2, "zero.jinja) failed on the messages: ZeroDivisionError")
    case(batch, "chat_template_recurses", 2, "recursion.jinja) failed on the messages: RecursionError")


def test_sampling_arguments_fail_before_loading(batch):
    before_loading(case(batch, "temperature_nan", 2, "--temperature must be a finite number, got nan"))
    before_loading(case(batch, "temperature_tiny", 2, "--temperature 1e-30 is too small", "use 0 for greedy"))
    before_loading(case(batch, "top_p_zero", 2, "--top-p must be above 0"))
    before_loading(case(batch, "max_new_tokens_zero", 2, "--max-new-tokens must be at least 1"))
    before_loading(case(batch, "max_model_len_too_small", 2, "--max-model-len must be at least 2"))


def test_prompt_longer_than_the_context_fails_before_loading(batch):
    before_loading(case(batch, "prompt_longer_than_context", 2, "the prompt is", "tokens",
                        "no room to generate within --max-model-len 64"))


# ---- what used to be tracebacks -----------------------------------------------------------------

def test_unknown_device_is_one_line(batch):
    case(batch, "device_unknown", 2, "--device warp9: not a torch device")
    case(batch, "device_meta", 2, "--device meta: dsv3 cannot run on meta devices")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_one_line(batch):
    case(batch, "device_cuda0", 2, "--device cuda:0: this machine has no usable cuda device")


def test_max_shard_size_nan_is_refused(batch):
    case(batch, "max_shard_size_nan", 2, "--max-shard-size must be a positive number of GB, got nan")


def test_convert_into_a_file_is_refused_before_converting(batch, tmp_path):
    case(batch, "convert_into_a_file", 2, "exists and is not a directory")


def test_json_into_a_directory_is_refused_before_the_run(batch):
    result = case(batch, "conformance_json_dir", 2, "--json", "is a directory")
    assert "[1/" not in result["stderr"] and not result["stdout"]  # nothing ran


def test_prompt_bytes_that_are_not_utf8():
    result = dsv3("generate", b"caf\xe9 au lait", "--max-new-tokens", "2", text=True)
    assert_error(result.returncode, result.stderr, 2, "the prompt is not valid UTF-8 text", "\\xe9")


def test_closed_stdout_is_one_line():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before dsv3 writes, as with `| head -1` once it has its line
    try:
        result = dsv3("doctor", stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert result.returncode == 141 and "Traceback" not in result.stderr, result.stderr
    assert "broken pipe" in result.stderr


def test_generate_piped_into_head_stops_cleanly(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello from dsv3.\n" * 20)  # several batches: the later ones print into a closed pipe
    command = f"{sys.executable} -m dsv3 generate --input-file {prompts} --max-new-tokens 4 | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-3000:]
    assert done.returncode in (0, 141), done.stderr[-3000:]  # 0 when every line fit the pipe before head left
    assert done.stdout.startswith("Hello from dsv3.")


# ---- also expected ------------------------------------------------------------------------------

def test_version():
    result = dsv3("--version", text=True)
    assert result.returncode == 0 and result.stdout.startswith("dsv3 ")


def test_input_file_dash_reads_stdin_and_load_line():
    result = dsv3("generate", "--input-file", "-", "--max-new-tokens", "3", "--backend", "reference",
                  input="Hello from\nErrors should\n", text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Hello from") and lines[1].startswith("Errors should")
    loaded = [line for line in result.stderr.splitlines() if line.startswith("dsv3: loaded ")]
    assert len(loaded) == 1 and " MB in " in loaded[0] and loaded[0].endswith(" s"), result.stderr


def test_max_model_len_cutting_output_is_said():
    result = dsv3("generate", "Hello from dsv3.", "--max-model-len", "12", "--max-new-tokens", "50",
                  "--backend", "reference", text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dsv3: note: --max-model-len 12 cuts the output short" in result.stderr
    assert "not --max-new-tokens 50" in result.stderr


# ---- conformance that checked nothing -----------------------------------------------------------

def test_conformance_that_checked_nothing_exits_non_zero():
    pytest.importorskip("torch")
    try:
        import torch_npu  # noqa: F401
        pytest.skip("torch_npu is installed: the ascend backend may build here")
    except ImportError:
        pass
    result = dsv3("conformance", "--backend", "ascend", "--quick", "--op", "rms_norm", "--quiet", text=True)
    assert_error(result.returncode, result.stderr, 5, "nothing was checked", "skipped")
    assert "-> exit 5" in result.stdout


def test_ctrl_c_while_importing_is_one_line():
    """SIGINT 0.3 s in: `dsv3` is still importing torch (seconds), which used to end in a traceback."""
    script = ("import os, runpy, signal, sys, threading; "
              "threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start(); "
              "sys.argv = ['dsv3', 'doctor']; runpy.run_module('dsv3', run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 130 and result.stderr.strip() == "dsv3: interrupted", result.stderr[-2000:]
