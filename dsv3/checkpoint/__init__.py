"""Checkpoints in the Hugging Face layout, read and written side by side.

- read: a safetensors checkpoint (or synthetic weights) tensor by tensor, every tensor checked
  against the layout before data is read and for NaN/Inf where it lands; WeightLoader hands them
  to the model.
- write: shards, index and config written all or nothing (`dsv3 convert`, tests, the tiny checkpoint).
"""

from dsv3.checkpoint.read import (  # noqa: F401
    FAST_FP8_STD,
    INDEX_FILE,
    CheckpointSource,
    FiniteSource,
    RandomSource,
    WeightLoader,
    WeightSource,
    check_regular_file,
    read_json,
)
from dsv3.checkpoint.write import (  # noqa: F401
    TOKENIZER_FILES,
    ShardWriter,
    atomic_directory,
    check_output,
    copy_tokenizer_files,
    is_checkpoint_dir,
    save_checkpoint,
    write_config,
)
