"""Make the built-in tiny checkpoint, dsv3/assets/tiny, from dsv3/assets/corpus.txt.

CPU-only and deterministic: fixed seeds and one thread, so a rerun writes the same files bit for
bit (with the same torch and transformers on the same kind of CPU). Training takes about two
CPU-minutes; the whole script a few minutes.

1. Train a byte-level BPE tokenizer of 512 tokens on the corpus; ids 0-3 are DeepSeek's
   special tokens (begin and end of sentence, the User and Assistant tags).
2. Train a DeepSeek-V3-architecture model (configs/tiny.yaml) built with Hugging Face
   transformers' DeepseekV3ForCausalLM in fp32, plus its multi-token-prediction (MTP)
   module, until it has memorized the corpus: each paragraph as
   <bos>paragraph<eos>, and each "Q:"/"A:" pair in DeepSeek's chat format. The router's
   correction bias is trained the aux-loss-free way (nudged toward under-used experts).
   The MTP module is trained too (its loss is weighted 0.3), so it predicts the token
   after next; dsv3 loads it only when asked (load_model(..., load_mtp=True)).
3. Export it in the official DeepSeek-V3 Hugging Face layout (dsv3/tensor_specs.py): one
   gate/up/down projection per expert, every linear block-quantized to float8_e4m3fn with
   a float32 weight_scale_inv per 128x128 block, embeddings, norms and router in bf16, the
   correction bias in fp32, the MTP module as layer num_hidden_layers, and a config.json
   with quantization_config as in the real checkpoint.
4. Verify: dsv3's fp32 logits equal those of the transformers model given the dequantized
   weights, dsv3's MTP logits equal the training-time MTP's, and greedy decoding in bf16
   and fp8 (emulated) recites every paragraph and answer of the corpus. Exits 1 otherwise.

Usage:
    python scripts/make_tiny_checkpoint.py [--output DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsv3.backends import fp8  # noqa: E402

from dsv3 import tensor_specs  # noqa: E402
from dsv3.checkpoint import save_checkpoint  # noqa: E402
from dsv3.config import ModelConfig, load_config  # noqa: E402
from dsv3.server.chat_template import ChatTemplate  # noqa: E402
from dsv3.tokenizer import ASSISTANT, BOS, EOS, USER  # noqa: E402

CORPUS = ROOT / "dsv3" / "assets" / "corpus.txt"
#: the tiny checkpoint's chat template (DeepSeek-V3's format), copied into its tokenizer_config.json
CHAT_TEMPLATE = ROOT / "scripts" / "tiny_chat_template.jinja"
OUTPUT = ROOT / "dsv3" / "assets" / "tiny"
CONFIG = ROOT / "configs" / "tiny.yaml"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT]  # ids 0, 1, 2, 3
PROMPT_WORDS = 4  # a paragraph's prompt is its first four words
SEED = 0
THREADS = 1  # small matrices: one thread is about as fast, never oversubscribed, and bit-reproducible
MTP_LOSS_WEIGHT = 0.3
BIAS_UPDATE_SPEED = 1e-3


# ---- corpus and tokenizer -------------------------------------------------------------------

def read_corpus(path: Path = CORPUS) -> tuple[list[str], list[tuple[str, str]]]:
    """The corpus's prose paragraphs and its question/answer pairs.

    Paragraphs are separated by blank lines; a paragraph of two lines "Q: ..." and
    "A: ..." is a chat example.
    """
    paragraphs, chats = [], []
    for block in path.read_text(encoding="utf-8").strip().split("\n\n"):
        lines = block.strip().split("\n")
        if lines[0].startswith("Q: "):
            if len(lines) != 2 or not lines[1].startswith("A: "):
                raise ValueError(f"{path}: a Q: line must be followed by one A: line, found {block!r}")
            chats.append((lines[0][3:], lines[1][3:]))
        else:
            paragraphs.append(" ".join(lines))
    return paragraphs, chats


def paragraph_prompt(paragraph: str) -> tuple[str, str]:
    """(the paragraph's first PROMPT_WORDS words, the rest of it, starting with a space)."""
    words = paragraph.split(" ")
    prompt = " ".join(words[:PROMPT_WORDS])
    return prompt, paragraph[len(prompt):]


def train_tokenizer(path: Path = CORPUS, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    paragraphs, chats = read_corpus(path)
    tokenizer.train_from_iterator(paragraphs + [text for pair in chats for text in pair], trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, f"special token {token} got id {tokenizer.token_to_id(token)}"
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    return tokenizer


def tokenizer_files(tokenizer) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json contents."""
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
              "pad_token": EOS, "model_max_length": 1024, "tokenizer_class": "PreTrainedTokenizerFast",
              "clean_up_tokenization_spaces": False, "legacy": True,
              "chat_template": CHAT_TEMPLATE.read_text(encoding="utf-8").rstrip("\n")}
    generation = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}
    return {"tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "generation_config.json": json.dumps(generation, indent=2) + "\n"}


def chat_text(question: str) -> str:
    """DeepSeek's single-turn chat prompt (as the checkpoint's chat template renders it)."""
    return BOS + USER + question + ASSISTANT


def training_sequences(tokenizer, path: Path = CORPUS) -> list[list[int]]:
    """<bos>paragraph<eos> for each paragraph; <bos><User>Q<Assistant>A<eos> for each pair."""
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    paragraphs, chats = read_corpus(path)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    sequences = [[bos] + encode(p) + [eos] for p in paragraphs]
    sequences += [encode(chat_text(q)) + encode(a) + [eos] for q, a in chats]
    return sequences


# ---- the model in transformers --------------------------------------------------------------

def hf_config(c: ModelConfig):
    """The transformers DeepseekV3Config of a dsv3 config (rope interleaved, as the checkpoint stores it)."""
    from transformers import DeepseekV3Config

    rope = {"rope_type": "yarn", "rope_theta": c.rope_theta,
            **{k: v for k, v in (c.rope_scaling or {}).items() if k != "type"}}
    return DeepseekV3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
        n_shared_experts=c.n_shared_experts, n_routed_experts=c.n_routed_experts,
        routed_scaling_factor=c.routed_scaling_factor, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, qk_nope_head_dim=c.qk_nope_head_dim,
        n_group=c.n_group, topk_group=c.topk_group, num_experts_per_tok=c.num_experts_per_tok,
        first_k_dense_replace=c.first_k_dense_replace, norm_topk_prob=c.norm_topk_prob,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=rope, rope_interleave=True, attn_implementation="sdpa")


class MTPModule(torch.nn.Module):
    """DeepSeek-V3's multi-token prediction module around a transformers decoder layer.

    x_i = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]), then one MoE block, a norm and the
    head predict token t_{i+2}. The embedding and head are the main model's (the checkpoint
    stores copies).
    """

    def __init__(self, config):
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

        d, eps = config.hidden_size, config.rms_norm_eps
        self.enorm, self.hnorm = DeepseekV3RMSNorm(d, eps), DeepseekV3RMSNorm(d, eps)
        self.eh_proj = torch.nn.Linear(2 * d, d, bias=False)
        self.block = DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers)
        self.norm = DeepseekV3RMSNorm(d, eps)

    def forward(self, model, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] from final hidden states [B, T, D] and the following tokens [B, T]."""
        x = self.eh_proj(torch.cat((self.enorm(model.model.embed_tokens(next_tokens)), self.hnorm(hidden)), dim=-1))
        positions = torch.arange(x.shape[1])[None]
        x = self.block(x, attention_mask=None, position_ids=positions,
                       position_embeddings=model.model.rotary_emb(x, positions))
        return model.lm_head(self.norm(x))


def build_model(c: ModelConfig, seed: int = SEED):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = hf_config(c)
    model = DeepseekV3ForCausalLM(config).float()
    mtp = MTPModule(config).float()
    mtp.apply(model._init_weights)  # transformers' initialization (its experts start as torch.empty)
    return model, mtp


# ---- training -------------------------------------------------------------------------------

def batch(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T] and a mask [B, T] of real tokens."""
    length = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = True
    return tokens, mask


def losses(model, mtp, tokens, mask):
    """(next-token loss, token-after-next loss) over real tokens."""
    hidden = model.model(input_ids=tokens).last_hidden_state
    logits = model.lm_head(hidden)
    main = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    main = main[mask[:, 1:].flatten()].mean()
    mtp_logits = mtp(model, hidden[:, :-1], tokens[:, 1:])[:, :-1]
    ahead = F.cross_entropy(mtp_logits.flatten(0, 1), tokens[:, 2:].flatten(), reduction="none")
    return main, ahead[mask[:, 2:].flatten()].mean()


def routers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]


def train(model, mtp, sequences: list[list[int]], steps: int, pad: int, lr: float = 3e-3) -> None:
    """Full-batch AdamW with warmup and cosine decay; the correction bias follows expert load."""
    tokens, mask = batch(sequences, pad)
    # each router with the mask of the real tokens it sees (the MTP block sees positions 0..T-2)
    gates = [(g, mask.flatten()) for g in routers(model)] + [(g, mask[:, 1:].flatten()) for g in routers(mtp)]
    picks: dict[int, torch.Tensor] = {}  # router -> expert ids [N, k] of the last forward
    for n, (gate, _) in enumerate(gates):
        gate.register_forward_hook(lambda module, args, out, n=n: picks.__setitem__(n, out[2]))
    params = list(model.parameters()) + list(mtp.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    start = time.time()
    for step in range(steps):
        main, ahead = losses(model, mtp, tokens, mask)
        optimizer.zero_grad()
        (main + MTP_LOSS_WEIGHT * ahead).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for n, (gate, real) in enumerate(gates):
                load = torch.bincount(picks[n][real].flatten(), minlength=gate.num_experts).float()
                gate.e_score_correction_bias += BIAS_UPDATE_SPEED * torch.sign(load.mean() - load)
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {main.item():.4f}  mtp {ahead.item():.4f}  {time.time() - start:5.0f}s",
                  flush=True)


# ---- export in the official layout ----------------------------------------------------------

MTP_RENAMES = {"norm.weight": "shared_head.norm.weight"}  # MTPModule name -> official name (after the layer prefix)
FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")


def official_tensors(model, mtp, c: ModelConfig) -> dict[str, torch.Tensor]:
    """fp32 tensors by official checkpoint name (experts split, MTP as layer num_hidden_layers)."""
    fused = dict(model.state_dict())
    p = f"model.layers.{c.num_hidden_layers}"
    for name, tensor in mtp.state_dict().items():
        short = name.removeprefix("block.")
        fused[f"{p}.{MTP_RENAMES.get(short, short)}"] = tensor
    fused[f"{p}.embed_tokens.weight"] = fused["model.embed_tokens.weight"]
    fused[f"{p}.shared_head.head.weight"] = fused["lm_head.weight"]
    out = {}
    for name, tensor in fused.items():
        match = FUSED_EXPERTS.fullmatch(name)
        if match is None:
            out[name] = tensor
            continue
        for e, weight in enumerate(tensor):  # gate_up [2I, D] is gate then up; down [D, I]
            p = f"{match[1]}.{e}"
            if match[2] == "down_proj":
                out[f"{p}.down_proj.weight"] = weight
            else:
                out[f"{p}.gate_proj.weight"], out[f"{p}.up_proj.weight"] = weight.chunk(2)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def quantize_for_checkpoint(tensors: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: FP8 + weight_scale_inv for linears, bf16 or fp32 for the rest."""
    out = {}
    specs = tensor_specs.module_specs(c, include_mtp=True)
    for module, spec in specs.items():
        name = tensor_specs.tensor_name(module)
        tensor = tensors[name]
        assert tuple(tensor.shape) == spec.shape, f"{name}: {list(tensor.shape)} != {list(spec.shape)}"
        if spec.kind == tensor_specs.LINEAR:
            out[name], out[f"{module}.weight_scale_inv"] = fp8.quantize_blocks(tensor)
        else:
            out[name] = tensor.float() if spec.kind == tensor_specs.FP32 else tensor.to(torch.bfloat16)
    extra = set(tensors) - {tensor_specs.tensor_name(m) for m in specs}
    assert not extra, f"tensors outside the layout: {sorted(extra)}"
    return out


def checkpoint_config(c: ModelConfig) -> dict:
    """config.json in the style of the real DeepSeek-V3 one."""
    fields = c.to_dict()
    fields.pop("quantization_config", None)
    return {"architectures": ["DeepseekV3ForCausalLM"], **fields, "num_key_value_heads": c.num_attention_heads,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "use_cache": True, "torch_dtype": "bfloat16",
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [128, 128]}}


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in fp32, FP8 linears multiplied by their block scales."""
    from dsv3.checkpoint import CheckpointSource

    source = CheckpointSource(path)
    out = {}
    for name in sorted(source.names()):
        if name.endswith("weight_scale_inv"):
            continue
        tensor = source.get(name)
        if tensor.dtype == torch.float8_e4m3fn:
            scale = source.get(name.removesuffix(".weight") + ".weight_scale_inv")
            tensor = fp8.dequantize_blocks(tensor, scale, torch.float32)
        out[name] = tensor.float()
    return out


def hf_model_from_checkpoint(path: Path):
    """(transformers model, MTP module) holding a checkpoint's dequantized weights in fp32."""
    c = load_config(path)
    model, mtp = build_model(c)
    tensors = dequantized(path)
    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        e = f"model.layers.{i}.mlp.experts"
        if f"{e}.0.down_proj.weight" not in tensors:
            continue
        gate_up = [torch.cat((tensors.pop(f"{e}.{j}.gate_proj.weight"), tensors.pop(f"{e}.{j}.up_proj.weight")))
                   for j in range(c.n_routed_experts)]
        tensors[f"{e}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{e}.down_proj"] = torch.stack([tensors.pop(f"{e}.{j}.down_proj.weight")
                                                 for j in range(c.n_routed_experts)])
    p = f"model.layers.{c.num_hidden_layers}."
    main = {k: v for k, v in tensors.items() if not k.startswith(p)}
    model.load_state_dict(main, strict=True)
    own = {"enorm.weight", "hnorm.weight", "eh_proj.weight"}
    from_official = {v: k for k, v in MTP_RENAMES.items()}
    mtp_state = {}
    for name, tensor in tensors.items():
        short = name.removeprefix(p)
        if short == name or short in ("embed_tokens.weight", "shared_head.head.weight"):
            continue  # a main-model tensor, or the MTP's copies of the embedding and head
        mtp_state[from_official.get(short, short if short in own else f"block.{short}")] = tensor
    mtp.load_state_dict(mtp_state, strict=True)
    return model.eval(), mtp.eval()


# ---- verification ---------------------------------------------------------------------------

def expected_continuations(path: Path = CORPUS) -> list[tuple[str, str, bool]]:
    """(prompt, continuation, is_chat) for every paragraph and question of the corpus."""
    paragraphs, chats = read_corpus(path)
    return [(*paragraph_prompt(p), False) for p in paragraphs] + [(q, a, True) for q, a in chats]


def verify(path: Path) -> bool:
    """Parity with transformers and greedy recitation in bf16 and fp8; prints a report."""
    import dsv3

    ok = True
    model, mtp = hf_model_from_checkpoint(path)
    reference = dsv3.load_model(path, backend="reference", precision="fp32", max_batch_size=16, quiet=True,
                                load_mtp=True)
    from tokenizers import Tokenizer

    tokens, _ = batch(training_sequences(Tokenizer.from_file(str(path / "tokenizer.json"))), pad=1)
    following = tokens.roll(-1, dims=1)
    with torch.no_grad():
        hidden = model.model(input_ids=tokens).last_hidden_state
        expected, expected_mtp = model.lm_head(hidden), mtp(model, hidden, following)
    for what, got, want in (("logits", reference.logits(tokens), expected),
                            ("MTP logits", reference.transformer.mtp_logits(tokens, following), expected_mtp)):
        error = ((got - want).norm() / want.norm()).item()
        ok &= error < 1e-4
        print(f"{what}: dsv3 fp32 vs transformers (dequantized weights): relative error {error:.2e}")
    for precision in ("bf16", "fp8"):
        loaded = dsv3.load_model(path, backend="reference", precision=precision, max_batch_size=16, quiet=True)
        cases = expected_continuations()
        template = ChatTemplate.load(path)
        prompts = [template.render([{"role": "user", "content": q}]) if chat else q for q, _, chat in cases]
        greedy = dsv3.SamplingParams(max_tokens=400, temperature=0.0)
        outputs = [o.outputs[0].text for o in loaded.generate(prompts, greedy)]
        right = sum(out == want for out, (_, want, _) in zip(outputs, cases))
        for out, (prompt, want, _) in zip(outputs, cases):
            if out != want:
                print(f"  {precision} MISMATCH for {prompt!r}:\n    got  {out!r}\n    want {want!r}")
        print(f"greedy {precision}: {right}/{len(cases)} continuations recited exactly")
        ok &= right == len(cases)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"checkpoint directory (default {OUTPUT})")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)

    c = load_config(CONFIG)
    tokenizer = train_tokenizer()
    sequences = training_sequences(tokenizer)
    print(f"corpus: {len(sequences)} sequences, {sum(map(len, sequences))} tokens; config {CONFIG.name}")
    model, mtp = build_model(c)
    train(model, mtp, sequences, args.steps, pad=tokenizer.token_to_id(EOS))

    tensors = quantize_for_checkpoint(official_tensors(model, mtp, c), c)
    staging = args.output.parent / f".{args.output.name}.tokenizer"
    staging.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(tokenizer).items():
        (staging / name).write_text(text, encoding="utf-8")
    try:
        save_checkpoint(args.output, tensors, checkpoint_config(c), tokenizer_dir=staging, overwrite=True)
    finally:
        for file in staging.iterdir():
            file.unlink()
        staging.rmdir()
    size = sum(f.stat().st_size for f in args.output.iterdir())
    print(f"wrote {args.output} ({size / 1e6:.1f} MB)")
    return 0 if verify(args.output) else 1


if __name__ == "__main__":
    sys.exit(main())
