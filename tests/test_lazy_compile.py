"""Code made on first use: a pending GraphModule answers, runs and prints exactly as a recompiled one would."""

import copy
import inspect

import pytest
import torch
from conftest import traced

import passes
import rewrite
from rewrite.ir.lazy_compile import compile_now, compile_on_first_use, is_pending


def _fresh(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A module over the same graph whose code ``recompile`` made (the reference)."""
    copy_ = torch.fx.GraphModule(module, copy.deepcopy(module.graph))
    copy_.__dict__.update({k: v for k, v in vars(module).items() if k.startswith("_") and "spec" in k})
    for hook in module._forward_pre_hooks.values():
        copy_.register_forward_pre_hook(hook, with_kwargs=True)
    return copy_


def _pending_grown(name: str, growth):
    """The module of ``name`` grown by ``growth``, its code left pending (as every intermediate of a plan is)."""
    built, graph = traced(name)
    grown = rewrite.apply(graph, [growth], built.args, built.kwargs, verify=False)
    module = grown.graph.module_copy()
    for node in module.graph.nodes:  # an edit that changes no input: what every rule does
        node.meta["edited"] = True
    compile_on_first_use(module)
    return built, grown.graph, module


@pytest.mark.parametrize("name, growth", [
    ("hf-llama", passes.widen_mlp(factor=2)),  # exported: pytree code generation, inputs checked by a pre-hook
    ("hf-gpt2", passes.add_layers(1)),
    ("gpt", passes.widen_hidden(factor=2, init="clone")),  # fx: the plain code generation
    ("cnn", passes.widen_mlp(factor=2)),
])
def test_pending_module_signature_outputs_and_code_match_a_recompiled_one(name, growth):
    built, graph, module = _pending_grown(name, growth)
    assert is_pending(module)
    reference = _fresh(module)
    assert inspect.signature(module.forward) == inspect.signature(reference.forward)
    args, kwargs = graph.call_inputs(built.args, built.kwargs)
    expected = reference(*args, **kwargs)
    torch.testing.assert_close(module(*args, **kwargs), expected, rtol=0, atol=0)
    assert not is_pending(module)  # the first call made the code
    assert module.code == reference.code


def test_reading_code_or_printing_makes_the_code():
    _, _, module = _pending_grown("hf-llama", passes.widen_mlp(factor=2))
    text = str(module)
    assert not is_pending(module)
    assert module.code in text and "def forward(self, input_ids, use_cache)" in module.code


def test_a_copy_of_a_pending_module_is_pending_and_runs_the_same():
    built, graph, module = _pending_grown("gpt", passes.widen_mlp(factor=2))
    copied = graph.with_module(module).module_copy()
    assert is_pending(copied) and is_pending(module)
    args, kwargs = graph.call_inputs(built.args, built.kwargs)
    torch.testing.assert_close(copied(*args, **kwargs), _fresh(module)(*args, **kwargs), rtol=0, atol=0)
    assert is_pending(module)  # making the copy's code leaves the source's to it


@pytest.mark.parametrize("target, default", [("scale", None), ("gain", 2.0), ("*rest", None)])
def test_a_pending_signature_follows_inputs_an_edit_adds(target, default):
    _, graph = traced("gpt")
    module = graph.module_copy()
    last = list(module.graph.find_nodes(op="placeholder"))[-1]
    with module.graph.inserting_after(last):
        module.graph.placeholder(target, default_value=inspect.Parameter.empty if default is None else default)
    compile_on_first_use(module)
    assert is_pending(module)
    pending = inspect.signature(module.forward)
    assert pending == inspect.signature(_fresh(module).forward)
    assert list(pending.parameters) == [last.target, target.lstrip("*")]


def test_recompile_called_directly_makes_a_pending_module_current():
    built, graph, module = _pending_grown("gpt", passes.widen_mlp(factor=2))
    module.recompile()
    assert not is_pending(module)
    args, kwargs = graph.call_inputs(built.args, built.kwargs)
    torch.testing.assert_close(module(*args, **kwargs), _fresh(module)(*args, **kwargs), rtol=0, atol=0)
    assert module.code == _fresh(module).code
    compile_now(module)  # nothing left to do


def test_what_apply_and_trace_hand_out_is_compiled_and_a_plan_on_meta_is_not():
    grown = rewrite.apply(*traced("hf-llama")[1:], [passes.widen_mlp(factor=2)], verify=False)
    assert not is_pending(grown.graph.module) and not is_pending(grown.original.module)
    from rewrite.app import zoo

    built = zoo.build("hf-llama")
    with torch.device("meta"):
        empty = type(built.model)(built.model.config)
    ids = torch.zeros_like(built.args[0], device="meta")
    graph = rewrite.trace(empty, (ids,))
    planned = rewrite.apply(graph, [passes.widen_mlp(factor=2), passes.add_layers(1)], verify=False)
    assert is_pending(graph.module) and is_pending(planned.graph.module)  # 4 + 2 recompiles not made
    assert list(inspect.signature(planned.graph.module.forward).parameters) == ["input_ids", "use_cache"]


def test_a_module_made_and_run_while_recompiles_are_deferred_makes_its_code_when_run():
    from rewrite.ir.lazy_compile import recompiles_deferred

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    x = torch.randn(2, 4)
    with recompiles_deferred():
        module = torch.fx.symbolic_trace(model)
        assert is_pending(module)
        torch.testing.assert_close(module(x), model(x), rtol=0, atol=0)
    assert not is_pending(module) and 'getattr(self, "1")' in module.code
    assert torch.fx.GraphModule.recompile is not compile_on_first_use  # restored on leaving
