"""Do the keys ``save_pretrained`` stores read back as the model's tensors? Every causal-LM class, on ``meta``.

    python examples/stored_keys_probe.py

For each causal-LM class of the installed transformers whose conversion mapping has converters (tensors it
combines or splits as it loads and saves: per-expert matrices, fused projections), the class is built from
its default config on ``meta`` (two layers at most), its tensors are turned into the keys, shapes and dtypes
``save_pretrained`` stores (``rewrite.io.stored_keys.StoredLayout``), and those are read back as
``open_checkpoint`` reads a folder: renamed by the loading renamings, combined by each converter
(``stored_keys.Conversion``, on meta tensors). The class must get back every tensor it holds, in its shape.
Prints one line per class and the counts; nothing is allocated, nothing is downloaded.
"""

from __future__ import annotations

import collections
import warnings

import torch


def probe(model_type: str, class_name: str) -> tuple[str, str]:
    """(outcome, detail) for one class: ``round trip``, ``mismatch``, ``no converter``, ``build fails``."""
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    from rewrite.io.stored_keys import Conversion, StoredLayout

    try:
        config = transformers.AutoConfig.for_model(model_type)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(config, key, None), int):
                setattr(config, key, min(getattr(config, key), 2))
        with torch.device("meta"):
            model = getattr(transformers, class_name)(config)
    except Exception as error:  # noqa: BLE001 - a default config the class cannot build: not a key question
        return "build fails", f"{type(error).__name__}"
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not converters:
        return "no converter", ""
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    state = model.state_dict()
    layout = StoredLayout(model, [(name, tuple(t.shape), t.dtype) for name, t in state.items()])
    stored = {key: (shape, dtype) for key, shape, dtype in layout.entries}
    read, parts = {}, collections.defaultdict(list)
    for key in sorted(stored, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            read[name] = stored[key][0]
        else:
            parts[name].append((pattern, key))
    for target, found in parts.items():
        made = Conversion(target, by_pattern[found[0][0]], found).make(
            lambda key: torch.empty(stored[key][0], dtype=stored[key][1], device="meta"), model)
        read.update({name: tuple(t.shape) for name, t in made.items()})
    wrong = [name for name, shape in read.items() if name not in state or tuple(state[name].shape) != shape]
    missing = sorted(set(state) - set(read))
    if wrong or missing:
        return "mismatch", f"read as {wrong[:2]}, not read: {missing[:2]}"
    split = sum(len(keys) > 1 or len(members) > 1 for members, keys in layout.keys.items())
    return "round trip", f"{split} tensors stored split or fused, {len(parts)} made of stored parts"


def main() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    counts = collections.Counter()
    for model_type, class_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        name = class_name if isinstance(class_name, str) else class_name[0]
        outcome, detail = probe(model_type, name)
        counts[outcome] += 1
        if outcome in ("round trip", "mismatch"):
            print(f"{model_type:28} {name:36} {outcome}: {detail}", flush=True)
    print(dict(counts))


if __name__ == "__main__":
    main()
