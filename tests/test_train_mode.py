"""A grown module trains like the original: ``.train()`` turns dropout and batch statistics on, ``.eval()`` off,
on both front-ends (torch.export bakes eval mode into its ops; the trace makes them modules again)."""

import pytest
import torch
import torch.nn as nn

import passes
import rewrite


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_dropout_and_batch_norm_follow_train_and_eval(frontend):
    model = Net().eval()
    x = torch.randn(4, 3, 6, 6)
    graph = rewrite.trace(model, (x,), frontend=frontend)
    grown = rewrite.apply(graph, [passes.widen("conv", factor=2, init="clone")], (x,))
    module = grown.module
    assert torch.allclose(module(x), model(x), atol=1e-6)  # eval mode: the original's function
    modules = {n.target: type(grown.graph.module.get_submodule(n.target)).__name__
               for n in grown.graph.module.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"}
    assert modules["bn"] == "BatchNorm2d" and modules["drop"] == "Dropout"
    stats = module.get_submodule("bn").running_mean.clone()
    module.train()
    first, second = module(x), module(x)
    assert not torch.equal(first, second)  # dropout is on
    assert not torch.equal(module.get_submodule("bn").running_mean, stats)  # batch statistics are used and kept
    assert int(module.get_submodule("bn").num_batches_tracked) == 2
    module.eval()
    assert torch.equal(module(x), module(x))


def test_a_grown_gpt2_traced_by_export_trains_with_its_dropout():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, n_positions=64, resid_pdrop=0.5,
                        embd_pdrop=0.5, bos_token_id=0, eos_token_id=1)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 96, (2, 8))
    grown = rewrite.apply(model, [passes.widen_mlp(factor=2), passes.add_layers(1)], (ids,))
    dropouts = {n: m.p for n, m in grown.module.named_modules() if isinstance(m, nn.Dropout)}
    assert dropouts == {"transformer.drop": 0.5, "transformer.h.0.attn.resid_dropout": 0.5,
                        "transformer.h.0.mlp.dropout": 0.5, "transformer.h.1.attn.resid_dropout": 0.5,
                        "transformer.h.1.mlp.dropout": 0.5}  # the copied block has its own
    grown.module.train()
    assert not torch.equal(grown.module(ids).logits, grown.module(ids).logits)
    grown.module.eval()
    assert torch.allclose(grown.module(ids).logits, model(ids).logits, atol=1e-5)
