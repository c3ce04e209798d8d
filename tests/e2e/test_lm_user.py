"""Language models as a user runs them: `kiln train --model lm` on real text (the standard
library's own sources), `kiln generate`, `kiln export --format hf` read back by `transformers`,
`kiln models import hf:DIR`, and the one-line errors, each command a subprocess."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.e2e.kiln_process import kiln, kiln_env, kiln_json

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = f"text:{STDLIB}/json/*.py"

pytestmark = pytest.mark.slow  # a model trained by `kiln train` first: about 2 minutes
"""About 60 KB of real Python: code, docstrings and comments."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("lm-home")
    env = kiln_env(home, free_port(), HF_HUB_OFFLINE="1")
    result = kiln_json(
        env,
        "train",
        "--data",
        CORPUS,
        "--model",
        "lm",
        "--vocab-size",
        "512",
        "--block-size",
        "64",
        "--max-steps",
        "40",
        "--register",
        "pylm",
    )
    return {"env": env, "home": home, "result": result}


def test_train_registers_a_language_model_with_held_out_perplexity(trained):
    result = trained["result"]
    assert (result["model"], result["version"], result["num_workers"]) == ("pylm", 1, 2)
    metrics = result["metrics"]
    # Better than guessing among 512 tokens, and better than the unigram model of the corpus.
    assert metrics["perplexity"] < metrics["unigram_perplexity"] < 512
    assert metrics["tokens_per_s"] > 0 and metrics["steps"] == 40
    shown = kiln_json(trained["env"], "models", "show", "pylm@1")
    files = set(shown["artifacts"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= files
    assert shown["lineage"]["tokenizer_source"].startswith("trained on text:")


def test_generate_equals_transformers_greedy_on_the_exported_folder(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = trained["env"]
    generated = kiln_json(env, "generate", "pylm@1", "--prompt", "def ", "--max-tokens", "24")
    assert generated["finish_reason"] in ("stop", "length") and generated["tokens_per_s"] > 0
    out = tmp_path / "pylm-hf"
    exported = kiln_json(env, "export", "pylm@1", "--format", "hf", "--out", str(out))
    assert "model.safetensors" in exported["files"]

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    prompt = config.get("kiln_prompt_prefix", []) + tokenizer.encode(
        "def ", add_special_tokens=False
    )
    with torch.no_grad():
        reference = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=generated["tokens"],
            do_sample=False,
            eos_token_id=config["eos_token_id"],
            pad_token_id=config["pad_token_id"],
        )[0, len(prompt) :].tolist()
    reference = [t for t in reference if t != config["eos_token_id"]]
    assert tokenizer.decode(reference) == generated["text"]

    imported = kiln_json(env, "models", "import", f"hf:{out}", "--name", "pylm-copy")
    assert imported["ref"] == "pylm-copy@1"
    again = kiln_json(env, "generate", "pylm-copy", "--prompt", "def ", "--max-tokens", "24")
    assert again["text"] == generated["text"]


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["train", "--data", "text:/nonexistent/**/*.txt", "--model", "lm"], "no text"),
        (["train", "--data", "sklearn:iris", "--model", "lm"], "A language model reads text"),
        (["train", "--data", CORPUS, "--model", "lm", "--hidden", "8"], "--hidden"),
        (["train", "--data", "sklearn:iris", "--block-size", "64"], "--model lm"),
        (["train", "--data", CORPUS, "--model", "lm", "--vocab-size", "100000"], "--vocab-size"),
        (["generate", "pylm@1", "--prompt", "x " * 200], "context"),
        (["generate", "nosuch", "--prompt", "x"], "no model named nosuch"),
        (["models", "import", "/not/hf/prefixed"], "hf:DIR"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(trained, args, fragment):
    done = kiln(trained["env"], *args)
    assert done.returncode == 2, done.stderr
    assert fragment in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_pickle_only_folder_is_refused_by_name(trained, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    done = kiln(trained["env"], "models", "import", f"hf:{folder}")
    assert done.returncode == 2 and "pytorch_model.bin" in done.stderr, done.stderr


def test_the_console_shows_a_language_model_version(trained, tmp_path):
    import signal
    import subprocess
    import time

    import httpx

    from tests.e2e.kiln_process import KILN

    port = free_port()
    log = (tmp_path / "ui.log").open("w")
    ui = subprocess.Popen(
        [*KILN, "ui", "--no-auth", "--port", str(port)],
        env=trained["env"],
        cwd=trained["env"]["KILN_HOME"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/ui/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        for page in (
            "/ui/fragments/models",
            "/ui/fragments/models/pylm",
            "/ui/fragments/models/pylm/versions/1",
            "/ui/fragments/models/pylm/variants",
        ):
            shown = httpx.get(base + page, timeout=30)
            assert shown.status_code == 200, f"{page}: {shown.text[:300]}"
        version = httpx.get(f"{base}/ui/fragments/models/pylm/versions/1", timeout=30).text
        assert "perplexity" in version and "explain a row" not in version
        refused = httpx.get(f"{base}/ui/fragments/models/pylm/versions/1/explain", timeout=30)
        assert refused.status_code == 409 and "language model" in refused.json()["error"]
    finally:
        ui.send_signal(signal.SIGINT)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ui.kill()
