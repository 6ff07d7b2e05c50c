"""Tracing: every zoo model becomes a Graph that reproduces it, with shapes, owners and readers."""

import pytest
import torch
import torch.nn as nn
from conftest import traced

import rewrite
from rewrite.app import zoo

HAND_WRITTEN = ("mlp", "cnn", "gpt", "llama")
HUGGING_FACE = ("hf-gpt2", "hf-llama", "hf-qwen2", "hf-bert", "hf-mixtral")


@pytest.mark.parametrize("name", zoo.NAMES)
def test_graph_reproduces_model_exactly(name):
    built, graph = traced(name)
    report = rewrite.verify(built.model, graph, built.args, built.kwargs)
    assert report.ok, str(report)
    assert report.max_abs_error == 0.0


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_auto_uses_fx_for_hand_written_models(name):
    _, graph = traced(name)
    assert graph.frontend == "fx"
    assert any(n.op == "call_module" for n in graph.nodes)


@pytest.mark.parametrize("name", HUGGING_FACE)
def test_auto_uses_export_for_hugging_face_models(name):
    _, graph = traced(name)
    assert graph.frontend == "export"
    assert "aten.embedding" in graph.op_counts()


@pytest.mark.parametrize("name", zoo.NAMES)
def test_every_compute_node_has_a_shape(name):
    _, graph = traced(name)
    for node in graph.compute_nodes():
        assert "tensor_meta" in node.meta, node.name
    built, _ = traced(name)
    first_input = graph.input_names[0]
    assert graph.shape(first_input) == built.args[0].shape
    assert graph.dtype(first_input) == built.args[0].dtype


@pytest.mark.parametrize("name", zoo.NAMES)
def test_parameter_count_matches_model(name):
    built, graph = traced(name)
    assert graph.num_parameters == sum(p.numel() for p in built.model.parameters())


def test_fx_linear_node_reads_its_weight_and_knows_its_owner():
    _, graph = traced("gpt")
    info = graph.parameters()["blocks.0.fc.weight"]
    assert info.readers == ["blocks_0_fc"]
    assert graph.owner("blocks_0_fc") == "blocks.0.fc"
    assert graph.shape("blocks_0_fc") == torch.Size([2, 12, 64])


def test_export_linear_reads_its_weight_and_knows_its_owner():
    _, graph = traced("hf-llama")
    info = graph.parameters()["model.layers.0.mlp.down_proj.weight"]
    (reader,) = info.readers
    assert graph.op_kind(reader) == "aten.linear"
    assert graph.owner(reader) == "model.layers.0.mlp.down_proj"
    assert graph.shape(reader) == torch.Size([2, 8, 32])


@pytest.mark.parametrize("name, tied", [("gpt", ("tok.weight", "head.weight")),
                                        ("hf-gpt2", ("transformer.wte.weight", "lm_head.weight"))])
def test_tied_weights_are_one_parameter_with_aliases(name, tied):
    _, graph = traced(name)
    params = graph.parameters()
    first, alias = tied
    assert alias not in params
    assert params[first].aliases == [alias]
    assert len(params[first].readers) == 2  # the embedding lookup and the output head


def test_rope_tables_are_graph_buffers_in_fx():
    _, graph = traced("llama")
    tensors = graph.tensors()
    assert tensors["rope.cos"].kind == "buffer" and tensors["rope.cos"].readers


def test_summary_names_frontend_ops_parameters_and_collapsed_layers():
    _, graph = traced("hf-gpt2")
    text = str(graph)
    assert "GPT2LMHeadModel" in text and "torch.export" in text
    assert "aten.addmm x8" in text  # GPT-2's Conv1D projections
    assert "h.0-1  GPT2Block x2" in text
    assert "tied: lm_head.weight = transformer.wte.weight" in text
    assert "use_cache" in text


def test_causal_lm_is_traced_without_cache():
    built, graph = traced("hf-llama")
    assert graph.fixed_kwargs == {"use_cache": False}
    out = graph(*built.args)
    assert list(out.keys()) == ["logits"]


def test_export_graph_accepts_other_batch_and_sequence_sizes():
    built, graph = traced("hf-qwen2")
    ids = torch.randint(0, 96, (3, 11))
    expected = built.model(ids, use_cache=False).logits
    torch.testing.assert_close(graph(ids).logits, expected, rtol=0, atol=0)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def test_data_dependent_control_flow_is_a_trace_error_naming_both_tracers():
    with pytest.raises(rewrite.TraceError) as info:
        rewrite.trace(DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert message.startswith("cannot trace DataDependent:")
    assert "fx:" in message and "export:" in message
    assert len(message.splitlines()) == 3  # one line per tracer
    assert set(info.value.reasons) == {"fx", "export"}


def test_forced_fx_on_hugging_face_model_reports_fx_reason():
    built = zoo.build("hf-gpt2")
    with pytest.raises(rewrite.TraceError) as info:
        rewrite.trace(built.model, built.args, frontend="fx")
    assert list(info.value.reasons) == ["fx"]


class ShapeBranch(nn.Module):
    """A model with a non-tensor keyword input, which tracing fixes as a constant."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, scale: float = 2.0):
        return self.lin(x) * scale


def test_non_tensor_inputs_are_fixed_constants_in_fx():
    model = ShapeBranch()
    x = torch.randn(2, 4)
    graph = rewrite.trace(model, (x,), {"scale": 3.0})
    assert graph.frontend == "fx"
    torch.testing.assert_close(graph(x, scale=3.0), model(x, 3.0))


def test_trace_leaves_model_untouched_and_restores_training_flags():
    built = zoo.build("cnn")
    built.model.train()
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    graph = rewrite.trace(built.model, built.args)
    assert built.model.training and all(m.training for m in built.model.modules())
    for k, v in built.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # traced in eval mode: BatchNorm uses running statistics
    built.model.eval()
    torch.testing.assert_close(graph(*built.args), built.model(*built.args), rtol=0, atol=0)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(rewrite.GrowfxError, match="expects a torch.nn.Module"):
        rewrite.trace(lambda x: x, (torch.randn(2),))
    with pytest.raises(rewrite.GrowfxError, match="fails on the example inputs"):
        rewrite.trace(nn.Linear(4, 2), (torch.randn(2, 5),))
    with pytest.raises(rewrite.GrowfxError, match="unknown frontend"):
        rewrite.trace(nn.Linear(4, 2), (torch.randn(2, 4),), frontend="jit")
    _, graph = traced("mlp")
    with pytest.raises(rewrite.InputError, match="signature"):
        graph.run(torch.randn(2, 16), torch.randn(2))


def test_calling_with_a_different_fixed_input_is_refused():
    model = ShapeBranch()
    x = torch.randn(2, 4)
    graph = rewrite.trace(model, (x,), {"scale": 3.0})
    torch.testing.assert_close(graph(x), model(x, 3.0))
    with pytest.raises(rewrite.InputError, match="scale=3.0 fixed; got scale=5.0"):
        graph(x, scale=5.0)


def test_a_plan_on_meta_records_no_source_lines_and_a_traced_model_does():
    """Nodes of a graph traced on real weights say which line of the model made them; a graph traced on
    ``meta`` (a plan: nothing of it runs) skips recording them, and the setting is restored after."""
    import torch.fx.config

    built, graph = traced("hf-llama")
    lines = [n.meta.get("stack_trace") for n in graph.compute_nodes()]
    assert sum(bool(line) for line in lines) > len(lines) // 2
    assert any("modeling_llama.py" in line for line in lines if line)
    with torch.device("meta"):
        empty = type(built.model)(built.model.config)
    planned = rewrite.trace(empty, (torch.zeros_like(built.args[0], device="meta"),))
    assert len(planned.compute_nodes()) > 100  # static shapes: fewer nodes than the dynamic graph
    assert not any(n.meta.get("stack_trace") for n in planned.compute_nodes())
    assert torch.fx.config.do_not_emit_stack_traces is False
