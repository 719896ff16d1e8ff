"""Torch-Pruning with gpconv (issue 23): prune a dense timm model's channels, then convert it; and the
reverse order, pruning a converted model, which keeps every grouped block whole or refuses in one line."""

import pytest
import torch

import gpconv
from gpconv.core.convert import GROUPED_BLOCKS
from gpconv.pruning import prune_channels, torch_pruning_options

timm = pytest.importorskip("timm")
tp = pytest.importorskip("torch_pruning")

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def dense_and_head(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    return model, model.pretrained_cfg["classifier"]


def blocks(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, GROUPED_BLOCKS)}


def trains(model):
    model.train()
    model(X).logsumexp(1).sum().backward()
    return all(parameter.grad is not None for parameter in model.parameters())


def test_prune_then_convert_ends_smaller_than_either_step_alone():
    dense, head = dense_and_head("mobilenetv3_small_050")
    pruned = prune_channels(dense, X, 0.5, ignored_layers=[dense.get_classifier()], round_to=8)
    converted = gpconv.convert(dense, 16, exclude=[head])
    both = gpconv.convert(pruned, 16, exclude=[head])
    sizes = {name: gpconv.count_parameters(model) for name, model in
             dict(dense=dense, pruned=pruned, converted=converted, both=both).items()}
    assert sizes["both"] < sizes["pruned"] < sizes["dense"] and sizes["both"] < sizes["converted"], sizes
    assert blocks(both) and gpconv.count_parameters(dense) == 578474  # the input model is not modified
    # the pruned layers are narrower, multiples of round_to, and the head still gives the 10 classes
    widths = {module.out_channels for module in pruned.modules() if isinstance(module, torch.nn.Conv2d)}
    assert all(width % 8 == 0 for width in widths) and both(X).shape == (2, 10) and trains(both)


def test_prune_convert_then_fit_brings_the_blocks_towards_the_pruned_layers():
    """The recipe's last step, the weight transfer (gpconv.core.fit): the fitted model is closer to the
    pruned dense model than the same conversion with fresh blocks (batch norms recomputed in both)."""
    from gpconv.core.fit import fit_to_dense, recompute_batch_norm

    dense, head = dense_and_head("mobilenetv3_small_050")
    pruned = prune_channels(dense, X, 0.5, ignored_layers=[dense.get_classifier()], round_to=8)
    calibration = [torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    recompute_batch_norm(pruned, calibration)
    fresh, fitted = (gpconv.convert(pruned, 16, exclude=[head]) for _ in range(2))
    recompute_batch_norm(fresh, calibration)
    fit_to_dense(pruned, fitted, calibration, steps=20)
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        target = pruned.eval()(images)
        errors = [(model.eval()(images) - target).norm() / target.norm() for model in (fresh, fitted)]
    assert errors[1] < 0.9 * errors[0], errors


@pytest.mark.parametrize("name,options,prunable", [("resnet18", {}, True), ("resnet26", {}, False),
                                                   ("convnext_atto", {"linear": True}, False)])
def test_pruning_a_converted_model_keeps_every_block_whole(name, options, prunable):
    """Basic blocks have inner channels no pointwise layer touches (pruned); in bottlenecks and ConvNeXt
    blocks every channel reaches a block (nothing to prune, and no error)."""
    dense, head = dense_and_head(name)
    converted = gpconv.convert(dense, 16, exclude=[head], **options)
    before = {name: {key: value.clone() for key, value in block.state_dict().items()}
              for name, block in blocks(converted).items()}
    pruned = prune_channels(converted, X, 0.5, ignored_layers=[converted.get_classifier()])
    after = blocks(pruned)
    assert after.keys() == before.keys()
    for block_name, state in before.items():
        assert after[block_name].state_dict().keys() == state.keys()
        assert all(torch.equal(after[block_name].state_dict()[key], value) for key, value in state.items()), block_name
    smaller = gpconv.count_parameters(pruned) < gpconv.count_parameters(converted)
    assert smaller == prunable
    assert pruned.eval()(X).shape == (2, 10) and trains(pruned)


def test_the_blocks_refuse_to_lose_channels_in_one_line():
    """A pruner given the blocks' pruner but not the layers to ignore: the blocks refuse (not a shape error
    at the next forward pass)."""
    dense, head = dense_and_head("resnet18")
    converted = gpconv.convert(dense, 16, exclude=[head])
    options = torch_pruning_options(converted, X)
    pruner = tp.pruner.MetaPruner(converted, X, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                                  customized_pruners=options["customized_pruners"], forward_fn=options["forward_fn"])
    with pytest.raises(ValueError, match="GroupedPointwiseConv2d cannot lose channels") as info:
        pruner.step()
    assert "\n" not in str(info.value)


def test_options_name_the_blocks_and_the_layers_that_feed_them():
    dense, head = dense_and_head("resnet18")
    converted = gpconv.convert(dense, 16, exclude=[head])
    ignored = {id(module) for module in torch_pruning_options(converted, X)["ignored_layers"]}
    assert all(id(block) in ignored for block in blocks(converted).values())
    # the residual stream of stage 2 reaches layer2.0.downsample.0 (a block): its writers are ignored ...
    assert id(converted.layer2[0].bn2) in ignored and id(converted.layer2[1].conv2) in ignored
    # ... while a basic block's inner channels reach no block
    assert id(converted.layer2[0].conv1) not in ignored


def test_bad_arguments_give_one_line_errors():
    dense, _ = dense_and_head("resnet18")
    with pytest.raises(ValueError, match="pruning_ratio must be in") as info:
        prune_channels(dense, X, 1.5)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="ignored_layers must be modules of the model") as info:
        prune_channels(dense, X, 0.5, ignored_layers=[torch.nn.Linear(2, 2)])
    assert "\n" not in str(info.value)
