"""`dsv3 serve --speculative-config ...`: a real server drafting with the tiny checkpoint's MTP module, answering
the real `openai` client exactly as the plain engine would (greedy), its acceptance in /metrics."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import ROOT, ServerProcess

import dsv3
from dsv3.serving.params import SamplingParams

PROMPT = "A mixture of experts"


@pytest.fixture(scope="module")
def spec_server():
    process = ServerProcess("--speculative-config", '{"method": "deepseek_mtp", "num_speculative_tokens": 2}')
    yield process
    process.stop()


def test_serve_with_mtp_answers_as_the_plain_engine(spec_server):
    client = openai.OpenAI(base_url=f"{spec_server.url}/v1", api_key="none", max_retries=0, timeout=120)
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=32, temperature=0)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=32, temperature=0, stream=True))
    plain = dsv3.load_model(max_model_len=512, cache_tokens=8192, quiet=True)  # as the server: bf16 on the CPU
    want = plain.generate([PROMPT], SamplingParams(max_tokens=32, temperature=0))[0].outputs[0].text
    assert got.choices[0].text == streamed == want
    text = httpx.get(f"{spec_server.url}/metrics", timeout=10).text
    samples = {(s.name, s.labels.get("position")): s.value for family in text_string_to_metric_families(text)
               for s in family.samples}
    drafts, proposed = samples[("dsv3:spec_decode_num_drafts_total", None)], \
        samples[("dsv3:spec_decode_num_draft_tokens_total", None)]
    accepted = samples[("dsv3:spec_decode_num_accepted_tokens_total", None)]
    per_pos = [samples[("dsv3:spec_decode_num_accepted_tokens_per_pos_total", str(j))] for j in range(2)]
    assert drafts > 0 and proposed >= drafts and 0 < accepted <= proposed and sum(per_pos) == accepted


@pytest.mark.parametrize("value, message", [
    ('{"method": "medusa"}', "method 'medusa' is not supported (supported: mtp, deepseek_mtp)"),
    ('{"method": "mtp", "num_speculative_tokens": 0}', "num_speculative_tokens must be an integer >= 1, got 0"),
])
def test_a_bad_speculative_config_is_one_line_before_loading(value, message):
    result = subprocess.run([sys.executable, "-m", "dsv3", "serve", "--speculative-config", value],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == f"dsv3: error: --speculative-config: {message}"
