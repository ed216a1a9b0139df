import pytest
from torch import nn

from lit_efficient.core.targets import (
    default_exemptions,
    fqn_matches,
    match_modules,
    module_kind,
    select_targets,
    validate_patterns,
)

timm = pytest.importorskip("timm")


def tiny_vit():
    return timm.models.VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                                         num_heads=2, mlp_ratio=2)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
                                      eos_token_id=0))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16, tie_word_embeddings=False))


def tiny_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)


class Wrapper(nn.Module):
    """A LightningModule-like holder: the network lives under ``self.model``."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def names(targets):
    return [t.name for t in targets]


def test_vit_defaults_are_the_block_linears():
    vit = tiny_vit()
    targets = select_targets(vit)
    expected = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert names(targets) == expected
    assert default_exemptions(vit) == {"patch_embed.proj": "stem / patch embedding", "head": "output head"}
    # no bias, norm, token or positional embedding is ever a target
    assert all(t.param.dim() == 2 for t in targets)


def test_patterns_match_at_module_boundaries():
    wrapped = Wrapper(tiny_vit())
    targets = select_targets(wrapped, include=["blocks.*.mlp.fc1"])
    assert names(targets) == ["model.blocks.0.mlp.fc1", "model.blocks.1.mlp.fc1"]
    assert fqn_matches("model.blocks.0.mlp.fc1", "blocks.*.fc1")
    assert not fqn_matches("model.blocks.0.mlp.fc10", "blocks.*.fc1")
    assert not fqn_matches("xblocks.0", "blocks.0")
    # include overrides the default exemptions: the user asked for the head and the patch embedding
    assert names(select_targets(wrapped, include=["head", "patch_embed.proj"])) == [
        "model.patch_embed.proj", "model.head"]


def test_exclude_kinds_and_regex():
    vit = tiny_vit()
    assert names(select_targets(vit, exclude=["blocks.*.attn.*"])) == [
        "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert names(select_targets(vit, include=["re:blocks\\.1\\.mlp\\.fc[12]"])) == [
        "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert names(select_targets(vit, include=["*"], kinds=["conv"])) == ["patch_embed.proj"]
    # naming a module names its whole subtree
    assert names(select_targets(vit, include=["blocks.1"], exclude=["blocks.1.attn"])) == [
        "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]


def test_resnet_and_convnext_exempt_stem_and_head():
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    exempt = default_exemptions(resnet)
    assert exempt["fc"] == "output head"
    first_conv = next(n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d))
    assert exempt[first_conv] == "stem / patch embedding"
    targets = select_targets(resnet)
    assert first_conv not in names(targets) and "fc" not in names(targets)
    assert {t.kind for t in targets} == {"conv"}
    assert not any(isinstance(t.module, nn.BatchNorm2d) for t in targets)
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    assert set(default_exemptions(convnext)) == {"stem.0", "head.fc"}


def test_unet_exempts_conv_in_and_conv_out():
    unet = tiny_unet()
    assert default_exemptions(unet) == {"conv_in": "stem / patch embedding", "conv_out": "output head"}
    targets = select_targets(unet)
    assert "time_embedding.linear_1" in names(targets)
    assert {t.kind for t in targets} == {"linear", "conv"}


def test_gpt2_tied_head_and_conv1d():
    gpt2 = tiny_gpt2()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    exempt = default_exemptions(gpt2)
    assert exempt == {"transformer.wte": "embedding", "transformer.wpe": "embedding"}
    targets = select_targets(gpt2)
    assert len(targets) == 8 and all(t.kind == "linear" and t.transposed for t in targets)
    c_fc = next(t for t in targets if t.name == "transformer.h.0.mlp.c_fc")
    assert tuple(c_fc.param.shape) == (32, 128)  # Conv1D stores (in, out)
    assert tuple(c_fc.matrix().shape) == (128, 32) and c_fc.reduction_dim == 0
    # the tied weight is ONE target whichever name selects it, with the other name as alias
    tied = select_targets(gpt2, include=["lm_head", "wte"])
    assert len(tied) == 1 and tied[0].param is gpt2.lm_head.weight
    assert set((tied[0].name, *tied[0].aliases)) == {"transformer.wte", "lm_head"}
    # all-linear keeps the head out, like Hugging Face's meaning
    assert names(select_targets(gpt2, include="all-linear")) == names(targets)


def test_llama_all_linear_and_suffix_names():
    llama = tiny_llama()
    assert default_exemptions(llama) == {"model.embed_tokens": "embedding", "lm_head": "output head"}
    all_linear = select_targets(llama, include="all-linear")
    assert len(all_linear) == 2 * 7 and "lm_head" not in names(all_linear)
    qv = select_targets(llama, include=["q_proj", "v_proj"])
    assert names(qv) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_sequential_and_duplicated_modules():
    shared = nn.Linear(8, 8)
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, shared, nn.Linear(8, 8), nn.Linear(8, 2))
    targets = select_targets(seq)
    # the last layer is the head; the same module registered twice is one target
    assert names(targets) == ["0", "2", "4"]
    assert targets[1].aliases == ("3",)
    assert default_exemptions(seq) == {"5": "output head"}


def test_bad_patterns_raise_with_close_names():
    vit = Wrapper(tiny_vit())
    with pytest.raises(ValueError, match="`include` pattern 'blocks.\\*.mlp.fc3' matches no module.*blocks.0.mlp.fc"):
        select_targets(vit, include=["blocks.*.mlp.fc3"])
    with pytest.raises(ValueError, match="`exclude` pattern 'blcks.0' matches no module"):
        select_targets(vit, exclude=["blcks.0"])
    with pytest.raises(ValueError, match="`include` pattern 'blocks.0.norm1' matches model.blocks.0.norm1, but none"):
        select_targets(vit, include=["blocks.0.norm1"])
    with pytest.raises(ValueError, match="no weights selected"):
        select_targets(vit, exclude=["blocks"])
    with pytest.raises(ValueError, match="`target_modules` pattern 're:\\(' is not a valid regular expression"):
        validate_patterns(["re:("], "target_modules")
    with pytest.raises(ValueError, match="`include` must be a list of non-empty"):
        validate_patterns([""], "include")
    with pytest.raises(ValueError, match="unknown module kinds"):
        select_targets(vit, kinds=["lstm"])


def test_match_modules_any_type_in_order():
    vit = tiny_vit()
    found = match_modules(vit, ["blocks.*.norm1", "patch_embed"], "blocks")
    assert [n for n, _ in found] == ["patch_embed", "blocks.0.norm1", "blocks.1.norm1"]
    with pytest.raises(ValueError, match="`blocks` pattern 'block.9' matches no module"):
        match_modules(vit, ["block.9"], "blocks")


def test_module_kind():
    assert module_kind(nn.Linear(2, 2)) == "linear"
    assert module_kind(nn.Conv1d(2, 2, 3)) == "conv"
    assert module_kind(nn.ConvTranspose2d(2, 2, 3)) == "conv"
    assert module_kind(nn.Embedding(5, 2)) == "embedding"
    assert module_kind(nn.LayerNorm(4)) is None
    assert module_kind(nn.Linear(2, 2, bias=False)) == "linear"


def test_refuse_sharded_strategies_refuses_sharding_strategies():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    from lit_efficient.core.distributed import refuse_sharded_strategies

    for ok in (SingleDeviceStrategy("cpu"), DDPStrategy()):
        refuse_sharded_strategies(SimpleNamespace(strategy=ok), "GraNet", "masks need whole weights")
    with pytest.raises(RuntimeError, match="GraNet supports single-device and DDP training; FSDPStrategy shards"):
        refuse_sharded_strategies(SimpleNamespace(strategy=FSDPStrategy()), "GraNet", "masks need whole weights")
